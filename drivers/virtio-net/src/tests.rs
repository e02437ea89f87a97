//! Driver tests against the fake device in [`crate::fake`].

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, Medium, RxToken as _, TxToken as _};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpAddress, IpCidr, Ipv4Address,
};
use virtio_drivers::transport::{DeviceStatus, DeviceType};

use crate::fake::QEMU_LIKE_FEATURES;
use crate::fake::{
    fake, limit_dma, live_dma_pages, FakeDevice, FakeTransport, Model, TestHal, MAC,
};
use crate::{
    Error, VirtioNet, BUF_LEN, F_CSUM, F_MAC, F_STATUS, F_VERSION_1, MAX_FRAME_LEN, QUEUE_RECEIVE,
    QUEUE_TRANSMIT,
};

type Net<const N: usize> = VirtioNet<TestHal, FakeTransport, N>;

fn setup<const N: usize>(model: Model) -> (FakeDevice, Net<N>) {
    let (dev, transport) = fake(model);
    let net = Net::<N>::new(transport).expect("driver initialises");
    (dev, net)
}

/// A recognisable frame: Ethernet-sized, bytes derived from `seq`.
fn frame(seq: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

/// Sends `data` through smoltcp's transmit path; `false` on backpressure.
fn send<const N: usize>(net: &mut Net<N>, data: &[u8]) -> bool {
    match net.transmit(Instant::ZERO) {
        Some(token) => {
            token.consume(data.len(), |buf| buf.copy_from_slice(data));
            true
        }
        None => false,
    }
}

/// Receives one frame through smoltcp's receive path.
fn recv<const N: usize>(net: &mut Net<N>) -> Option<Vec<u8>> {
    let (rx, _tx) = net.receive(Instant::ZERO)?;
    Some(rx.consume(|buf| buf.to_vec()))
}

fn init_error<const N: usize>(model: Model) -> (FakeDevice, Error) {
    let (dev, transport) = fake(model);
    match Net::<N>::new(transport) {
        Ok(_) => panic!("initialisation unexpectedly succeeded"),
        Err(e) => (dev, e),
    }
}

#[test]
fn init_negotiates_version_1_and_mac_and_posts_rx_buffers() {
    let (dev, net) = setup::<16>(Model::new(QEMU_LIKE_FEATURES));
    // Checksum offload is taken; TSO and mergeable buffers are offered but
    // declined.
    assert_eq!(net.features(), F_VERSION_1 | F_MAC | F_STATUS | F_CSUM);
    {
        let m = dev.model();
        assert_eq!(m.driver_features, F_VERSION_1 | F_MAC | F_STATUS | F_CSUM);
        let ok = DeviceStatus::ACKNOWLEDGE
            | DeviceStatus::DRIVER
            | DeviceStatus::FEATURES_OK
            | DeviceStatus::DRIVER_OK;
        assert_eq!(m.status, ok);
        for q in &m.queues {
            assert!(q.ready);
            assert_eq!(q.size, 16);
        }
    }
    assert_eq!(net.mac_address(), EthernetAddress(MAC));
    assert_eq!(dev.pending(QUEUE_RECEIVE), 16, "every receive slot posted");
    assert_eq!(dev.pending(QUEUE_TRANSMIT), 0);
    assert_eq!(net.rx_posted(), 16);
    assert_eq!(net.tx_free(), 16);
    // Poll mode: the driver asks for no interrupts on either queue.
    assert_eq!(dev.avail_flags(QUEUE_RECEIVE) & 1, 1);
    assert_eq!(dev.avail_flags(QUEUE_TRANSMIT) & 1, 1);
    let caps = net.capabilities();
    assert_eq!(caps.medium, Medium::Ethernet);
    assert_eq!(caps.max_transmission_unit, MAX_FRAME_LEN);
}

#[test]
fn transmit_puts_header_and_frame_on_the_tx_queue() {
    let (dev, mut net) = setup::<8>(Model::new(QEMU_LIKE_FEATURES));
    let data = frame(7, 60);
    assert!(send(&mut net, &data));
    assert_eq!(dev.pending(QUEUE_TRANSMIT), 1);
    // The doorbell waits for the end of the batch.
    assert_eq!(dev.model().notifications[usize::from(QUEUE_TRANSMIT)], 0);
    net.flush();
    assert_eq!(dev.model().notifications[usize::from(QUEUE_TRANSMIT)], 1);
    assert_eq!(net.tx_free(), 7);

    assert_eq!(dev.complete_tx(usize::MAX), 1);
    {
        let mut m = dev.model();
        assert_eq!(m.sent.pop_front(), Some(data));
        assert_eq!(m.sent_headers, vec![vec![0u8; 12]]);
    }
    net.poll().expect("poll");
    assert_eq!(net.tx_free(), 8, "completed slot reclaimed");
    let s = net.stats();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_completed), (1, 60, 1));
}

