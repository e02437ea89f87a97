//! Submission/completion queue pairs: entries, head/tail/phase, command ids.

use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use crate::error::{CommandStatus, NvmeError};
use crate::hal::{Dma, Hal, PhysAddr, PAGE_SIZE};
use crate::regs;
use crate::time::Instant;

/// Size of a submission queue entry (`CC.IOSQES = 6`).
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry (`CC.IOCQES = 4`).
pub const CQE_SIZE: usize = 16;

/// Admin command opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminOpcode {
    /// Create I/O Submission Queue.
    CreateIoSq = 0x01,
    /// Create I/O Completion Queue.
    CreateIoCq = 0x05,
    /// Identify.
    Identify = 0x06,
    /// Set Features.
    SetFeatures = 0x09,
}

/// NVM command set I/O opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum IoOpcode {
    /// Flush.
    Flush = 0x00,
    /// Write.
    Write = 0x01,
    /// Read.
    Read = 0x02,
}

/// A 64-byte submission queue entry, as sixteen dwords.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// CDW0–CDW15.
    pub dw: [u32; 16],
}

impl Command {
    /// An entry with `opcode` and namespace id `nsid`; PRP data transfer,
    /// command id filled in at submission.
    pub fn new(opcode: u8, nsid: u32) -> Self {
        let mut dw = [0; 16];
        dw[0] = opcode as u32;
        dw[1] = nsid;
        Self { dw }
    }

    /// Sets Data Pointer PRP Entry 1 and 2 (CDW6–9).
    pub fn with_prps(mut self, prp1: PhysAddr, prp2: PhysAddr) -> Self {
        self.dw[6] = prp1 as u32;
        self.dw[7] = (prp1 >> 32) as u32;
        self.dw[8] = prp2 as u32;
        self.dw[9] = (prp2 >> 32) as u32;
        self
    }

    /// Sets command dword `n` (10–15).
    pub fn with_cdw(mut self, n: usize, value: u32) -> Self {
        self.dw[n] = value;
        self
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.dw[0] as u8
    }

    /// The command id (CDW0 bits 31:16).
    pub fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }

    /// PRP entry 1.
    pub fn prp1(&self) -> PhysAddr {
        self.dw[6] as u64 | (self.dw[7] as u64) << 32
    }

    /// PRP entry 2.
    pub fn prp2(&self) -> PhysAddr {
        self.dw[8] as u64 | (self.dw[9] as u64) << 32
    }
}

/// A decoded 16-byte completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Command specific result (DW0).
    pub result: u32,
    /// Submission queue head pointer at completion time.
    pub sq_head: u16,
    /// Submission queue the command came from.
    pub sq_id: u16,
    /// Command id.
    pub cid: u16,
    /// Phase tag.
    pub phase: bool,
    /// Status field without the phase tag (DW3 bits 31:17).
    pub status: u16,
}

impl CompletionEntry {
    /// Decodes the four dwords of an entry.
    pub fn from_dwords(dw: [u32; 4]) -> Self {
        Self {
            result: dw[0],
            sq_head: dw[2] as u16,
            sq_id: (dw[2] >> 16) as u16,
            cid: dw[3] as u16,
            phase: dw[3] & (1 << 16) != 0,
            status: (dw[3] >> 17) as u16,
        }
    }

    /// Encodes the entry (used by the fake device).
    pub fn to_dwords(&self) -> [u32; 4] {
        [
            self.result,
            0,
            self.sq_head as u32 | (self.sq_id as u32) << 16,
            self.cid as u32 | (self.phase as u32) << 16 | (self.status as u32) << 17,
        ]
    }
}

/// Identifies a submitted command: its queue and command id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId {
    /// Submission queue id (0 = admin).
    pub qid: u16,
    /// Command id within that queue.
    pub cid: u16,
}

/// The outcome of one command, returned by
/// [`NvmeController::poll`](crate::NvmeController::poll).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Which command.
    pub id: CommandId,
    /// DW0 of the completion on success, else the decoded status or
    /// [`NvmeError::CommandTimeout`].
    pub result: Result<u32, NvmeError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    InFlight {
        deadline: Instant,
    },
    /// Timed out: the id stays reserved until a late completion (or a
    /// controller reset) so that it is never confused with a new command.
    Abandoned,
}

