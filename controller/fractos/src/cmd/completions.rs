//! `fractos completions SHELL` and `fractos man`: shell completion scripts
//! (clap_complete) and man pages (clap_mangen), generated from the same
//! definitions as `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;

/// Options of `fractos completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

/// Options of `fractos man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write `fractos.1` and one `fractos-<subcommand>.1` per subcommand
    /// into this directory instead of printing `fractos.1`.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Prints the completion script of `a.shell` for `cmd`.
pub fn completions(a: CompletionsArgs, mut cmd: clap::Command) -> anyhow::Result<()> {
    let name = cmd.get_name().to_string();
    clap_complete::generate(a.shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}

/// The top-level man page of `cmd` (it lists every subcommand).
pub fn man_page(cmd: clap::Command) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut out)
        .context("rendering the man page")?;
    Ok(out)
}

/// Prints the man page, or writes all of them into `a.out`.
pub fn man(a: ManArgs, cmd: clap::Command) -> anyhow::Result<()> {
    use std::io::Write;
    match a.out {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            eprintln!(
                "wrote man pages into {} (read with `man -l {}/fractos.1`)",
                dir.display(),
                dir.display()
            );
        }
        None => std::io::stdout().write_all(&man_page(cmd)?)?,
    }
    Ok(())
}