#[test]
fn receive_hands_the_frame_to_smoltcp_and_reposts_the_slot() {
    let (dev, mut net) = setup::<8>(Model::new(QEMU_LIKE_FEATURES));
    assert_eq!(recv(&mut net), None, "nothing received yet");
    let data = frame(3, 98);
    assert!(dev.deliver(&data));
    assert_eq!(recv(&mut net), Some(data));
    assert_eq!(recv(&mut net), None);
    let s = net.stats();
    assert_eq!((s.rx_frames, s.rx_bytes, s.rx_errors), (1, 98, 0));
    // `receive` reposts in batches (2 slots for an 8-entry queue): one
    // consumed slot waits; `poll` reposts everything.
    assert_eq!(net.rx_posted(), 7);
    net.poll().expect("poll");
    assert_eq!(net.rx_posted(), 8);
    assert_eq!(dev.pending(QUEUE_RECEIVE), 8);

    // A token dropped without being consumed also gives its slot back.
    assert!(dev.deliver(&frame(4, 64)));
    drop(net.receive(Instant::ZERO).expect("a frame"));
    assert_eq!(net.rx_posted(), 7);
    net.poll().expect("poll");
    assert_eq!(net.rx_posted(), 8);
}

#[test]
fn rings_wrap_around_slots_and_u16_indices() {
    const N: usize = 4;
    let (dev, mut net) = setup::<N>(Model::new(QEMU_LIKE_FEATURES));
    let pages = live_dma_pages();
    let mut seq = 0u32;
    // 70,000 frames each way: ring slots wrap every 4 and the 16-bit
    // avail/used indices wrap past 65,535. Batches of 1..=4 keep the
    // driver's and device's positions out of step.
    while seq < 70_000 {
        let batch = 1 + (seq as usize % N);
        let len = 60 + (seq as usize % 97);
        for k in 0..batch {
            assert!(send(&mut net, &frame(seq + k as u32, len)), "slot free");
        }
        assert_eq!(dev.complete_tx(usize::MAX), batch);
        for k in 0..batch {
            assert!(dev.deliver(&frame(seq + k as u32, len)), "rx buffer posted");
        }
        for k in 0..batch {
            let expect = frame(seq + k as u32, len);
            assert_eq!(dev.model().sent.pop_front().as_ref(), Some(&expect));
            assert_eq!(
                recv(&mut net).as_ref(),
                Some(&expect),
                "frame {}",
                seq + k as u32
            );
        }
        // Like smoltcp's `Interface::poll`: receive until `None`, which also
        // reposts the last slot.
        assert_eq!(recv(&mut net), None);
        seq += batch as u32;
    }
    net.poll().expect("poll");
    let s = net.stats();
    assert_eq!(s.tx_frames, u64::from(seq));
    assert_eq!(s.tx_completed, u64::from(seq));
    assert_eq!(s.rx_frames, u64::from(seq));
    assert_eq!((s.rx_errors, s.tx_errors, s.tx_dropped), (0, 0, 0));
    assert_eq!((net.rx_posted(), net.tx_free()), (N, N));
    let m = dev.model();
    assert!(m.queues.iter().all(|q| q.used_idx == seq as u16));
    drop(m);
    assert_eq!(live_dma_pages(), pages, "no memory growth");
}

