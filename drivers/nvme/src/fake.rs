//! A fake NVMe controller for host tests: registers, admin and I/O queues
//! processed from (fake) DMA memory, a backing store in a `Vec`, and fault
//! injection. It implements [`Hal`], so the driver runs against it
//! unchanged. Single-threaded: the device works when a doorbell is written
//! (or on [`FakeNvme::step`] when automatic processing is off).
//!
//! "Physical" addresses of its DMA memory are made up (they start at
//! `0x4000_0000` and differ from the virtual ones), so a driver that hands
//! the device a virtual address fails. Protocol mistakes the device can see
//! (bad doorbell offset or value, CQ overflow, PRPs outside DMA memory,
//! freeing unknown memory) are recorded in [`FakeNvme::violations`].

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use core::time::Duration;

use crate::hal::{Hal, PhysAddr, PAGE_SIZE};
use crate::queue::{CompletionEntry, CQE_SIZE, SQE_SIZE};
use crate::regs::{cc, Reg, DOORBELL_BASE};
use crate::time::{Clock, Instant};

/// Shape and behaviour of the fake controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeConfig {
    /// Namespace 1 size in blocks.
    pub blocks: u64,
    /// log2 of the block size.
    pub lbads: u8,
    /// `CAP.MQES` (0-based).
    pub mqes: u16,
    /// `CAP.DSTRD`.
    pub dstrd: u8,
    /// `CAP.TO` in 500 ms units.
    pub timeout_units: u8,
    /// Identify `MDTS`.
    pub mdts: u8,
    /// I/O queue pairs the controller grants at most.
    pub max_io_queues: u16,
    /// `CSTS` reads before `RDY` follows `CC.EN`.
    pub ready_delay: u32,
    /// `RDY` never becomes 1.
    pub hang_enable: bool,
    /// `RDY` never clears after `CC.EN = 0`.
    pub hang_reset: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            blocks: 4096,
            lbads: 9,
            mqes: 255,
            dstrd: 0,
            timeout_units: 2,
            mdts: 6,
            max_io_queues: 4,
            ready_delay: 3,
            hang_enable: false,
            hang_reset: false,
        }
    }
}

#[derive(Debug)]
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

#[derive(Clone, Copy, Debug)]
struct Sq {
    base: PhysAddr,
    size: u16,
    head: u16,
    tail: u16,
    cqid: u16,
}

#[derive(Clone, Copy, Debug)]
struct Cq {
    base: PhysAddr,
    size: u16,
    tail: u16,
    head: u16,
    phase: bool,
}

#[derive(Debug)]
struct Device {
    config: FakeConfig,
    regions: BTreeMap<PhysAddr, Region>,
    next_phys: PhysAddr,
    cc: u32,
    rdy: bool,
    shst: u32,
    fatal: bool,
    countdown: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    store: Vec<u8>,
    auto: bool,
    /// Post the completions of one batch of commands last first.
    reverse: bool,
    swallow: Option<u8>,
    swallow_admin: Option<u8>,
    media_error_lba: Option<u64>,
    flushes: u32,
    io_commands: u32,
    violations: Vec<String>,
}

/// The fake controller; clones share one device. Implements [`Hal`].
#[derive(Clone, Debug)]
pub struct FakeNvme {
    dev: Rc<RefCell<Device>>,
}

impl FakeNvme {
    /// A controller with `config`, disabled, with zeroed storage.
    pub fn new(config: FakeConfig) -> Self {
        let bytes = (config.blocks << config.lbads) as usize;
        Self {
            dev: Rc::new(RefCell::new(Device {
                config,
                regions: BTreeMap::new(),
                next_phys: 0x4000_0000,
                cc: 0,
                rdy: false,
                shst: 0,
                fatal: false,
                countdown: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                sqs: BTreeMap::new(),
                cqs: BTreeMap::new(),
                store: alloc::vec![0; bytes],
                auto: true,
                reverse: false,
                swallow: None,
                swallow_admin: None,
                media_error_lba: None,
                flushes: 0,
                io_commands: 0,
                violations: Vec::new(),
            })),
        }
    }

