//! RDMA interoperability (issue 13, point 4): rdma-core's `ibv_rc_pingpong`
//! in a Linux guest with Soft-RoCE (`rdma_rxe`), as client, against an
//! appliance booted with `fractos.test=rc_pingpong`, both on one VM-to-VM
//! segment. The appliance answers the example's TCP exchange on port 18515
//! and plays the SEND/RECV ping-pong with its own RoCEv2 engine: 1,000
//! iterations of 4,096 bytes with `--chk`, at path MTU 1024 (Ethernet MTU
//! 1500) and 4096 (Ethernet MTU 9000, jumbo frames through the appliance's
//! NIC). The engine's counters must have moved in the appliance's
//! `/metrics`.

use std::net::Ipv4Addr;
use std::time::Duration;

use fractos_adaptors::demo::{scrape_metrics, DEMO_KEY};
use fractos_qemu::build::Workspace;
use fractos_qemu::cluster::{write_key_file, ClusterSpec, ControllerSetup};
use fractos_qemu::linux_guest::{
    parse_rc_pingpong, rdma_image, rdma_status, LinuxGuest, RdmaGuestSpec, RDMA_STATUS_MARKER,
};
use fractos_qemu::node::{write_private_file, Appliance, L2Segment};
use fractos_tests::{kernel, scratch, READY_TIMEOUT};

const APPLIANCE_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
/// Guest boot, Soft-RoCE setup and 1,000 round trips under TCG, with room.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);
const ITERS: u64 = 1000;
const SIZE: u64 = 4096;

