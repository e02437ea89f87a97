//! `fractos token NAME`: mints the attach token of a process.

use clap::Args;

use super::controller::KeyArgs;

/// Options of `fractos token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Process name the token is bound to.
    pub name: String,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Prints the token as 64 hex digits.
pub fn run(a: TokenArgs) -> anyhow::Result<()> {
    let key = a.key.load()?;
    let token = fractos_core::process_token(&key, a.name.as_bytes());
    println!(
        "{}",
        token.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    Ok(())
}