#[test]
fn full_tx_queue_applies_backpressure_and_recovers() {
    const N: usize = 4;
    let (dev, mut net) = setup::<N>(Model::new(QEMU_LIKE_FEATURES));
    for seq in 0..N as u32 {
        assert!(send(&mut net, &frame(seq, 60)));
    }
    assert!(
        !send(&mut net, &frame(99, 60)),
        "no token while the queue is full"
    );
    assert_eq!(net.stats().tx_full, 1);
    assert_eq!(dev.pending(QUEUE_TRANSMIT), N as u16);

    // A reply built on the receive path while full is dropped, not queued.
    assert!(dev.deliver(&frame(50, 60)));
    let (rx, tx) = net.receive(Instant::ZERO).expect("a frame");
    rx.consume(|_| ());
    tx.consume(60, |buf| buf.fill(0xee));
    assert_eq!(net.stats().tx_dropped, 1);
    assert_eq!(dev.pending(QUEUE_TRANSMIT), N as u16);

    // The device drains one: exactly one slot comes back.
    assert_eq!(dev.complete_tx(1), 1);
    assert!(send(&mut net, &frame(4, 60)));
    assert!(!send(&mut net, &frame(5, 60)));
    assert_eq!(dev.complete_tx(usize::MAX), N);
    let sent: Vec<_> = dev.model().sent.drain(..).collect();
    let expect: Vec<_> = (0..=N as u32).map(|s| frame(s, 60)).collect();
    assert_eq!(sent, expect, "in order, nothing from the dropped reply");
}

#[test]
fn full_size_frames_round_trip_and_oversized_ones_are_dropped() {
    let (dev, mut net) = setup::<4>(Model::new(QEMU_LIKE_FEATURES));
    let big = frame(9, MAX_FRAME_LEN);
    assert!(send(&mut net, &big));
    assert_eq!(dev.complete_tx(usize::MAX), 1);
    assert_eq!(dev.model().sent.pop_front(), Some(big.clone()));
    assert!(dev.deliver(&big));
    assert_eq!(recv(&mut net), Some(big));

    // Larger than a slot: smoltcp still gets a buffer to build it in, but
    // nothing reaches the device and the slot stays free.
    for len in [BUF_LEN, 3 * BUF_LEN] {
        let token = net.transmit(Instant::ZERO).expect("free slot");
        let built = token.consume(len, |buf| buf.len());
        assert_eq!(built, len);
    }
    assert_eq!(net.stats().tx_dropped, 2);
    assert_eq!(dev.pending(QUEUE_TRANSMIT), 0);
    assert_eq!(net.tx_free(), 4);
}

#[test]
fn device_that_rejects_features_fails_init_with_a_typed_error() {
    let mut model = Model::new(QEMU_LIKE_FEATURES);
    model.reject_features = true;
    let (dev, err) = init_error::<8>(model);
    assert_eq!(
        err,
        Error::FeaturesRejected(F_VERSION_1 | F_MAC | F_STATUS | F_CSUM)
    );
    let m = dev.model();
    assert!(m.status.contains(DeviceStatus::FAILED));
    assert!(!m.status.contains(DeviceStatus::DRIVER_OK));
    assert!(m.queues.iter().all(|q| !q.ready), "no queue was set up");
    drop(m);
    assert_eq!(live_dma_pages(), 0, "nothing allocated, nothing leaked");
}

#[test]
fn legacy_device_without_version_1_is_refused() {
    let (dev, err) = init_error::<8>(Model::new(F_MAC | F_STATUS));
    assert_eq!(
        err,
        Error::MissingFeatures {
            offered: F_MAC | F_STATUS,
            missing: F_VERSION_1,
        }
    );
    assert!(dev.model().status.contains(DeviceStatus::FAILED));
}

#[test]
fn device_without_mac_is_refused() {
    let (_, err) = init_error::<8>(Model::new(F_VERSION_1));
    assert!(matches!(err, Error::MissingFeatures { missing, .. } if missing == F_MAC));
}

#[test]
fn other_device_types_and_small_queues_are_refused() {
    let mut model = Model::new(QEMU_LIKE_FEATURES);
    model.device_type = DeviceType::Block;
    let (_, err) = init_error::<8>(model);
    assert_eq!(err, Error::NotNetwork(DeviceType::Block));

    let mut model = Model::new(QEMU_LIKE_FEATURES);
    model.max_queue_size = 4;
    let (dev, err) = init_error::<8>(model);
    assert_eq!(
        err,
        Error::QueueTooSmall {
            queue: 0,
            max: 4,
            needed: 8,
        }
    );
    assert!(dev.model().status.contains(DeviceStatus::FAILED));
    assert_eq!(live_dma_pages(), 0);
}

#[test]
fn device_stuck_in_reset_times_out() {
    let mut model = Model::new(QEMU_LIKE_FEATURES);
    model.status = DeviceStatus::DEVICE_NEEDS_RESET;
    model.stuck_reset = true;
    let (_, err) = init_error::<8>(model);
    assert_eq!(err, Error::ResetTimeout);
}

