//! Driver tests against the fake controller in `fake`.

use core::time::Duration;

use crate::fake::{FakeClock, FakeConfig, FakeNvme};
use crate::{
    Clock, CommandStatus, Config, DataBuffer, Dma, Instant, NvmeController, NvmeError, PAGE_SIZE,
};

const BLOCK: usize = 512;

fn setup(fc: FakeConfig, cfg: Config) -> (FakeNvme, FakeClock, NvmeController<FakeNvme>) {
    let fake = FakeNvme::new(fc);
    let clock = FakeClock::new(Duration::from_millis(1));
    let ctrl = NvmeController::init(fake.clone(), &clock, cfg).expect("controller comes up");
    (fake, clock, ctrl)
}

fn default_setup() -> (FakeNvme, FakeClock, NvmeController<FakeNvme>) {
    setup(FakeConfig::default(), Config::default())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn dma_with(fake: &FakeNvme, data: &[u8]) -> Dma<FakeNvme> {
    let mut d = Dma::new(fake, data.len().div_ceil(PAGE_SIZE)).unwrap();
    d.write_bytes(0, data);
    d
}

fn read_back(d: &Dma<FakeNvme>, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    d.read_bytes(0, &mut out);
    out
}

/// Polls `qid` (advancing nothing) until a completion shows up.
fn next_completion(
    ctrl: &mut NvmeController<FakeNvme>,
    qid: u16,
    now: Instant,
) -> crate::Completion {
    for _ in 0..10 {
        if let Some(c) = ctrl.poll(qid, now).unwrap() {
            return c;
        }
    }
    panic!("no completion on queue {qid}");
}

#[test]
fn init_resets_enables_identifies_and_creates_queues() {
    let (fake, _clock, ctrl) = default_setup();
    let cc = fake.cc();
    assert_eq!(cc & 1, 1, "CC.EN set");
    assert_eq!((cc >> 16) & 0xF, 6, "IOSQES = 64 bytes");
    assert_eq!((cc >> 20) & 0xF, 4, "IOCQES = 16 bytes");
    assert_eq!((cc >> 7) & 0xF, 0, "MPS = 4 KiB");
    let info = ctrl.controller_info();
    assert_eq!(info.model.as_str(), "FractOS fake NVMe");
    assert_eq!(info.serial.as_str(), "FAKE0001");
    assert_eq!(info.firmware.as_str(), "1.0");
    assert_eq!(info.vendor_id, 0x1b36);
    let ns = ctrl.namespace();
    assert_eq!(
        (ns.nsid, ns.blocks, ns.block_size, ns.lba_format),
        (1, 4096, 512, 1)
    );
    assert_eq!(ns.size_bytes(), 4096 * 512);
    assert_eq!(ctrl.version(), 0x0001_0400);
    assert_eq!(ctrl.io_queues(), 1..=1);
    assert_eq!(fake.io_queue_ids(), vec![1]);
    assert_eq!(fake.io_queue_size(1), Some(64));
    // MDTS 6 → 64 pages of 4 KiB = 512 blocks of 512 bytes.
    assert_eq!(ctrl.max_blocks_per_command(), 512);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn block_size_and_queue_depth_follow_the_controller() {
    let fc = FakeConfig {
        lbads: 12,
        mqes: 7,
        mdts: 0,
        ..FakeConfig::default()
    };
    let (fake, clock, mut ctrl) = setup(fc, Config::default());
    assert_eq!(ctrl.namespace().block_size, 4096);
    assert_eq!(ctrl.io_queue_depth(), 8, "clamped to CAP.MQES + 1");
    assert_eq!(fake.io_queue_size(1), Some(8));
    // No MDTS: the one-PRP-list limit of 512 pages applies.
    assert_eq!(ctrl.max_blocks_per_command(), 512);
    let data = pattern(7, 2 * 4096);
    let src = dma_with(&fake, &data);
    ctrl.write_blocking(1, 3, 2, &src, &clock).unwrap();
    assert_eq!(fake.store(3 * 4096, 2 * 4096), data);
}

#[test]
fn several_queue_pairs_with_a_wide_doorbell_stride() {
    let fc = FakeConfig {
        dstrd: 2,
        max_io_queues: 2,
        ..FakeConfig::default()
    };
    let cfg = Config {
        io_queue_pairs: 3,
        ..Config::default()
    };
    let (fake, clock, mut ctrl) = setup(fc, cfg);
    assert_eq!(ctrl.io_queues(), 1..=2, "the controller granted two");
    assert_eq!(fake.io_queue_ids(), vec![1, 2]);
    for qid in ctrl.io_queues() {
        let data = pattern(qid as u8, 4 * BLOCK);
        let src = dma_with(&fake, &data);
        let mut dst = Dma::new(&fake, 1).unwrap();
        ctrl.write_blocking(qid, 100 * qid as u64, 4, &src, &clock)
            .unwrap();
        ctrl.read_blocking(qid, 100 * qid as u64, 4, &mut dst, &clock)
            .unwrap();
        assert_eq!(read_back(&dst, data.len()), data);
    }
    assert_eq!(ctrl.poll(3, clock.peek()), Err(NvmeError::NoSuchQueue(3)));
    assert_eq!(ctrl.poll(0, clock.peek()), Err(NvmeError::NoSuchQueue(0)));
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn single_page_round_trip() {
    let (fake, clock, mut ctrl) = default_setup();
    let data = pattern(1, PAGE_SIZE);
    let src = dma_with(&fake, &data);
    ctrl.write_blocking(1, 10, 8, &src, &clock).unwrap();
    assert_eq!(fake.store(10 * BLOCK, PAGE_SIZE), data);
    let mut dst = Dma::new(&fake, 1).unwrap();
    ctrl.read_blocking(1, 10, 8, &mut dst, &clock).unwrap();
    assert_eq!(read_back(&dst, PAGE_SIZE), data);
    // One block, too.
    ctrl.read_blocking(1, 11, 1, &mut dst, &clock).unwrap();
    assert_eq!(read_back(&dst, BLOCK), data[BLOCK..2 * BLOCK]);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn two_page_and_prp_list_round_trips() {
    let (fake, clock, mut ctrl) = default_setup();
    // 2 pages: PRP2 is the second page; 16 pages and the 64-page maximum
    // need a PRP list.
    for (seed, pages) in [(2u8, 2usize), (3, 16), (4, 64)] {
        let len = pages * PAGE_SIZE;
        let blocks = (len / BLOCK) as u32;
        let data = pattern(seed, len);
        let src = dma_with(&fake, &data);
        ctrl.write_blocking(1, 64, blocks, &src, &clock).unwrap();
        assert_eq!(fake.store(64 * BLOCK, len), data, "{pages} pages written");
        let mut dst = Dma::new(&fake, pages).unwrap();
        ctrl.read_blocking(1, 64, blocks, &mut dst, &clock).unwrap();
        assert_eq!(read_back(&dst, len), data, "{pages} pages read");
    }
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn largest_transfer_fills_exactly_one_prp_list_page() {
    let fc = FakeConfig {
        blocks: 8192,
        mdts: 0,
        ..FakeConfig::default()
    };
    let (fake, clock, mut ctrl) = setup(fc, Config::default());
    let max = ctrl.max_blocks_per_command();
    assert_eq!(max, 4096, "512 pages of 4 KiB in 512-byte blocks");
    let len = max as usize * BLOCK;
    // Starting 512 bytes into a page, 2 MiB touch 513 pages: PRP1 and a
    // list of 512 entries, the whole list page with no chaining.
    let data = pattern(11, len);
    let mut src = Dma::new(&fake, 513).unwrap();
    src.write_bytes(512, &data);
    let dst = Dma::new(&fake, 513).unwrap();
    let now = clock.now();
    // SAFETY: both buffers are live DMA memory of 513 pages, untouched until
    // the completions are polled.
    unsafe {
        ctrl.submit_write(1, 1000, max, DataBuffer::Contiguous(src.paddr() + 512), now)
            .unwrap();
        assert_eq!(next_completion(&mut ctrl, 1, now).result, Ok(0));
        ctrl.submit_read(1, 1000, max, DataBuffer::Contiguous(dst.paddr() + 512), now)
            .unwrap();
        assert_eq!(next_completion(&mut ctrl, 1, now).result, Ok(0));
    }
    assert_eq!(fake.store(1000 * BLOCK, len), data);
    let mut back = vec![0; len];
    dst.read_bytes(512, &mut back);
    assert_eq!(back, data);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn unaligned_start_and_scattered_pages() {
    let (fake, clock, mut ctrl) = default_setup();
    // A contiguous buffer starting 512 bytes into its first page: 8 KiB
    // then touch three pages (PRP list of two entries).
    let data = pattern(5, 2 * PAGE_SIZE);
    let mut src = Dma::new(&fake, 3).unwrap();
    src.write_bytes(512, &data);
    let now = clock.now();
    // SAFETY: `src` is live DMA memory of three pages, untouched until the
    // completion is polled below.
    let id =
        unsafe { ctrl.submit_write(1, 200, 16, DataBuffer::Contiguous(src.paddr() + 512), now) }
            .unwrap();
    let c = next_completion(&mut ctrl, 1, clock.now());
    assert_eq!((c.id, c.result), (id, Ok(0)));
    assert_eq!(fake.store(200 * BLOCK, data.len()), data);

    // Read it back into four separate pages, in a shuffled order.
    let pages: Vec<Dma<FakeNvme>> = (0..4).map(|_| Dma::new(&fake, 1).unwrap()).collect();
    let order = [2usize, 0, 3, 1];
    let addrs: Vec<u64> = order.iter().map(|&i| pages[i].paddr()).collect();
    let data4 = pattern(6, 4 * PAGE_SIZE);
    fake.fill_store(300 * BLOCK, &data4);
    // SAFETY: the four pages are live DMA memory not accessed until the
    // completion is polled.
    let id =
        unsafe { ctrl.submit_read(1, 300, 32, DataBuffer::Pages(&addrs), clock.now()) }.unwrap();
    let c = next_completion(&mut ctrl, 1, clock.now());
    assert_eq!((c.id, c.result), (id, Ok(0)));
    for (k, &i) in order.iter().enumerate() {
        assert_eq!(
            read_back(&pages[i], PAGE_SIZE),
            data4[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
            "page {k}"
        );
    }
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn bad_buffers_and_sizes_are_refused_before_submission() {
    let (fake, clock, mut ctrl) = default_setup();
    let buf = Dma::new(&fake, 1).unwrap();
    let now = clock.now();
    let p = buf.paddr();
    // SAFETY: every call below is refused before the controller sees it,
    // which the assertion on `io_commands` checks.
    unsafe {
        assert_eq!(
            ctrl.submit_read(1, 0, 0, DataBuffer::Contiguous(p), now),
            Err(NvmeError::ZeroLength)
        );
        assert_eq!(
            ctrl.submit_read(1, 0, 513, DataBuffer::Contiguous(p), now),
            Err(NvmeError::TransferTooLarge {
                blocks: 513,
                max: 512
            })
        );
        assert!(matches!(
            ctrl.submit_read(1, 0, 1, DataBuffer::Contiguous(p + 2), now),
            Err(NvmeError::InvalidBuffer(_))
        ));
        assert!(matches!(
            ctrl.submit_read(1, 0, 24, DataBuffer::Pages(&[p, p + 4096]), now),
            Err(NvmeError::InvalidBuffer(_))
        ));
        assert!(matches!(
            ctrl.submit_read(
                1,
                0,
                24,
                DataBuffer::Pages(&[p, p + 4096, p + 8192 + 8]),
                now
            ),
            Err(NvmeError::InvalidBuffer(_))
        ));
        assert_eq!(
            ctrl.submit_read(2, 0, 1, DataBuffer::Contiguous(p), now),
            Err(NvmeError::NoSuchQueue(2))
        );
    }
    let mut small = Dma::new(&fake, 1).unwrap();
    assert!(matches!(
        ctrl.read_blocking(1, 0, 9, &mut small, &clock),
        Err(NvmeError::InvalidBuffer(_))
    ));
    assert_eq!(fake.io_commands(), 0);
    assert_eq!(ctrl.in_flight(1), 0);
}

#[test]
fn flush_reaches_the_device() {
    let (fake, clock, mut ctrl) = default_setup();
    assert!(ctrl.controller_info().volatile_write_cache);
    ctrl.flush_blocking(1, &clock).unwrap();
    ctrl.flush_blocking(1, &clock).unwrap();
    assert_eq!(fake.flushes(), 2);
}

#[test]
fn lba_out_of_range_is_a_typed_error_and_the_queue_stays_usable() {
    let (fake, clock, mut ctrl) = default_setup();
    let mut buf = Dma::new(&fake, 1).unwrap();
    // Last block is 4095: 4095 + 2 blocks runs past the end.
    let err = ctrl
        .read_blocking(1, 4095, 2, &mut buf, &clock)
        .unwrap_err();
    assert_eq!(
        err,
        NvmeError::Status {
            status: CommandStatus::LbaOutOfRange,
            dnr: false
        }
    );
    assert_eq!(
        ctrl.write_blocking(1, u64::MAX, 1, &buf, &clock),
        Err(NvmeError::Status {
            status: CommandStatus::LbaOutOfRange,
            dnr: false
        })
    );
    ctrl.read_blocking(1, 4095, 1, &mut buf, &clock).unwrap();
    ctrl.check_health().unwrap();
}

#[test]
fn media_error_decodes_to_its_status() {
    let (fake, clock, mut ctrl) = default_setup();
    fake.set_media_error(Some(42));
    let mut buf = Dma::new(&fake, 1).unwrap();
    assert_eq!(
        ctrl.read_blocking(1, 40, 8, &mut buf, &clock),
        Err(NvmeError::Status {
            status: CommandStatus::UnrecoveredReadError,
            dnr: false
        })
    );
    ctrl.read_blocking(1, 43, 8, &mut buf, &clock).unwrap();
}

#[test]
fn missing_namespace_fails_identify() {
    let fake = FakeNvme::new(FakeConfig::default());
    let clock = FakeClock::new(Duration::from_millis(1));
    let cfg = Config {
        nsid: 2,
        ..Config::default()
    };
    let err = NvmeController::init(fake.clone(), &clock, cfg).unwrap_err();
    assert_eq!(
        err,
        NvmeError::Status {
            status: CommandStatus::InvalidNamespace,
            dnr: false
        }
    );
    assert_eq!(
        fake.cc() & 1,
        0,
        "a failed init leaves the controller disabled"
    );
    assert_eq!(fake.live_allocations(), 0, "and frees its memory");
}

#[test]
fn enable_that_never_finishes_times_out_after_cap_to() {
    let fake = FakeNvme::new(FakeConfig {
        hang_enable: true,
        timeout_units: 4,
        ..FakeConfig::default()
    });
    let clock = FakeClock::new(Duration::from_millis(1));
    let err = NvmeController::init(fake.clone(), &clock, Config::default()).unwrap_err();
    assert_eq!(err, NvmeError::EnableTimeout(Duration::from_secs(2)));
    let waited = clock.peek().as_nanos();
    assert!(
        (2_000_000_000..2_100_000_000).contains(&waited),
        "waited {waited} ns"
    );
}

#[test]
fn reset_that_never_finishes_times_out_and_leaks_instead_of_freeing() {
    let (fake, clock, first) = default_setup();
    let before = fake.live_allocations();
    fake.set_hang_reset(true);
    // A second driver finds the controller enabled and must reset it.
    let err = NvmeController::init(fake.clone(), &clock, Config::default()).unwrap_err();
    assert_eq!(err, NvmeError::ResetTimeout(Duration::from_secs(1)));
    // Dropping the first driver: the controller never confirms the reset,
    // so its queues must not be freed.
    drop(first);
    assert_eq!(fake.live_allocations(), before);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn command_that_never_completes_times_out() {
    let (fake, _clock, mut ctrl) = default_setup();
    fake.swallow_io_opcode(Some(0x02));
    let buf = Dma::new(&fake, 1).unwrap();
    let t0 = Instant::from_nanos(1_000_000_000);
    // SAFETY: `buf` is live DMA memory that the test drops only after the
    // controller (explicit drops at the end).
    let id = unsafe { ctrl.submit_read(1, 0, 1, DataBuffer::Contiguous(buf.paddr()), t0) }.unwrap();
    assert_eq!(ctrl.poll(1, t0 + Duration::from_millis(4999)), Ok(None));
    assert_eq!(ctrl.in_flight(1), 1);
    let c = ctrl.poll(1, t0 + Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(c.id, id);
    assert_eq!(c.result, Err(NvmeError::CommandTimeout(id)));
    assert_eq!(ctrl.in_flight(1), 0);
    assert_eq!(
        ctrl.poll(1, t0 + Duration::from_secs(60)),
        Ok(None),
        "reported once"
    );
    // Other commands still work; the timed-out id is not reused.
    fake.swallow_io_opcode(None);
    let data = pattern(9, BLOCK);
    let src = dma_with(&fake, &data);
    // SAFETY: `src` lives until the completion below.
    let id2 =
        unsafe { ctrl.submit_write(1, 5, 1, DataBuffer::Contiguous(src.paddr()), t0) }.unwrap();
    assert_ne!(id2, id);
    let c = next_completion(&mut ctrl, 1, t0);
    assert_eq!((c.id, c.result), (id2, Ok(0)));
    drop(ctrl);
    drop(buf);
}

#[test]
fn deadlines_expire_one_by_one_in_their_own_time() {
    let (fake, _clock, mut ctrl) = default_setup();
    fake.set_auto(false);
    let buf = Dma::new(&fake, 1).unwrap();
    let t0 = Instant::from_nanos(0);
    let submit = |ctrl: &mut NvmeController<FakeNvme>, at: Instant| {
        // SAFETY: `buf` is live DMA memory until the end of the test, after
        // the controller is dropped.
        unsafe { ctrl.submit_read(1, 0, 1, DataBuffer::Contiguous(buf.paddr()), at) }.unwrap()
    };
    let a = submit(&mut ctrl, t0);
    let b = submit(&mut ctrl, t0 + Duration::from_secs(1));
    let c = submit(&mut ctrl, t0 + Duration::from_secs(3));
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(ctrl.poll(1, at(4)), Ok(None));
    assert_eq!(ctrl.poll(1, at(5)).unwrap().unwrap().id, a);
    assert_eq!(ctrl.poll(1, at(5)), Ok(None));
    assert_eq!(ctrl.poll(1, at(6)).unwrap().unwrap().id, b);
    assert_eq!(ctrl.poll(1, at(7)), Ok(None));
    let last = ctrl.poll(1, at(8)).unwrap().unwrap();
    assert_eq!(
        (last.id, last.result),
        (c, Err(NvmeError::CommandTimeout(c)))
    );
    assert_eq!(ctrl.in_flight(1), 0);
    drop(ctrl);
    drop(buf);
}

#[test]
fn late_completion_after_a_timeout_is_consumed_and_frees_the_id() {
    let cfg = Config {
        io_queue_depth: 2,
        ..Config::default()
    };
    let (fake, _clock, mut ctrl) = setup(FakeConfig::default(), cfg);
    fake.set_auto(false);
    let buf = Dma::new(&fake, 1).unwrap();
    let t0 = Instant::from_nanos(0);
    // SAFETY: `buf` is live DMA memory until the end of the test.
    let id = unsafe { ctrl.submit_read(1, 0, 1, DataBuffer::Contiguous(buf.paddr()), t0) }.unwrap();
    let late = t0 + Duration::from_secs(6);
    let c = ctrl.poll(1, late).unwrap().unwrap();
    assert_eq!(c.result, Err(NvmeError::CommandTimeout(id)));
    // Depth 2 holds one command: the abandoned id still blocks the queue
    // until the controller answers.
    // SAFETY: refused, as asserted.
    let blocked = unsafe { ctrl.submit_read(1, 0, 1, DataBuffer::Contiguous(buf.paddr()), late) };
    assert_eq!(blocked, Err(NvmeError::QueueFull { qid: 1 }));
    fake.step();
    assert_eq!(ctrl.poll(1, late), Ok(None), "late completion swallowed");
    // SAFETY: as above.
    let again = unsafe { ctrl.submit_read(1, 0, 1, DataBuffer::Contiguous(buf.paddr()), late) };
    assert!(again.is_ok(), "{again:?}");
    fake.step();
    let c = ctrl.poll(1, late).unwrap().unwrap();
    assert_eq!(c.result, Ok(0));
}

#[test]
fn blocking_timeout_disables_the_controller() {
    let (fake, clock, mut ctrl) = default_setup();
    fake.swallow_io_opcode(Some(0x00));
    let err = ctrl.flush_blocking(1, &clock).unwrap_err();
    assert!(matches!(err, NvmeError::CommandTimeout(_)), "{err:?}");
    assert_eq!(fake.cc() & 1, 0, "CC.EN cleared");
    assert_eq!(
        ctrl.flush_blocking(1, &clock),
        Err(NvmeError::ControllerFatal)
    );
    assert_eq!(ctrl.check_health(), Err(NvmeError::ControllerFatal));
}

#[test]
fn full_queue_pushes_back_without_overwriting() {
    let cfg = Config {
        io_queue_depth: 4,
        ..Config::default()
    };
    let (fake, clock, mut ctrl) = setup(FakeConfig::default(), cfg);
    fake.set_auto(false);
    let now = clock.now();
    let bufs: Vec<Dma<FakeNvme>> = (0..4u8)
        .map(|i| dma_with(&fake, &pattern(i, BLOCK)))
        .collect();
    let mut ids = Vec::new();
    for (i, b) in bufs.iter().take(3).enumerate() {
        // SAFETY: the buffers live until the end of the test.
        let id =
            unsafe { ctrl.submit_write(1, i as u64, 1, DataBuffer::Contiguous(b.paddr()), now) };
        ids.push(id.unwrap());
    }
    // SAFETY: refused, as asserted.
    let full = unsafe { ctrl.submit_write(1, 3, 1, DataBuffer::Contiguous(bufs[3].paddr()), now) };
    assert_eq!(full, Err(NvmeError::QueueFull { qid: 1 }));
    assert_eq!(ctrl.in_flight(1), 3);
    fake.step();
    let mut done: Vec<_> = (0..3).map(|_| next_completion(&mut ctrl, 1, now)).collect();
    done.sort_by_key(|c| c.id);
    assert_eq!(done.iter().map(|c| c.id).collect::<Vec<_>>(), ids);
    assert!(done.iter().all(|c| c.result == Ok(0)));
    // Only the three accepted writes reached the disk, each intact.
    for i in 0..3 {
        assert_eq!(fake.store(i * BLOCK, BLOCK), pattern(i as u8, BLOCK));
    }
    assert_eq!(fake.store(3 * BLOCK, BLOCK), vec![0; BLOCK]);
    // SAFETY: as above.
    let retry = unsafe { ctrl.submit_write(1, 3, 1, DataBuffer::Contiguous(bufs[3].paddr()), now) };
    assert!(retry.is_ok());
    fake.step();
    assert_eq!(next_completion(&mut ctrl, 1, now).result, Ok(0));
    assert_eq!(fake.store(3 * BLOCK, BLOCK), pattern(3, BLOCK));
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn many_commands_wrap_the_rings_and_flip_the_phase() {
    let cfg = Config {
        io_queue_depth: 4,
        admin_queue_depth: 2,
        ..Config::default()
    };
    let (fake, clock, mut ctrl) = setup(FakeConfig::default(), cfg);
    let mut buf = Dma::new(&fake, 1).unwrap();
    for i in 0..25u64 {
        let data = pattern(i as u8, BLOCK);
        buf.write_bytes(0, &data);
        ctrl.write_blocking(1, i, 1, &buf, &clock).unwrap();
        buf.write_bytes(0, &[0; BLOCK]);
        ctrl.read_blocking(1, i, 1, &mut buf, &clock).unwrap();
        assert_eq!(read_back(&buf, BLOCK), data, "round {i}");
    }
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn controller_fatal_status_is_reported() {
    let (fake, clock, mut ctrl) = default_setup();
    let buf = Dma::new(&fake, 1).unwrap();
    fake.set_fatal();
    assert_eq!(ctrl.check_health(), Err(NvmeError::ControllerFatal));
    let t0 = clock.now();
    // SAFETY: `buf` lives until after the controller is dropped.
    unsafe { ctrl.submit_read(1, 0, 1, DataBuffer::Contiguous(buf.paddr()), t0) }.unwrap();
    assert_eq!(ctrl.poll(1, t0), Ok(None), "not yet expired");
    assert_eq!(
        ctrl.poll(1, t0 + Duration::from_secs(5)),
        Err(NvmeError::ControllerFatal)
    );
    // The blocking path disables the controller on a fatal status.
    let mut b2 = Dma::new(&fake, 1).unwrap();
    assert_eq!(ctrl.check_health(), Err(NvmeError::ControllerFatal));
    let r = ctrl.read_blocking(1, 0, 1, &mut b2, &clock);
    assert_eq!(
        r,
        Err(NvmeError::QueueFull { qid: 1 }),
        "a command is still in flight"
    );
    drop(ctrl);
    drop(buf);
}

#[test]
fn admin_command_that_never_completes_fails_init_and_disables() {
    let fake = FakeNvme::new(FakeConfig::default());
    fake.swallow_admin_opcode(Some(0x05)); // Create I/O Completion Queue
    let clock = FakeClock::new(Duration::from_millis(1));
    let err = NvmeController::init(fake.clone(), &clock, Config::default()).unwrap_err();
    assert!(
        matches!(err, NvmeError::CommandTimeout(id) if id.qid == 0),
        "{err:?}"
    );
    assert_eq!(fake.cc() & 1, 0);
    assert_eq!(fake.live_allocations(), 0, "reset confirmed, memory freed");
}

#[test]
fn fatal_status_at_enable_fails_init() {
    let fake = FakeNvme::new(FakeConfig::default());
    fake.set_fatal();
    let clock = FakeClock::new(Duration::from_millis(1));
    let err = NvmeController::init(fake.clone(), &clock, Config::default()).unwrap_err();
    assert_eq!(err, NvmeError::ControllerFatal);
    assert_eq!(fake.live_allocations(), 0);
}

#[test]
fn shutdown_and_drop_release_everything() {
    let (fake, clock, ctrl) = default_setup();
    ctrl.shutdown(&clock).unwrap();
    assert_eq!(fake.cc() & 1, 0);
    assert_eq!(fake.live_allocations(), 0);

    let (fake, _clock, ctrl) = default_setup();
    assert!(fake.live_allocations() > 0);
    drop(ctrl);
    assert_eq!(fake.cc() & 1, 0, "drop disables the controller");
    assert_eq!(fake.live_allocations(), 0);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

/// Fills the fake's disk with `pattern(seed)`, `blocks` blocks from 0.
fn fill_disk(fake: &FakeNvme, blocks: usize, seed: u8) -> Vec<u8> {
    let data = pattern(seed, blocks * BLOCK);
    fake.fill_store(0, &data);
    data
}

#[test]
fn eight_multi_page_reads_in_flight_complete_out_of_order_into_their_own_buffers() {
    let (fake, clock, mut ctrl) = default_setup();
    let disk = fill_disk(&fake, 8 * 24, 7);
    fake.set_auto(false);
    fake.set_complete_in_reverse(true);
    let now = clock.now();
    // 24 blocks = 3 pages each: PRP1 + a PRP list per command.
    let len = 24 * BLOCK;
    let bufs: Vec<Dma<FakeNvme>> = (0..8)
        .map(|_| Dma::new(&fake, len / PAGE_SIZE).unwrap())
        .collect();
    let mut ids = Vec::new();
    for (i, b) in bufs.iter().enumerate() {
        // SAFETY: the buffers live until the end of the test and are not
        // touched until their completion has been polled.
        let id = unsafe {
            ctrl.submit_read(
                1,
                (i * 24) as u64,
                24,
                DataBuffer::Contiguous(b.paddr()),
                now,
            )
        };
        ids.push(id.unwrap());
    }
    assert_eq!(ctrl.in_flight(1), 8);
    fake.step();
    let order: Vec<_> = (0..8)
        .map(|_| next_completion(&mut ctrl, 1, now))
        .inspect(|c| assert_eq!(c.result, Ok(0)))
        .map(|c| c.id)
        .collect();
    let mut reversed = ids.clone();
    reversed.reverse();
    assert_eq!(order, reversed, "completions come back last first");
    assert_eq!(ctrl.in_flight(1), 0);
    for (i, b) in bufs.iter().enumerate() {
        assert_eq!(
            read_back(b, len),
            disk[i * len..(i + 1) * len],
            "buffer {i} got another command's data"
        );
    }
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn queue_wraps_with_eight_in_flight_and_ids_reused_out_of_order() {
    let cfg = Config {
        io_queue_depth: 11,
        ..Config::default()
    };
    let (fake, clock, mut ctrl) = setup(FakeConfig::default(), cfg);
    let disk = fill_disk(&fake, 512, 3);
    fake.set_auto(false);
    let now = clock.now();
    let bufs: Vec<Dma<FakeNvme>> = (0..8).map(|_| Dma::new(&fake, 1).unwrap()).collect();
    // Which buffer each command id reads into, and which block.
    let mut pending = std::collections::BTreeMap::new();
    let mut free: Vec<usize> = (0..8).collect();
    let (mut next_block, mut checked) = (0u64, 0);
    for round in 0..40 {
        // Keep eight in flight: the ring (11 entries) wraps every few rounds.
        while let Some(slot) = free.pop() {
            let b = &bufs[slot];
            // SAFETY: `b` is not read until this command completes.
            let id = unsafe {
                ctrl.submit_read(
                    1,
                    next_block % 512,
                    1,
                    DataBuffer::Contiguous(b.paddr()),
                    now,
                )
            }
            .unwrap();
            assert!(pending.insert(id, (slot, next_block % 512)).is_none());
            next_block += 1;
        }
        assert_eq!(ctrl.in_flight(1), 8);
        fake.set_complete_in_reverse(round % 2 == 1);
        fake.step();
        while let Some(c) = ctrl.poll(1, now).unwrap() {
            assert_eq!(c.result, Ok(0));
            let (slot, block) = pending.remove(&c.id).expect("an id in flight");
            let at = block as usize * BLOCK;
            assert_eq!(read_back(&bufs[slot], BLOCK), disk[at..at + BLOCK]);
            free.push(slot);
            checked += 1;
        }
    }
    assert_eq!(checked, 40 * 8);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn transfers_split_into_commands_within_the_limit() {
    use crate::{split_transfer, Chunk};
    let c = |lba, blocks, skip| Chunk { lba, blocks, skip };
    assert_eq!(split_transfer(5, 0, 8).count(), 0);
    assert_eq!(split_transfer(5, 3, 8).collect::<Vec<_>>(), [c(5, 3, 0)]);
    assert_eq!(
        split_transfer(10, 20, 8).collect::<Vec<_>>(),
        [c(10, 8, 0), c(18, 8, 8), c(26, 4, 16)]
    );
    assert_eq!(split_transfer(0, 2, 0).count(), 2, "a zero limit is 1");

    // A read four times larger than one command, split and in flight at
    // once into one buffer, arrives whole.
    let (fake, clock, mut ctrl) = setup(
        FakeConfig {
            mdts: 1,
            ..FakeConfig::default()
        },
        Config::default(),
    );
    let max = ctrl.max_blocks_per_command();
    assert_eq!(max, 16, "MDTS 1: two pages of 4 KiB");
    let disk = fill_disk(&fake, 4 * max as usize + 3, 9);
    let blocks = 4 * u64::from(max) + 3;
    let len = blocks as usize * BLOCK;
    let buf = Dma::new(&fake, len.div_ceil(PAGE_SIZE)).unwrap();
    fake.set_auto(false);
    let now = clock.now();
    let mut n = 0;
    for chunk in split_transfer(0, blocks, max) {
        let at = buf.paddr() + chunk.skip * BLOCK as u64;
        // SAFETY: each command gets its own part of `buf`, untouched until
        // all have completed.
        let whole = unsafe {
            ctrl.submit_read(1, chunk.lba, chunk.blocks, DataBuffer::Contiguous(at), now)
        };
        whole.unwrap();
        n += 1;
    }
    assert_eq!(n, 5);
    // SAFETY: refused before submission, as asserted.
    let too_big =
        unsafe { ctrl.submit_read(1, 0, max + 1, DataBuffer::Contiguous(buf.paddr()), now) };
    assert_eq!(
        too_big,
        Err(NvmeError::TransferTooLarge {
            blocks: max + 1,
            max
        })
    );
    fake.set_complete_in_reverse(true);
    fake.step();
    for _ in 0..n {
        assert_eq!(next_completion(&mut ctrl, 1, now).result, Ok(0));
    }
    assert_eq!(read_back(&buf, len), disk[..len]);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}
