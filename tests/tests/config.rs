//! The appliance's configuration file: read from fw_cfg (PVH) and from a
//! Multiboot2 module (GRUB ISO), a thousand-member cluster boots and
//! serves a process, and a command line too long for QEMU's PVH boot is
//! refused by its length.

use std::process::Command;
use std::time::{Duration, Instant};

use fractos_adaptors::demo::DEMO_KEY;
use fractos_qemu::build::{build_iso_with_modules, IsoModule};
use fractos_qemu::cluster::{
    write_key_file, Cluster, ClusterSpec, ControllerSetup, CONFIG_FW_CFG_NAME, CONFIG_MODULE_NAME,
};
use fractos_qemu::exit::KernelExit;
use fractos_qemu::node::{write_private_file, Appliance, Boot, Firmware, FwCfgFile, NodeSpec};
use fractos_qemu::{QEMU, READY_MARKER};
use fractos_sdk::Rights;
use fractos_tests::{attach_demo, kernel, scratch, APPLIANCE_WAIT, EXIT_TIMEOUT, READY_TIMEOUT};

/// A PVH node whose configuration file holds `config`.
fn with_config(test: &str, cmdline: &str, config: &str) -> NodeSpec {
    let dir = scratch(test);
    let file = dir.join("node.config");
    write_private_file(&file, config.as_bytes()).unwrap();
    let mut spec = NodeSpec::pvh(test, &kernel(), cmdline, &dir.join("serial.log"));
    spec.fw_cfg.push(FwCfgFile {
        name: CONFIG_FW_CFG_NAME.into(),
        path: file,
    });
    spec
}

fn boot_and_exit(spec: NodeSpec) -> (KernelExit, String) {
    let mut vm = Appliance::launch(spec).expect("launch QEMU");
    let exit = vm.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    (exit, vm.log())
}

#[test]
fn fw_cfg_configuration_is_read_under_the_command_line() {
    // node=7 from the file; the command line's log level applies and its
    // idle option overrides the file's.
    let config = "fractos-config 1\nnode=7\nidle=poll\nend\n";
    let spec = with_config(
        "config-fw-cfg",
        "fractos.test=exit fractos.log=debug fractos.idle=halt",
        config,
    );
    let (exit, log) = boot_and_exit(spec);
    assert_eq!(exit, KernelExit::Success, "{log}");
    let read = format!(
        "config: {} bytes from fw_cfg opt/org.fractos/config",
        config.len()
    );
    assert!(log.contains(&read), "{log}");
    assert!(
        log.contains("`idle` from the command line overrides"),
        "{log}"
    );
    assert!(log.contains("fractos: ready node=7 "), "{log}");
}

/// Boots a node with `config`; checks the boot failed before the ready
/// line and returns the serial log.
fn refused(test: &str, config: &str) -> String {
    let (exit, log) = boot_and_exit(with_config(test, "fractos.test=exit", config));
    assert_eq!(exit, KernelExit::BootFailed, "{log}");
    assert!(!log.contains(READY_MARKER), "{log}");
    log
}

#[test]
fn a_bad_configuration_stops_the_boot_naming_its_line() {
    let log = refused(
        "config-bad",
        "fractos-config 1\nmembers=0,1\n# again\nmembers=2\nend\n",
    );
    let why = "config: configuration line 4: `members` was already set on line 2";
    assert!(log.contains(why), "{log}");
    // Cut short: no `end` line.
    let log = refused("config-cut", "fractos-config 1\nnode=3\n");
    assert!(log.contains("ends without its `end` line"), "{log}");
}

#[test]
fn iso_reads_the_configuration_module() {
    let dir = scratch("config-iso");
    let file = dir.join("node.config");
    let config = b"fractos-config 1\nnode=9\nend\n";
    write_private_file(&file, config).unwrap();
    let module = IsoModule {
        file,
        cmdline: CONFIG_MODULE_NAME.into(),
    };
    let iso = build_iso_with_modules(
        &kernel(),
        "fractos.test=exit",
        &[module],
        &dir.join("config.iso"),
    )
    .unwrap_or_else(|e| panic!("building the ISO failed: {e}"));
    let spec = NodeSpec::new("config-iso", Boot::Iso(iso), &dir.join("serial.log"));
    let (exit, log) = boot_and_exit(spec);
    assert_eq!(exit, KernelExit::Success, "{log}");
    assert!(log.contains("booting via multiboot2"), "{log}");
    let read = format!("config: {} bytes from module fractos-config", config.len());
    assert!(log.contains(&read), "{log}");
    assert!(log.contains("fractos: ready node=9 "), "{log}");
}

