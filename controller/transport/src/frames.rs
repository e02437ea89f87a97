//! Frames on top of a channel.

use alloc::vec::Vec;

use fractos_wire::{frame_body, DecodeError, FrameSplitter, FRAME_HEADER_LEN};

use crate::{Channel, Framing, Received, TransportError};

/// Why a channel's input cannot be framed; the channel must be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The announced or received frame is malformed or too large.
    #[error("unframeable input: {0}")]
    Unframeable(#[from] DecodeError),
    /// The channel failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Reassembles frames from a channel's input (or from any byte stream),
/// bounded by a frame limit, without copying a frame out.
///
/// Three ways to feed it: [`FrameReader::fill`] from a [`Channel`];
/// [`FrameReader::read_buf`] then [`FrameReader::filled`] to read a
/// blocking stream straight into its buffer; [`FrameReader::push`] to copy
/// chunks in. Two ways to take frames: [`FrameReader::next_frame`]
/// (consumes), or [`FrameReader::frame`] then [`FrameReader::consume`]
/// (for a consumer that may refuse a frame and retry it later). Only the
/// tail of a partial frame is ever moved. A length prefix above the limit
/// is an error from the prefix alone: a stream cannot be resynchronised.
///
/// ```
/// use fractos_transport::FrameReader;
/// use fractos_wire::{ControllerMsg, NodeId};
///
/// let mut wire = Vec::new();
/// ControllerMsg::Attached { node: NodeId(3) }.encode(&mut wire);
/// let mut r = FrameReader::new(fractos_wire::MAX_FRAME_LEN);
/// r.push(&wire[..3]);
/// assert_eq!(r.frame(), Ok(None)); // more bytes needed
/// r.push(&wire[3..]);
/// let body = r.frame().unwrap().unwrap();
/// assert_eq!(ControllerMsg::decode(body), Ok(ControllerMsg::Attached { node: NodeId(3) }));
/// r.consume();
/// assert!(r.is_empty());
/// ```
#[derive(Clone, Debug)]
pub struct FrameReader {
    splitter: FrameSplitter,
    max_len: usize,
    /// `buf[start..end]` is buffered input; `buf[end..]` is free room
    /// handed out by [`FrameReader::read_buf`].
    buf: Vec<u8>,
    start: usize,
    end: usize,
    closed: bool,
}

/// Bytes read from a stream at a time beyond what a frame needs, and the
/// smallest room [`FrameReader::read_buf`] offers.
const READ_AHEAD: usize = 64 * 1024;

impl FrameReader {
    /// A reader accepting frame bodies of at most `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            splitter: FrameSplitter::new(max_len),
            max_len,
            buf: Vec::new(),
            start: 0,
            end: 0,
            closed: false,
        }
    }

    /// Whether the other side finished sending (seen by
    /// [`FrameReader::fill`]).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Whether no byte is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Reads what the channel has (bounded: at most one frame limit plus
    /// read-ahead is ever buffered). Returns whether bytes arrived. A
    /// message channel's message is checked to be exactly one frame.
    pub fn fill<Cx: ?Sized, C: Channel<Cx> + ?Sized>(
        &mut self,
        ch: &mut C,
        cx: &mut Cx,
    ) -> Result<bool, FrameError> {
        // Channels append: drop the free room of `read_buf`.
        self.buf.truncate(self.end);
        if self.start > 0 && self.start == self.end {
            self.buf.clear();
            (self.start, self.end) = (0, 0);
        }
        let limit = FRAME_HEADER_LEN + self.max_len + READ_AHEAD;
        let mut moved = false;
        while !self.closed && self.buffered() < limit {
            if self.start > 0 && self.buf.len() + READ_AHEAD > self.buf.capacity() {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let room = limit - self.buffered();
            let at = self.end;
            let got = ch.recv(cx, &mut self.buf, room);
            self.end = self.buf.len();
            match got? {
                Received::Data(0) | Received::Empty => break,
                Received::Data(_) => {
                    moved = true;
                    if ch.framing() == Framing::Message {
                        // One message is one frame: check it now, so a
                        // message transport never buffers a bad one.
                        return self.check_message(at).map(|()| true);
                    }
                }
                Received::Closed => self.closed = true,
            }
        }
        Ok(moved)
    }

    fn check_message(&self, at: usize) -> Result<(), FrameError> {
        frame_body(&self.buf[at..self.end], self.max_len)
            .map(|_| ())
            .map_err(FrameError::Unframeable)
    }

    /// Free room to read a byte stream into; report how much was read with
    /// [`FrameReader::filled`]. Never empty.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.buf.len() - self.end < READ_AHEAD {
            // Move the partial frame to the front, then grow if needed.
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() - self.end < READ_AHEAD {
                self.buf.resize(self.end + READ_AHEAD.max(self.end), 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`FrameReader::read_buf`]
    /// (clamped to its length).
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Appends `bytes` of a stream.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.read_buf();
            let n = room.len().min(bytes.len());
            room[..n].copy_from_slice(&bytes[..n]);
            self.filled(n);
            bytes = &bytes[n..];
        }
    }

    /// The body of the first complete frame, `Ok(None)` if more bytes are
    /// needed. Does not consume it: call [`FrameReader::consume`] once it
    /// was handled.
    pub fn frame(&self) -> Result<Option<&[u8]>, DecodeError> {
        Ok(self
            .splitter
            .split(&self.buf[self.start..self.end])?
            .map(|(body, _)| body))
    }

    /// Drops the first complete frame (no-op without one).
    pub fn consume(&mut self) {
        if let Ok(Some((_, used))) = self.splitter.split(&self.buf[self.start..self.end]) {
            self.start += used;
        }
    }

    /// The next complete frame body, if one is buffered, consumed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        match self.splitter.split(&self.buf[self.start..self.end])? {
            Some((_, n)) => {
                let at = self.start;
                self.start += n;
                Ok(Some(&self.buf[at + FRAME_HEADER_LEN..at + n]))
            }
            None => Ok(None),
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
        assert!(matches!(r.next_frame(), Err(DecodeError::Oversized { .. })));
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

    #[test]
    fn read_buf_and_push_reassemble_in_any_chunking() {
        let mut all = Vec::new();
        for len in [0usize, 3, 70_000, 10] {
            all.extend(frame(&vec![len as u8; len]));
        }
        for chunk in [1usize, 7, 4096, 100_000] {
            let mut r = FrameReader::new(1 << 20);
            let mut got = Vec::new();
            for (i, part) in all.chunks(chunk).enumerate() {
                if i % 2 == 0 {
                    r.push(part);
                } else {
                    let room = r.read_buf();
                    assert!(room.len() >= part.len().min(READ_AHEAD));
                    let mut part = part;
                    while !part.is_empty() {
                        let room = r.read_buf();
                        let n = room.len().min(part.len());
                        room[..n].copy_from_slice(&part[..n]);
                        r.filled(n);
                        part = &part[n..];
                    }
                }
                while let Some(body) = r.frame().unwrap() {
                    got.push(body.len());
                    r.consume();
                }
            }
            assert_eq!(got, [0, 3, 70_000, 10], "chunk {chunk}");
            assert!(r.is_empty());
        }
    }

    #[test]
    fn frame_peeks_until_consumed() {
        let mut r = FrameReader::new(64);
        r.push(&frame(b"a"));
        r.push(&frame(b"b"));
        assert_eq!(r.frame(), Ok(Some(&b"a"[..])));
        assert_eq!(r.frame(), Ok(Some(&b"a"[..])));
        r.consume();
        assert_eq!(r.next_frame(), Ok(Some(&b"b"[..])));
        r.consume();
        assert_eq!(r.next_frame(), Ok(None));
        // Unused room from `read_buf` is never taken for input by `fill`.
        let _ = r.read_buf();
        let (mut a, mut b) = MemoryChannel::pair(Framing::Stream, 1 << 10);
        a.send(&mut (), &frame(b"c")).unwrap();
        r.fill(&mut b, &mut ()).unwrap();
        assert_eq!(r.next_frame(), Ok(Some(&b"c"[..])));
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&u32::MAX.to_le_bytes());
        assert!(matches!(
            r.frame(),
            Err(DecodeError::Oversized { max: 64, .. })
        ));
    }

    #[test]
    fn each_message_is_checked_on_its_own() {
        let (mut a, mut b) = MemoryChannel::pair(Framing::Message, 1 << 20);
        let mut r = FrameReader::new(64);
        a.send(&mut (), &frame(b"one")).unwrap();
        a.send(&mut (), &frame(b"two")).unwrap();
        // Two fills without taking frames in between: both are frames.
        r.fill(&mut b, &mut ()).unwrap();
        r.fill(&mut b, &mut ()).unwrap();
        assert_eq!(r.next_frame(), Ok(Some(&b"one"[..])));
        assert_eq!(r.next_frame(), Ok(Some(&b"two"[..])));
    }
}
