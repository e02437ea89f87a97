//! Appliances on QEMU's `microvm` machine — the Firecracker-class VMM: no
//! PCI, the kernel booted via PVH, NICs as modern virtio-mmio devices that
//! QEMU announces on the kernel command line
//! (`virtio_mmio.device=512@0xfeb00e00:12`). Two appliances, each with a
//! user-networking NIC (host forwards) and a VM-to-VM NIC, both
//! virtio-mmio, serve Linux SDK processes and link to each other.

use std::time::{Duration, Instant};

use fractos_adaptors::demo::{scrape_metrics, DEMO_KEY};
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_qemu::node::Machine;
use fractos_sdk::{ErrorCode, Rights, SdkError};
use fractos_tests::{attach_demo as attach, copy_to_new_region, kernel, scratch, READY_TIMEOUT};

const WAIT: Duration = fractos_tests::APPLIANCE_WAIT;

/// The first sample of metric `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn microvm_appliances_serve_processes_over_virtio_mmio_nics() {
    let dir = scratch("microvm");
    let setup = ControllerSetup::new(2, DEMO_KEY).expect("pick ports");
    let spec = ClusterSpec {
        machine: Machine::Microvm,
        // Announcements the kernel must refuse, before the ones QEMU
        // appends: malformed, inside RAM, legacy BIOS space; and an empty
        // virtio-mmio slot (no device behind it), which the driver refuses.
        cmdline: "virtio_mmio.device=junk virtio_mmio.device=4K@0x200000:5 \
                  virtio_mmio.device=512@0xf0000:5 virtio_mmio.device=512@0xfeb00000:5"
            .into(),
        ..ClusterSpec::controllers(kernel(), dir.clone(), setup.clone())
    };
    let mut cluster = Cluster::launch(&spec).expect("launch QEMU");
    let log =
        |i: u32| std::fs::read_to_string(dir.join(format!("node{i}.log"))).unwrap_or_default();
    if let Err(e) = cluster.wait_ready(READY_TIMEOUT) {
        panic!("{e}");
    }
    for i in 0..2 {
        let l = log(i);
        // No PCI at all; both NICs are virtio-mmio devices, announced by QEMU.
        assert!(l.contains("pci: 0 functions"), "{l}");
        assert!(l.contains("no NVMe storage service"), "{l}");
        let announced: Vec<&str> = l
            .lines()
            .filter(|l| l.contains("virtio-mmio: device at 0xfeb0"))
            .collect();
        assert_eq!(announced.len(), 3, "{l}");
        assert!(
            l.contains("net: mmio@0xfeb00000: bring-up failed, continuing without it: virtio-mmio device at 0xfeb00000: Invalid or unknown device ID"),
            "{l}"
        );
        assert_eq!(l.matches("INFO  net: mmio@0xfeb00").count(), 4, "{l}");
        assert!(l.contains(" ip 10.0.2.15/24 gateway 10.0.2.2"), "{l}");
        assert!(l.contains(&format!(" ip 10.1.0.{}/16", i + 1)), "{l}");
        // The bad announcements are refused with the reason.
        assert!(l.contains("`virtio_mmio.device=junk` ignored"), "{l}");
        assert!(l.contains("overlaps usable memory"), "{l}");
        assert!(l.contains("the first MiB is legacy BIOS/VGA space"), "{l}");
        // The TSC was calibrated without the PC speaker port.
        assert!(l.contains("(PitChannel0)"), "{l}");
    }

    // The two controllers link over the virtio-mmio VM-to-VM NICs.
    let deadline = Instant::now() + WAIT * 2;
    for i in 0..2 {
        loop {
            let m = scrape_metrics(setup.metrics_addr(i).unwrap())
                .unwrap_or_else(|e| panic!("node{i}: {e}\n{}", log(i)));
            if metric(&m, "fractos_peers_connected{") == Some(1.0) {
                break;
            }
            assert!(Instant::now() < deadline, "node{i} not linked\n{}", log(i));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    for i in 0..2 {
        // The idle tick reaches the CPU (qboot leaves LINT0 masked): a
        // halted event loop wakes up.
        let l = log(i);
        assert!(l.contains("idle: local APIC LINT0 was masked"), "{l}");
    }

    // An owner on node 0, users on node 0 and node 1.
    let a0 = setup.process_addr(0).unwrap();
    let a1 = setup.process_addr(1).unwrap();
    let owner = attach(a0, "owner");
    let near = attach(a0, "near");
    let far = attach(a1, "far");

    const LEN: usize = 256 * 1024;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 4096) as u8).collect();
    let src = owner.register_vec(data.clone()).unwrap();
    let cap = owner
        .memory_create(&src, 0, LEN as u64, Rights::READ)
        .unwrap();
    let req = owner.request_create(9, b"mmio:", &[]).unwrap();
    owner.publish("mmio-mem", cap).unwrap();
    owner.publish("mmio-req", req).unwrap();

    let retry = |f: &dyn Fn() -> Result<fractos_sdk::Cap, SdkError>| {
        let deadline = Instant::now() + WAIT;
        loop {
            match f() {
                Err(e)
                    if e.code() == Some(ErrorCode::PeerUnreachable)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => return other,
            }
        }
    };
    let mut held = Vec::new();
    for (user, name) in [(&near, "near"), (&far, "far")] {
        let mem = retry(&|| user.lookup("mmio-mem", WAIT))
            .unwrap()
            .as_memory()
            .expect("a Memory capability");
        let r = retry(&|| user.lookup("mmio-req", WAIT))
            .unwrap()
            .as_request()
            .expect("a Request capability");
        let (dst, dst_cap) = copy_to_new_region(user, &mem, LEN as u64);
        assert!(dst.to_vec() == data, "{name}: copied bytes differ");
        user.invoke(&r, name.as_bytes(), &[]).unwrap();
        let inv = owner.next_invocation().unwrap();
        assert_eq!(inv.tag, 9);
        assert_eq!(inv.imms, [b"mmio:".as_slice(), name.as_bytes()].concat());
        // No WRITE right on the source.
        let e = user.copy(&dst_cap, &mem, None).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::MissingRight), "{name}: {e}");
        held.push((user, mem, dst_cap, dst));
    }
    // Revocation reaches both, the remote one across the peer link.
    owner.revoke(cap).unwrap();
    for (user, mem, dst_cap, _dst) in &held {
        let e = user.copy(mem, dst_cap, None).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
    }

    let m = scrape_metrics(setup.metrics_addr(0).unwrap()).unwrap();
    assert!(
        metric(&m, "fractos_ops_total{node=\"0\",op=\"copy\"}").unwrap() >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "fractos_appliance_heap_bytes{node=\"0\",kind=\"used\"}").unwrap() > 0.0,
        "{m}"
    );
    drop(cluster);
}

