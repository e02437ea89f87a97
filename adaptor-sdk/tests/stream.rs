//! `Process::attach_stream` over a Unix socket pair, against a scripted
//! controller: the same protocol state machine as over TCP.
#![cfg(unix)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use fractos_sdk::wire::{frame_body, ControllerMsg, ProcessMsg, Reply, MAX_FRAME_LEN};
use fractos_sdk::{AttachOptions, DisconnectReason, ErrorCode, NodeId, Process, SdkError};

fn send(s: &mut UnixStream, m: &ControllerMsg) {
    let mut f = Vec::new();
    m.encode(&mut f);
    s.write_all(&f).unwrap();
}

fn recv(s: &mut UnixStream) -> ProcessMsg {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
    s.read_exact(&mut frame[4..]).unwrap();
    ProcessMsg::decode(frame_body(&frame, MAX_FRAME_LEN).unwrap()).unwrap()
}

#[test]
fn attach_stream_serves_memory_and_routes_completions() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    theirs
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let t = thread::spawn(move || {
        assert!(
            matches!(recv(&mut theirs), ProcessMsg::Attach { ref name, .. } if name == b"unix")
        );
        // Attached and a MemRead in one write: the read must reach the
        // reader thread, not be lost in the handshake.
        let addr = rx.recv().unwrap();
        let mut both = Vec::new();
        ControllerMsg::Attached { node: NodeId(3) }.encode(&mut both);
        ControllerMsg::MemRead {
            xfer: 1,
            addr,
            len: 2,
        }
        .encode(&mut both);
        theirs.write_all(&both).unwrap();
        // The reply and the application's first operation race.
        let (mut reply, mut unpublish) = (None, None);
        for _ in 0..2 {
            match recv(&mut theirs) {
                ProcessMsg::Unpublish { op, .. } => unpublish = Some(op),
                m => reply = Some(m),
            }
        }
        assert_eq!(
            reply,
            Some(ProcessMsg::MemReadReply {
                xfer: 1,
                result: Err(ErrorCode::MemoryFault)
            })
        );
        let op = unpublish.expect("the unpublish");
        send(
            &mut theirs,
            &ControllerMsg::Completion {
                op,
                result: Err(ErrorCode::NameNotFound),
            },
        );
        let ProcessMsg::Revoke { op, .. } = recv(&mut theirs) else {
            panic!("expected the revoke")
        };
        send(
            &mut theirs,
            &ControllerMsg::Completion {
                op,
                result: Ok(Reply::Done),
            },
        );
        // Then the controller goes away.
    });
    // Nothing is registered yet at this address: the read faults.
    tx.send(0x1234).unwrap();
    let p = Process::attach_stream(ours, "unix", [2; 32], AttachOptions::default()).unwrap();
    assert_eq!(p.node(), NodeId(3));
    assert!(p.controller_addr().ip().is_unspecified());
    let e = p.unpublish("x").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NameNotFound));
    p.revoke(fractos_sdk::RequestCap::from_raw(fractos_sdk::Handle(1)))
        .unwrap();
    t.join().unwrap();
    let e = p
        .next_invocation_timeout(Duration::from_secs(10))
        .unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    assert_eq!(
        p.disconnect_reason(),
        Some(DisconnectReason::ControllerClosed)
    );
}

#[test]
fn attach_stream_rejected_and_closed() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        let _ = recv(&mut theirs);
        send(
            &mut theirs,
            &ControllerMsg::Rejected {
                code: ErrorCode::AuthFailed,
                version: fractos_sdk::wire::PROTOCOL_VERSION,
            },
        );
    });
    let e = Process::attach_stream(ours, "unix", [0; 32], AttachOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            SdkError::Rejected {
                code: ErrorCode::AuthFailed,
                ..
            }
        ),
        "{e}"
    );
    t.join().unwrap();

    // The controller hangs up before answering.
    let (ours, theirs) = UnixStream::pair().unwrap();
    drop(theirs);
    let e = Process::attach_stream(ours, "unix", [0; 32], AttachOptions::default()).unwrap_err();
    assert!(
        e.is_disconnected() || matches!(e, SdkError::Io { .. }),
        "{e}"
    );
}
