//! The cluster file: what `fractos up` records about a running cluster
//! (`<state dir>/up/cluster.json`) and how `status`, `demo --cluster` and
//! `token` find it again (`--cluster FILE|DIR`, `FRACTOS_CLUSTER`, else the
//! recorded one).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the cluster file inside a state directory.
pub const CLUSTER_FILE: &str = "cluster.json";

/// What can go wrong finding or reading a cluster file.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Nothing recorded there.
    #[error(
        "no cluster recorded at {0}: start one with `fractos up --detach`, or point --cluster \
         (or FRACTOS_CLUSTER) at the cluster.json `fractos up` wrote or at its directory"
    )]
    NotRecorded(PathBuf),
    /// The file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not JSON of the expected shape.
    #[error("{path} is not a cluster file written by `fractos up`: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// The cluster was started without controllers.
    #[error("{0} records no controllers (was it started with --no-controller?)")]
    NoNodes(PathBuf),
    /// The key file it names is unusable.
    #[error("cluster key file {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The key file can be read by other users.
    #[error(
        "cluster key file {path} has mode {mode:o}, readable by other users: restrict it with \
         `chmod 600 {path}`"
    )]
    KeyMode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// One node of a recorded cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    /// The node's index (`fractos.node`).
    pub node: u32,
    /// Where processes attach.
    pub process_addr: SocketAddr,
    /// Its Prometheus endpoint (`GET /metrics`).
    pub metrics_addr: SocketAddr,
    /// Its shared-memory slot files.
    #[serde(default)]
    pub shm_slots: Vec<PathBuf>,
    /// Sizes of its NVMe disks in MiB.
    #[serde(default)]
    pub nvme_mib: Vec<u64>,
    /// Extra names of its storage service's read Request (`up
    /// --storage-names`, node 0 only).
    #[serde(default)]
    pub storage_names: Vec<String>,
}

/// What `fractos up` records: the key file and the nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The mode-0600 file holding the cluster key (64 hex digits); a
    /// relative path is taken from the cluster file's directory.
    pub key_file: PathBuf,
    /// The nodes, by index.
    pub nodes: Vec<ClusterNode>,
    /// Unix time (seconds) `fractos up` recorded the cluster.
    #[serde(default)]
    pub started_unix: u64,
}

/// The cluster file `arg` names: a file as it is, a directory's
/// `cluster.json`; `None` (no `--cluster`, no `FRACTOS_CLUSTER`, or an
/// empty value) is the one `fractos up` records by default.
pub fn cluster_path(arg: Option<&str>) -> PathBuf {
    match arg.filter(|a| !a.is_empty()) {
        Some(a) if Path::new(a).is_dir() => Path::new(a).join(CLUSTER_FILE),
        Some(a) => PathBuf::from(a),
        None => super::default_state_dir().join(CLUSTER_FILE),
    }
}

/// Largest cluster file read: `fractos up` writes about 300 bytes per
/// node, so 4 MiB is over ten thousand nodes.
pub const CLUSTER_FILE_MAX: u64 = 4 << 20;

/// Largest key file read: 64 hex digits and a newline, with room for
/// blank lines around them.
const KEY_FILE_MAX: u64 = 4 << 10;

