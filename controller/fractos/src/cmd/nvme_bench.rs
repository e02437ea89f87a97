//! `fractos bench nvme`: read throughput (128 KiB reads) and IOPS (4 KiB
//! reads, one at a time) of the appliance's built-in storage service end to
//! end into a Linux adaptor's memory, next to the same QEMU NVMe disk image
//! read with `O_DIRECT` inside a Debian Linux guest, in the same run.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use fractos_adaptors::demo::{attach_to, DEMO_KEY};
use fractos_qemu::build::Workspace;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_qemu::linux_guest::{LinuxGuest, ReadSpec, GUEST_MEMORY_MIB};
use fractos_qemu::node::{Accel, NvmeDisk};
use fractos_sdk::wire::Rights;
use serde_json::json;

/// Options of `fractos bench nvme`.
#[derive(Debug, Args)]
pub struct NvmeArgs {
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Disk size in MiB (filled with random bytes once; every 128 KiB
    /// block is read once per run).
    #[arg(long, default_value_t = 64)]
    pub disk_mib: u64,
    /// 4 KiB reads measured for IOPS.
    #[arg(long, default_value_t = 2000)]
    pub small_reads: u64,
    /// Kernel ELF to boot [default: build it].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// CPU accelerator of both VMs.
    #[arg(long, default_value = "tcg")]
    pub accel: Accel,
}

const BIG: u64 = 128 * 1024;
const SMALL: u64 = 4096;
const DONE: u64 = 0xbe_00d0;
const ERR: u64 = 0xbe_00e0;

/// Fills `path` with `mib` MiB of pseudo-random bytes (so neither side
/// reads a sparse hole).
fn make_disk(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    Ok(())
}

/// (MB/s of 128 KiB reads over the whole disk, IOPS of 4 KiB reads).
fn appliance(a: &NvmeArgs, dir: &Path, disk: &Path) -> anyhow::Result<(f64, f64)> {
    let kernel = super::kernel_or_build(&a.kernel)?;
    let setup = ControllerSetup::new(1, DEMO_KEY)?;
    let spec = ClusterSpec {
        memory_mib: GUEST_MEMORY_MIB,
        nvme_mib: vec![a.disk_mib],
        accel: a.accel,
        ..ClusterSpec::controllers(kernel, dir.join("appliance"), setup.clone())
    };
    std::fs::create_dir_all(&spec.state_dir)?;
    std::fs::copy(disk, spec.node(0).nvme[0].path.clone()).context("placing the disk image")?;
    let mut c = Cluster::launch(&spec)?;
    c.wait_ready(Duration::from_secs(300))?;
    let p = attach_to(setup.process_addr(0).expect("one node"), "bench-nvme")?;
    let wait = Duration::from_secs(60);
    let read = p
        .lookup("storage/0/read", wait)?
        .as_request()
        .context("storage/0/read is not a Request")?;
    let done = p.request_create(DONE, &[], &[])?;
    let err = p.request_create(ERR, &[], &[])?;
    let region = p.register(BIG)?;
    let big = p.memory_create(&region, 0, BIG, Rights::WRITE)?;
    let small = p.diminish(&big, 0, SMALL, Rights::WRITE)?;
    let one = |offset: u64, dst: fractos_sdk::MemoryCap, len: u64| -> anyhow::Result<()> {
        let mut imms = offset.to_le_bytes().to_vec();
        imms.extend_from_slice(&len.to_le_bytes());
        p.invoke(&read, &imms, &[dst.into(), done.into(), err.into()])?;
        let inv = p.next_invocation_timeout(wait)?;
        if inv.tag != DONE {
            bail!("read at {offset} failed: status {:?}", inv.imms);
        }
        Ok(())
    };
    eprintln!("appliance up; reading…");
    let want = std::fs::read(disk)?;
    // Untimed, around every read: scribble over the buffer, then compare
    // all of it with the disk image after the read.
    let mut scribble = 0u64;
    let mut timed_read = |offset: u64, dst, len: u64| -> anyhow::Result<Duration> {
        scribble += 1;
        region.with_bytes_mut(|b| fractos_adaptors::bench::fill_pattern(b, scribble));
        let t = Instant::now();
        one(offset, dst, len)?;
        let took = t.elapsed();
        let expected = &want[offset as usize..(offset + len) as usize];
        if let Some(at) = region
            .with_bytes(|b| fractos_adaptors::bench::first_difference(&b[..len as usize], expected))
        {
            bail!("the read at {offset} differs from the disk image at byte {at}");
        }
        Ok(took)
    };
    let blocks = (a.disk_mib << 20) / BIG;
    timed_read(0, big, BIG)?;
    let mut spent = Duration::ZERO;
    for i in 0..blocks {
        spent += timed_read(i * BIG, big, BIG)?;
    }
    let mbps = (blocks * BIG) as f64 / spent.as_secs_f64() / 1e6;
    let span = (a.disk_mib << 20) / SMALL;
    let mut spent = Duration::ZERO;
    for i in 0..a.small_reads {
        spent += timed_read((i * 7919 % span) * SMALL, small, SMALL)?;
    }
    let iops = a.small_reads as f64 / spent.as_secs_f64();
    Ok((mbps, iops))
}

/// The same disk read inside a Debian Linux guest.
fn linux_guest(a: &NvmeArgs, dir: &Path, disk: &Path) -> anyhow::Result<(f64, f64)> {
    eprintln!("preparing the Debian Linux guest…");
    let mut guest = LinuxGuest::prepare(&Workspace::locate())?;
    // Like with like: the guest runs on the appliance's accelerator.
    guest.accel = a.accel;
    let run = |name: &str, bs: u64, count: Option<u64>| -> anyhow::Result<f64> {
        let path = dir.join(format!("{name}.img"));
        std::fs::copy(disk, &path).context("placing the disk image")?;
        let r = guest.run_read(
            name,
            NvmeDisk {
                path,
                size_mib: a.disk_mib,
            },
            ReadSpec {
                device: "/dev/nvme0n1".into(),
                block_size: bs,
                count,
            },
            dir,
            Duration::from_secs(600),
        )?;
        // Every byte the guest read must be the disk image's (its reads
        // are sequential from offset 0).
        let want = std::fs::read(disk)?;
        let read = &want[..(r.bytes as usize).min(want.len())];
        let sum = fractos_qemu::linux_guest::fnv1a(fractos_qemu::linux_guest::FNV_OFFSET, read);
        if r.fnv != sum || r.bytes != read.len() as u64 {
            bail!(
                "the guest's {} bytes read ({name}) differ from the disk image (checksum {:016x}, want {sum:016x})",
                r.bytes,
                r.fnv
            );
        }
        Ok(if bs == BIG { r.mbps } else { r.iops })
    };
    let mbps = run("linux-guest-128k", BIG, None)?;
    let iops = run("linux-guest-4k", SMALL, Some(a.small_reads))?;
    Ok((mbps, iops))
}

/// Runs `fractos bench nvme`.
pub fn run(a: NvmeArgs) -> anyhow::Result<()> {
    fractos_qemu::node::check_qemu()?;
    anyhow::ensure!(
        a.disk_mib >= 1 && a.small_reads >= 10,
        "--disk-mib >= 1, --small-reads >= 10"
    );
    let dir = super::default_state_dir().join("bench-nvme");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let disk = dir.join("source.img");
    make_disk(&disk, a.disk_mib)?;
    let (app_mbps, app_iops) = appliance(&a, &dir, &disk)?;
    let (lin_mbps, lin_iops) = linux_guest(&a, &dir, &disk)?;
    let report = json!({
        "appliance_read_mbps_128k": app_mbps,
        "linux_guest_read_mbps_128k": lin_mbps,
        "read_ratio_128k": app_mbps / lin_mbps,
        "appliance_iops_4k": app_iops,
        "linux_guest_iops_4k": lin_iops,
        "iops_ratio_4k": app_iops / lin_iops,
        "disk_mib": a.disk_mib,
        "small_reads": a.small_reads,
        "accel": a.accel.name(),
    });
    println!("                         appliance (end to end)   Linux guest (O_DIRECT, in guest)   ratio");
    println!(
        "128 KiB reads, MB/s     {app_mbps:>12.1} {lin_mbps:>24.1} {:>18.3}",
        app_mbps / lin_mbps
    );
    println!(
        "4 KiB reads, IOPS       {app_iops:>12.0} {lin_iops:>24.0} {:>18.3}",
        app_iops / lin_iops
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
