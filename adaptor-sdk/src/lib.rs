//! The FractOS adaptor SDK.
//!
//! An *adaptor* is an untrusted Linux process fronting a device (storage,
//! an accelerator) or an application. It attaches to its node's
//! **controller** over TCP and from then on names everything it may touch
//! by **capabilities**: [`MemoryCap`]s (windows of some process's registered
//! memory) and [`RequestCap`]s (invocable entry points of some process).
//! The controller checks every use, moves bytes owner-to-owner on
//! [`Process::copy`], and forwards [`Process::invoke`] to the Request's
//! owner, which receives an [`Invocation`].
//!
//! # Pieces
//!
//! * [`Process::attach`] connects over TCP and authenticates (a
//!   per-process token); [`Process::attach_stream`] does the same over any
//!   connected [`ByteStream`] (a Unix socket, ...), and
//!   [`Process::attach_channel`] over any `fractos_transport::Channel`
//!   (shared-memory rings, RDMA, test channels: [`ChannelStream`] is the
//!   blocking adapter). A background reader
//!   thread then routes each completion to the waiting operation, **serves
//!   the controller's reads and writes of registered memory by itself**,
//!   and queues invocations.
//! * The protocol logic (handshake, op ids, completion routing, memory
//!   serving, invocation queue) is the sans-IO state machine of
//!   [`fractos_process`]; this crate adds the stream, the threads and the
//!   waits.
//! * [`Process::register`] returns a [`Region`]: an SDK-owned buffer at a
//!   distinct address of the process's registered address space. The
//!   application reads and writes it with [`Region::read_at`] /
//!   [`Region::write_at`]; the controller reaches it only through Memory
//!   capabilities made from it with [`Process::memory_create`]. Accesses
//!   outside every region are answered with `MemoryFault`.
//! * Every operation of the object model — `memory_create`, `diminish`,
//!   `request_create`, `derive`, `invoke`, `copy`, `revoke`, `drop_cap`,
//!   `monitor`, `publish`, `unpublish`, `lookup` — returns a typed result or
//!   an [`SdkError`].
//! * Each operation also has a `start_*` form returning a [`Pending`]
//!   answer to await later, so one thread can keep many in flight.
//! * Invocations are taken with [`Process::next_invocation`] or dispatched
//!   to handlers registered with [`Process::serve`], on a thread pool or on
//!   the application's thread ([`Process::dispatch`]).
//! * Every wait has a timeout ([`AttachOptions::op_timeout`], overridable
//!   per call with [`Process::with_timeout`]). The same operations exist as
//!   `async fn`s on [`AsyncProcess`] (feature `tokio`, on by default); both
//!   faces share one completion slot per operation.
//!
//! # Example
//!
//! A storage adaptor publishing a "read" Request that copies its block into
//! the caller's buffer and then invokes the caller's continuation:
//!
//! ```no_run
//! use std::time::Duration;
//! use fractos_sdk::{AttachOptions, Process, SdkError};
//! use fractos_sdk::wire::Rights;
//!
//! const READ: u64 = 1;
//!
//! fn main() -> Result<(), SdkError> {
//!     let token = [0u8; 32]; // fractos_core::process_token(&cluster_key, b"storage")
//!     let p = Process::attach("127.0.0.1:7000", "storage", token, AttachOptions::default())?;
//!
//!     // A 1 MiB block, readable through a Memory capability.
//!     let block = p.register_vec(vec![7u8; 1 << 20])?;
//!     let block_cap = p.memory_create(&block, 0, block.len(), Rights::READ)?;
//!
//!     // read(dst: Memory cap, continuation: Request cap); the block cap is
//!     // bound into the Request, so it arrives as capability 0.
//!     p.serve(READ, |p, inv| {
//!         let run = || -> Result<(), SdkError> {
//!             let (src, dst, done) = (inv.memory(0)?, inv.memory(1)?, inv.request(2)?);
//!             p.copy(&src, &dst, Some(&done))?;
//!             for c in &inv.caps {
//!                 p.drop_cap(c)?;
//!             }
//!             Ok(())
//!         };
//!         if let Err(e) = run() {
//!             eprintln!("read failed: {e}");
//!         }
//!     });
//!     let read = p.request_create(READ, &[], &[block_cap.into()])?;
//!     p.publish("storage/read", read)?;
//!
//!     // Serve until the controller goes away.
//!     while p.is_connected() {
//!         match p.next_invocation_timeout(Duration::from_secs(1)) {
//!             Ok(inv) => eprintln!("unexpected invocation with tag {}", inv.tag),
//!             Err(e) if e.is_timeout() => {}
//!             Err(e) => return Err(e),
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # Errors
//!
//! One enum, [`SdkError`]: a remote [`ErrorCode`] ([`SdkError::code`]),
//! I/O, timeout, disconnected, rejected at attach, protocol violation, or
//! an argument refused locally. Nothing the controller sends makes the SDK
//! panic: undecodable input closes the channel with
//! [`DisconnectReason::Protocol`] and fails every pending wait.
#![forbid(unsafe_code)]

mod caps;
mod channel;
mod error;
mod invocation;
mod local;
mod memory;
mod process;
mod shm_slot;
mod slot;

#[cfg(feature = "tokio")]
mod asynk;

pub use caps::{Cap, MemoryCap, RequestCap};
pub use channel::{ChannelStream, FIRST_WAIT, LONGEST_WAIT};
pub use error::{CapKindName, DisconnectReason, SdkError};
pub use invocation::Invocation;
pub use local::RingStream;
pub use memory::{Backing, MemorySpace, Region};
pub use process::{AttachOptions, ByteStream, Pending, Process};

#[cfg(feature = "tokio")]
pub use asynk::AsyncProcess;

/// Shared-memory mappings ([`shm::Mapping`]), for [`Backing::Window`].
pub use fractos_shm as shm;
/// The wire protocol crate, for [`wire::Rights`], [`wire::ErrorCode`],
/// [`wire::Handle`] and friends.
pub use fractos_wire as wire;
pub use fractos_wire::{CapInfo, ErrorCode, Handle, NodeId, ObjectKind, Rights};

/// The README's example, compiled as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