    /// Process commands as soon as their doorbell is written (default), or
    /// only on [`step`](Self::step).
    pub fn set_auto(&self, auto: bool) {
        self.dev.borrow_mut().auto = auto;
    }

    /// Post the completions of every batch of commands processed together
    /// (everything submitted since the last processing) in reverse order, as
    /// a controller working on several commands at once may.
    pub fn set_complete_in_reverse(&self, reverse: bool) {
        self.dev.borrow_mut().reverse = reverse;
    }

    /// Processes every submitted command now.
    pub fn step(&self) {
        let mut d = self.dev.borrow_mut();
        let qids: Vec<u16> = d.sqs.keys().copied().collect();
        for qid in qids {
            d.process(qid);
        }
    }

    /// I/O commands with this opcode are fetched but never completed.
    pub fn swallow_io_opcode(&self, opcode: Option<u8>) {
        self.dev.borrow_mut().swallow = opcode;
    }

    /// Admin commands with this opcode are fetched but never completed.
    pub fn swallow_admin_opcode(&self, opcode: Option<u8>) {
        self.dev.borrow_mut().swallow_admin = opcode;
    }

    /// Reads touching this LBA fail with Unrecovered Read Error.
    pub fn set_media_error(&self, lba: Option<u64>) {
        self.dev.borrow_mut().media_error_lba = lba;
    }

    /// Makes `RDY` stick at 1 after `CC.EN` is cleared (a reset that never
    /// finishes), or behave normally again.
    pub fn set_hang_reset(&self, hang: bool) {
        self.dev.borrow_mut().config.hang_reset = hang;
    }

    /// Sets `CSTS.CFS`; the controller stops processing until reset.
    pub fn set_fatal(&self) {
        self.dev.borrow_mut().fatal = true;
    }

    /// The `CC` register.
    pub fn cc(&self) -> u32 {
        self.dev.borrow().cc
    }

    /// I/O queue pairs created (ids of their submission queues).
    pub fn io_queue_ids(&self) -> Vec<u16> {
        self.dev
            .borrow()
            .sqs
            .keys()
            .copied()
            .filter(|&q| q != 0)
            .collect()
    }

    /// Size of I/O submission queue `qid`.
    pub fn io_queue_size(&self, qid: u16) -> Option<u16> {
        self.dev.borrow().sqs.get(&qid).map(|q| q.size)
    }

    /// Flush commands completed.
    pub fn flushes(&self) -> u32 {
        self.dev.borrow().flushes
    }

    /// I/O commands fetched.
    pub fn io_commands(&self) -> u32 {
        self.dev.borrow().io_commands
    }

    /// DMA allocations not freed.
    pub fn live_allocations(&self) -> usize {
        self.dev.borrow().regions.len()
    }

    /// Protocol mistakes seen so far.
    pub fn violations(&self) -> Vec<String> {
        self.dev.borrow().violations.clone()
    }

    /// Bytes of the backing store at `offset`.
    pub fn store(&self, offset: usize, len: usize) -> Vec<u8> {
        self.dev.borrow().store[offset..offset + len].to_vec()
    }

    /// Overwrites the backing store at `offset`.
    pub fn fill_store(&self, offset: usize, data: &[u8]) {
        self.dev.borrow_mut().store[offset..offset + data.len()].copy_from_slice(data);
    }
}

// SAFETY: `dma_alloc` hands out fresh, zeroed, page-aligned heap blocks that
// only the caller uses until `dma_dealloc`; their made-up physical range
// maps one-to-one onto the block, and the "device" accesses them through
// the same pointer, so the mapping is coherent. Register accesses are plain
// function calls on the model.
unsafe impl Hal for FakeNvme {
    fn dma_alloc(&self, pages: usize) -> Option<(PhysAddr, NonNull<u8>)> {
        let len = pages.checked_mul(PAGE_SIZE)?;
        let layout = Layout::from_size_align(len, PAGE_SIZE).ok()?;
        // SAFETY: the layout has a non-zero size (`pages >= 1` is asserted
        // by the driver's `Dma::new`; zero would make `len` 0 and fail here).
        let ptr = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        let mut d = self.dev.borrow_mut();
        let paddr = d.next_phys;
        // Leave a guard page between regions so overruns are visible.
        d.next_phys += (len + PAGE_SIZE) as u64;
        d.regions.insert(paddr, Region { ptr, len });
        Some((paddr, ptr))
    }

