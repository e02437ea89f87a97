//! `fractos demo`: the verification pipeline in three modes on an embedded
//! 3-node cluster of hosted controllers with the reference adaptors.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fractos_adaptors::demo::{run as run_demo, DemoConfig};

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
}

/// Runs `fractos demo`.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.requests > 0 && a.images > 0,
        "--requests and --images must be positive"
    );
    anyhow::ensure!(a.image_side >= 16, "--image-side must be at least 16");
    let cfg = DemoConfig {
        requests: a.requests,
        image_side: a.image_side,
        images: a.images,
        warmup: 3,
    };
    eprintln!(
        "FractOS pipeline demo: storage (node 1) -> compute (node 2) -> client (node 3), hosted controllers on loopback"
    );
    let mut last = String::new();
    let report = run_demo(&cfg, |mode, done, total| {
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
