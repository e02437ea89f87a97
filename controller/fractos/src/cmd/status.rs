//! `fractos status`: every node of the recorded cluster, read from its
//! Prometheus endpoint.

use std::time::Duration;

use clap::Args;
use fractos_adaptors::demo::scrape_metrics_within;

use super::cluster::{cluster_path, ClusterError, ClusterFile, ClusterNode};
use super::human_bytes;

/// Options of `fractos status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for each node's metrics before calling it down.
    #[arg(long, default_value_t = 3)]
    pub timeout: u64,
}

/// `--cluster FILE|DIR`: which cluster a command works on.
#[derive(Debug, Args)]
pub struct ClusterArg {
    /// The cluster: a `cluster.json` written by `fractos up`, or its
    /// directory [default: the one `fractos up` recorded in the state
    /// directory].
    #[arg(long, value_name = "FILE|DIR", env = "FRACTOS_CLUSTER", value_hint = clap::ValueHint::AnyPath)]
    pub cluster: Option<String>,
}

/// What one node's metrics say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStatus {
    /// Processes attached (`fractos_processes_attached`).
    pub processes: u64,
    /// Objects owned (`fractos_objects`).
    pub objects: u64,
    /// Capability nodes owned (`fractos_cap_nodes`).
    pub cap_nodes: u64,
    /// Bytes copied in and out (`fractos_bytes_copied_total`).
    pub copy_bytes: u64,
    /// Seconds up (`fractos_uptime_seconds`).
    pub uptime_s: f64,
}

/// The sum of every sample of `family` in Prometheus `text` (`None`: no
/// sample).
fn family_sum(text: &str, family: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *sum.get_or_insert(0.0) += v;
    }
    sum
}

impl NodeStatus {
    /// Reads a node's status from its metrics text; families it lacks
    /// count as zero.
    pub fn from_metrics(text: &str) -> Self {
        let n = |f| family_sum(text, f).unwrap_or(0.0);
        NodeStatus {
            processes: n("fractos_processes_attached") as u64,
            objects: n("fractos_objects") as u64,
            cap_nodes: n("fractos_cap_nodes") as u64,
            copy_bytes: n("fractos_bytes_copied_total") as u64,
            uptime_s: n("fractos_uptime_seconds"),
        }
    }
}

/// Formats seconds as `1d02h03m`, `2h03m04s`, `3m04s` or `4.5s`.
pub fn human_duration(s: f64) -> String {
    let t = s as u64;
    let (d, h, m, sec) = (t / 86400, t / 3600 % 24, t / 60 % 60, t % 60);
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m")
    } else if h > 0 {
        format!("{h}h{m:02}m{sec:02}s")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{s:.1}s")
    }
}

