//! The async facade on tokio against real hosted controllers.
//!
//! The controllers are started (and dropped) outside the runtime: their
//! handles talk to the controller thread with blocking calls.

mod common;

use std::time::{Duration, Instant};

use common::{cluster, opts, token, WAIT};
use fractos_sdk::{AsyncProcess, ErrorCode, Handle, RequestCap, Rights, SdkError};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn attach(addr: std::net::SocketAddr, name: &str) -> AsyncProcess {
    AsyncProcess::attach(addr, name, token(name), opts())
        .await
        .expect("attach")
}

/// Publishes from `p`, looks up from `q`, retrying while links come up.
async fn share(
    p: &AsyncProcess,
    cap: impl Into<fractos_sdk::Cap>,
    q: &AsyncProcess,
    name: &str,
) -> fractos_sdk::Cap {
    let cap = cap.into();
    let deadline = Instant::now() + WAIT;
    loop {
        match p.publish(name, cap).await {
            Err(e) if e.code() == Some(ErrorCode::PeerUnreachable) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            r => break r.expect("publish"),
        }
    }
    loop {
        match q.lookup(name, WAIT).await {
            Err(e) if e.code() == Some(ErrorCode::PeerUnreachable) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            r => break r.expect("lookup"),
        }
    }
}

#[test]
fn async_attach_invoke_copy_and_errors() {
    let nodes = cluster(2);
    let (a0, a1) = (nodes[0].process_addr(), nodes[1].process_addr());
    runtime().block_on(async move {
        let server = attach(a0, "server").await;
        let client = attach(a1, "client").await;
        assert_eq!(server.node().0, 1);
        assert!(server.is_connected());

        // Wrong token: typed rejection.
        let e = AsyncProcess::attach(a0, "x", token("y"), opts())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::AuthFailed));

        // Server: a buffer the client may write, and a Request.
        let buf = server.register(200_000).unwrap();
        let wcap = server
            .memory_create(&buf, 0, 200_000, Rights::WRITE)
            .await
            .unwrap();
        let done = server.request_create(4, b"in", &[]).await.unwrap();
        let w = share(&server, wcap, &client, "buf")
            .await
            .as_memory()
            .unwrap();
        let d = share(&server, done, &client, "done")
            .await
            .as_request()
            .unwrap();

        // Client copies 200 000 bytes into it (multi-chunk), with completion.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let src_r = client.register_vec(data.clone()).unwrap();
        let src = client
            .memory_create(&src_r, 0, 200_000, Rights::READ)
            .await
            .unwrap();
        let narrow = client.diminish(&src, 0, 10, Rights::READ).await.unwrap();
        assert_eq!(narrow.len(), 10);
        client.copy(&src, &w, Some(&d)).await.unwrap();
        let inv = server.next_invocation(WAIT).await.unwrap();
        assert_eq!((inv.tag, inv.imms.as_slice()), (4, &b"in"[..]));
        assert!(buf.to_vec() == data);

        // Many invocations in flight at once from one task.
        let curried = client.derive(&d, b"+", &[]).await.unwrap();
        let calls = (0..100u8).map(|i| {
            let c = client.clone();
            async move { c.invoke(&curried, &[i], &[]).await }
        });
        for r in futures_join_all(calls).await {
            r.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..100 {
            let inv = server.next_invocation(WAIT).await.unwrap();
            assert_eq!(&inv.imms[..3], b"in+");
            got.push(inv.imms[3]);
        }
        got.sort_unstable();
        assert_eq!(got, (0..100u8).collect::<Vec<_>>());

        // Typed errors.
        let bad = RequestCap::from_raw(Handle(77_777));
        let e = client.invoke(&bad, &[], &[]).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadHandle));
        let e = client.lookup("absent", Duration::ZERO).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NameNotFound));

        // Monitor + revoke, then drop and unpublish.
        let notify = client.request_create(8, &[], &[]).await.unwrap();
        client.monitor(d, &notify).await.unwrap();
        server.revoke(done).await.unwrap();
        let inv = client.next_invocation(WAIT).await.unwrap();
        assert_eq!(inv.tag, 8);
        client.drop_cap(d).await.unwrap();
        server.unpublish("buf").await.unwrap();

        // The blocking face works on the same channel.
        let r2 = server.blocking().register(8).unwrap();
        assert_eq!(r2.len(), 8);
        client.close();
        server.close();
    });
}

#[test]
fn async_waits_time_out() {
    let nodes = cluster(1);
    let addr = nodes[0].process_addr();
    runtime().block_on(async move {
        let p = attach(addr, "p").await;
        let t = Instant::now();
        let e = p
            .next_invocation(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(50));

        // A lookup whose own wait outlasts the handle's timeout still gets
        // its full wait (the local timeout adds the wait).
        let short = p.with_timeout(Duration::from_millis(20));
        assert_eq!(
            (p.name(), short.timeout()),
            ("p", Duration::from_millis(20))
        );
        let r = p.register(4).unwrap();
        assert!(p.unregister(&r));
        let e = short
            .lookup("never", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NameNotFound), "{e}");

        // An awaited invocation arrives from another task.
        let req = p.request_create(1, &[], &[]).await.unwrap();
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.next_invocation(WAIT).await });
        p.invoke(&req, b"wake", &[]).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().imms, b"wake");

        // Closing ends waits with Disconnected.
        let p3 = p.clone();
        let waiter = tokio::spawn(async move { p3.next_invocation(WAIT).await });
        tokio::task::yield_now().await;
        p.blocking().clone().close();
        let e: SdkError = waiter.await.unwrap().unwrap_err();
        assert!(e.is_disconnected(), "{e}");
        assert!(p
            .request_create(1, &[], &[])
            .await
            .unwrap_err()
            .is_disconnected());
    });
}

/// Minimal join-all over tokio tasks (keeps the dependency list short).
async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
