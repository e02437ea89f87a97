//! The appliance's built-in storage service over its NVMe disk, driven by
//! Linux SDK processes through FractOS copies: data integrity, persistence
//! across a reboot, typed errors.

use std::time::{Duration, Instant};

use fractos_adaptors::demo::DEMO_KEY;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_sdk::{ErrorCode, Rights};
use fractos_tests::storage::{fnv, random, Outcome, StorageClient as Client};
use fractos_tests::{attach_demo as attach, kernel, scratch, READY_TIMEOUT};

const WAIT: Duration = fractos_tests::APPLIANCE_WAIT;
const DISK_MIB: u64 = 16;

fn launch(dir: &std::path::Path, setup: &ControllerSetup) -> Cluster {
    let spec = ClusterSpec {
        nvme_mib: vec![DISK_MIB],
        ..ClusterSpec::controllers(kernel(), dir.to_path_buf(), setup.clone())
    };
    let mut c = Cluster::launch(&spec).expect("launch QEMU");
    if let Err(e) = c.wait_ready(READY_TIMEOUT) {
        panic!("{e}");
    }
    c
}

/// A write larger than one NVMe command (split by the service), then
/// sixteen reads of different blocks in flight at once, each into its own
/// memory with its own `done`: every one returns its own bytes.
fn concurrent_reads_return_their_own_bytes(client: &Client) {
    const BASE: u64 = 8 << 20;
    const SPAN: usize = (1 << 20) + 512 * 1024 + 1000;
    let data = random(SPAN, 77);
    assert_eq!(client.write_at(BASE, &data), Outcome::Done, "split write");
    let reads: Vec<(usize, usize)> = (0..16)
        .map(|k| match k {
            // Larger than one command (QEMU: 512 KiB), unaligned.
            0 => (333, (1 << 20) + 4096),
            k => (k * 90_001 % (SPAN - 40_000), 512 + k * 2_345),
        })
        .collect();
    let ranges: Vec<(u64, u64)> = reads
        .iter()
        .map(|&(at, len)| (BASE + at as u64, len as u64))
        .collect();
    for (k, back) in client.read_concurrently(&ranges).iter().enumerate() {
        let (at, len) = reads[k];
        assert_eq!(
            fnv(back),
            fnv(&data[at..at + len]),
            "read {k} at {at}+{len}"
        );
    }
}

#[test]
fn storage_service_keeps_data_across_reboots_and_reports_typed_errors() {
    let dir = scratch("storage");
    let setup = ControllerSetup::new(1, DEMO_KEY).expect("ports");
    let addr = setup.process_addr(0).unwrap();
    let mut c = launch(&dir, &setup);
    let client = Client::new(attach(addr, "client"));

    // Aligned and unaligned ranges, several blocks, one over 256 KiB.
    let cases: [(u64, usize, u64); 3] = [
        (0, 256 * 1024 + 12, 1),
        (1 << 20, 4096, 2),
        ((2 << 20) + 3 * 4096 + 100, 9_000, 3),
    ];
    for &(offset, len, seed) in &cases {
        let data = random(len, seed);
        assert_eq!(
            client.write_at(offset, &data),
            Outcome::Done,
            "write {offset}+{len}"
        );
        let (out, back) = client.read_at(offset, len as u64, Rights::WRITE);
        assert_eq!(out, Outcome::Done, "read {offset}+{len}");
        assert_eq!(fnv(&back), fnv(&data), "read back {offset}+{len} differs");
    }
    // The unaligned write kept the (zero) bytes around it in its blocks.
    let (_, around) = client.read_at((2 << 20) + 3 * 4096, 100, Rights::WRITE);
    assert_eq!(
        around,
        vec![0u8; 100],
        "bytes before an unaligned write changed"
    );

    // Typed errors: a range past the end, a destination without WRITE.
    let end = DISK_MIB << 20;
    let (out, _) = client.read_at(end - 100, 4096, Rights::WRITE);
    assert_eq!(out, Outcome::Err(1, 0), "read past the end");
    assert_eq!(
        client.write_at(end, &[1, 2, 3]),
        Outcome::Err(1, 0),
        "write past the end"
    );
    let (out, _) = client.read_at(0, 4096, Rights::READ);
    assert_eq!(
        out,
        Outcome::Err(4, ErrorCode::MissingRight as u16),
        "read into a READ-only window"
    );
    // And the service still works afterwards.
    let (out, back) = client.read_at(1 << 20, 4096, Rights::WRITE);
    assert_eq!((out, fnv(&back)), (Outcome::Done, fnv(&random(4096, 2))));

    concurrent_reads_return_their_own_bytes(&client);
    drop(client);

    // The bytes are in the disk image on the host, and survive a reboot.
    c.nodes()[0].kill();
    drop(c);
    let image = std::fs::read(dir.join("node0-nvme0.img")).expect("disk image");
    let (offset, len, seed) = cases[0];
    assert_eq!(
        fnv(&image[offset as usize..offset as usize + len]),
        fnv(&random(len, seed))
    );
    let _c = launch(&dir, &setup);
    let deadline = Instant::now() + WAIT;
    let client = loop {
        match std::panic::catch_unwind(|| Client::new(attach(addr, "client-after-reboot"))) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => std::panic::resume_unwind(e),
        }
    };
    for &(offset, len, seed) in &cases {
        let (out, back) = client.read_at(offset, len as u64, Rights::WRITE);
        assert_eq!(out, Outcome::Done);
        assert_eq!(
            fnv(&back),
            fnv(&random(len, seed)),
            "{offset}+{len} after reboot"
        );
    }
}
