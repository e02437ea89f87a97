//! A blocking [`ByteStream`] over any non-blocking
//! [`fractos_transport::Channel`], so [`crate::Process::attach_channel`]
//! works over every channel kind (a shared-memory ring, an RDMA queue pair,
//! a test channel) with the same reader thread as TCP.
//!
//! The channel trait has no readiness notification, so a blocked read or a
//! write into a full channel polls it, sleeping between attempts with a
//! backoff from [`FIRST_WAIT`] up to [`LONGEST_WAIT`]: an idle reader costs
//! a wake-up per millisecond at most, and a message arriving on an idle
//! channel is seen within that. A channel kind that can do better (an
//! eventfd, a completion queue) can implement [`ByteStream`] itself.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fractos_transport::{Channel, Framing, Received, TransportError};
use fractos_wire::FRAME_HEADER_LEN;

use crate::process::ByteStream;

/// First sleep of a blocked read or write.
pub const FIRST_WAIT: Duration = Duration::from_micros(20);
/// Longest sleep of a blocked read or write.
pub const LONGEST_WAIT: Duration = Duration::from_millis(1);
/// Bytes asked from a stream channel per receive.
const READ_CHUNK: usize = 64 * 1024;

/// A [`ByteStream`] over the channel `C`; clones share the channel.
///
/// Reads return the channel's bytes (for a message channel, its messages'
/// bytes in order: each message is one length-prefixed frame, so the
/// concatenation is a valid frame stream). Writes to a message channel are
/// cut into whole frames, one message each.
pub struct ChannelStream<C: Channel> {
    shared: Arc<Shared<C>>,
}

struct Shared<C: Channel> {
    state: Mutex<State<C>>,
}

struct State<C> {
    ch: C,
    /// Received and not yet read: `rbuf[rpos..]`.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Message channels: written bytes not yet a whole frame.
    wbuf: Vec<u8>,
    /// The other side finished sending.
    eof: bool,
    /// [`ByteStream::shutdown`] was called.
    shut: bool,
    read_timeout: Option<Duration>,
}

impl<C: Channel> ChannelStream<C> {
    /// Wraps a connected channel.
    pub fn new(ch: C) -> Self {
        ChannelStream {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    ch,
                    rbuf: Vec::new(),
                    rpos: 0,
                    wbuf: Vec::new(),
                    eof: false,
                    shut: false,
                    read_timeout: None,
                }),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<C>> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes our side: blocked and later reads return end of stream,
    /// writes fail.
    fn close_channel(&self) {
        let mut s = self.state();
        if !s.shut {
            s.shut = true;
            s.ch.close(&mut ());
        }
    }
}

fn io_error(e: TransportError) -> io::Error {
    let kind = match e {
        TransportError::Reset => io::ErrorKind::ConnectionReset,
        TransportError::Closed => io::ErrorKind::NotConnected,
        TransportError::TooLarge { .. } => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, e)
}

/// Sleeps for the current backoff and doubles it.
fn wait(backoff: &mut Duration) {
    std::thread::sleep(*backoff);
    *backoff = (*backoff * 2).min(LONGEST_WAIT);
}

impl<C: Channel> Read for ChannelStream<C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut backoff = FIRST_WAIT;
        let mut deadline = None;
        loop {
            let mut s = self.state();
            if s.rpos < s.rbuf.len() {
                let n = buf.len().min(s.rbuf.len() - s.rpos);
                buf[..n].copy_from_slice(&s.rbuf[s.rpos..s.rpos + n]);
                s.rpos += n;
                if s.rpos == s.rbuf.len() {
                    s.rbuf.clear();
                    s.rpos = 0;
                }
                return Ok(n);
            }
            if s.eof || s.shut {
                return Ok(0);
            }
            let State { ch, rbuf, .. } = &mut *s;
            match ch.recv(&mut (), rbuf, READ_CHUNK.max(buf.len())) {
                Ok(Received::Data(_)) => continue,
                Ok(Received::Closed) | Err(TransportError::Closed) => {
                    s.eof = true;
                    return Ok(0);
                }
                Ok(Received::Empty) => {}
                Err(e) => return Err(io_error(e)),
            }
            let timeout = s.read_timeout;
            drop(s);
            if let Some(t) = timeout {
                // A timeout too large for the clock is no deadline.
                let at = *deadline.get_or_insert_with(|| Instant::now().checked_add(t));
                if at.is_some_and(|at| Instant::now() >= at) {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nothing arrived on the channel in time",
                    ));
                }
            }
            wait(&mut backoff);
        }
    }
}