    unsafe fn dma_dealloc(&self, paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) {
        let mut d = self.dev.borrow_mut();
        match d.regions.remove(&paddr) {
            Some(r) if r.ptr == vaddr && r.len == pages * PAGE_SIZE => {
                let layout = Layout::from_size_align(r.len, PAGE_SIZE).expect("valid at alloc");
                // SAFETY: allocated in `dma_alloc` with this layout, removed
                // from the map so never freed twice.
                unsafe { alloc::alloc::dealloc(r.ptr.as_ptr(), layout) }
            }
            Some(r) => {
                d.violations
                    .push(format!("dealloc {paddr:#x} with wrong vaddr/size"));
                d.regions.insert(paddr, r);
            }
            None => d
                .violations
                .push(format!("dealloc of unknown DMA memory {paddr:#x}")),
        }
    }

    fn read_reg32(&self, offset: usize) -> u32 {
        self.dev.borrow_mut().read_reg(offset)
    }

    unsafe fn write_reg32(&self, offset: usize, value: u32) {
        self.dev.borrow_mut().write_reg(offset, value)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for r in self.regions.values() {
            let layout = Layout::from_size_align(r.len, PAGE_SIZE).expect("valid at alloc");
            // SAFETY: still-live allocations of `dma_alloc`; the device and
            // every clone of the HAL are gone, so nothing uses them.
            unsafe { alloc::alloc::dealloc(r.ptr.as_ptr(), layout) }
        }
    }
}

/// Status results: (SCT, SC).
type Status = (u8, u8);
const SUCCESS: Status = (0, 0);
const INVALID_OPCODE: Status = (0, 0x01);
const INVALID_FIELD: Status = (0, 0x02);
const DATA_TRANSFER_ERROR: Status = (0, 0x04);
const INVALID_NAMESPACE: Status = (0, 0x0B);
const LBA_OUT_OF_RANGE: Status = (0, 0x80);
const CQ_INVALID: Status = (1, 0x00);
const INVALID_QID: Status = (1, 0x01);
const INVALID_QSIZE: Status = (1, 0x02);
const UNRECOVERED_READ: Status = (2, 0x81);

impl Device {
    fn cap(&self) -> u64 {
        let c = &self.config;
        c.mqes as u64
            | 1 << 16
            | (c.timeout_units as u64) << 24
            | (c.dstrd as u64) << 32
            | 1 << 37
            | 4 << 52
    }

