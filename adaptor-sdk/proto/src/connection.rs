//! The connection state machine.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use fractos_wire::{
    frame_body, CapInfo, ControllerMsg, ErrorCode, Handle, NodeId, ProcessMsg, Reply, MAX_DATA_LEN,
    MAX_FRAME_LEN, MAX_PROCESS_NAME_LEN,
};

use crate::memory::Memory;
use crate::Error;
use crate::FrameReader;

/// A point in time in nanoseconds since an epoch the host chooses; only
/// differences matter. The connection never reads a clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    /// `self + d`, saturating.
    pub fn after(self, d: Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

/// Limits of a [`Connection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Largest frame body accepted from the controller (longer ones are
    /// [`Error::Malformed`]). Default [`fractos_wire::MAX_FRAME_LEN`].
    pub max_frame_len: usize,
    /// Invocations held until [`Connection::poll_invocation`] takes them;
    /// one more is refused with [`Error::InvocationQueueFull`]. Default 1024.
    pub invocation_capacity: usize,
    /// How long after [`Connection::new`] the controller has to answer the
    /// attach (`None`: forever). Default 5 s.
    pub attach_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_len: MAX_FRAME_LEN,
            invocation_capacity: 1024,
            attach_timeout: Some(Duration::from_secs(5)),
        }
    }
}

impl Config {
    /// Sets [`Config::max_frame_len`].
    pub fn max_frame_len(mut self, n: usize) -> Self {
        self.max_frame_len = n;
        self
    }
    /// Sets [`Config::invocation_capacity`].
    pub fn invocation_capacity(mut self, n: usize) -> Self {
        self.invocation_capacity = n;
        self
    }
    /// Sets [`Config::attach_timeout`].
    pub fn attach_timeout(mut self, d: Option<Duration>) -> Self {
        self.attach_timeout = d;
        self
    }
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `Attach` sent, no answer yet.
    Attaching,
    /// The controller on `NodeId` accepted the attach.
    Attached(NodeId),
    /// Closed, locally ([`Connection::close`]) or by a fatal [`Error`]
    /// ([`Connection::close_reason`]).
    Closed,
}

/// One of this process's Requests was invoked (the wire form: tag, bound
/// then invoker immediates, bound then invoker capabilities as fresh
/// handles).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// Handler tag given at `RequestCreate`.
    pub tag: u64,
    /// Bound immediates followed by invoker immediates.
    pub imms: Vec<u8>,
    /// Bound then invoker capabilities.
    pub caps: Vec<(Handle, CapInfo)>,
}

/// What happened to the connection, from [`Connection::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<T> {
    /// The controller accepted the attach.
    Attached {
        /// The controller's node id.
        node: NodeId,
    },
    /// The answer to an operation started with [`Connection::start`].
    Completion {
        /// The operation id.
        op: u64,
        /// What the host attached to the operation.
        data: T,
        /// The controller's answer.
        result: Result<Reply, ErrorCode>,
    },
    /// The connection closed before the operation was answered.
    Aborted {
        /// The operation id.
        op: u64,
        /// What the host attached to the operation.
        data: T,
    },
}

/// An operation in flight.
#[derive(Debug)]
enum Entry<T> {
    /// Someone waits for it.
    Waiting(T),
    /// Nobody does: its completion is absorbed and a capability it
    /// returns is dropped.
    Forgotten,
}

