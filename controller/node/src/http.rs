//! A minimal, bounded HTTP/1.1 responder for `GET /metrics`.

use alloc::format;
use alloc::vec::Vec;

use fractos_core::Instant;
use fractos_transport::Received;

use crate::Conn;

/// Largest request head read; a longer one is answered 431.
pub const MAX_HTTP_REQUEST: usize = 4096;

/// What a complete request asks.
pub(crate) enum Request {
    /// `GET /metrics`: the host renders the body.
    Metrics,
    /// Anything else, answered at once.
    Refused {
        status: &'static str,
        body: &'static str,
    },
}

/// Reads what the client sent (at most [`MAX_HTTP_REQUEST`] bytes).
/// `Err` when the channel broke or the client left before asking.
pub(crate) fn read<Cx: ?Sized>(c: &mut Conn<Cx>, cx: &mut Cx) -> Result<bool, ()> {
    let mut moved = false;
    while c.request.len() < MAX_HTTP_REQUEST && !c.asked {
        let room = MAX_HTTP_REQUEST - c.request.len();
        let mut buf = Vec::new();
        match c.ch.recv(cx, &mut buf, room) {
            Ok(Received::Data(_)) => {
                let n = buf.len().min(room);
                c.request.extend_from_slice(&buf[..n]);
                moved = true;
            }
            Ok(Received::Empty) => break,
            Ok(Received::Closed) | Err(_) => return Err(()),
        }
    }
    Ok(moved)
}

/// The request, once its head is complete (or too long).
pub(crate) fn parse<Cx: ?Sized>(c: &mut Conn<Cx>) -> Option<Request> {
    if c.asked || !c.out.is_empty() {
        return None;
    }
    let Some(end) = c.request.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (c.request.len() >= MAX_HTTP_REQUEST).then_some(Request::Refused {
            status: "431 Request Header Fields Too Large",
            body: "",
        });
    };
    let line = c.request[..end]
        .split(|&b| b == b'\r')
        .next()
        .unwrap_or(&[]);
    let mut words = line.split(|&b| b == b' ');
    Some(match (words.next(), words.next()) {
        (Some(b"GET"), Some(b"/metrics")) => Request::Metrics,
        (Some(b"GET"), Some(_)) => Request::Refused {
            status: "404 Not Found",
            body: "only /metrics is served here\n",
        },
        _ => Request::Refused {
            status: "405 Method Not Allowed",
            body: "use GET /metrics\n",
        },
    })
}

/// Queues the answer and closes after it.
pub(crate) fn respond<Cx: ?Sized>(
    c: &mut Conn<Cx>,
    now: Instant,
    status: &str,
    ctype: &str,
    body: &str,
) {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !ctype.is_empty() {
        r.push_str("Content-Type: ");
        r.push_str(ctype);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.push_str(body);
    c.queued += r.len();
    c.out.push_back(r.into_bytes());
    c.closing.get_or_insert(now);
}
