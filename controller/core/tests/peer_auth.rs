//! Attacks on the peer protocol from the network: relayed, reflected,
//! replayed and downgraded handshakes, frames rewritten, injected, replayed
//! or dropped on an authenticated link, and eavesdropping in `Secure` mode.

mod harness;

use std::time::Duration;

use fractos_core::{
    CloseReason, Config, Controller, Dest, Instant, LinkId, LinkRole, Output, PeerSecurity,
};
use fractos_wire::{
    frame_body, ErrorCode, NodeId, PeerMsg, ProcessMsg, Reply, Rights, MAX_FRAME_LEN,
};
use harness::{config, handle, Net};

/// Link ids the attacker uses at the victims (the harness uses 0..n).
const EVIL_1: LinkId = LinkId(100);
const EVIL_2: LinkId = LinkId(101);

/// Everything `c` sends, as decoded plaintext (handshake frames are clear).
fn drain(c: &mut Controller) -> Vec<(LinkId, Result<PeerMsg, Vec<u8>>)> {
    let mut out = Vec::new();
    while let Some(o) = c.poll_output() {
        if let Output::Send {
            to: Dest::Link(l),
            frame,
        } = o
        {
            let body = frame_body(&frame, MAX_FRAME_LEN + 64).unwrap();
            out.push((l, PeerMsg::decode(body).map_err(|_| body.to_vec())));
        }
    }
    out
}

/// The handshake message `c` sent on `link`.
fn sent_on(c: &mut Controller, link: LinkId) -> PeerMsg {
    drain(c)
        .into_iter()
        .find_map(|(l, m)| (l == link).then_some(m).and_then(Result::ok))
        .expect("a handshake message")
}

fn frame_of(msg: &PeerMsg) -> Vec<u8> {
    let mut f = Vec::new();
    msg.encode(&mut f);
    f.split_off(4)
}

/// A 3-node cluster whose links are all up, plus the time to use.
fn cluster() -> Net {
    let net = Net::new(3);
    for c in &net.ctrls {
        assert_eq!(c.stats().peers, 2);
    }
    net
}

fn hello(node: u32, nonce: [u8; 32], responder: u32) -> PeerMsg {
    PeerMsg::Hello {
        node: NodeId(node),
        incarnation: 77,
        nonce,
        responder: NodeId(responder),
        security: PeerSecurity::Authenticated,
    }
}

