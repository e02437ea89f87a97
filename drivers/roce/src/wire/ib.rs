//! InfiniBand transport headers: BTH, RETH, AETH, ImmDt (IBA Vol 1 §9.2,
//! §9.3), reliable-connection opcodes only.

use crate::psn::Psn;

/// Base transport header length.
pub const BTH_LEN: usize = 12;
/// RDMA extended transport header length.
pub const RETH_LEN: usize = 16;
/// ACK extended transport header length.
pub const AETH_LEN: usize = 4;
/// Immediate data length.
pub const IMM_LEN: usize = 4;
/// Invariant CRC length.
pub const ICRC_LEN: usize = 4;
/// The default partition key (full member of the default partition).
pub const DEFAULT_PKEY: u16 = 0xFFFF;

/// Reliable-connection opcodes this engine speaks (transport bits `000`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// SEND, first packet of several.
    SendFirst = 0x00,
    /// SEND, middle packet.
    SendMiddle = 0x01,
    /// SEND, last packet.
    SendLast = 0x02,
    /// SEND, last packet, with immediate data.
    SendLastImm = 0x03,
    /// SEND in one packet.
    SendOnly = 0x04,
    /// SEND in one packet, with immediate data.
    SendOnlyImm = 0x05,
    /// RDMA WRITE, first packet (RETH).
    WriteFirst = 0x06,
    /// RDMA WRITE, middle packet.
    WriteMiddle = 0x07,
    /// RDMA WRITE, last packet.
    WriteLast = 0x08,
    /// RDMA WRITE, last packet, with immediate data.
    WriteLastImm = 0x09,
    /// RDMA WRITE in one packet (RETH).
    WriteOnly = 0x0A,
    /// RDMA WRITE in one packet (RETH), with immediate data.
    WriteOnlyImm = 0x0B,
    /// RDMA READ request (RETH).
    ReadRequest = 0x0C,
    /// RDMA READ response, first packet (AETH).
    ReadResponseFirst = 0x0D,
    /// RDMA READ response, middle packet.
    ReadResponseMiddle = 0x0E,
    /// RDMA READ response, last packet (AETH).
    ReadResponseLast = 0x0F,
    /// RDMA READ response in one packet (AETH).
    ReadResponseOnly = 0x10,
    /// ACK, RNR NAK or NAK (AETH).
    Acknowledge = 0x11,
}

/// What an opcode belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// SEND (any position, with or without immediate).
    Send,
    /// RDMA WRITE (any position, with or without immediate).
    Write,
    /// RDMA READ request.
    ReadRequest,
    /// RDMA READ response.
    ReadResponse,
    /// ACK or NAK.
    Acknowledge,
}

/// Where a packet sits in its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// First of several.
    First,
    /// Neither first nor last.
    Middle,
    /// Last of several.
    Last,
    /// The whole message.
    Only,
}

impl Opcode {
    /// The RC opcode for `b`, if this engine implements it.
    pub const fn from_u8(b: u8) -> Option<Opcode> {
        use Opcode::*;
        Some(match b {
            0x00 => SendFirst,
            0x01 => SendMiddle,
            0x02 => SendLast,
            0x03 => SendLastImm,
            0x04 => SendOnly,
            0x05 => SendOnlyImm,
            0x06 => WriteFirst,
            0x07 => WriteMiddle,
            0x08 => WriteLast,
            0x09 => WriteLastImm,
            0x0A => WriteOnly,
            0x0B => WriteOnlyImm,
            0x0C => ReadRequest,
            0x0D => ReadResponseFirst,
            0x0E => ReadResponseMiddle,
            0x0F => ReadResponseLast,
            0x10 => ReadResponseOnly,
            0x11 => Acknowledge,
            _ => return None,
        })
    }

    /// The family of the opcode.
    pub const fn kind(self) -> OpKind {
        use Opcode::*;
        match self {
            SendFirst | SendMiddle | SendLast | SendLastImm | SendOnly | SendOnlyImm => {
                OpKind::Send
            }
            WriteFirst | WriteMiddle | WriteLast | WriteLastImm | WriteOnly | WriteOnlyImm => {
                OpKind::Write
            }
            ReadRequest => OpKind::ReadRequest,
            ReadResponseFirst | ReadResponseMiddle | ReadResponseLast | ReadResponseOnly => {
                OpKind::ReadResponse
            }
            Acknowledge => OpKind::Acknowledge,
        }
    }

