//! The controller: bring-up, admin commands, I/O submission and polling.

use alloc::vec::Vec;
use core::time::Duration;

use crate::error::NvmeError;
use crate::hal::{Dma, Hal, PhysAddr, PAGE_SIZE};
use crate::identify::{cns, ControllerInfo, NamespaceInfo};
use crate::queue::{AdminOpcode, Command, CommandId, Completion, IoOpcode, QueuePair};
use crate::regs::{cc, csts, Capabilities, Reg};
use crate::time::{Clock, Instant};

/// Most pages one command may touch: one PRP list page holds 512 entries,
/// so no list chaining is ever needed.
const MAX_PAGES_PER_COMMAND: u32 = 512;

/// Feature id of "Number of Queues" (Set Features).
const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;

/// Driver settings; [`Config::default`] suits QEMU and most controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Namespace to use.
    pub nsid: u32,
    /// Admin queue entries (clamped to `CAP.MQES`).
    pub admin_queue_depth: u16,
    /// Entries per I/O queue (clamped to `CAP.MQES`, at least 2).
    pub io_queue_depth: u16,
    /// I/O queue pairs to ask for (the controller may grant fewer).
    pub io_queue_pairs: u16,
    /// Deadline of admin commands.
    pub admin_timeout: Duration,
    /// Deadline of I/O commands, counted from the `now` of their submission.
    pub io_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nsid: 1,
            admin_queue_depth: 32,
            io_queue_depth: 64,
            io_queue_pairs: 1,
            admin_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
        }
    }
}

/// Where the data of a read or write lives, by physical address. The
/// transfer length is `blocks * block_size`; the first address may start
/// anywhere dword-aligned inside a page, every further page is whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataBuffer<'a> {
    /// Physically contiguous memory starting here.
    Contiguous(PhysAddr),
    /// Scattered pages: `pages[0]` may carry an offset, the others must be
    /// page-aligned; there must be one for every page the transfer touches.
    Pages(&'a [PhysAddr]),
}

impl DataBuffer<'_> {
    /// Physical address of page `i` of the transfer (`i = 0`: the start).
    fn page(&self, i: usize) -> Result<PhysAddr, NvmeError> {
        match *self {
            DataBuffer::Contiguous(start) if i == 0 => Ok(start),
            DataBuffer::Contiguous(start) => {
                Ok((start & !(PAGE_SIZE as u64 - 1)) + (i * PAGE_SIZE) as u64)
            }
            DataBuffer::Pages(pages) => {
                let p = *pages.get(i).ok_or(NvmeError::InvalidBuffer(
                    "fewer pages than the transfer needs",
                ))?;
                if i > 0 && p % PAGE_SIZE as u64 != 0 {
                    return Err(NvmeError::InvalidBuffer(
                        "page after the first not page-aligned",
                    ));
                }
                Ok(p)
            }
        }
    }
}

/// One command's share of a transfer cut by [`split_transfer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// First block of this command.
    pub lba: u64,
    /// Blocks this command moves (1 ..= the limit given).
    pub blocks: u32,
    /// Blocks of the transfer before this command's (its data starts
    /// `skip * block_size` bytes into the transfer's buffer).
    pub skip: u64,
}

/// Cuts a transfer of `blocks` blocks at `lba` into commands of at most
/// `max` blocks each (pass [`NvmeController::max_blocks_per_command`], which
/// folds in `MDTS`, the one-page PRP list and the 16-bit block count), in
/// ascending order. Nothing for `blocks == 0`; `max == 0` is taken as 1.
pub fn split_transfer(lba: u64, blocks: u64, max: u32) -> impl Iterator<Item = Chunk> {
    let max = u64::from(max.max(1));
    (0..blocks.div_ceil(max)).map(move |i| {
        let skip = i * max;
        Chunk {
            lba: lba.saturating_add(skip),
            // At most `max`, which came from a u32.
            blocks: (blocks - skip).min(max) as u32,
            skip,
        }
    })
}

