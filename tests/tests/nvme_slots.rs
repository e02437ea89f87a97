//! The appliance's NVMe storage service reading straight into the memory
//! of a process attached through a shared-memory slot (an ivshmem BAR the
//! NVMe controller writes by DMA): every byte of block-aligned reads into
//! page- and dword-aligned windows (direct), of unaligned ranges and of a
//! window at an odd address (staged through the service's pool), reads
//! larger than one command and many at once; the metrics show which path
//! moved how many bytes.

use std::time::Instant;

use fractos_adaptors::demo::{scrape_metrics, DEMO_KEY};
use fractos_core::process_token;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_sdk::{ErrorCode, Process, Rights};
use fractos_tests::storage::{random, Outcome, StorageClient};
use fractos_tests::{appliance_attach_options as opts, kernel, scratch, READY_TIMEOUT};

const DISK_MIB: u64 = 16;
const BS: u64 = 512;

/// The storage service's DMA byte counters: (direct, staged).
fn dma_bytes(addr: std::net::SocketAddr) -> (u64, u64) {
    let m = scrape_metrics(addr).unwrap();
    let value = |path: &str| {
        let prefix = format!("fractos_storage_dma_bytes_total{{node=\"0\",path=\"{path}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{m}"))
    };
    (value("direct"), value("staged"))
}

#[test]
fn nvme_reads_land_in_slot_memory_by_dma_and_fall_back_to_staging() {
    let dir = scratch("nvme-slots");
    let mut setup = ControllerSetup::new(1, DEMO_KEY).expect("pick ports");
    setup.shm_slots = 1;
    setup.shm_slot_mib = 16;
    let spec = ClusterSpec {
        nvme_mib: vec![DISK_MIB],
        ..ClusterSpec::controllers(kernel(), dir.clone(), setup.clone())
    };
    let mut cluster = Cluster::launch(&spec).expect("launch QEMU");
    cluster.wait_ready(READY_TIMEOUT).expect("ready");
    let log = || std::fs::read_to_string(dir.join("node0.log")).unwrap_or_default();
    let metrics = setup.metrics_addr(0).unwrap();
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>8.1?} {what}", t0.elapsed());

    let slot = &setup.slot_paths(0)[0];
    let token = process_token(&DEMO_KEY, b"reader");
    let p = Process::attach_slot(slot, "reader", token, opts())
        .unwrap_or_else(|e| panic!("{e}\n{}", log()));
    let c = StorageClient::new(p);
    phase("slot process attached");

    // A known image: 3 MiB of random bytes at 1 MiB, written 1 MiB at a
    // time (the service's write path reads them from the slot).
    const BASE: u64 = 1 << 20;
    const SPAN: usize = 3 << 20;
    let data = random(SPAN, 0x5107);
    for (k, chunk) in data.chunks(1 << 20).enumerate() {
        let at = BASE + ((k as u64) << 20);
        assert_eq!(c.write_at(at, chunk), Outcome::Done, "write at {at}");
    }
    phase("pattern written");
    let want = |at: u64, len: u64| &data[(at - BASE) as usize..(at - BASE + len) as usize];
    let (d0, s0) = dma_bytes(metrics);

    // Direct: block-aligned ranges into page-aligned and dword-aligned
    // windows, one over 1 MiB (several NVMe commands).
    let direct: [(u64, u64, u64); 4] = [
        (BASE, 4096, 0),
        (BASE + 7 * BS, 9 * BS, 4),
        (BASE + 64 * 1024, (1 << 20) + 4096, 0),
        (BASE + (2 << 20), 128 * 1024, 1020),
    ];
    let mut direct_bytes = 0;
    for &(at, len, skew) in &direct {
        let (out, back) = c.read_into(at, len, skew, 64, Rights::WRITE);
        assert_eq!(out, Outcome::Done, "read {at}+{len} at +{skew}\n{}", log());
        let (s, l) = (skew as usize, len as usize);
        assert!(
            back[..s].iter().all(|&b| b == 0xa5),
            "bytes before the window"
        );
        assert!(
            back[s..s + l] == *want(at, len),
            "read {at}+{len} into +{skew} differs"
        );
        assert!(
            back[s + l..].iter().all(|&b| b == 0xa5),
            "bytes after the window"
        );
        direct_bytes += len;
    }
    let (d1, s1) = dma_bytes(metrics);
    assert_eq!(d1 - d0, direct_bytes, "direct DMA bytes");
    assert_eq!(s1, s0, "nothing staged for aligned reads");
    phase("direct reads verified");

    // Staged: unaligned ranges, and an aligned range into a window at an
    // odd address (PRPs need dword alignment).
    let staged: [(u64, u64, u64); 3] = [
        (BASE + 100, 5000, 0),
        (BASE + 4096, 4096 - 3, 0),
        (BASE + 8192, 8192, 1),
    ];
    let mut staged_bytes = 0;
    for &(at, len, skew) in &staged {
        let (out, back) = c.read_into(at, len, skew, 64, Rights::WRITE);
        assert_eq!(out, Outcome::Done, "read {at}+{len} at +{skew}");
        let (s, l) = (skew as usize, len as usize);
        assert!(back[s..s + l] == *want(at, len), "read {at}+{len} differs");
        assert!(back[..s].iter().chain(&back[s + l..]).all(|&b| b == 0xa5));
        staged_bytes += (at + len).div_ceil(BS) * BS - at / BS * BS;
    }
    let (d2, s2) = dma_bytes(metrics);
    assert_eq!(d2, d1, "nothing direct for unaligned reads");
    assert_eq!(s2 - s1, staged_bytes, "staged DMA bytes (whole blocks)");
    phase("staged reads verified");

    // Sixteen direct reads in flight at once, each into its own window.
    let reads: Vec<(u64, u64)> = (0..16)
        .map(|k| (BASE + k * 96 * 1024, 64 * 1024 + k * BS))
        .collect();
    for (k, back) in c.read_concurrently(&reads).iter().enumerate() {
        let (at, len) = reads[k];
        assert!(*back == want(at, len), "concurrent read {k}");
    }
    let (d3, _) = dma_bytes(metrics);
    assert_eq!(
        d3 - d2,
        (0..16).map(|k| 64 * 1024 + k * BS).sum::<u64>(),
        "every concurrent read went direct"
    );
    phase("concurrent direct reads verified");

    // Typed errors still: past the end, and a READ-only window.
    let end = DISK_MIB << 20;
    let (out, _) = c.read_at(end - 4096, 8192, Rights::WRITE);
    assert_eq!(out, Outcome::Err(1, 0), "past the end");
    let r = c.p.register(4096).unwrap();
    let ro = c.p.memory_create(&r, 0, 4096, Rights::READ).unwrap();
    assert_eq!(
        c.call(&c.read, ro, BASE, 4096),
        Outcome::Err(4, ErrorCode::MissingRight as u16)
    );
    assert!(!log().contains("PANIC"), "{}", log());
    phase("done");
}
