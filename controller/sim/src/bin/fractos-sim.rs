//! Command-line driver of the FractOS cluster simulator.
//!
//! ```text
//! fractos-sim [--seeds N] [--seed S] [--first S] [--controllers N] [--ops N]
//!             [--no-faults] [--outcomes] [--mesh] [--gossip]
//!             [--scale CONTROLLERS[,CONTROLLERS...]]
//! ```
//!
//! * `--seed S` replays one seed (with its test configuration unless
//!   `--controllers`/`--ops`/`--no-faults` override it) and prints its report;
//! * `--seeds N` runs N seeds starting at `--first` (default 0);
//! * `--scale N` runs one fault-free cluster of N controllers with one
//!   process each, checking every controller's invariants after every step,
//!   writes `target/bench/sim_scale.json` and fails (exit 1) unless every
//!   operation succeeded. The cluster uses gossip membership and links on
//!   demand; after the workload it measures the idle traffic, kills one
//!   controller and measures how long until every other one confirmed it
//!   dead. `--scale 1000,10000` runs each size in its own process (so each
//!   has its own peak memory) and writes them side by side. `--mesh`
//!   runs the old full mesh of links instead.
//! * `--gossip` / `--mesh` force gossip on or off for `--seed(s)`.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Instant;

use fractos_sim::{run, SimConfig};

struct Args {
    seeds: Option<u64>,
    seed: Option<u64>,
    first: u64,
    controllers: Option<usize>,
    ops: Option<usize>,
    no_faults: bool,
    scale: Option<Vec<usize>>,
    outcomes: bool,
    mesh: bool,
    gossip: bool,
    /// `--scale`: print the JSON without writing the file (the parent of a
    /// multi-size run writes it).
    print_only: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seeds: None,
        seed: None,
        first: 0,
        controllers: None,
        ops: None,
        no_faults: false,
        scale: None,
        outcomes: false,
        mesh: false,
        gossip: false,
        print_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse::<u64>().map_err(|e| format!("{name} {v}: {e}"))
        };
        match arg.as_str() {
            "--seeds" => a.seeds = Some(val("--seeds")?),
            "--seed" => a.seed = Some(val("--seed")?),
            "--first" => a.first = val("--first")?,
            "--controllers" => a.controllers = Some(val("--controllers")? as usize),
            "--ops" => a.ops = Some(val("--ops")? as usize),
            "--scale" => {
                let v = it.next().ok_or("--scale needs a value")?;
                let sizes: Result<Vec<usize>, String> = v
                    .split(',')
                    .map(|s| s.parse::<usize>().map_err(|e| format!("--scale {v}: {e}")))
                    .collect();
                a.scale = Some(sizes?);
            }
            "--mesh" => a.mesh = true,
            "--gossip" => a.gossip = true,
            "--no-faults" => a.no_faults = true,
            "--outcomes" => a.outcomes = true,
            "--print-only" => a.print_only = true,
            "-h" | "--help" => {
                return Err("usage: fractos-sim [--seeds N] [--seed S] [--first S] \
                     [--controllers N] [--ops N] [--no-faults] [--outcomes] [--mesh] [--gossip] \
                     [--scale CONTROLLERS[,CONTROLLERS...]]"
                    .into())
            }
            other => return Err(format!("unknown argument {other}; try --help")),
        }
    }
    Ok(a)
}

fn config(a: &Args, seed: u64) -> SimConfig {
    let mut c = SimConfig::for_seed(seed);
    if let Some(n) = a.controllers {
        c.controllers = n.max(1);
    }
    if let Some(n) = a.ops {
        c.ops_per_process = n;
    }
    if a.no_faults {
        c.faults = false;
    }
    if a.mesh {
        c.gossip = false;
    }
    if a.gossip {
        c.gossip = true;
    }
    c
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs each size in a child process (its own peak memory) and writes the
/// results side by side.
fn scale_many(a: &Args, sizes: &[usize]) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find this program to run each size: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runs = Vec::new();
    for n in sizes {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--scale").arg(n.to_string()).arg("--print-only");
        if let Some(ops) = a.ops {
            cmd.arg("--ops").arg(ops.to_string());
        }
        if a.mesh {
            cmd.arg("--mesh");
        }
        let out = match cmd.stderr(std::process::Stdio::inherit()).output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("cannot run the scale run of {n} controllers: {e}");
                return ExitCode::FAILURE;
            }
        };
        if !out.status.success() {
            eprintln!("the scale run of {n} controllers failed");
            return ExitCode::FAILURE;
        }
        runs.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let json = format!("{{\"runs\": [\n  {}\n]}}\n", runs.join(",\n  "));
    print!("{json}");
    write_json(&json)
}

