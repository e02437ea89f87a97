//! `fractos`: the FractOS command-line tool.
//!
//! One module per subcommand under `cmd/`; add a variant to [`Command`] and a
//! module to grow it (e.g. `controller`, `demo`).

use clap::{Parser, Subcommand};

mod cmd;

/// FractOS: build appliance images, run appliances under QEMU, benchmark.
#[derive(Debug, Parser)]
#[command(name = "fractos", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build deployable images.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// Boot one appliance or a cluster under QEMU and follow its log until Ctrl-C.
    Up(cmd::up::UpArgs),
    /// Stop appliances left running by `fractos up`.
    Down(cmd::down::DownArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Image(c) => cmd::image::run(c),
        Command::Up(a) => cmd::up::run(a),
        Command::Down(a) => cmd::down::run(a),
        Command::Bench(c) => cmd::bench::run(c),
    }
}
