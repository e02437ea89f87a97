//! QEMU fw_cfg over its legacy I/O ports (the parsing is in
//! `fractos_kernel::fw_cfg`, tested on the host).

use fractos_kernel::fw_cfg::{FwCfg, FwCfgError, FwCfgPorts, DATA_PORT, SELECTOR_PORT};
use x86_64::instructions::port::Port;

/// The selector and data ports.
#[derive(Debug)]
pub struct IoPorts;

impl FwCfgPorts for IoPorts {
    fn select(&mut self, item: u16) {
        // SAFETY: 0x510 is fw_cfg's selector port under QEMU; on machines
        // without the device nothing decodes it (the signature check then
        // fails). One CPU, no interrupts: no one interleaves.
        unsafe { Port::<u16>::new(SELECTOR_PORT).write(item) }
    }

    fn read_u8(&mut self) -> u8 {
        // SAFETY: 0x511 is fw_cfg's data port; a read only advances the
        // selected item's offset (or reads a floating bus without one).
        unsafe { Port::<u8>::new(DATA_PORT).read() }
    }
}

/// The fw_cfg device, if the VMM offers one.
pub fn open() -> Result<FwCfg<IoPorts>, FwCfgError> {
    FwCfg::probe(IoPorts)
}

/// Reads fw_cfg file `name` into `buf`: the number of bytes, or why not.
pub fn read_file(name: &str, buf: &mut [u8]) -> Result<usize, FwCfgError> {
    open()?.read_file(name, buf).map(<[u8]>::len)
}
