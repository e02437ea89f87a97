//! Shared memory for FractOS local channels on a Linux host.
//!
//! The only crate of the hosted local channel with `unsafe` code: each
//! block says why it is sound. It provides
//!
//! * [`Mapping`]: a `MAP_SHARED` mapping of a memfd sealed against
//!   shrinking and growing. [`Mapping::create`] makes and seals a fresh
//!   one; [`Mapping::open`] maps a memfd another process sent, after
//!   checking its seals and size (an unsealed or short memfd is a typed
//!   [`ShmError`], never a mapping that could `SIGBUS`). It implements the
//!   rings' [`fractos_transport::ring::SharedMemory`] (bounds-checked
//!   atomics and `memcpy`);
//! * [`EventFd`]: the kick of the rings' sleep/wake handshake
//!   ([`fractos_transport::Kick`]), with a wait that also notices the
//!   other process hanging up;
//! * [`send_with_fds`] / [`recv_with_fds`] (`SCM_RIGHTS`) and
//!   [`peer_cred`] (`SO_PEERCRED`);
//! * [`local`]: the messages a process and its controller exchange over
//!   the local channel's Unix socket (hello with the rings, region
//!   registration).
#![cfg_attr(not(target_os = "linux"), allow(unused))]

mod eventfd;
mod fdpass;
pub mod local;
mod mapping;

#[cfg(feature = "tokio")]
pub use eventfd::AsyncEventFd;
pub use eventfd::EventFd;
pub use fdpass::{peer_cred, recv_with_fds, send_with_fds, PeerCred, MAX_FDS};
pub use mapping::{page_round, Mapping, PAGE, REQUIRED_SEALS};

/// Why a shared-memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The descriptor is not a memfd that supports seals.
    #[error(
        "the descriptor is not a sealable memfd (create it with memfd_create(MFD_ALLOW_SEALING))"
    )]
    NotSealable,
    /// A sealable file that is not plain shared memory (a `MFD_HUGETLB`
    /// memfd: punching holes in it could make the mapping fault).
    #[error("the memfd is not plain shared memory (filesystem magic {magic:#x}); create it without MFD_HUGETLB")]
    NotShmem {
        /// The file system's magic number (`statfs.f_type`).
        magic: u64,
    },
    /// The memfd can still be shrunk or grown.
    #[error("the memfd is not sealed with F_SEAL_SHRINK|F_SEAL_GROW (seals {seals:#x}); seal it before sharing it")]
    NotSealed {
        /// The seals it has.
        seals: u32,
    },
    /// The memfd is smaller than what it must hold.
    #[error("the memfd holds {file_len} bytes but {needed} are needed")]
    TooSmall {
        /// Its size.
        file_len: u64,
        /// The end of the window asked for.
        needed: u64,
    },
    /// A mapping offset that is not page-aligned.
    #[error("mapping offset {offset:#x} is not page-aligned")]
    Misaligned {
        /// The offset.
        offset: u64,
    },
    /// A length of zero, or too large to map.
    #[error("cannot map {len} bytes")]
    BadLength {
        /// The length.
        len: usize,
    },
    /// An access outside the mapping.
    #[error("access of {len} bytes at offset {offset} is outside the {mapped}-byte mapping")]
    OutOfBounds {
        /// Offset asked for.
        offset: usize,
        /// Bytes asked for.
        len: usize,
        /// Bytes mapped.
        mapped: usize,
    },
    /// A received descriptor that should be an eventfd is not one.
    #[error("a descriptor that must be an eventfd is something else")]
    NotEventFd,
    /// More descriptors than one message carries.
    #[error("{got} descriptors in one message; at most {MAX_FDS}")]
    TooManyFds {
        /// Descriptors offered.
        got: usize,
    },
    /// A local-socket message that does not decode.
    #[error("malformed local-socket message: {0}")]
    BadMessage(&'static str),
}