/// One sample of `family{...labels...}` (labels given as `k="v"` pairs).
fn metric(text: &str, family: &str, labels: &[&str]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .find(|l| labels.iter().all(|kv| l.contains(kv)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Boots an appliance in `dir` running its controller (front NIC, metrics
/// forwarded) and the `rc_pingpong` server on the segment NIC at
/// [`APPLIANCE_IP`], with the extra command-line words `extra`; returns it
/// once it serves, with its ports.
fn launch_appliance(
    dir: &std::path::Path,
    seg: L2Segment,
    extra: &str,
) -> (Appliance, ControllerSetup) {
    let setup = ControllerSetup::new(1, DEMO_KEY).expect("pick ports");
    let mut spec = ClusterSpec::controllers(kernel(), dir.join("appliance"), setup.clone());
    spec.cmdline = format!("fractos.ip1={APPLIANCE_IP}/24 fractos.test=rc_pingpong {extra}");
    std::fs::create_dir_all(&spec.state_dir).expect("state dir");
    write_key_file(&spec.key_file(), &setup.key).expect("key file");
    // What `Cluster::launch` writes for each node: its configuration file
    // (members, peers, passed through fw_cfg).
    if let Some(config) = spec.node_config(0) {
        write_private_file(&spec.config_file(0), config.as_bytes()).expect("config file");
    }
    let mut node = spec.node(0);
    node.l2 = Some(seg);
    let mut app = Appliance::launch(node).expect("launch the appliance");
    if let Err(e) = app.wait_for("rc_pingpong: serving", READY_TIMEOUT) {
        panic!("appliance never served rc_pingpong: {e}\n{}", app.log());
    }
    (app, setup)
}

fn pingpong(guest: &LinuxGuest, rdma_mtu: u32, eth_mtu: u32) {
    let dir = scratch(&format!("rdma-{rdma_mtu}"));
    let seg = L2Segment::pick().expect("pick a segment port");

    let (mut app, setup) = launch_appliance(
        &dir,
        seg,
        &format!("fractos.rc_mtu={rdma_mtu} fractos.rc_size={SIZE} fractos.rc_iters={ITERS}"),
    );

    // The Linux guest, client of the example.
    let command = format!(
        "ibv_rc_pingpong -d rxe0 -g 1 -s {SIZE} -n {ITERS} -m {rdma_mtu} --chk {APPLIANCE_IP}"
    );
    let image = rdma_image(&RdmaGuestSpec {
        ip: GUEST_IP,
        prefix_len: 24,
        eth_mtu,
        command,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut gspec = guest
        .node_spec(&format!("rdma-guest-{rdma_mtu}"), &image, &dir)
        .expect("guest image");
    gspec.nics = 0;
    gspec.l2 = Some(seg);
    gspec.index = 1;
    let mut vm = Appliance::launch(gspec).expect("launch the guest");
    if let Err(e) = vm.wait_for(RDMA_STATUS_MARKER, RUN_TIMEOUT) {
        panic!(
            "the guest never finished: {e}\nguest:\n{}\nappliance:\n{}",
            vm.log(),
            app.log()
        );
    }
    // Let the status line arrive whole.
    std::thread::sleep(Duration::from_millis(500));
    let glog = vm.log();
    let alog = app.log();
    let status = rdma_status(&glog);
    assert_eq!(
        status,
        Some(0),
        "ibv_rc_pingpong failed\nguest:\n{glog}\nappliance:\n{alog}"
    );
    let (bytes, seconds, usec) =
        parse_rc_pingpong(&glog).unwrap_or_else(|| panic!("no result lines\n{glog}"));
    assert_eq!(bytes, SIZE * ITERS * 2, "{glog}");
    eprintln!(
        "rc_pingpong MTU {rdma_mtu}: {ITERS} x {SIZE} B in {seconds:.2} s = {usec:.0} us/iter"
    );
    // The appliance's side: every message received, sent, and valid.
    let ok = format!(
        "rc_pingpong: session 1 ok: received {ITERS} sent {ITERS} of {ITERS} messages of {SIZE} bytes, chk ok {ITERS}, identical {ITERS}"
    );
    if !alog.contains(&ok) {
        let _ = app.wait_for(&ok, Duration::from_secs(30));
    }
    assert!(app.log().contains(&ok), "appliance:\n{}", app.log());
    assert!(
        app.log().contains(&format!("MTU {rdma_mtu}")),
        "{}",
        app.log()
    );

    // The engine's counters, in /metrics.
    let text = scrape_metrics(setup.metrics_addr(0).expect("node exists")).expect("scrape");
    let packets = ITERS * SIZE.div_ceil(u64::from(rdma_mtu));
    let accepted = metric(&text, "fractos_roce_frames_total", &["dir=\"rx_accepted\""]);
    let tx = metric(&text, "fractos_roce_frames_total", &["dir=\"tx\""]);
    assert!(
        accepted.is_some_and(|n| n >= packets),
        "accepted {accepted:?} < {packets}\n{text}"
    );
    assert!(
        tx.is_some_and(|n| n >= packets),
        "tx {tx:?} < {packets}\n{text}"
    );
    assert!(
        metric(&text, "fractos_roce_events_total", &["event=\"ack_sent\""]).is_some_and(|n| n > 0),
        "{text}"
    );
    for family in [
        "fractos_roce_drops_total",
        "fractos_roce_naks_total",
        "fractos_roce_events_total",
    ] {
        assert!(text.contains(&format!("# TYPE {family} counter")), "{text}");
    }
    let retransmits = metric(
        &text,
        "fractos_roce_events_total",
        &["event=\"retransmit\""],
    );
    let drops: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("fractos_roce_drops_total{") && !l.ends_with(" 0"))
        .collect();
    eprintln!("rc_pingpong MTU {rdma_mtu}: appliance retransmits {retransmits:?}, drops {drops:?}");
    // The segment (a hub) hands the appliance its own frames back; the
    // driver drops them before the engine sees them.
    assert_eq!(
        metric(
            &text,
            "fractos_roce_drops_total",
            &["reason=\"not_our_mac\""]
        ),
        Some(0),
        "{text}"
    );
    let _ = vm.wait_exit(Duration::from_secs(30));
}

#[test]
fn ibv_rc_pingpong_against_the_appliance_at_mtu_1024_and_4096() {
    let guest = LinuxGuest::prepare(&Workspace::locate()).unwrap_or_else(|e| panic!("{e}"));
    pingpong(&guest, 1024, 1500);
    pingpong(&guest, 4096, 9000);
}

/// Point 5 against the booted appliance: a station on the segment abuses
/// the exchange (garbage, a GID naming another host), then connects a QP
/// properly and sends hostile RoCE frames — wrong ICRC, unknown QP, wrong
/// source address, a PSN far outside the window, a WRITE through an rkey
/// the appliance never gave out. Each is refused, dropped or NAK'd and
/// counted in `/metrics`, and the appliance keeps serving.
#[test]
fn hostile_exchange_and_roce_frames_are_refused_and_counted() {
    use fractos_roce::testing;
    use fractos_roce::wire::{emit_roce, MacAddr, Opcode, Reth, RoceHeaders};
    use fractos_tests::l2::SegmentDevice;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::socket::tcp;
    use smoltcp::time::Instant as NetInstant;
    use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

    const STATION_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 3);
    const STATION_MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 9, 3];
    let dir = scratch("rdma-hostile");
    let seg = L2Segment::pick().expect("pick a segment port");
    let (mut app, setup) = launch_appliance(&dir, seg, "");
    // The appliance's segment MAC, from its log (`net: <bdf> mac=...`
    // of the NIC with the segment address is the second NIC's).
    let log = app.log();
    let mac_line = log
        .lines()
        .filter(|l| l.contains("net: ") && l.contains(" mac="))
        .nth(1)
        .unwrap_or_else(|| panic!("no second NIC in\n{log}"));
    let mac_text = mac_line.rsplit("mac=").next().unwrap().trim();
    let mut app_mac = [0u8; 6];
    for (b, h) in app_mac.iter_mut().zip(mac_text.split(':')) {
        *b = u8::from_str_radix(h, 16).expect("hex MAC");
    }

    // The station: smoltcp on the segment (answers the appliance's ARP).
    let mut dev = SegmentDevice::join(seg).expect("join the segment");
    let t0 = std::time::Instant::now();
    let now = || NetInstant::from_micros(t0.elapsed().as_micros() as i64);
    let hw = HardwareAddress::Ethernet(EthernetAddress(STATION_MAC));
    let mut iface = Interface::new(Config::new(hw), &mut dev, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(STATION_IP), 24));
    });
    let mut sockets = SocketSet::new(vec![]);
    // One exchange: sends `msg`, returns what came back before the close.
    let mut port = 30_000u16;
    let mut exchange = |iface: &mut Interface,
                        dev: &mut SegmentDevice,
                        sockets: &mut SocketSet<'static>,
                        msg: &[u8]|
     -> Vec<u8> {
        port += 1;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 512]),
            tcp::SocketBuffer::new(vec![0; 512]),
        );
        s.connect(
            iface.context(),
            (IpAddress::Ipv4(APPLIANCE_IP), 18515),
            port,
        )
        .expect("connect");
        let h = sockets.add(s);
        let mut sent = false;
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            iface.poll(now(), dev, sockets);
            let s = sockets.get_mut::<tcp::Socket>(h);
            if !sent && s.can_send() {
                s.send_slice(msg).expect("send");
                sent = true;
            }
            if s.can_recv() {
                let _ = s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                });
            }
            if got.len() >= 52 {
                s.send_slice(b"done\0").ok();
                s.close();
            }
            if sent && matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                break;
            }
            if sent && !s.is_active() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..100 {
            iface.poll(now(), dev, sockets);
            std::thread::sleep(Duration::from_millis(1));
        }
        sockets.remove(h);
        got
    };
    let gid_of = |ip: Ipv4Addr| -> String {
        ip.to_ipv6_mapped()
            .octets()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let msg = |qpn: u32, psn: u32, ip: Ipv4Addr| -> Vec<u8> {
        let mut m = format!("0000:{qpn:06x}:{psn:06x}:{}", gid_of(ip)).into_bytes();
        m.push(0);
        m
    };

    // Garbage, then a GID naming another host: refused, nothing back.
    let garbage = vec![b'x'; 52];
    assert!(exchange(&mut iface, &mut dev, &mut sockets, &garbage).is_empty());
    let spoof = msg(0x77, 0x100, Ipv4Addr::new(10, 9, 0, 99));
    assert!(exchange(&mut iface, &mut dev, &mut sockets, &spoof).is_empty());
    let alog = app.log();
    assert!(
        alog.contains("exchange from 10.9.0.3 refused: malformed"),
        "{alog}"
    );
    assert!(
        alog.contains("names 10.9.0.99 but the exchange came from 10.9.0.3"),
        "{alog}"
    );
    // A proper exchange: the appliance answers with its QP.
    const EPSN: u32 = 0x100;
    let reply = exchange(
        &mut iface,
        &mut dev,
        &mut sockets,
        &msg(0x77, EPSN, STATION_IP),
    );
    assert_eq!(
        reply.len(),
        52,
        "{:?}\n{}",
        String::from_utf8_lossy(&reply),
        app.log()
    );
    let text = String::from_utf8_lossy(&reply[..51]).into_owned();
    let qpn = u32::from_str_radix(&text[5..11], 16).expect("QPN");
    assert!(text.ends_with(&gid_of(APPLIANCE_IP)), "{text}");

    // Hostile frames to the connected QP.
    let send_frame = |dev: &mut SegmentDevice,
                      src_ip: Ipv4Addr,
                      dest_qp: u32,
                      psn: u32,
                      op: Opcode,
                      reth: Option<Reth>,
                      corrupt: bool| {
        let h = RoceHeaders {
            dst_mac: MacAddr(app_mac),
            src_mac: MacAddr(STATION_MAC),
            src_ip,
            dst_ip: APPLIANCE_IP,
            ip_id: 7,
            udp_src: 0xC001,
            bth: testing::bth(op, dest_qp, psn),
            reth,
            aeth: None,
            imm: None,
        };
        let mut buf = vec![0u8; 256];
        let n = emit_roce(&mut buf, &h, 16, |out| {
            out.fill(0xAB);
            Ok::<(), ()>(())
        })
        .expect("infallible")
        .expect("fits");
        if corrupt {
            buf[n - 1] ^= 0xFF;
        }
        use smoltcp::phy::{Device, TxToken};
        let tx = dev.transmit(now()).expect("segment transmit");
        tx.consume(n, |b| b.copy_from_slice(&buf[..n]));
    };
    let far = (EPSN + 0x40_0000) & 0xFF_FFFF;
    let forged = Reth {
        va: 0,
        rkey: 0x1234_5678,
        len: 16,
    };
    send_frame(
        &mut dev,
        STATION_IP,
        qpn,
        EPSN,
        Opcode::SendOnly,
        None,
        true,
    );
    send_frame(
        &mut dev,
        STATION_IP,
        0x999,
        EPSN,
        Opcode::SendOnly,
        None,
        false,
    );
    let other = Ipv4Addr::new(10, 9, 0, 4);
    send_frame(&mut dev, other, qpn, EPSN, Opcode::SendOnly, None, false);
    send_frame(
        &mut dev,
        STATION_IP,
        qpn,
        far,
        Opcode::SendOnly,
        None,
        false,
    );
    // Keep answering ARP while the appliance NAKs.
    for _ in 0..500 {
        iface.poll(now(), &mut dev, &mut sockets);
        std::thread::sleep(Duration::from_millis(2));
    }
    // None of that moved the QP: at the expected PSN, a WRITE through a
    // forged rkey is a remote access error (the QP then fails, IBA class
    // D1: its receives are flushed and the session ends).
    send_frame(
        &mut dev,
        STATION_IP,
        qpn,
        EPSN,
        Opcode::WriteOnly,
        Some(forged),
        false,
    );
    for _ in 0..500 {
        iface.poll(now(), &mut dev, &mut sockets);
        std::thread::sleep(Duration::from_millis(2));
    }

    let metrics = setup.metrics_addr(0).expect("node exists");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let want: [(&str, &[&str]); 5] = [
        ("fractos_roce_drops_total", &["reason=\"bad_icrc\""]),
        ("fractos_roce_drops_total", &["reason=\"unknown_qp\""]),
        ("fractos_roce_drops_total", &["reason=\"wrong_source\""]),
        (
            "fractos_roce_naks_total",
            &["dir=\"sent\"", "kind=\"remote_access\""],
        ),
        (
            "fractos_roce_naks_total",
            &["dir=\"sent\"", "kind=\"sequence_error\""],
        ),
    ];
    loop {
        let text = scrape_metrics(metrics).expect("scrape");
        let missing: Vec<_> = want
            .iter()
            .filter(|(f, l)| metric(&text, f, l) != Some(1))
            .collect();
        if missing.is_empty() {
            // Nothing was accepted into the ping-pong; the failed QP ended
            // the session.
            let log = app.log();
            assert!(log.contains("rc_pingpong: session 1: QP"), "{log}");
            assert!(log.contains("session ends"), "{log}");
            assert!(!log.contains("rc_pingpong: session 1 ok"), "{log}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counters not moved: {missing:?}\n{text}\n{}",
            app.log()
        );
        for _ in 0..100 {
            iface.poll(now(), &mut dev, &mut sockets);
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(app.is_running(), "the appliance survived");
}