/// One submission queue and its completion queue (same id, same depth).
#[derive(Debug)]
pub(crate) struct QueuePair<H: Hal> {
    qid: u16,
    depth: u16,
    sq: Dma<H>,
    cq: Dma<H>,
    /// One PRP list page per command id (I/O queues only).
    prp_lists: Option<Dma<H>>,
    sq_tail: u16,
    /// Last SQ head the controller reported.
    sq_head: u16,
    cq_head: u16,
    /// Phase tag that marks a new completion entry.
    phase: bool,
    slots: Vec<Slot>,
    in_flight: usize,
    /// No in-flight deadline is earlier than this (a lower bound, tightened
    /// when the slots are scanned), so most empty polls skip the scan.
    earliest_deadline: Instant,
    next_cid: u16,
    sq_doorbell: usize,
    cq_doorbell: usize,
}

impl<H: Hal> QueuePair<H> {
    pub(crate) fn new(
        hal: &H,
        qid: u16,
        depth: u16,
        dstrd: u8,
        prp_lists: bool,
    ) -> Result<Self, NvmeError> {
        let pages = |bytes: usize| bytes.div_ceil(PAGE_SIZE);
        Ok(Self {
            qid,
            depth,
            sq: Dma::new(hal, pages(depth as usize * SQE_SIZE))?,
            cq: Dma::new(hal, pages(depth as usize * CQE_SIZE))?,
            prp_lists: if prp_lists {
                Some(Dma::new(hal, depth as usize)?)
            } else {
                None
            },
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            slots: alloc::vec![Slot::Free; depth as usize],
            in_flight: 0,
            earliest_deadline: Instant::from_nanos(u64::MAX),
            next_cid: 0,
            sq_doorbell: regs::sq_tail_doorbell(qid, dstrd),
            cq_doorbell: regs::cq_head_doorbell(qid, dstrd),
        })
    }

    pub(crate) fn depth(&self) -> u16 {
        self.depth
    }

    pub(crate) fn sq_paddr(&self) -> PhysAddr {
        self.sq.paddr()
    }

    pub(crate) fn cq_paddr(&self) -> PhysAddr {
        self.cq.paddr()
    }

    /// Commands submitted and not yet completed or timed out.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the ring has no room for another entry.
    pub(crate) fn is_full(&self) -> bool {
        (self.sq_tail + 1) % self.depth == self.sq_head
    }

    /// Reserves a command id, or reports backpressure without touching the
    /// ring. The id must be used by [`submit`](Self::submit) or given back
    /// with [`release`](Self::release).
    pub(crate) fn reserve(&mut self) -> Result<u16, NvmeError> {
        // At most depth - 1 commands outstanding (in flight or timed out and
        // not yet completed), so the completion queue can never overflow.
        let outstanding = self.slots.iter().filter(|s| **s != Slot::Free).count();
        if self.is_full() || outstanding + 1 >= self.depth as usize {
            return Err(NvmeError::QueueFull { qid: self.qid });
        }
        for i in 0..self.depth {
            let cid = (self.next_cid + i) % self.depth;
            if self.slots[cid as usize] == Slot::Free {
                self.next_cid = (cid + 1) % self.depth;
                // Marked in flight with a placeholder deadline until submit.
                self.slots[cid as usize] = Slot::InFlight {
                    deadline: Instant::from_nanos(u64::MAX),
                };
                return Ok(cid);
            }
        }
        Err(NvmeError::QueueFull { qid: self.qid })
    }

    /// Gives back an id from [`reserve`](Self::reserve) that was not submitted.
    pub(crate) fn release(&mut self, cid: u16) {
        self.slots[cid as usize] = Slot::Free;
    }

    /// Physical address and buffer of the PRP list page of `cid`.
    pub(crate) fn prp_list(&mut self, cid: u16) -> Option<(&mut Dma<H>, usize)> {
        self.prp_lists
            .as_mut()
            .map(|d| (d, cid as usize * PAGE_SIZE))
    }