/// A poll-mode NVMe controller with one namespace and its I/O queue pairs.
///
/// Built by [`NvmeController::init`]; I/O goes through the `submit_*`
/// functions and [`poll`](Self::poll) (non-blocking, `now` passed in) or the
/// `*_blocking` helpers. After a timeout or fatal status seen by a blocking
/// call the controller is disabled and every later call fails with
/// [`NvmeError::ControllerFatal`]: make a new one (a full reset).
///
/// Dropping it disables the controller (`CC.EN = 0`) before its queue memory
/// is freed; if the controller does not confirm, that memory is leaked
/// rather than handed back while the device might still use it.
pub struct NvmeController<H: Hal> {
    hal: H,
    cap: Capabilities,
    version: u32,
    config: Config,
    /// Index 0: the admin queue; index `qid`: I/O queue pair `qid`.
    queues: Vec<QueuePair<H>>,
    /// One page for Identify data.
    scratch: Option<Dma<H>>,
    controller: ControllerInfo,
    namespace: NamespaceInfo,
    max_blocks: u32,
    disabled: bool,
}

impl<H: Hal> core::fmt::Debug for NvmeController<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NvmeController")
            .field("cap", &self.cap)
            .field("version", &self.version)
            .field("controller", &self.controller)
            .field("namespace", &self.namespace)
            .field("io_queues", &(self.queues.len() - 1))
            .field("disabled", &self.disabled)
            .finish()
    }
}

impl<H: Hal> NvmeController<H> {
    /// Resets and enables the controller, sets up the admin queue, runs
    /// Identify Controller and Identify Namespace, and creates the I/O queue
    /// pairs. `clock` bounds the waits (`CAP.TO` for reset/enable,
    /// [`Config::admin_timeout`] per admin command).
    pub fn init<C: Clock + ?Sized>(hal: H, clock: &C, config: Config) -> Result<Self, NvmeError> {
        let cap = Capabilities(read64(&hal, Reg::Cap));
        if !cap.nvm_command_set() {
            return Err(NvmeError::Unsupported(
                "NVM command set not offered (CAP.CSS)",
            ));
        }
        if cap.mps_min() > 0 {
            return Err(NvmeError::Unsupported(
                "4 KiB memory pages not offered (CAP.MPSMIN)",
            ));
        }
        let version = hal.read_reg32(Reg::Vs as usize);
        let ready_timeout = ready_timeout(cap);

        // Reset: clear EN and wait for RDY to follow.
        let cc_now = hal.read_reg32(Reg::Cc as usize);
        if cc_now & cc::EN != 0 {
            // SAFETY: disabling stops the controller's use of memory.
            unsafe { hal.write_reg32(Reg::Cc as usize, cc_now & !cc::EN) };
        }
        wait_csts(&hal, clock, ready_timeout, |s| s & csts::RDY == 0)
            .map_err(|()| NvmeError::ResetTimeout(ready_timeout))?;

        let max_entries = cap.max_queue_entries().clamp(2, 4096) as u16;
        let admin_depth = config.admin_queue_depth.clamp(2, max_entries);
        let admin = QueuePair::new(&hal, 0, admin_depth, cap.doorbell_stride(), false)?;
        let scratch = Dma::new(&hal, 1)?;
        let aqa = (admin_depth as u32 - 1) << 16 | (admin_depth as u32 - 1);
        // SAFETY: the controller is disabled; ASQ/ACQ name the admin queue
        // memory we own and keep for the controller's lifetime (`Drop`
        // disables it before freeing).
        unsafe {
            hal.write_reg32(Reg::Aqa as usize, aqa);
            write64(&hal, Reg::Asq, admin.sq_paddr());
            write64(&hal, Reg::Acq, admin.cq_paddr());
        }
        let mut this = Self {
            hal,
            cap,
            version,
            config,
            queues: alloc::vec![admin],
            scratch: Some(scratch),
            controller: ControllerInfo::parse(&[0; 4096]),
            namespace: NamespaceInfo {
                nsid: config.nsid,
                blocks: 0,
                capacity: 0,
                lba_format: 0,
                block_size: 512,
            },
            max_blocks: 0,
            disabled: false,
        };

        let cc_on =
            cc::EN | cc::CSS_NVM | cc::AMS_RR | (6 << cc::IOSQES_SHIFT) | (4 << cc::IOCQES_SHIFT);
        // SAFETY: the admin queues are set up; enabling lets the controller
        // fetch from them only.
        unsafe { this.hal.write_reg32(Reg::Cc as usize, cc_on) };
        let mut fatal = false;
        wait_csts(&this.hal, clock, ready_timeout, |s| {
            fatal = s & csts::CFS != 0;
            fatal || s & csts::RDY != 0
        })
        .map_err(|()| NvmeError::EnableTimeout(ready_timeout))?;
        if fatal {
            return Err(NvmeError::ControllerFatal);
        }

        this.identify(clock)?;
        this.create_io_queues(clock)?;
        Ok(this)
    }

