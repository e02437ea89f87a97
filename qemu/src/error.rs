use std::path::PathBuf;
use std::time::Duration;

use crate::exit::KernelExit;

/// Everything the runner can fail at, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU is not installed.
    #[error("`{binary}` not found: install QEMU, e.g. `sudo apt-get install qemu-system-x86` on Debian/Ubuntu or `sudo dnf install qemu-system-x86` on Fedora")]
    QemuMissing {
        /// The binary looked for.
        binary: String,
    },
    /// A build tool is not installed.
    #[error(
        "`{tool}` not found: install it, e.g. `sudo apt-get install {package}` on Debian/Ubuntu"
    )]
    ToolMissing {
        /// The tool.
        tool: String,
        /// Debian package providing it.
        package: String,
    },
    /// A command ran but failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its output.
        output: String,
    },
    /// File-system or process error.
    #[error("{what} `{}`: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The marker did not appear in time.
    #[error("node `{node}`: `{marker}` not seen within {timeout:?}; serial log {} ends with:\n{tail}", log.display())]
    Timeout {
        /// Node name.
        node: String,
        /// What was waited for.
        marker: String,
        /// How long.
        timeout: Duration,
        /// The serial log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// QEMU exited while the marker was awaited.
    #[error("node `{node}`: QEMU exited ({exit}) before `{marker}` appeared; serial log {} ends with:\n{tail}", log.display())]
    ExitedEarly {
        /// Node name.
        node: String,
        /// What was waited for.
        marker: String,
        /// How it exited.
        exit: KernelExit,
        /// The serial log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// A kernel command line longer than the boot protocol carries.
    #[error("`{node}`: kernel command line is {len} bytes, more than the {max} the appliance takes (QEMU's PVH boot ROM would overwrite the boot information past it): keep a few options on the command line and put members and peers in the node's configuration file (fw_cfg `opt/org.fractos/config` or the module `fractos-config`, see docs/appliance.md)")]
    CommandLineTooLong {
        /// Node name, or the ISO being built.
        node: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A configuration file over the appliance's limit.
    #[error("`{node}`: configuration file {} is {size} bytes, more than the {max} the appliance reads: split the cluster or drop unused peers", path.display())]
    ConfigTooLarge {
        /// Node name.
        node: String,
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The requested configuration is not possible.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl QemuError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| QemuError::Io { what, path, source }
    }
}
