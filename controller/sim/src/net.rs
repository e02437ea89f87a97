//! The simulated network between controllers: connections, endpoints and
//! the fault rules applied to every frame.
//!
//! A connection is a reliable ordered stream (TCP, RDMA RC, a shared-memory
//! ring), which is the transport contract of the controller core: frames
//! on one connection arrive in order or the connection breaks. Faults are
//! therefore rules over streams:
//!
//! * **delay**: base latency plus random jitter per frame; frames of one
//!   direction of one connection never overtake each other, frames on
//!   different connections do (a reply on B→A can overtake a request that
//!   went A→C→B);
//! * **loss**: a lost frame resets its connection (nothing after it is
//!   delivered either); both ends are told after a short delay and the pair
//!   re-dials;
//! * **partition**: frames across the cut are held until the heal (a stalled
//!   stream); if the cut lasts longer than the peer timeout, the heartbeat
//!   closes the link and the held frames are discarded with it;
//! * **crash**: a crashed controller's connections die; its peers learn it
//!   from a reset or only from their heartbeat timeout.

use std::collections::BTreeSet;

use fractos_core::LinkId;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One connection between two controllers.
pub(crate) struct Conn {
    /// Node indices of the two ends.
    pub nodes: [usize; 2],
    /// Endpoint ids at each end.
    pub eps: [LinkId; 2],
    /// Frames still flow.
    pub alive: bool,
    /// Delivery time of the last frame sent in each direction (from side i).
    pub last: [u64; 2],
}

/// One end of a connection, as a controller sees it.
pub(crate) struct Ep {
    pub node: usize,
    /// Incarnation of the controller owning the endpoint.
    pub inc: u64,
    pub conn: u64,
    /// Index of this end in its connection.
    pub side: usize,
    /// The controller has not closed nor been told of its closing.
    pub open: bool,
}

/// What happens to one frame.
pub(crate) enum Verdict {
    /// Deliver at this virtual time.
    Deliver(u64),
    /// The frame is lost: the connection resets.
    Reset,
}

/// The fault rules in force.
#[derive(Default)]
pub(crate) struct Rules {
    /// Faults are switched on.
    pub active: bool,
    /// Probability that a frame is lost (its connection resets).
    pub loss: f64,
    /// Largest extra delay per frame, in nanoseconds.
    pub jitter: u64,
    /// Nodes on one side of a partition, and when it heals.
    pub partition: Option<(BTreeSet<usize>, u64)>,
}

impl Rules {
    /// Whether `a` and `b` are on different sides of a partition.
    pub fn cut(&self, a: usize, b: usize) -> bool {
        self.partition
            .as_ref()
            .is_some_and(|(side, _)| side.contains(&a) != side.contains(&b))
    }

    /// The fate of a frame sent now from `from` to `to` on a connection
    /// whose last frame in that direction arrives at `last`.
    pub fn judge(
        &self,
        rng: &mut ChaCha8Rng,
        now: u64,
        latency: u64,
        from: usize,
        to: usize,
        last: u64,
    ) -> Verdict {
        if self.active && self.loss > 0.0 && rng.gen_bool(self.loss) {
            return Verdict::Reset;
        }
        let jitter = if self.active && self.jitter > 0 {
            rng.gen_range(0..=self.jitter)
        } else {
            0
        };
        let mut at = now + latency + jitter;
        if self.cut(from, to) {
            let heal = self.partition.as_ref().map_or(now, |p| p.1);
            at = at.max(heal + latency);
        }
        Verdict::Deliver(at.max(last))
    }
}