    fn identify<C: Clock + ?Sized>(&mut self, clock: &C) -> Result<(), NvmeError> {
        let page = self.scratch_paddr();
        let cmd = Command::new(AdminOpcode::Identify as u8, 0)
            .with_prps(page, 0)
            .with_cdw(10, cns::CONTROLLER);
        self.admin_command(cmd, clock)?;
        self.controller = ControllerInfo::parse(&self.scratch_bytes());
        let (sq_min, sq_max) = self.controller.sqes;
        let (cq_min, cq_max) = self.controller.cqes;
        if sq_min > 6 || (sq_max != 0 && sq_max < 6) || cq_min > 4 || (cq_max != 0 && cq_max < 4) {
            return Err(NvmeError::Unsupported(
                "64-byte SQ / 16-byte CQ entries (SQES/CQES)",
            ));
        }

        let nsid = self.config.nsid;
        let cmd = Command::new(AdminOpcode::Identify as u8, nsid)
            .with_prps(page, 0)
            .with_cdw(10, cns::NAMESPACE);
        self.admin_command(cmd, clock)?;
        self.namespace = NamespaceInfo::parse(nsid, &self.scratch_bytes())?;

        let mut pages = MAX_PAGES_PER_COMMAND;
        if self.controller.mdts != 0 {
            // MDTS is in units of the minimum page size, which is 4 KiB here.
            pages = pages.min(
                1u32.checked_shl(self.controller.mdts as u32)
                    .unwrap_or(u32::MAX),
            );
        }
        let bytes = pages as u64 * PAGE_SIZE as u64;
        self.max_blocks = (bytes / self.namespace.block_size as u64).min(1 << 16) as u32;
        if self.max_blocks == 0 {
            return Err(NvmeError::Unsupported("MDTS smaller than one block"));
        }
        Ok(())
    }

    fn create_io_queues<C: Clock + ?Sized>(&mut self, clock: &C) -> Result<(), NvmeError> {
        let want = self.config.io_queue_pairs.max(1) as u32;
        let cmd = Command::new(AdminOpcode::SetFeatures as u8, 0)
            .with_cdw(10, FEATURE_NUMBER_OF_QUEUES)
            .with_cdw(11, (want - 1) << 16 | (want - 1));
        let granted = self.admin_command(cmd, clock)?;
        let pairs = want
            .min((granted & 0xFFFF) + 1)
            .min((granted >> 16) + 1)
            .min(u16::MAX as u32 - 1) as u16;

        let max_entries = self.cap.max_queue_entries().clamp(2, 4096) as u16;
        let depth = self.config.io_queue_depth.clamp(2, max_entries);
        for qid in 1..=pairs {
            let q = QueuePair::new(&self.hal, qid, depth, self.cap.doorbell_stride(), true)?;
            let size = (depth as u32 - 1) << 16 | qid as u32;
            // CDW11: physically contiguous, interrupts disabled.
            let create_cq = Command::new(AdminOpcode::CreateIoCq as u8, 0)
                .with_prps(q.cq_paddr(), 0)
                .with_cdw(10, size)
                .with_cdw(11, 1);
            let create_sq = Command::new(AdminOpcode::CreateIoSq as u8, 0)
                .with_prps(q.sq_paddr(), 0)
                .with_cdw(10, size)
                .with_cdw(11, (qid as u32) << 16 | 1);
            // Keep the queue memory alive before the controller learns of it.
            self.queues.push(q);
            self.admin_command(create_cq, clock)?;
            self.admin_command(create_sq, clock)?;
        }
        Ok(())
    }

