//! Where the appliance's cluster key comes from.
//!
//! The kernel command line is readable by every local user of the VMM's
//! host (it is in QEMU's argv), so it may only *name* a secret, never carry
//! one. `fractos.key=` is refused: the controller service does not start.
//!
//! `fractos.key_source=` picks where the key is read:
//!
//! | value | meaning |
//! |---|---|
//! | `fw_cfg:<name>` | the QEMU fw_cfg file `<name>` |
//! | `module:<name>` | the Multiboot2 module whose command line is `<name>` |
//! | `initrd` | the first boot module without a command line: the PVH initrd (Firecracker's `initrd_path`, QEMU's `-initrd`), for VMMs without fw_cfg |
//! | `auto` (default) | fw_cfg [`DEFAULT_FW_CFG_NAME`], else module [`DEFAULT_MODULE_NAME`] |
//!
//! The key file holds the 32-byte key as exactly 64 hex digits (either
//! case), optionally followed by one newline (`\n` or `\r\n`): the same
//! form `fractos token --key-file` reads. Anything else is refused.

use crate::fw_cfg::FwCfgError;

/// fw_cfg file the key is read from by default
/// (QEMU: `-fw_cfg name=opt/fractos/cluster-key,file=<path>`).
pub const DEFAULT_FW_CFG_NAME: &str = "opt/fractos/cluster-key";
/// Command line of the Multiboot2 module holding the key by default
/// (GRUB: `module2 /boot/cluster.key fractos-cluster-key`).
pub const DEFAULT_MODULE_NAME: &str = "fractos-cluster-key";
/// Largest key file read: the 64 digits and a newline fit with room.
pub const KEY_FILE_MAX: usize = 128;

/// The `fractos.key_source=` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeySource<'a> {
    /// fw_cfg [`DEFAULT_FW_CFG_NAME`], else module [`DEFAULT_MODULE_NAME`].
    #[default]
    Auto,
    /// This fw_cfg file.
    FwCfg(&'a str),
    /// The Multiboot2 module with this command line.
    Module(&'a str),
    /// The first boot module without a command line (the PVH initrd).
    Initrd,
}

impl<'a> KeySource<'a> {
    /// Parses a `fractos.key_source=` value.
    pub fn parse(v: &'a str) -> Option<Self> {
        match v {
            "auto" => return Some(KeySource::Auto),
            "initrd" => return Some(KeySource::Initrd),
            _ => {}
        }
        let (kind, name) = v.split_once(':')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "fw_cfg" if name.len() < crate::fw_cfg::NAME_LEN => Some(KeySource::FwCfg(name)),
            "module" => Some(KeySource::Module(name)),
            _ => None,
        }
    }

    /// The source `cmdline` selects (the last valid `fractos.key_source=`;
    /// invalid ones are reported by [`crate::config::Config::parse`]).
    /// Does not allocate: usable before the heap exists.
    pub fn of(cmdline: &'a str) -> Self {
        cmdline
            .split_ascii_whitespace()
            .rev()
            .filter_map(|w| w.strip_prefix("fractos.key_source="))
            .find_map(KeySource::parse)
            .unwrap_or_default()
    }
}

impl core::fmt::Display for KeySource<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            KeySource::Auto => write!(
                f,
                "fw_cfg file {DEFAULT_FW_CFG_NAME} or boot module {DEFAULT_MODULE_NAME}"
            ),
            KeySource::FwCfg(n) => write!(f, "fw_cfg file {n}"),
            KeySource::Module(n) => write!(f, "boot module {n}"),
            KeySource::Initrd => write!(f, "initrd (boot module without a command line)"),
        }
    }
}

/// Whether `cmdline` tries to carry the key itself (`fractos.key=...`).
pub fn key_on_cmdline(cmdline: &str) -> bool {
    cmdline
        .split_ascii_whitespace()
        .any(|w| w == "fractos.key" || w.starts_with("fractos.key="))
}

/// `cmdline` for logs, with the value of every `fractos.key=` replaced.
#[derive(Debug, Clone, Copy)]
pub struct Redacted<'a>(pub &'a str);