/// The process side of one channel to a controller, without I/O.
///
/// `T` is what the host attaches to each operation it starts (a waiter's
/// completion slot, a continuation); it comes back in
/// [`Event::Completion`] or [`Event::Aborted`].
///
/// Drive it like this, in any order that keeps to the transport's:
///
/// 1. inputs: [`Connection::handle_stream`] (byte streams, through a
///    [`FrameReader`]), [`Connection::handle_frame`] (message transports:
///    one length-prefixed frame per message) or [`Connection::handle_body`]
///    (a bare body), each with the current [`Instant`] and the process's
///    [`Memory`]; [`Connection::handle_timeout`] once
///    [`Connection::poll_timeout`] is due;
/// 2. operations: [`Connection::start`], [`Connection::start_detached`],
///    [`Connection::forget`], [`Connection::close`];
/// 3. outputs, after each of the above: [`Connection::poll_transmit`]
///    until `None` (complete frames, in order), [`Connection::poll_event`]
///    and [`Connection::poll_invocation`].
///
/// `MemRead`/`MemWrite` from the controller are answered inside the input
/// call, against the given [`Memory`].
#[derive(Debug)]
pub struct Connection<T> {
    config: Config,
    phase: Phase,
    close_reason: Option<Error>,
    attach_deadline: Option<Instant>,
    next_op: u64,
    ops: BTreeMap<u64, Entry<T>>,
    events: VecDeque<Event<T>>,
    invocations: VecDeque<Invocation>,
    out: VecDeque<Vec<u8>>,
}

fn msg_name(m: &ControllerMsg) -> &'static str {
    match m {
        ControllerMsg::Attached { .. } => "Attached",
        ControllerMsg::Rejected { .. } => "Rejected",
        ControllerMsg::Completion { .. } => "Completion",
        ControllerMsg::Invocation { .. } => "Invocation",
        ControllerMsg::MemRead { .. } => "MemRead",
        ControllerMsg::MemWrite { .. } => "MemWrite",
    }
}

fn process_msg_name(m: &ProcessMsg) -> &'static str {
    match m {
        ProcessMsg::Attach { .. } => "Attach",
        ProcessMsg::MemReadReply { .. } => "MemReadReply",
        ProcessMsg::MemWriteReply { .. } => "MemWriteReply",
        _ => "an operation",
    }
}

impl<T> Connection<T> {
    /// A connection attaching as `name` with `token`: the `Attach` frame is
    /// the first [`Connection::poll_transmit`] output.
    pub fn new(name: &[u8], token: [u8; 32], config: Config, now: Instant) -> Result<Self, Error> {
        if name.len() > MAX_PROCESS_NAME_LEN {
            return Err(Error::NameTooLong { len: name.len() });
        }
        let mut c = Connection {
            config,
            phase: Phase::Attaching,
            close_reason: None,
            attach_deadline: config.attach_timeout.map(|d| now.after(d)),
            next_op: 1,
            ops: BTreeMap::new(),
            events: VecDeque::new(),
            invocations: VecDeque::new(),
            out: VecDeque::new(),
        };
        c.transmit(&ProcessMsg::Attach {
            name: name.to_vec(),
            token,
        });
        Ok(c)
    }

