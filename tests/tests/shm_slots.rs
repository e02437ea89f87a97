//! Processes attached to an appliance through shared-memory slots
//! (ivshmem-plain devices backed by /dev/shm files): operations and
//! one-sided copies against a TCP process of the same appliance, slot
//! isolation (a busy slot, a forged or stale nonce), and a hostile writer
//! scribbling its own slot's rings while a bystander works through
//! another slot.

use std::time::{Duration, Instant};

use fractos_adaptors::demo::{scrape_metrics, DEMO_KEY};
use fractos_core::process_token;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_sdk::{ErrorCode, MemoryCap, Process, Rights, SdkError};
use fractos_shm::Mapping;
use fractos_tests::{
    appliance_attach_options as opts, attach_demo as attach, kernel, scratch, READY_TIMEOUT,
};
use fractos_transport::ring::{SharedMemory, RING_MIN};
use fractos_transport::slot::{SlotClient, SlotError, SLOT_HEADER};

const WAIT: Duration = fractos_tests::APPLIANCE_WAIT;

fn attach_slot(path: &std::path::Path, name: &str) -> Result<Process, SdkError> {
    let token = process_token(&DEMO_KEY, name.as_bytes());
    Process::attach_slot(path, name, token, opts())
}

fn map(path: &std::path::Path) -> Mapping {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len() as usize;
    Mapping::open_trusted(f.into(), 0, len).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(131).wrapping_add(u32::from(seed)) as u8 ^ (i >> 12) as u8)
        .collect()
}

/// `from` shares `cap` with `to` through the name service.
fn share(from: &Process, cap: MemoryCap, to: &Process, name: &str) -> MemoryCap {
    from.publish(name, cap).unwrap();
    to.lookup(name, WAIT).unwrap().as_memory().unwrap()
}

/// Copies both ways between `a` and `b` and invokes across; checks bytes.
fn exercise(a: &Process, b: &Process, tag: &str, len: usize) {
    let data = pattern(len, tag.len() as u8);
    let src = a.register_vec(data.clone()).unwrap();
    let src_cap = a.memory_create(&src, 0, len as u64, Rights::READ).unwrap();
    let dst = b.register(len as u64).unwrap();
    let dst_cap = b.memory_create(&dst, 0, len as u64, Rights::WRITE).unwrap();
    let dst_at_a = share(b, dst_cap, a, &format!("{tag}-dst"));
    a.copy(&src_cap, &dst_at_a, None).unwrap();
    assert!(dst.to_vec() == data, "{tag}: a -> b copy differs");

    // And back, into a's memory.
    let back = pattern(len, 7);
    let bsrc = b.register_vec(back.clone()).unwrap();
    let bsrc_cap = b.memory_create(&bsrc, 0, len as u64, Rights::READ).unwrap();
    let adst = a.register(len as u64).unwrap();
    let adst_cap = a
        .memory_create(&adst, 0, len as u64, Rights::WRITE)
        .unwrap();
    let adst_at_b = share(a, adst_cap, b, &format!("{tag}-adst"));
    b.copy(&bsrc_cap, &adst_at_b, None).unwrap();
    assert!(adst.to_vec() == back, "{tag}: b -> a copy differs");

    let req = a.request_create(9, b"slot:", &[]).unwrap();
    a.publish(format!("{tag}-req"), req).unwrap();
    let got = b
        .lookup(format!("{tag}-req"), WAIT)
        .unwrap()
        .as_request()
        .unwrap();
    b.invoke(&got, b"hi", &[]).unwrap();
    let inv = a.next_invocation().unwrap();
    assert_eq!((inv.tag, inv.imms.as_slice()), (9, &b"slot:hi"[..]));
}

