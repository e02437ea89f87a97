//! The FractOS controller core: a sans-IO state machine.
//!
//! The core owns every object its attached processes create, keeps each
//! process's capability table, validates every capability use, and talks to
//! peer controllers. It performs no I/O and reads no clock: the driver (the
//! unikernel event loop, the hosted Linux controller, the deterministic
//! simulator) feeds it inputs and polls outputs, in the style of quinn-proto
//! and smoltcp:
//!
//! * inputs: [`Controller::process_connected`], [`Controller::process_message`],
//!   [`Controller::process_disconnected`], [`Controller::link_connected`],
//!   [`Controller::link_message`], [`Controller::link_disconnected`],
//!   [`Controller::handle_timeout`] — each with the current [`Instant`];
//! * outputs: [`Controller::poll_output`] (frames to send, channels to close)
//!   until it returns `None`, then [`Controller::poll_timeout`] for the next
//!   deadline at which `handle_timeout` must be called;
//! * data path (optional, see below): [`Controller::poll_mem_access`] out,
//!   [`Controller::mem_read_done`] and [`Controller::mem_write_done`] in.
//!
//! Message bodies are passed without their length prefix: the driver splits
//! byte streams with [`fractos_wire::FrameSplitter`]. Outgoing frames are
//! complete (with prefix).
//!
//! # Data path
//!
//! Copies move bytes in chunks read from the source owner's process and
//! written into the destination owner's process. By default the core asks
//! the process (`MemRead` / `MemWrite` messages on its channel). A driver
//! that can reach a process's memory itself (shared memory it maps, an
//! RDMA memory region) calls [`Controller::set_direct_memory`] for its
//! channel; the chunks are then handed to the driver by
//! [`Controller::poll_mem_access`] as [`MemAccess`]es, and it reports each
//! with [`Controller::mem_read_done`] / [`Controller::mem_write_done`]. The
//! core validates both capabilities of the copy for every chunk either way.
//!
//! # Module layering
//!
//! The controller is one state machine over subsystems that own their
//! state, take what they must read as arguments and return their effects
//! for the controller to apply (each is unit-tested on its own):
//!
//! ```text
//! controller   Controller: channels, links, handshake, operations, timers;
//!  │           applies the subsystems' effects in order
//!  ├─ copy     CopyEngine: sources, sinks, memory transfers, revoke barriers
//!  ├─ names    NameService: names homed here, waiting lookups, published lists
//!  ├─ caps     CapStore: objects and derivation trees (returns Fallout)
//!  ├─ effects  Origin, Timer, Effect: what copy and names ask for
//!  ├─ auth     handshake proofs, sealed sessions, process tokens
//!  ├─ table    per-process handle tables
//!  └─ metrics, prometheus
//! ```
//!
//! `copy` and `names` depend on `effects` (and `copy` reads `caps`), never
//! on `controller` or on each other.
//!
//! # Semantics decided here
//!
//! * Every capability is a node of its object's derivation tree at the
//!   owner controller. Handing a capability to someone else (invoke
//!   arguments, bound arguments, lookup results) derives a child, so each
//!   handle is exactly one node and revoking a received capability never
//!   affects the giver's.
//! * `revoke(h)` invalidates `h`'s node and its whole subtree. Revoking an
//!   object's root kills the object. Validation happens only at the owner, so
//!   once a revoke has completed no later operation can pass through a
//!   revoked node anywhere in the cluster.
//! * A revoke that cuts running copies (their source or destination is in
//!   the revoked subtree) completes only once their in-flight chunks are
//!   acknowledged and their issued writes answered, so after it no chunk of
//!   those copies is written anywhere and they fail `Revoked`; if the
//!   in-flight bytes cannot settle it answers `Timeout`.
//! * Peer links authenticate with a handshake bound to both identities,
//!   incarnations, nonces and roles, then seal every frame (see the `auth`
//!   module and [`PeerSecurity`]).
//! * `copy(src, dst)` moves `len(src)` bytes into the start of `dst`; `dst`
//!   shorter than `src` fails with `SizeMismatch` before any byte moves.
//!   Bytes stream in bounded chunks from the source owner's process straight
//!   to the destination owner's process. The optional completion Request is
//!   invoked (without arguments) after the last byte is written; the copy
//!   operation completes with that invocation's result.
//! * A process exiting revokes every object it owns (firing monitors),
//!   releases every capability it holds and withdraws its published names.
//!   Nothing it created outlives it: its monitor registrations are dropped
//!   (without firing) at every owner it registered at
//!   ([`fractos_wire::PeerMsg::MonitorsDrop`]) and its waiting lookups are
//!   cancelled at the names' homes ([`fractos_wire::PeerMsg::LookupCancel`]).
//! * A monitor registration is identified at the owner by the watcher's
//!   node and process; an owner accepts at most
//!   [`Limits::max_monitors_per_process`] registrations of one watcher
//!   (`LimitReached`); a registration that fired frees its slot.
//! * A process may have at most [`Limits::max_names_per_process`] names
//!   published or being published (`LimitReached`). Unpublish removes the
//!   name from the process's list at once, unless a publish of it is still
//!   in flight (that publish may still land, and exit must withdraw it). A
//!   waiting lookup is a pending operation and counts against
//!   [`Limits::max_pending_per_process`].
//! * Loss of a peer controller fails pending operations on it with
//!   `PeerUnreachable` and releases the capabilities its processes held here;
//!   the names its processes published here, their waiting lookups and their
//!   monitor registrations here are dropped too (their exits might never be
//!   reported).
//!   References carrying an old incarnation fail with `OwnerGone`.
//! * A `Timeout` error means the outcome is unknown (the operation may have
//!   happened at the owner).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod auth;
mod caps;
mod controller;
mod copy;
mod effects;
mod membership;
mod metrics;
mod names;
pub mod prometheus;
mod table;