/// The text of the regular file at `path`, at most `max` bytes. The file
/// is opened without blocking (a FIFO or a device never holds the
/// caller) and refused unless it is a regular file; `what` names it.
fn read_regular(path: &Path, max: u64, what: &str) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
    if !meta.is_file() {
        return Err(invalid(format!(
            "not a regular file (a directory, FIFO, socket or device): point it at the {what} \
             `fractos up` wrote"
        )));
    }
    if meta.len() > max {
        return Err(invalid(format!(
            "{} bytes, more than the {max} a {what} can be: it is not one `fractos up` wrote",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    // The file may grow after the check: read one byte more than allowed.
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(invalid(format!("grew past {max} bytes while being read")));
    }
    String::from_utf8(bytes).map_err(|_| invalid(format!("the {what} is not UTF-8 text")))
}

impl ClusterFile {
    /// Reads the cluster file at `path` (a regular file of at most
    /// [`CLUSTER_FILE_MAX`] bytes).
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        let text = match read_regular(path, CLUSTER_FILE_MAX, "cluster file") {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClusterError::NotRecorded(path.to_path_buf()))
            }
            Err(source) => {
                return Err(ClusterError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut c: ClusterFile =
            serde_json::from_str(&text).map_err(|source| ClusterError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        if c.nodes.is_empty() {
            return Err(ClusterError::NoNodes(path.to_path_buf()));
        }
        if c.key_file.is_relative() {
            let dir = path.parent().unwrap_or(Path::new("."));
            c.key_file = dir.join(&c.key_file);
        }
        Ok(c)
    }

    /// Writes the cluster file to `path` (mode 0600: it names where the
    /// key is, and its addresses are the cluster's).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The cluster key, from a key file only its owner can read.
    pub fn key(&self) -> Result<[u8; 32], ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let path = &self.key_file;
        let key_err = |reason: String| ClusterError::Key {
            path: path.clone(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            key_err(format!(
                "{e} (`fractos down` removes it with the cluster; start a new one with `fractos up`)"
            ))
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ClusterError::KeyMode {
                path: path.clone(),
                mode,
            });
        }
        let text =
            read_regular(path, KEY_FILE_MAX, "key file").map_err(|e| key_err(e.to_string()))?;
        fractos_hosted::parse_key(&text).map_err(|e| key_err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("fractos-clusterfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample(key_file: &str) -> ClusterFile {
        ClusterFile {
            key_file: key_file.into(),
            nodes: vec![ClusterNode {
                node: 0,
                process_addr: "127.0.0.1:7000".parse().unwrap(),
                metrics_addr: "127.0.0.1:9000".parse().unwrap(),
                shm_slots: vec![],
                nvme_mib: vec![64],
                storage_names: vec!["pipeline/storage/read".into()],
            }],
            started_unix: 1,
        }
    }

    #[test]
    fn round_trips_and_resolves_a_relative_key_file() {
        let d = scratch("roundtrip");
        let path = d.join(CLUSTER_FILE);
        sample("cluster.key").save(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = ClusterFile::load(&path).unwrap();
        assert_eq!(back.key_file, d.join("cluster.key"));
        assert_eq!(back.nodes, sample("x").nodes);
        assert_eq!(cluster_path(Some(d.to_str().unwrap())), path);
        assert_eq!(cluster_path(Some("/x/c.json")), PathBuf::from("/x/c.json"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reads_the_older_shape_without_the_newer_fields() {
        let d = scratch("old");
        let path = d.join(CLUSTER_FILE);
        std::fs::write(
            &path,
            r#"{"key_file": "/k", "nodes": [{"node": 0, "process_addr": "127.0.0.1:1", "metrics_addr": "127.0.0.1:2", "shm_slots": []}]}"#,
        )
        .unwrap();
        let c = ClusterFile::load(&path).unwrap();
        assert!(c.nodes[0].nvme_mib.is_empty() && c.started_unix == 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_files_get_errors_that_say_what_to_do() {
        let d = scratch("bad");
        let path = d.join(CLUSTER_FILE);
        let e = ClusterFile::load(&path).unwrap_err();
        assert!(e.to_string().contains("fractos up --detach"), "{e}");
        std::fs::write(&path, "{not json").unwrap();
        let e = ClusterFile::load(&path).unwrap_err();
        assert!(matches!(e, ClusterError::Parse { .. }), "{e}");
        std::fs::write(&path, r#"{"key_file": "/k", "nodes": []}"#).unwrap();
        let e = ClusterFile::load(&path).unwrap_err();
        assert!(e.to_string().contains("--no-controller"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_key_must_be_private_and_well_formed() {
        let d = scratch("key");
        let key = d.join("cluster.key");
        let c = sample(key.to_str().unwrap());
        assert!(matches!(c.key(), Err(ClusterError::Key { .. })));
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = c.key().unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(c.key().unwrap(), [0xab; 32]);
        std::fs::write(&key, "not hex").unwrap();
        assert!(matches!(c.key(), Err(ClusterError::Key { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn mkfifo(path: &Path) {
        let ok = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(ok.success(), "mkfifo {}", path.display());
    }

    /// Runs `f` on another thread and fails the test if it takes more than
    /// ten seconds (a FIFO that blocks the open or the read).
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("blocked on a FIFO")
    }

    #[test]
    fn hostile_cluster_files_are_refused_quickly_and_typed() {
        let d = scratch("hostile");
        let path = d.join(CLUSTER_FILE);
        // Larger than any cluster `fractos up` writes: refused before it is read.
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(CLUSTER_FILE_MAX + 1).unwrap();
        let e = ClusterFile::load(&path).unwrap_err();
        assert!(matches!(e, ClusterError::Read { .. }), "{e}");
        assert!(e.to_string().contains("more than"), "{e}");
        // Deep nesting: serde_json's recursion limit, no stack overflow.
        std::fs::write(&path, "[".repeat(100_000)).unwrap();
        assert!(matches!(
            ClusterFile::load(&path),
            Err(ClusterError::Parse { .. })
        ));
        // Wrong types.
        for bad in [
            r#"{"key_file": 7, "nodes": []}"#,
            r#"{"key_file": "/k", "nodes": {"node": 0}}"#,
            r#"{"key_file": "/k", "nodes": [{"node": -1, "process_addr": "127.0.0.1:1", "metrics_addr": "127.0.0.1:2"}]}"#,
            r#"{"key_file": "/k", "nodes": [{"node": 0, "process_addr": "nowhere", "metrics_addr": "127.0.0.1:2"}]}"#,
            r#"{"key_file": "/k", "nodes": [{"node": 0, "process_addr": "127.0.0.1:1", "metrics_addr": "127.0.0.1:2", "nvme_mib": [1e99]}]}"#,
            "\u{0}\u{ff}",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = ClusterFile::load(&path).unwrap_err();
            assert!(matches!(e, ClusterError::Parse { .. }), "{bad}: {e}");
        }
        std::fs::write(&path, b"{\"key_file\": \"\xff\"}").unwrap();
        assert!(matches!(
            ClusterFile::load(&path),
            Err(ClusterError::Read { .. })
        ));
        // A directory named cluster.json, a FIFO: no hang, a typed error.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let e = ClusterFile::load(&path).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_dir(&path).unwrap();
        mkfifo(&path);
        let p = path.clone();
        let e = within_10s(move || ClusterFile::load(&p).unwrap_err());
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hostile_key_files_are_refused_quickly_and_typed() {
        let d = scratch("hostilekey");
        let key = d.join("cluster.key");
        let c = sample(key.to_str().unwrap());
        // A directory.
        std::fs::create_dir(&key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = c.key().unwrap_err();
        assert!(matches!(e, ClusterError::Key { .. }), "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_dir(&key).unwrap();
        // A FIFO nobody writes to: refused, not waited on.
        mkfifo(&key);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c2 = c.clone();
        let e = within_10s(move || c2.key().unwrap_err());
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_file(&key).unwrap();
        // A symlink to a world-readable key: the target's mode counts.
        let target = d.join("target.key");
        std::fs::write(&target, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, &key).unwrap();
        assert!(matches!(
            c.key(),
            Err(ClusterError::KeyMode { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(c.key().unwrap(), [0xab; 32]);
        std::fs::remove_file(&key).unwrap();
        // A huge private file: refused by size, not read into memory.
        let f = std::fs::File::create(&key).unwrap();
        f.set_len(64 << 20).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = c.key().unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        std::fs::remove_file(&key).unwrap();
        // A symlink to a character device.
        std::os::unix::fs::symlink("/dev/zero", &key).unwrap();
        assert!(c.key().is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