    /// Runs one admin command to completion and returns its DW0.
    fn admin_command<C: Clock + ?Sized>(
        &mut self,
        cmd: Command,
        clock: &C,
    ) -> Result<u32, NvmeError> {
        self.check_enabled()?;
        let deadline = clock.now() + self.config.admin_timeout;
        let admin = &mut self.queues[0];
        let cid = admin.reserve()?;
        // Admin commands only name driver-owned memory (scratch page, queues).
        let id = admin.submit(&self.hal, cid, cmd, deadline);
        loop {
            match self.queues[0].poll(&self.hal) {
                Ok(Some(c)) if c.id == id => return c.result,
                Ok(_) => {}
                Err(e) => return Err(self.fail(clock, e)),
            }
            if self.csts() & csts::CFS != 0 {
                return Err(self.fail(clock, NvmeError::ControllerFatal));
            }
            if clock.now() >= deadline {
                self.queues[0].abandon(cid);
                return Err(self.fail(clock, NvmeError::CommandTimeout(id)));
            }
            core::hint::spin_loop();
        }
    }

    /// Submits a read of `blocks` logical blocks from `lba` into `buf` on
    /// I/O queue `qid`; its deadline is `now +` [`Config::io_timeout`].
    /// Returns [`NvmeError::QueueFull`] without side effects when the queue
    /// has no room.
    ///
    /// # Safety
    ///
    /// `buf` must name DMA-capable memory of at least
    /// `blocks * block_size` bytes that nothing else reads or writes and
    /// that stays allocated until the command's completion (or timeout
    /// followed by a controller reset) has been seen.
    pub unsafe fn submit_read(
        &mut self,
        qid: u16,
        lba: u64,
        blocks: u32,
        buf: DataBuffer<'_>,
        now: Instant,
    ) -> Result<CommandId, NvmeError> {
        self.submit_rw(IoOpcode::Read, qid, lba, blocks, buf, now)
    }

    /// Submits a write of `blocks` logical blocks at `lba` from `buf`; as
    /// [`submit_read`](Self::submit_read).
    ///
    /// # Safety
    ///
    /// As for [`submit_read`](Self::submit_read), except that the memory is
    /// only read by the controller (nothing may write it meanwhile).
    pub unsafe fn submit_write(
        &mut self,
        qid: u16,
        lba: u64,
        blocks: u32,
        buf: DataBuffer<'_>,
        now: Instant,
    ) -> Result<CommandId, NvmeError> {
        self.submit_rw(IoOpcode::Write, qid, lba, blocks, buf, now)
    }

    /// Submits a flush of the namespace's volatile write cache.
    pub fn submit_flush(&mut self, qid: u16, now: Instant) -> Result<CommandId, NvmeError> {
        self.check_enabled()?;
        let deadline = now + self.config.io_timeout;
        let nsid = self.namespace.nsid;
        let q = io_queue(&mut self.queues, qid)?;
        let cid = q.reserve()?;
        Ok(q.submit(
            &self.hal,
            cid,
            Command::new(IoOpcode::Flush as u8, nsid),
            deadline,
        ))
    }