    /// The position of the packet in its message (READ requests and ACKs
    /// are `Only`).
    pub const fn position(self) -> Position {
        use Opcode::*;
        match self {
            SendFirst | WriteFirst | ReadResponseFirst => Position::First,
            SendMiddle | WriteMiddle | ReadResponseMiddle => Position::Middle,
            SendLast | SendLastImm | WriteLast | WriteLastImm | ReadResponseLast => Position::Last,
            _ => Position::Only,
        }
    }

    /// Whether a RETH follows the BTH.
    pub const fn has_reth(self) -> bool {
        matches!(
            self,
            Opcode::WriteFirst | Opcode::WriteOnly | Opcode::WriteOnlyImm | Opcode::ReadRequest
        )
    }

    /// Whether an AETH follows the BTH.
    pub const fn has_aeth(self) -> bool {
        matches!(
            self,
            Opcode::ReadResponseFirst
                | Opcode::ReadResponseLast
                | Opcode::ReadResponseOnly
                | Opcode::Acknowledge
        )
    }

    /// Whether immediate data follows the other headers.
    pub const fn has_imm(self) -> bool {
        matches!(
            self,
            Opcode::SendLastImm | Opcode::SendOnlyImm | Opcode::WriteLastImm | Opcode::WriteOnlyImm
        )
    }

    /// Whether the packet may carry payload.
    pub const fn has_payload(self) -> bool {
        !matches!(self, Opcode::ReadRequest | Opcode::Acknowledge)
    }

    /// Length of the extension headers after the BTH.
    pub const fn ext_len(self) -> usize {
        (if self.has_reth() { RETH_LEN } else { 0 })
            + (if self.has_aeth() { AETH_LEN } else { 0 })
            + (if self.has_imm() { IMM_LEN } else { 0 })
    }

    /// The opcode of a SEND or WRITE packet at `pos`, with immediate data
    /// on the last packet if `imm`.
    pub const fn for_message(kind: OpKind, pos: Position, imm: bool) -> Opcode {
        use Opcode::*;
        match (kind, pos, imm) {
            (OpKind::Send, Position::First, _) => SendFirst,
            (OpKind::Send, Position::Middle, _) => SendMiddle,
            (OpKind::Send, Position::Last, false) => SendLast,
            (OpKind::Send, Position::Last, true) => SendLastImm,
            (OpKind::Send, Position::Only, false) => SendOnly,
            (OpKind::Send, Position::Only, true) => SendOnlyImm,
            (OpKind::Write, Position::First, _) => WriteFirst,
            (OpKind::Write, Position::Middle, _) => WriteMiddle,
            (OpKind::Write, Position::Last, false) => WriteLast,
            (OpKind::Write, Position::Last, true) => WriteLastImm,
            (OpKind::Write, Position::Only, false) => WriteOnly,
            (OpKind::Write, Position::Only, true) => WriteOnlyImm,
            (OpKind::ReadResponse, Position::First, _) => ReadResponseFirst,
            (OpKind::ReadResponse, Position::Middle, _) => ReadResponseMiddle,
            (OpKind::ReadResponse, Position::Last, _) => ReadResponseLast,
            (OpKind::ReadResponse, Position::Only, _) => ReadResponseOnly,
            (OpKind::ReadRequest, _, _) => ReadRequest,
            (OpKind::Acknowledge, _, _) => Acknowledge,
        }
    }
}

/// The base transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bth {
    /// The opcode.
    pub opcode: Opcode,
    /// Solicited event.
    pub solicited: bool,
    /// MigReq (path migration state); sent as 1, ignored on receipt.
    pub migreq: bool,
    /// Pad count (0–3 bytes after the payload); set by the emitter.
    pub pad: u8,
    /// Partition key.
    pub pkey: u16,
    /// Forward explicit congestion notification (masked in the ICRC).
    pub fecn: bool,
    /// Backward explicit congestion notification (masked in the ICRC).
    pub becn: bool,
    /// Destination queue pair number (24 bits).
    pub dest_qp: u32,
    /// Acknowledge request.
    pub ack_req: bool,
    /// Packet sequence number.
    pub psn: Psn,
}

