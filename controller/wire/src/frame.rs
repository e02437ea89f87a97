//! Length-delimited framing for byte streams and message transports.

use crate::{DecodeError, MAX_FRAME_LEN};

/// Bytes in the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Returns the body of a complete single frame (message transports), checking
/// that `frame` holds exactly one frame no longer than `max_len`.
pub fn frame_body(frame: &[u8], max_len: usize) -> Result<&[u8], DecodeError> {
    if frame.len() < FRAME_HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len > max_len {
        return Err(DecodeError::Oversized { len, max: max_len });
    }
    let body = &frame[FRAME_HEADER_LEN..];
    match body.len().cmp(&len) {
        core::cmp::Ordering::Less => Err(DecodeError::Truncated),
        core::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes(body.len() - len)),
        core::cmp::Ordering::Equal => Ok(body),
    }
}

/// Splits a byte stream into frame bodies without copying.
///
/// Feed it the buffered stream prefix; it reports the first complete frame.
/// An announced length above the limit is an error: the stream cannot be
/// resynchronised and the connection should be closed.
#[derive(Clone, Copy, Debug)]
pub struct FrameSplitter {
    max_len: usize,
}

impl Default for FrameSplitter {
    fn default() -> Self {
        Self {
            max_len: MAX_FRAME_LEN,
        }
    }
}

impl FrameSplitter {
    /// A splitter accepting bodies of at most `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// If `buf` starts with a complete frame, returns `(body, consumed)`.
    /// `Ok(None)` means more bytes are needed.
    pub fn split<'a>(&self, buf: &'a [u8]) -> Result<Option<(&'a [u8], usize)>, DecodeError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max_len {
            return Err(DecodeError::Oversized {
                len,
                max: self.max_len,
            });
        }
        let total = FRAME_HEADER_LEN + len;
        if buf.len() < total {
            return Ok(None);
        }
        Ok(Some((&buf[FRAME_HEADER_LEN..total], total)))
    }
}