    fn submit_rw(
        &mut self,
        op: IoOpcode,
        qid: u16,
        lba: u64,
        blocks: u32,
        buf: DataBuffer<'_>,
        now: Instant,
    ) -> Result<CommandId, NvmeError> {
        self.check_enabled()?;
        if blocks == 0 {
            return Err(NvmeError::ZeroLength);
        }
        if blocks > self.max_blocks {
            return Err(NvmeError::TransferTooLarge {
                blocks,
                max: self.max_blocks,
            });
        }
        let len = blocks as usize * self.namespace.block_size as usize;
        let first = buf.page(0)?;
        if first % 4 != 0 {
            return Err(NvmeError::InvalidBuffer("start not dword-aligned"));
        }
        let in_first = PAGE_SIZE - (first as usize % PAGE_SIZE);
        let more = len.saturating_sub(in_first).div_ceil(PAGE_SIZE);
        if more + 1 > MAX_PAGES_PER_COMMAND as usize + 1 {
            // Unreachable with `max_blocks`, kept as a guard for the list size.
            return Err(NvmeError::InvalidBuffer(
                "transfer needs a chained PRP list",
            ));
        }
        // Validate every page before touching the queue.
        for i in 1..=more {
            buf.page(i)?;
        }

        let deadline = now + self.config.io_timeout;
        let nsid = self.namespace.nsid;
        let q = io_queue(&mut self.queues, qid)?;
        let cid = q.reserve()?;
        let prp2 = match more {
            0 => Ok(0),
            1 => buf.page(1),
            _ => (|| {
                let (list, base) = q.prp_list(cid).expect("I/O queues have PRP lists");
                for i in 1..=more {
                    list.write_u64(base + 8 * (i - 1), buf.page(i)?);
                }
                Ok(list.paddr() + base as u64)
            })(),
        };
        let prp2 = match prp2 {
            Ok(p) => p,
            Err(e) => {
                q.release(cid);
                return Err(e);
            }
        };
        let cmd = Command::new(op as u8, nsid)
            .with_prps(first, prp2)
            .with_cdw(10, lba as u32)
            .with_cdw(11, (lba >> 32) as u32)
            .with_cdw(12, blocks - 1);
        Ok(q.submit(&self.hal, cid, cmd, deadline))
    }

    /// Returns the next completion on I/O queue `qid`, or, when none is
    /// posted, the first command whose deadline is at or before `now`
    /// (as [`NvmeError::CommandTimeout`]; its id stays reserved), or `None`.
    /// Never blocks.
    ///
    /// Fails with [`NvmeError::ControllerFatal`] when a command expired
    /// because the controller failed (`CSTS.CFS`; drop this driver and
    /// initialise a new one to reset it), and with
    /// [`NvmeError::UnexpectedCompletion`] when the controller completed an
    /// id that is not in flight.
    pub fn poll(&mut self, qid: u16, now: Instant) -> Result<Option<Completion>, NvmeError> {
        self.check_enabled()?;
        let q = io_queue(&mut self.queues, qid)?;
        if let Some(c) = q.poll(&self.hal)? {
            return Ok(Some(c));
        }
        let Some(cid) = self.queues[qid as usize].first_expired(now) else {
            return Ok(None);
        };
        if self.csts() & csts::CFS != 0 {
            return Err(NvmeError::ControllerFatal);
        }
        Ok(Some(self.queues[qid as usize].abandon(cid)))
    }

    /// Reads `blocks` blocks at `lba` into the start of `buf` and waits.
    /// The queue must have no other command in flight (else
    /// [`NvmeError::QueueFull`]). On a timeout or a
    /// controller failure the controller is disabled (so it can no longer
    /// write into `buf`).
    pub fn read_blocking<C: Clock + ?Sized>(
        &mut self,
        qid: u16,
        lba: u64,
        blocks: u32,
        buf: &mut Dma<H>,
        clock: &C,
    ) -> Result<(), NvmeError> {
        self.check_fits(blocks, buf)?;
        self.check_idle(qid)?;
        // SAFETY: `buf` is DMA memory large enough (checked), exclusively
        // borrowed for the whole call, and `wait` disables the controller
        // before returning if the command did not complete.
        let id = unsafe {
            self.submit_read(
                qid,
                lba,
                blocks,
                DataBuffer::Contiguous(buf.paddr()),
                clock.now(),
            )?
        };
        self.wait(id, clock)
    }

    /// Writes `blocks` blocks at `lba` from the start of `buf` and waits; as
    /// [`read_blocking`](Self::read_blocking).
    pub fn write_blocking<C: Clock + ?Sized>(
        &mut self,
        qid: u16,
        lba: u64,
        blocks: u32,
        buf: &Dma<H>,
        clock: &C,
    ) -> Result<(), NvmeError> {
        self.check_fits(blocks, buf)?;
        self.check_idle(qid)?;
        // SAFETY: as in `read_blocking`; the shared borrow keeps `buf`
        // unchanged and allocated for the whole call.
        let id = unsafe {
            self.submit_write(
                qid,
                lba,
                blocks,
                DataBuffer::Contiguous(buf.paddr()),
                clock.now(),
            )?
        };
        self.wait(id, clock)
    }