#[test]
fn pvh_command_line_over_qemus_buffer_is_refused_by_its_length() {
    // The runner refuses it; QEMU started by hand shows what the kernel
    // says when a VMM passes it anyway.
    let dir = scratch("config-long-cmdline");
    let words: Vec<String> = (1..=400).map(|n| format!("fractos.x{n}=1")).collect();
    let cmdline = format!("fractos.test=exit {}", words.join(" "));
    assert!(cmdline.len() > 5000);
    let spec = NodeSpec::pvh("long", &kernel(), &cmdline, &dir.join("serial.log"));
    let e = Appliance::launch(spec.clone()).unwrap_err();
    assert!(e.to_string().contains("more than the 4095"), "{e}");

    let mut child = Command::new(QEMU)
        .args(spec.args())
        .spawn()
        .expect("run QEMU");
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("QEMU did not exit");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(dir.join("serial.log")).unwrap();
    assert_eq!(
        KernelExit::from_status(status),
        KernelExit::BootFailed,
        "{log}"
    );
    let size = cmdline.len() + 1;
    assert!(
        log.contains(&format!(
            "the kernel command line is {size} bytes (NUL included) but QEMU's PVH boot ROM holds at most 4096"
        )),
        "{log}"
    );
    assert!(!log.contains("not PVH-compliant"), "{log}");
}

#[test]
fn thousand_member_configuration_boots_and_serves_a_process() {
    // Node 0 of 1,000: the lowest id, so it dials all 999 peers, none of
    // which exists on its segment.
    let dir = scratch("config-thousand");
    let setup = ControllerSetup::new(1, DEMO_KEY).expect("pick ports");
    let spec = ClusterSpec {
        nodes: 1000,
        ..ClusterSpec::controllers(kernel(), dir.clone(), setup.clone())
    };
    write_key_file(&spec.key_file(), &DEMO_KEY).unwrap();
    let config = spec.node_config(0).unwrap();
    assert!(config.len() > 15_000, "{}", config.len());
    write_private_file(&spec.config_file(0), config.as_bytes()).unwrap();
    let node = spec.node(0);
    let Boot::Elf { cmdline, .. } = &node.boot else {
        panic!("{:?}", node.boot)
    };
    assert_eq!(cmdline, "fractos.node=0");
    let memory_mib = node.memory_mib;
    let mut vm = Appliance::launch(node).expect("launch QEMU");
    let to_ready = vm
        .wait_for(READY_MARKER, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let log = vm.log();
    assert!(log.contains("node 0 members [0, 1, 2,"), "{log}");
    assert!(log.contains("999 peer(s) to dial"), "{log}");
    let boot_us: u64 = log
        .split("fractos: ready node=0 boot_us=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("boot_us in the ready line");

    // A process attaches and copies between its own Memory objects (a
    // name would be homed on one of the absent members).
    let p = attach_demo(setup.process_addr(0).unwrap(), "thousand");
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    let src = p.register_vec(data.clone()).unwrap();
    let src_cap = p.memory_create(&src, 0, 65536, Rights::READ).unwrap();
    let dst = p.register(65536).unwrap();
    let dst_cap = p.memory_create(&dst, 0, 65536, Rights::WRITE).unwrap();
    // The 999 absent peers are dialled 16 at a time: the node stays
    // responsive while they time out.
    for _ in 0..3 {
        p.copy(&src_cap, &dst_cap, None).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(dst.to_vec() == data, "copied bytes differ");
    let m = fractos_adaptors::demo::scrape_metrics(setup.metrics_addr(0).unwrap()).unwrap();
    let heap = |kind: &str| -> f64 {
        let prefix = format!("fractos_appliance_heap_bytes{{node=\"0\",kind=\"{kind}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no heap {kind} in\n{m}"))
    };
    let (used, size) = (heap("used"), heap("size"));
    // 16 dials in flight at 256 KiB of buffers each, with room to spare;
    // 999 at once would need 250 MiB.
    assert!(used < 32.0 * 1024.0 * 1024.0, "heap used {used}");
    assert!(vm.is_running());
    eprintln!(
        "thousand members: ready after {to_ready:?} wall ({boot_us} us guest), heap {:.1} of {:.0} MiB used, VM {memory_mib} MiB, config {} bytes",
        used / 1048576.0,
        size / 1048576.0,
        config.len()
    );
}

#[test]
fn uefi_cluster_nodes_link_from_their_configuration_modules() {
    // `fractos up --firmware uefi`: every node boots its own ISO under
    // OVMF, members and peers in the ISO's `fractos-config` module.
    let dir = scratch("config-uefi-cluster");
    let setup = ControllerSetup::new(2, DEMO_KEY).expect("pick ports");
    let spec = ClusterSpec {
        firmware: Firmware::Uefi,
        ..ClusterSpec::controllers(kernel(), dir.clone(), setup.clone())
    };
    let mut c = Cluster::launch(&spec).expect("launch QEMU");
    c.wait_ready(READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    for (i, n) in c.nodes().iter().enumerate() {
        let log = n.log();
        let config = spec.node_config(i as u32).unwrap();
        let read = format!("config: {} bytes from module fractos-config", config.len());
        assert!(log.contains(&read), "node{i}:\n{log}");
        assert!(log.contains("members [0, 1]"), "node{i}:\n{log}");
        assert!(!log.contains("fractos.peers"), "node{i}:\n{log}");
    }
    let deadline = Instant::now() + APPLIANCE_WAIT;
    for i in 0..2 {
        loop {
            let m = fractos_adaptors::demo::scrape_metrics(setup.metrics_addr(i).unwrap())
                .unwrap_or_default();
            let linked = m
                .lines()
                .any(|l| l.starts_with("fractos_peers_connected{") && l.ends_with(" 1"));
            if linked {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node{i} not linked:\n{m}\n{}",
                c.nodes()[i as usize].log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
