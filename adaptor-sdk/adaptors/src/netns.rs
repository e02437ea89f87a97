//! Network namespaces for the demo's `--netns` mode: each node gets its
//! own namespace, joined to the others through a bridge in a "switch"
//! namespace by veth pairs, with a link model on every node's uplink.
//!
//! # Link model
//!
//! Each node's uplink egress is shaped with `tc`: `netem delay D rate R`
//! when the kernel has `sch_netem`, otherwise `tbf rate R` (bandwidth only;
//! the report says which was applied). A node-to-node packet crosses exactly
//! one shaped egress (its sender's), so one-way latency is `D` plus
//! serialisation at `R`, like a leaf-spine hop of a data-center network.
//!
//! Needs root (or CAP_NET_ADMIN) and iproute2 (`ip`, `tc`). Addresses are
//! `10.201.<pid-derived>.N/24` inside namespaces this process creates and
//! deletes; nothing outside them is touched.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use nix::sched::{setns, CloneFlags};

/// The emulated network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkModel {
    /// One-way delay per hop in microseconds (needs `sch_netem`).
    pub delay_us: u32,
    /// Bandwidth of each node's uplink in Mbit/s.
    pub rate_mbit: u32,
}

impl Default for LinkModel {
    fn default() -> Self {
        LinkModel {
            delay_us: 50,
            rate_mbit: 1000,
        }
    }
}

/// What was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppliedModel {
    /// Delay actually applied (0 without `sch_netem`).
    pub delay_us: u32,
    /// Rate applied.
    pub rate_mbit: u32,
    /// Whether `sch_netem` was available.
    pub netem: bool,
}

/// Errors setting up namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command failed.
    #[error(
        "`{cmd}` failed: {stderr}; --netns needs root and iproute2 (`apt-get install iproute2`)"
    )]
    Command {
        /// The command line.
        cmd: String,
        /// Its error output.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        /// Namespace.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn sh(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetnsError::Command {
            cmd: args.join(" "),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Command {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A set of node namespaces; deleted on drop.
pub struct Netns {
    prefix: String,
    nodes: usize,
    subnet: u8,
    applied: AppliedModel,
}

impl Netns {
    /// Creates `nodes` namespaces (node i has address `.i+1`) and the switch.
    pub fn create(nodes: usize, model: LinkModel) -> Result<Netns, NetnsError> {
        let pid = std::process::id();
        let prefix = format!("fractos{pid}");
        let subnet = (pid % 200 + 20) as u8;
        let mut ns = Netns {
            prefix,
            nodes,
            subnet,
            applied: AppliedModel {
                delay_us: model.delay_us,
                rate_mbit: model.rate_mbit,
                netem: true,
            },
        };
        let sw = ns.switch_name();
        sh(&["ip", "netns", "add", &sw])?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..nodes {
            let name = ns.name(i);
            // Interface names are limited to 15 bytes.
            let (node_if, sw_if) = (format!("fo{pid}n{i}"), format!("fo{pid}s{i}"));
            sh(&["ip", "netns", "add", &name])?;
            sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
            sh(&[
                "ip", "link", "add", &node_if, "type", "veth", "peer", "name", &sw_if,
            ])?;
            sh(&["ip", "link", "set", &node_if, "netns", &name])?;
            sh(&["ip", "link", "set", &sw_if, "netns", &sw])?;
            sh(&["ip", "-n", &name, "link", "set", &node_if, "name", "eth0"])?;
            sh(&[
                "ip",
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", ns.addr(i)),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &sw, "link", "set", &sw_if, "master", "br0"])?;
            sh(&["ip", "-n", &sw, "link", "set", &sw_if, "up"])?;
            let rate = format!("{}mbit", model.rate_mbit);
            let delay = format!("{}us", model.delay_us);
            let netem = sh(&[
                "ip", "netns", "exec", &name, "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
                "delay", &delay, "rate", &rate, "limit", "100000",
            ]);
            if netem.is_err() {
                ns.applied.netem = false;
                ns.applied.delay_us = 0;
                sh(&[
                    "ip", "netns", "exec", &name, "tc", "qdisc", "add", "dev", "eth0", "root",
                    "tbf", "rate", &rate, "burst", "32kb", "latency", "50ms",
                ])?;
            }
        }
        Ok(ns)
    }

    fn switch_name(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// Namespace name of node `i`.
    pub fn name(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// Address of node `i`.
    pub fn addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 201, self.subnet, i as u8 + 1))
    }

    /// The link model in force.
    pub fn applied(&self) -> AppliedModel {
        self.applied
    }

    /// Moves the calling thread into node `i`'s namespace. Sockets it (and
    /// threads it spawns later) creates live there.
    pub fn enter(&self, i: usize) -> Result<(), NetnsError> {
        let name = self.name(i);
        let f = File::open(format!("/run/netns/{name}")).map_err(|source| NetnsError::Enter {
            name: name.clone(),
            source,
        })?;
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
            name,
            source: e.into(),
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = sh(&["ip", "netns", "del", &self.name(i)]);
        }
        let _ = sh(&["ip", "netns", "del", &self.switch_name()]);
    }
}
