//! Boot protocols → one normalized [`BootInfo`].
//!
//! The appliance kernel is entered either by a PVH loader (`qemu -kernel`,
//! Firecracker, cloud-hypervisor) or by a Multiboot2 loader (GRUB on bare
//! metal). Both hand over different structures in physical memory; this crate
//! copies what the kernel needs — memory map, command line, ACPI root, boot
//! module ranges — into a
//! self-contained [`BootInfo`] so the kernel never looks at loader memory
//! again and may reuse it.
//!
//! With the `entry` feature the crate also assembles the 32-bit entry points
//! (PVH ELF note, Multiboot2 header, switch to long mode); see `entry.rs`.
#![cfg_attr(not(test), no_std)]

mod acpi;
mod info;
mod mb2;
mod pvh;

#[cfg(all(feature = "entry", target_arch = "x86_64", not(test)))]
mod entry;

pub use acpi::{find_rsdp_in_bios, parse_rsdp, AcpiRoot};
pub use info::{
    BootInfo, BootModule, BootProtocol, Cmdline, MemoryKind, MemoryMap, MemoryRegion, Modules,
};
pub use mb2::{from_multiboot2, MULTIBOOT2_BOOTLOADER_MAGIC};
pub use pvh::{from_pvh, HvmStartInfo, PVH_START_MAGIC};

/// Read access to physical memory, as the loader sees it.
///
/// The kernel implements this over the boot identity map; host tests
/// implement it over a byte buffer, so every parser here is tested without
/// real hardware.
pub trait PhysMem {
    /// Copies `buf.len()` bytes starting at physical address `addr` into
    /// `buf`, or fails if any byte is outside readable memory.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), LoaderError>;

    /// Reads a little-endian `u32` at `addr`.
    fn read_u32(&self, addr: u64) -> Result<u32, LoaderError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64` at `addr`.
    fn read_u64(&self, addr: u64) -> Result<u64, LoaderError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Physical memory reached through the identity map set up by the entry stub.
///
/// Only meaningful inside the kernel, right after entry, while the boot page
/// tables (identity map of the first 4 GiB) are active.
#[derive(Debug, Clone, Copy)]
pub struct IdentityMapped;

impl PhysMem for IdentityMapped {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), LoaderError> {
        let end = addr
            .checked_add(buf.len() as u64)
            .ok_or(LoaderError::OutOfRange { addr })?;
        if addr == 0 || end > 1 << 32 {
            return Err(LoaderError::OutOfRange { addr });
        }
        // SAFETY: the boot stub identity-maps [0, 4 GiB) and `[addr, end)` lies
        // inside it (checked above); the loader structures are plain bytes and
        // nothing writes them concurrently (one CPU, interrupts off).
        unsafe {
            core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }
}

/// Everything that can go wrong turning a loader's hand-over into a
/// [`BootInfo`]. Each message says what the loader or user should change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoaderError {
    /// The PVH `hvm_start_info` magic is wrong.
    #[error("PVH start info has magic {found:#x}, expected 0x336ec578: it was overwritten (under QEMU: by a kernel command line over 4095 bytes, which the kernel reports by its size first) or the VMM is not PVH-compliant; boot with `qemu -kernel` or a PVH-capable VMM")]
    BadPvhMagic {
        /// The value found.
        found: u32,
    },
    /// The Multiboot2 boot-loader magic in `eax` is wrong.
    #[error("Multiboot2 magic is {found:#x}, expected 0x36d76289: boot the ISO with GRUB's `multiboot2` command, not `multiboot`")]
    BadMultibootMagic {
        /// The value found.
        found: u32,
    },
    /// The Multiboot2 information structure is malformed.
    #[error("Multiboot2 boot information is malformed (missing end tag or bad size): update or reinstall GRUB")]
    BadMultibootInfo,
    /// The loader gave no memory map at all.
    #[error("the boot loader passed no memory map: the kernel cannot know which RAM is free; use a loader that provides E820/Multiboot2 memory maps")]
    NoMemoryMap,
    /// A pointer from the loader points outside readable memory.
    #[error("boot structure at {addr:#x} is outside the identity-mapped first 4 GiB: the loader placed boot data too high")]
    OutOfRange {
        /// The offending physical address.
        addr: u64,
    },
    /// The RSDP signature or checksum is wrong.
    #[error(
        "ACPI RSDP at {addr:#x} has a bad signature or checksum: the firmware tables are corrupt"
    )]
    BadRsdp {
        /// Where the RSDP was expected.
        addr: u64,
    },
    /// The boot protocol id passed by the entry stub is unknown.
    #[error("unknown boot protocol id {0}: the entry stub and kernel are out of sync; rebuild the kernel")]
    UnknownProtocol(u32),
}

/// Builds the [`BootInfo`] for the protocol the entry stub reports.
///
/// `protocol` is [`BootProtocol::Pvh`] or [`BootProtocol::Multiboot2`] as a
/// number (what the stub passes), `magic` the value of `eax` at entry
/// (Multiboot2 only), `info` the physical address from `ebx`.
///
/// # Safety
///
/// For Multiboot2, `info` must point at a Multiboot2 information structure
/// that stays unmodified for the duration of this call, and it must be
/// readable through `mem`'s identity mapping (the crate's multiboot2 parser
/// dereferences it directly).
pub unsafe fn from_entry(
    protocol: u32,
    magic: u32,
    info: u64,
    mem: &impl PhysMem,
) -> Result<BootInfo, LoaderError> {
    match protocol {
        p if p == BootProtocol::Pvh as u32 => from_pvh(info, mem),
        // SAFETY: forwarded from this function's contract.
        p if p == BootProtocol::Multiboot2 as u32 => unsafe { from_multiboot2(magic, info, mem) },
        other => Err(LoaderError::UnknownProtocol(other)),
    }
}

#[cfg(test)]
pub(crate) mod testmem {
    use super::{LoaderError, PhysMem};

    /// A fake physical memory: a byte buffer that starts at `base`.
    pub struct FakeMem {
        pub base: u64,
        pub bytes: Vec<u8>,
    }

    impl FakeMem {
        pub fn new(base: u64, len: usize) -> Self {
            FakeMem {
                base,
                bytes: vec![0; len],
            }
        }
        pub fn write(&mut self, addr: u64, data: &[u8]) {
            let off = (addr - self.base) as usize;
            self.bytes[off..off + data.len()].copy_from_slice(data);
        }
    }

    impl PhysMem for FakeMem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), LoaderError> {
            let off = addr
                .checked_sub(self.base)
                .ok_or(LoaderError::OutOfRange { addr })? as usize;
            let src = self
                .bytes
                .get(off..off + buf.len())
                .ok_or(LoaderError::OutOfRange { addr })?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }
}
