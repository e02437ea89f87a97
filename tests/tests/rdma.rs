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
use fractos_qemu::node::{Appliance, L2Segment};
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

fn pingpong(guest: &LinuxGuest, rdma_mtu: u32, eth_mtu: u32) {
    let dir = scratch(&format!("rdma-{rdma_mtu}"));
    let seg = L2Segment::pick().expect("pick a segment port");

    // The appliance: its controller (front NIC, metrics forwarded), the
    // segment NIC at APPLIANCE_IP running the engine and the server.
    let setup = ControllerSetup::new(1, DEMO_KEY).expect("pick ports");
    let mut spec = ClusterSpec::controllers(kernel(), dir.join("appliance"), setup.clone());
    spec.cmdline = format!(
        "fractos.ip1={APPLIANCE_IP}/24 fractos.test=rc_pingpong fractos.rc_mtu={rdma_mtu} \
         fractos.rc_size={SIZE} fractos.rc_iters={ITERS}"
    );
    std::fs::create_dir_all(&spec.state_dir).expect("state dir");
    write_key_file(&spec.key_file(), &setup.key).expect("key file");
    let mut node = spec.node(0);
    node.l2 = Some(seg);
    let mut app = Appliance::launch(node).expect("launch the appliance");
    if let Err(e) = app.wait_for("rc_pingpong: serving", READY_TIMEOUT) {
        panic!("appliance never served rc_pingpong: {e}\n{}", app.log());
    }

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