/// The attack that broke the version-1 handshake, adapted to every relay
/// the version-2 handshake offers: an attacker reaching the peer ports of
/// nodes 1 and 2 tries to make node 1 accept it as node 2 by feeding node
/// 1's challenge to node 2 and node 2's proof back to node 1.
#[test]
fn a_handshake_relayed_through_a_second_controller_is_refused() {
    let mut net = cluster();
    let now = net.now;
    // The attacker connects to node 1 claiming to be node 2.
    net.ctrls[0].link_connected(now, EVIL_1, LinkRole::Responder);
    net.ctrls[0].link_message(now, EVIL_1, &frame_of(&hello(2, [9; 32], 1)));
    let PeerMsg::HelloReply {
        nonce: n1,
        proof: proof1,
        ..
    } = sent_on(&mut net.ctrls[0], EVIL_1)
    else {
        panic!("node 1 answers a Hello with a HelloReply")
    };
    // It hands node 1's challenge to node 2, claiming to be node 3.
    net.ctrls[1].link_connected(now, EVIL_2, LinkRole::Responder);
    net.ctrls[1].link_message(now, EVIL_2, &frame_of(&hello(3, n1, 2)));
    let PeerMsg::HelloReply { proof: proof2, .. } = sent_on(&mut net.ctrls[1], EVIL_2) else {
        panic!("node 2 answers a Hello with a HelloReply")
    };
    // Node 2's proof (responder role, another transcript) and node 1's own
    // proof (reflection) are both refused as node 1's Finish.
    for (i, proof) in [proof2, proof1].into_iter().enumerate() {
        let link = LinkId(EVIL_1.0 + 10 * i as u64);
        if i > 0 {
            net.ctrls[0].link_connected(now, link, LinkRole::Responder);
            net.ctrls[0].link_message(now, link, &frame_of(&hello(2, [9; 32], 1)));
            let _ = drain(&mut net.ctrls[0]);
        }
        net.ctrls[0].link_message(now, link, &frame_of(&PeerMsg::Finish { proof }));
        let out: Vec<_> = std::iter::from_fn(|| net.ctrls[0].poll_output()).collect();
        assert!(
            out.contains(&Output::Close {
                to: Dest::Link(link),
                reason: CloseReason::AuthFailed
            }),
            "attempt {i}: {out:?}"
        );
        assert_eq!(net.ctrls[0].link_peer(link), None);
    }
    // Node 1 kept its real link to node 2, and it still works.
    assert_eq!(net.ctrls[0].stats().peers, 2);
    assert_eq!(net.ctrls[0].link_peer(LinkId(1)), Some(NodeId(2)));
    let a = net.attach(0, "a");
    let b = net.attach(1, "b");
    let r = handle(net.op(b, |op| ProcessMsg::RequestCreate {
        op,
        tag: 5,
        imms: vec![],
        caps: vec![],
    }));
    net.op(b, |op| ProcessMsg::Publish {
        op,
        name: b"r".to_vec(),
        cap: r,
    })
    .unwrap();
    let at_a = handle(net.op(a, |op| ProcessMsg::Lookup {
        op,
        name: b"r".to_vec(),
        wait_ms: 0,
    }));
    let invoked = net.op(a, |op| ProcessMsg::Invoke {
        op,
        cap: at_a,
        imms: vec![],
        caps: vec![],
    });
    assert_eq!(invoked, Ok(Reply::Done));
    assert_eq!(net.invocations(b).len(), 1);
    net.check();
}

/// An attacker on the path between two controllers relays their whole
/// handshake (it cannot do better), then tries to use the link: every
/// injected, rewritten, replayed or dropped frame closes it.
#[test]
fn frames_rewritten_injected_replayed_or_dropped_after_the_handshake_close_the_link() {
    // Which frame from node 1 to node 2 (after the handshake) to tamper
    // with, and how.
    #[derive(Clone, Copy, Debug)]
    enum Attack {
        FlipBit,
        Replay,
        Drop,
        Truncate,
    }
    for security in [PeerSecurity::Authenticated, PeerSecurity::Secure] {
        for attack in [
            Attack::FlipBit,
            Attack::Replay,
            Attack::Drop,
            Attack::Truncate,
        ] {
            let mut cfgs: Vec<Config> = (0..2).map(|i| config(i, 2, 1)).collect();
            cfgs[0].peer_security = security;
            let mut net = Net::with_configs(cfgs);
            assert_eq!(net.ctrls[1].link_security(LinkId(0)), Some(security));
            let a = net.attach(0, "a");
            let b = net.attach(1, "b");
            let r = handle(net.op(b, |op| ProcessMsg::RequestCreate {
                op,
                tag: 5,
                imms: vec![],
                caps: vec![],
            }));
            net.op(b, |op| ProcessMsg::Publish {
                op,
                name: b"r".to_vec(),
                cap: r,
            })
            .unwrap();
            let at_a = handle(net.op(a, |op| ProcessMsg::Lookup {
                op,
                name: b"r".to_vec(),
                wait_ms: 0,
            }));
            let mut seen: Vec<Vec<u8>> = Vec::new();
            net.tap = Some(Box::new(move |from, _to, body| {
                if from != 0 {
                    return true;
                }
                seen.push(body.clone());
                match attack {
                    Attack::FlipBit => {
                        let mid = body.len() / 2;
                        body[mid] ^= 0x10;
                    }
                    Attack::Replay => *body = seen[0].clone(),
                    Attack::Truncate => body.truncate(body.len() - 1),
                    Attack::Drop if seen.len() == 1 => return false,
                    Attack::Drop => {}
                }
                true
            }));
            // The invoke's frame is the one tampered with (Drop: dropped,
            // and the next frame — a heartbeat — arrives out of sequence).
            let op = net.start(a, |op| ProcessMsg::Invoke {
                op,
                cap: at_a,
                imms: vec![1, 2, 3],
                caps: vec![],
            });
            if matches!(attack, Attack::Replay) {
                // The first frame seen is replayed on the second send.
                net.advance(Duration::from_millis(600));
            }
            net.advance(Duration::from_millis(600));
            assert!(
                net.closed_links
                    .contains(&(1, 0, CloseReason::IntegrityFailed)),
                "{security:?} {attack:?}: {:?}",
                net.closed_links
            );
            assert_eq!(net.ctrls[1].metrics().peer_integrity_failures, 1);
            // A replayed frame is delivered once (its original), never twice.
            let expected = usize::from(matches!(attack, Attack::Replay));
            assert_eq!(
                net.invocations(b).len(),
                expected,
                "{security:?} {attack:?}: a tampered or replayed invocation was delivered"
            );
            net.tap = None;
            net.advance(Duration::from_secs(10));
            let done = net.completion(a, op).expect("the invoke completes");
            if !matches!(attack, Attack::Replay) {
                assert!(
                    matches!(done, Err(ErrorCode::PeerUnreachable | ErrorCode::Timeout)),
                    "{done:?}"
                );
            }
            net.check();
        }
    }
}

