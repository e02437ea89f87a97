//! Deterministic FractOS cluster simulator.
//!
//! Many [`fractos_core::Controller`]s and simulated processes run inside one
//! OS thread under virtual time, in the style of turmoil/madsim and
//! quinn-proto's test `Pair`:
//!
//! * one seeded ChaCha RNG drives every random choice (workload, latency,
//!   faults), so a seed replays exactly;
//! * virtual time jumps to the next event (a frame delivery, a controller
//!   deadline, a process action, a fault); nothing reads a clock;
//! * events at the same instant run in insertion order; every collection
//!   whose iteration order affects behaviour is a `BTreeMap` or a `Vec`;
//! * network faults are rules applied to controller↔controller frames
//!   (latency + jitter, frame loss = connection reset, partitions, controller
//!   crash/restart); processes crash too;
//! * an oracle checks the cluster invariants after every step (see
//!   `README.md` and [`oracle`]).
//!
//! Entry points: [`run`] one seed with a [`SimConfig`]; [`run_seeds`] for a
//! range; the `fractos-sim` binary for the command line and the
//! 1,000-controller scale run.
#![forbid(unsafe_code)]

mod net;
pub mod oracle;
mod process;
mod sim;

use core::fmt;
use core::time::Duration;

pub use sim::Sim;

/// Parameters of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Controllers in the cluster (node ids 1..=controllers).
    pub controllers: usize,
    /// Processes attached to each controller (more join after a restart).
    pub procs_per_controller: usize,
    /// Operations each process issues at most.
    pub ops_per_process: usize,
    /// Size of the cluster name space processes publish into and look up.
    pub names: usize,
    /// Bytes of registered memory per process.
    pub mem_size: usize,
    /// Processes follow the scale script (publish, look up, invoke, copy)
    /// instead of the random workload.
    pub scripted: bool,
    /// Inject faults during the fault phase.
    pub faults: bool,
    /// Small per-process limits (handles, pending operations) so that
    /// `LimitReached` paths run.
    pub tight_limits: bool,
    /// Call `Controller::check_invariants` on every touched controller after
    /// every step.
    pub check_controllers: bool,
    /// Keep the last frames/events for failure reports.
    pub keep_trace: bool,
    /// Mean pause between two operations of one process.
    pub think: Duration,
    /// Processes stop issuing operations at this virtual time.
    pub stop_at: Duration,
    /// Controller timeouts.
    pub op_timeout: Duration,
    /// Heartbeat interval on idle links.
    pub heartbeat: Duration,
    /// Silence after which a link is declared lost.
    pub peer_timeout: Duration,
    /// Bytes per copy chunk.
    pub copy_chunk: usize,
    /// One-way base latency between controllers.
    pub latency: Duration,
    /// Gossip membership and links on demand (`Config::gossip`): links are
    /// dialled when a controller asks, idle ones close, and peers are
    /// declared dead by the failure detector instead of a full mesh.
    pub gossip: bool,
    /// Gossip protocol period.
    pub protocol_period: Duration,
    /// The `--scale` measurements (gossip only): after the workload, count
    /// the idle traffic for `idle_window`, then kill one controller for
    /// good and wait until every other one has confirmed it dead.
    pub measure: bool,
    /// Length of the idle traffic window of `measure`.
    pub idle_window: Duration,
    /// Whether some processes (half, chosen at random) have memory the
    /// driver serves directly (the copy engine's data-path seam: no
    /// MemRead/MemWrite frames), as shared-memory and RDMA channels will.
    pub direct_memory: bool,
}

impl SimConfig {
    /// The randomized configuration of a test seed: 1–8 controllers, 1–3
    /// processes each, faults on most seeds.
    pub fn for_seed(seed: u64) -> SimConfig {
        // Cheap mixing so neighbouring seeds get different shapes.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let controllers = 1 + (seed % 8) as usize;
        let procs = 1 + ((z >> 8) % 3) as usize;
        SimConfig {
            seed,
            controllers,
            procs_per_controller: procs,
            ops_per_process: 20 + ((z >> 16) % 40) as usize,
            names: 2 + ((z >> 24) % 8) as usize,
            mem_size: 64 * 1024,
            scripted: false,
            faults: !(z >> 32).is_multiple_of(5),
            tight_limits: (z >> 36).is_multiple_of(4),
            check_controllers: true,
            keep_trace: true,
            think: Duration::from_millis(4 + (z >> 40) % 20),
            stop_at: Duration::from_secs(3),
            // Short operation timeouts (below the peer timeout) let calls
            // time out on links that stay up, so late replies race them.
            op_timeout: Duration::from_millis([2000, 2000, 500, 250][(z >> 52) as usize % 4]),
            heartbeat: Duration::from_millis(200),
            peer_timeout: Duration::from_secs(1),
            // Small chunks on some seeds: long copies that outlast short
            // operation timeouts.
            copy_chunk: [4096, 4096, 4096, 256][(z >> 44) as usize % 4],
            latency: Duration::from_micros(200 + (z >> 48) % 800),
            direct_memory: (z >> 56).is_multiple_of(2),
            gossip: (z >> 58).is_multiple_of(2),
            protocol_period: Duration::from_millis(100),
            measure: false,
            idle_window: Duration::from_secs(2),
        }
    }

    /// The large fault-free run of the `--scale` benchmark (controller
    /// invariants checked after every step, as in the test seeds).
    pub fn scale(controllers: usize, ops_per_process: usize) -> SimConfig {
        SimConfig {
            seed: 1,
            controllers,
            procs_per_controller: 1,
            ops_per_process,
            names: controllers,
            mem_size: 16 * 1024,
            scripted: true,
            faults: false,
            tight_limits: false,
            check_controllers: true,
            keep_trace: false,
            think: Duration::from_millis(50),
            stop_at: Duration::from_secs(3),
            op_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(10),
            copy_chunk: 4096,
            latency: Duration::from_micros(500),
            direct_memory: false,
            gossip: true,
            protocol_period: Duration::from_millis(200),
            measure: true,
            idle_window: Duration::from_secs(2),
        }
    }