fn write_json(json: &str) -> ExitCode {
    let dir = std::path::Path::new("target/bench");
    if let Err(e) =
        std::fs::create_dir_all(dir).and_then(|()| std::fs::write(dir.join("sim_scale.json"), json))
    {
        eprintln!("cannot write target/bench/sim_scale.json: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn scale(a: &Args, controllers: usize, print_only: bool) -> ExitCode {
    let cfg = if a.mesh {
        SimConfig::scale_mesh(controllers, a.ops.unwrap_or(8))
    } else {
        SimConfig::scale(controllers, a.ops.unwrap_or(8))
    };
    let gossip = cfg.gossip;
    let t = Instant::now();
    let r = match run(cfg) {
        Ok(r) => r,
        Err(f) => {
            eprintln!("{f}");
            return ExitCode::FAILURE;
        }
    };
    let wall = t.elapsed().as_secs_f64();
    for (outcome, n) in &r.outcomes {
        eprintln!("{n:>8} {outcome}");
    }
    let all_ok = r.all_succeeded();
    let idle_rate = if r.idle_controllers > 0 && r.idle_window_nanos > 0 {
        r.idle_messages as f64 / r.idle_controllers as f64 / (r.idle_window_nanos as f64 / 1e9)
    } else {
        0.0
    };
    let (det_ms, det_periods) = match r.detection_nanos {
        Some(d) => (
            format!("{:.1}", d as f64 / 1e6),
            format!("{:.1}", d as f64 / r.period_nanos.max(1) as f64),
        ),
        None => ("null".into(), "null".into()),
    };
    let peak = peak_rss().map_or("null".into(), |b| b.to_string());
    let json = format!(
        "{{\"controllers\": {}, \"gossip\": {gossip}, \"processes\": {}, \"operations\": {}, \"succeeded\": {}, \"all_succeeded\": {}, \"invariants_checked\": true, \"messages\": {}, \"process_frames\": {}, \"copies_checked\": {}, \"dials\": {}, \"idle_closes\": {}, \"max_links_per_controller\": {}, \"idle_window_secs\": {:.3}, \"idle_messages\": {}, \"idle_msgs_per_controller_per_sec\": {:.3}, \"protocol_period_ms\": {:.1}, \"failure_detection_ms\": {det_ms}, \"failure_detection_periods\": {det_periods}, \"peak_rss_bytes\": {peak}, \"virtual_secs\": {:.3}, \"wall_secs\": {:.3}}}\n",
        r.controllers,
        r.processes,
        r.operations,
        r.succeeded,
        all_ok.is_ok(),
        r.messages,
        r.process_frames,
        r.copies_checked,
        r.dials,
        r.idle_closes,
        r.max_links_per_controller,
        r.idle_window_nanos as f64 / 1e9,
        r.idle_messages,
        idle_rate,
        r.period_nanos as f64 / 1e6,
        r.virtual_nanos as f64 / 1e9,
        wall
    );
    print!("{json}");
    if !print_only {
        let code = write_json(&json);
        if code != ExitCode::SUCCESS {
            return code;
        }
    }
    if let Err(e) = all_ok {
        eprintln!("scale run failed: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(sizes) = &a.scale {
        return match sizes.as_slice() {
            [n] => scale(&a, *n, a.print_only),
            many => scale_many(&a, many),
        };
    }
    let seeds: Vec<u64> = match (a.seed, a.seeds) {
        (Some(s), _) => vec![s],
        (None, Some(n)) => (a.first..a.first + n).collect(),
        (None, None) => (a.first..a.first + 100).collect(),
    };
    let t = Instant::now();
    let mut all = std::collections::BTreeMap::new();
    let (mut ops, mut msgs, mut copies, mut checked, mut faults, mut mons) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for s in &seeds {
        match run(config(&a, *s)) {
            Ok(r) => {
                ops += r.operations;
                msgs += r.messages;
                copies += r.outcomes.get("Copy Ok").copied().unwrap_or(0);
                checked += r.copies_checked;
                faults += r.faults;
                mons += r.monitors_checked;
                for (k, v) in &r.outcomes {
                    *all.entry(k.clone()).or_insert(0u64) += v;
                }
                if seeds.len() == 1 {
                    println!("{r:#?}");
                }
            }
            Err(f) => {
                eprintln!("{f}");
                return ExitCode::FAILURE;
            }
        }
    }
    let wall = t.elapsed().as_secs_f64();
    if a.outcomes {
        for (k, v) in &all {
            println!("{v:>10} {k}");
        }
    }
    println!(
        "{} seeds passed: {ops} operations, {msgs} controller messages, {faults} faults, \
         {checked} of {copies} successful copies compared byte for byte, \
         {mons} monitor notifications verified, in {wall:.2}s ({:.0} seeds/s)",
        seeds.len(),
        seeds.len() as f64 / wall
    );
    ExitCode::SUCCESS
}
