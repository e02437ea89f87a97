//! `fractos bench nvme`: read throughput (128 KiB reads) and IOPS (4 KiB
//! reads, one at a time, and 4 KiB reads at strided "random" offsets with
//! [`QD`] in flight) of the appliance's built-in storage service end to end
//! into a Linux adaptor's memory, next to the same QEMU NVMe disk image read
//! with `O_DIRECT` inside a Debian Linux guest (the deep reads by as many
//! guest threads), in the same run. The adaptor attaches through a
//! shared-memory slot of the appliance by default (`--transport tcp`: over
//! TCP), so block-aligned reads land in its memory by NVMe DMA.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use fractos_adaptors::demo::{attach_slot_to, attach_to, DemoTransport, DEMO_KEY};
use fractos_qemu::build::Workspace;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_qemu::linux_guest::{LinuxGuest, ReadSpec, GUEST_MEMORY_MIB};
use fractos_qemu::node::{Accel, NvmeDisk};
use fractos_sdk::wire::Rights;
use fractos_sdk::{MemoryCap, Pending, RequestCap};
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
    /// How the benchmark's adaptor attaches to the appliance: `slot` (a
    /// shared-memory slot of the appliance: the NVMe controller DMAs
    /// block-aligned reads straight into the adaptor's memory) or `tcp`
    /// (the old path, for comparison).
    #[arg(long, default_value = "slot")]
    pub transport: DemoTransport,
}

const BIG: u64 = 128 * 1024;
const SMALL: u64 = 4096;
const DONE: u64 = 0xbe_00d0;
const ERR: u64 = 0xbe_00e0;
/// Reads in flight in the deep 4 KiB run.
const QD: u64 = 8;
/// Read `i` of the 4 KiB runs is at block `i * STRIDE` modulo the disk's
/// 4 KiB blocks (prime: a permutation that jumps around the disk).
const STRIDE: u64 = 7919;

/// Appliance or guest figures: 128 KiB MB/s, 4 KiB IOPS one at a time,
/// 4 KiB IOPS with [`QD`] in flight.
struct Figures {
    mbps: f64,
    iops: f64,
    iops_qd: f64,
    /// Appliance only: mean time an NVMe command spent in flight, as the
    /// appliance saw it (µs), in the 128 KiB run and the 4 KiB run.
    device_us: Option<(f64, f64)>,
}

/// The storage service's (device seconds in flight, commands) so far.
fn device_counters(metrics: std::net::SocketAddr) -> anyhow::Result<(f64, f64)> {
    let m = fractos_adaptors::demo::scrape_metrics(metrics)?;
    let value = |prefix: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no {prefix} in the appliance's metrics"))
    };
    Ok((
        value("fractos_storage_device_seconds_total{node=\"0\"} ")?,
        value("fractos_storage_commands_total{node=\"0\"} ")?,
    ))
}

/// Mean µs per command between two [`device_counters`] samples.
fn per_command_us(before: (f64, f64), after: (f64, f64)) -> f64 {
    (after.0 - before.0) * 1e6 / (after.1 - before.1).max(1.0)
}

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

/// One of the [`QD`] reads in flight: its window and continuations, and
/// the read (index, invoke acknowledgement) it serves.
struct Slot {
    window: MemoryCap,
    done: RequestCap,
    err: RequestCap,
    read: Option<(u64, Pending<()>)>,
}

/// Byte offset of 4 KiB read `i` on a disk of `disk_mib`.
fn strided(i: u64, disk_mib: u64) -> u64 {
    let span = (disk_mib << 20) / SMALL;
    (i * STRIDE % span) * SMALL
}