    /// The `--scale` run as it was before gossip: a full mesh of links with
    /// heartbeats (for comparison; `fractos-sim --scale N --mesh`).
    pub fn scale_mesh(controllers: usize, ops_per_process: usize) -> SimConfig {
        SimConfig {
            gossip: false,
            measure: false,
            ..SimConfig::scale(controllers, ops_per_process)
        }
    }
}

/// What a successful run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Controllers in the cluster.
    pub controllers: usize,
    /// Processes that attached (including those started after restarts).
    pub processes: usize,
    /// Operations issued by processes.
    pub operations: u64,
    /// Operations that completed successfully.
    pub succeeded: u64,
    /// Controller↔controller frames delivered.
    pub messages: u64,
    /// Process↔controller frames delivered.
    pub process_frames: u64,
    /// Virtual time at the end of the run, in nanoseconds.
    pub virtual_nanos: u64,
    /// Successful copies whose bytes were compared.
    pub copies_checked: u64,
    /// Monitors verified to have fired after their object died.
    pub monitors_checked: u64,
    /// Revokes that cut running copies and waited for their in-flight
    /// bytes (summed over every controller incarnation).
    pub revokes_held_for_copies: u64,
    /// Memory accesses served directly by the driver (no MemRead/MemWrite
    /// frames), for processes marked direct.
    pub direct_accesses: u64,
    /// Faults injected (resets, partitions, crashes, process crashes).
    pub faults: u64,
    /// Faults injected, by kind.
    pub fault_kinds: std::collections::BTreeMap<String, u64>,
    /// Hash chain over every delivered frame (time, endpoint, bytes).
    pub trace_hash: u64,
    /// Answers seen, by operation and result (`"Copy Ok"`, `"Invoke Revoked"`).
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Gossip runs: links dialled on demand (all controllers).
    pub dials: u64,
    /// Gossip runs: links closed idle by agreement (all controllers).
    pub idle_closes: u64,
    /// Gossip runs: most links one controller had open at once (sampled
    /// at every measurement check).
    pub max_links_per_controller: usize,
    /// `measure`: controller frames delivered during the idle window.
    pub idle_messages: u64,
    /// `measure`: live controllers during the idle window.
    pub idle_controllers: u64,
    /// `measure`: length of the idle window (virtual nanoseconds).
    pub idle_window_nanos: u64,
    /// `measure`: virtual nanoseconds from the kill of one controller until
    /// every other controller confirmed it dead.
    pub detection_nanos: Option<u64>,
    /// `measure`: the gossip protocol period (virtual nanoseconds).
    pub period_nanos: u64,
}

impl Report {
    /// `Err` describing the failures unless every operation issued
    /// succeeded (what a fault-free run such as `--scale` must show).
    pub fn all_succeeded(&self) -> Result<(), String> {
        if self.operations > 0 && self.succeeded == self.operations {
            return Ok(());
        }
        let failed: Vec<String> = self
            .outcomes
            .iter()
            .filter(|(k, _)| !k.ends_with(" Ok"))
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        Err(format!(
            "{} of {} operations succeeded; other outcomes: {}",
            self.succeeded,
            self.operations,
            if failed.is_empty() {
                "none recorded".to_string()
            } else {
                failed.join(", ")
            }
        ))
    }
}

/// A run that broke an invariant (or could not finish).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The configuration that failed.
    pub config: SimConfig,
    /// Virtual time of the violation, in nanoseconds.
    pub at_nanos: u64,
    /// What went wrong.
    pub message: String,
    /// The last events before the violation.
    pub trace_tail: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation seed {} failed at t={:.6}s: {}",
            self.seed,
            self.at_nanos as f64 / 1e9,
            self.message
        )?;
        writeln!(
            f,
            "  config: {} controllers x {} processes, {} ops each, faults={}",
            self.config.controllers,
            self.config.procs_per_controller,
            self.config.ops_per_process,
            self.config.faults
        )?;
        writeln!(
            f,
            "  replay: FRACTOS_SIM_SEED={} cargo test -p fractos-sim --test seeds replay -- --nocapture",
            self.seed
        )?;
        writeln!(
            f,
            "      or: cargo run -p fractos-sim -- --seed {}",
            self.seed
        )?;
        if !self.trace_tail.is_empty() {
            writeln!(f, "  last events:")?;
            for l in &self.trace_tail {
                writeln!(f, "    {l}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// Runs one simulation to completion and checks every invariant.
///
/// The run keeps no event trace; if it fails, the seed is replayed with the
/// trace on (runs are deterministic) to report the events that led there.
pub fn run(cfg: SimConfig) -> Result<Report, Box<Failure>> {
    let fast = SimConfig {
        keep_trace: false,
        ..cfg.clone()
    };
    match Sim::new(fast).run() {
        Ok(r) => Ok(r),
        Err(f) if cfg.keep_trace => match Sim::new(cfg).run() {
            Err(traced) if traced.message == f.message => Err(traced),
            _ => Err(f),
        },
        Err(f) => Err(f),
    }
}

/// Runs the test configuration of every seed in `seeds`; stops at the first
/// failure.
pub fn run_seeds(seeds: impl IntoIterator<Item = u64>) -> Result<Vec<Report>, Box<Failure>> {
    seeds
        .into_iter()
        .map(|s| run(SimConfig::for_seed(s)))
        .collect()
}
