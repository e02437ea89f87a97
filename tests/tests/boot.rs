//! Boot the appliance under QEMU TCG: PVH ELF and GRUB ISO, devices,
//! faults, panic, cluster teardown.

use std::path::Path;

use fractos_qemu::cluster::{self, Cluster, ClusterSpec};
use fractos_qemu::exit::KernelExit;
use fractos_qemu::node::{Accel, Appliance, Boot, NodeSpec, NvmeDisk};
use fractos_qemu::READY_MARKER;
use fractos_tests::{iso, kernel, memory_map, pci_lines, scratch, EXIT_TIMEOUT, READY_TIMEOUT};

fn node(test: &str, cmdline: &str) -> NodeSpec {
    let dir = scratch(test);
    NodeSpec::pvh(test, &kernel(), cmdline, &dir.join("serial.log"))
}

/// Boots `spec`, waits for the ready line and then for QEMU to exit;
/// returns the exit and the serial log.
fn boot_and_exit(spec: NodeSpec, expect_ready: bool) -> (KernelExit, String) {
    let mut vm = Appliance::launch(spec).expect("launch QEMU");
    if expect_ready {
        if let Err(e) = vm.wait_for(READY_MARKER, READY_TIMEOUT) {
            panic!("{e}");
        }
    }
    let exit = vm.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    (exit, vm.log())
}

fn assert_sane_memory_map(log: &str, memory_mib: u64) {
    let map = memory_map(log);
    assert!(map.len() >= 2, "memory map too short:\n{log}");
    for w in map.windows(2) {
        assert!(w[0].last < w[1].start, "overlapping regions {w:?}");
    }
    let usable: u64 = map
        .iter()
        .filter(|r| r.kind == "usable")
        .map(|r| r.last + 1 - r.start)
        .sum();
    let ram = memory_mib << 20;
    assert!(
        usable <= ram && usable >= ram - (ram / 16) - (1 << 20),
        "usable {usable:#x} vs -m {memory_mib}M:\n{log}"
    );
    assert!(
        map.iter()
            .any(|r| r.kind == "usable" && r.start <= 0x10_0000 && r.last >= 0x20_0000),
        "no usable RAM at 1 MiB where the kernel is loaded"
    );
}

fn find_pci<'a>(lines: &'a [String], ids: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.contains(ids))
        .unwrap_or_else(|| panic!("no PCI device {ids} in {lines:#?}"))
}

#[test]
fn pvh_boots_with_devices_and_exits_cleanly() {
    let dir = scratch("pvh-devices");
    let mut spec = node(
        "pvh-devices",
        "fractos.node=5 fractos.log=debug fractos.test=exit",
    );
    spec.memory_mib = 192;
    spec.nics = 1;
    spec.nvme.push(NvmeDisk {
        path: dir.join("disk.img"),
        size_mib: 4,
    });
    let (exit, log) = boot_and_exit(spec, true);
    assert_eq!(exit, KernelExit::Success, "{log}");
    assert!(log.contains("booting via pvh"), "{log}");
    assert!(log.contains("fractos: ready node=5 "), "{log}");
    assert!(
        log.contains("DEBUG cpu: GDT"),
        "fractos.log=debug ignored:\n{log}"
    );
    assert!(log.contains("acpi: RSDP rev"), "{log}");
    assert_sane_memory_map(&log, 192);

    let pci = pci_lines(&log);
    let count = format!("pci: {} functions", pci.len());
    assert!(log.contains(&count), "{count} missing:\n{log}");
    assert!(find_pci(&pci, "8086:1237").contains("class 06.00.00"));
    // Modern virtio-net: 64-bit prefetchable BAR4 of 16 KiB (virtio-pci caps).
    let net = find_pci(&pci, "1af4:1041");
    assert!(net.contains("class 02.00.00"), "{net}");
    assert!(
        net.contains("bar4=mem64:") && net.contains("+0x4000:pref"),
        "{net}"
    );
    // QEMU NVMe: class 01.08.02, 64-bit BAR0.
    let nvme = find_pci(&pci, "1b36:0010");
    assert!(nvme.contains("class 01.08.02"), "{nvme}");
    // QEMU 7.2's NVMe BAR0 (registers + doorbells + MSI-X) is 16 KiB.
    assert!(
        nvme.contains("bar0=mem64:") && nvme.contains("+0x4000"),
        "{nvme}"
    );
    assert_eq!(
        pci.iter()
            .filter(|l| l.contains("1af4:") || l.contains("1b36:"))
            .count(),
        2,
        "devices not on the QEMU command line: {pci:#?}"
    );
    assert!(log.contains("MMIO windows uncached"), "{log}");
    // The NIC is brought up and named with its MAC (node index 0, NIC 0).
    assert!(
        log.contains("net: 0000:00:") && log.contains(" mac=52:54:00:fa:00:00"),
        "{log}"
    );
}