#[test]
fn dma_exhaustion_fails_init_without_leaking() {
    // Each queue's rings take two allocations inside virtio-drivers, then
    // the receive pool and the transmit pool one each.
    limit_dma(0);
    let (_, err) = init_error::<8>(Model::new(QEMU_LIKE_FEATURES));
    assert_eq!(err, Error::Virtio(virtio_drivers::Error::DmaError));
    assert_eq!(live_dma_pages(), 0);

    limit_dma(4);
    let (dev, err) = init_error::<8>(Model::new(QEMU_LIKE_FEATURES));
    assert_eq!(err, Error::Dma { pages: 4 }, "8 receive slots of 2 KiB");
    assert_eq!(live_dma_pages(), 0, "queue rings freed again");
    assert!(dev.model().queues.iter().all(|q| !q.ready));

    limit_dma(5);
    let (_, err) = init_error::<8>(Model::new(QEMU_LIKE_FEATURES));
    assert_eq!(err, Error::Dma { pages: 5 }, "8 + 1 transmit slots");
    assert_eq!(live_dma_pages(), 0);
}

#[test]
fn bogus_used_length_is_dropped_and_the_slot_reused() {
    let (dev, mut net) = setup::<4>(Model::new(QEMU_LIKE_FEATURES));
    let claimed = u32::try_from(BUF_LEN).expect("small") + 100;
    assert!(dev.deliver_claiming(&frame(1, 60), Some(claimed)));
    assert_eq!(recv(&mut net), None, "never handed to smoltcp");
    assert_eq!(net.stats().rx_errors, 1);
    assert!(matches!(net.take_error(), Some(Error::BadLength { .. })));
    net.poll().expect("poll");
    assert_eq!(net.rx_posted(), 4, "slot reposted");
    let good = frame(2, 60);
    assert!(dev.deliver(&good));
    assert_eq!(recv(&mut net), Some(good));
}

#[test]
fn drop_unsets_queues_and_frees_all_dma() {
    let before = live_dma_pages();
    let (dev, net) = setup::<8>(Model::new(QEMU_LIKE_FEATURES));
    assert!(live_dma_pages() > before);
    drop(net);
    assert!(dev.model().queues.iter().all(|q| !q.ready));
    assert_eq!(live_dma_pages(), before);
}

#[test]
fn smoltcp_interface_answers_arp_through_the_driver() {
    let (dev, mut net) = setup::<8>(Model::new(QEMU_LIKE_FEATURES));
    let mac = net.mac_address();
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ethernet(mac)),
        &mut net,
        Instant::ZERO,
    );
    let ours = Ipv4Address::new(10, 0, 2, 15);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::Ipv4(ours), 24))
            .expect("room for one address");
    });
    let mut sockets = SocketSet::new(vec![]);

    let peer_mac = EthernetAddress([0x52, 0x55, 10, 0, 2, 2]);
    let peer_ip = Ipv4Address::new(10, 0, 2, 2);
    let eth = EthernetRepr {
        src_addr: peer_mac,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: peer_mac,
        source_protocol_addr: peer_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: ours,
    };
    let mut request = vec![0; eth.buffer_len() + arp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut request[..]);
    eth.emit(&mut f);
    arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    assert!(dev.deliver(&request));

    iface.poll(Instant::from_millis(1), &mut net, &mut sockets);

    assert_eq!(dev.complete_tx(usize::MAX), 1, "one reply sent");
    let reply = dev.model().sent.pop_front().expect("reply frame");
    let f = EthernetFrame::new_checked(&reply[..]).expect("ethernet");
    assert_eq!(f.dst_addr(), peer_mac);
    assert_eq!(f.src_addr(), mac);
    assert_eq!(f.ethertype(), EthernetProtocol::Arp);
    let parsed = ArpRepr::parse(&ArpPacket::new_checked(f.payload()).expect("arp")).expect("arp");
    assert_eq!(
        parsed,
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: mac,
            source_protocol_addr: ours,
            target_hardware_addr: peer_mac,
            target_protocol_addr: peer_ip,
        }
    );
    assert_eq!(net.stats().rx_frames, 1);
}

