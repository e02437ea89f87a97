//! Host tests of the built-in storage service (`storage.rs`): a
//! [`StorageProcess`] over a fake in-memory [`BlockDevice`], attached as a
//! local process to a real controller core, and a test client process on a
//! second channel that speaks the process protocol and serves the core's
//! accesses to its own memory.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use fractos_core::MemAccess;
use fractos_core::{
    process_token, ChannelId, Config, Controller, Dest, Instant, LinkId, LinkRole, Output,
};
use fractos_kernel::storage::{
    BlockDevice, DeviceError, DeviceGrant, DeviceWrites, DmaTarget, Io, IoDone, LocalProcess,
    StorageProcess, StorageStatus,
};
use fractos_wire::{
    frame_body, CapInfo, ControllerMsg, ErrorCode, Handle, NodeId, ObjectKind, ProcessMsg, Reply,
    Rights, FRAME_HEADER_LEN, MAX_FRAME_LEN,
};

const KEY: [u8; 32] = [9; 32];
const BS: usize = 512;
/// 128 KiB: larger than the DMA pool.
const BLOCKS: usize = 256;
const STAGING: usize = 64 * 1024;
const READ_NAME: &str = "storage/0/read";
const WRITE_NAME: &str = "storage/0/write";
/// Size of the client's memory (registered from address 0).
const CLIENT_MEM: usize = 64 * 1024;
/// Tags of the client's own Requests.
const TAG_DONE: u64 = 0xd0;
const TAG_ERR: u64 = 0xe0;

/// An invocation as the client sees it: tag, immediates, capabilities.
type Delivered = (u64, Vec<u8>, Vec<(Handle, CapInfo)>);

// ---------------------------------------------------------------------------
// A fake block device.

#[derive(Default)]
struct DiskState {
    data: Vec<u8>,
    /// The DMA pool.
    buf: Vec<u8>,
    reads: u64,
    writes: u64,
    flushes: u64,
    fail_read: bool,
    fail_write: bool,
    fail_flush: bool,
    /// Commands are carried out when submitted; their completions wait
    /// here for `poll`.
    done: VecDeque<IoDone>,
    /// Reads into physical targets (DMA into a process's memory): address
    /// and bytes, applied to the client's memory by the harness.
    dma: Vec<(u64, Vec<u8>)>,
}

#[derive(Clone)]
struct Disk(Rc<RefCell<DiskState>>);

fn pattern(i: usize) -> u8 {
    (i * 31 + 7) as u8
}

impl Disk {
    fn new() -> Self {
        Disk(Rc::new(RefCell::new(DiskState {
            data: (0..BS * BLOCKS).map(pattern).collect(),
            buf: vec![0; STAGING],
            ..DiskState::default()
        })))
    }
}

/// Where the client's memory appears to devices (its "slot").
const PHYS_BASE: u64 = 0x8000_0000;

/// The pool bytes `[at, at + n)` of a pool target.
fn pool_at(t: DmaTarget, n: usize) -> usize {
    match t {
        DmaTarget::Pool(at) => {
            assert!(at + n <= STAGING, "transfer past the pool");
            at
        }
        DmaTarget::Phys(p) => panic!("the service used a physical target {p:#x}"),
    }
}

impl BlockDevice for Disk {
    fn block_size(&self) -> u32 {
        BS as u32
    }
    fn blocks(&self) -> u64 {
        BLOCKS as u64
    }
    fn max_blocks_per_command(&self) -> u32 {
        (STAGING / BS) as u32
    }
    fn queue_depth(&self) -> usize {
        8
    }
    fn pool_len(&self) -> usize {
        STAGING
    }
    fn pool_read(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.0.borrow().buf[offset..offset + out.len()]);
    }
    fn pool_write(&mut self, offset: usize, data: &[u8]) {
        self.0.borrow_mut().buf[offset..offset + data.len()].copy_from_slice(data);
    }
    unsafe fn submit(&mut self, io: Io, token: u64) -> Result<(), DeviceError> {
        let mut s = self.0.borrow_mut();
        let fail = |what: &str| Err(DeviceError::Failed(format!("injected {what} failure")));
        let result = match io {
            Io::Read { .. } if s.fail_read => fail("read"),
            Io::Read { lba, blocks, to } => {
                let (at, n) = (lba as usize * BS, blocks as usize * BS);
                assert!(at + n <= s.data.len(), "read past the disk");
                if let DmaTarget::Phys(addr) = to {
                    assert!(addr % 4 == 0, "PRP1 not dword-aligned: {addr:#x}");
                    let bytes = s.data[at..at + n].to_vec();
                    s.reads += 1;
                    s.dma.push((addr, bytes));
                    s.done.push_back(IoDone {
                        token,
                        result: Ok(()),
                    });
                    return Ok(());
                }
                let p = pool_at(to, n);
                s.reads += 1;
                let DiskState { data, buf, .. } = &mut *s;
                buf[p..p + n].copy_from_slice(&data[at..at + n]);
                Ok(())
            }
            Io::Write { .. } if s.fail_write => fail("write"),
            Io::Write { lba, blocks, from } => {
                let (at, n) = (lba as usize * BS, blocks as usize * BS);
                assert!(at + n <= s.data.len(), "write past the disk");
                let p = pool_at(from, n);
                s.writes += 1;
                let DiskState { data, buf, .. } = &mut *s;
                data[at..at + n].copy_from_slice(&buf[p..p + n]);
                Ok(())
            }
            Io::Flush if s.fail_flush => fail("flush"),
            Io::Flush => {
                s.flushes += 1;
                Ok(())
            }
        };
        s.done.push_back(IoDone { token, result });
        Ok(())
    }
    fn poll(&mut self) -> Option<IoDone> {
        self.0.borrow_mut().done.pop_front()
    }
}