/// The `nvme: <bdf> model=...` lines the kernel logged, from `nvme: `.
fn nvme_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter_map(|l| l.find("nvme: 0000:").map(|i| &l[i..]))
        .filter(|l| l.contains(" model="))
        .collect()
}

#[test]
fn nvme_disks_are_identified_at_boot() {
    let dir = scratch("nvme-identify");
    let mut spec = node("nvme-identify", "fractos.test=exit");
    // Two controllers of different sizes: 4 MiB and 6 MiB of 512-byte blocks.
    for (i, size_mib) in [4, 6].into_iter().enumerate() {
        spec.nvme.push(NvmeDisk {
            path: dir.join(format!("disk{i}.img")),
            size_mib,
        });
    }
    let (exit, log) = boot_and_exit(spec, true);
    assert_eq!(exit, KernelExit::Success, "{log}");
    let lines = nvme_lines(&log);
    assert_eq!(lines.len(), 2, "{log}");
    for (line, (serial, blocks)) in lines
        .iter()
        .zip([("fractos0n0", 8192), ("fractos0n1", 12288)])
    {
        let tail =
            format!(" model=\"QEMU NVMe Ctrl\" serial={serial} ns1 blocks={blocks} block_size=512");
        assert!(line.ends_with(&tail), "{line:?} should end with {tail:?}");
        // The address is the PCI function the enumeration listed.
        let bdf = &line["nvme: 0000:".len()..line.find(" model=").unwrap()];
        let pci = pci_lines(&log);
        assert!(
            find_pci(&pci, bdf).contains("1b36:0010"),
            "{bdf} is not the NVMe function"
        );
    }
    assert!(!log.contains("WARN  nvme"), "{log}");
    assert!(!log.contains("self-test"), "self-test ran unasked:\n{log}");
}

#[test]
fn nvme_self_test_writes_reads_back_and_flushes() {
    let dir = scratch("nvme-selftest");
    let disk = dir.join("disk.img");
    let mut spec = node("nvme-selftest", "fractos.test=nvme");
    spec.nvme.push(NvmeDisk {
        path: disk.clone(),
        size_mib: 8,
    });
    let (exit, log) = boot_and_exit(spec, true);
    assert_eq!(exit, KernelExit::Success, "{log}");
    assert!(log.contains("nvme: self-test ok"), "{log}");
    // 8 MiB = 16384 blocks; the last 64 (32 KiB, 8 pages: a PRP list).
    assert!(
        log.contains("self-test: 64 blocks at lba 16320 (8 pages, PRP list)"),
        "{log}"
    );
    assert!(!log.contains("FAILED"), "{log}");
    // The pattern reached the backing file, at its end only.
    let data = std::fs::read(&disk).expect("read the disk image");
    assert_eq!(data.len(), 8 << 20);
    let (head, tail) = data.split_at(data.len() - 32 * 1024);
    assert!(
        tail.chunks(512).all(|b| b.iter().any(|&x| x != 0)),
        "a written block is still zero"
    );
    assert!(
        head.iter().all(|&x| x == 0),
        "wrote outside the test blocks"
    );
}

#[test]
fn nvme_self_test_without_a_disk_fails_the_boot() {
    let (exit, log) = boot_and_exit(node("nvme-nodisk", "fractos.test=nvme"), false);
    assert_eq!(exit, KernelExit::BootFailed, "{log}");
    assert!(
        log.contains("nvme: self-test FAILED: no NVMe controller found"),
        "{log}"
    );
    assert!(!log.contains(READY_MARKER), "{log}");
}

#[test]
fn pvh_without_devices_lists_only_chipset() {
    let (exit, log) = boot_and_exit(node("pvh-bare", "fractos.test=exit"), true);
    assert_eq!(exit, KernelExit::Success, "{log}");
    let pci = pci_lines(&log);
    assert!(pci.iter().all(|l| l.contains(" 8086:")), "{pci:#?}");
    assert!(!log.contains("DEBUG"), "default level is info:\n{log}");
    assert_sane_memory_map(&log, 128);
}

#[test]
fn pvh_maps_memory_above_4gib() {
    let mut spec = node("highmem", "fractos.test=exit");
    spec.memory_mib = 4608;
    let (exit, log) = boot_and_exit(spec, true);
    assert_eq!(exit, KernelExit::Success, "{log}");
    assert_sane_memory_map(&log, 4608);
    let map = memory_map(&log);
    assert!(
        map.iter()
            .any(|r| r.kind == "usable" && r.start == 0x1_0000_0000),
        "no usable RAM above the PCI hole:\n{log}"
    );
}

