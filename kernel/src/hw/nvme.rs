//! NVMe bring-up at boot: the `fractos-nvme` driver's [`Hal`] over the
//! kernel's DMA frames and the uncached BAR0 mapping, a TSC [`Clock`], and
//! the `fractos.test=nvme` self-test.

use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use fractos_kernel::pci::{self, PciAddress, PciFunction};
use fractos_kernel::storage::{BlockDevice, DeviceError, DmaTarget, Io, IoDone};
use fractos_nvme::{
    Clock, CommandId, CommandStatus, DataBuffer, Dma, Hal, Instant, MmioRegisters, NvmeController,
    NvmeError, PhysAddr, PAGE_SIZE,
};
use log::{debug, info, warn};

use super::{dma, pio, time};

/// The driver's hardware boundary for one controller.
#[derive(Clone, Copy, Debug)]
pub struct KernelHal {
    regs: MmioRegisters,
}

// SAFETY: `dma_alloc` hands out fresh, zeroed, page-aligned frames from the
// kernel's bump allocator, physically contiguous, never handed out again,
// identity-mapped write-back (physical = virtual; x86 DMA is cache-coherent).
// `dma_dealloc` never returns frames to anyone (the allocator does not free),
// so memory a device may still touch is never reused. Register access goes
// through `MmioRegisters` over BAR0, which `paging::init` maps uncached, with
// single volatile 32-bit accesses.
unsafe impl Hal for KernelHal {
    fn dma_alloc(&self, pages: usize) -> Option<(PhysAddr, NonNull<u8>)> {
        let addr = dma::alloc_zeroed(pages)?;
        Some((addr, NonNull::new(addr as *mut u8)?))
    }

    unsafe fn dma_dealloc(&self, paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) {
        // The bump allocator cannot free: the frames stay out of use.
        debug!("nvme: {pages} DMA page(s) at {paddr:#x} released (not reused)");
    }

    fn read_reg32(&self, offset: usize) -> u32 {
        self.regs.read32(offset)
    }

    unsafe fn write_reg32(&self, offset: usize, value: u32) {
        self.regs.write32(offset, value)
    }
}

/// Time for the driver: TSC nanoseconds since reset.
#[derive(Clone, Copy, Debug)]
pub struct TscClock;

impl Clock for TscClock {
    fn now(&self) -> Instant {
        Instant::from_nanos(time::now_ns())
    }
}

/// `segment:bus:device.function`, as Linux prints it.
#[derive(Clone, Copy, Debug)]
pub struct Bdf(pub PciAddress);

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0;
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            a.segment(),
            a.bus(),
            a.device(),
            a.function()
        )
    }
}

/// One NVMe controller brought up at boot, with one I/O queue pair.
#[derive(Debug)]
pub struct Disk {
    /// Where it sits on the PCI bus.
    pub address: PciAddress,
    /// The driver's HAL (for DMA buffers).
    pub hal: KernelHal,
    /// The driver.
    pub ctrl: NvmeController<KernelHal>,
}

/// Why a controller could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum BringUpError {
    /// BAR0 is not an assigned memory BAR.
    #[error("BAR0 is not an assigned memory BAR")]
    NoBar0,
    /// BAR0 is smaller than the registers plus the first doorbells.
    #[error("BAR0 of {0:#x} bytes is too small")]
    SmallBar0(u64),
    /// The function is not a PCI endpoint.
    #[error("not a PCI endpoint")]
    NotEndpoint,
    /// The driver failed.
    #[error(transparent)]
    Driver(#[from] NvmeError),
}