    /// Flushes the volatile write cache and waits.
    pub fn flush_blocking<C: Clock + ?Sized>(
        &mut self,
        qid: u16,
        clock: &C,
    ) -> Result<(), NvmeError> {
        self.check_idle(qid)?;
        let id = self.submit_flush(qid, clock.now())?;
        self.wait(id, clock)
    }

    fn wait<C: Clock + ?Sized>(&mut self, id: CommandId, clock: &C) -> Result<(), NvmeError> {
        loop {
            match self.poll(id.qid, clock.now()) {
                Ok(Some(c)) if c.id == id => {
                    return match c.result {
                        Ok(_) => Ok(()),
                        Err(e @ NvmeError::CommandTimeout(_)) => Err(self.fail(clock, e)),
                        Err(e) => Err(e),
                    }
                }
                Ok(_) => core::hint::spin_loop(),
                Err(e) => return Err(self.fail(clock, e)),
            }
        }
    }

    /// Sends the normal shutdown notification, waits for `CSTS.SHST`
    /// "complete" (bounded by `CAP.TO`), then disables the controller.
    pub fn shutdown<C: Clock + ?Sized>(mut self, clock: &C) -> Result<(), NvmeError> {
        self.check_enabled()?;
        let timeout = ready_timeout(self.cap);
        let cc_now = self.hal.read_reg32(Reg::Cc as usize);
        // SAFETY: a shutdown notification names no memory.
        unsafe {
            self.hal
                .write_reg32(Reg::Cc as usize, (cc_now & !cc::SHN_MASK) | (1 << 14))
        };
        let done = wait_csts(&self.hal, clock, timeout, |s| s & csts::SHST_MASK == 2 << 2);
        self.disable(clock);
        done.map_err(|()| NvmeError::ResetTimeout(timeout))
    }

    /// Controller status: fails with [`NvmeError::ControllerFatal`] if
    /// `CSTS.CFS` is set. One register read; call it now and then when idle.
    pub fn check_health(&self) -> Result<(), NvmeError> {
        self.check_enabled()?;
        if self.csts() & csts::CFS != 0 {
            return Err(NvmeError::ControllerFatal);
        }
        Ok(())
    }

    /// Identify Controller data.
    pub fn controller_info(&self) -> &ControllerInfo {
        &self.controller
    }

    /// Identify Namespace data of the namespace in use.
    pub fn namespace(&self) -> &NamespaceInfo {
        &self.namespace
    }

    /// The `CAP` register.
    pub fn capabilities(&self) -> Capabilities {
        self.cap
    }

    /// The `VS` register (major in bits 31:16, minor in 15:8).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Ids of the I/O queue pairs, `1..=n`.
    pub fn io_queues(&self) -> core::ops::RangeInclusive<u16> {
        1..=(self.queues.len() - 1) as u16
    }

    /// Entries per I/O queue (at most this minus one commands in flight).
    pub fn io_queue_depth(&self) -> u16 {
        self.queues.get(1).map_or(0, |q| q.depth())
    }

    /// Commands in flight on I/O queue `qid`.
    pub fn in_flight(&self, qid: u16) -> usize {
        self.queues
            .get(qid as usize)
            .filter(|_| qid != 0)
            .map_or(0, |q| q.in_flight())
    }

    /// Most blocks one read or write may move (MDTS, PRP list, NLB limits).
    pub fn max_blocks_per_command(&self) -> u32 {
        self.max_blocks
    }

    fn check_enabled(&self) -> Result<(), NvmeError> {
        if self.disabled {
            Err(NvmeError::ControllerFatal)
        } else {
            Ok(())
        }
    }

    fn check_idle(&mut self, qid: u16) -> Result<(), NvmeError> {
        if io_queue(&mut self.queues, qid)?.in_flight() != 0 {
            return Err(NvmeError::QueueFull { qid });
        }
        Ok(())
    }

