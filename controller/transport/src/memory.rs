//! An in-memory channel pair.

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use crate::{Channel, Framing, Received, TransportError};

#[derive(Debug, Default)]
struct Pipe {
    /// Stream bytes, or messages (one entry each).
    bytes: VecDeque<u8>,
    messages: VecDeque<Vec<u8>>,
    queued: usize,
    /// The writer closed gracefully.
    fin: bool,
    /// Either side aborted.
    reset: bool,
}

#[derive(Debug)]
struct Shared {
    /// `pipes[i]` carries what side `i` sends.
    pipes: [Pipe; 2],
    capacity: usize,
}

/// One end of an in-memory channel: bounded buffers in each direction
/// (a full buffer takes nothing, like a socket's), graceful close and
/// reset. Single-threaded (`Rc`), for tests and for processes that live in
/// the controller's own address space.
#[derive(Debug)]
pub struct MemoryChannel {
    shared: Rc<RefCell<Shared>>,
    side: usize,
    framing: Framing,
    closed: bool,
}

impl MemoryChannel {
    /// Two connected ends; each direction buffers at most `capacity` bytes.
    pub fn pair(framing: Framing, capacity: usize) -> (MemoryChannel, MemoryChannel) {
        let shared = Rc::new(RefCell::new(Shared {
            pipes: [Pipe::default(), Pipe::default()],
            capacity,
        }));
        let end = |side| MemoryChannel {
            shared: shared.clone(),
            side,
            framing,
            closed: false,
        };
        (end(0), end(1))
    }

    /// Bytes sent by this end that the other has not received yet.
    pub fn unread(&self) -> usize {
        self.shared.borrow().pipes[self.side].queued
    }

    /// Whether the other end has closed or reset.
    pub fn peer_gone(&self) -> bool {
        let s = self.shared.borrow();
        let theirs = &s.pipes[1 - self.side];
        theirs.fin || theirs.reset || s.pipes[self.side].reset
    }
}

impl<Cx: ?Sized> Channel<Cx> for MemoryChannel {
    fn framing(&self) -> Framing {
        self.framing
    }

    fn send(&mut self, _: &mut Cx, data: &[u8]) -> Result<usize, TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        let mut s = self.shared.borrow_mut();
        if s.pipes[0].reset || s.pipes[1].reset {
            return Err(TransportError::Reset);
        }
        let capacity = s.capacity;
        let p = &mut s.pipes[self.side];
        let room = capacity - p.queued;
        match self.framing {
            Framing::Stream => {
                let n = data.len().min(room);
                p.bytes.extend(&data[..n]);
                p.queued += n;
                Ok(n)
            }
            Framing::Message if data.len() > capacity => Err(TransportError::TooLarge {
                len: data.len(),
                max: capacity,
            }),
            Framing::Message if data.len() > room => Ok(0),
            Framing::Message => {
                p.messages.push_back(data.to_vec());
                p.queued += data.len();
                Ok(data.len())
            }
        }
    }

    fn recv(
        &mut self,
        _: &mut Cx,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Received, TransportError> {
        let mut s = self.shared.borrow_mut();
        let theirs = 1 - self.side;
        if s.pipes[theirs].reset || s.pipes[self.side].reset {
            return Err(TransportError::Reset);
        }
        let p = &mut s.pipes[theirs];
        let n = match self.framing {
            Framing::Stream => {
                let n = p.bytes.len().min(max);
                out.extend(p.bytes.drain(..n));
                n
            }
            Framing::Message => match p.messages.pop_front() {
                Some(m) => {
                    out.extend_from_slice(&m);
                    m.len()
                }
                None => 0,
            },
        };
        p.queued -= n;
        if n > 0 {
            Ok(Received::Data(n))
        } else if p.fin && p.queued == 0 {
            Ok(Received::Closed)
        } else {
            Ok(Received::Empty)
        }
    }

    fn close(&mut self, _: &mut Cx) {
        self.closed = true;
        self.shared.borrow_mut().pipes[self.side].fin = true;
    }

    fn abort(&mut self, _: &mut Cx) {
        self.closed = true;
        let mut s = self.shared.borrow_mut();
        s.pipes[self.side].reset = true;
        s.pipes[self.side].bytes.clear();
        s.pipes[self.side].messages.clear();
        s.pipes[self.side].queued = 0;
    }

    fn is_finished(&self, _: &mut Cx) -> bool {
        let s = self.shared.borrow();
        let (mine, theirs) = (&s.pipes[self.side], &s.pipes[1 - self.side]);
        mine.reset
            || theirs.reset
            || (self.closed && mine.queued == 0 && theirs.fin && theirs.queued == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_stream_with_backpressure_and_close() {
        let (mut a, mut b) = MemoryChannel::pair(Framing::Stream, 4);
        assert_eq!(a.send(&mut (), b"abcdef"), Ok(4));
        assert_eq!(a.send(&mut (), b"x"), Ok(0));
        let mut out = Vec::new();
        assert_eq!(b.recv(&mut (), &mut out, 3), Ok(Received::Data(3)));
        assert_eq!(out, b"abc");
        assert_eq!(a.send(&mut (), b"xyz"), Ok(3));
        a.close(&mut ());
        assert_eq!(a.send(&mut (), b"late"), Err(TransportError::Closed));
        assert_eq!(b.recv(&mut (), &mut out, 100), Ok(Received::Data(4)));
        assert_eq!(out, b"abcdxyz");
        assert_eq!(b.recv(&mut (), &mut out, 100), Ok(Received::Closed));
        assert!(!Channel::<()>::is_finished(&a, &mut ()));
        b.close(&mut ());
        assert!(Channel::<()>::is_finished(&a, &mut ()));
        assert!(Channel::<()>::is_finished(&b, &mut ()));
    }

    #[test]
    fn messages_whole_or_nothing_and_reset() {
        let (mut a, mut b) = MemoryChannel::pair(Framing::Message, 8);
        assert_eq!(a.send(&mut (), b"12345"), Ok(5));
        assert_eq!(a.send(&mut (), b"6789"), Ok(0), "no room: nothing taken");
        assert_eq!(
            a.send(&mut (), &[0; 9]),
            Err(TransportError::TooLarge { len: 9, max: 8 })
        );
        let mut out = Vec::new();
        assert_eq!(b.recv(&mut (), &mut out, 1), Ok(Received::Data(5)));
        assert_eq!(b.recv(&mut (), &mut out, 1), Ok(Received::Empty));
        b.abort(&mut ());
        assert_eq!(a.send(&mut (), b"x"), Err(TransportError::Reset));
        assert_eq!(a.recv(&mut (), &mut out, 1), Err(TransportError::Reset));
        assert!(a.peer_gone());
    }
}
