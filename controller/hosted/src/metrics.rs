//! Prometheus text-format metrics (rendered by [`fractos_core::prometheus`])
//! over a minimal HTTP/1.1 endpoint.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::driver::Event;

/// Serves `GET /metrics` (any other path: 404).
pub(crate) async fn serve(l: TcpListener, events: mpsc::Sender<Event>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
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
        });
    }
}