    fn read_reg(&mut self, offset: usize) -> u32 {
        match offset {
            0x00 => self.cap() as u32,
            0x04 => (self.cap() >> 32) as u32,
            o if o == Reg::Vs as usize => 0x0001_0400,
            o if o == Reg::Cc as usize => self.cc,
            o if o == Reg::Csts as usize => {
                if self.countdown > 0 {
                    self.countdown -= 1;
                } else {
                    let want = self.cc & cc::EN != 0;
                    let hang = if want {
                        self.config.hang_enable
                    } else {
                        self.config.hang_reset
                    };
                    if !hang {
                        self.rdy = want;
                    }
                }
                self.rdy as u32 | (self.fatal as u32) << 1 | self.shst
            }
            o if o == Reg::Aqa as usize => self.aqa,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: usize, value: u32) {
        let enabled = self.cc & cc::EN != 0;
        match offset {
            o if o == Reg::Cc as usize => self.write_cc(value),
            o if o == Reg::Aqa as usize && !enabled => self.aqa = value,
            o if o == Reg::Asq as usize && !enabled => {
                self.asq = (self.asq & !0xFFFF_FFFF) | value as u64
            }
            o if o == Reg::Asq as usize + 4 && !enabled => {
                self.asq = (self.asq & 0xFFFF_FFFF) | (value as u64) << 32
            }
            o if o == Reg::Acq as usize && !enabled => {
                self.acq = (self.acq & !0xFFFF_FFFF) | value as u64
            }
            o if o == Reg::Acq as usize + 4 && !enabled => {
                self.acq = (self.acq & 0xFFFF_FFFF) | (value as u64) << 32
            }
            o if o >= DOORBELL_BASE => self.doorbell(o, value),
            o => self.violations.push(format!(
                "write {value:#x} to register {o:#x} (enabled: {enabled})"
            )),
        }
    }

    fn write_cc(&mut self, value: u32) {
        let was = self.cc & cc::EN != 0;
        let now = value & cc::EN != 0;
        self.cc = value;
        if value & cc::SHN_MASK != 0 && now {
            self.shst = 2 << 2;
        }
        if !was && now {
            self.countdown = self.config.ready_delay;
            let iosqes = (value >> cc::IOSQES_SHIFT) & 0xF;
            let iocqes = (value >> cc::IOCQES_SHIFT) & 0xF;
            let mps = (value >> cc::MPS_SHIFT) & 0xF;
            let asqs = (self.aqa & 0xFFF) as u16 + 1;
            let acqs = ((self.aqa >> 16) & 0xFFF) as u16 + 1;
            if iosqes != 6 || iocqes != 4 || mps != 0 || asqs < 2 || acqs < 2 {
                self.violations
                    .push(format!("enable with CC {value:#x} AQA {:#x}", self.aqa));
                self.fatal = true;
                return;
            }
            if self.mem(self.asq, asqs as usize * SQE_SIZE).is_none()
                || self.mem(self.acq, acqs as usize * CQE_SIZE).is_none()
            {
                self.violations
                    .push("admin queues outside DMA memory".into());
                self.fatal = true;
                return;
            }
            self.sqs.insert(
                0,
                Sq {
                    base: self.asq,
                    size: asqs,
                    head: 0,
                    tail: 0,
                    cqid: 0,
                },
            );
            self.cqs.insert(
                0,
                Cq {
                    base: self.acq,
                    size: acqs,
                    tail: 0,
                    head: 0,
                    phase: true,
                },
            );
        } else if was && !now {
            // Controller reset: queues gone, fatal status cleared.
            self.countdown = self.config.ready_delay;
            self.sqs.clear();
            self.cqs.clear();
            self.fatal = false;
            self.shst = 0;
        }
    }

    fn doorbell(&mut self, offset: usize, value: u32) {
        let stride = 4usize << self.config.dstrd;
        let rel = offset - DOORBELL_BASE;
        if rel % stride != 0 {
            self.violations
                .push(format!("doorbell write off the stride at {offset:#x}"));
            return;
        }
        let idx = rel / stride;
        let qid = (idx / 2) as u16;
        if idx % 2 == 0 {
            let Some(sq) = self.sqs.get_mut(&qid) else {
                self.violations
                    .push(format!("SQ {qid} doorbell, no such queue"));
                return;
            };
            if value >= sq.size as u32 {
                self.violations
                    .push(format!("SQ {qid} tail {value} beyond size {}", sq.size));
                return;
            }
            sq.tail = value as u16;
            if self.auto {
                self.process(qid);
            }
        } else {
            let Some(cq) = self.cqs.get_mut(&qid) else {
                self.violations
                    .push(format!("CQ {qid} doorbell, no such queue"));
                return;
            };
            if value >= cq.size as u32 {
                self.violations
                    .push(format!("CQ {qid} head {value} beyond size {}", cq.size));
                return;
            }
            cq.head = value as u16;
        }
    }

    /// The host pointer for `[paddr, paddr + len)` if it lies in one region.
    fn mem(&self, paddr: PhysAddr, len: usize) -> Option<*mut u8> {
        let (&base, r) = self.regions.range(..=paddr).next_back()?;
        let off = (paddr - base) as usize;
        if off.checked_add(len)? > r.len {
            return None;
        }
        // SAFETY: `off + len <= r.len`, inside the allocation.
        Some(unsafe { r.ptr.as_ptr().add(off) })
    }

    fn dma_read(&self, paddr: PhysAddr, out: &mut [u8]) -> bool {
        let Some(p) = self.mem(paddr, out.len()) else {
            return false;
        };
        // SAFETY: `mem` checked the range lies in a live DMA region; `out`
        // is ordinary memory, so they do not overlap.
        unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        true
    }

    fn dma_write(&self, paddr: PhysAddr, data: &[u8]) -> bool {
        let Some(p) = self.mem(paddr, data.len()) else {
            return false;
        };
        // SAFETY: as in `dma_read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        true
    }

    fn read_u64(&self, paddr: PhysAddr) -> Option<u64> {
        let mut b = [0; 8];
        self.dma_read(paddr, &mut b).then(|| u64::from_le_bytes(b))
    }

    fn process(&mut self, qid: u16) {
        if self.fatal || self.cc & cc::EN == 0 || !self.rdy {
            return;
        }
        // Completions held back to be posted last first (`reverse`).
        let mut batch = Vec::new();
        while let Some(sq) = self.sqs.get(&qid).copied() {
            if sq.head == sq.tail {
                break;
            }
            let cq = self.cqs[&sq.cqid];
            if (cq.tail + 1 + batch.len() as u16) % cq.size == cq.head {
                // A full completion queue: a real controller waits too.
                break;
            }
            let mut raw = [0u8; SQE_SIZE];
            if !self.dma_read(sq.base + sq.head as u64 * SQE_SIZE as u64, &mut raw) {
                self.violations
                    .push(format!("SQ {qid} entry outside DMA memory"));
                self.fatal = true;
                return;
            }
            let mut dw = [0u32; 16];
            for (i, d) in dw.iter_mut().enumerate() {
                *d = u32::from_le_bytes(raw[4 * i..4 * i + 4].try_into().expect("4 bytes"));
            }
            let new_head = (sq.head + 1) % sq.size;
            if let Some(s) = self.sqs.get_mut(&qid) {
                s.head = new_head;
            }
            let outcome = if qid == 0 {
                (self.swallow_admin != Some(dw[0] as u8)).then(|| self.admin(&dw))
            } else {
                self.io(&dw)
            };
            if let Some((status, result)) = outcome {
                let done = (sq.cqid, new_head, (dw[0] >> 16) as u16, status, result);
                if self.reverse {
                    batch.push(done);
                } else {
                    self.complete(done.0, qid, done.1, done.2, done.3, done.4);
                }
            }
        }
        // Each entry reports the SQ head as it is when the entry is posted
        // (never moving backwards), as hardware does.
        let head = self.sqs.get(&qid).map_or(0, |sq| sq.head);
        for (cqid, _, cid, status, result) in batch.into_iter().rev() {
            self.complete(cqid, qid, head, cid, status, result);
        }
    }

    fn complete(
        &mut self,
        cqid: u16,
        sqid: u16,
        sq_head: u16,
        cid: u16,
        status: Status,
        result: u32,
    ) {
        let Some(cq) = self.cqs.get_mut(&cqid) else {
            return;
        };
        let entry = CompletionEntry {
            result,
            sq_head,
            sq_id: sqid,
            cid,
            phase: cq.phase,
            status: status.1 as u16 | (status.0 as u16) << 8,
        };
        let at = cq.base + cq.tail as u64 * CQE_SIZE as u64;
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        let mut bytes = [0u8; CQE_SIZE];
        for (i, d) in entry.to_dwords().iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&d.to_le_bytes());
        }
        // Dwords 0–2 first, then the one with the phase tag, as hardware
        // must order them.
        if !self.dma_write(at, &bytes[..12]) || !self.dma_write(at + 12, &bytes[12..]) {
            self.violations
                .push(format!("CQ {cqid} outside DMA memory"));
        }
    }

    fn admin(&mut self, dw: &[u32; 16]) -> (Status, u32) {
        let opcode = dw[0] as u8;
        let prp1 = dw[6] as u64 | (dw[7] as u64) << 32;
        let max_size = self.config.mqes as u32 + 1;
        match opcode {
            0x06 => {
                let data = match dw[10] & 0xFF {
                    0x01 => self.identify_controller(),
                    0x00 if dw[1] == 1 => self.identify_namespace(),
                    0x00 => return (INVALID_NAMESPACE, 0),
                    _ => return (INVALID_FIELD, 0),
                };
                if prp1 % PAGE_SIZE as u64 != 0 || !self.dma_write(prp1, &data) {
                    return (DATA_TRANSFER_ERROR, 0);
                }
                (SUCCESS, 0)
            }
            0x09 if dw[10] & 0xFF == 0x07 => {
                let want = (dw[11] & 0xFFFF).min(dw[11] >> 16) + 1;
                let n = want.min(self.config.max_io_queues as u32) - 1;
                (SUCCESS, n << 16 | n)
            }
            0x05 | 0x01 => {
                let qid = dw[10] as u16;
                let size = (dw[10] >> 16) + 1;
                if qid == 0 || qid > self.config.max_io_queues {
                    return (INVALID_QID, 0);
                }
                if size < 2 || size > max_size {
                    return (INVALID_QSIZE, 0);
                }
                if dw[11] & 1 == 0 || prp1 % PAGE_SIZE as u64 != 0 {
                    return (INVALID_FIELD, 0);
                }
                let entry = if opcode == 0x05 { CQE_SIZE } else { SQE_SIZE };
                if self.mem(prp1, size as usize * entry).is_none() {
                    self.violations
                        .push(format!("queue {qid} outside DMA memory"));
                    return (DATA_TRANSFER_ERROR, 0);
                }
                if opcode == 0x05 {
                    if self.cqs.contains_key(&qid) {
                        return (INVALID_QID, 0);
                    }
                    self.cqs.insert(
                        qid,
                        Cq {
                            base: prp1,
                            size: size as u16,
                            tail: 0,
                            head: 0,
                            phase: true,
                        },
                    );
                } else {
                    let cqid = (dw[11] >> 16) as u16;
                    if self.sqs.contains_key(&qid) {
                        return (INVALID_QID, 0);
                    }
                    if cqid == 0 || !self.cqs.contains_key(&cqid) {
                        return (CQ_INVALID, 0);
                    }
                    self.sqs.insert(
                        qid,
                        Sq {
                            base: prp1,
                            size: size as u16,
                            head: 0,
                            tail: 0,
                            cqid,
                        },
                    );
                }
                (SUCCESS, 0)
            }
            _ => (INVALID_OPCODE, 0),
        }
    }

    fn identify_controller(&self) -> [u8; 4096] {
        let mut d = [0u8; 4096];
        d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        d[4..24].copy_from_slice(b"FAKE0001            ");
        d[24..64].copy_from_slice(b"FractOS fake NVMe                       ");
        d[64..72].copy_from_slice(b"1.0     ");
        d[77] = self.config.mdts;
        d[512] = 0x66;
        d[513] = 0x44;
        d[516..520].copy_from_slice(&1u32.to_le_bytes());
        d[525] = 1;
        d
    }

    fn identify_namespace(&self) -> [u8; 4096] {
        let mut d = [0u8; 4096];
        d[0..8].copy_from_slice(&self.config.blocks.to_le_bytes());
        d[8..16].copy_from_slice(&self.config.blocks.to_le_bytes());
        d[25] = 1; // two formats: 0 = 4 KiB, 1 = the configured size
        d[26] = 1;
        d[128..132].copy_from_slice(&(12u32 << 16).to_le_bytes());
        d[132..136].copy_from_slice(&((self.config.lbads as u32) << 16).to_le_bytes());
        d
    }

    /// Runs an I/O command; `None` if it is swallowed.
    fn io(&mut self, dw: &[u32; 16]) -> Option<(Status, u32)> {
        self.io_commands += 1;
        let opcode = dw[0] as u8;
        if self.swallow == Some(opcode) {
            return None;
        }
        if dw[1] != 1 {
            return Some((INVALID_NAMESPACE, 0));
        }
        let status = match opcode {
            0x00 => {
                self.flushes += 1;
                SUCCESS
            }
            0x01 | 0x02 => self.read_write(opcode == 0x01, dw),
            _ => INVALID_OPCODE,
        };
        Some((status, 0))
    }

    fn read_write(&mut self, write: bool, dw: &[u32; 16]) -> Status {
        let slba = dw[10] as u64 | (dw[11] as u64) << 32;
        let nlb = (dw[12] & 0xFFFF) as u64 + 1;
        if slba
            .checked_add(nlb)
            .is_none_or(|end| end > self.config.blocks)
        {
            return LBA_OUT_OF_RANGE;
        }
        if !write
            && self
                .media_error_lba
                .is_some_and(|l| (slba..slba + nlb).contains(&l))
        {
            return UNRECOVERED_READ;
        }
        let len = (nlb << self.config.lbads) as usize;
        let Some(segments) = self.prp_segments(dw, len) else {
            self.violations.push(format!("bad PRPs in {dw:x?}"));
            return DATA_TRANSFER_ERROR;
        };
        let mut at = (slba << self.config.lbads) as usize;
        for (paddr, n) in segments {
            let ok = if write {
                let mut buf = alloc::vec![0; n];
                let ok = self.dma_read(paddr, &mut buf);
                self.store[at..at + n].copy_from_slice(&buf);
                ok
            } else {
                let data = self.store[at..at + n].to_vec();
                self.dma_write(paddr, &data)
            };
            if !ok {
                self.violations
                    .push(format!("PRP {paddr:#x} outside DMA memory"));
                return DATA_TRANSFER_ERROR;
            }
            at += n;
        }
        SUCCESS
    }

    /// Walks PRP1/PRP2 (and PRP lists, chained if needed) into
    /// `(address, bytes)` pieces covering `len` bytes.
    fn prp_segments(&self, dw: &[u32; 16], len: usize) -> Option<Vec<(PhysAddr, usize)>> {
        let page = PAGE_SIZE as u64;
        let prp1 = dw[6] as u64 | (dw[7] as u64) << 32;
        let prp2 = dw[8] as u64 | (dw[9] as u64) << 32;
        if prp1 % 4 != 0 {
            return None;
        }
        let first = len.min((page - prp1 % page) as usize);
        let mut out = alloc::vec![(prp1, first)];
        let mut left = len - first;
        if left == 0 {
            return Some(out);
        }
        if left <= PAGE_SIZE {
            if prp2 % page != 0 {
                return None;
            }
            out.push((prp2, left));
            return Some(out);
        }
        // PRP2 points to a list; its last entry chains when more follow.
        let mut entry = prp2;
        if entry % 8 != 0 {
            return None;
        }
        while left > 0 {
            let last_in_page = (entry + 8) % page == 0;
            let value = self.read_u64(entry)?;
            if last_in_page && left > PAGE_SIZE {
                entry = value;
                if entry % 8 != 0 {
                    return None;
                }
                continue;
            }
            if value % page != 0 {
                return None;
            }
            let n = left.min(PAGE_SIZE);
            out.push((value, n));
            left -= n;
            entry += 8;
        }
        Some(out)
    }
}

/// A virtual clock: every [`Clock::now`] call advances it by `tick`.
#[derive(Debug)]
pub struct FakeClock {
    now: Cell<u64>,
    tick: u64,
}

impl FakeClock {
    /// A clock at 0 that advances `tick` per reading.
    pub fn new(tick: Duration) -> Self {
        Self {
            now: Cell::new(0),
            tick: tick.as_nanos() as u64,
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.set(self.now.get() + d.as_nanos() as u64);
    }

    /// The current time, without advancing.
    pub fn peek(&self) -> Instant {
        Instant::from_nanos(self.now.get())
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        let t = self.now.get();
        self.now.set(t + self.tick);
        Instant::from_nanos(t)
    }
}