    /// The limits in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the connection is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The controller's node id, once attached.
    pub fn node(&self) -> Option<NodeId> {
        match self.phase {
            Phase::Attached(node) => Some(node),
            _ => None,
        }
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The fatal error that closed the connection (`None` while open or
    /// after a local [`Connection::close`]).
    pub fn close_reason(&self) -> Option<Error> {
        self.close_reason
    }

    /// Operations sent and not answered yet, forgotten ones included.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Invocations waiting for [`Connection::poll_invocation`].
    pub fn queued_invocations(&self) -> usize {
        self.invocations.len()
    }

    fn transmit(&mut self, msg: &ProcessMsg) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        self.out.push_back(frame);
    }

    fn begin(
        &mut self,
        entry: Entry<T>,
        make: impl FnOnce(u64) -> ProcessMsg,
    ) -> Result<u64, Error> {
        match self.phase {
            Phase::Attaching => return Err(Error::NotAttached),
            Phase::Closed => return Err(Error::Closed),
            Phase::Attached(_) => {}
        }
        let op = self.next_op;
        let msg = make(op);
        if msg.op_id() != Some(op) {
            return Err(Error::NotAnOperation(process_msg_name(&msg)));
        }
        self.next_op = self.next_op.wrapping_add(1).max(1);
        self.ops.insert(op, entry);
        self.transmit(&msg);
        Ok(op)
    }

    /// Starts an operation: `make` builds the message from the fresh
    /// operation id, which is returned; the frame is queued for
    /// [`Connection::poll_transmit`] and the answer comes back as
    /// [`Event::Completion`] with `data`.
    ///
    /// Errors (nothing is sent): [`Error::NotAttached`], [`Error::Closed`],
    /// [`Error::NotAnOperation`].
    pub fn start(&mut self, data: T, make: impl FnOnce(u64) -> ProcessMsg) -> Result<u64, Error> {
        self.begin(Entry::Waiting(data), make)
    }

    /// Starts an operation nobody waits for (a `Drop`, an `Invoke` of a
    /// continuation): its completion is absorbed, and a capability it
    /// returns is dropped.
    pub fn start_detached(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> Result<u64, Error> {
        self.begin(Entry::Forgotten, make)
    }

    /// Stops waiting for `op`: its completion will be absorbed and a
    /// capability it returns dropped (with a detached `Drop`). Returns the
    /// operation's data if it was still waiting, `None` if it was answered
    /// already (its [`Event`] is or was in the event queue) or unknown.
    pub fn forget(&mut self, op: u64) -> Option<T> {
        match self.ops.get_mut(&op) {
            Some(entry @ Entry::Waiting(_)) => match core::mem::replace(entry, Entry::Forgotten) {
                Entry::Waiting(data) => Some(data),
                Entry::Forgotten => None,
            },
            _ => None,
        }
    }

    /// Closes the connection from this side (process exit): queued frames
    /// are discarded, every waiting operation is [`Event::Aborted`].
    /// Queued invocations can still be polled. Idempotent.
    pub fn close(&mut self) {
        self.shut(None);
    }

    fn shut(&mut self, reason: Option<Error>) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.close_reason = reason;
        self.attach_deadline = None;
        self.out.clear();
        for (op, entry) in core::mem::take(&mut self.ops) {
            if let Entry::Waiting(data) = entry {
                self.events.push_back(Event::Aborted { op, data });
            }
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        self.shut(Some(e));
        e
    }

    /// Handles one complete frame, length prefix included (message
    /// transports carry one frame per message). A frame longer than
    /// [`Config::max_frame_len`], shorter or longer than its prefix says
    /// is [`Error::Malformed`] (fatal).
    pub fn handle_frame(
        &mut self,
        frame: &[u8],
        now: Instant,
        mem: &mut impl Memory,
    ) -> Result<(), Error> {
        if self.phase == Phase::Closed {
            return Err(Error::Closed);
        }
        match frame_body(frame, self.config.max_frame_len) {
            Ok(body) => self.handle_body(body, now, mem),
            Err(e) => Err(self.fail(Error::Malformed(e))),
        }
    }

    /// Handles every complete frame buffered in `reader` (a byte stream),
    /// consuming each one handled. Returns at the first error: after a
    /// non-fatal one ([`Error::UnknownOp`]: consumed;
    /// [`Error::InvocationQueueFull`]: not consumed) call it again.
    pub fn handle_stream(
        &mut self,
        reader: &mut FrameReader,
        now: Instant,
        mem: &mut impl Memory,
    ) -> Result<(), Error> {
        loop {
            if self.phase == Phase::Closed {
                return Err(Error::Closed);
            }
            let body = match reader.frame() {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fail(Error::Malformed(e))),
            };
            let r = self.handle_body(body, now, mem);
            if !matches!(r, Err(Error::InvocationQueueFull { .. })) {
                reader.consume();
            }
            r?;
        }
    }

    /// Handles one frame body (without its length prefix).
    ///
    /// Fatal errors close the connection: [`Error::Malformed`],
    /// [`Error::Unexpected`], [`Error::Rejected`], [`Error::Kicked`].
    /// Non-fatal: [`Error::UnknownOp`] (the completion is dropped),
    /// [`Error::InvocationQueueFull`] (nothing changed: hand the same body
    /// in again after polling invocations), [`Error::Closed`].
    pub fn handle_body(
        &mut self,
        body: &[u8],
        _now: Instant,
        mem: &mut impl Memory,
    ) -> Result<(), Error> {
        if self.phase == Phase::Closed {
            return Err(Error::Closed);
        }
        if body.len() > self.config.max_frame_len {
            return Err(
                self.fail(Error::Malformed(fractos_wire::DecodeError::Oversized {
                    len: body.len(),
                    max: self.config.max_frame_len,
                })),
            );
        }
        let msg = match ControllerMsg::decode(body) {
            Ok(m) => m,
            Err(e) => return Err(self.fail(Error::Malformed(e))),
        };
        match self.phase {
            Phase::Attaching => return self.on_attach_answer(msg),
            Phase::Attached(_) => {}
            Phase::Closed => return Err(Error::Closed),
        }
        match msg {
            ControllerMsg::Completion { op, result } => self.on_completion(op, result),
            ControllerMsg::Invocation { tag, imms, caps } => {
                if self.invocations.len() >= self.config.invocation_capacity {
                    return Err(Error::InvocationQueueFull {
                        capacity: self.config.invocation_capacity,
                    });
                }
                self.invocations.push_back(Invocation { tag, imms, caps });
                Ok(())
            }
            ControllerMsg::MemRead { xfer, addr, len } => {
                let result = if len as usize > MAX_DATA_LEN {
                    Err(ErrorCode::InvalidArgument)
                } else {
                    let mut data = vec![0u8; len as usize];
                    mem.read(addr, &mut data)
                        .map(|()| data)
                        .map_err(|_| ErrorCode::MemoryFault)
                };
                self.transmit(&ProcessMsg::MemReadReply { xfer, result });
                Ok(())
            }
            ControllerMsg::MemWrite { xfer, addr, data } => {
                let result = mem.write(addr, &data).map_err(|_| ErrorCode::MemoryFault);
                self.transmit(&ProcessMsg::MemWriteReply { xfer, result });
                Ok(())
            }
            ControllerMsg::Rejected { code, .. } => Err(self.fail(Error::Kicked(code))),
            ControllerMsg::Attached { .. } => Err(self.fail(Error::Unexpected {
                got: "Attached",
                phase: "attached",
            })),
        }
    }

    fn on_attach_answer(&mut self, msg: ControllerMsg) -> Result<(), Error> {
        match msg {
            ControllerMsg::Attached { node } => {
                self.phase = Phase::Attached(node);
                self.attach_deadline = None;
                self.events.push_back(Event::Attached { node });
                Ok(())
            }
            ControllerMsg::Rejected { code, version } => {
                Err(self.fail(Error::Rejected { code, version }))
            }
            other => Err(self.fail(Error::Unexpected {
                got: msg_name(&other),
                phase: "attaching",
            })),
        }
    }

    fn on_completion(&mut self, op: u64, result: Result<Reply, ErrorCode>) -> Result<(), Error> {
        match self.ops.remove(&op) {
            Some(Entry::Waiting(data)) => {
                self.events
                    .push_back(Event::Completion { op, data, result });
                Ok(())
            }
            Some(Entry::Forgotten) => {
                if let Ok(Reply::Cap { handle, .. }) = result {
                    // Attached, so this cannot fail.
                    let _ = self.start_detached(|op| ProcessMsg::Drop { op, cap: handle });
                }
                Ok(())
            }
            None => Err(Error::UnknownOp { op }),
        }
    }

    /// Fires deadlines that are due: an attach not answered by
    /// [`Config::attach_timeout`] closes the connection with
    /// [`Error::AttachTimeout`] (returned).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        match self.attach_deadline {
            Some(d) if d <= now && self.phase == Phase::Attaching => {
                Err(self.fail(Error::AttachTimeout))
            }
            _ => Ok(()),
        }
    }

    /// When [`Connection::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.attach_deadline
    }

    /// The next complete frame (length prefix included) to write to the
    /// transport, in order.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// The next [`Event`].
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event<T>> {
        self.events.pop_front()
    }

    /// The oldest queued invocation (frees room in the bounded queue).
    #[must_use]
    pub fn poll_invocation(&mut self) -> Option<Invocation> {
        self.invocations.pop_front()
    }
}
