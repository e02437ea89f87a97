//! Controller registers (NVMe base specification, "Controller Registers").

/// Byte offsets of the registers in BAR0. 64-bit registers are accessed as
/// two 32-bit halves, low first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Reg {
    /// Controller Capabilities (64-bit).
    Cap = 0x00,
    /// Version.
    Vs = 0x08,
    /// Interrupt Mask Set.
    Intms = 0x0C,
    /// Interrupt Mask Clear.
    Intmc = 0x10,
    /// Controller Configuration.
    Cc = 0x14,
    /// Controller Status.
    Csts = 0x1C,
    /// Admin Queue Attributes.
    Aqa = 0x24,
    /// Admin Submission Queue base address (64-bit).
    Asq = 0x28,
    /// Admin Completion Queue base address (64-bit).
    Acq = 0x30,
}

/// Offset of the first doorbell register.
pub const DOORBELL_BASE: usize = 0x1000;

/// Offset of the submission queue `qid` tail doorbell for a doorbell stride
/// of `4 << dstrd` bytes.
pub const fn sq_tail_doorbell(qid: u16, dstrd: u8) -> usize {
    DOORBELL_BASE + (2 * qid as usize) * (4 << dstrd)
}

/// Offset of the completion queue `qid` head doorbell.
pub const fn cq_head_doorbell(qid: u16, dstrd: u8) -> usize {
    DOORBELL_BASE + (2 * qid as usize + 1) * (4 << dstrd)
}

/// Decoded `CAP` register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// Maximum Queue Entries Supported, as a count (the field is 0-based).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xFFFF) as u32 + 1
    }
    /// Contiguous Queues Required.
    pub fn contiguous_queues_required(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// Timeout: worst-case time for `CSTS.RDY` to change, in 500 ms units.
    pub fn timeout_units(self) -> u8 {
        ((self.0 >> 24) & 0xFF) as u8
    }
    /// Doorbell Stride: doorbells are `4 << dstrd` bytes apart.
    pub fn doorbell_stride(self) -> u8 {
        ((self.0 >> 32) & 0xF) as u8
    }
    /// Command Sets Supported, bit 0: the NVM command set.
    pub fn nvm_command_set(self) -> bool {
        (self.0 >> 37) & 1 != 0
    }
    /// Memory Page Size Minimum: `2 ^ (12 + mpsmin)` bytes.
    pub fn mps_min(self) -> u8 {
        ((self.0 >> 48) & 0xF) as u8
    }
    /// Memory Page Size Maximum.
    pub fn mps_max(self) -> u8 {
        ((self.0 >> 52) & 0xF) as u8
    }
}

/// `CC` fields.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1 << 0;
    /// I/O Command Set Selected = NVM (bits 6:4 = 0).
    pub const CSS_NVM: u32 = 0 << 4;
    /// Memory Page Size shift (bits 10:7); 0 = 4 KiB.
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism = round robin (bits 13:11 = 0).
    pub const AMS_RR: u32 = 0 << 11;
    /// Shutdown Notification mask (bits 15:14).
    pub const SHN_MASK: u32 = 3 << 14;
    /// I/O Submission Queue Entry Size shift (bits 19:16), log2 bytes.
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size shift (bits 23:20), log2 bytes.
    pub const IOCQES_SHIFT: u32 = 20;
}

/// `CSTS` fields.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1 << 0;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status (bits 3:2).
    pub const SHST_MASK: u32 = 3 << 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells_follow_the_stride() {
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(1, 0), 0x1008);
        assert_eq!(cq_head_doorbell(1, 0), 0x100C);
        // DSTRD = 2: 16-byte stride.
        assert_eq!(sq_tail_doorbell(1, 2), 0x1020);
        assert_eq!(cq_head_doorbell(1, 2), 0x1030);
    }

    #[test]
    fn cap_fields_decode() {
        // MQES 1023, CQR, TO 20 (10 s), DSTRD 1, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap = Capabilities(1023 | 1 << 16 | 20 << 24 | 1 << 32 | 1 << 37 | 4 << 52);
        assert_eq!(cap.max_queue_entries(), 1024);
        assert!(cap.contiguous_queues_required());
        assert_eq!(cap.timeout_units(), 20);
        assert_eq!(cap.doorbell_stride(), 1);
        assert!(cap.nvm_command_set());
        assert_eq!(cap.mps_min(), 0);
        assert_eq!(cap.mps_max(), 4);
    }
}