#[test]
fn iso_boots_via_grub_multiboot2() {
    let dir = scratch("iso");
    let iso = iso("fractos.node=2 fractos.test=exit");
    let mut spec = NodeSpec::new("iso", Boot::Iso(iso), &dir.join("serial.log"));
    spec.nics = 1;
    let (exit, log) = boot_and_exit(spec, true);
    assert_eq!(exit, KernelExit::Success, "{log}");
    assert!(log.contains("booting via multiboot2"), "{log}");
    assert!(log.contains("fractos: ready node=2 "), "{log}");
    assert!(log.contains("protocol=multiboot2"), "{log}");
    assert!(
        log.contains("acpi: RSDP rev"),
        "GRUB's RSDP tag not used:\n{log}"
    );
    assert_sane_memory_map(&log, 128);
    let pci = pci_lines(&log);
    assert!(find_pci(&pci, "1af4:1041").contains("class 02.00.00"));
}

#[test]
fn page_fault_prints_report_and_fault_code() {
    let (exit, log) = boot_and_exit(node("pagefault", "fractos.test=pagefault"), true);
    assert_eq!(exit, KernelExit::Fault(14), "{log}");
    assert!(
        log.contains("FRACTOS FAULT: Page Fault (#PF, vector 14)"),
        "{log}"
    );
    assert!(
        log.contains("error code: 0x0 (not-present read supervisor)"),
        "{log}"
    );
    assert!(log.contains("cr2: 0x00007fffdeadb000"), "{log}");
    assert!(log.contains("rip: 0x") && log.contains("rsp: 0x"), "{log}");
    assert!(log.contains("backtrace (stack scan from rsp): 0x"), "{log}");
    assert!(log.contains("qemu status 93"), "{log}");
}

#[test]
fn divide_error_prints_report_and_fault_code() {
    let (exit, log) = boot_and_exit(node("divzero", "fractos.test=divzero"), true);
    assert_eq!(exit, KernelExit::Fault(0), "{log}");
    assert!(
        log.contains("FRACTOS FAULT: Divide Error (#DE, vector 0)"),
        "{log}"
    );
    assert!(log.contains("qemu status 65"), "{log}");
}

#[test]
fn invalid_opcode_prints_report_and_fault_code() {
    let (exit, log) = boot_and_exit(node("ud2", "fractos.test=invalidopcode"), true);
    assert_eq!(exit, KernelExit::Fault(6), "{log}");
    assert!(
        log.contains("FRACTOS FAULT: Invalid Opcode (#UD, vector 6)"),
        "{log}"
    );
    assert!(log.contains("qemu status 77"), "{log}");
}

#[test]
fn stray_interrupt_vector_is_caught() {
    let (exit, log) = boot_and_exit(node("int40", "fractos.test=interrupt"), true);
    assert_eq!(exit, KernelExit::UnexpectedInterrupt, "{log}");
    assert!(
        log.contains("Unexpected Interrupt (IRQ, vector 64)"),
        "{log}"
    );
    assert!(log.contains("qemu status 37"), "{log}");
}

#[test]
fn stack_overflow_hits_the_guard_page() {
    let (exit, log) = boot_and_exit(node("stack", "fractos.test=stackoverflow"), true);
    assert_eq!(exit, KernelExit::Fault(14), "{log}");
    assert!(
        log.contains("guard page of boot stack: stack overflow"),
        "{log}"
    );
}

#[test]
fn panic_prints_report_and_panic_code() {
    let (exit, log) = boot_and_exit(node("panic", "fractos.test=panic"), true);
    assert_eq!(exit, KernelExit::Panic, "{log}");
    assert!(
        log.contains("FRACTOS PANIC: test panic requested by fractos.test=panic"),
        "{log}"
    );
    assert!(log.contains("kernel/src/main.rs:"), "{log}");
    assert!(log.contains("backtrace (stack scan): 0x"), "{log}");
    assert!(log.contains("qemu status 35"), "{log}");
}

#[test]
fn bad_cmdline_words_are_reported_not_fatal() {
    let (exit, log) = boot_and_exit(
        node(
            "badcmd",
            "fractos.log=loud fractos.bogus=1 fractos.test=exit",
        ),
        true,
    );
    assert_eq!(exit, KernelExit::Success, "{log}");
    assert!(log.contains("bad value `loud` for `fractos.log`"), "{log}");
    assert!(log.contains("unknown option `fractos.bogus`"), "{log}");
}