/// 128 KiB reads over the whole disk, 4 KiB reads one at a time and with
/// [`QD`] in flight.
fn appliance(a: &NvmeArgs, dir: &Path, disk: &Path) -> anyhow::Result<Figures> {
    let kernel = super::kernel_or_build(&a.kernel)?;
    let mut setup = ControllerSetup::new(1, DEMO_KEY)?;
    if a.transport == DemoTransport::Local {
        setup.shm_slots = 1;
    }
    let spec = ClusterSpec {
        memory_mib: GUEST_MEMORY_MIB,
        nvme_mib: vec![a.disk_mib],
        accel: a.accel,
        firmware: fractos_qemu::node::Firmware::Bios,
        ..ClusterSpec::controllers(kernel, dir.join("appliance"), setup.clone())
    };
    std::fs::create_dir_all(&spec.state_dir)?;
    std::fs::copy(disk, spec.node(0).nvme[0].path.clone()).context("placing the disk image")?;
    let mut c = Cluster::launch(&spec)?;
    c.wait_ready(Duration::from_secs(300))?;
    let p = match a.transport {
        DemoTransport::Local => attach_slot_to(&setup.slot_paths(0)[0], "bench-nvme")?,
        DemoTransport::Tcp => attach_to(setup.process_addr(0).expect("one node"), "bench-nvme")?,
    };
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
    let one = |offset: u64, dst: MemoryCap, len: u64| -> anyhow::Result<()> {
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
    let metrics = setup.metrics_addr(0).expect("one node");
    let d0 = device_counters(metrics)?;
    let mut spent = Duration::ZERO;
    for i in 0..blocks {
        spent += timed_read(i * BIG, big, BIG)?;
    }
    let mbps = (blocks * BIG) as f64 / spent.as_secs_f64() / 1e6;
    let d1 = device_counters(metrics)?;
    let mut spent = Duration::ZERO;
    for i in 0..a.small_reads {
        spent += timed_read(strided(i, a.disk_mib), small, SMALL)?;
    }
    let iops = a.small_reads as f64 / spent.as_secs_f64();
    let d2 = device_counters(metrics)?;
    let device_us = Some((per_command_us(d0, d1), per_command_us(d1, d2)));

    // QD reads in flight, each into its own 4 KiB window of the region with
    // its own done/err continuations; a finished window is checked against
    // the disk image, scribbled over and reused at once (both take
    // microseconds; the reads take milliseconds).
    let mut slots = Vec::new();
    for k in 0..QD {
        slots.push(Slot {
            window: p.diminish(&big, k * SMALL, SMALL, Rights::WRITE)?,
            done: p.request_create(DONE + 1 + k, &[], &[])?,
            err: p.request_create(ERR + 1 + k, &[], &[])?,
            read: None,
        });
    }
    let n = a.small_reads;
    let issue = |slot: &mut Slot, k: u64, i: u64| -> anyhow::Result<()> {
        let offset = strided(i, a.disk_mib);
        region.with_bytes_mut(|b| {
            let w = &mut b[(k * SMALL) as usize..((k + 1) * SMALL) as usize];
            fractos_adaptors::bench::fill_pattern(w, i + 1);
        });
        let mut imms = offset.to_le_bytes().to_vec();
        imms.extend_from_slice(&SMALL.to_le_bytes());
        let caps = [slot.window.into(), slot.done.into(), slot.err.into()];
        slot.read = Some((i, p.start_invoke(&read, &imms, &caps)?));
        Ok(())
    };
    let t = Instant::now();
    let mut next = 0;
    for (k, slot) in slots.iter_mut().enumerate().take(n as usize) {
        issue(slot, k as u64, next)?;
        next += 1;
    }
    for _ in 0..n {
        let inv = p.next_invocation_timeout(wait)?;
        let k = match inv.tag {
            t if (DONE + 1..=DONE + QD).contains(&t) => t - DONE - 1,
            t if (ERR + 1..=ERR + QD).contains(&t) => {
                bail!("a deep read failed: status {:?}", inv.imms)
            }
            t => bail!("unexpected invocation {t:#x}"),
        };
        let slot = &mut slots[k as usize];
        let (i, ack) = slot
            .read
            .take()
            .context("a done for a read not in flight")?;
        ack.wait()?;
        let offset = strided(i, a.disk_mib) as usize;
        let expected = &want[offset..offset + SMALL as usize];
        let at = (k * SMALL) as usize;
        if let Some(d) = region.with_bytes(|b| {
            fractos_adaptors::bench::first_difference(&b[at..at + SMALL as usize], expected)
        }) {
            bail!("the deep read at {offset} differs from the disk image at byte {d}");
        }
        if next < n {
            issue(slot, k, next)?;
            next += 1;
        }
    }
    let iops_qd = n as f64 / t.elapsed().as_secs_f64();
    Ok(Figures {
        mbps,
        iops,
        iops_qd,
        device_us,
    })
}

/// The same disk read inside a Debian Linux guest.
fn linux_guest(a: &NvmeArgs, dir: &Path, disk: &Path) -> anyhow::Result<Figures> {
    eprintln!("preparing the Debian Linux guest…");
    let mut guest = LinuxGuest::prepare(&Workspace::locate())?;
    // Like with like: the guest runs on the appliance's accelerator.
    guest.accel = a.accel;
    let want = std::fs::read(disk)?;
    let run = |name: &str, bs: u64, count: Option<u64>, qd: Option<u32>| -> anyhow::Result<f64> {
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
                queue_depth: qd,
                stride: qd.map(|_| STRIDE),
            },
            dir,
            Duration::from_secs(600),
        )?;
        // Every byte the guest read must be the disk image's: sequential
        // from offset 0, or (deep reads) read `i` at `strided(i)`.
        use fractos_qemu::linux_guest::{fnv1a, FNV_OFFSET};
        let (sum, len) = match qd {
            None => {
                let read = &want[..(r.bytes as usize).min(want.len())];
                (fnv1a(FNV_OFFSET, read), read.len() as u64)
            }
            Some(_) => (0..count.unwrap_or(0)).fold((FNV_OFFSET, 0), |(h, len), i| {
                let at = strided(i, a.disk_mib) as usize;
                (fnv1a(h, &want[at..at + bs as usize]), len + bs)
            }),
        };
        if r.fnv != sum || r.bytes != len {
            bail!(
                "the guest's {} bytes read ({name}) differ from the disk image (checksum {:016x}, want {sum:016x})",
                r.bytes,
                r.fnv
            );
        }
        Ok(if bs == BIG { r.mbps } else { r.iops })
    };
    let mbps = run("linux-guest-128k", BIG, None, None)?;
    let iops = run("linux-guest-4k", SMALL, Some(a.small_reads), None)?;
    let iops_qd = run(
        "linux-guest-4k-qd8",
        SMALL,
        Some(a.small_reads),
        Some(QD as u32),
    )?;
    Ok(Figures {
        mbps,
        iops,
        iops_qd,
        device_us: None,
    })
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
    let app = appliance(&a, &dir, &disk)?;
    let lin = linux_guest(&a, &dir, &disk)?;
    let report = json!({
        "appliance_read_mbps_128k": app.mbps,
        "linux_guest_read_mbps_128k": lin.mbps,
        "read_ratio_128k": app.mbps / lin.mbps,
        "appliance_iops_4k": app.iops,
        "linux_guest_iops_4k": lin.iops,
        "iops_ratio_4k": app.iops / lin.iops,
        "appliance_iops_4k_qd8": app.iops_qd,
        "linux_guest_iops_4k_qd8": lin.iops_qd,
        "iops_ratio_4k_qd8": app.iops_qd / lin.iops_qd,
        "disk_mib": a.disk_mib,
        "small_reads": a.small_reads,
        "appliance_nvme_command_us_128k": app.device_us.map(|d| d.0),
        "appliance_nvme_command_us_4k": app.device_us.map(|d| d.1),
        "appliance_read_us_4k": 1e6 / app.iops,
        "accel": a.accel.name(),
        "transport": match a.transport {
            DemoTransport::Local => "slot",
            DemoTransport::Tcp => "tcp",
        },
    });
    println!("                         appliance (end to end)   Linux guest (O_DIRECT, in guest)   ratio");
    println!(
        "128 KiB reads, MB/s     {:>12.1} {:>24.1} {:>18.3}",
        app.mbps,
        lin.mbps,
        app.mbps / lin.mbps
    );
    println!(
        "4 KiB reads, IOPS       {:>12.0} {:>24.0} {:>18.3}",
        app.iops,
        lin.iops,
        app.iops / lin.iops
    );
    println!(
        "4 KiB random, QD {QD}, IOPS {:>10.0} {:>24.0} {:>18.3}",
        app.iops_qd,
        lin.iops_qd,
        app.iops_qd / lin.iops_qd
    );
    if let Some((big_us, small_us)) = app.device_us {
        println!(
            "appliance: an NVMe command in flight {big_us:.0} µs per 128 KiB read, {small_us:.0} µs per 4 KiB read (of {:.0} µs end to end)",
            1e6 / app.iops
        );
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
