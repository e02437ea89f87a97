//! Prometheus text-format metrics (rendered by [`fractos_core::prometheus`])
//! over a minimal HTTP/1.1 endpoint.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::debug;

use crate::driver::Event;

/// Serves `GET /metrics` (any other path: 404) on at most `max_conns`
/// connections at once (further ones are closed at once), each for at most
/// `timeout` (a slow or silent client is dropped).
pub(crate) async fn serve(
    l: TcpListener,
    events: mpsc::Sender<Event>,
    max_conns: usize,
    timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(max_conns));
    loop {
        let Ok((s, _)) = l.accept().await else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("metrics: every connection slot is taken; closing");
            drop(s);
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(timeout, answer(s, events))
                .await
                .is_err()
            {
                debug!("metrics: client too slow; dropped");
            }
            drop(slot);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut s: TcpStream, events: mpsc::Sender<Event>) {
    let mut req = [0u8; 1024];
    let mut n = 0;
    while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut req[n..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => n += k,
        }
    }
    let ok = req[..n].starts_with(b"GET /metrics ");
    let (status, body) = if ok {
        let (tx, rx) = oneshot::channel();
        if events.send(Event::Metrics(tx)).await.is_err() {
            return;
        }
        match rx.await {
            Ok(b) => ("200 OK", b),
            Err(_) => return,
        }
    } else {
        ("404 Not Found", "try GET /metrics\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}
