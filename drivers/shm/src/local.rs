//! The local-socket protocol: what a process and its hosted controller
//! say over the Unix socket of a local channel (the FractOS frames
//! themselves travel in the rings).
//!
//! Every message is `len: u32 | kind: u8 | payload` (little-endian; `len`
//! counts kind and payload, at most [`MAX_LOCAL_MSG`]); descriptors ride
//! along with `SCM_RIGHTS`, in the order listed:
//!
//! | kind | message | payload | descriptors |
//! |---|---|---|---|
//! | 1 | `Hello` (process) | `version: u32` | ring memfd, up kick, down kick |
//! | 2 | `Register` (process) | `addr, len, file_offset: u64` | region memfd |
//! | 3 | `Unregister` (process) | `addr: u64` | — |
//! | 4 | `Ack` (controller) | `of: u8, addr: u64, error_len: u16, error` | — |
//!
//! The process sends one message and waits for its `Ack` before the next,
//! so descriptors never race. The controller answers every message; an
//! `Ack` with a non-empty error means nothing happened. The socket stays
//! open for the channel's life: its end is the process's exit.

use crate::ShmError;

/// The protocol version of this module.
pub const LOCAL_VERSION: u32 = 1;
/// Largest message (length field) accepted.
pub const MAX_LOCAL_MSG: usize = 4096;

/// Kind byte of [`LocalMsg::Hello`].
pub const HELLO: u8 = 1;
/// Kind byte of [`LocalMsg::Register`].
pub const REGISTER: u8 = 2;
/// Kind byte of [`LocalMsg::Unregister`].
pub const UNREGISTER: u8 = 3;
/// Kind byte of [`LocalMsg::Ack`].
pub const ACK: u8 = 4;

/// One message of the local-socket protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalMsg {
    /// The process offers its rings (3 descriptors: the ring memfd, the
    /// eventfd the controller sleeps on, the eventfd the process sleeps on).
    Hello {
        /// [`LOCAL_VERSION`] of the process.
        version: u32,
    },
    /// The process registers `[addr, addr+len)`, backed by the memfd that
    /// comes with the message at `file_offset` (page-aligned).
    Register {
        /// Start in the process's registered address space.
        addr: u64,
        /// Bytes.
        len: u64,
        /// Where the region starts in the memfd.
        file_offset: u64,
    },
    /// The process withdraws the region starting at `addr`.
    Unregister {
        /// Start address.
        addr: u64,
    },
    /// The controller's answer to message kind `of` (for `addr`, where
    /// there is one); `error` is empty on success.
    Ack {
        /// The kind answered (`1` hello, `2` register, `3` unregister).
        of: u8,
        /// The region concerned (0 for a hello).
        addr: u64,
        /// Why it was refused; empty when done.
        error: String,
    },
}

impl LocalMsg {
    /// Descriptors that must come with this message.
    pub fn fds(&self) -> usize {
        match self {
            LocalMsg::Hello { .. } => 3,
            LocalMsg::Register { .. } => 1,
            _ => 0,
        }
    }

    /// The kind byte (what an `Ack` names in `of`).
    pub fn kind(&self) -> u8 {
        match self {
            LocalMsg::Hello { .. } => HELLO,
            LocalMsg::Register { .. } => REGISTER,
            LocalMsg::Unregister { .. } => UNREGISTER,
            LocalMsg::Ack { .. } => ACK,
        }
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.push(self.kind());
        match self {
            LocalMsg::Hello { version } => out.extend_from_slice(&version.to_le_bytes()),
            LocalMsg::Register {
                addr,
                len,
                file_offset,
            } => {
                for v in [addr, len, file_offset] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            LocalMsg::Unregister { addr } => out.extend_from_slice(&addr.to_le_bytes()),
            LocalMsg::Ack { of, addr, error } => {
                let e = &error.as_bytes()[..error.len().min(MAX_LOCAL_MSG - 16)];
                out.push(*of);
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&(e.len() as u16).to_le_bytes());
                out.extend_from_slice(e);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes the first message of `buf`: `Ok(None)` if it is not all
    /// there yet, else the message and the bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(LocalMsg, usize)>, ShmError> {
        let Some(head) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_LOCAL_MSG {
            return Err(ShmError::BadMessage("message length out of range"));
        }
        let Some(body) = buf.get(4..4 + len) else {
            return Ok(None);
        };
        let (kind, p) = (body[0], &body[1..]);
        let u64_at = |i: usize| -> Result<u64, ShmError> {
            p.get(i..i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or(ShmError::BadMessage("message too short"))
        };
        let exact = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(ShmError::BadMessage(
                    "message length does not match its kind",
                ))
            }
        };
        let msg = match kind {
            HELLO => {
                exact(4)?;
                LocalMsg::Hello {
                    version: u32::from_le_bytes(p[..4].try_into().expect("4 bytes")),
                }
            }
            REGISTER => {
                exact(24)?;
                LocalMsg::Register {
                    addr: u64_at(0)?,
                    len: u64_at(8)?,
                    file_offset: u64_at(16)?,
                }
            }
            UNREGISTER => {
                exact(8)?;
                LocalMsg::Unregister { addr: u64_at(0)? }
            }
            ACK => {
                if p.len() < 11 {
                    return Err(ShmError::BadMessage("message too short"));
                }
                let elen = u16::from_le_bytes([p[9], p[10]]) as usize;
                exact(11 + elen)?;
                LocalMsg::Ack {
                    of: p[0],
                    addr: u64_at(1)?,
                    error: String::from_utf8_lossy(&p[11..]).into_owned(),
                }
            }
            _ => return Err(ShmError::BadMessage("unknown message kind")),
        };
        Ok(Some((msg, 4 + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let msgs = [
            LocalMsg::Hello { version: 1 },
            LocalMsg::Register {
                addr: 1 << 32,
                len: 4096,
                file_offset: 8192,
            },
            LocalMsg::Unregister { addr: 7 },
            LocalMsg::Ack {
                of: 2,
                addr: 9,
                error: "no".into(),
            },
            LocalMsg::Ack {
                of: 1,
                addr: 0,
                error: String::new(),
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        let mut at = 0;
        for m in &msgs {
            // Every prefix is "not yet".
            assert_eq!(LocalMsg::decode(&wire[at..at + 3]).unwrap(), None);
            let (got, n) = LocalMsg::decode(&wire[at..]).unwrap().unwrap();
            assert_eq!(&got, m);
            at += n;
        }
        assert_eq!(at, wire.len());
        for bad in [
            &[0, 0, 0, 0][..],
            &[0xff, 0xff, 0, 0, 1],
            &[1, 0, 0, 0, 9],
            &[2, 0, 0, 0, 1, 0],
            &[12, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0],
        ] {
            assert!(LocalMsg::decode(bad).is_err(), "{bad:?}");
        }
    }
}