#[test]
fn event_idx_is_declined_so_the_used_ring_flags_govern_notifications() {
    let offered = QEMU_LIKE_FEATURES | crate::F_RING_EVENT_IDX;
    let (dev, net) = setup::<8>(Model::new(offered));
    assert_eq!(net.features() & crate::F_RING_EVENT_IDX, 0);
    assert_eq!(dev.model().driver_features & crate::F_RING_EVENT_IDX, 0);
    // Without event indices, "no interrupts" is the avail ring's flag.
    assert_eq!(dev.avail_flags(QUEUE_RECEIVE) & 1, 1);
}

#[test]
fn a_burst_of_transmits_rings_the_doorbell_once() {
    let (dev, mut net) = setup::<16>(Model::new(QEMU_LIKE_FEATURES));
    let tx = usize::from(QUEUE_TRANSMIT);
    for seq in 0..5 {
        assert!(send(&mut net, &frame(seq, 100)));
    }
    assert_eq!(dev.pending(QUEUE_TRANSMIT), 5);
    assert_eq!(dev.model().notifications[tx], 0);
    net.flush();
    assert_eq!(dev.model().notifications[tx], 1);
    net.flush();
    assert_eq!(dev.model().notifications[tx], 1, "nothing new: no doorbell");
    // Receive polls leave a deferred doorbell alone: one per turn.
    assert!(send(&mut net, &frame(9, 100)));
    assert_eq!(recv(&mut net), None);
    assert_eq!(dev.model().notifications[tx], 1);
    net.flush();
    assert_eq!(dev.model().notifications[tx], 2);
    assert_eq!(dev.complete_tx(usize::MAX), 6);
    let m = dev.model();
    assert!((0..5)
        .chain([9])
        .zip(&m.sent)
        .all(|(seq, f)| *f == frame(seq, 100)));
}

#[test]
fn a_device_that_suppresses_notifications_gets_none() {
    let (dev, mut net) = setup::<8>(Model::new(QEMU_LIKE_FEATURES));
    let before = dev.model().notifications;
    // The device is busy with both queues (QEMU: buffers in hand, flush
    // scheduled) and says so in the used rings.
    dev.set_used_flags(QUEUE_TRANSMIT, 1);
    dev.set_used_flags(QUEUE_RECEIVE, 1);
    assert!(send(&mut net, &frame(1, 80)));
    net.flush();
    assert!(dev.deliver(&frame(2, 80)));
    assert_eq!(recv(&mut net), Some(frame(2, 80)));
    net.poll().expect("poll reposts the slot");
    assert_eq!(net.rx_posted(), 8);
    assert_eq!(dev.model().notifications, before);
    // Idle again: the next frame rings.
    dev.set_used_flags(QUEUE_TRANSMIT, 0);
    assert!(send(&mut net, &frame(3, 80)));
    net.flush();
    assert_eq!(
        dev.model().notifications[usize::from(QUEUE_TRANSMIT)],
        before[1] + 1
    );
}

