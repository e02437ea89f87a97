//! `fractos demo`: the verification pipeline in three modes on an embedded
//! 3-node cluster of hosted controllers with the reference adaptors.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fractos_adaptors::demo::{run_in, DemoConfig};
use fractos_adaptors::netns::{LinkModel, Netns};

/// Options of `fractos demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Verifications per mode.
    #[arg(long, default_value_t = 50)]
    pub requests: usize,
    /// Image side in pixels (an image is side² bytes).
    #[arg(long, default_value_t = 512)]
    pub image_side: usize,
    /// Distinct images in the store.
    #[arg(long, default_value_t = 8)]
    pub images: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Compute kernel pixel sampling stride per axis (1 = every pixel; the
    /// default 4 stands in for an accelerator so transfers matter).
    #[arg(long, default_value_t = 4)]
    pub stride: usize,
    /// Put each node in its own network namespace, joined by veth through a
    /// bridge with the link model below (needs root and iproute2).
    #[arg(long)]
    pub netns: bool,
    /// --netns: one-way delay per hop in microseconds (needs sch_netem).
    #[arg(long, default_value_t = 50)]
    pub delay_us: u32,
    /// --netns: bandwidth of each node's uplink in Mbit/s.
    #[arg(long, default_value_t = 1000)]
    pub rate_mbit: u32,
}

/// Runs `fractos demo`.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.requests > 0 && a.images > 0,
        "--requests and --images must be positive"
    );
    anyhow::ensure!(a.image_side >= 16, "--image-side must be at least 16");
    anyhow::ensure!(a.stride >= 1, "--stride must be at least 1");
    let cfg = DemoConfig {
        requests: a.requests,
        image_side: a.image_side,
        images: a.images,
        warmup: 3,
        stride: a.stride,
    };
    let net = if a.netns {
        let model = LinkModel {
            delay_us: a.delay_us,
            rate_mbit: a.rate_mbit,
        };
        Some(Netns::create(3, model).context("cannot set up network namespaces")?)
    } else {
        None
    };
    eprintln!(
        "FractOS pipeline demo: storage (node 1) -> compute (node 2) -> client (node 3), hosted controllers{}",
        if a.netns { " in network namespaces" } else { " on loopback" }
    );
    let mut last = String::new();
    let report = run_in(&cfg, net.as_ref(), |mode, done, total| {
        let line = format!(
            "\r  {mode:<12} {done:>5}/{total} [{}{}]",
            "#".repeat(done * 30 / total),
            " ".repeat(30 - done * 30 / total)
        );
        if line != last {
            eprint!("{line}");
            let _ = std::io::stderr().flush();
            last = line;
        }
        if done == total {
            eprintln!();
        }
    })
    .context("the demo failed")?;
    println!();
    print!("{}", report.table());
    if let Some(path) = a.json {
        std::fs::write(&path, report.to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
