//! Frames on top of a channel.

use alloc::vec::Vec;

use fractos_wire::{frame_body, DecodeError, FrameSplitter, FRAME_HEADER_LEN};

use crate::{Channel, Framing, Received, TransportError};

/// Why a channel's input cannot be framed; the channel must be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The announced or received frame is malformed or too large.
    #[error("unframeable input: {0}")]
    Unframeable(DecodeError),
    /// The channel failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Reassembles frames from a channel's input, bounded by a frame limit.
#[derive(Debug)]
pub struct FrameReader {
    splitter: FrameSplitter,
    max_len: usize,
    buf: Vec<u8>,
    start: usize,
    closed: bool,
}

/// Bytes read from a stream at a time beyond what a frame needs.
const READ_AHEAD: usize = 64 * 1024;

impl FrameReader {
    /// A reader accepting frame bodies of at most `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            splitter: FrameSplitter::new(max_len),
            max_len,
            buf: Vec::new(),
            start: 0,
            closed: false,
        }
    }

    /// Whether the other side finished sending.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Reads what the channel has (bounded: at most one frame limit plus
    /// read-ahead is ever buffered). Returns whether bytes arrived.
    pub fn fill<Cx: ?Sized, C: Channel<Cx> + ?Sized>(
        &mut self,
        ch: &mut C,
        cx: &mut Cx,
    ) -> Result<bool, FrameError> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let limit = FRAME_HEADER_LEN + self.max_len + READ_AHEAD;
        let mut moved = false;
        while !self.closed && self.buffered() < limit {
            if self.start > 0 && self.buf.len() + READ_AHEAD > self.buf.capacity() {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let room = limit - self.buffered();
            match ch.recv(cx, &mut self.buf, room)? {
                Received::Data(0) | Received::Empty => break,
                Received::Data(_) => {
                    moved = true;
                    if ch.framing() == Framing::Message {
                        // One message is one frame: check it now, so a
                        // message transport never buffers a bad one.
                        return self.check_message().map(|()| true);
                    }
                }
                Received::Closed => self.closed = true,
            }
        }
        Ok(moved)
    }

    fn check_message(&mut self) -> Result<(), FrameError> {
        frame_body(&self.buf[self.start..], self.max_len)
            .map(|_| ())
            .map_err(FrameError::Unframeable)
    }

    /// The next complete frame body, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        match self.splitter.split(&self.buf[self.start..]) {
            Ok(Some((_, n))) => {
                let at = self.start;
                self.start += n;
                Ok(Some(&self.buf[at + FRAME_HEADER_LEN..at + n]))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(FrameError::Unframeable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryChannel;
    use alloc::vec;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn stream_frames_split_and_coalesced() {
        let (mut a, mut b) = MemoryChannel::pair(Framing::Stream, 1 << 20);
        let mut all = frame(b"one");
        all.extend(frame(b""));
        all.extend(frame(&[7u8; 5000]));
        // Byte by byte, then the rest at once.
        for byte in &all[..5] {
            assert_eq!(a.send(&mut (), &[*byte]), Ok(1));
        }
        assert_eq!(a.send(&mut (), &all[5..]), Ok(all.len() - 5));
        let mut r = FrameReader::new(8192);
        assert!(r.fill(&mut b, &mut ()).unwrap());
        assert_eq!(r.next_frame().unwrap(), Some(&b"one"[..]));
        assert_eq!(r.next_frame().unwrap(), Some(&b""[..]));
        assert_eq!(r.next_frame().unwrap().map(<[u8]>::len), Some(5000));
        assert_eq!(r.next_frame().unwrap(), None);
        a.close(&mut ());
        r.fill(&mut b, &mut ()).unwrap();
        assert!(r.is_closed());
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let (mut a, mut b) = MemoryChannel::pair(Framing::Stream, 1 << 20);
        a.send(&mut (), &u32::MAX.to_le_bytes()).unwrap();
        a.send(&mut (), &vec![0u8; 100_000]).unwrap();
        let mut r = FrameReader::new(1024);
        r.fill(&mut b, &mut ()).unwrap();
        assert!(r.buffered() <= 4 + 1024 + READ_AHEAD);
        assert!(matches!(
            r.next_frame(),
            Err(FrameError::Unframeable(DecodeError::Oversized { .. }))
        ));
    }

    #[test]
    fn messages_are_whole_frames_and_checked() {
        let (mut a, mut b) = MemoryChannel::pair(Framing::Message, 1 << 20);
        a.send(&mut (), &frame(b"msg")).unwrap();
        let mut r = FrameReader::new(64);
        r.fill(&mut b, &mut ()).unwrap();
        assert_eq!(r.next_frame().unwrap(), Some(&b"msg"[..]));
        // A message whose prefix lies about its length.
        let mut lying = frame(b"abc");
        lying.push(9);
        a.send(&mut (), &lying).unwrap();
        assert!(matches!(
            r.fill(&mut b, &mut ()),
            Err(FrameError::Unframeable(DecodeError::TrailingBytes(1)))
        ));
    }
}