    fn check_fits(&self, blocks: u32, buf: &Dma<H>) -> Result<(), NvmeError> {
        if blocks as usize * self.namespace.block_size as usize > buf.len() {
            return Err(NvmeError::InvalidBuffer("buffer smaller than the transfer"));
        }
        Ok(())
    }

    fn csts(&self) -> u32 {
        self.hal.read_reg32(Reg::Csts as usize)
    }

    fn scratch_paddr(&self) -> PhysAddr {
        self.scratch
            .as_ref()
            .expect("scratch lives until drop")
            .paddr()
    }

    fn scratch_bytes(&self) -> [u8; 4096] {
        let mut out = [0; 4096];
        self.scratch
            .as_ref()
            .expect("scratch lives until drop")
            .read_bytes(0, &mut out);
        out
    }

    /// Disables the controller after `err` and returns `err`.
    fn fail<C: Clock + ?Sized>(&mut self, clock: &C, err: NvmeError) -> NvmeError {
        self.disable(clock);
        err
    }

    /// Clears `CC.EN` and waits (bounded by `CAP.TO`) for `CSTS.RDY` to
    /// clear; if it does not, the queue memory is leaked on drop.
    fn disable<C: Clock + ?Sized>(&mut self, clock: &C) {
        if self.disabled {
            return;
        }
        self.disabled = true;
        let cc_now = self.hal.read_reg32(Reg::Cc as usize);
        // SAFETY: disabling stops the controller's use of memory.
        unsafe { self.hal.write_reg32(Reg::Cc as usize, cc_now & !cc::EN) };
        if wait_csts(&self.hal, clock, ready_timeout(self.cap), |s| {
            s & csts::RDY == 0
        })
        .is_err()
        {
            self.leak_queues();
        }
    }

    fn leak_queues(&mut self) {
        core::mem::forget(core::mem::take(&mut self.queues));
        core::mem::forget(self.scratch.take());
    }
}

impl<H: Hal> Drop for NvmeController<H> {
    fn drop(&mut self) {
        if self.disabled {
            return;
        }
        let cc_now = self.hal.read_reg32(Reg::Cc as usize);
        // SAFETY: disabling stops the controller's use of memory.
        unsafe { self.hal.write_reg32(Reg::Cc as usize, cc_now & !cc::EN) };
        // No clock here: a bounded number of status reads.
        let confirmed = (0..1_000_000).any(|_| {
            core::hint::spin_loop();
            self.csts() & csts::RDY == 0
        });
        if !confirmed {
            self.leak_queues();
        }
    }
}

fn io_queue<H: Hal>(queues: &mut [QueuePair<H>], qid: u16) -> Result<&mut QueuePair<H>, NvmeError> {
    match queues.get_mut(qid as usize) {
        Some(q) if qid != 0 => Ok(q),
        _ => Err(NvmeError::NoSuchQueue(qid)),
    }
}

/// `CAP.TO` as a duration (at least one unit of 500 ms).
fn ready_timeout(cap: Capabilities) -> Duration {
    Duration::from_millis(500 * cap.timeout_units().max(1) as u64)
}

/// Spins until `done(CSTS)` or `timeout` passes; one last check after the
/// deadline so a slow clock read never loses a ready controller.
fn wait_csts<H: Hal, C: Clock + ?Sized>(
    hal: &H,
    clock: &C,
    timeout: Duration,
    mut done: impl FnMut(u32) -> bool,
) -> Result<(), ()> {
    let deadline = clock.now() + timeout;
    loop {
        let expired = clock.now() >= deadline;
        if done(hal.read_reg32(Reg::Csts as usize)) {
            return Ok(());
        }
        if expired {
            return Err(());
        }
        core::hint::spin_loop();
    }
}

fn read64<H: Hal>(hal: &H, reg: Reg) -> u64 {
    let lo = hal.read_reg32(reg as usize) as u64;
    let hi = hal.read_reg32(reg as usize + 4) as u64;
    lo | hi << 32
}

/// # Safety
///
/// As for [`Hal::write_reg32`].
unsafe fn write64<H: Hal>(hal: &H, reg: Reg, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        hal.write_reg32(reg as usize, value as u32);
        hal.write_reg32(reg as usize + 4, (value >> 32) as u32);
    }
}