/// Errors decoding a BTH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BthError {
    /// Transport version is not 0.
    Version,
    /// The opcode is not one this engine implements.
    Opcode,
}

impl Bth {
    /// Decodes the first [`BTH_LEN`] bytes of `b` (`b` must be long enough).
    pub fn parse(b: &[u8; BTH_LEN]) -> Result<Bth, BthError> {
        if b[1] & 0x0F != 0 {
            return Err(BthError::Version);
        }
        let opcode = Opcode::from_u8(b[0]).ok_or(BthError::Opcode)?;
        Ok(Bth {
            opcode,
            solicited: b[1] & 0x80 != 0,
            migreq: b[1] & 0x40 != 0,
            pad: (b[1] >> 4) & 0x3,
            pkey: u16::from_be_bytes([b[2], b[3]]),
            fecn: b[4] & 0x80 != 0,
            becn: b[4] & 0x40 != 0,
            dest_qp: u32::from_be_bytes([0, b[5], b[6], b[7]]),
            ack_req: b[8] & 0x80 != 0,
            psn: Psn::new(u32::from_be_bytes([0, b[9], b[10], b[11]])),
        })
    }

    /// Encodes into `b`.
    pub fn write(&self, b: &mut [u8; BTH_LEN]) {
        b[0] = self.opcode as u8;
        b[1] =
            (u8::from(self.solicited) << 7) | (u8::from(self.migreq) << 6) | ((self.pad & 3) << 4);
        b[2..4].copy_from_slice(&self.pkey.to_be_bytes());
        b[4] = (u8::from(self.fecn) << 7) | (u8::from(self.becn) << 6);
        b[5..8].copy_from_slice(&self.dest_qp.to_be_bytes()[1..]);
        b[8] = u8::from(self.ack_req) << 7;
        b[9..12].copy_from_slice(&self.psn.value().to_be_bytes()[1..]);
    }
}

/// The RDMA extended transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reth {
    /// Remote virtual address.
    pub va: u64,
    /// Remote key.
    pub rkey: u32,
    /// DMA length of the whole message.
    pub len: u32,
}

impl Reth {
    /// Decodes.
    pub fn parse(b: &[u8; RETH_LEN]) -> Reth {
        let mut va = [0; 8];
        va.copy_from_slice(&b[..8]);
        Reth {
            va: u64::from_be_bytes(va),
            rkey: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            len: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// Encodes.
    pub fn write(&self, b: &mut [u8; RETH_LEN]) {
        b[..8].copy_from_slice(&self.va.to_be_bytes());
        b[8..12].copy_from_slice(&self.rkey.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
    }
}

/// NAK codes (AETH syndrome `011xxxxx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NakCode {
    /// PSN sequence error.
    SequenceError,
    /// Invalid request.
    InvalidRequest,
    /// Remote access error.
    RemoteAccess,
    /// Remote operational error.
    RemoteOperational,
}

impl NakCode {
    const fn value(self) -> u8 {
        match self {
            NakCode::SequenceError => 0,
            NakCode::InvalidRequest => 1,
            NakCode::RemoteAccess => 2,
            NakCode::RemoteOperational => 3,
        }
    }
}

/// The meaning of an AETH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syndrome {
    /// Positive acknowledgement with a credit count (5 bits; `0x1F` =
    /// credits not limited).
    Ack {
        /// End-to-end credit count code.
        credits: u8,
    },
    /// Receiver not ready, with the minimal RNR NAK timer code (5 bits).
    Rnr {
        /// RNR timer code (IBA Table 45).
        timer: u8,
    },
    /// Negative acknowledgement.
    Nak(NakCode),
}

impl Syndrome {
    /// Decodes a syndrome byte; `None` for reserved encodings.
    pub const fn from_u8(b: u8) -> Option<Syndrome> {
        let low = b & 0x1F;
        Some(match b >> 5 {
            0b000 => Syndrome::Ack { credits: low },
            0b001 => Syndrome::Rnr { timer: low },
            0b011 => Syndrome::Nak(match low {
                0 => NakCode::SequenceError,
                1 => NakCode::InvalidRequest,
                2 => NakCode::RemoteAccess,
                3 => NakCode::RemoteOperational,
                _ => return None,
            }),
            _ => return None,
        })
    }