/// One node's row: its record and what it answered (`Err`: why it is down).
type Row<'a> = (&'a ClusterNode, Result<NodeStatus, String>);

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<5} {:<5} {:<22} {:>9} {:>8} {:>9} {:>12} {:>10}\n",
        "NODE", "STATE", "ADDRESS", "PROCESSES", "OBJECTS", "CAP NODES", "COPIED", "UPTIME"
    );
    for (n, s) in rows {
        let line = match s {
            Ok(s) => format!(
                "{:<5} {:<5} {:<22} {:>9} {:>8} {:>9} {:>12} {:>10}",
                n.node,
                "up",
                n.process_addr,
                s.processes,
                s.objects,
                s.cap_nodes,
                human_bytes(s.copy_bytes),
                human_duration(s.uptime_s)
            ),
            Err(why) => format!("{:<5} {:<5} {:<22} {why}", n.node, "down", n.process_addr),
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn json(path: &std::path::Path, rows: &[Row]) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = rows
        .iter()
        .map(|(n, s)| {
            let mut v = serde_json::json!({
                "node": n.node,
                "up": s.is_ok(),
                "process_addr": n.process_addr.to_string(),
                "metrics_addr": n.metrics_addr.to_string(),
            });
            match s {
                Ok(s) => {
                    v["processes"] = s.processes.into();
                    v["objects"] = s.objects.into();
                    v["cap_nodes"] = s.cap_nodes.into();
                    v["copy_bytes"] = s.copy_bytes.into();
                    v["uptime_seconds"] = s.uptime_s.into();
                }
                Err(e) => v["error"] = e.clone().into(),
            }
            v
        })
        .collect();
    serde_json::json!({"cluster": path, "nodes": nodes})
}

/// Runs `fractos status`.
pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let path = cluster_path(a.cluster.cluster.as_deref());
    let cluster = match ClusterFile::load(&path) {
        Ok(c) => c,
        // Nothing recorded where `fractos up` records by default: no
        // cluster is up, which is an answer, not a failure.
        Err(ClusterError::NotRecorded(p)) if a.cluster.cluster.is_none() => {
            if a.json {
                println!("{}", serde_json::json!({"cluster": null, "nodes": []}));
            } else {
                println!(
                    "no cluster is up (nothing recorded at {}); start one with `fractos up --detach`",
                    p.display()
                );
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let wait = Duration::from_secs(a.timeout.max(1));
    // Ask the nodes at once (64 at a time): a node that does not answer
    // costs the timeout once, not once per node.
    let mut rows: Vec<Row> = Vec::with_capacity(cluster.nodes.len());
    for batch in cluster.nodes.chunks(64) {
        std::thread::scope(|s| {
            let asks: Vec<_> = batch
                .iter()
                .map(|n| {
                    s.spawn(move || {
                        scrape_metrics_within(n.metrics_addr, wait, wait)
                            .map(|t| NodeStatus::from_metrics(&t))
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            for (n, h) in batch.iter().zip(asks) {
                rows.push((n, h.join().unwrap_or_else(|_| Err("probe failed".into()))));
            }
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json(&path, &rows))?);
    } else {
        println!("cluster {}", path.display());
        print!("{}", table(&rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP fractos_objects Objects.\n\
        # TYPE fractos_objects gauge\n\
        fractos_objects{node=\"1\"} 7\n\
        fractos_objects_extra{node=\"1\"} 100\n\
        fractos_processes_attached{node=\"1\"} 2\n\
        fractos_cap_nodes{node=\"1\"} 9\n\
        fractos_bytes_copied_total{node=\"1\",direction=\"in\"} 1000\n\
        fractos_bytes_copied_total{node=\"1\",direction=\"out\"} 24\n\
        fractos_uptime_seconds{node=\"1\"} 62.5\n";

    #[test]
    fn reads_the_families_it_shows() {
        let s = NodeStatus::from_metrics(TEXT);
        assert_eq!(
            s,
            NodeStatus {
                processes: 2,
                objects: 7,
                cap_nodes: 9,
                copy_bytes: 1024,
                uptime_s: 62.5
            }
        );
        assert_eq!(NodeStatus::from_metrics(""), NodeStatus::default());
        assert_eq!(family_sum(TEXT, "fractos_names"), None);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(4.54), "4.5s");
        assert_eq!(human_duration(62.5), "1m02s");
        assert_eq!(human_duration(3723.0), "1h02m03s");
        assert_eq!(human_duration(90000.0), "1d01h00m");
    }

    #[test]
    fn a_down_node_is_a_row_not_a_failure() {
        let up = ClusterNode {
            node: 0,
            process_addr: "127.0.0.1:7000".parse().unwrap(),
            metrics_addr: "127.0.0.1:9000".parse().unwrap(),
            shm_slots: vec![],
            nvme_mib: vec![],
            storage_names: vec![],
        };
        let down = ClusterNode {
            node: 1,
            ..up.clone()
        };
        let rows: Vec<Row> = vec![
            (&up, Ok(NodeStatus::from_metrics(TEXT))),
            (&down, Err("connection refused".into())),
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[1].starts_with("0     up") && lines[1].contains("1.0 KiB"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("1     down") && lines[2].ends_with("connection refused"),
            "{t}"
        );
        let j = json(std::path::Path::new("/c.json"), &rows);
        assert_eq!(j["nodes"][0]["up"], true);
        assert_eq!(j["nodes"][0]["copy_bytes"], 1024);
        assert_eq!(j["nodes"][1]["up"], false);
    }
}