impl core::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, w) in self.0.split_ascii_whitespace().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            if w.starts_with("fractos.key=") {
                f.write_str("fractos.key=<redacted>")?;
            } else {
                f.write_str(w)?;
            }
        }
        Ok(())
    }
}

/// Why a key file's contents were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// Wrong length.
    #[error(
        "key file has {len} bytes: it must hold exactly 64 hex digits, optionally followed by a newline"
    )]
    Length {
        /// Bytes without the trailing newline.
        len: usize,
    },
    /// A byte that is not a hex digit.
    #[error("key file byte {at} is not a hex digit: it must hold exactly 64 hex digits")]
    NotHex {
        /// Offset of the bad byte.
        at: usize,
    },
}

/// Parses a key file: exactly 64 hex digits, optionally followed by `\n`
/// or `\r\n`.
pub fn parse_key_file(bytes: &[u8]) -> Result<[u8; 32], KeyFileError> {
    let digits = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(bytes);
    if digits.len() != 64 {
        return Err(KeyFileError::Length { len: digits.len() });
    }
    let nibble = |at: usize| -> Result<u8, KeyFileError> {
        match digits[at] {
            c @ b'0'..=b'9' => Ok(c - b'0'),
            c @ b'a'..=b'f' => Ok(c - b'a' + 10),
            c @ b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(KeyFileError::NotHex { at }),
        }
    };
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = (nibble(2 * i)? << 4) | nibble(2 * i + 1)?;
    }
    Ok(key)
}

/// Why the controller has no cluster key. Every message says what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError<'a> {
    /// `fractos.key=` on the command line.
    #[error(
        "the cluster key was given on the kernel command line (fractos.key=), which every local user can read from the VMM's process list: refused. Remove fractos.key= (and rotate that key, it has been exposed) and deliver the key as the fw_cfg file {DEFAULT_FW_CFG_NAME} (QEMU: -fw_cfg name={DEFAULT_FW_CFG_NAME},file=<mode-0600 file with 64 hex digits>) or as a Multiboot2 module named {DEFAULT_MODULE_NAME} (GRUB: module2 /boot/cluster.key {DEFAULT_MODULE_NAME})"
    )]
    OnCommandLine,
    /// The source has no key.
    #[error(
        "no cluster key: no {0} (QEMU: -fw_cfg name={DEFAULT_FW_CFG_NAME},file=<mode-0600 file with 64 hex digits>; GRUB: module2 /boot/cluster.key {DEFAULT_MODULE_NAME})"
    )]
    Missing(KeySource<'a>),
    /// Reading the fw_cfg file failed.
    #[error("cluster key: fw_cfg file {name}: {err}")]
    FwCfg {
        /// The file.
        name: &'a str,
        /// What failed.
        err: FwCfgError,
    },
    /// The boot module is larger than a key file can be.
    #[error(
        "cluster key: boot module {name} is {len} bytes, more than the {KEY_FILE_MAX} a key file can be: it must hold exactly 64 hex digits"
    )]
    ModuleTooLarge {
        /// The module's command line.
        name: &'a str,
        /// Its size.
        len: u64,
    },
    /// The boot module cannot be read.
    #[error("cluster key: boot module {name} at {start:#x} is not readable memory")]
    ModuleUnreadable {
        /// The module's command line.
        name: &'a str,
        /// Its address.
        start: u64,
    },
    /// The key file's contents are malformed.
    #[error("cluster key: {from}: {err}")]
    Malformed {
        /// Where it was read from.
        from: KeySource<'a>,
        /// What is wrong.
        err: KeyFileError,
    },
}

/// Whether the module command line `cmdline` names `name` (one of its
/// whitespace-separated words is `name`).
pub fn module_named(cmdline: &str, name: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == name)
}

