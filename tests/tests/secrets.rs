//! The cluster key never travels on a command line: appliances read it
//! from QEMU fw_cfg (PVH) or a Multiboot2 module (GRUB), and refuse to
//! start their controller when `fractos.key=` is on the kernel command line.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use fractos_adaptors::demo::DEMO_KEY;
use fractos_qemu::cluster::{key_hex, write_key_file, Cluster, ClusterSpec, ControllerSetup};
use fractos_qemu::exit::KernelExit;
use fractos_qemu::node::{Appliance, Boot, Firmware, FwCfgFile, NodeSpec};
use fractos_qemu::READY_MARKER;
use fractos_sdk::Process;
use fractos_tests::{
    attach_demo, iso_with_key, kernel, scratch, APPLIANCE_WAIT, EXIT_TIMEOUT, READY_TIMEOUT,
};

/// A process attached with a token derived from the key publishes a
/// capability and looks it up again: the appliance holds the same key.
fn serve_one(addr: SocketAddr, name: &str) -> Process {
    let p = attach_demo(addr, name);
    let req = p.request_create(1, b"", &[]).expect("request_create");
    p.publish(format!("{name}/req"), req).expect("publish");
    p.lookup(format!("{name}/req"), APPLIANCE_WAIT)
        .expect("lookup");
    p
}

#[test]
fn key_by_fw_cfg_serves_processes_and_stays_off_every_command_line() {
    let dir = scratch("secrets-fw-cfg");
    let setup = ControllerSetup::new(1, DEMO_KEY).expect("pick ports");
    let spec = ClusterSpec::controllers(kernel(), dir.clone(), setup.clone());
    let mut cluster = Cluster::launch(&spec).expect("launch QEMU");
    if let Err(e) = cluster.wait_ready(READY_TIMEOUT) {
        panic!("{e}");
    }
    let node = &cluster.nodes()[0];
    let log = node.log();
    assert!(
        log.contains("INFO  controller: node 0 members [0]"),
        "controller not started:\n{log}"
    );
    assert!(log.contains("entropy: rdrand"), "{log}");
    let _p = serve_one(setup.process_addr(0).expect("node 0"), "secrets-probe");

    let hex = key_hex(&DEMO_KEY);
    let argv = std::fs::read(format!("/proc/{}/cmdline", node.pid())).expect("QEMU's cmdline");
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(argv.contains("qemu-system"), "{argv}");
    assert!(
        argv.contains("-fw_cfg name=opt/fractos/cluster-key,file="),
        "{argv}"
    );
    assert!(
        !argv.to_lowercase().contains(&hex),
        "key in QEMU's argv: {argv}"
    );
    assert!(!argv.contains("fractos.key"), "{argv}");
    assert!(!log.contains(&hex), "key in the serial log");

    let key_file = spec.key_file();
    let mode = std::fs::metadata(&key_file)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", key_file.display());
    assert_eq!(
        std::fs::read_to_string(&key_file).expect("key file"),
        format!("{hex}\n")
    );
}

#[test]
fn key_on_the_command_line_is_refused() {
    let dir = scratch("secrets-refused");
    let hex = key_hex(&DEMO_KEY);
    let key_file = dir.join("cluster.key");
    write_key_file(&key_file, &DEMO_KEY).expect("key file");
    let mut spec = NodeSpec::pvh(
        "refused",
        &kernel(),
        &format!("fractos.key={hex} fractos.test=exit"),
        &dir.join("serial.log"),
    );
    spec.nics = 1;
    spec.memory_mib = 256;
    // A proper key is offered too: the exposed one still stops the controller.
    spec.fw_cfg.push(FwCfgFile {
        name: "opt/fractos/cluster-key".into(),
        path: key_file,
    });
    let mut vm = Appliance::launch(spec).expect("launch QEMU");
    if let Err(e) = vm.wait_for(READY_MARKER, READY_TIMEOUT) {
        panic!("{e}");
    }
    let exit = vm.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let log = vm.log();
    assert_eq!(exit, KernelExit::Success, "{log}");
    assert!(
        log.contains(
            "ERROR controller: not started: the cluster key was given on the kernel command line (fractos.key=)"
        ),
        "{log}"
    );
    assert!(
        log.contains("-fw_cfg name=opt/fractos/cluster-key,file="),
        "the message says what to do instead:\n{log}"
    );
    assert!(!log.contains("INFO  controller: node"), "{log}");
    assert!(log.contains("fractos.key=<redacted>"), "{log}");
    assert!(!log.contains(&hex), "the exposed key is echoed:\n{log}");
}

#[test]
fn key_by_multiboot2_module_on_a_grub_iso() {
    grub_iso_serves_a_process(Firmware::Bios);
}

/// The same ISO under UEFI (OVMF, GRUB EFI): GRUB exits boot services and
/// passes the EFI memory map; the appliance comes up and serves a process.
#[test]
fn grub_iso_boots_under_uefi_and_serves_a_process() {
    grub_iso_serves_a_process(Firmware::Uefi);
}

fn grub_iso_serves_a_process(firmware: Firmware) {
    let dir = scratch(&format!("secrets-iso-{}", firmware.name()));
    let key_file = dir.join("cluster.key");
    write_key_file(&key_file, &DEMO_KEY).expect("key file");
    let iso = iso_with_key("fractos.node=0", &key_file, &dir.join("fractos-key.iso"));
    let mode = std::fs::metadata(&iso).expect("iso").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "an ISO holding the key is private");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut spec = NodeSpec::new("iso-key", Boot::Iso(iso), &dir.join("serial.log"));
    spec.nics = 1;
    spec.memory_mib = 256;
    spec.hostfwd = vec![(port, 7100)];
    spec.firmware = firmware;
    let started = std::time::Instant::now();
    let mut vm = Appliance::launch(spec).expect("launch QEMU");
    if let Err(e) = vm.wait_for(READY_MARKER, READY_TIMEOUT) {
        panic!("{e}");
    }
    eprintln!(
        "{} ISO boot: ready after {} ms",
        firmware.name(),
        started.elapsed().as_millis()
    );
    let log = vm.log();
    assert!(log.contains("protocol=multiboot2"), "{log}");
    if firmware == Firmware::Uefi {
        assert!(log.contains("memory: EFI memory map"), "{log}");
    }
    assert!(
        log.contains("INFO  controller: node 0 members [0]"),
        "controller not started from the module key:\n{log}"
    );
    let _p = serve_one(SocketAddr::from(([127, 0, 0, 1], port)), "iso-probe");
}
