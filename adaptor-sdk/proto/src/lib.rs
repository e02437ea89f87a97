//! The process side of the FractOS process protocol, without I/O.
//!
//! A [`Connection`] is what an untrusted process keeps about its channel to
//! its controller: the attach handshake, operation ids and the routing of
//! each `Completion` to its operation, the answers to the controller's
//! `MemRead`/`MemWrite` of registered memory, and a bounded queue of
//! received invocations. It owns no socket, no thread and no clock, in the
//! style of quinn-proto and the controller core: the host feeds it frames
//! (with the time where time matters) and polls frames to send, events and
//! invocations. The same state machine runs under the adaptor SDK's
//! blocking and async faces (over TCP or any byte stream) and inside the
//! appliance's built-in storage process (over an in-memory channel).
//!
//! * Transports: byte streams through a [`FrameReader`] (the transport
//!   layer's, `fractos_transport::FrameReader`, splitting with
//!   [`fractos_wire::FrameSplitter`]) into [`Connection::handle_stream`];
//!   message transports hand one frame per message to
//!   [`Connection::handle_frame`]; bare bodies go to
//!   [`Connection::handle_body`]. Output frames are complete (with their
//!   length prefix).
//! * Memory: the host implements [`Memory`] (read/write bytes at an
//!   address); an access outside every registered window is answered with
//!   [`fractos_wire::ErrorCode::MemoryFault`], whatever the host
//!   ([`OutOfWindow`] explains why).
//! * Errors: one enum, [`Error`]. Nothing the controller sends panics:
//!   malformed or out-of-phase input is a fatal error that closes the
//!   connection and aborts every waiting operation.
//!
//! ```
//! use fractos_process::{Config, Connection, Event, Instant, NoMemory};
//! use fractos_wire::{ControllerMsg, NodeId, ProcessMsg, Reply};
//!
//! let now = Instant(0);
//! let mut c: Connection<&str> = Connection::new(b"p", [0; 32], Config::default(), now).unwrap();
//! let attach = c.poll_transmit().unwrap(); // write it to the transport
//! assert!(matches!(ProcessMsg::decode(&attach[4..]), Ok(ProcessMsg::Attach { .. })));
//!
//! // The controller answers (frames with their length prefix).
//! let mut frame = Vec::new();
//! ControllerMsg::Attached { node: NodeId(1) }.encode(&mut frame);
//! c.handle_frame(&frame, now, &mut NoMemory).unwrap();
//! assert_eq!(c.poll_event(), Some(Event::Attached { node: NodeId(1) }));
//!
//! let op = c.start("unpublish", |op| ProcessMsg::Unpublish { op, name: b"n".to_vec() }).unwrap();
//! let _sent = c.poll_transmit().unwrap();
//! frame.clear();
//! ControllerMsg::Completion { op, result: Ok(Reply::Done) }.encode(&mut frame);
//! c.handle_frame(&frame, now, &mut NoMemory).unwrap();
//! assert_eq!(
//!     c.poll_event(),
//!     Some(Event::Completion { op, data: "unpublish", result: Ok(Reply::Done) })
//! );
//! ```
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod connection;
mod error;
mod memory;

pub use connection::{Config, Connection, Event, Instant, Invocation, Phase};
pub use error::Error;
/// The byte-stream frame reader is the transport layer's (one reader for
/// the controller's and the process's side); re-exported so hosts of a
/// [`Connection`] need not name `fractos-transport`.
pub use fractos_transport::FrameReader;
pub use memory::{Memory, NoMemory, OutOfWindow};
