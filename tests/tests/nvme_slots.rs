//! The appliance's NVMe storage service reading straight into the memory
//! of a process attached through a shared-memory slot (an ivshmem BAR the
//! NVMe controller writes by DMA): every byte of block-aligned reads into
//! page- and dword-aligned windows (direct), of unaligned ranges and of a
//! window at an odd address (staged through the service's pool), reads
//! larger than one command and many at once; the metrics show which path
//! moved how many bytes.

use std::time::{Duration, Instant};

use fractos_adaptors::demo::{scrape_metrics, DEMO_KEY};
use fractos_core::process_token;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_sdk::{ErrorCode, MemoryCap, Process, RequestCap, Rights};
use fractos_tests::{appliance_attach_options as opts, kernel, scratch, READY_TIMEOUT};

const WAIT: Duration = fractos_tests::APPLIANCE_WAIT;
const DISK_MIB: u64 = 16;
const BS: u64 = 512;
const DONE: u64 = 0xd0;
const ERR: u64 = 0xe0;

fn random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A slot process and the storage service's Requests.
struct Client {
    p: Process,
    read: RequestCap,
    write: RequestCap,
    done: RequestCap,
    err: RequestCap,
}

impl Client {
    fn call(&self, req: &RequestCap, mem: MemoryCap, offset: u64, len: u64) -> Result<(), String> {
        let mut imms = offset.to_le_bytes().to_vec();
        imms.extend_from_slice(&len.to_le_bytes());
        self.p
            .invoke(req, &imms, &[mem.into(), self.done.into(), self.err.into()])
            .map_err(|e| e.to_string())?;
        let inv = self
            .p
            .next_invocation_timeout(WAIT)
            .map_err(|e| e.to_string())?;
        match inv.tag {
            DONE => Ok(()),
            ERR => Err(format!("err invoked with {:?}", inv.imms)),
            t => Err(format!("unexpected invocation tag {t:#x}")),
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) {
        let r = self.p.register_vec(data.to_vec()).unwrap();
        let cap = self
            .p
            .memory_create(&r, 0, data.len() as u64, Rights::READ)
            .unwrap();
        self.call(&self.write, cap, offset, data.len() as u64)
            .unwrap_or_else(|e| panic!("write {offset}+{}: {e}", data.len()));
        self.p.drop_cap(cap).unwrap();
    }

    /// Reads `len` bytes at `offset` into a fresh region, `skew` bytes into
    /// it; the whole region comes back (0xa5 around the window).
    fn read_at(&self, offset: u64, len: u64, skew: u64) -> Result<Vec<u8>, String> {
        let r = self.p.register(len + skew + 64).unwrap();
        r.with_bytes_mut(|b| b.fill(0xa5));
        let cap = self.p.memory_create(&r, skew, len, Rights::WRITE).unwrap();
        let out = self.call(&self.read, cap, offset, len);
        self.p.drop_cap(cap).unwrap();
        out.map(|()| r.to_vec())
    }
}

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
    let look = |n: &str| p.lookup(n, WAIT).unwrap().as_request().unwrap();
    let (read, write) = (look("storage/0/read"), look("storage/0/write"));
    let done = p.request_create(DONE, &[], &[]).unwrap();
    let err = p.request_create(ERR, &[], &[]).unwrap();
    let c = Client {
        p,
        read,
        write,
        done,
        err,
    };
    phase("slot process attached");

    // A known image: 3 MiB of random bytes at 1 MiB, written 1 MiB at a
    // time (the service's write path reads them from the slot).
    const BASE: u64 = 1 << 20;
    const SPAN: usize = 3 << 20;
    let data = random(SPAN, 0x5107);
    for (k, chunk) in data.chunks(1 << 20).enumerate() {
        c.write_at(BASE + ((k as u64) << 20), chunk);
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
        let back = c
            .read_at(at, len, skew)
            .unwrap_or_else(|e| panic!("read {at}+{len} at +{skew}: {e}\n{}", log()));
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
        let back = c.read_at(at, len, skew).unwrap();
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
    let p = &c.p;
    let mut pending = Vec::new();
    for k in 0..16u64 {
        let (at, len) = (BASE + k * 96 * 1024, 64 * 1024 + k * BS);
        let region = p.register(len).unwrap();
        let cap = p.memory_create(&region, 0, len, Rights::WRITE).unwrap();
        let done = p.request_create(0x100 + k, &[], &[]).unwrap();
        let mut imms = at.to_le_bytes().to_vec();
        imms.extend_from_slice(&len.to_le_bytes());
        let ack = p
            .start_invoke(&c.read, &imms, &[cap.into(), done.into(), c.err.into()])
            .unwrap();
        pending.push((at, len, region, ack));
    }
    let mut seen = [false; 16];
    for _ in 0..16 {
        let inv = p.next_invocation_timeout(WAIT).unwrap();
        assert!(inv.tag != ERR, "a concurrent read failed: {:?}", inv.imms);
        let k = (inv.tag - 0x100) as usize;
        assert!(
            !std::mem::replace(&mut seen[k], true),
            "read {k} done twice"
        );
        let (at, len, region, _) = &pending[k];
        assert!(region.to_vec() == *want(*at, *len), "concurrent read {k}");
    }
    for (.., ack) in pending {
        ack.wait().unwrap();
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
    let e = c.read_at(end - 4096, 8192, 0).unwrap_err();
    assert!(e.contains("[1, 0, 0]"), "{e}");
    let r = c.p.register(4096).unwrap();
    let ro = c.p.memory_create(&r, 0, 4096, Rights::READ).unwrap();
    let e = c.call(&c.read, ro, BASE, 4096).unwrap_err();
    let code = (ErrorCode::MissingRight as u16).to_le_bytes();
    assert!(e.contains(&format!("[4, {}, {}]", code[0], code[1])), "{e}");
    assert!(!log().contains("PANIC"), "{}", log());
    phase("done");
}