pub use auth::process_token;
pub use controller::{CapDebug, Controller};
pub use membership::Gossip;
pub use metrics::{Metrics, OpKind, LATENCY_BUCKETS};
pub use prometheus::{LinkTraffic, Traffic};

use core::time::Duration;

use fractos_wire::NodeId;
pub use fractos_wire::{MemberState, PeerSecurity};

slotmap::new_key_type! {
    /// Key of an attached process.
    pub struct ProcessKey;
    /// Key of an object owned by this controller.
    pub struct ObjectKey;
    /// Key of a capability node owned by this controller.
    pub struct CapKey;
    /// Key of a monitor registration.
    pub struct MonitorKey;
}

/// A point in time, in nanoseconds since an arbitrary epoch chosen by the
/// driver. Only differences matter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    /// `self + d`, saturating.
    pub fn after(self, d: Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

/// A process channel, numbered by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelId(pub u64);

/// A controller-to-controller link, numbered by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u64);

/// Resource limits enforced by the core.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Handles one process may hold.
    pub max_caps_per_process: usize,
    /// Operations one process may have in flight.
    pub max_pending_per_process: usize,
    /// Processes attached at once.
    pub max_processes: usize,
    /// Largest frame body accepted from a process or peer.
    pub max_message_len: usize,
    /// Monitors one process may have registered at one owner controller
    /// (enforced by the owner of the watched capabilities).
    pub max_monitors_per_process: usize,
    /// Names one process may have published (or be publishing) at once.
    pub max_names_per_process: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_caps_per_process: 1 << 20,
            max_pending_per_process: 4096,
            max_processes: 1024,
            max_message_len: fractos_wire::MAX_FRAME_LEN,
            max_monitors_per_process: 4096,
            max_names_per_process: 1024,
        }
    }
}

