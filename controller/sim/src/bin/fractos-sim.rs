//! Command-line driver of the FractOS cluster simulator.
//!
//! ```text
//! fractos-sim [--seeds N] [--seed S] [--first S] [--controllers N] [--ops N]
//!             [--no-faults] [--outcomes] [--scale CONTROLLERS]
//! ```
//!
//! * `--seed S` replays one seed (with its test configuration unless
//!   `--controllers`/`--ops`/`--no-faults` override it) and prints its report;
//! * `--seeds N` runs N seeds starting at `--first` (default 0);
//! * `--scale N` runs one fault-free cluster of N controllers with one
//!   process each, checking every controller's invariants after every step,
//!   writes `target/bench/sim_scale.json` and fails (exit 1) unless every
//!   operation succeeded.
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
    scale: Option<usize>,
    outcomes: bool,
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
            "--scale" => a.scale = Some(val("--scale")? as usize),
            "--no-faults" => a.no_faults = true,
            "--outcomes" => a.outcomes = true,
            "-h" | "--help" => {
                return Err("usage: fractos-sim [--seeds N] [--seed S] [--first S] \
                     [--controllers N] [--ops N] [--no-faults] [--outcomes] [--scale CONTROLLERS]"
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
    c
}

fn scale(a: &Args, controllers: usize) -> ExitCode {
    let cfg = SimConfig::scale(controllers, a.ops.unwrap_or(8));
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
    let json = format!(
        "{{\"controllers\": {}, \"processes\": {}, \"operations\": {}, \"succeeded\": {}, \"all_succeeded\": {}, \"invariants_checked\": true, \"messages\": {}, \"process_frames\": {}, \"copies_checked\": {}, \"virtual_secs\": {:.3}, \"wall_secs\": {:.3}}}\n",
        r.controllers,
        r.processes,
        r.operations,
        r.succeeded,
        all_ok.is_ok(),
        r.messages,
        r.process_frames,
        r.copies_checked,
        r.virtual_nanos as f64 / 1e9,
        wall
    );
    print!("{json}");
    let dir = std::path::Path::new("target/bench");
    if let Err(e) = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join("sim_scale.json"), &json))
    {
        eprintln!("cannot write target/bench/sim_scale.json: {e}");
        return ExitCode::FAILURE;
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
    if let Some(n) = a.scale {
        return scale(&a, n);
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