    /// Encodes.
    pub const fn to_u8(self) -> u8 {
        match self {
            Syndrome::Ack { credits } => credits & 0x1F,
            Syndrome::Rnr { timer } => 0x20 | (timer & 0x1F),
            Syndrome::Nak(code) => 0x60 | code.value(),
        }
    }
}

/// The ACK extended transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aeth {
    /// What is acknowledged.
    pub syndrome: Syndrome,
    /// Message sequence number (24 bits).
    pub msn: u32,
}

impl Aeth {
    /// Decodes; `None` for a reserved syndrome.
    pub fn parse(b: &[u8; AETH_LEN]) -> Option<Aeth> {
        Some(Aeth {
            syndrome: Syndrome::from_u8(b[0])?,
            msn: u32::from_be_bytes([0, b[1], b[2], b[3]]),
        })
    }

    /// Encodes.
    pub fn write(&self, b: &mut [u8; AETH_LEN]) {
        b[0] = self.syndrome.to_u8();
        b[1..].copy_from_slice(&self.msn.to_be_bytes()[1..]);
    }
}

/// The RNR NAK timer in microseconds for a 5-bit code (IBA Table 45).
pub const fn rnr_timer_micros(code: u8) -> u32 {
    const TABLE: [u32; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1_280, 1_920, 2_560,
        3_840, 5_120, 7_680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880,
        163_840, 245_760, 327_680, 491_520,
    ];
    TABLE[(code & 0x1F) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bth_round_trip() {
        let bth = Bth {
            opcode: Opcode::WriteLastImm,
            solicited: true,
            migreq: true,
            pad: 3,
            pkey: 0x8001,
            fecn: false,
            becn: true,
            dest_qp: 0xABCDEF,
            ack_req: true,
            psn: Psn::new(0x123456),
        };
        let mut b = [0; BTH_LEN];
        bth.write(&mut b);
        assert_eq!(
            b,
            [0x09, 0xF0, 0x80, 0x01, 0x40, 0xAB, 0xCD, 0xEF, 0x80, 0x12, 0x34, 0x56]
        );
        assert_eq!(Bth::parse(&b), Ok(bth));
        b[1] |= 1;
        assert_eq!(Bth::parse(&b), Err(BthError::Version));
        b[1] &= 0xF0;
        b[0] = 0x13; // compare & swap: not implemented
        assert_eq!(Bth::parse(&b), Err(BthError::Opcode));
    }

    #[test]
    fn opcode_table() {
        for b in 0..=0xFFu8 {
            let Some(op) = Opcode::from_u8(b) else {
                assert!(b > 0x11);
                continue;
            };
            assert_eq!(op as u8, b);
            let imm = op.has_imm();
            if matches!(
                op.kind(),
                OpKind::Send | OpKind::Write | OpKind::ReadResponse
            ) {
                assert_eq!(Opcode::for_message(op.kind(), op.position(), imm), op);
            }
        }
        assert_eq!(Opcode::WriteOnlyImm.ext_len(), RETH_LEN + IMM_LEN);
        assert_eq!(Opcode::ReadResponseMiddle.ext_len(), 0);
        assert_eq!(Opcode::ReadResponseFirst.ext_len(), AETH_LEN);
    }

    #[test]
    fn aeth_syndromes() {
        for b in 0..=0xFFu8 {
            if let Some(s) = Syndrome::from_u8(b) {
                assert_eq!(s.to_u8(), b);
            }
        }
        assert_eq!(Syndrome::from_u8(0x1F), Some(Syndrome::Ack { credits: 31 }));
        assert_eq!(
            Syndrome::from_u8(0x62),
            Some(Syndrome::Nak(NakCode::RemoteAccess))
        );
        assert_eq!(Syndrome::from_u8(0x64), None); // invalid RD request: not RC
        assert_eq!(Syndrome::from_u8(0x40), None); // reserved
        assert_eq!(rnr_timer_micros(0), 655_360);
        assert_eq!(rnr_timer_micros(14), 1_280);
    }
}