impl<C: Channel> ChannelStream<C> {
    /// Sends all of `data` (one message, for a message channel), waiting
    /// while the channel is full.
    fn send_all(&self, mut data: &[u8]) -> io::Result<()> {
        let mut backoff = FIRST_WAIT;
        while !data.is_empty() {
            let mut s = self.state();
            if s.shut {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the channel was shut down",
                ));
            }
            match s.ch.send(&mut (), data).map_err(io_error)? {
                0 => {
                    drop(s);
                    wait(&mut backoff);
                }
                n => {
                    data = &data[n..];
                    backoff = FIRST_WAIT;
                }
            }
        }
        Ok(())
    }
}

impl<C: Channel> Write for ChannelStream<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let framing = self.state().ch.framing();
        match framing {
            Framing::Stream => self.send_all(buf)?,
            Framing::Message => {
                // Whole frames only, one per message.
                let frames = {
                    let mut s = self.state();
                    s.wbuf.extend_from_slice(buf);
                    let mut whole = 0;
                    while let Some(prefix) = s.wbuf.get(whole..whole + FRAME_HEADER_LEN) {
                        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]])
                            as usize;
                        if s.wbuf.len() < whole + FRAME_HEADER_LEN + len {
                            break;
                        }
                        whole += FRAME_HEADER_LEN + len;
                    }
                    let rest = s.wbuf.split_off(whole);
                    std::mem::replace(&mut s.wbuf, rest)
                };
                let mut at = 0;
                while at < frames.len() {
                    let len = u32::from_le_bytes([
                        frames[at],
                        frames[at + 1],
                        frames[at + 2],
                        frames[at + 3],
                    ]) as usize;
                    let end = at + FRAME_HEADER_LEN + len;
                    self.send_all(&frames[at..end])?;
                    at = end;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<C: Channel + Send + 'static> ByteStream for ChannelStream<C> {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(ChannelStream {
            shared: self.shared.clone(),
        })
    }

    fn shutdown(&self) -> io::Result<()> {
        self.close_channel();
        Ok(())
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.state().read_timeout = timeout;
        Ok(())
    }
}

impl<C: Channel> Drop for Shared<C> {
    fn drop(&mut self) {
        // The last handle is gone: nobody reads or writes any more.
        let s = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if !s.shut {
            s.ch.close(&mut ());
        }
        s.ch.release(&mut ());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractos_transport::MemoryChannel;

    fn frame(name: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        fractos_wire::ProcessMsg::Unpublish {
            op: 1,
            name: name.to_vec(),
        }
        .encode(&mut f);
        f
    }

    #[test]
    fn writes_to_a_message_channel_become_whole_frames() {
        let (a, mut b) = MemoryChannel::pair(Framing::Message, 1 << 20);
        let mut s = ChannelStream::new(a);
        let (one, two, three) = (frame(b"one"), frame(b""), frame(b"three"));
        // A frame in pieces, then two frames in one write.
        s.write_all(&one[..2]).unwrap();
        s.write_all(&one[2..]).unwrap();
        let mut both = two.clone();
        both.extend_from_slice(&three);
        s.write_all(&both).unwrap();
        let mut got = Vec::new();
        for want in [&one, &two, &three] {
            got.clear();
            assert_eq!(
                b.recv(&mut (), &mut got, 1 << 20),
                Ok(Received::Data(want.len()))
            );
            assert_eq!(&got, want);
        }
        assert_eq!(b.recv(&mut (), &mut got, 1 << 20), Ok(Received::Empty));
    }

    #[test]
    fn reads_time_out_end_at_close_and_at_shutdown() {
        let (a, mut b) = MemoryChannel::pair(Framing::Stream, 1 << 20);
        let mut s = ChannelStream::new(a);
        s.state().read_timeout = Some(Duration::from_millis(5));
        let mut buf = [0u8; 8];
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        b.send(&mut (), b"abc").unwrap();
        assert_eq!(s.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        b.send(&mut (), b"de").unwrap();
        b.close(&mut ());
        assert_eq!(s.read(&mut buf).unwrap(), 2);
        assert_eq!(s.read(&mut buf).unwrap(), 0, "end of stream");
        // Shutdown makes reads return and closes our side.
        let (a, b) = MemoryChannel::pair(Framing::Stream, 1 << 20);
        let mut s = ChannelStream::new(a);
        s.close_channel();
        assert!(b.peer_gone());
        assert_eq!(s.read(&mut buf).unwrap(), 0);
        assert!(s.write(b"x").is_err());
        // Dropping the last handle closes the channel too.
        let (a, b) = MemoryChannel::pair(Framing::Stream, 1 << 20);
        drop(ChannelStream::new(a));
        assert!(b.peer_gone());
    }
}
