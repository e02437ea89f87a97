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
