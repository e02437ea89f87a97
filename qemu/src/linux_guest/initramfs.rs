//! The initramfs: a cpio "newc" archive writer.

use super::*;

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// An initramfs: a cpio "newc" archive (uncompressed, which the kernel
/// unpacks fastest). Parent directories are added implicitly. Paths are
/// absolute guest paths (`/bin/x`).
#[derive(Debug, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Default for Initramfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Initramfs {
    /// An archive with `/dev/console` (so PID 1 starts with a console),
    /// `/proc`, `/sys`, `/tmp` and `/root`.
    pub fn new() -> Self {
        let mut i = Initramfs {
            entries: BTreeMap::new(),
        };
        for d in ["/dev", "/proc", "/sys", "/tmp", "/root"] {
            i.add_dir(d);
        }
        i.add_char_dev("/dev/console", 5, 1);
        i
    }

    fn key(path: &str) -> String {
        path.trim_start_matches('/')
            .trim_end_matches('/')
            .to_string()
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, path: &str) {
        self.entries.insert(Self::key(path), Entry::Dir);
    }

    /// Adds a regular file with permission bits `mode` (e.g. `0o755`).
    pub fn add_file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.entries.insert(
            Self::key(path),
            Entry::File {
                data,
                mode: mode & 0o7777,
            },
        );
    }

    /// Adds a symbolic link to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) {
        self.entries
            .insert(Self::key(path), Entry::Symlink(target.to_string()));
    }

    /// Adds a character device node.
    pub fn add_char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entries
            .insert(Self::key(path), Entry::CharDev { major, minor });
    }

    /// Adds the host file `host` (following symlinks) at `path`.
    pub fn add_host_file(&mut self, host: &Path, path: &str, mode: u32) -> Result<(), QemuError> {
        let data = fs::read(host).map_err(QemuError::io("reading", host))?;
        self.add_file(path, data, mode);
        Ok(())
    }

    /// Adds the host executable `host` at `path`, without debug info if
    /// `strip` is installed, plus every shared library `ldd` names, at the
    /// paths `ldd` prints (which are the guest's default search paths as
    /// the guest runs the host's own libraries).
    pub fn add_binary(&mut self, host: &Path, path: &str) -> Result<(), QemuError> {
        let data = strip_debug(host)?;
        self.add_file(path, data, 0o755);
        for lib in shared_libraries(host)? {
            let guest = lib.display().to_string();
            if !self.entries.contains_key(&Self::key(&guest)) {
                self.add_host_file(&lib, &guest, 0o755)?;
            }
        }
        Ok(())
    }

    /// Whether `path` is in the archive.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&Self::key(path))
    }

    /// The archive bytes.
    pub fn to_newc(&self) -> Vec<u8> {
        // Every parent directory, then the entries; BTreeMap order puts `a`
        // before `a/b`, so parents are created first.
        let mut all = self.entries.clone();
        for k in self.entries.keys() {
            let mut p = k.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                all.entry(parent.to_string()).or_insert(Entry::Dir);
                p = parent;
            }
        }
        let mut out = Vec::new();
        for (ino, (name, e)) in all.iter().enumerate() {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match e {
                Entry::Dir => (0o040755, 2, &[], (0, 0)),
                Entry::File { data, mode } => (0o100000 | mode, 1, data, (0, 0)),
                Entry::Symlink(t) => (0o120777, 1, t.as_bytes(), (0, 0)),
                Entry::CharDev { major, minor } => (0o020600, 1, &[], (*major, *minor)),
            };
            newc_entry(&mut out, ino as u32 + 1, mode, nlink, rdev, name, data);
        }
        newc_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }

    /// Writes the archive to `out`, mode 0600 from its creation (it may
    /// hold secrets such as a controller's cluster key); returns its size
    /// in bytes.
    pub fn write(&self, out: &Path) -> Result<u64, QemuError> {
        let bytes = self.to_newc();
        write_private_file(out, &bytes)?;
        Ok(bytes.len() as u64)
    }
}

fn newc_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// `host` without debug info (`strip --strip-debug`), or as is if `strip`
/// is not installed.
fn strip_debug(host: &Path) -> Result<Vec<u8>, QemuError> {
    // Unique per call: several guests may be built at once.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = env::temp_dir().join(format!(
        "fractos-strip-{}-{seq}-{}",
        std::process::id(),
        host.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let st = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(host)
        .stderr(std::process::Stdio::null())
        .status();
    let data = match st {
        Ok(s) if s.success() => fs::read(&tmp).map_err(QemuError::io("reading", &tmp)),
        _ => fs::read(host).map_err(QemuError::io("reading", host)),
    };
    let _ = fs::remove_file(&tmp);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut i = Initramfs::new();
        i.add_file("/a/b/c", b"hello".to_vec(), 0o755);
        let b = i.to_newc();
        let s = String::from_utf8_lossy(&b);
        assert!(b.starts_with(b"070701"));
        assert!(s.contains("a\0"), "parent directory added");
        assert!(s.contains("a/b/c\0"));
        assert!(s.contains("dev/console\0"));
        assert!(s.contains("TRAILER!!!\0"));
        assert_eq!(b.len() % 4, 0);
        // Parents precede children.
        assert!(s.find("a/b\0").unwrap() < s.find("a/b/c\0").unwrap());
    }
}