// ---------------------------------------------------------------------------
// The harness: one core (optionally a second one linked later), the storage
// process and a client process.

struct H {
    ctrl: Controller,
    /// A second cluster member, once linked.
    peer: Option<Controller>,
    now: Instant,
    sp: StorageProcess<Disk>,
    sp_chan: ChannelId,
    disk: Disk,
    cl_chan: ChannelId,
    mem: Vec<u8>,
    inbox: Vec<ControllerMsg>,
    next_op: u64,
    /// Every handle an invocation delivered to the storage process.
    sp_received: Vec<Handle>,
    /// Handle of the client's Memory capability over all its memory.
    mem_cap: Handle,
    /// The client's memory is served directly and reachable by the
    /// device at `PHYS_BASE` (a shared-memory slot process).
    direct: bool,
    /// See [`CoreWrites::revoke`].
    revoke_on_check: Option<(u64, Handle)>,
    /// Device-write grants not ended.
    grants_open: i64,
}

/// Device writes granted by the core, into the client's memory at
/// `PHYS_BASE` (what the node does for a slot).
struct CoreWrites<'a> {
    ctrl: &'a mut Controller,
    holder: ChannelId,
    now: Instant,
    grants: &'a mut i64,
    /// Revoke this (op, client handle) at the first grant check.
    revoke: &'a mut Option<(u64, Handle)>,
    client: ChannelId,
}

impl DeviceWrites for CoreWrites<'_> {
    fn begin(&mut self, handle: Handle, len: u64) -> Result<DeviceGrant, ErrorCode> {
        let g = self
            .ctrl
            .device_write_begin(self.now, self.holder, handle, len)?;
        assert!(g.addr + len <= CLIENT_MEM as u64, "grant past the memory");
        *self.grants += 1;
        Ok(DeviceGrant {
            id: g.id,
            address: PHYS_BASE + g.addr,
        })
    }
    fn valid(&mut self, id: u64) -> bool {
        if let Some((op, cap)) = self.revoke.take() {
            let mut f = Vec::new();
            ProcessMsg::Revoke { op, cap }.encode(&mut f);
            self.ctrl
                .process_message(self.now, self.client, &f[FRAME_HEADER_LEN..]);
        }
        self.ctrl.device_write_valid(id)
    }
    fn end(&mut self, id: u64, ok: bool) -> Result<(), ErrorCode> {
        *self.grants -= 1;
        self.ctrl.device_write_end(self.now, id, ok)
    }
}

fn config(node: u32, members: &[u32]) -> Config {
    let mut c = Config::new(NodeId(node), 1, KEY);
    c.members = members.iter().map(|&n| NodeId(n)).collect();
    c
}

impl H {
    fn new() -> Self {
        let h = Self::with(config(1, &[1]), &[READ_NAME], &[WRITE_NAME]);
        assert!(h.sp.is_ready(), "storage process not ready after setup");
        h
    }

    fn with(cfg: Config, read_names: &[&str], write_names: &[&str]) -> Self {
        let now = Instant(1_000_000);
        let mut ctrl = Controller::new(cfg, now);
        let disk = Disk::new();
        let sp = StorageProcess::new(
            disk.clone(),
            "storage",
            process_token(&KEY, b"storage"),
            read_names,
            write_names,
        );
        let (sp_chan, cl_chan) = (ChannelId(1000), ChannelId(1));
        ctrl.process_connected(now, sp_chan);
        ctrl.process_connected(now, cl_chan);
        let mut h = H {
            ctrl,
            peer: None,
            now,
            sp,
            sp_chan,
            disk,
            cl_chan,
            mem: (0..CLIENT_MEM).map(|i| (i * 13 + 1) as u8).collect(),
            inbox: Vec::new(),
            next_op: 1,
            sp_received: Vec::new(),
            mem_cap: Handle(0),
            direct: false,
            revoke_on_check: None,
            grants_open: 0,
        };
        h.send(&ProcessMsg::Attach {
            name: b"client".to_vec(),
            token: process_token(&KEY, b"client"),
        });
        assert!(
            h.inbox
                .iter()
                .any(|m| matches!(m, ControllerMsg::Attached { .. })),
            "client not attached: {:?}",
            h.inbox
        );
        h.inbox.clear();
        h.mem_cap = h.cap(|op| ProcessMsg::MemoryCreate {
            op,
            addr: 0,
            len: CLIENT_MEM as u64,
            rights: Rights::READ_WRITE,
        });
        h
    }

    /// Hands a message of the client to the core without running.
    fn send_only(&mut self, msg: &ProcessMsg) {
        let mut f = Vec::new();
        msg.encode(&mut f);
        self.ctrl
            .process_message(self.now, self.cl_chan, &f[FRAME_HEADER_LEN..]);
    }

    fn send(&mut self, msg: &ProcessMsg) {
        self.send_only(msg);
        self.run();
    }

