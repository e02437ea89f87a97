//! Channels between FractOS endpoints, independent of what carries them.
//!
//! A [`Channel`] is one bidirectional, non-blocking connection. It carries
//! either a byte stream ([`Framing::Stream`]: TCP, smoltcp TCP) or whole
//! messages ([`Framing::Message`]: shared-memory rings, RDMA SENDs); the
//! FractOS frames on top are recovered by a [`FrameReader`] either way.
//! Nothing here blocks, reads a clock or spawns a thread.
//!
//! The `Cx` parameter is the context a host lends its channels for I/O:
//! `()` for channels that own their resources (tokio sockets, the
//! in-memory [`MemoryChannel`]), the smoltcp socket sets for the
//! appliance's TCP sockets (which live in a set, not in the channel).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod frames;
mod memory;
pub mod ring;
mod ring_channel;
pub mod slot;

pub use frames::{FrameError, FrameReader};
pub use memory::MemoryChannel;
pub use ring_channel::{Kick, NoKick, RingChannel};

use fractos_wire::ErrorCode;

use alloc::vec::Vec;

/// What a channel carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// A byte stream: frames are length-delimited and may arrive split or
    /// coalesced.
    Stream,
    /// Whole messages: each receive yields exactly one frame.
    Message,
}

/// Why a channel operation failed. The channel is unusable afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The other side reset or vanished.
    #[error("the connection was reset by the other side")]
    Reset,
    /// The channel was closed on this side.
    #[error("the channel is closed on this side")]
    Closed,
    /// A message larger than the channel can ever carry.
    #[error("message of {len} bytes exceeds the channel's limit of {max}")]
    TooLarge {
        /// Bytes offered.
        len: usize,
        /// The most the channel carries in one message.
        max: usize,
    },
}

/// What a receive produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// This many bytes were appended (for message channels: one whole
    /// message).
    Data(usize),
    /// Nothing available now.
    Empty,
    /// The other side finished sending; nothing more will arrive.
    Closed,
}

/// One bidirectional, non-blocking connection.
pub trait Channel<Cx: ?Sized = ()> {
    /// What the channel carries.
    fn framing(&self) -> Framing;

    /// Offers `data` without blocking and returns how many bytes were
    /// taken. A stream channel may take any prefix (0 when its buffers are
    /// full); a message channel takes the whole message or nothing.
    fn send(&mut self, cx: &mut Cx, data: &[u8]) -> Result<usize, TransportError>;

    /// Appends available bytes to `out` without blocking: at most `max`
    /// bytes of a stream, or one whole message (which may exceed `max`:
    /// the caller's framing decides whether that is an error).
    fn recv(
        &mut self,
        cx: &mut Cx,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Received, TransportError>;

    /// Starts a graceful close: what was sent is still delivered, then the
    /// other side sees [`Received::Closed`].
    fn close(&mut self, cx: &mut Cx);

    /// Closes at once, dropping unsent data; the other side sees a reset.
    fn abort(&mut self, cx: &mut Cx);

    /// Whether the channel is fully closed and its resources may go.
    fn is_finished(&self, cx: &mut Cx) -> bool;

    /// Called once when its owner drops the channel, to free what lives in
    /// `cx` (e.g. a socket in a socket set). Nothing by default.
    fn release(&mut self, cx: &mut Cx) {
        let _ = cx;
    }

    /// Direct access to the registered memory of the process at the other
    /// end (memory this side has mapped, RDMA one-sided access), or `None`
    /// (the default) when that memory is reached only through `MemRead` /
    /// `MemWrite` messages. A driver that gets `Some` serves the core's
    /// memory accesses for this channel through it.
    fn direct_memory(&mut self) -> Option<&mut dyn DirectMemory<Cx>> {
        None
    }
}

/// The registered memory of a process, reachable without involving it.
///
/// Addresses are absolute in the process's registered address space (as
/// in `MemoryCreate`). An access that is not wholly inside one region the
/// process made reachable fails with [`ErrorCode::MemoryFault`] and
/// touches nothing. The process may be writing the same bytes
/// concurrently: a read returns whatever was there.
pub trait DirectMemory<Cx: ?Sized = ()> {
    /// Copies `out.len()` bytes at `addr` into `out`.
    fn read(&mut self, cx: &mut Cx, addr: u64, out: &mut [u8]) -> Result<(), ErrorCode>;

    /// Copies `data` to `addr`.
    fn write(&mut self, cx: &mut Cx, addr: u64, data: &[u8]) -> Result<(), ErrorCode>;

    /// The address a DMA-capable device of this machine uses for the `len`
    /// bytes at `addr`, if they are wholly inside one region and physically
    /// contiguous; `None` (the default) when devices cannot reach them.
    fn device_address(&mut self, addr: u64, len: usize) -> Option<u64> {
        let _ = (addr, len);
        None
    }
}