/// Loads the cluster key from `source`.
///
/// `fw_cfg(name, buf)` reads fw_cfg file `name` into `buf` and returns its
/// bytes (`Err(NotFound/NoDevice)` if there is none); `modules` are the
/// boot modules as `(command line, start, len)`; `read_module(start, buf)`
/// copies module memory (`false` if unreadable).
pub fn load_key<'a, 'm, F, R, M>(
    source: KeySource<'a>,
    mut fw_cfg: F,
    modules: M,
    mut read_module: R,
) -> Result<[u8; 32], KeyError<'a>>
where
    F: FnMut(&str, &mut [u8; KEY_FILE_MAX]) -> Result<usize, FwCfgError>,
    M: Iterator<Item = (&'m str, u64, u64)>,
    R: FnMut(u64, &mut [u8]) -> bool,
{
    let mut buf = [0u8; KEY_FILE_MAX];
    let found = match source {
        KeySource::FwCfg(name) => from_fw_cfg(name, &mut buf, &mut fw_cfg),
        KeySource::Module(name) => from_module(name, &mut buf, modules, &mut read_module),
        KeySource::Initrd => from_module(INITRD, &mut buf, modules, &mut read_module),
        KeySource::Auto => match from_fw_cfg(DEFAULT_FW_CFG_NAME, &mut buf, &mut fw_cfg) {
            Ok(None) => from_module(DEFAULT_MODULE_NAME, &mut buf, modules, &mut read_module),
            other => other,
        },
    };
    // Leave no copy of the key file on the stack.
    buf.fill(0);
    found?.ok_or(KeyError::Missing(source))
}

fn from_fw_cfg<'a>(
    name: &'a str,
    buf: &mut [u8; KEY_FILE_MAX],
    fw_cfg: &mut impl FnMut(&str, &mut [u8; KEY_FILE_MAX]) -> Result<usize, FwCfgError>,
) -> Result<Option<[u8; 32]>, KeyError<'a>> {
    match fw_cfg(name, buf) {
        Ok(n) => parse_key_file(&buf[..n.min(KEY_FILE_MAX)])
            .map(Some)
            .map_err(|err| KeyError::Malformed {
                from: KeySource::FwCfg(name),
                err,
            }),
        Err(FwCfgError::NotFound | FwCfgError::NoDevice) => Ok(None),
        Err(err) => Err(KeyError::FwCfg { name, err }),
    }
}

fn from_module<'a, 'm>(
    name: &'a str,
    buf: &mut [u8; KEY_FILE_MAX],
    mut modules: impl Iterator<Item = (&'m str, u64, u64)>,
    read_module: &mut impl FnMut(u64, &mut [u8]) -> bool,
) -> Result<Option<[u8; 32]>, KeyError<'a>> {
    let wanted = |c: &str| match name {
        INITRD => c.trim().is_empty(),
        _ => module_named(c, name),
    };
    let Some((_, start, len)) = modules.find(|(c, _, _)| wanted(c)) else {
        return Ok(None);
    };
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| n <= KEY_FILE_MAX)
        .ok_or(KeyError::ModuleTooLarge { name, len })?;
    if !read_module(start, &mut buf[..n]) {
        return Err(KeyError::ModuleUnreadable { name, start });
    }
    parse_key_file(&buf[..n])
        .map(Some)
        .map_err(|err| KeyError::Malformed {
            from: match name {
                INITRD => KeySource::Initrd,
                _ => KeySource::Module(name),
            },
            err,
        })
}