/// Firecracker's configuration as QEMU microvm can play it: no fw_cfg for
/// the key (Firecracker has none), which arrives as the PVH initrd
/// (Firecracker's `initrd_path`) named by `fractos.key_source=initrd`; one
/// virtio-mmio NIC announced on the command line.
#[test]
fn microvm_appliance_takes_its_key_from_the_initrd_like_firecracker() {
    use fractos_qemu::cluster::write_key_file;
    use fractos_qemu::node::{Appliance, NodeSpec};

    let dir = scratch("microvm-initrd");
    let key_file = dir.join("cluster.key");
    write_key_file(&key_file, &DEMO_KEY).unwrap();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let mut spec = NodeSpec::pvh(
        "fc",
        &kernel(),
        "fractos.node=0 fractos.key_source=initrd",
        &dir.join("fc.log"),
    );
    spec.machine = Machine::Microvm;
    spec.nics = 1;
    spec.memory_mib = 128;
    spec.hostfwd.push((port, 7100));
    spec.initrd = Some(key_file);
    assert!(spec.fw_cfg.is_empty());
    let mut vm = Appliance::launch(spec).expect("launch QEMU");
    vm.wait_for("fractos: ready", READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let l = vm.log();
    assert!(l.contains("virtio-mmio: device at 0xfeb00e00"), "{l}");
    assert!(l.contains("controller: node 0"), "{l}");
    assert!(!l.contains("not started"), "{l}");
    // The key is not on the command line the kernel logged.
    assert!(
        !l.contains(&fractos_qemu::cluster::key_hex(&DEMO_KEY)),
        "{l}"
    );

    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let a = attach(addr, "a");
    let b = attach(addr, "b");
    let req = a.request_create(3, b"fc:", &[]).unwrap();
    a.publish("fc-req", req).unwrap();
    let r = b
        .lookup("fc-req", WAIT)
        .unwrap()
        .as_request()
        .expect("a Request capability");
    b.invoke(&r, b"go", &[]).unwrap();
    let inv = a.next_invocation().unwrap();
    assert_eq!((inv.tag, inv.imms.as_slice()), (3, &b"fc:go"[..]));
    // A process holding a token from another key is refused.
    let wrong = fractos_core::process_token(&[7; 32], b"c");
    let opts = fractos_tests::appliance_attach_options();
    match fractos_sdk::Process::attach(addr, "c", wrong, opts) {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{e}"),
        Ok(_) => panic!("a token from another key attached"),
    }
}
