//! Everything in the kernel that touches hardware.

pub mod cpu;
pub mod dma;
pub mod entropy;
pub mod fw_cfg;
pub mod idle;
pub mod libc;
pub mod net;
pub mod nvme;
pub mod paging;
pub mod pio;
pub mod serial;
pub mod time;

/// Addresses the linker script defines.
pub mod layout {
    extern "C" {
        static __kernel_start: u8;
        static __kernel_end: u8;
        static __text_start: u8;
        static __text_end: u8;
        static __boot_stack_guard: u8;
        static __boot_stack_bottom: u8;
        static __boot_stack_top: u8;
    }

    macro_rules! addr {
        ($name:ident, $sym:ident) => {
            /// Address of the linker/entry symbol of the same name.
            pub fn $name() -> u64 {
                (&raw const $sym) as u64
            }
        };
    }
    addr!(kernel_start, __kernel_start);
    addr!(kernel_end, __kernel_end);
    addr!(text_start, __text_start);
    addr!(text_end, __text_end);
    addr!(boot_stack_guard, __boot_stack_guard);
    addr!(boot_stack_bottom, __boot_stack_bottom);
    addr!(boot_stack_top, __boot_stack_top);
}