/// In `Secure` mode copied bytes never appear on the wire; in
/// `Authenticated` mode they do (and are still protected from change).
#[test]
fn secure_links_encrypt_copied_bytes() {
    for security in [PeerSecurity::Authenticated, PeerSecurity::Secure] {
        let mut cfgs: Vec<Config> = (0..2).map(|i| config(i, 2, 1)).collect();
        // The stronger requirement of the two sides wins.
        cfgs[1].peer_security = security;
        let mut net = Net::with_configs(cfgs);
        assert_eq!(net.ctrls[0].link_security(LinkId(1)), Some(security));
        let src_proc = net.attach(0, "src");
        let dst_proc = net.attach(1, "dst");
        let pattern = b"SECRET-PATTERN-0123456789";
        net.procs[src_proc].memory[..pattern.len()].copy_from_slice(pattern);
        let src = handle(net.op(src_proc, |op| ProcessMsg::MemoryCreate {
            op,
            addr: 0,
            len: pattern.len() as u64,
            rights: Rights::READ,
        }));
        let dst = handle(net.op(dst_proc, |op| ProcessMsg::MemoryCreate {
            op,
            addr: 0,
            len: 4096,
            rights: Rights::WRITE,
        }));
        net.op(dst_proc, |op| ProcessMsg::Publish {
            op,
            name: b"dst".to_vec(),
            cap: dst,
        })
        .unwrap();
        let dst_at_src = handle(net.op(src_proc, |op| ProcessMsg::Lookup {
            op,
            name: b"dst".to_vec(),
            wait_ms: 0,
        }));
        let wire = std::rc::Rc::new(std::cell::RefCell::new(Vec::<u8>::new()));
        let log = wire.clone();
        net.tap = Some(Box::new(move |_, _, body| {
            log.borrow_mut().extend_from_slice(body);
            true
        }));
        let copied = net.op(src_proc, |op| ProcessMsg::Copy {
            op,
            src,
            dst: dst_at_src,
            completion: None,
        });
        assert_eq!(copied, Ok(Reply::Done));
        assert_eq!(&net.procs[dst_proc].memory[..pattern.len()], pattern);
        let visible = wire.borrow().windows(pattern.len()).any(|w| w == pattern);
        assert_eq!(visible, security == PeerSecurity::Authenticated);
        net.check();
    }
}