mod checksums {
    use smoltcp::phy::{ChecksumCapabilities, Device};
    use smoltcp::time::Instant;
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Address,
        Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };

    use super::{recv, send, setup};
    use crate::csum;
    use crate::fake::{Model, QEMU_LIKE_FEATURES};
    use crate::{F_CSUM, F_GUEST_CSUM, F_MAC, F_STATUS, F_VERSION_1};

    const SRC: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
    const DST: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);

    /// An Ethernet/IPv4/TCP frame with `payload`, its TCP checksum
    /// computed by smoltcp (`good`) or left 0.
    fn tcp_frame(payload: &[u8], good: bool) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 7000,
            dst_port: 40000,
            control: TcpControl::Psh,
            seq_number: TcpSeqNumber(0x1234_5678),
            ack_number: Some(TcpSeqNumber(42)),
            window_len: 4096,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: SRC,
            dst_addr: DST,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress(crate::fake::MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
        let mut caps = ChecksumCapabilities::default();
        if !good {
            caps.tcp = smoltcp::phy::Checksum::None;
        }
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        let mut t = TcpPacket::new_unchecked(p.payload_mut());
        tcp.emit(&mut t, &SRC.into(), &DST.into(), &caps);
        buf
    }

    fn tcp_checksum_ok(frame: &[u8]) -> bool {
        let f = EthernetFrame::new_checked(frame).expect("ethernet");
        let p = Ipv4Packet::new_checked(f.payload()).expect("ipv4");
        let t = TcpPacket::new_checked(p.payload()).expect("tcp");
        t.verify_checksum(&p.src_addr().into(), &p.dst_addr().into())
    }

    fn payload(len: usize, seed: u32) -> Vec<u8> {
        super::frame(seed.wrapping_mul(2_654_435_761), len)
    }

    #[test]
    fn software_checksum_matches_smoltcp_for_every_length_parity() {
        for len in (0..64).chain([511, 512, 1023, 1459, 1460]) {
            let want = tcp_frame(&payload(len, len as u32), true);
            let mut got = tcp_frame(&payload(len, len as u32), false);
            let csum::Frame::Tcp(seg) = csum::classify(&got) else {
                panic!("not classified as TCP");
            };
            assert_eq!((seg.start, seg.len), (34, 20 + len));
            csum::fill(&mut got, seg);
            assert_eq!(got, want, "payload length {len}");
            assert!(csum::verify(&got, seg));
        }
    }

    #[test]
    fn frames_go_out_with_a_valid_tcp_checksum_and_smoltcp_is_told_so() {
        let (dev, mut net) = setup::<8>(Model::new(F_VERSION_1 | F_MAC));
        let caps = net.capabilities().checksum.tcp;
        assert!(
            !caps.rx() && !caps.tx(),
            "smoltcp leaves TCP checksums to us"
        );
        let unsummed = tcp_frame(&payload(1000, 1), false);
        assert!(!tcp_checksum_ok(&unsummed));
        assert!(send(&mut net, &unsummed));
        // Not TCP: left alone.
        assert!(send(&mut net, &super::frame(5, 60)));
        assert_eq!(dev.complete_tx(usize::MAX), 2);
        let m = dev.model();
        assert_eq!(m.sent[0], tcp_frame(&payload(1000, 1), true));
        assert_eq!(m.sent[1], super::frame(5, 60));
        assert_eq!(m.sent_headers[0], vec![0u8; 12], "no offload asked");
        assert!(net.stats().csum_cycles > 0 || cfg!(not(target_arch = "x86_64")));
    }

    #[test]
    fn with_csum_offload_the_device_completes_the_checksum() {
        let (dev, mut net) = setup::<8>(Model::new(QEMU_LIKE_FEATURES | F_GUEST_CSUM));
        assert_eq!(
            net.features(),
            F_VERSION_1 | F_MAC | F_STATUS | F_CSUM | F_GUEST_CSUM
        );
        assert_eq!(
            dev.model().driver_features,
            F_VERSION_1 | F_MAC | F_STATUS | F_CSUM | F_GUEST_CSUM
        );
        assert!(send(&mut net, &tcp_frame(&payload(777, 3), false)));
        assert_eq!(dev.complete_tx(1), 1);
        let m = dev.model();
        let h = &m.sent_headers[0];
        assert_eq!(h[0], 1, "VIRTIO_NET_HDR_F_NEEDS_CSUM");
        let start = usize::from(u16::from_le_bytes([h[6], h[7]]));
        let offset = usize::from(u16::from_le_bytes([h[8], h[9]]));
        assert_eq!((start, offset), (34, 16));
        // Play the device: ones'-complement sum from csum_start, stored at
        // csum_start + csum_offset.
        let mut f = m.sent[0].clone();
        let c = !csum::fold(csum::sum(&f[start..], 0));
        f[start + offset..start + offset + 2].copy_from_slice(&c.to_be_bytes());
        assert_eq!(f, tcp_frame(&payload(777, 3), true));
        assert_eq!(net.stats().tx_csum_offloaded, 1);
    }

    #[test]
    fn received_tcp_frames_with_a_bad_checksum_are_dropped() {
        let (dev, mut net) = setup::<8>(Model::new(F_VERSION_1 | F_MAC));
        let good = tcp_frame(&payload(1200, 7), true);
        let mut bad = good.clone();
        bad[100] ^= 0x40;
        assert!(dev.deliver(&bad));
        assert!(dev.deliver(&good));
        assert_eq!(recv(&mut net), Some(good));
        assert_eq!(recv(&mut net), None);
        let s = net.stats();
        assert_eq!((s.rx_frames, s.rx_bad_checksum), (1, 1));
        net.poll().expect("poll");
        assert_eq!(net.rx_posted(), 8, "the dropped frame's slot is reposted");
    }

    #[test]
    fn malformed_or_fragmented_tcp_frames_are_dropped_and_others_pass() {
        let (dev, mut net) = setup::<16>(Model::new(F_VERSION_1 | F_MAC));
        let good = tcp_frame(&payload(100, 9), true);
        // IPv4 total length beyond the frame.
        let mut long = good.clone();
        long[16..18].copy_from_slice(&2000u16.to_be_bytes());
        // A header length below 20 bytes.
        let mut ihl = good.clone();
        ihl[14] = 0x44;
        // More fragments follow.
        let mut frag = good.clone();
        frag[20] |= 0x20;
        // Cut inside the IPv4 header, after the protocol byte.
        let short = good[..30].to_vec();
        for f in [&long, &ihl, &frag, &short] {
            assert!(dev.deliver(f));
        }
        // Not IPv4 + TCP: smoltcp's business.
        let other = super::frame(4, 64);
        assert!(dev.deliver(&other));
        assert_eq!(recv(&mut net), Some(other));
        assert_eq!(recv(&mut net), None);
        assert_eq!(net.stats().rx_bad_checksum, 4);
    }

    #[test]
    fn a_frame_the_device_validated_is_not_summed_again() {
        let (dev, mut net) = setup::<8>(Model::new(F_VERSION_1 | F_MAC | F_GUEST_CSUM));
        let mut f = tcp_frame(&payload(300, 11), true);
        f[60] ^= 1; // Would fail a software check.
        assert!(dev.deliver_flagged(2, &f)); // VIRTIO_NET_HDR_F_DATA_VALID
        assert_eq!(recv(&mut net), Some(f.clone()));
        // Without GUEST_CSUM negotiated the flag means nothing.
        let (dev, mut net) = setup::<8>(Model::new(F_VERSION_1 | F_MAC));
        assert!(dev.deliver_flagged(2, &f));
        assert_eq!(recv(&mut net), None);
        assert_eq!(net.stats().rx_bad_checksum, 1);
    }

    #[test]
    fn garbage_claiming_ipv4_tcp_never_panics() {
        let (dev, mut net) = setup::<8>(Model::new(F_VERSION_1 | F_MAC));
        for seed in 0..2000u32 {
            let len = (seed as usize * 7) % 200;
            let mut f = payload(len, seed);
            if f.len() > 23 {
                f[12] = 0x08;
                f[13] = 0x00;
                f[14] = 0x40 | (f[14] & 0x0f);
                f[23] = 6;
            }
            let _ = csum::classify(&f);
            assert!(dev.deliver(&f));
            let _ = recv(&mut net);
            net.poll().expect("poll");
        }
        assert_eq!(net.rx_posted(), 8);
        let _ = net.receive(Instant::ZERO);
    }
}