/// The name [`from_module`] gives the initrd: it is matched by having no
/// command line, never by name.
const INITRD: &str = "<initrd>";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fw_cfg::fake::FakeFwCfg;
    use crate::fw_cfg::FwCfg;
    use alloc::string::ToString;

    const HEX: &[u8] = b"00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";

    fn key() -> [u8; 32] {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = ((i % 16) as u8) * 0x11;
        }
        k
    }

    #[test]
    fn key_file_format() {
        assert_eq!(parse_key_file(HEX), Ok(key()));
        let mut nl = HEX.to_vec();
        nl.push(b'\n');
        assert_eq!(parse_key_file(&nl), Ok(key()));
        nl.insert(64, b'\r');
        assert_eq!(parse_key_file(&nl), Ok(key()));
        nl.push(b'\n');
        assert_eq!(parse_key_file(&nl), Err(KeyFileError::Length { len: 66 }));
        assert_eq!(
            parse_key_file(&HEX[..63]),
            Err(KeyFileError::Length { len: 63 })
        );
        assert_eq!(parse_key_file(b""), Err(KeyFileError::Length { len: 0 }));
        // 32 raw bytes are not accepted.
        assert_eq!(
            parse_key_file(&key()),
            Err(KeyFileError::Length { len: 32 })
        );
        let mut bad = HEX.to_vec();
        bad[10] = b'g';
        assert_eq!(parse_key_file(&bad), Err(KeyFileError::NotHex { at: 10 }));
        bad[10] = b' ';
        assert_eq!(parse_key_file(&bad), Err(KeyFileError::NotHex { at: 10 }));
        assert!(KeyFileError::Length { len: 3 }
            .to_string()
            .contains("exactly 64 hex digits"));
    }

    #[test]
    fn key_source_spelling() {
        assert_eq!(KeySource::of(""), KeySource::Auto);
        assert_eq!(
            KeySource::of("fractos.key_source=fw_cfg:opt/x/k fractos.node=1"),
            KeySource::FwCfg("opt/x/k")
        );
        assert_eq!(
            KeySource::of("fractos.key_source=module:k fractos.key_source=bogus"),
            KeySource::Module("k")
        );
        assert_eq!(KeySource::parse("auto"), Some(KeySource::Auto));
        for bad in ["fw_cfg:", "module:", "file:/k", "fw_cfg", ""] {
            assert_eq!(KeySource::parse(bad), None, "{bad}");
        }
        let long = alloc::format!("fw_cfg:{}", "n".repeat(56));
        assert_eq!(KeySource::parse(&long), None);
    }

    #[test]
    fn key_on_the_command_line_is_detected_and_redacted() {
        let hex = core::str::from_utf8(HEX).unwrap();
        let c = alloc::format!("fractos.node=1 fractos.key={hex} x");
        assert!(key_on_cmdline(&c));
        assert!(key_on_cmdline("fractos.key="));
        assert!(key_on_cmdline("fractos.key"));
        assert!(!key_on_cmdline("fractos.key_source=auto fractos.keyx=1"));
        let shown = Redacted(&c).to_string();
        assert_eq!(shown, "fractos.node=1 fractos.key=<redacted> x");
        assert!(KeyError::OnCommandLine
            .to_string()
            .contains("-fw_cfg name=opt/fractos/cluster-key,file="));
    }

    fn fw(
        files: &[(&str, &[u8])],
    ) -> impl FnMut(&str, &mut [u8; KEY_FILE_MAX]) -> Result<usize, FwCfgError> {
        let mut dev = FwCfg::probe(FakeFwCfg::with_files(files)).ok();
        move |name, buf| match dev.as_mut() {
            Some(d) => d.read_file(name, buf).map(|b| b.len()),
            None => Err(FwCfgError::NoDevice),
        }
    }

    fn no_modules() -> core::iter::Empty<(&'static str, u64, u64)> {
        core::iter::empty()
    }

    #[test]
    fn loads_from_fw_cfg() {
        let got = load_key(
            KeySource::Auto,
            fw(&[(DEFAULT_FW_CFG_NAME, HEX)]),
            no_modules(),
            |_, _| unreachable!(),
        );
        assert_eq!(got, Ok(key()));
        let got = load_key(
            KeySource::FwCfg("opt/k"),
            fw(&[("opt/k", HEX)]),
            no_modules(),
            |_, _| false,
        );
        assert_eq!(got, Ok(key()));
        let got = load_key(
            KeySource::FwCfg("opt/k"),
            fw(&[(DEFAULT_FW_CFG_NAME, HEX)]),
            no_modules(),
            |_, _| false,
        );
        assert_eq!(got, Err(KeyError::Missing(KeySource::FwCfg("opt/k"))));
        let big = [b'0'; 200];
        let got = load_key(
            KeySource::Auto,
            fw(&[(DEFAULT_FW_CFG_NAME, &big)]),
            no_modules(),
            |_, _| false,
        );
        assert_eq!(
            got,
            Err(KeyError::FwCfg {
                name: DEFAULT_FW_CFG_NAME,
                err: FwCfgError::TooLarge {
                    size: 200,
                    max: KEY_FILE_MAX
                }
            })
        );
        let got = load_key(
            KeySource::Auto,
            fw(&[(DEFAULT_FW_CFG_NAME, &HEX[1..])]),
            no_modules(),
            |_, _| false,
        );
        assert_eq!(
            got,
            Err(KeyError::Malformed {
                from: KeySource::FwCfg(DEFAULT_FW_CFG_NAME),
                err: KeyFileError::Length { len: 63 }
            })
        );
    }

    #[test]
    fn loads_from_the_initrd_module() {
        // Firecracker's PVH initrd: a module without a command line.
        let mem = |start: u64, buf: &mut [u8]| {
            if start != 0x30_0000 {
                return false;
            }
            buf.copy_from_slice(&HEX[..buf.len()]);
            true
        };
        let nodev = |_: &str, _: &mut [u8; KEY_FILE_MAX]| Err(FwCfgError::NoDevice);
        let mods = [("other", 0x10_0000u64, 64u64), ("", 0x30_0000, 64)];
        assert_eq!(
            KeySource::of("fractos.key_source=initrd"),
            KeySource::Initrd
        );
        assert_eq!(
            load_key(KeySource::Initrd, nodev, mods.iter().copied(), mem),
            Ok(key())
        );
        // Not picked by `auto`, and named modules are not an initrd.
        assert_eq!(
            load_key(KeySource::Auto, nodev, mods.iter().copied(), mem),
            Err(KeyError::Missing(KeySource::Auto))
        );
        let named = [("other", 0x30_0000u64, 64u64)];
        let err = load_key(KeySource::Initrd, nodev, named.iter().copied(), mem).unwrap_err();
        assert_eq!(err, KeyError::Missing(KeySource::Initrd));
        assert!(err.to_string().contains("initrd"), "{err}");
        let short = [("", 0x30_0000u64, 10u64)];
        assert!(matches!(
            load_key(KeySource::Initrd, nodev, short.iter().copied(), mem),
            Err(KeyError::Malformed {
                from: KeySource::Initrd,
                ..
            })
        ));
    }

    #[test]
    fn loads_from_a_boot_module() {
        let mem = |start: u64, buf: &mut [u8]| {
            if start != 0x20_0000 {
                return false;
            }
            buf.copy_from_slice(&[HEX, b"\n"].concat()[..buf.len()]);
            true
        };
        let mods = [
            ("other", 0x10_0000u64, 4096u64),
            ("fractos-cluster-key", 0x20_0000, 65),
        ];
        // No fw_cfg device (GRUB on bare metal): the default module is used.
        let nodev = |_: &str, _: &mut [u8; KEY_FILE_MAX]| Err(FwCfgError::NoDevice);
        assert_eq!(
            load_key(KeySource::Auto, nodev, mods.iter().copied(), mem),
            Ok(key())
        );
        assert_eq!(
            load_key(
                KeySource::Module("fractos-cluster-key"),
                nodev,
                mods.iter().copied(),
                mem
            ),
            Ok(key())
        );
        assert_eq!(
            load_key(KeySource::Module("k2"), nodev, mods.iter().copied(), mem),
            Err(KeyError::Missing(KeySource::Module("k2")))
        );
        let huge = [("fractos-cluster-key", 0x20_0000u64, 1u64 << 40)];
        assert_eq!(
            load_key(KeySource::Auto, nodev, huge.iter().copied(), mem),
            Err(KeyError::ModuleTooLarge {
                name: DEFAULT_MODULE_NAME,
                len: 1 << 40
            })
        );
        let elsewhere = [("fractos-cluster-key", 0x50_0000u64, 64u64)];
        assert_eq!(
            load_key(KeySource::Auto, nodev, elsewhere.iter().copied(), mem),
            Err(KeyError::ModuleUnreadable {
                name: DEFAULT_MODULE_NAME,
                start: 0x50_0000
            })
        );
        let short = [("fractos-cluster-key", 0x20_0000u64, 10u64)];
        assert!(matches!(
            load_key(KeySource::Auto, nodev, short.iter().copied(), mem),
            Err(KeyError::Malformed {
                err: KeyFileError::Length { len: 10 },
                ..
            })
        ));
        assert!(module_named("--x fractos-cluster-key", DEFAULT_MODULE_NAME));
        assert!(!module_named("fractos-cluster-key2", DEFAULT_MODULE_NAME));
        // Nothing anywhere.
        assert_eq!(
            load_key(KeySource::Auto, nodev, no_modules(), mem),
            Err(KeyError::Missing(KeySource::Auto))
        );
    }
}