    /// Moves messages until nobody has anything more to say.
    fn run(&mut self) {
        loop {
            let mut progressed = false;
            if self.direct {
                self.sp.tick_with(
                    self.now.0,
                    &mut CoreWrites {
                        ctrl: &mut self.ctrl,
                        holder: self.sp_chan,
                        now: self.now,
                        grants: &mut self.grants_open,
                        revoke: &mut self.revoke_on_check,
                        client: self.cl_chan,
                    },
                );
                let dma = std::mem::take(&mut self.disk.0.borrow_mut().dma);
                for (addr, bytes) in dma {
                    progressed = true;
                    let at = (addr - PHYS_BASE) as usize;
                    self.mem[at..at + bytes.len()].copy_from_slice(&bytes);
                }
                while let Some(a) = self.ctrl.poll_mem_access() {
                    progressed = true;
                    self.serve_direct(a);
                }
                // Commands in flight (the fake device completes them at
                // the next poll).
                progressed |= self.sp.is_busy();
            } else {
                self.sp.tick(self.now.0);
            }
            while let Some(body) = self.sp.poll_message() {
                progressed = true;
                self.ctrl.process_message(self.now, self.sp_chan, &body);
            }
            while let Some(out) = self.ctrl.poll_output() {
                progressed = true;
                match out {
                    Output::Send {
                        to: Dest::Process(c),
                        frame,
                    } => {
                        let body = &frame[FRAME_HEADER_LEN..];
                        if c == self.sp_chan {
                            if let Ok(ControllerMsg::Invocation { caps, .. }) =
                                ControllerMsg::decode(body)
                            {
                                self.sp_received.extend(caps.iter().map(|c| c.0));
                            }
                            self.sp.on_message(body);
                        } else {
                            assert_eq!(c, self.cl_chan, "frame for an unknown channel");
                            self.client_message(ControllerMsg::decode(body).unwrap());
                        }
                    }
                    Output::Send {
                        to: Dest::Link(l),
                        frame,
                    } => {
                        if let Some(peer) = self.peer.as_mut() {
                            assert_eq!(l, LinkId(2));
                            let body = frame_body(&frame, MAX_FRAME_LEN).unwrap();
                            peer.link_message(self.now, LinkId(1), body);
                        }
                    }
                    Output::Close { to, reason } => panic!("core closed {to:?}: {reason:?}"),
                    Output::Connect { peer } => {
                        panic!("gossip is off, yet the core dials {peer:?}")
                    }
                }
            }
            if let Some(peer) = self.peer.as_mut() {
                while let Some(out) = peer.poll_output() {
                    progressed = true;
                    if let Output::Send {
                        to: Dest::Link(l),
                        frame,
                    } = out
                    {
                        assert_eq!(l, LinkId(1));
                        let body = frame_body(&frame, MAX_FRAME_LEN).unwrap();
                        self.ctrl.link_message(self.now, LinkId(2), body);
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// A harness whose client's memory is served directly and reachable by
    /// the device (a slot process), with the read Request and the client's
    /// `done` and `err`.
    fn direct_client() -> (H, Handle, Handle, Handle) {
        let mut h = H::new();
        h.direct = true;
        assert!(h.ctrl.set_direct_memory(h.cl_chan, true));
        let read = h.lookup_cap(READ_NAME);
        let done = h.request(TAG_DONE);
        let err = h.request(TAG_ERR);
        (h, read, done, err)
    }

    /// The driver's side of a direct access to the client's memory.
    fn serve_direct(&mut self, a: MemAccess) {
        match a {
            MemAccess::Read {
                chan,
                xfer,
                addr,
                len,
            } => {
                let (a, l) = (addr as usize, len as usize);
                let r = self
                    .mem
                    .get(a..a + l)
                    .map(|s| s.to_vec())
                    .ok_or(ErrorCode::MemoryFault);
                self.ctrl.mem_read_done(self.now, chan, xfer, r);
            }
            MemAccess::Write {
                chan,
                xfer,
                addr,
                data,
            } => {
                let a = addr as usize;
                let r = match self.mem.get_mut(a..a + data.len()) {
                    Some(s) => {
                        s.copy_from_slice(&data);
                        Ok(())
                    }
                    None => Err(ErrorCode::MemoryFault),
                };
                self.ctrl.mem_write_done(self.now, chan, xfer, r);
            }
        }
    }

    /// The client: serves memory accesses, keeps everything else.
    fn client_message(&mut self, msg: ControllerMsg) {
        let reply = match msg {
            ControllerMsg::MemRead { xfer, addr, len } => {
                let (a, l) = (addr as usize, len as usize);
                let result = self
                    .mem
                    .get(a..a + l)
                    .map(|s| s.to_vec())
                    .ok_or(ErrorCode::MemoryFault);
                ProcessMsg::MemReadReply { xfer, result }
            }
            ControllerMsg::MemWrite { xfer, addr, data } => {
                let a = addr as usize;
                let result = match self.mem.get_mut(a..a + data.len()) {
                    Some(s) => {
                        s.copy_from_slice(&data);
                        Ok(())
                    }
                    None => Err(ErrorCode::MemoryFault),
                };
                ProcessMsg::MemWriteReply { xfer, result }
            }
            m => {
                self.inbox.push(m);
                return;
            }
        };
        self.send_only(&reply);
    }

    /// Advances the clock by `d`, firing the cores' timers.
    fn advance(&mut self, d: Duration) {
        let end = self.now.after(d);
        loop {
            let next = [Some(&self.ctrl), self.peer.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|c| c.poll_timeout())
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.ctrl.handle_timeout(self.now);
                    if let Some(p) = self.peer.as_mut() {
                        p.handle_timeout(self.now);
                    }
                    self.run();
                }
                _ => break,
            }
        }
        self.now = end;
        self.run();
    }

    fn start(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> u64 {
        let op = self.next_op;
        self.next_op += 1;
        self.send(&make(op));
        op
    }

    fn completion(&mut self, op: u64) -> Option<Result<Reply, ErrorCode>> {
        let pos = self
            .inbox
            .iter()
            .position(|m| matches!(m, ControllerMsg::Completion { op: o, .. } if *o == op))?;
        match self.inbox.remove(pos) {
            ControllerMsg::Completion { result, .. } => Some(result),
            _ => unreachable!(),
        }
    }

    fn op(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> Result<Reply, ErrorCode> {
        let op = self.start(make);
        self.completion(op)
            .unwrap_or_else(|| panic!("op {op} got no completion"))
    }

    fn cap(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> Handle {
        match self.op(make) {
            Ok(Reply::Cap { handle, .. }) => handle,
            other => panic!("expected a capability, got {other:?}"),
        }
    }

    fn lookup(&mut self, name: &str) -> Result<Reply, ErrorCode> {
        self.op(|op| ProcessMsg::Lookup {
            op,
            name: name.as_bytes().to_vec(),
            wait_ms: 0,
        })
    }

    fn lookup_cap(&mut self, name: &str) -> Handle {
        match self.lookup(name) {
            Ok(Reply::Cap { handle, info }) => {
                assert_eq!(info.kind, ObjectKind::Request);
                handle
            }
            other => panic!("lookup of {name}: {other:?}"),
        }
    }

    fn request(&mut self, tag: u64) -> Handle {
        self.cap(|op| ProcessMsg::RequestCreate {
            op,
            tag,
            imms: Vec::new(),
            caps: Vec::new(),
        })
    }

    /// A window of the client's memory.
    fn window(&mut self, addr: u64, len: u64, rights: Rights) -> Handle {
        let cap = self.mem_cap;
        self.cap(|op| ProcessMsg::Diminish {
            op,
            cap,
            offset: addr,
            len,
            rights,
        })
    }

    /// Invokes a storage Request; returns the op.
    fn invoke(&mut self, req: Handle, imms: Vec<u8>, caps: Vec<Handle>, run: bool) -> u64 {
        let op = self.next_op;
        self.next_op += 1;
        let msg = ProcessMsg::Invoke {
            op,
            cap: req,
            imms,
            caps,
        };
        if run {
            self.send(&msg);
        } else {
            self.send_only(&msg);
        }
        op
    }

    /// Takes the invocations delivered to the client: (tag, imms).
    fn invocations(&mut self) -> Vec<Delivered> {
        let mut out = Vec::new();
        self.inbox.retain(|m| match m {
            ControllerMsg::Invocation { tag, imms, caps } => {
                out.push((*tag, imms.clone(), caps.clone()));
                false
            }
            _ => true,
        });
        out
    }

    /// The only invocation the client got: (tag, imms).
    fn one_invocation(&mut self) -> (u64, Vec<u8>) {
        let inv = self.invocations();
        assert_eq!(inv.len(), 1, "expected one invocation, got {inv:?}");
        (inv[0].0, inv[0].1.clone())
    }

    /// The invocation the client got, if any (at most one).
    fn one_invocation_or_none(&mut self) -> Option<(u64, Vec<u8>)> {
        let inv = self.invocations();
        assert!(inv.len() <= 1, "more than one invocation: {inv:?}");
        inv.first().map(|i| (i.0, i.1.clone()))
    }

    fn handles(&self) -> usize {
        self.ctrl.stats().handles
    }

    /// Asserts no handle the storage process was given is still held.
    fn assert_received_dropped(&self) {
        assert!(!self.sp_received.is_empty());
        for &h in &self.sp_received {
            assert!(
                self.ctrl.debug_handle(self.sp_chan, h).is_none(),
                "storage still holds delivered handle {h:?}"
            );
        }
    }

    fn check(&self) {
        self.ctrl.check_invariants().unwrap();
    }
}

fn range(offset: u64, len: u64) -> Vec<u8> {
    let mut v = offset.to_le_bytes().to_vec();
    v.extend_from_slice(&len.to_le_bytes());
    v
}

fn err_imms(status: StorageStatus, code: Option<ErrorCode>) -> Vec<u8> {
    let mut v = vec![status as u8];
    v.extend_from_slice(&code.map_or(0, |c| c as u16).to_le_bytes());
    v
}

/// Asserts the client's Invoke `op` was accepted.
fn assert_invoked(h: &mut H, op: u64) {
    assert_eq!(h.completion(op), Some(Ok(Reply::Done)), "invoke op {op}");
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn setup_publishes_read_and_write() {
    let mut h = H::new();
    h.lookup_cap(READ_NAME);
    h.lookup_cap(WRITE_NAME);
    assert!(h.lookup("storage/0/other").is_err());
    h.check();
}

#[test]
fn unaligned_write_lands_at_offset_then_read_returns_it() {
    let mut h = H::new();
    let (rd, wr) = (h.lookup_cap(READ_NAME), h.lookup_cap(WRITE_NAME));
    let (done, err) = (h.request(TAG_DONE), h.request(TAG_ERR));
    // 700..1800 covers blocks 1, 2 and 3, all partially.
    let (off, len) = (700u64, 1100u64);
    let src_addr = 0x2000usize;
    let payload: Vec<u8> = (0..len as usize)
        .map(|i| (i * 5 + 3) as u8 ^ 0xa5)
        .collect();
    h.mem[src_addr..src_addr + len as usize].copy_from_slice(&payload);
    let before: Vec<u8> = h.disk.0.borrow().data.clone();
    assert_ne!(&before[off as usize..(off + len) as usize], &payload[..]);
    let src = h.window(src_addr as u64, len, Rights::READ);
    let handles = h.handles();

    let op = h.invoke(wr, range(off, len), vec![src, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation(), (TAG_DONE, Vec::new()));
    {
        let d = h.disk.0.borrow();
        let (o, e) = (off as usize, (off + len) as usize);
        assert_eq!(&d.data[o..e], &payload[..], "written bytes");
        assert_eq!(&d.data[..o], &before[..o], "bytes before the range");
        assert_eq!(&d.data[e..], &before[e..], "bytes after the range");
        assert_eq!((d.writes, d.flushes), (1, 1));
        // Partial blocks are read first (read-modify-write).
        assert_eq!(d.reads, 1);
    }
    assert_eq!(h.sp.stats().writes, 1);
    assert_eq!(h.sp.stats().bytes_written, len);
    assert_eq!(h.handles(), handles, "handles leaked by the write");
    h.assert_received_dropped();

    // Read it back into another place of the client's memory.
    let dst_addr = 0x8000usize;
    let dst = h.window(dst_addr as u64, len, Rights::WRITE);
    let around = (h.mem[dst_addr - 1], h.mem[dst_addr + len as usize]);
    let handles = h.handles();
    let op = h.invoke(rd, range(off, len), vec![dst, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation().0, TAG_DONE);
    assert_eq!(&h.mem[dst_addr..dst_addr + len as usize], &payload[..]);
    assert_eq!(
        (h.mem[dst_addr - 1], h.mem[dst_addr + len as usize]),
        around,
        "read touched bytes around the window"
    );
    assert_eq!(h.sp.stats().reads, 1);
    assert_eq!(h.sp.stats().bytes_read, len);
    assert_eq!(h.handles(), handles, "handles leaked by the read");
    h.assert_received_dropped();
    h.check();
}

#[test]
fn aligned_write_skips_the_read() {
    let mut h = H::new();
    let wr = h.lookup_cap(WRITE_NAME);
    let done = h.request(TAG_DONE);
    let src = h.window(0, 2 * BS as u64, Rights::READ);
    let op = h.invoke(
        wr,
        range(4 * BS as u64, 2 * BS as u64),
        vec![src, done],
        true,
    );
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation().0, TAG_DONE);
    let d = h.disk.0.borrow();
    assert_eq!((d.reads, d.writes, d.flushes), (0, 1, 1));
    assert_eq!(&d.data[4 * BS..6 * BS], &h.mem[..2 * BS]);
}

#[test]
fn read_past_the_end_is_out_of_range() {
    let mut h = H::new();
    let rd = h.lookup_cap(READ_NAME);
    let (done, err) = (h.request(TAG_DONE), h.request(TAG_ERR));
    let dst = h.window(0, 4096, Rights::WRITE);
    let handles = h.handles();
    let cap = (BS * BLOCKS) as u64;
    let op = h.invoke(rd, range(cap - 10, 20), vec![dst, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(
        h.one_invocation(),
        (TAG_ERR, err_imms(StorageStatus::OutOfRange, None))
    );
    assert_eq!(h.one_invocation_or_none(), None);
    assert_eq!(err_imms(StorageStatus::OutOfRange, None), vec![1, 0, 0]);
    assert_eq!(h.disk.0.borrow().reads, 0);
    // Overflowing ranges are out of range too.
    let op = h.invoke(rd, range(u64::MAX - 4, 10), vec![dst, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation(), (TAG_ERR, vec![1, 0, 0]));
    assert_eq!(h.sp.stats().errors, 2);
    assert_eq!(h.handles(), handles);
    h.assert_received_dropped();
    h.check();
}

#[test]
fn read_into_memory_without_write_fails_the_copy() {
    let mut h = H::new();
    let rd = h.lookup_cap(READ_NAME);
    let (done, err) = (h.request(TAG_DONE), h.request(TAG_ERR));
    let dst = h.window(0x100, 1000, Rights::READ);
    let mem_before = h.mem.clone();
    let handles = h.handles();
    let op = h.invoke(rd, range(100, 1000), vec![dst, done, err], true);
    assert_invoked(&mut h, op);
    let inv = h.invocations();
    assert_eq!(
        inv.iter().map(|i| (i.0, i.1.clone())).collect::<Vec<_>>(),
        vec![(
            TAG_ERR,
            err_imms(StorageStatus::Copy, Some(ErrorCode::MissingRight))
        )],
        "only err, with [4, MissingRight LE]"
    );
    let code = (ErrorCode::MissingRight as u16).to_le_bytes();
    assert_eq!(inv[0].1, vec![4, code[0], code[1]]);
    assert_eq!(h.mem, mem_before, "client memory changed");
    assert_eq!(h.sp.stats().errors, 1);
    assert_eq!(h.sp.stats().reads, 0);
    assert_eq!(h.handles(), handles);
    h.assert_received_dropped();
    h.check();
}

#[test]
fn malformed_immediates_are_bad_requests() {
    let mut h = H::new();
    let (rd, wr) = (h.lookup_cap(READ_NAME), h.lookup_cap(WRITE_NAME));
    let (done, err) = (h.request(TAG_DONE), h.request(TAG_ERR));
    let dst = h.window(0, 4096, Rights::READ_WRITE);
    let handles = h.handles();
    for (req, imms) in [
        (rd, vec![]),
        (rd, 5u64.to_le_bytes().to_vec()),
        (wr, vec![0; 15]),
    ] {
        let op = h.invoke(req, imms, vec![dst, done, err], true);
        assert_invoked(&mut h, op);
        assert_eq!(h.one_invocation(), (TAG_ERR, vec![2, 0, 0]));
    }
    // No Memory capability first: also a bad request.
    let op = h.invoke(rd, range(0, 10), vec![done, err, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation(), (TAG_ERR, vec![2, 0, 0]));
    // Length 0.
    let op = h.invoke(rd, range(0, 0), vec![dst, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation(), (TAG_ERR, vec![2, 0, 0]));
    // Longer than the DMA pool.
    let op = h.invoke(rd, range(0, STAGING as u64 + 1), vec![dst, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation(), (TAG_ERR, vec![2, 0, 0]));
    {
        let d = h.disk.0.borrow();
        assert_eq!((d.reads, d.writes, d.flushes), (0, 0, 0));
    }
    assert_eq!(h.sp.stats().errors, 6);
    assert_eq!(h.handles(), handles);
    h.assert_received_dropped();
    // Longer immediates are fine: the range is in the last 16 bytes.
    let mut imms = vec![0xff; 8];
    imms.extend(range(0, 100));
    let op = h.invoke(rd, imms, vec![dst, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation().0, TAG_DONE);
    assert_eq!(&h.mem[..100], &h.disk.0.borrow().data[..100]);
    h.check();
}

#[test]
fn device_failure_is_reported_and_service_continues() {
    let mut h = H::new();
    let (rd, wr) = (h.lookup_cap(READ_NAME), h.lookup_cap(WRITE_NAME));
    let (done, err) = (h.request(TAG_DONE), h.request(TAG_ERR));
    let buf = h.window(0, 4096, Rights::READ_WRITE);
    // The source of a write must not be longer than the range.
    let block = h.window(0, BS as u64, Rights::READ);
    let handles = h.handles();

    h.disk.0.borrow_mut().fail_read = true;
    let op = h.invoke(rd, range(0, 100), vec![buf, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation(), (TAG_ERR, vec![3, 0, 0]));
    h.disk.0.borrow_mut().fail_read = false;

    // The next request is served.
    let op = h.invoke(rd, range(1000, 100), vec![buf, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation().0, TAG_DONE);
    assert_eq!(&h.mem[..100], &h.disk.0.borrow().data[1000..1100]);

    // A failing write (aligned, so no read first) and a failing flush.
    for flag in [0, 1] {
        {
            let mut d = h.disk.0.borrow_mut();
            d.fail_write = flag == 0;
            d.fail_flush = flag == 1;
        }
        let op = h.invoke(wr, range(0, BS as u64), vec![block, done, err], true);
        assert_invoked(&mut h, op);
        assert_eq!(h.one_invocation(), (TAG_ERR, vec![3, 0, 0]), "flag {flag}");
    }
    {
        let mut d = h.disk.0.borrow_mut();
        d.fail_write = false;
        d.fail_flush = false;
    }
    let op = h.invoke(
        wr,
        range(2 * BS as u64, BS as u64),
        vec![block, done, err],
        true,
    );
    assert_invoked(&mut h, op);
    assert_eq!(h.one_invocation().0, TAG_DONE);
    assert_eq!(&h.disk.0.borrow().data[2 * BS..3 * BS], &h.mem[..BS]);
    let s = h.sp.stats();
    assert_eq!((s.errors, s.reads, s.writes), (3, 1, 1));
    assert_eq!(h.handles(), handles);
    h.assert_received_dropped();
    h.check();
}

#[test]
fn back_to_back_requests_are_served_in_order() {
    let mut h = H::new();
    let (rd, wr) = (h.lookup_cap(READ_NAME), h.lookup_cap(WRITE_NAME));
    let dones: Vec<Handle> = (0..5).map(|i| h.request(TAG_DONE + 0x100 * i)).collect();
    let err = h.request(TAG_ERR);
    // Two different payloads and two read targets.
    let (a, b, r1, r2) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
    let len = 1500u64;
    for i in 0..len as usize {
        h.mem[a as usize + i] = i as u8;
        h.mem[b as usize + i] = !(i as u8) ^ 0x33;
    }
    let wa = h.window(a, len, Rights::READ);
    let wb = h.window(b, len, Rights::READ);
    let w1 = h.window(r1, len, Rights::WRITE);
    let w2 = h.window(r2, len, Rights::WRITE);
    let handles = h.handles();
    let off = 3000u64;
    // write a, read → r1, write b, read → r2, and an error in the middle:
    // all sent before anything is delivered.
    let ops = vec![
        h.invoke(wr, range(off, len), vec![wa, dones[0], err], false),
        h.invoke(rd, range(off, len), vec![w1, dones[1], err], false),
        h.invoke(rd, range(u64::MAX, 1), vec![w1, dones[2], err], false),
        h.invoke(wr, range(off, len), vec![wb, dones[3], err], false),
        h.invoke(rd, range(off, len), vec![w2, dones[4], err], false),
    ];
    h.run();
    for op in ops {
        assert_invoked(&mut h, op);
    }
    // The range past the end is refused on arrival, before the device is
    // involved; the others are answered in order.
    let tags: Vec<u64> = h.invocations().iter().map(|i| i.0).collect();
    assert_eq!(
        tags,
        vec![
            TAG_ERR,
            TAG_DONE,
            TAG_DONE + 0x100,
            TAG_DONE + 0x300,
            TAG_DONE + 0x400
        ]
    );
    let (a, b, r1, r2, len) = (
        a as usize,
        b as usize,
        r1 as usize,
        r2 as usize,
        len as usize,
    );
    assert_eq!(
        h.mem[r1..r1 + len],
        h.mem[a..a + len],
        "first read saw the first write"
    );
    assert_eq!(
        h.mem[r2..r2 + len],
        h.mem[b..b + len],
        "second read saw the second write"
    );
    assert_eq!(
        &h.disk.0.borrow().data[off as usize..off as usize + len],
        &h.mem[b..b + len]
    );
    let s = h.sp.stats();
    assert_eq!((s.reads, s.writes, s.errors), (2, 2, 1));
    assert_eq!(h.handles(), handles);
    h.assert_received_dropped();
    h.check();
}

#[test]
fn publish_is_retried_while_the_home_is_unreachable() {
    // Two members, the second not linked yet: names homed there cannot be
    // published. With enough names some are homed at node 2.
    let names: Vec<String> = (0..8).map(|i| format!("storage/{i}/read")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut h = H::with(config(1, &[1, 2]), &refs, &[WRITE_NAME]);
    h.advance(Duration::from_millis(50));
    assert!(!h.sp.is_ready(), "ready although node 2 is unreachable");
    // Still failing: retried without becoming ready, without giving up.
    h.advance(Duration::from_millis(450));
    assert!(!h.sp.is_ready());
    // Node 2 comes up and links.
    let mut peer = Controller::new(config(2, &[1, 2]), h.now);
    peer.link_connected(h.now, LinkId(1), LinkRole::Responder);
    h.peer = Some(peer);
    h.ctrl
        .link_connected(h.now, LinkId(2), LinkRole::Initiator { peer: NodeId(2) });
    h.run();
    h.advance(Duration::from_millis(300));
    assert!(h.sp.is_ready(), "not ready after the home came up");
    for n in &names {
        h.lookup_cap(n);
    }
}

#[test]
fn write_source_longer_than_the_range_is_a_copy_error() {
    // The whole `src` window is copied into the range's window of the
    // DMA pool: a longer source fails the copy, nothing is written.
    let mut h = H::new();
    let wr = h.lookup_cap(WRITE_NAME);
    let (done, err) = (h.request(TAG_DONE), h.request(TAG_ERR));
    let src = h.window(0, 2 * BS as u64, Rights::READ);
    let before = h.disk.0.borrow().data.clone();
    let handles = h.handles();
    let op = h.invoke(wr, range(100, BS as u64), vec![src, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(
        h.one_invocation(),
        (
            TAG_ERR,
            err_imms(StorageStatus::Copy, Some(ErrorCode::SizeMismatch))
        )
    );
    let d = h.disk.0.borrow();
    assert_eq!((d.writes, d.flushes), (0, 0));
    assert!(d.data == before, "disk changed");
    drop(d);
    assert_eq!(h.handles(), handles);
    h.assert_received_dropped();
}

#[test]
fn failures_in_the_middle_of_a_queue_do_not_stall_it() {
    // Jobs failing after they started (a failed copy) with more queued
    // behind them: the queue goes on.
    let mut h = H::new();
    let (rd, wr) = (h.lookup_cap(READ_NAME), h.lookup_cap(WRITE_NAME));
    let dones: Vec<Handle> = (0..4).map(|i| h.request(TAG_DONE + 0x100 * i)).collect();
    let err = h.request(TAG_ERR);
    let ro = h.window(0x100, 200, Rights::READ);
    let rw = h.window(0x1000, 200, Rights::READ_WRITE);
    let long = h.window(0x2000, 400, Rights::READ);
    let handles = h.handles();
    let ops = vec![
        h.invoke(rd, range(10, 200), vec![ro, dones[0], err], false),
        h.invoke(rd, range(20, 200), vec![rw, dones[1], err], false),
        h.invoke(wr, range(30, 200), vec![long, dones[2], err], false),
        h.invoke(wr, range(5000, 200), vec![rw, dones[3], err], false),
    ];
    h.run();
    for op in ops {
        assert_invoked(&mut h, op);
    }
    let inv: Vec<(u64, Vec<u8>)> = h.invocations().into_iter().map(|i| (i.0, i.1)).collect();
    let missing = (ErrorCode::MissingRight as u16).to_le_bytes();
    let size = (ErrorCode::SizeMismatch as u16).to_le_bytes();
    assert_eq!(
        inv,
        vec![
            (TAG_ERR, vec![4, missing[0], missing[1]]),
            (TAG_DONE + 0x100, vec![]),
            (TAG_ERR, vec![4, size[0], size[1]]),
            (TAG_DONE + 0x300, vec![]),
        ]
    );
    let d = h.disk.0.borrow();
    assert_eq!(&h.mem[0x1000..0x1000 + 200], &d.data[5000..5200]);
    assert_eq!(&d.data[5000..5200], &Disk::new().0.borrow().data[20..220]);
    drop(d);
    let s = h.sp.stats();
    assert_eq!((s.reads, s.writes, s.errors), (1, 1, 2));
    assert_eq!(h.handles(), handles);
    h.assert_received_dropped();
    h.check();
}

/// A client whose memory devices reach (a slot process): block-aligned
/// reads into dword-aligned windows are DMA'd straight into it (no pool
/// window, no copy); unaligned ones, and windows at odd addresses, go
/// through the pool. Every byte checked, both counted.
#[test]
fn reads_into_device_reachable_memory_skip_the_pool() {
    let (mut h, read, done, err) = H::direct_client();
    let disk = h.disk.0.borrow().data.clone();
    // (disk offset, len, window address in the client's memory, direct?)
    let cases: [(u64, u64, u64, bool); 6] = [
        (0, 4096, 0, true),
        (7 * BS as u64, 9 * BS as u64, 8196, true),
        (BS as u64, 40 * BS as u64, 20_000, true),
        (100, 5000, 4096, false),
        (2 * BS as u64, 3 * BS as u64, 12_001, false),
        (3 * BS as u64, BS as u64 - 1, 16_384, false),
    ];
    let (mut direct, mut staged) = (0, 0);
    for (i, &(offset, len, addr, is_direct)) in cases.iter().enumerate() {
        h.mem.fill(0xa5);
        let reads_before = h.disk.0.borrow().reads;
        let w = h.window(addr, len, Rights::WRITE);
        let op = h.invoke(read, range(offset, len), vec![w, done, err], true);
        assert_invoked(&mut h, op);
        assert_eq!(h.one_invocation(), (TAG_DONE, vec![]), "case {i}");
        let (a, l, o) = (addr as usize, len as usize, offset as usize);
        assert_eq!(h.mem[a..a + l], disk[o..o + l], "case {i}: bytes");
        assert!(h.mem[..a].iter().all(|&b| b == 0xa5), "case {i}: before");
        assert!(h.mem[a + l..].iter().all(|&b| b == 0xa5), "case {i}: after");
        assert!(h.disk.0.borrow().reads > reads_before);
        let blocks = (offset + len).div_ceil(BS as u64) - offset / BS as u64;
        if is_direct {
            direct += blocks * BS as u64;
        } else {
            staged += blocks * BS as u64;
        }
        let s = h.sp.stats();
        assert_eq!(
            (s.dma_direct_bytes, s.dma_staged_bytes),
            (direct, staged),
            "case {i}"
        );
    }
    assert_eq!(h.sp.stats().slot_reads, 3);
    assert_eq!(h.grants_open, 0, "every grant ended");
    let m = h.sp.metrics_text(1);
    assert!(
        m.contains(&format!(
            "fractos_storage_dma_bytes_total{{node=\"1\",path=\"direct\"}} {direct}"
        )),
        "{m}"
    );
    h.assert_received_dropped();
    h.check();
}

/// The core validates the destination for a direct read like for a copy:
/// a READ-only window fails with `MissingRight`, a window shorter than the
/// range is a `SizeMismatch`; a revoke while the read is queued stops it
/// (`Revoked`, nothing written) and completes once the grant has ended.
#[test]
fn direct_reads_are_checked_by_the_core() {
    let (mut h, read, done, err) = H::direct_client();
    h.mem.fill(0xa5);

    let ro = h.window(0, 4096, Rights::READ);
    let op = h.invoke(read, range(0, 4096), vec![ro, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(
        h.one_invocation(),
        (
            TAG_ERR,
            err_imms(StorageStatus::Copy, Some(ErrorCode::MissingRight))
        )
    );
    let short = h.window(0, 2048, Rights::WRITE);
    let op = h.invoke(read, range(0, 4096), vec![short, done, err], true);
    assert_invoked(&mut h, op);
    assert_eq!(
        h.one_invocation(),
        (
            TAG_ERR,
            err_imms(StorageStatus::Copy, Some(ErrorCode::SizeMismatch))
        )
    );
    assert!(h.mem.iter().all(|&b| b == 0xa5), "nothing written");
    assert_eq!(h.sp.stats().dma_direct_bytes, 0);

    // Granted, then revoked before its first command: the core
    // invalidates the grant at once, the read fails `Revoked`, the revoke
    // completes once the grant has ended, and no byte lands.
    let w = h.window(0, 8192, Rights::WRITE);
    let reads = h.disk.0.borrow().reads;
    let revoke = h.next_op;
    h.next_op += 1;
    h.revoke_on_check = Some((revoke, w));
    let op = h.invoke(read, range(0, 8192), vec![w, done, err], true);
    assert!(h.revoke_on_check.is_none(), "the grant was checked");
    assert_invoked(&mut h, op);
    assert_eq!(
        h.one_invocation(),
        (
            TAG_ERR,
            err_imms(StorageStatus::Copy, Some(ErrorCode::Revoked))
        )
    );
    assert_eq!(h.completion(revoke), Some(Ok(Reply::Done)));
    assert!(h.mem.iter().all(|&b| b == 0xa5), "nothing written");
    assert_eq!(h.disk.0.borrow().reads, reads, "no command submitted");
    assert_eq!(h.grants_open, 0, "every grant ended");
    h.assert_received_dropped();
    h.check();
}