/// A controller requiring `Secure` refuses a reply that downgrades it, and
/// an attacker cannot strip the requirement from a Hello either: the
/// security mode is part of both proofs.
#[test]
fn downgrades_are_refused() {
    // Initiator node 1 requires Secure; an on-path attacker rewrites its
    // Hello to ask for Authenticated only.
    let mut cfgs: Vec<Config> = (0..2).map(|i| config(i, 2, 1)).collect();
    cfgs[0].peer_security = PeerSecurity::Secure;
    let now = Instant(1);
    let mut c1 = Controller::new(cfgs[0].clone(), now);
    let mut c2 = Controller::new(cfgs[1].clone(), now);
    c1.link_connected(now, LinkId(2), LinkRole::Initiator { peer: NodeId(2) });
    c2.link_connected(now, LinkId(1), LinkRole::Responder);
    let PeerMsg::Hello {
        node,
        incarnation,
        nonce,
        responder,
        security,
    } = sent_on(&mut c1, LinkId(2))
    else {
        panic!()
    };
    assert_eq!(security, PeerSecurity::Secure);
    let stripped = PeerMsg::Hello {
        node,
        incarnation,
        nonce,
        responder,
        security: PeerSecurity::Authenticated,
    };
    c2.link_message(now, LinkId(1), &frame_of(&stripped));
    let reply = sent_on(&mut c2, LinkId(1));
    assert!(matches!(
        reply,
        PeerMsg::HelloReply {
            security: PeerSecurity::Authenticated,
            ..
        }
    ));
    // Delivered as is: node 1 sees a weaker mode than it requires.
    c1.link_message(now, LinkId(2), &frame_of(&reply));
    let out = drain(&mut c1);
    assert!(out.iter().any(|(_, m)| matches!(
        m,
        Ok(PeerMsg::Rejected {
            code: ErrorCode::AuthFailed
        })
    )));
    assert_eq!(c1.link_peer(LinkId(2)), None);
    // Rewritten back to Secure: the proof no longer matches.
    let PeerMsg::HelloReply {
        node,
        incarnation,
        nonce,
        proof,
        ..
    } = reply
    else {
        panic!()
    };
    let mut c1 = Controller::new(cfgs[0].clone(), now);
    c1.link_connected(now, LinkId(2), LinkRole::Initiator { peer: NodeId(2) });
    let _ = drain(&mut c1);
    let upgraded = PeerMsg::HelloReply {
        node,
        incarnation,
        nonce,
        security: PeerSecurity::Secure,
        proof,
    };
    c1.link_message(now, LinkId(2), &frame_of(&upgraded));
    assert_eq!(c1.link_peer(LinkId(2)), None);
    assert_eq!(c1.metrics().peer_handshake_failures, 1);
}

/// Hellos that claim this node, a non-member, or were meant for another
/// node are refused; so is a reply from a node other than the one dialled.
#[test]
fn misdirected_and_foreign_hellos_are_refused() {
    let cfg = config(0, 3, 1); // node 1 of {1, 2, 3}
    let now = Instant(1);
    for (i, h) in [
        hello(1, [1; 32], 1),
        hello(9, [1; 32], 1),
        hello(2, [1; 32], 3),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Controller::new(cfg.clone(), now);
        c.link_connected(now, LinkId(5), LinkRole::Responder);
        c.link_message(now, LinkId(5), &frame_of(&h));
        let out = drain(&mut c);
        assert!(
            out.iter().any(|(_, m)| matches!(
                m,
                Ok(PeerMsg::Rejected {
                    code: ErrorCode::AuthFailed
                })
            )),
            "case {i}: {out:?}"
        );
        assert!(
            !out.iter()
                .any(|(_, m)| matches!(m, Ok(PeerMsg::HelloReply { .. }))),
            "case {i}: no proof is given to a misdirected Hello"
        );
    }
    // Node 1 dials node 2 but node 3 answers.
    let mut c1 = Controller::new(config(0, 3, 1), now);
    let mut c3 = Controller::new(config(2, 3, 1), now);
    c1.link_connected(now, LinkId(2), LinkRole::Initiator { peer: NodeId(2) });
    c3.link_connected(now, LinkId(1), LinkRole::Responder);
    let h = sent_on(&mut c1, LinkId(2));
    c3.link_message(now, LinkId(1), &frame_of(&h));
    // Node 3 refuses a Hello meant for node 2.
    assert!(matches!(
        sent_on(&mut c3, LinkId(1)),
        PeerMsg::Rejected {
            code: ErrorCode::AuthFailed
        }
    ));
}

