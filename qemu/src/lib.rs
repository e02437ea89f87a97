//! Build FractOS appliance images and run them under QEMU.
//!
//! * [`build`] — build the kernel ELF (PVH) and the GRUB ISO (Multiboot2).
//! * [`node`] — launch one appliance, wait for its ready line, collect its
//!   serial log, read its exit status; killed on `Drop` (process group +
//!   parent-death signal), so tests that panic leave no QEMU behind.
//! * [`cluster`] — several appliances with a state directory of pidfiles,
//!   and [`cluster::down`] to tear down what an earlier `fractos up` left.
//! * [`exit`] — decoding QEMU exit statuses produced by the kernel.
//! * [`linux_guest`] — the Linux baseline: a Debian kernel with an initramfs
//!   running `fractos controller` or a block-read benchmark.

pub mod build;
pub mod cluster;
mod error;
pub mod exit;
pub mod linux_guest;
pub mod node;

pub use error::QemuError;

/// The QEMU binary the runner uses.
pub const QEMU: &str = "qemu-system-x86_64";

/// The line the kernel prints when boot is complete.
pub const READY_MARKER: &str = "fractos: ready";