#[test]
fn slots_attach_copy_stay_isolated_and_survive_a_hostile_writer() {
    let dir = scratch("shm-slots");
    let mut setup = ControllerSetup::new(1, DEMO_KEY).expect("pick ports");
    setup.shm_slots = 3;
    setup.shm_slot_mib = 16;
    let spec = ClusterSpec::controllers(kernel(), dir.clone(), setup.clone());
    let mut cluster = Cluster::launch(&spec).expect("launch QEMU");
    cluster.wait_ready(READY_TIMEOUT).expect("ready");
    let log = || std::fs::read_to_string(dir.join("node0.log")).unwrap_or_default();
    let slots = setup.slot_paths(0);
    for s in &slots {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", s.display());
    }
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>8.1?} {what}", t0.elapsed());
    let tcp = attach(setup.process_addr(0).unwrap(), "tcp");
    phase("tcp attached");

    // 1. A slot process works with a TCP process of the same appliance.
    let a = attach_slot(&slots[0], "a").unwrap_or_else(|e| panic!("{e}\n{}", log()));
    phase("a attached");
    exercise(&a, &tcp, "one", 1 << 20);
    phase("a exercised with tcp");
    let m = scrape_metrics(setup.metrics_addr(0).unwrap()).unwrap();
    assert!(m.contains("fractos_node_direct_memory"), "{m}");

    // 2. Isolation: a busy slot gives nothing to a second process...
    match attach_slot(&slots[0], "intruder") {
        Err(SdkError::Slot {
            source: SlotError::Busy,
            ..
        }) => {}
        other => panic!("a busy slot attached: {other:?}"),
    }
    // ... a forged echo is refused, and so is the nonce it saw (stale now).
    let m1 = map(&slots[1]);
    let mut seen = [0u8; 32];
    m1.read(192, &mut seen);
    let (forged, _) = SlotClient::begin(m1.clone(), RING_MIN, |n| n[0] ^= 1).unwrap();
    let deadline = Instant::now() + WAIT;
    while forged.outcome().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(forged.outcome(), Some(Err(SlotError::Refused)));
    let (stale, _) = SlotClient::begin(m1.clone(), RING_MIN, |n| *n = seen).unwrap();
    while stale.outcome().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stale.outcome(), Some(Err(SlotError::Refused)));
    // An honest process attaches through it afterwards.
    let b = attach_slot(&slots[1], "b").unwrap_or_else(|e| panic!("{e}\n{}", log()));
    phase("isolation checked");
    exercise(&a, &b, "two", 256 << 10);
    phase("a exercised with b");

    // 3. A hostile writer scribbles its own slot's rings while `a` and
    // `tcp` keep working.
    let h = attach_slot(&slots[2], "hostile").unwrap();
    let m2 = map(&slots[2]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let scribbler = std::thread::spawn(move || {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = SLOT_HEADER + (x as usize % (1024 + 2 * 256 * 1024)) / 8 * 8;
            m2.store_u64(off, x);
            m2.write((x >> 20) as usize % m2.len(), &x.to_le_bytes());
        }
    });
    for round in 0..3 {
        exercise(&a, &tcp, &format!("bystander{round}"), 256 << 10);
        let _ = h.lookup("nothing", Duration::ZERO);
    }
    phase("bystander done");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    scribbler.join().unwrap();
    drop(h);
    phase("hostile dropped");
    // The appliance lives, and the scribbled slot is usable again once
    // its channel is gone.
    let deadline = Instant::now() + WAIT;
    let again = loop {
        match attach_slot(&slots[2], "again") {
            Ok(p) => break p,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("slot 2 not reusable: {e}\n{}", log()),
        }
    };
    phase("slot 2 attached again");
    exercise(&again, &a, "three", 64 << 10);
    phase("done");
    assert!(!log().contains("PANIC"), "{}", log());
    // The slot counters reach /metrics (sampled by the kernel loop).
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape_metrics(setup.metrics_addr(0).unwrap()).unwrap();
        let value = |prefix: &str| {
            m.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit_once(' '))
                .and_then(|(_, v)| v.parse::<u64>().ok())
        };
        let total = value("fractos_appliance_shm_slots{node=\"0\",kind=\"total\"}");
        let attaches =
            value("fractos_appliance_shm_slot_events_total{node=\"0\",event=\"attach\"}");
        let refusals =
            value("fractos_appliance_shm_slot_events_total{node=\"0\",event=\"refusal\"}");
        if total == Some(slots.len() as u64) && attaches >= Some(4) && refusals >= Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot metrics missing or wrong:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let e = a.lookup("missing", Duration::ZERO).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NameNotFound), "{e}");
}

