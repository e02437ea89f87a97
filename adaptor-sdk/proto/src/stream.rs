//! Byte-stream framing: turns chunks of a stream transport into frame
//! bodies for [`crate::Connection::handle_body`].

use alloc::vec::Vec;

use fractos_wire::{FrameSplitter, FRAME_HEADER_LEN};

use crate::Error;

/// Smallest free space [`FrameReader::read_buf`] offers.
const MIN_READ: usize = 64 * 1024;

/// Buffers a byte stream and splits it into frame bodies with
/// [`fractos_wire::FrameSplitter`], without copying a frame out.
///
/// Either read straight into it ([`FrameReader::read_buf`] then
/// [`FrameReader::filled`]) or copy chunks in ([`FrameReader::push`]);
/// then take frames with [`FrameReader::frame`] and
/// [`FrameReader::consume`]. Only the tail of a partial frame is ever
/// moved.
///
/// ```
/// use fractos_process::FrameReader;
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
    buf: Vec<u8>,
    start: usize,
    end: usize,
    splitter: FrameSplitter,
}

impl FrameReader {
    /// A reader accepting frame bodies of at most `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            splitter: FrameSplitter::new(max_frame_len),
        }
    }

    /// Whether no byte is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Free space to read the stream into; report how much was read with
    /// [`FrameReader::filled`]. Never empty.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.buf.len() - self.end < MIN_READ {
            // Move the partial frame to the front, then grow if needed.
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() - self.end < MIN_READ {
                self.buf.resize(self.end + MIN_READ.max(self.end), 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`FrameReader::read_buf`]
    /// (clamped to its length).
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Appends `bytes` of the stream.
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
    /// was handled. An oversized length prefix is
    /// [`Error::Malformed`]: the stream cannot be resynchronised.
    pub fn frame(&self) -> Result<Option<&[u8]>, Error> {
        Ok(self
            .splitter
            .split(&self.buf[self.start..self.end])?
            .map(|(body, _)| body))
    }

    /// Drops the first complete frame (no-op without one).
    pub fn consume(&mut self) {
        if let Ok(Some((_, used))) = self.splitter.split(&self.buf[self.start..self.end]) {
            debug_assert!(used >= FRAME_HEADER_LEN);
            self.start += used;
        }
    }
}
