//! Debian's `linux-image-*-amd64` package: `apt-get download`, extraction,
//! and the walk over module dependencies (`modules.dep`, `.modinfo`).

use super::*;

/// An extracted Debian `linux-image-*` package.
#[derive(Debug, Clone)]
pub struct DebianKernel {
    /// Where the package was extracted (holds `boot/` and `lib/modules/`).
    pub root: PathBuf,
    /// The bzImage (`boot/vmlinuz-*`).
    pub vmlinuz: PathBuf,
    /// The kernel release, e.g. `6.1.0-48-amd64`.
    pub release: String,
}

/// Downloads Debian's current `linux-image-*-amd64` package (the one
/// `linux-image-amd64` depends on) with `apt-get download` into `dir` and
/// extracts it into `dir/root`; reuses an earlier extraction.
pub fn fetch_debian_kernel(dir: &Path) -> Result<DebianKernel, QemuError> {
    fs::create_dir_all(dir).map_err(QemuError::io("creating", dir))?;
    let root = dir.join("root");
    if let Some(k) = DebianKernel::open(&root)? {
        return Ok(k);
    }
    let out = run(
        Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
        "apt-cache",
        "apt (Debian/Ubuntu only; or pass a kernel path)",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains("unsigned"))
        .map(str::to_string)
        .ok_or_else(|| {
            QemuError::Config(
                "apt-cache knows no linux-image-amd64: run `apt-get update` first (needs the Debian mirrors)"
                    .into(),
            )
        })?;
    eprintln!("fetching {pkg} with apt-get download");
    run(
        Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(dir),
        "apt-get",
        "apt",
    )?;
    let deb = fs::read_dir(dir)
        .map_err(QemuError::io("reading", dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .ok_or_else(|| QemuError::Config(format!("`apt-get download {pkg}` produced no .deb")))?;
    // Extract next to the final place, then rename: a half-extracted tree is
    // never taken for a complete one.
    let tmp = dir.join(format!("root.tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp),
        "dpkg-deb",
        "dpkg",
    )?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp, &root).map_err(QemuError::io("renaming", &tmp))?;
    DebianKernel::open(&root)?
        .ok_or_else(|| QemuError::Config(format!("{pkg} has no /boot/vmlinuz-*")))
}

impl DebianKernel {
    /// The package extracted at `root`, if there is one.
    pub fn open(root: &Path) -> Result<Option<Self>, QemuError> {
        let boot = root.join("boot");
        if !boot.is_dir() {
            return Ok(None);
        }
        let vmlinuz = fs::read_dir(&boot)
            .map_err(QemuError::io("reading", &boot))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            });
        let Some(vmlinuz) = vmlinuz else {
            return Ok(None);
        };
        let release = vmlinuz
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_start_matches("vmlinuz-")
                    .to_string()
            })
            .unwrap_or_default();
        Ok(Some(DebianKernel {
            root: root.to_path_buf(),
            vmlinuz,
            release,
        }))
    }

    /// `lib/modules/<release>` of the package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib").join("modules").join(&self.release)
    }

    /// The modules `names` (e.g. `virtio_net`) and everything they depend
    /// on, dependencies first, as `(name, uncompressed .ko contents)`.
    /// Built-in modules are skipped. Dependencies come from each module's
    /// `.modinfo` (the package ships no `modules.dep`; depmod makes it at
    /// install time).
    pub fn modules(&self, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>, QemuError> {
        let dir = self.modules_dir();
        let order_file = dir.join("modules.order");
        let order =
            fs::read_to_string(&order_file).map_err(QemuError::io("reading", &order_file))?;
        let index: BTreeMap<String, PathBuf> = order
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| (module_name(l), dir.join(l)))
            .collect();
        let builtin: BTreeSet<String> = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();
        let mut out = Vec::new();
        let mut done = BTreeSet::new();
        for n in names {
            self.visit(&module_name(n), &index, &builtin, &mut done, &mut out, 0)?;
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), QemuError> {
        if done.contains(name) || builtin.contains(name) {
            return Ok(());
        }
        if depth > 32 {
            return Err(QemuError::Config(format!(
                "module dependency loop at {name}"
            )));
        }
        let path = index.get(name).ok_or_else(|| {
            QemuError::Config(format!(
                "kernel {} has no module `{name}` (neither built in nor in modules.order)",
                self.release
            ))
        })?;
        let data = read_module(path)?;
        for dep in modinfo(&data, "depends")
            .split(',')
            .filter(|d| !d.is_empty())
        {
            self.visit(&module_name(dep), index, builtin, done, out, depth + 1)?;
        }
        done.insert(name.to_string());
        out.push((name.to_string(), data));
        Ok(())
    }
}

/// `kernel/drivers/nvme/host/nvme-core.ko` → `nvme_core`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Reads a module, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` on the host
/// (modules.order names `.ko`; newer packages ship them compressed).
fn read_module(path: &Path) -> Result<Vec<u8>, QemuError> {
    if path.is_file() {
        return fs::read(path).map_err(QemuError::io("reading", path));
    }
    for (ext, tool, pkg) in [
        ("xz", "xz", "xz-utils"),
        ("zst", "zstd", "zstd"),
        ("gz", "gzip", "gzip"),
    ] {
        let p = PathBuf::from(format!("{}.{ext}", path.display()));
        if p.is_file() {
            let out = run(Command::new(tool).arg("-dc").arg(&p), tool, pkg)?;
            return Ok(out.stdout);
        }
    }
    Err(QemuError::Config(format!(
        "module {} is missing (also as .xz/.zst/.gz)",
        path.display()
    )))
}

/// The value of `key=` in a module's `.modinfo` strings (empty if absent).
fn modinfo(data: &[u8], key: &str) -> String {
    let needle = format!("{key}=");
    data.split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(needle.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The guest init

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_modinfo() {
        assert_eq!(
            module_name("kernel/drivers/nvme/host/nvme-core.ko"),
            "nvme_core"
        );
        assert_eq!(module_name("x/virtio_net.ko.xz"), "virtio_net");
        let data = b"\x7fELF\0license=GPL\0depends=virtio,virtio_ring\0name=x\0";
        assert_eq!(modinfo(data, "depends"), "virtio,virtio_ring");
        assert_eq!(modinfo(data, "nope"), "");
    }
}