#[test]
fn cluster_comes_up_and_down_tears_it_down() {
    let state = scratch("cluster");
    let spec = ClusterSpec {
        nodes: 2,
        kernel: kernel(),
        cmdline: String::new(),
        memory_mib: 96,
        nics: 1,
        nvme_mib: vec![2],
        accel: Accel::Tcg,
        firmware: fractos_qemu::node::Firmware::Bios,
        machine: fractos_qemu::node::Machine::Pc,
        state_dir: state.clone(),
        die_with_parent: true,
        controller: None,
        node_cmdline: Vec::new(),
    };
    let mut c = Cluster::launch(&spec).expect("launch cluster");
    c.wait_ready(READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let pids: Vec<u32> = c.nodes().iter().map(Appliance::pid).collect();
    for (i, n) in c.nodes().iter_mut().enumerate() {
        assert!(n.is_running(), "node {i} stopped after ready");
        assert!(n.log().contains(&format!("fractos: ready node={i} ")));
        assert!(n.log().contains("1b36:0010"), "NVMe missing on node {i}");
    }
    // Wait for QEMU to have written its pidfiles, then tear down from the
    // state directory alone, as `fractos down` does from another process.
    for i in 0..2 {
        let p = state.join(format!("node{i}.pid"));
        assert!(p.is_file(), "{} missing", p.display());
    }
    let stopped = cluster::down(&state).expect("down");
    assert_eq!(stopped.len(), 2, "{stopped:?}");
    for n in c.nodes() {
        let exit = n.wait_exit(EXIT_TIMEOUT).expect("QEMU exits after down");
        // QEMU exits with status 0 on SIGTERM ("terminating on signal 15").
        assert!(
            matches!(exit, KernelExit::Signal(_) | KernelExit::Qemu(0)),
            "{exit:?}"
        );
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !String::from_utf8_lossy(&c).contains("qemu-system")
            }
        );
    }
    assert!(cluster::down(&state).unwrap().is_empty());
}

#[test]
fn dropping_an_appliance_kills_qemu() {
    let spec = node("drop", "");
    let mut vm = Appliance::launch(spec).expect("launch");
    vm.wait_for(READY_MARKER, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        vm.is_running(),
        "appliance without a test hook keeps running"
    );
    let pid = vm.pid();
    drop(vm);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} survived Drop"
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for `hostfwd`).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

#[test]
fn virtio_net_serves_tcp_echo_through_hostfwd() {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};
    use std::time::{Duration, Instant};

    let port = free_port();
    let mut spec = node("net-echo", "fractos.test=net");
    spec.nics = 1;
    spec.hostfwd.push((port, 7000));
    let mut vm = Appliance::launch(spec).expect("launch QEMU");
    vm.wait_for(READY_MARKER, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_for("echo server listening on 10.0.2.15:7000", EXIT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    // QEMU's slirp accepts on the host side and then connects to the guest;
    // retry until the connection is up (deadline, no fixed sleeps).
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect to {addr}: {e}; retrying");
                std::thread::yield_now();
            }
            Err(e) => panic!("connect to {addr}: {e}\n{}", vm.log()),
        }
    };
    stream
        .set_read_timeout(Some(EXIT_TIMEOUT))
        .expect("read timeout");
    let mut sent = b"ping\n".to_vec();
    sent.extend((0..3000u32).map(|i| (i * 7 % 251) as u8));
    stream.write_all(&sent).expect("send to the appliance");
    let mut echoed = vec![0u8; sent.len()];
    stream
        .read_exact(&mut echoed)
        .unwrap_or_else(|e| panic!("reading the echo: {e}\n{}", vm.log()));
    assert!(echoed == sent, "echo differs from what was sent");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("waiting for the appliance to close: {e}\n{}", vm.log()));
    assert!(rest.is_empty(), "{} extra bytes after the echo", rest.len());

    let exit = vm.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let log = vm.log();
    assert_eq!(exit, KernelExit::Success, "{log}");
    assert!(log.contains(" mac=52:54:00:fa:00:00"), "{log}");
    assert!(log.contains("ip 10.0.2.15/24 gateway 10.0.2.2"), "{log}");
    assert!(
        log.contains("net: test: connection from 10.0.2.2:"),
        "{log}"
    );
    assert!(
        log.contains(&format!("served 1 connection, {} bytes echoed", sent.len())),
        "{log}"
    );
    assert!(log.contains("net: test ok"), "{log}");
}

#[test]
fn net_test_without_a_nic_fails_the_boot() {
    let (exit, log) = boot_and_exit(node("net-nonic", "fractos.test=net"), true);
    assert_eq!(exit, KernelExit::BootFailed, "{log}");
    assert!(log.contains("no usable virtio-net NIC"), "{log}");
    assert!(
        log.contains("net: test FAILED: no virtio-net NIC is up"),
        "{log}"
    );
}