/// Why the NVMe self-test failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    /// `fractos.test=nvme` without any NVMe controller.
    #[error("no NVMe controller found (class 01.08.02)")]
    NoController,
    /// A controller did not come up.
    #[error("{0}: bring-up failed: {1}")]
    BringUp(Bdf, BringUpError),
    /// A step of the test failed in the driver.
    #[error("{0}: {1} failed: {2}")]
    Io(Bdf, &'static str, NvmeError),
    /// Data read back differs from what was written.
    #[error("{bdf}: {what}: byte {offset} of the transfer is {got:#04x}, wrote {expected:#04x}")]
    Mismatch {
        /// The controller.
        bdf: Bdf,
        /// Which read.
        what: &'static str,
        /// Byte offset within the transfer.
        offset: usize,
        /// Written value.
        expected: u8,
        /// Read value.
        got: u8,
    },
    /// A read past the end of the namespace did not fail as it should.
    #[error("{0}: read past the end of the namespace returned {1:?}, expected LBA Out of Range")]
    OutOfRangeAccepted(Bdf, Result<(), NvmeError>),
}

/// Brings up every NVMe controller in `devices`: enables memory decoding and
/// bus mastering, resets and enables it, Identify, one I/O queue pair; logs
/// one line each. A controller that fails is logged and skipped. With
/// `self_test`, also runs [`self_test`] on each, and any failure (or no
/// controller at all) is an error.
pub fn bring_up(devices: &[PciFunction], self_test: bool) -> Result<Vec<Disk>, SelfTestError> {
    let mut disks = Vec::new();
    for f in devices.iter().filter(|f| f.is_nvme()) {
        let bdf = Bdf(f.address);
        let mut disk = match init_one(f) {
            Ok(d) => d,
            Err(e) if self_test => return Err(SelfTestError::BringUp(bdf, e)),
            Err(e) => {
                warn!("nvme: {bdf}: bring-up failed, continuing without it: {e}");
                continue;
            }
        };
        let c = disk.ctrl.controller_info();
        let ns = disk.ctrl.namespace();
        info!(
            "nvme: {bdf} model={:?} serial={} ns{} blocks={} block_size={}",
            c.model.as_str(),
            c.serial,
            ns.nsid,
            ns.blocks,
            ns.block_size
        );
        let v = disk.ctrl.version();
        debug!(
            "nvme: {bdf} version {}.{} firmware={} io queues {:?} depth {} max {} blocks/command, volatile write cache {}",
            v >> 16,
            (v >> 8) & 0xff,
            c.firmware,
            disk.ctrl.io_queues(),
            disk.ctrl.io_queue_depth(),
            disk.ctrl.max_blocks_per_command(),
            c.volatile_write_cache
        );
        if self_test {
            run_self_test(&mut disk)?;
        }
        disks.push(disk);
    }
    if self_test {
        if disks.is_empty() {
            return Err(SelfTestError::NoController);
        }
        info!("nvme: self-test ok");
    } else if disks.is_empty() {
        debug!("nvme: no controllers");
    }
    Ok(disks)
}

fn init_one(f: &PciFunction) -> Result<Disk, BringUpError> {
    let (base, size) = f.memory_bar(0).ok_or(BringUpError::NoBar0)?;
    // Registers (0x0..0x1000) and the doorbells of the admin and one I/O
    // queue pair (stride 4 at least) must fit.
    if size < 0x2000 {
        return Err(BringUpError::SmallBar0(size));
    }
    // SAFETY: the controller is about to be reset by the driver, which then
    // only points it at DMA frames it allocated itself (queues, Identify
    // page, PRP lists) or at buffers lent to it for one command; no other
    // code programs this device.
    unsafe { pci::enable_memory_and_bus_master(&pio::PortConfigAccess, f.address) }
        .ok_or(BringUpError::NotEndpoint)?;
    let base = NonNull::new(base as *mut u8).ok_or(BringUpError::NoBar0)?;
    // SAFETY: BAR0 is a memory window from enumeration, identity-mapped
    // uncached by `paging::init` for `size` bytes (a power of two ≥ 8 KiB, so
    // 4-byte aligned), with memory decoding now on; only this driver uses it.
    let regs = unsafe { MmioRegisters::new(base, size as usize) };
    let hal = KernelHal { regs };
    let ctrl = NvmeController::init(hal, &TscClock, fractos_nvme::Config::default())?;
    Ok(Disk {
        address: f.address,
        hal,
        ctrl,
    })
}

