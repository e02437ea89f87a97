//! `fractos token NAME`: mints the attach token of a process.

use clap::Args;

use super::cluster::{cluster_path, ClusterFile};
use super::controller::KeyArgs;
use super::status::ClusterArg;

/// Options of `fractos token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Process name the token is bound to.
    pub name: String,
    /// The key; without --key or --key-file, the key of the cluster
    /// (--cluster, FRACTOS_CLUSTER, else the one `fractos up` recorded).
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub cluster: ClusterArg,
}

/// Prints the token as 64 hex digits.
pub fn run(a: TokenArgs) -> anyhow::Result<()> {
    let key = if a.key.key.is_some() || a.key.key_file.is_some() {
        a.key.load()?
    } else {
        ClusterFile::load(&cluster_path(a.cluster.cluster.as_deref()))?.key()?
    };
    let token = fractos_core::process_token(&key, a.name.as_bytes());
    println!(
        "{}",
        token.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    Ok(())
}
