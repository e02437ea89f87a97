//! Poll-mode NVMe driver for the FractOS appliance.
//!
//! It brings a controller up (reset, admin queue, enable, Identify
//! Controller and Namespace, Set Features "Number of Queues", I/O queue
//! pairs) and then moves blocks with Read, Write and Flush, describing data
//! with PRP entries and, beyond two pages, a PRP list. Nothing waits on an
//! interrupt: [`NvmeController::poll`] looks at the next completion entry
//! (phase tag) and at command deadlines, given the caller's `now`.
//!
//! # Why hand-rolled
//!
//! The Rust NVMe drivers on crates.io do not fit this kernel. `vroom` and
//! the ixy-style drivers need Linux (VFIO or hugepages under `std`).
//! `nvme` (lihanrui2913) and `nvme-driver` (rcore-os) are `no_std`, but both
//! drive the registers through a raw pointer to the mapped BAR — there is no
//! seam where a fake controller can answer register accesses, so they cannot
//! be unit-tested on the host — and `nvme-driver` installs global
//! `&'static dyn` DMA/MMIO operations, moves through breaking 0.x releases
//! quickly and is undocumented, while `nvme`'s recent releases are yanked.
//! The polling executor also wants a non-blocking submit/poll split with a
//! caller-supplied `now`, per-command deadlines and typed queue-full
//! backpressure, which would have to be grafted onto either. The protocol subset needed (admin queue,
//! Identify, Set Features, two queue-creation commands, three I/O commands)
//! is small, so the driver is written against its own [`Hal`] trait in the
//! shape of `virtio-drivers` and tested against [`fake::FakeNvme`].
//!
//! # Shape
//!
//! - [`Hal`]: the hardware boundary (DMA memory with physical and virtual
//!   addresses, 32-bit BAR0 register access); `unsafe` to implement.
//! - [`regs`]: register offsets, `CAP`/`CC`/`CSTS` fields, doorbell stride.
//! - `queue`: submission/completion queue pairs with head/tail/phase,
//!   command ids, deadlines and backpressure ([`NvmeError::QueueFull`]).
//! - [`identify`]: Identify data (model, serial, size, block size).
//! - [`NvmeController`]: bring-up, submission, polling and blocking helpers.
//! - [`fake`] (tests, or feature `fake`): a controller model for host tests.
//!
//! Time is never read from a global clock: bring-up and blocking helpers
//! take a [`Clock`], the non-blocking path takes `now: Instant`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod controller;
mod error;
mod hal;
pub mod identify;
mod queue;
pub mod regs;
mod time;

#[cfg(any(test, doc, feature = "fake"))]
pub mod fake;

#[cfg(test)]
mod tests;

pub use controller::{split_transfer, Chunk, Config, DataBuffer, NvmeController};
pub use error::{CommandStatus, NvmeError};
pub use hal::{Dma, Hal, MmioRegisters, PhysAddr, PAGE_SIZE};
pub use queue::{Command, CommandId, Completion, CompletionEntry};
pub use time::{Clock, Instant};
