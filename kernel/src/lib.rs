//! Host-testable logic of the FractOS appliance kernel.
//!
//! The kernel binary (`src/main.rs`) owns everything that touches hardware;
//! this library holds the parts whose correctness can be checked on the host:
//! command-line parsing, exit codes, the frame allocator, PCI enumeration
//! over an abstract configuration space, fault-report decoding, the QEMU
//! fw_cfg file directory over abstract ports, the cluster-key sources,
//! the boot entropy pool and the RDMA port.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod config;
pub mod entropy;
pub mod exit;
pub mod fault;
pub mod frames;
pub mod fw_cfg;
pub mod pci;
pub mod rdma;
pub mod secret;
pub mod service;
pub mod shm;
pub mod storage;
pub mod virtio_mmio;

/// Random inputs for the parsers' property tests: a seeded xorshift
/// generator (no `proptest`: a dev-dependency pulling `std` into the
/// unified features would break the no_std kernel binary's
/// `clippy --all-targets`). Deterministic, so a failure reproduces.
#[cfg(test)]
pub(crate) mod fuzz {
    use alloc::string::String;
    use alloc::vec::Vec;

    /// xorshift64*.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed | 1)
        }
        pub fn u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform-ish in `0..n` (`n > 0`).
        pub fn below(&mut self, n: u64) -> u64 {
            self.u64() % n
        }
        pub fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
        pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
        /// Up to `max` arbitrary bytes.
        pub fn bytes(&mut self, max: u64) -> Vec<u8> {
            let n = self.below(max + 1);
            (0..n).map(|_| self.u64() as u8).collect()
        }
        /// Up to `max` characters drawn from `chars`.
        pub fn text(&mut self, chars: &[u8], max: u64) -> String {
            let n = self.below(max + 1);
            (0..n).map(|_| char::from(self.pick(chars))).collect()
        }
        /// A number of any magnitude: small ones, powers of two and their
        /// neighbours, and anything, equally often.
        pub fn number(&mut self) -> u64 {
            match self.below(4) {
                0 => self.below(0x2000),
                1 => (1u64 << self.below(64))
                    .wrapping_add(self.below(3))
                    .wrapping_sub(1),
                2 => u64::MAX - self.below(0x1000),
                _ => self.u64(),
            }
        }
    }

    /// Printable ASCII, space included.
    pub const PRINTABLE: &[u8] =
        b" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";
}
