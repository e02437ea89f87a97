//! Errors of the driver and decoding of NVMe completion status (SCT/SC).

use core::fmt;
use core::time::Duration;

use crate::queue::CommandId;

/// Everything that can go wrong in this driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NvmeError {
    /// The controller does not offer something the driver needs.
    #[error("unsupported controller: {0}")]
    Unsupported(&'static str),
    /// The DMA allocator of the [`Hal`](crate::Hal) returned no memory.
    #[error("DMA allocation of {pages} page(s) failed")]
    DmaAlloc {
        /// Pages asked for.
        pages: usize,
    },
    /// `CSTS.RDY` did not clear within `CAP.TO` after `CC.EN` was cleared.
    #[error("controller did not finish its reset within {0:?} (CAP.TO)")]
    ResetTimeout(Duration),
    /// `CSTS.RDY` did not become set within `CAP.TO` after `CC.EN` was set.
    #[error("controller did not become ready within {0:?} (CAP.TO)")]
    EnableTimeout(Duration),
    /// `CSTS.CFS` is set: the controller failed and needs a reset.
    #[error("controller fatal status (CSTS.CFS): the controller must be reset")]
    ControllerFatal,
    /// A command did not complete before its deadline. Its command id stays
    /// reserved until the controller completes it or is reset.
    #[error("command {0:?} timed out")]
    CommandTimeout(CommandId),
    /// The submission queue (or its command-id space) is full: nothing was
    /// written; poll completions and retry.
    #[error("submission queue {qid} is full")]
    QueueFull {
        /// Queue id.
        qid: u16,
    },
    /// No I/O queue with this id was created.
    #[error("no I/O queue {0}")]
    NoSuchQueue(u16),
    /// The controller completed a command with an error status.
    #[error("command failed: {status} (do not retry: {dnr})")]
    Status {
        /// Decoded status code type and status code.
        status: CommandStatus,
        /// The controller's "Do Not Retry" bit.
        dnr: bool,
    },
    /// A data buffer that the transfer cannot use (misaligned, too few pages).
    #[error("invalid data buffer: {0}")]
    InvalidBuffer(&'static str),
    /// A transfer longer than one command may carry.
    #[error("transfer of {blocks} blocks exceeds the {max} blocks one command may move")]
    TransferTooLarge {
        /// Blocks asked for.
        blocks: u32,
        /// Most blocks per command.
        max: u32,
    },
    /// Zero blocks asked for.
    #[error("zero-length transfer")]
    ZeroLength,
    /// The controller posted a completion that matches no command in flight.
    #[error("completion for unknown command id {cid} on queue {qid}")]
    UnexpectedCompletion {
        /// Queue id.
        qid: u16,
        /// Command id in the completion entry.
        cid: u16,
    },
    /// The namespace does not exist or is inactive (size 0).
    #[error("namespace {0} is inactive")]
    InactiveNamespace(u32),
}

/// A completion status, decoded from its status code type (SCT) and status
/// code (SC). Codes the driver has no name for keep their raw values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandStatus {
    // Generic command status (SCT 0).
    /// 0/0x01: Invalid Command Opcode.
    InvalidOpcode,
    /// 0/0x02: Invalid Field in Command.
    InvalidField,
    /// 0/0x03: Command ID Conflict.
    CommandIdConflict,
    /// 0/0x04: Data Transfer Error.
    DataTransferError,
    /// 0/0x05: Commands Aborted due to Power Loss Notification.
    AbortedPowerLoss,
    /// 0/0x06: Internal Error.
    InternalError,
    /// 0/0x07: Command Abort Requested.
    AbortRequested,
    /// 0/0x08: Command Aborted due to SQ Deletion.
    AbortedSqDeletion,
    /// 0/0x0B: Invalid Namespace or Format.
    InvalidNamespace,
    /// 0/0x13: PRP Offset Invalid.
    InvalidPrpOffset,
    /// 0/0x80: LBA Out of Range.
    LbaOutOfRange,
    /// 0/0x81: Capacity Exceeded.
    CapacityExceeded,
    /// 0/0x82: Namespace Not Ready.
    NamespaceNotReady,
    // Command specific status (SCT 1).
    /// 1/0x00: Completion Queue Invalid.
    InvalidCompletionQueue,
    /// 1/0x01: Invalid Queue Identifier.
    InvalidQueueId,
    /// 1/0x02: Invalid Queue Size.
    InvalidQueueSize,
    /// 1/0x80 (I/O commands): Conflicting Attributes.
    ConflictingAttributes,
    /// 1/0x82 (I/O commands): Attempted Write to Read Only Range.
    WriteToReadOnly,
    // Media and data integrity errors (SCT 2).
    /// 2/0x80: Write Fault.
    WriteFault,
    /// 2/0x81: Unrecovered Read Error.
    UnrecoveredReadError,
    /// 2/0x86: Access Denied.
    AccessDenied,
    /// 2/0x87: Deallocated or Unwritten Logical Block.
    DeallocatedBlock,
    /// Any other code: `sct` and `sc` as read from the completion.
    Other {
        /// Status code type (3 bits).
        sct: u8,
        /// Status code.
        sc: u8,
    },
}

