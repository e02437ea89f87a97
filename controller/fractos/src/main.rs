//! `fractos`: the FractOS command-line tool.
//!
//! One module per subcommand under `cmd/`; add a variant to [`Command`] and a
//! module to grow it (e.g. `controller`, `demo`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

mod cmd;

/// FractOS: run controllers and the pipeline demo, build appliance images,
/// run appliances under QEMU, benchmark.
#[derive(Debug, Parser)]
#[command(name = "fractos", version, about)]
struct Cli {
    /// Also write the JSON of every benchmark and demo into this results
    /// directory (`bench.json`, `bench-appliance.json`, `bench-nvme.json`,
    /// `bench-boot.json`, `demo-<controllers>.json`), for `fractos report`.
    #[arg(long, global = true, env = "FRACTOS_RESULTS")]
    results: Option<PathBuf>,
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
    /// Stop appliances left running by `fractos up` and forget the cluster.
    Down(cmd::down::DownArgs),
    /// Show every node of the cluster `fractos up` recorded: up or down,
    /// address, processes, objects, capability nodes, bytes copied, uptime.
    Status(cmd::status::StatusArgs),
    /// Benchmarks: without a subcommand, invoke round trip and copy
    /// bandwidth through hosted controllers against raw TCP.
    Bench(cmd::bench::BenchArgs),
    /// Run a hosted controller (a FractOS node as a Linux process).
    Controller(cmd::controller::ControllerArgs),
    /// Run the storage -> compute -> client pipeline in three modes on a
    /// 3-node cluster (booted for it, or with --cluster the one `fractos
    /// up` started) and compare traffic and latency.
    Demo(cmd::demo::DemoArgs),
    /// Print the attach token of a process name under a cluster key.
    Token(cmd::token::TokenArgs),
    /// Plot the results in a results directory: SVGs, one self-contained
    /// HTML page and a Markdown page.
    Report(cmd::report::ReportArgs),
    /// Print a shell completion script (e.g. `fractos completions bash >
    /// ~/.local/share/bash-completion/completions/fractos`).
    Completions(cmd::completions::CompletionsArgs),
    /// Print the man page (roff), or write one per subcommand with --out.
    Man(cmd::completions::ManArgs),
}

/// Where the command writes its JSON (`None`: it writes none), and the file
/// the results directory should get.
fn json_slot<'a>(
    command: &'a mut Command,
    dir: &Path,
) -> Option<(&'a mut Option<PathBuf>, PathBuf)> {
    use cmd::bench::BenchCommand;
    let (json, kind) = match command {
        Command::Bench(a) => match &mut a.command {
            Some(BenchCommand::Boot(b)) => (&mut b.json, "bench-boot"),
            Some(BenchCommand::Nvme(n)) => (&mut n.json, "bench-nvme"),
            None if a.micro.appliance => (&mut a.micro.json, "bench-appliance"),
            None => (&mut a.micro.json, "bench"),
        },
        Command::Demo(a) => {
            let kind = if a.cluster.is_some() {
                "demo-cluster"
            } else if a.netns {
                "demo-netns"
            } else if a.hosted {
                "demo-hosted"
            } else if a.appliance {
                "demo-appliance"
            } else {
                "demo"
            };
            (&mut a.json, kind)
        }
        _ => return None,
    };
    Some((json, cmd::report::results_file(dir, kind)))
}

fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    // With --results, a command that writes JSON writes it there too: to
    // its --json file and then a copy, or straight there.
    let mut copy = None;
    if let Some(dir) = &cli.results {
        if let Some((json, target)) = json_slot(&mut cli.command, dir) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            match json {
                Some(own) => copy = Some((own.clone(), target)),
                None => *json = Some(target),
            }
        }
    }
    run(cli.command)?;
    if let Some((from, to)) = copy {
        std::fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Image(c) => cmd::image::run(c),
        Command::Up(a) => cmd::up::run(a),
        Command::Down(a) => cmd::down::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Controller(a) => cmd::controller::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Token(a) => cmd::token::run(a),
        Command::Report(a) => cmd::report::run(a),
        Command::Completions(a) => cmd::completions::completions(a, Cli::command()),
        Command::Man(a) => cmd::completions::man(a, Cli::command()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_man_page_names_every_subcommand() {
        let page = String::from_utf8(cmd::completions::man_page(Cli::command()).unwrap()).unwrap();
        let subs: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        assert!(subs.len() >= 11, "{subs:?}");
        for sub in subs {
            // The SUBCOMMANDS section points at each page; roff escapes `-`.
            let entry = format!("fractos\\-{}(1)", sub.replace('-', "\\-"));
            assert!(page.contains(&entry), "{entry} missing from:\n{page}");
        }
    }
}