/// A version-1 peer (the relayable handshake) is refused with a typed
/// rejection naming the version.
#[test]
fn the_version_1_handshake_is_refused_by_version() {
    let now = Instant(1);
    let mut c = Controller::new(config(0, 2, 1), now);
    c.link_connected(now, LinkId(5), LinkRole::Responder);
    // A version-1 Hello: version 1, kind 1, node 2, incarnation, 16-byte
    // nonce.
    let mut old = vec![1u8, 1, 2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0];
    old.extend_from_slice(&[3; 16]);
    c.link_message(now, LinkId(5), &old);
    let out: Vec<_> = std::iter::from_fn(|| c.poll_output()).collect();
    let rejected = PeerMsg::Rejected {
        code: ErrorCode::VersionMismatch,
    };
    assert!(out.iter().any(|o| matches!(o, Output::Send { frame, .. }
            if PeerMsg::decode(&frame[4..]).as_ref() == Ok(&rejected))));
    assert!(out.contains(&Output::Close {
        to: Dest::Link(LinkId(5)),
        reason: CloseReason::VersionMismatch
    }));
}

/// A connection that never finishes its handshake loses its slot after the
/// peer timeout, however much it talks.
#[test]
fn half_open_handshakes_are_closed_after_the_peer_timeout() {
    let mut c = Controller::new(config(0, 2, 1), Instant(0));
    c.link_connected(Instant(0), LinkId(5), LinkRole::Responder);
    c.link_message(Instant(1), LinkId(5), &frame_of(&hello(2, [4; 32], 1)));
    let _ = drain(&mut c);
    let timeout = c.config().peer_timeout;
    let mut now = Instant(1);
    let end = Instant(0).after(timeout * 2);
    let mut closed = false;
    while now < end && !closed {
        now = c.poll_timeout().unwrap().max(now);
        c.handle_timeout(now);
        closed = std::iter::from_fn(|| c.poll_output()).any(|o| {
            o == Output::Close {
                to: Dest::Link(LinkId(5)),
                reason: CloseReason::PeerTimeout,
            }
        });
    }
    assert!(closed, "the half-open link was never closed");
    assert!(
        now.0
            <= Instant(0)
                .after(timeout + c.config().heartbeat_interval * 2)
                .0
    );
}

/// Handshake nonces are fresh per link and differ between controllers with
/// the same seed and key.
#[test]
fn nonces_are_fresh() {
    let now = Instant(1);
    let mut c = Controller::new(config(0, 3, 1), now);
    let mut nonces = Vec::new();
    for l in 0..50 {
        c.link_connected(now, LinkId(l), LinkRole::Initiator { peer: NodeId(2) });
        if let PeerMsg::Hello { nonce, .. } = sent_on(&mut c, LinkId(l)) {
            nonces.push(nonce);
        }
    }
    let mut other = Controller::new(config(1, 3, 1), now);
    other.link_connected(now, LinkId(0), LinkRole::Initiator { peer: NodeId(3) });
    if let PeerMsg::Hello { nonce, .. } = sent_on(&mut other, LinkId(0)) {
        nonces.push(nonce);
    }
    let n = nonces.len();
    nonces.sort();
    nonces.dedup();
    assert_eq!(nonces.len(), n);
    assert_eq!(n, 51);
}
