//! Real hosted controllers on loopback and SDK processes attached to them.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use fractos_core::process_token;
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_sdk::{AttachOptions, Cap, ErrorCode, NodeId, Process, SdkError};

pub const KEY: [u8; 32] = [0x5d; 32];

/// Generous per-wait timeout: tests wait on conditions, never on sleeps.
pub const WAIT: Duration = Duration::from_secs(10);

/// `n` hosted controllers in a full mesh (nodes 1..=n).
pub fn cluster(n: u32) -> Vec<Running> {
    cluster_with(n, |_| {})
}

/// [`cluster`] with each configuration adjusted by `tune`.
pub fn cluster_with(n: u32, tune: impl Fn(&mut HostedConfig)) -> Vec<Running> {
    let nodes: Vec<Running> = (1..=n)
        .map(|i| {
            let mut c = HostedConfig::local(NodeId(i), KEY);
            c.members = (1..=n).map(NodeId).collect();
            tune(&mut c);
            spawn(c).expect("controller starts")
        })
        .collect();
    for a in &nodes {
        for b in &nodes {
            if a.node() != b.node() {
                a.add_peer(b.node(), b.peer_addr());
            }
        }
    }
    for a in &nodes {
        a.wait_peers(n as usize - 1, WAIT).expect("peers link");
    }
    nodes
}

pub fn token(name: &str) -> [u8; 32] {
    process_token(&KEY, name.as_bytes())
}

pub fn opts() -> AttachOptions {
    AttachOptions::default().op_timeout(WAIT)
}

/// Attaches an SDK process named `name` to `node`.
pub fn attach(node: &Running, name: &str) -> Process {
    Process::attach(node.process_addr(), name, token(name), opts()).expect("attach")
}

/// Retries `f` while the cluster's links are still coming up
/// (`PeerUnreachable`), for at most [`WAIT`].
pub fn retry<T>(mut f: impl FnMut() -> Result<T, SdkError>) -> Result<T, SdkError> {
    let deadline = Instant::now() + WAIT;
    loop {
        match f() {
            Err(e) if e.code() == Some(ErrorCode::PeerUnreachable) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => return other,
        }
    }
}

/// Publishes `cap` from `p` under `name` and looks it up from `q`.
pub fn share(p: &Process, cap: impl Into<Cap>, q: &Process, name: &str) -> Cap {
    let cap = cap.into();
    retry(|| p.publish(name, cap)).expect("publish");
    retry(|| q.lookup(name, WAIT)).expect("lookup")
}

/// A fresh path for a local socket (a per-test directory under the
/// temporary directory).
pub fn socket_path(tag: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fractos-sdk-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir.join("local.sock")
}

/// Attaches an SDK process named `name` to `node` through its local
/// socket.
pub fn attach_local(node: &Running, name: &str) -> Process {
    let path = node
        .local_socket()
        .expect("the controller has a local socket");
    Process::attach_local(path, name, token(name), opts()).expect("attach_local")
}