/// Bytes the self-test moves per command: 8 pages, so PRP1 + a PRP list.
const SELF_TEST_BYTES: usize = 8 * PAGE_SIZE;

/// Byte `i` of the test pattern for `seed`.
fn pattern(seed: u64, i: usize) -> u8 {
    // splitmix64 of the 8-byte word index, so every word differs.
    let mut z = seed.wrapping_add((i as u64 / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.to_le_bytes()[i % 8]
}

/// Compares `len` bytes of the transfer, where transfer byte `t` sits at
/// `at(t)` in `buf`, with the pattern.
fn compare(
    bdf: Bdf,
    what: &'static str,
    buf: &Dma<KernelHal>,
    len: usize,
    seed: u64,
    at: impl Fn(usize) -> usize,
) -> Result<(), SelfTestError> {
    let mut chunk = [0u8; 512];
    for start in (0..len).step_by(chunk.len()) {
        let n = chunk.len().min(len - start);
        buf.read_bytes(at(start), &mut chunk[..n]);
        for (k, &got) in chunk[..n].iter().enumerate() {
            let expected = pattern(seed, start + k);
            if got != expected {
                return Err(SelfTestError::Mismatch {
                    bdf,
                    what,
                    offset: start + k,
                    expected,
                    got,
                });
            }
        }
    }
    Ok(())
}

/// Writes a pattern to the last blocks of the namespace (several pages, so
/// the write uses a PRP list), reads it back into a fresh buffer and into
/// the same pages listed in reverse order (a scattered PRP list), compares
/// both, checks that a read past the end fails with LBA Out of Range, and
/// flushes.
fn run_self_test(disk: &mut Disk) -> Result<(), SelfTestError> {
    let bdf = Bdf(disk.address);
    let ctrl = &mut disk.ctrl;
    let hal = disk.hal;
    let clock = TscClock;
    let qid = *ctrl.io_queues().start();
    let ns = *ctrl.namespace();
    let bs = ns.block_size as usize;
    let blocks = (SELF_TEST_BYTES / bs)
        .min(ctrl.max_blocks_per_command() as usize)
        .min(ns.blocks as usize) as u32;
    let len = blocks as usize * bs;
    let pages = len.div_ceil(PAGE_SIZE);
    let lba = ns.blocks - u64::from(blocks);
    let seed = time::now_ns() ^ 0x6672_6163_746f_7321;
    let io = |what| move |e| SelfTestError::Io(bdf, what, e);

    let mut wbuf = Dma::new(&hal, pages).map_err(io("DMA allocation"))?;
    let mut chunk = [0u8; 512];
    for start in (0..len).step_by(chunk.len()) {
        let n = chunk.len().min(len - start);
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern(seed, start + k);
        }
        wbuf.write_bytes(start, &chunk[..n]);
    }
    ctrl.write_blocking(qid, lba, blocks, &wbuf, &clock)
        .map_err(io("write"))?;

    let mut rbuf = Dma::new(&hal, pages).map_err(io("DMA allocation"))?;
    ctrl.read_blocking(qid, lba, blocks, &mut rbuf, &clock)
        .map_err(io("read"))?;
    compare(bdf, "read", &rbuf, len, seed, |t| t)?;

    // The same data into the pages of a third buffer, listed last first.
    let sbuf = Dma::new(&hal, pages).map_err(io("DMA allocation"))?;
    let list: Vec<PhysAddr> = (0..pages)
        .rev()
        .map(|p| sbuf.paddr() + (p * PAGE_SIZE) as u64)
        .collect();
    // SAFETY: `sbuf` is DMA memory of `pages` whole pages, all listed, that
    // nothing reads or writes until the command completes below; if it does
    // not, the boot stops and its frames are never reused (the kernel HAL
    // never frees DMA memory).
    let id = unsafe {
        ctrl.submit_read(qid, lba, blocks, DataBuffer::Pages(&list), clock.now())
            .map_err(io("scattered read"))?
    };
    loop {
        match ctrl.poll(qid, clock.now()) {
            Ok(Some(c)) if c.id == id => {
                c.result.map_err(io("scattered read"))?;
                break;
            }
            Ok(_) => core::hint::spin_loop(),
            Err(e) => return Err(SelfTestError::Io(bdf, "scattered read", e)),
        }
    }
    compare(bdf, "scattered read", &sbuf, len, seed, |t| {
        (pages - 1 - t / PAGE_SIZE) * PAGE_SIZE + t % PAGE_SIZE
    })?;

    let past_end = ctrl.read_blocking(qid, ns.blocks, 1, &mut rbuf, &clock);
    if !matches!(
        past_end,
        Err(NvmeError::Status {
            status: CommandStatus::LbaOutOfRange,
            ..
        })
    ) {
        return Err(SelfTestError::OutOfRangeAccepted(bdf, past_end));
    }

    ctrl.flush_blocking(qid, &clock).map_err(io("flush"))?;
    info!(
        "nvme: {bdf} self-test: {blocks} blocks at lba {lba} ({pages} pages, PRP list) written, read back contiguous and scattered, compared; read past the end rejected; flushed"
    );
    Ok(())
}

/// DMA pool of the storage service: windows for the requests in flight.
/// Halved (down to one command's worth) while memory is short.
const STORAGE_POOL_BYTES: usize = 4 << 20;

/// Namespace 1 of a controller as the storage service's block device: one
/// I/O queue driven without waiting (submit, then poll on later turns of
/// the event loop) and a DMA pool of up to 4 MiB.
pub struct NvmeBlocks {
    disk: Disk,
    pool: Dma<KernelHal>,
    qid: u16,
    /// The storage service's token of every command in flight.
    tokens: Vec<(CommandId, u64)>,
    /// Set once the controller failed: every later command fails.
    failed: Option<NvmeError>,
    /// Tokens of commands lost with the controller, still to report.
    lost: Vec<u64>,
}

impl NvmeBlocks {
    /// Wraps `disk`, allocating the pool.
    pub fn new(disk: Disk) -> Result<Self, NvmeError> {
        let ns = *disk.ctrl.namespace();
        let bs = (ns.block_size as usize).max(1);
        let one = (disk.ctrl.max_blocks_per_command() as usize)
            .saturating_mul(bs)
            .clamp(PAGE_SIZE, STORAGE_POOL_BYTES);
        let mut want = STORAGE_POOL_BYTES;
        let pool = loop {
            match Dma::new(&disk.hal, want.div_ceil(PAGE_SIZE)) {
                Ok(p) => break p,
                Err(e) if want <= one => return Err(e),
                Err(_) => want = (want / 2).max(one),
            }
        };
        let qid = *disk.ctrl.io_queues().start();
        Ok(NvmeBlocks {
            disk,
            pool,
            qid,
            tokens: Vec::new(),
            failed: None,
            lost: Vec::new(),
        })
    }

    /// Where the controller sits.
    pub fn bdf(&self) -> Bdf {
        Bdf(self.disk.address)
    }
}

/// Guest-physical address of `target` for `bytes` (a pool window must lie
/// inside `pool`).
fn resolve(
    pool: &Dma<KernelHal>,
    target: DmaTarget,
    bytes: usize,
) -> Result<PhysAddr, DeviceError> {
    match target {
        DmaTarget::Pool(at) => at
            .checked_add(bytes)
            .filter(|&end| end <= pool.len())
            .map(|_| pool.paddr() + at as u64)
            .ok_or(DeviceError::BadTarget),
        DmaTarget::Phys(p) => Ok(p),
    }
}

fn device_error(e: NvmeError) -> DeviceError {
    match e {
        NvmeError::QueueFull { .. } => DeviceError::Busy,
        NvmeError::CommandTimeout(_) => DeviceError::Abandoned(alloc::format!("{e}")),
        e => DeviceError::Failed(alloc::format!("{e}")),
    }
}

impl BlockDevice for NvmeBlocks {
    fn block_size(&self) -> u32 {
        self.disk.ctrl.namespace().block_size
    }
    fn blocks(&self) -> u64 {
        self.disk.ctrl.namespace().blocks
    }
    fn max_blocks_per_command(&self) -> u32 {
        self.disk.ctrl.max_blocks_per_command()
    }
    fn queue_depth(&self) -> usize {
        // At most depth - 1 commands in flight on a queue of `depth`.
        usize::from(self.disk.ctrl.io_queue_depth().saturating_sub(1)).max(1)
    }
    fn pool_len(&self) -> usize {
        self.pool.len()
    }
    fn pool_read(&self, offset: usize, out: &mut [u8]) {
        if offset
            .checked_add(out.len())
            .is_some_and(|e| e <= self.pool.len())
        {
            self.pool.read_bytes(offset, out);
        }
    }
    fn pool_write(&mut self, offset: usize, data: &[u8]) {
        if offset
            .checked_add(data.len())
            .is_some_and(|e| e <= self.pool.len())
        {
            self.pool.write_bytes(offset, data);
        }
    }

    unsafe fn submit(&mut self, io: Io, token: u64) -> Result<(), DeviceError> {
        if let Some(e) = &self.failed {
            return Err(DeviceError::Failed(alloc::format!("{e}")));
        }
        let bs = self.block_size() as usize;
        let now = TscClock.now();
        let (qid, ctrl) = (self.qid, &mut self.disk.ctrl);
        let id = match io {
            Io::Read { lba, blocks, to } => {
                let at = resolve(&self.pool, to, blocks as usize * bs)?;
                // SAFETY: a pool target lies inside the pool (checked by
                // `resolve`), DMA memory that stays allocated (the kernel
                // never frees DMA frames) and that the storage service gives
                // to one command at a time; a `Phys` target is the caller's
                // promise (this function's contract).
                unsafe { ctrl.submit_read(qid, lba, blocks, DataBuffer::Contiguous(at), now) }
            }
            Io::Write { lba, blocks, from } => {
                let at = resolve(&self.pool, from, blocks as usize * bs)?;
                // SAFETY: as for reads; the device only reads this memory.
                unsafe { ctrl.submit_write(qid, lba, blocks, DataBuffer::Contiguous(at), now) }
            }
            Io::Flush => ctrl.submit_flush(qid, now),
        }
        .map_err(device_error)?;
        self.tokens.push((id, token));
        Ok(())
    }

    fn poll(&mut self) -> Option<IoDone> {
        if let Some(token) = self.lost.pop() {
            return Some(IoDone {
                token,
                result: Err(DeviceError::Abandoned(alloc::string::String::from(
                    "the controller failed",
                ))),
            });
        }
        if self.failed.is_some() || self.tokens.is_empty() {
            return None;
        }
        loop {
            match self.disk.ctrl.poll(self.qid, TscClock.now()) {
                Ok(None) => return None,
                Ok(Some(c)) => {
                    let Some(i) = self.tokens.iter().position(|t| t.0 == c.id) else {
                        warn!(
                            "nvme: {}: completion of unknown command {:?}",
                            self.bdf(),
                            c.id
                        );
                        continue;
                    };
                    let (_, token) = self.tokens.swap_remove(i);
                    return Some(IoDone {
                        token,
                        result: c.result.map(|_| ()).map_err(device_error),
                    });
                }
                Err(e) => {
                    // The controller is gone (fatal status, or it completed
                    // a command that is not in flight): every command in
                    // flight is lost, and nothing may reuse its memory.
                    warn!("nvme: {}: controller failed: {e}", self.bdf());
                    self.lost = self.tokens.drain(..).map(|t| t.1).collect();
                    self.failed = Some(e);
                    return self.poll();
                }
            }
        }
    }
}
