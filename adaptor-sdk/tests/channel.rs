//! `Process::attach_channel` over `fractos_transport::Channel`s: a stream
//! channel (non-blocking TCP) against a real hosted controller, and a
//! message channel against a scripted controller (every message one whole
//! frame, both ways).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use fractos_core::process_token;
use fractos_hosted::{spawn, HostedConfig};
use fractos_sdk::wire::{frame_body, ControllerMsg, ProcessMsg, Reply, MAX_FRAME_LEN};
use fractos_sdk::{AttachOptions, DisconnectReason, ErrorCode, NodeId, Process};
use fractos_transport::{Channel, Framing, Received, TransportError};

const KEY: [u8; 32] = [9; 32];

/// The process's end of a TCP connection as a non-blocking stream channel.
struct TcpChannel(TcpStream);

impl Channel for TcpChannel {
    fn framing(&self) -> Framing {
        Framing::Stream
    }
    fn send(&mut self, _: &mut (), data: &[u8]) -> Result<usize, TransportError> {
        match self.0.write(data) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
            Err(_) => Err(TransportError::Reset),
        }
    }
    fn recv(
        &mut self,
        _: &mut (),
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Received, TransportError> {
        let mut buf = vec![0u8; max.min(64 * 1024)];
        match self.0.read(&mut buf) {
            Ok(0) => Ok(Received::Closed),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                Ok(Received::Data(n))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Received::Empty),
            Err(_) => Err(TransportError::Reset),
        }
    }
    fn close(&mut self, _: &mut ()) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }
    fn abort(&mut self, _: &mut ()) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
    fn is_finished(&self, _: &mut ()) -> bool {
        false
    }
}

#[test]
fn a_stream_channel_attaches_to_a_hosted_controller() {
    let node = spawn(HostedConfig::local(NodeId(1), KEY)).unwrap();
    let tcp = TcpStream::connect(node.process_addr()).unwrap();
    tcp.set_nonblocking(true).unwrap();
    let p = Process::attach_channel(
        TcpChannel(tcp),
        "chan",
        process_token(&KEY, b"chan"),
        AttachOptions::default(),
    )
    .unwrap();
    assert_eq!(p.node(), NodeId(1));
    // Both directions: p publishes a Request, q (over TCP) invokes it, p
    // receives the invocation; p's memory is copied into q's.
    let r = p.request_create(7, &[1, 2], &[]).unwrap();
    p.publish("chan/svc", r).unwrap();
    let region = p.register_vec(vec![0x5a; 4096]).unwrap();
    let src = p
        .memory_create(&region, 0, 4096, fractos_sdk::wire::Rights::READ)
        .unwrap();
    p.publish("chan/mem", src).unwrap();
    let q = Process::attach(
        node.process_addr(),
        "q",
        process_token(&KEY, b"q"),
        AttachOptions::default(),
    )
    .unwrap();
    let svc = q.lookup("chan/svc", Duration::from_secs(5)).unwrap();
    q.invoke(&svc.as_request().unwrap(), &[3], &[]).unwrap();
    let inv = p.next_invocation_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((inv.tag, inv.imms.as_slice()), (7, &[1, 2, 3][..]));
    let mem = q.lookup("chan/mem", Duration::from_secs(5)).unwrap();
    let dst_region = q.register_vec(vec![0; 4096]).unwrap();
    let dst = q
        .memory_create(&dst_region, 0, 4096, fractos_sdk::wire::Rights::WRITE)
        .unwrap();
    q.copy(&mem.as_memory().unwrap(), &dst, None).unwrap();
    let mut got = vec![0u8; 4096];
    dst_region.read_at(0, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
    p.close();
    drop(q);
    node.shutdown();
}

/// One direction of a message pipe.
#[derive(Default)]
struct Pipes {
    queues: [VecDeque<Vec<u8>>; 2],
    fin: [bool; 2],
}

/// One end of an in-memory message channel that can cross threads.
struct MessageEnd {
    pipes: Arc<Mutex<Pipes>>,
    side: usize,
}

fn message_pair() -> (MessageEnd, MessageEnd) {
    let pipes = Arc::new(Mutex::new(Pipes::default()));
    let end = |side| MessageEnd {
        pipes: pipes.clone(),
        side,
    };
    (end(0), end(1))
}

impl Channel for MessageEnd {
    fn framing(&self) -> Framing {
        Framing::Message
    }
    fn send(&mut self, _: &mut (), data: &[u8]) -> Result<usize, TransportError> {
        let mut p = self.pipes.lock().unwrap();
        p.queues[self.side].push_back(data.to_vec());
        Ok(data.len())
    }
    fn recv(
        &mut self,
        _: &mut (),
        out: &mut Vec<u8>,
        _: usize,
    ) -> Result<Received, TransportError> {
        let mut p = self.pipes.lock().unwrap();
        match p.queues[1 - self.side].pop_front() {
            Some(m) => {
                out.extend_from_slice(&m);
                Ok(Received::Data(m.len()))
            }
            None if p.fin[1 - self.side] => Ok(Received::Closed),
            None => Ok(Received::Empty),
        }
    }
    fn close(&mut self, _: &mut ()) {
        self.pipes.lock().unwrap().fin[self.side] = true;
    }
    fn abort(&mut self, cx: &mut ()) {
        self.close(cx);
    }
    fn is_finished(&self, _: &mut ()) -> bool {
        self.pipes.lock().unwrap().fin == [true, true]
    }
}

impl MessageEnd {
    /// The next message, which must be exactly one frame.
    fn recv_msg(&mut self) -> ProcessMsg {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut m = Vec::new();
            if let Received::Data(_) = self.recv(&mut (), &mut m, usize::MAX).unwrap() {
                let body = frame_body(&m, MAX_FRAME_LEN).expect("one whole frame per message");
                return ProcessMsg::decode(body).unwrap();
            }
            assert!(Instant::now() < deadline, "no message from the process");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn send_msg(&mut self, m: &ControllerMsg) {
        let mut f = Vec::new();
        m.encode(&mut f);
        self.send(&mut (), &f).unwrap();
    }
}

#[test]
fn a_message_channel_carries_whole_frames_both_ways() {
    let (ours, mut theirs) = message_pair();
    let t = thread::spawn(move || {
        assert!(matches!(theirs.recv_msg(), ProcessMsg::Attach { ref name, .. } if name == b"msg"));
        theirs.send_msg(&ControllerMsg::Attached { node: NodeId(4) });
        // Memory outside every region: answered with MemoryFault.
        theirs.send_msg(&ControllerMsg::MemRead {
            xfer: 1,
            addr: 0x1234,
            len: 2,
        });
        let (mut reply, mut unpublish) = (None, None);
        for _ in 0..2 {
            match theirs.recv_msg() {
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
        theirs.send_msg(&ControllerMsg::Completion {
            op: unpublish.expect("the unpublish"),
            result: Ok(Reply::Done),
        });
        // Then the controller goes away.
        theirs.close(&mut ());
    });
    let p = Process::attach_channel(ours, "msg", [1; 32], AttachOptions::default()).unwrap();
    assert_eq!(p.node(), NodeId(4));
    p.unpublish("x").unwrap();
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