impl CommandStatus {
    /// Decodes a non-success SCT/SC pair.
    pub fn from_raw(sct: u8, sc: u8) -> Self {
        use CommandStatus::*;
        match (sct, sc) {
            (0, 0x01) => InvalidOpcode,
            (0, 0x02) => InvalidField,
            (0, 0x03) => CommandIdConflict,
            (0, 0x04) => DataTransferError,
            (0, 0x05) => AbortedPowerLoss,
            (0, 0x06) => InternalError,
            (0, 0x07) => AbortRequested,
            (0, 0x08) => AbortedSqDeletion,
            (0, 0x0B) => InvalidNamespace,
            (0, 0x13) => InvalidPrpOffset,
            (0, 0x80) => LbaOutOfRange,
            (0, 0x81) => CapacityExceeded,
            (0, 0x82) => NamespaceNotReady,
            (1, 0x00) => InvalidCompletionQueue,
            (1, 0x01) => InvalidQueueId,
            (1, 0x02) => InvalidQueueSize,
            (1, 0x80) => ConflictingAttributes,
            (1, 0x82) => WriteToReadOnly,
            (2, 0x80) => WriteFault,
            (2, 0x81) => UnrecoveredReadError,
            (2, 0x86) => AccessDenied,
            (2, 0x87) => DeallocatedBlock,
            (sct, sc) => Other { sct, sc },
        }
    }

    /// Decodes the 15-bit status field of a completion (DW3 bits 31:17,
    /// shifted down so that bit 0 is the first bit of SC). `Ok(())` for
    /// success, else the error to report.
    pub fn check(status: u16) -> Result<(), NvmeError> {
        let sc = (status & 0xFF) as u8;
        let sct = ((status >> 8) & 0x7) as u8;
        if sct == 0 && sc == 0 {
            return Ok(());
        }
        Err(NvmeError::Status {
            status: Self::from_raw(sct, sc),
            dnr: status & (1 << 14) != 0,
        })
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use CommandStatus::*;
        let s = match self {
            InvalidOpcode => "invalid command opcode",
            InvalidField => "invalid field in command",
            CommandIdConflict => "command id conflict",
            DataTransferError => "data transfer error",
            AbortedPowerLoss => "aborted: power loss notification",
            InternalError => "internal error",
            AbortRequested => "command abort requested",
            AbortedSqDeletion => "aborted: submission queue deleted",
            InvalidNamespace => "invalid namespace or format",
            InvalidPrpOffset => "PRP offset invalid",
            LbaOutOfRange => "LBA out of range",
            CapacityExceeded => "capacity exceeded",
            NamespaceNotReady => "namespace not ready",
            InvalidCompletionQueue => "completion queue invalid",
            InvalidQueueId => "invalid queue identifier",
            InvalidQueueSize => "invalid queue size",
            ConflictingAttributes => "conflicting attributes",
            WriteToReadOnly => "write to read-only range",
            WriteFault => "write fault",
            UnrecoveredReadError => "unrecovered read error",
            AccessDenied => "access denied",
            DeallocatedBlock => "deallocated or unwritten logical block",
            Other { sct, sc } => return write!(f, "status type {sct:#x} code {sc:#04x}"),
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_field_decodes() {
        assert_eq!(CommandStatus::check(0), Ok(()));
        assert_eq!(
            CommandStatus::check(0x0080),
            Err(NvmeError::Status {
                status: CommandStatus::LbaOutOfRange,
                dnr: false
            })
        );
        // SCT 1, SC 2, DNR set.
        assert_eq!(
            CommandStatus::check((1 << 14) | (1 << 8) | 0x02),
            Err(NvmeError::Status {
                status: CommandStatus::InvalidQueueSize,
                dnr: true
            })
        );
        // More (bit 13) and CRD (bits 12:11) do not change the code.
        assert_eq!(
            CommandStatus::check((1 << 13) | (3 << 11) | (7 << 8) | 0xC0),
            Err(NvmeError::Status {
                status: CommandStatus::Other { sct: 7, sc: 0xC0 },
                dnr: false
            })
        );
    }
}