#[test]
fn a_starved_receive_queue_is_refilled_and_notified_once_per_batch() {
    let (dev, mut net) = setup::<16>(Model::new(QEMU_LIKE_FEATURES));
    let rx = usize::from(QUEUE_RECEIVE);
    let before = dev.model().notifications[rx];
    for seq in 0..16 {
        assert!(dev.deliver(&frame(seq, 90)));
    }
    assert_eq!(dev.pending(QUEUE_RECEIVE), 0, "the device ran dry");
    for seq in 0..16 {
        assert_eq!(recv(&mut net), Some(frame(seq, 90)));
    }
    assert_eq!(recv(&mut net), None);
    // Batches of 4 (a quarter of the queue): 16 frames, 4 doorbells.
    assert_eq!(dev.model().notifications[rx] - before, 4);
    assert_eq!(net.rx_posted(), 16);
    assert_eq!(dev.pending(QUEUE_RECEIVE), 16);
}

/// Routes by the first byte: 0xD1 diverted, 0xC0 copied, else smoltcp's.
fn first_byte_route(frame: &[u8]) -> crate::RxRoute {
    match frame.first() {
        Some(0xD1) => crate::RxRoute::Divert,
        Some(0xC0) => crate::RxRoute::Copy,
        _ => crate::RxRoute::Stack,
    }
}

