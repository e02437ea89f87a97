//! The Linux baseline guest (`fractos_qemu::linux_guest`) under QEMU TCG:
//! Debian's kernel with an initramfs running this crate's `fractos
//! controller`, and the built-in NVMe read benchmark.
//!
//! Needs `qemu-system-x86_64` and `apt-get download` access to the Debian
//! mirrors (for `linux-image-amd64`, fetched once into `<target>/linux`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fractos_qemu::build::Workspace;
use fractos_qemu::linux_guest::{
    controller_config, free_local_port, GuestAction, GuestImage, LinuxGuest, ReadSpec,
    GUEST_METRICS_PORT, GUEST_PROCESS_PORT,
};
use fractos_qemu::node::{Appliance, NvmeDisk};

/// Generous: Linux boots in ~10 s under TCG here, but CI machines are shared.
const TIMEOUT: Duration = Duration::from_secs(300);

fn guest() -> LinuxGuest {
    static G: OnceLock<LinuxGuest> = OnceLock::new();
    G.get_or_init(|| {
        if let Err(e) = fractos_qemu::node::check_qemu() {
            panic!("{e}");
        }
        match LinuxGuest::prepare(&Workspace::locate()) {
            Ok(g) => g,
            Err(e) => panic!(
                "preparing the Linux guest failed (it needs `apt-get download` of Debian's \
                 linux-image-amd64, i.e. apt and the Debian mirrors, and builds \
                 fractos-guest-init with cargo): {e}"
            ),
        }
    })
    .clone()
}

fn scratch(test: &str) -> PathBuf {
    let dir = Workspace::locate()
        .target
        .join("fractos-tests")
        .join(format!("{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

fn free_port() -> u16 {
    free_local_port().unwrap_or_else(|e| panic!("{e}"))
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

#[test]
fn controller_serves_metrics_from_the_linux_guest() {
    let g = guest();
    let dir = scratch("linux-controller");
    let (proc_port, metrics_port) = (free_port(), free_port());
    let cfg = controller_config(1, &[0x0f; 32]).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let (mut vm, ready) = g
        .launch_controller(
            "linux-controller",
            Path::new(env!("CARGO_BIN_EXE_fractos")),
            &cfg,
            &[
                (proc_port, GUEST_PROCESS_PORT),
                (metrics_port, GUEST_METRICS_PORT),
            ],
            &dir,
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("linux guest ready after {ready:?}");
    let deadline = Instant::now() + TIMEOUT;
    let body = loop {
        // QEMU accepts forwarded connections even before the guest listens:
        // retry until the controller answers.
        match http_get(metrics_port, "/metrics") {
            Ok(b) if b.contains("fractos_ops_total") => break b,
            other => {
                assert!(
                    vm.is_running() && Instant::now() < deadline,
                    "no metrics from the guest ({other:?}); serial log:\n{}",
                    vm.log()
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    };
    eprintln!("metrics answered {:?} after launch", started.elapsed());
    assert!(body.starts_with("HTTP/1."), "{body}");
    TcpStream::connect(("127.0.0.1", proc_port)).expect("process port forwarded");
    assert!(vm.is_running(), "guest stopped:\n{}", vm.log());
}

#[test]
fn read_benchmark_reads_the_whole_nvme_disk() {
    let g = guest();
    let dir = scratch("linux-read");
    let img = dir.join("disk.img");
    let size: usize = 64 << 20;
    let mut data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    data[..8].copy_from_slice(b"FRACTOS!");
    std::fs::write(&img, &data).unwrap();
    let disk = || NvmeDisk {
        path: img.clone(),
        size_mib: 64,
    };
    let r = g
        .run_read(
            "linux-read",
            disk(),
            ReadSpec {
                device: "/dev/nvme0n1".into(),
                block_size: 131072,
                count: None,
                queue_depth: None,
                stride: None,
            },
            &dir,
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("bs=131072: {r:?}");
    assert_eq!(r.bytes, size as u64, "{r:?}");
    assert_eq!(r.ops, 512, "{r:?}");
    assert_eq!(
        r.first, "46524143544f5321",
        "first bytes are not the pattern"
    );
    // Every byte the guest read is the disk image's.
    assert_eq!(
        r.fnv,
        fractos_qemu::linux_guest::fnv1a(fractos_qemu::linux_guest::FNV_OFFSET, &data),
        "the guest read other bytes than the disk holds"
    );
    assert!(r.mbps > 0.0 && r.iops > 0.0, "{r:?}");

    let r = g
        .run_read(
            "linux-read-4k",
            disk(),
            ReadSpec {
                device: "/dev/nvme0n1".into(),
                block_size: 4096,
                count: Some(1024),
                queue_depth: None,
                stride: None,
            },
            &dir,
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("bs=4096: {r:?}");
    assert_eq!(r.bytes, 4 << 20, "{r:?}");
    assert_eq!(r.ops, 1024, "{r:?}");
}

#[test]
fn guest_errors_are_reported_and_power_off() {
    let g = guest();
    let dir = scratch("linux-error");
    let mut image = GuestImage::new(GuestAction::Exec(vec!["/bin/missing".into()]));
    image.modules.clear();
    image.network = false;
    let spec = g
        .node_spec("linux-error", &image, &dir)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut vm = Appliance::launch(spec).unwrap_or_else(|e| panic!("{e}"));
    vm.wait_for("fractos-guest: error: running /bin/missing", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("guest did not power off: {e}"));
}