/// Controller configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// This controller's cluster-unique id.
    pub node: NodeId,
    /// Changes every time the controller starts (e.g. boot time or random);
    /// peers use it to detect restarts.
    pub incarnation: u64,
    /// Shared secret of the cluster: authenticates controllers to each other
    /// and derives process tokens (see [`process_token`]).
    pub cluster_key: [u8; 32],
    /// Every controller of the cluster, including this one. Names are homed
    /// on a member chosen by hashing the name. With [`Config::gossip`] the
    /// list is the initial membership view (and, if short, the seeds the
    /// controller joins through); controllers not listed may join.
    pub members: alloc::vec::Vec<NodeId>,
    /// Limits.
    pub limits: Limits,
    /// How long a request to a peer may stay unanswered.
    pub op_timeout: Duration,
    /// Interval of heartbeats on idle links.
    pub heartbeat_interval: Duration,
    /// A link silent for this long is declared lost.
    pub peer_timeout: Duration,
    /// Bytes per copy chunk.
    pub copy_chunk: usize,
    /// Copy chunks in flight per copy.
    pub copy_window: usize,
    /// Seed for handshake nonces: 32 bytes from the host's cryptographic
    /// RNG (`getrandom` on Linux, RDSEED/RDRAND in the appliance). The core
    /// mixes it with the cluster key, so nonces stay unpredictable to anyone
    /// without the key even if the seed is weak. [`Config::new`] leaves it
    /// zero: drivers must fill it.
    pub rng_seed: [u8; 32],
    /// The protection this controller requires on peer links (the stronger
    /// of both sides' requirements is used on each link).
    pub peer_security: PeerSecurity,
    /// Gossip membership and links on demand. `None` (the default of
    /// [`Config::new`]): the driver keeps a link to every member and a
    /// peer is lost when its link is. `Some`: the core asks the driver for
    /// links when it needs them ([`Output::Connect`]), closes idle ones,
    /// and learns which members are alive or dead from a SWIM-style
    /// failure detector (see [`Gossip`]).
    pub gossip: Option<Gossip>,
}

impl Config {
    /// A configuration with default limits and timeouts.
    pub fn new(node: NodeId, incarnation: u64, cluster_key: [u8; 32]) -> Self {
        Self {
            node,
            incarnation,
            cluster_key,
            members: alloc::vec![node],
            limits: Limits::default(),
            op_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_millis(500),
            peer_timeout: Duration::from_secs(3),
            copy_chunk: 64 * 1024,
            copy_window: 8,
            rng_seed: [0; 32],
            peer_security: PeerSecurity::Authenticated,
            gossip: None,
        }
    }
}

/// Where an output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dest {
    /// A process channel.
    Process(ChannelId),
    /// A peer link.
    Link(LinkId),
}

/// Why the core asks the driver to close a channel or link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Undecodable or out-of-order input.
    Malformed,
    /// Authentication failed.
    AuthFailed,
    /// Protocol version mismatch.
    VersionMismatch,
    /// Too many processes.
    LimitReached,
    /// The peer stayed silent past the peer timeout.
    PeerTimeout,
    /// Another link to the same peer is in use.
    Duplicate,
    /// A peer frame failed its integrity check after the handshake
    /// (rewritten, injected, replayed or reordered on the way).
    IntegrityFailed,
    /// Both sides agreed to close an idle link (nothing was in flight);
    /// it is opened again when needed.
    Idle,
    /// The membership confirmed the peer dead (or restarted).
    PeerDead,
}

/// Which side of a new peer link this controller is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkRole {
    /// This controller dialled `peer`: it opens the handshake and refuses
    /// any other node.
    Initiator {
        /// The node this controller meant to reach.
        peer: NodeId,
    },
    /// This controller accepted the connection.
    Responder,
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send a complete frame.
    Send {
        /// Destination.
        to: Dest,
        /// Frame bytes, length prefix included.
        frame: alloc::vec::Vec<u8>,
    },
    /// Close a channel or link. The core has already forgotten it; the
    /// driver must not report its disconnection.
    Close {
        /// Which.
        to: Dest,
        /// Why.
        reason: CloseReason,
    },
    /// Dial `peer` (only with [`Config::gossip`]) and report the new link
    /// with [`Controller::link_connected`] as
    /// [`LinkRole::Initiator`], or the failure with
    /// [`Controller::dial_failed`].
    Connect {
        /// The controller to reach.
        peer: NodeId,
    },
}