#[test]
fn rx_filter_diverts_copies_and_passes_frames_in_order() {
    let (dev, mut net) = setup::<8>(Model::new(QEMU_LIKE_FEATURES));
    net.set_rx_filter(Some(first_byte_route));
    let mut diverted = frame(1, 300);
    diverted[0] = 0xD1;
    let mut copied = frame(2, 42);
    copied[0] = 0xC0;
    let mut long_copy = frame(3, 200);
    long_copy[0] = 0xC0;
    let mut stack = frame(4, 100);
    stack[0] = 0x52;
    let mut diverted2 = frame(5, 77);
    diverted2[0] = 0xD1;
    for f in [&diverted, &copied, &long_copy, &stack, &diverted2] {
        assert!(dev.deliver(f));
    }
    // smoltcp sees the copied frames and its own, never the diverted ones.
    assert_eq!(recv(&mut net), Some(copied.clone()));
    assert_eq!(recv(&mut net), Some(long_copy.clone()));
    assert_eq!(recv(&mut net), Some(stack.clone()));
    assert_eq!(recv(&mut net), None);
    let mut got = Vec::new();
    assert_eq!(net.drain_diverted(|f| got.push(f.to_vec())), 3);
    // Copies first (the long one was too long to copy), then the diverted
    // frames in arrival order.
    assert_eq!(got, vec![copied, diverted, diverted2]);
    assert_eq!(net.drain_diverted(|_| panic!("drained twice")), 0);
    let s = net.stats();
    assert_eq!(
        (s.rx_frames, s.rx_diverted, s.rx_copied, s.rx_copy_overflow),
        (5, 2, 1, 1)
    );
    // Diverted slots went back to the device.
    net.poll().expect("poll");
    assert_eq!(net.rx_posted(), 8);
    // Our own frames, echoed by a hub, are dropped (the filter is not
    // asked).
    let mut own = frame(7, 60);
    own[0] = 0xD1;
    own[6..12].copy_from_slice(&MAC);
    assert!(dev.deliver(&own));
    assert_eq!(recv(&mut net), None);
    assert_eq!(net.drain_diverted(|_| panic!("own frame diverted")), 0);
    assert_eq!(net.stats().rx_own, 1);
    // Without a filter everything is smoltcp's again.
    net.set_rx_filter(None);
    let mut d = frame(6, 60);
    d[0] = 0xD1;
    assert!(dev.deliver(&d));
    assert_eq!(recv(&mut net), Some(d));
}

#[test]
fn jumbo_slots_carry_9000_byte_mtu_frames_both_ways() {
    let (dev, transport) = fake(Model::new(QEMU_LIKE_FEATURES));
    let mut net = Net::<8>::with_frame_len(transport, crate::MAX_JUMBO_FRAME_LEN)
        .expect("driver initialises");
    assert!(net.max_frame_len() >= crate::MAX_JUMBO_FRAME_LEN);
    // smoltcp still sees the standard MTU.
    assert_eq!(net.capabilities().max_transmission_unit, MAX_FRAME_LEN);
    net.set_rx_filter(Some(first_byte_route));
    let mut big = frame(8, crate::MAX_JUMBO_FRAME_LEN);
    big[0] = 0xD1;
    assert!(dev.deliver(&big));
    assert_eq!(recv(&mut net), None);
    let mut got = Vec::new();
    net.drain_diverted(|f| got.push(f.to_vec()));
    assert_eq!(got, vec![big.clone()]);
    assert!(net.send_frame(&big));
    net.flush();
    assert_eq!(dev.complete_tx(usize::MAX), 1);
    assert_eq!(dev.model().sent.pop_front(), Some(big.clone()));
    // One byte more than a slot is refused and counted.
    let too_big = frame(9, net.max_frame_len() + 1);
    assert!(!net.send_frame(&too_big));
    let s = net.stats();
    assert_eq!((s.tx_raw, s.tx_dropped), (1, 1));
    // The default driver refuses a jumbo frame.
    let (_dev2, transport2) = fake(Model::new(QEMU_LIKE_FEATURES));
    let mut small = Net::<8>::new(transport2).expect("driver initialises");
    assert_eq!(small.max_frame_len(), BUF_LEN - 12);
    assert!(!small.send_frame(&big));
}

#[test]
fn send_frame_reports_backpressure() {
    let (dev, mut net) = setup::<4>(Model::new(QEMU_LIKE_FEATURES));
    let f = frame(1, 60);
    for _ in 0..4 {
        assert!(net.send_frame(&f));
    }
    assert!(!net.send_frame(&f), "every slot in flight");
    assert_eq!(net.stats().tx_full, 1);
    assert_eq!(dev.complete_tx(usize::MAX), 4);
    assert!(net.send_frame(&f));
    assert_eq!(net.stats().tx_raw, 5);
}
