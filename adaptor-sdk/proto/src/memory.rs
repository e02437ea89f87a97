//! Serving the controller's accesses to registered memory.

/// An access touched bytes outside every registered window.
///
/// Whatever the host's memory looks like, the process answers this with
/// the wire error [`fractos_wire::ErrorCode::MemoryFault`] ("the owning
/// process could not read or write the registered window"): the
/// controller already checked the access against the capability's window,
/// so an access that still misses the process's memory means the process
/// unregistered (or never had) the bytes, which is the process's fault,
/// not an `OutOfBounds` use of a capability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("memory access outside every registered window")]
pub struct OutOfWindow;

impl OutOfWindow {
    /// Checks that `[addr, addr+len)` lies inside the window
    /// `[base, base+window_len)` and returns the offset of `addr` in it.
    /// Overflowing arithmetic is out of window, never a panic.
    ///
    /// ```
    /// use fractos_process::OutOfWindow;
    /// assert_eq!(OutOfWindow::check(0x1000, 16, 0x1004, 12), Ok(4));
    /// assert_eq!(OutOfWindow::check(0x1000, 16, 0x1004, 13), Err(OutOfWindow));
    /// assert_eq!(OutOfWindow::check(0x1000, 16, 0xfff, 1), Err(OutOfWindow));
    /// assert_eq!(OutOfWindow::check(0x1000, 16, u64::MAX, 2), Err(OutOfWindow));
    /// ```
    pub fn check(base: u64, window_len: u64, addr: u64, len: u64) -> Result<u64, OutOfWindow> {
        let offset = addr.checked_sub(base).ok_or(OutOfWindow)?;
        match offset.checked_add(len) {
            Some(end) if end <= window_len => Ok(offset),
            _ => Err(OutOfWindow),
        }
    }
}

/// The process's registered memory, as the controller reaches it with
/// `MemRead` / `MemWrite`. The host implements it over whatever holds the
/// bytes (SDK-owned buffers, a DMA staging buffer, a mapped region).
///
/// Implementations copy all the bytes or none: an access that is not
/// entirely inside one registered window returns [`OutOfWindow`] (use
/// [`OutOfWindow::check`]).
pub trait Memory {
    /// Copies `out.len()` bytes at `addr` into `out`.
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), OutOfWindow>;
    /// Copies `data` to `addr`.
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), OutOfWindow>;
}

/// No registered memory: every access is out of window. For processes
/// that never make Memory capabilities, and for the attach phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMemory;

impl Memory for NoMemory {
    fn read(&mut self, _addr: u64, _out: &mut [u8]) -> Result<(), OutOfWindow> {
        Err(OutOfWindow)
    }
    fn write(&mut self, _addr: u64, _data: &[u8]) -> Result<(), OutOfWindow> {
        Err(OutOfWindow)
    }
}

impl<M: Memory + ?Sized> Memory for &mut M {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), OutOfWindow> {
        (**self).read(addr, out)
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), OutOfWindow> {
        (**self).write(addr, data)
    }
}