    /// Writes `cmd` with id `cid` at the tail and rings the doorbell.
    pub(crate) fn submit(
        &mut self,
        hal: &H,
        cid: u16,
        mut cmd: Command,
        deadline: Instant,
    ) -> CommandId {
        debug_assert!(!self.is_full(), "reserve() checked for room");
        cmd.dw[0] = (cmd.dw[0] & 0xFFFF) | (cid as u32) << 16;
        let base = self.sq_tail as usize * SQE_SIZE;
        for (i, dw) in cmd.dw.iter().enumerate() {
            self.sq.write_u32(base + 4 * i, *dw);
        }
        self.slots[cid as usize] = Slot::InFlight { deadline };
        self.in_flight += 1;
        self.earliest_deadline = self.earliest_deadline.min(deadline);
        self.sq_tail = (self.sq_tail + 1) % self.depth;
        // The entry must be in memory before the controller sees the tail.
        fence(Ordering::SeqCst);
        // SAFETY: the entry only names memory owned by this driver (queues,
        // PRP lists) or a data buffer whose caller promised to keep it valid
        // until completion (the contract of the `unsafe` submit functions).
        unsafe { hal.write_reg32(self.sq_doorbell, self.sq_tail as u32) };
        CommandId { qid: self.qid, cid }
    }

    /// Takes the next completion entry if the controller posted one, and
    /// rings the head doorbell.
    fn pop_entry(&mut self, hal: &H) -> Option<CompletionEntry> {
        let base = self.cq_head as usize * CQE_SIZE;
        let dw3 = self.cq.read_u32(base + 12);
        if (dw3 & (1 << 16) != 0) != self.phase {
            return None;
        }
        // Read the rest of the entry only after seeing its phase tag.
        fence(Ordering::SeqCst);
        let entry = CompletionEntry::from_dwords([
            self.cq.read_u32(base),
            self.cq.read_u32(base + 4),
            self.cq.read_u32(base + 8),
            dw3,
        ]);
        self.cq_head += 1;
        if self.cq_head == self.depth {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        self.sq_head = entry.sq_head % self.depth;
        // SAFETY: moving the CQ head only lets the controller reuse entries
        // we have consumed; it names no memory.
        unsafe { hal.write_reg32(self.cq_doorbell, self.cq_head as u32) };
        Some(entry)
    }

    /// The next completion of a command in flight; late completions of
    /// timed-out commands are consumed silently.
    pub(crate) fn poll(&mut self, hal: &H) -> Result<Option<Completion>, NvmeError> {
        while let Some(entry) = self.pop_entry(hal) {
            let id = CommandId {
                qid: self.qid,
                cid: entry.cid,
            };
            match self.slots.get(entry.cid as usize).copied() {
                Some(Slot::InFlight { .. }) => {
                    self.slots[entry.cid as usize] = Slot::Free;
                    self.in_flight -= 1;
                    let result = CommandStatus::check(entry.status).map(|()| entry.result);
                    return Ok(Some(Completion { id, result }));
                }
                // A late completion of a command already reported as timed
                // out: the id is free again, the outcome was reported.
                Some(Slot::Abandoned) => self.slots[entry.cid as usize] = Slot::Free,
                Some(Slot::Free) | None => {
                    return Err(NvmeError::UnexpectedCompletion {
                        qid: self.qid,
                        cid: entry.cid,
                    })
                }
            }
        }
        Ok(None)
    }

    /// The first command whose deadline is at or before `now`, if any.
    pub(crate) fn first_expired(&mut self, now: Instant) -> Option<u16> {
        if self.in_flight == 0 || now < self.earliest_deadline {
            return None;
        }
        let mut earliest = Instant::from_nanos(u64::MAX);
        for (cid, slot) in self.slots.iter().enumerate() {
            if let Slot::InFlight { deadline } = *slot {
                if deadline <= now {
                    return Some(cid as u16);
                }
                earliest = earliest.min(deadline);
            }
        }
        self.earliest_deadline = earliest;
        None
    }

    /// Marks `cid` timed out (its id stays reserved).
    pub(crate) fn abandon(&mut self, cid: u16) -> Completion {
        self.slots[cid as usize] = Slot::Abandoned;
        self.in_flight -= 1;
        let id = CommandId { qid: self.qid, cid };
        Completion {
            id,
            result: Err(NvmeError::CommandTimeout(id)),
        }
    }
}
