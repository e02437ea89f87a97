//! `fractos`: the FractOS command-line tool.
//!
//! One module per subcommand under `cmd/`; add a variant to [`Command`] and a
//! module to grow it (e.g. `controller`, `demo`).

use clap::{Parser, Subcommand};

mod cmd;

/// FractOS: run controllers and the pipeline demo, build appliance images,
/// run appliances under QEMU, benchmark.
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
    /// Benchmarks: without a subcommand, invoke round trip and copy
    /// bandwidth through hosted controllers against raw TCP.
    Bench(cmd::bench::BenchArgs),
    /// Run a hosted controller (a FractOS node as a Linux process).
    Controller(cmd::controller::ControllerArgs),
    /// Run the storage -> compute -> client pipeline in three modes on an
    /// embedded 3-node cluster and compare traffic and latency.
    Demo(cmd::demo::DemoArgs),
    /// Print the attach token of a process name under a cluster key.
    Token(cmd::token::TokenArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Image(c) => cmd::image::run(c),
        Command::Up(a) => cmd::up::run(a),
        Command::Down(a) => cmd::down::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Controller(a) => cmd::controller::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Token(a) => cmd::token::run(a),
    }
}
