//! The shared libraries a host binary needs in the guest, from `ldd`.

use super::*;

/// The shared libraries (and ELF interpreter) `ldd` lists for `host`; empty
/// for a static executable.
pub fn shared_libraries(host: &Path) -> Result<Vec<PathBuf>, QemuError> {
    let out = Command::new("ldd")
        .arg(host)
        .output()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => QemuError::ToolMissing {
                tool: "ldd".into(),
                package: "libc-bin".into(),
            },
            _ => QemuError::io("running ldd on", host)(e),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable"
        return Ok(Vec::new());
    }
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, QemuError> {
    let mut libs = Vec::new();
    for l in text.lines().map(str::trim) {
        let path = match l.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(QemuError::Config(format!(
                        "ldd: shared library {} not found",
                        name.trim()
                    )));
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => l.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

// ---------------------------------------------------------------------------
// Guests

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let t = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                 \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                 \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let l = parse_ldd(t).unwrap();
        assert_eq!(
            l,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }
}
