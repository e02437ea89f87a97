//! RDMA guests: Debian's kernel with Soft-RoCE (`rdma_rxe`) and rdma-core's
//! tools (`ibv_rc_pingpong`, perftest's `ib_send_lat`/`ib_write_bw`, the
//! `rdma` link tool), the recipe of DESIGN.md §7. The tools and their
//! libraries come from the host (Debian 12 packages `ibverbs-utils`,
//! `ibverbs-providers`, `perftest`, `iproute2`, `busybox-static`; `bash
//! .ci/run` installs them); the guest sits on a VM-to-VM segment
//! ([`crate::node::L2Segment`]) as its only NIC, `eth0`.

use super::*;

/// Modules of an RDMA guest, in load order with their dependencies added
/// by [`DebianKernel::modules`]. `crc32_generic` is not in `rdma_rxe`'s
/// dependencies but Soft-RoCE needs it: without it `rdma link add` fails
/// with only "failed to add eth0".
pub const RDMA_MODULES: &[&str] = &["virtio_pci", "virtio_net", "crc32_generic", "rdma_rxe"];

/// Where rdma-core's run-time loader looks for the rxe provider (exact
/// path: `/etc/libibverbs.d/rxe.driver` names `rxe`, the loader adds the
/// directory and the ABI suffix).
pub const RXE_PROVIDER: &str = "/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so";
/// The provider's configuration file.
pub const RXE_DRIVER_FILE: &str = "/etc/libibverbs.d/rxe.driver";
/// The line an RDMA guest's script prints last: `fractos-rdma: status N`
/// with the exit status of the command under test.
pub const RDMA_STATUS_MARKER: &str = "fractos-rdma: status ";

/// Host executables an RDMA guest carries: `(host path, guest path,
/// Debian package)`.
const TOOLS: &[(&str, &str, &str)] = &[
    ("/bin/busybox", "/bin/busybox", "busybox-static"),
    ("/usr/bin/rdma", "/usr/bin/rdma", "iproute2"),
    (
        "/usr/bin/ibv_rc_pingpong",
        "/usr/bin/ibv_rc_pingpong",
        "ibverbs-utils",
    ),
    ("/usr/bin/ib_send_lat", "/usr/bin/ib_send_lat", "perftest"),
    ("/usr/bin/ib_write_bw", "/usr/bin/ib_write_bw", "perftest"),
    (RXE_PROVIDER, RXE_PROVIDER, "ibverbs-providers"),
];

/// How an RDMA guest is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaGuestSpec {
    /// `eth0`'s address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// `eth0`'s MTU: 1500 gives RDMA MTU 1024, 9000 gives 4096.
    pub eth_mtu: u32,
    /// Shell command run once `rxe0` exists (busybox `sh -c`; the tools
    /// are on `PATH`); its exit status is printed after
    /// [`RDMA_STATUS_MARKER`].
    pub command: String,
}

/// The guest image for `spec`: modules, tools, the rxe provider, and a
/// script that sets the MTU, adds `rxe0` over `eth0`, runs the command and
/// reports its status. Fails with the packages to install when a tool is
/// missing on the host.
pub fn rdma_image(spec: &RdmaGuestSpec) -> Result<GuestImage, QemuError> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(host, _, _)| !Path::new(host).exists())
        .map(|(_, _, pkg)| *pkg)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !missing.is_empty() {
        return Err(QemuError::Config(format!(
            "RDMA guests need rdma-core's tools from the host: `apt-get install {}` (Debian 12)",
            missing.join(" ")
        )));
    }
    let script = format!(
        "busybox ip link set eth0 mtu {mtu} && rdma link add rxe0 type rxe netdev eth0 && {cmd}; echo {RDMA_STATUS_MARKER}$?",
        mtu = spec.eth_mtu,
        cmd = spec.command
    );
    let mut g = GuestImage::new(GuestAction::Exec(vec![
        "/bin/busybox".into(),
        "sh".into(),
        "-c".into(),
        script,
    ]));
    g.network = false;
    g.modules = RDMA_MODULES.iter().map(|s| s.to_string()).collect();
    g.extra_cmdline = format!("fractos_guest.ip={}/{}", spec.ip, spec.prefix_len);
    for (host, guest, _) in TOOLS {
        g.binaries.push((PathBuf::from(host), guest.to_string()));
    }
    g.files
        .push((RXE_DRIVER_FILE.to_string(), b"driver rxe\n".to_vec(), 0o644));
    Ok(g)
}

/// The exit status the guest's script printed, once it has.
pub fn rdma_status(log: &str) -> Option<i32> {
    log.lines()
        .find_map(|l| l.split(RDMA_STATUS_MARKER).nth(1))
        .and_then(|s| s.trim().parse().ok())
}

/// `ibv_rc_pingpong`'s result lines: `(bytes, seconds, usec/iter)` from
/// "N bytes in S seconds = ..." and "I iters in S seconds = U usec/iter".
pub fn parse_rc_pingpong(log: &str) -> Option<(u64, f64, f64)> {
    let bytes_line = log.lines().find(|l| l.contains(" bytes in "))?;
    let mut w = bytes_line.split_whitespace();
    let bytes: u64 = w.next()?.parse().ok()?;
    let iters_line = log.lines().find(|l| l.contains(" iters in "))?;
    let words: Vec<&str> = iters_line.split_whitespace().collect();
    let seconds: f64 = words.get(3)?.parse().ok()?;
    let usec: f64 = words.get(6)?.parse().ok()?;
    Some((bytes, seconds, usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guest_output() {
        let log = "fractos-guest: ready uptime=3.1\n\
                   8192000 bytes in 2.50 seconds = 26.21 Mbit/sec\n\
                   1000 iters in 2.50 seconds = 2500.00 usec/iter\n\
                   fractos-rdma: status 0\n";
        assert_eq!(parse_rc_pingpong(log), Some((8_192_000, 2.5, 2500.0)));
        assert_eq!(rdma_status(log), Some(0));
        assert_eq!(rdma_status("fractos-rdma: status 1"), Some(1));
        assert_eq!(rdma_status("nothing"), None);
        assert_eq!(parse_rc_pingpong("Couldn't connect"), None);
    }

    #[test]
    fn the_script_sets_the_mtu_before_adding_rxe() {
        let spec = RdmaGuestSpec {
            ip: Ipv4Addr::new(10, 9, 0, 2),
            prefix_len: 24,
            eth_mtu: 9000,
            command: "ibv_rc_pingpong -g 1 10.9.0.1".into(),
        };
        match rdma_image(&spec) {
            Ok(g) => {
                let GuestAction::Exec(argv) = &g.action else {
                    panic!("{:?}", g.action)
                };
                let script = &argv[3];
                let mtu = script.find("mtu 9000").unwrap();
                let rxe = script.find("rdma link add rxe0").unwrap();
                let run = script.find("ibv_rc_pingpong").unwrap();
                assert!(mtu < rxe && rxe < run, "{script}");
                assert!(g.extra_cmdline.contains("fractos_guest.ip=10.9.0.2/24"));
                let crc = g.modules.iter().position(|m| m == "crc32_generic");
                let rxe = g.modules.iter().position(|m| m == "rdma_rxe");
                assert!(crc < rxe && crc.is_some());
            }
            // A host without the packages gets the install line.
            Err(e) => assert!(e.to_string().contains("apt-get install"), "{e}"),
        }
    }
}