/// The pipeline demo on three appliances with every adaptor attached
/// through a shared-memory slot of its appliance (the demo's default):
/// every verification right, each appliance saw its slot attach, and the
/// FractOS mode's inter-node traffic stays well under the centralized
/// one's.
#[test]
fn the_pipeline_runs_with_every_adaptor_attached_through_a_slot() {
    use fractos_adaptors::demo::{run_on, DemoConfig, DemoNode, DemoTransport};
    let dir = scratch("shm-pipeline");
    let mut setup = ControllerSetup::new(3, DEMO_KEY).expect("pick ports");
    setup.shm_slots = 1;
    let spec = ClusterSpec {
        nvme_mib: vec![16],
        node_cmdline: vec!["fractos.storage_names=pipeline/storage/read".into()],
        ..ClusterSpec::controllers(kernel(), dir.clone(), setup.clone())
    };
    let mut cluster = Cluster::launch(&spec).expect("launch QEMU");
    cluster.wait_ready(READY_TIMEOUT).expect("ready");
    let log =
        |i: u32| std::fs::read_to_string(dir.join(format!("node{i}.log"))).unwrap_or_default();
    let nodes: Vec<DemoNode> = (0..3)
        .map(|i| DemoNode::Remote {
            process_addr: setup.process_addr(i).unwrap(),
            metrics_addr: setup.metrics_addr(i).unwrap(),
            key: fractos_adaptors::demo::DEMO_KEY,
            slots: setup.slot_paths(i),
        })
        .collect();
    fractos_adaptors::demo::wait_linked(&nodes, 2, WAIT * 2).expect("linked");
    let cfg = DemoConfig {
        requests: 6,
        image_side: 128,
        images: 4,
        warmup: 1,
        block: 3,
        stride: 4,
        storage_write: Some("storage/0/write".into()),
        corrupt_stored_images: false,
        transport: DemoTransport::Local,
    };
    let report = run_on(&cfg, &nodes, None, |_, _, _| {})
        .unwrap_or_else(|e| panic!("demo through slots: {e}\n{}", log(0)));
    for m in [&report.fractos, &report.centralized, &report.remote_api] {
        assert_eq!(m.scores.len(), 6);
    }
    report.check().unwrap_or_else(|e| panic!("{e}\n{report:?}"));
    assert_eq!(report.failures(), 0);
    eprintln!(
        "inter-node bytes: fractos {} centralized {} (ratio {:.3})",
        report.fractos.inter_node_bytes,
        report.centralized.inter_node_bytes,
        report.traffic_ratio()
    );
    assert!(
        report.traffic_ratio() >= 1.9,
        "traffic ratio {:.3}",
        report.traffic_ratio()
    );
    // Each adaptor came through its appliance's slot (one attach each).
    for i in 0..3 {
        let m = scrape_metrics(setup.metrics_addr(i).unwrap()).unwrap();
        let attaches = m
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "fractos_appliance_shm_slot_events_total{{node=\"{i}\",event=\"attach\"}} "
                ))
            })
            .and_then(|v| v.parse::<u64>().ok());
        assert_eq!(attaches, Some(1), "node{i}:\n{m}");
    }
    for i in 0..3 {
        assert!(!log(i).contains("PANIC"), "{}", log(i));
    }
}
