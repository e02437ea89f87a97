//! Why packets were dropped, what was NAK'd, and the engine's other counts.

macro_rules! reason_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[doc = $d:literal])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        $vis enum $name { $($(#[doc = $d])* $v,)* }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            /// The number of values.
            pub const COUNT: usize = Self::ALL.len();

            /// A short stable name (for metrics labels).
            pub const fn name(self) -> &'static str {
                match self { $($name::$v => $s,)* }
            }
        }
    };
}

reason_enum! {
    /// Why a received frame was dropped without effect on any queue pair.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum DropReason {
        /// The frame ends inside a header, or before the lengths it declares.
        Truncated => "truncated",
        /// The destination MAC is neither ours nor (for ARP) broadcast.
        NotOurMac => "not_our_mac",
        /// An EtherType other than IPv4 or ARP (VLAN tags are not supported).
        EtherType => "ether_type",
        /// An ARP packet that is not Ethernet/IPv4 request or reply.
        ArpMalformed => "arp_malformed",
        /// An ARP request for another host's address.
        ArpNotForUs => "arp_not_for_us",
        /// Not IPv4, or a header length below 20 bytes.
        IpHeader => "ip_header",
        /// IPv4 options are present (RoCEv2 packets never carry them).
        IpOptions => "ip_options",
        /// The IPv4 header checksum is wrong.
        IpChecksum => "ip_checksum",
        /// A fragment (RoCEv2 packets are never fragmented).
        IpFragment => "ip_fragment",
        /// The IPv4 protocol is not UDP.
        NotUdp => "not_udp",
        /// The destination IPv4 address is not ours.
        NotOurIp => "not_our_ip",
        /// The UDP length disagrees with the IPv4 length.
        UdpLength => "udp_length",
        /// A non-zero UDP checksum is wrong.
        UdpChecksum => "udp_checksum",
        /// The UDP destination port is not 4791.
        NotRocePort => "not_roce_port",
        /// The invariant CRC is wrong.
        BadIcrc => "bad_icrc",
        /// BTH transport header version is not 0.
        BthVersion => "bth_version",
        /// An opcode this engine does not implement (UC, RD, UD, atomics,
        /// send with invalidate, CNP, vendor opcodes).
        UnsupportedOpcode => "unsupported_opcode",
        /// The pad count or the length of payload plus pad is inconsistent.
        BadLength => "bad_length",
        /// No queue pair with the destination QPN exists.
        UnknownQp => "unknown_qp",
        /// The packet does not come from the address the QP is connected to.
        WrongSource => "wrong_source",
        /// The partition key does not match the QP's.
        BadPkey => "bad_pkey",
        /// The QP is not in a state that receives (RESET, INIT, ERROR).
        QpState => "qp_state",
        /// A request after a sequence-error NAK, before the expected PSN
        /// arrives again (silently dropped, IBA C9-?: one NAK per error).
        OutOfSequence => "out_of_sequence",
        /// A duplicate READ request the responder cannot serve now (its
        /// rkey is no longer valid or its response ring is full).
        DuplicateRead => "duplicate_read",
        /// A response (ACK, NAK, READ response) with a PSN outside the
        /// outstanding window, or one that matches no outstanding request.
        StaleResponse => "stale_response",
        /// A response whose AETH syndrome is reserved or whose length is
        /// wrong for its position in the READ.
        BadResponse => "bad_response",
        /// A request opcode arriving at a requester or a response at a
        /// responder-only state (e.g. READ response with no READ).
        UnexpectedOpcode => "unexpected_opcode",
    }
}

reason_enum! {
    /// Kinds of negative acknowledgement (AETH syndromes), sent or received.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum NakKind {
        /// PSN sequence error (the responder expects an earlier PSN).
        SequenceError => "sequence_error",
        /// Invalid request (bad opcode sequence, length error).
        InvalidRequest => "invalid_request",
        /// Remote access error (rkey, bounds, access rights).
        RemoteAccess => "remote_access",
        /// Remote operational error (the responder's memory failed).
        RemoteOperational => "remote_operational",
        /// Receiver not ready: no receive buffer posted.
        Rnr => "rnr",
    }
}

/// The engine's counters. Read them with [`crate::Engine::counters`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames handed to [`crate::Engine::receive`].
    pub rx_frames: u64,
    /// RoCE packets accepted for a queue pair (after all checks).
    pub rx_packets: u64,
    /// Frames produced by [`crate::Engine::poll_transmit`].
    pub tx_frames: u64,
    /// Drops by reason, indexed by `DropReason as usize`.
    pub drops: [u64; DropReason::COUNT],
    /// NAKs sent by kind, indexed by `NakKind as usize`.
    pub naks_sent: [u64; NakKind::COUNT],
    /// NAKs received by kind, indexed by `NakKind as usize`.
    pub naks_received: [u64; NakKind::COUNT],
    /// Plain acknowledgements sent (coalesced).
    pub acks_sent: u64,
    /// Duplicate requests received (re-acknowledged or re-executed).
    pub duplicates: u64,
    /// Request packets sent again (go-back-N after a timeout or a NAK).
    pub retransmits: u64,
    /// Retransmission timeouts that fired.
    pub timeouts: u64,
    /// ARP requests sent.
    pub arp_requests: u64,
    /// ARP replies sent.
    pub arp_replies: u64,
    /// Completions lost because a completion queue was full.
    pub cq_overflows: u64,
}

impl Counters {
    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// All drops.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// NAKs of one kind sent.
    pub fn nak_sent(&self, kind: NakKind) -> u64 {
        self.naks_sent[kind as usize]
    }

    /// NAKs of one kind received.
    pub fn nak_received(&self, kind: NakKind) -> u64 {
        self.naks_received[kind as usize]
    }

    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }
}