/// A memory access the driver performs itself, for a process whose memory
/// it can reach directly (see [`Controller::set_direct_memory`]). Addresses
/// are absolute in the process's registered memory, as in the `MemRead` /
/// `MemWrite` messages sent to other processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemAccess {
    /// Read `len` bytes at `addr`; answer with [`Controller::mem_read_done`].
    Read {
        /// The process's channel.
        chan: ChannelId,
        /// Transfer id, to pass back.
        xfer: u64,
        /// Start address.
        addr: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Write `data` at `addr`; answer with [`Controller::mem_write_done`].
    Write {
        /// The process's channel.
        chan: ChannelId,
        /// Transfer id, to pass back.
        xfer: u64,
        /// Start address.
        addr: u64,
        /// Bytes to write.
        data: alloc::vec::Vec<u8>,
    },
}

impl MemAccess {
    /// The channel of the process whose memory is accessed.
    pub fn chan(&self) -> ChannelId {
        match self {
            MemAccess::Read { chan, .. } | MemAccess::Write { chan, .. } => *chan,
        }
    }
}

/// A write into a directly reachable process's memory that the driver's
/// own device performs (DMA into a shared-memory slot), granted by
/// [`Controller::device_write_begin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceWrite {
    /// Grant id, for [`Controller::device_write_valid`] and
    /// [`Controller::device_write_end`].
    pub id: u64,
    /// Channel of the process whose memory is written.
    pub chan: ChannelId,
    /// Start address in that process's registered memory.
    pub addr: u64,
}

/// The state of the gossip membership and of on-demand links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MembershipStats {
    /// Members believed alive or suspect (this controller included).
    pub live: usize,
    /// Members in the view (this controller excluded).
    pub known: usize,
    /// Links open (authenticated or in handshake).
    pub links: usize,
    /// Dials in progress.
    pub dials: usize,
    /// Frames other than gossip waiting for a link.
    pub queued: usize,
    /// Membership facts waiting to be gossiped.
    pub gossip_queue: usize,
    /// Members this controller confirmed dead itself.
    pub confirmed_dead: u64,
    /// Probes sent (direct and indirect).
    pub probes_sent: u64,
    /// Links opened by dialling.
    pub dials_started: u64,
    /// Idle links closed by agreement.
    pub idle_closed: u64,
}

/// Counts of what the controller holds, for metrics and invariant checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Attached processes.
    pub processes: usize,
    /// Objects owned here.
    pub objects: usize,
    /// Capability nodes owned here.
    pub caps: usize,
    /// Handles in all process tables.
    pub handles: usize,
    /// Names homed here.
    pub names: usize,
    /// Name lookups waiting here.
    pub name_waiters: usize,
    /// Requests to peers awaiting replies.
    pub calls: usize,
    /// Copies being sent from here.
    pub copy_sources: usize,
    /// Copies being received here.
    pub copy_sinks: usize,
    /// Monitor registrations.
    pub monitors: usize,
    /// Authenticated peer links.
    pub peers: usize,
    /// Operations in flight for local processes.
    pub pending_ops: usize,
    /// Most operations in flight for one local process.
    pub pending_ops_max: usize,
    /// Most monitor registrations here made by one process (local or
    /// remote).
    pub monitors_max_per_watcher: usize,
    /// Names local processes have published or are publishing.
    pub published_names: usize,
    /// Most names published (or being published) by one local process.
    pub published_names_max: usize,
    /// Waiting lookups of local processes (wherever the names are homed).
    pub waiting_lookups: usize,
    /// Most waiting lookups of one local process.
    pub waiting_lookups_max: usize,
}
