//! The async (tokio) facade.

use std::net::SocketAddr;
use std::time::Duration;

use fractos_wire::{NodeId, Rights};

use crate::caps::{Cap, MemoryCap, RequestCap};
use crate::error::SdkError;
use crate::invocation::Invocation;
use crate::memory::Region;
use crate::process::{AttachOptions, Process};
use crate::slot::PopError;

/// The async face of a [`Process`]: the same operations as `async fn`s
/// that never block the executor, each bounded by the handle's timeout
/// (`tokio::time::timeout`, so a tokio runtime with time enabled must drive
/// them). Both faces share the same channel and completion slots: mix them
/// freely.
///
/// ```no_run
/// use std::time::Duration;
/// use fractos_sdk::{AsyncProcess, AttachOptions};
///
/// # async fn run(token: [u8; 32]) -> Result<(), fractos_sdk::SdkError> {
/// let p = AsyncProcess::attach("127.0.0.1:7000", "client", token, AttachOptions::default()).await?;
/// let echo = p.lookup("echo", Duration::from_secs(5)).await?;
/// let echo = echo.as_request().expect("echo is a Request");
/// let reply = p.request_create(7, &[], &[]).await?;
/// p.invoke(&echo, b"ping", &[reply.into()]).await?;
/// let inv = p.next_invocation(Duration::from_secs(5)).await?;
/// assert_eq!(inv.tag, 7);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct AsyncProcess {
    inner: Process,
}

impl From<Process> for AsyncProcess {
    fn from(inner: Process) -> Self {
        AsyncProcess { inner }
    }
}

impl Process {
    /// The async face of this process.
    pub fn to_async(&self) -> AsyncProcess {
        AsyncProcess {
            inner: self.clone(),
        }
    }
}

impl AsyncProcess {
    /// [`Process::attach`] without blocking the executor (the connect and
    /// handshake run on tokio's blocking pool).
    pub async fn attach(
        addr: impl std::net::ToSocketAddrs + Send + 'static,
        name: &str,
        token: [u8; 32],
        options: AttachOptions,
    ) -> Result<AsyncProcess, SdkError> {
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || Process::attach(addr, &name, token, options))
            .await
            .map_err(|e| SdkError::io("running the attach", std::io::Error::other(e)))?
            .map(AsyncProcess::from)
    }

    /// The blocking face of the same process.
    pub fn blocking(&self) -> &Process {
        &self.inner
    }

    /// A handle to the same process whose waits use `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> AsyncProcess {
        AsyncProcess {
            inner: self.inner.with_timeout(timeout),
        }
    }

    /// The controller's node id.
    pub fn node(&self) -> NodeId {
        self.inner.node()
    }

    /// The name this process attached under.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The timeout of this handle's waits.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    /// The controller's socket address.
    pub fn controller_addr(&self) -> SocketAddr {
        self.inner.controller_addr()
    }

    /// Whether the channel is still open.
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// Closes the channel (see [`Process::close`]).
    pub fn close(self) {
        self.inner.close()
    }

    /// See [`Process::register`] (does not wait).
    pub fn register(&self, len: u64) -> Result<Region, SdkError> {
        self.inner.register(len)
    }

    /// See [`Process::register_vec`] (does not wait).
    pub fn register_vec(&self, bytes: Vec<u8>) -> Result<Region, SdkError> {
        self.inner.register_vec(bytes)
    }

    /// See [`Process::unregister`] (does not wait).
    pub fn unregister(&self, region: &Region) -> bool {
        self.inner.unregister(region)
    }

    /// See [`Process::memory_create`].
    pub async fn memory_create(
        &self,
        region: &Region,
        offset: u64,
        len: u64,
        rights: Rights,
    ) -> Result<MemoryCap, SdkError> {
        self.inner
            .start_memory_create(region, offset, len, rights)?
            .wait_async()
            .await
    }

    /// See [`Process::diminish`].
    pub async fn diminish(
        &self,
        cap: &MemoryCap,
        offset: u64,
        len: u64,
        rights: Rights,
    ) -> Result<MemoryCap, SdkError> {
        self.inner
            .start_diminish(cap, offset, len, rights)?
            .wait_async()
            .await
    }

    /// See [`Process::request_create`].
    pub async fn request_create(
        &self,
        tag: u64,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<RequestCap, SdkError> {
        self.inner
            .start_request_create(tag, imms, caps)?
            .wait_async()
            .await
    }

    /// See [`Process::derive`].
    pub async fn derive(
        &self,
        cap: &RequestCap,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<RequestCap, SdkError> {
        self.inner.start_derive(cap, imms, caps)?.wait_async().await
    }

    /// See [`Process::invoke`].
    pub async fn invoke(
        &self,
        cap: &RequestCap,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<(), SdkError> {
        self.inner.start_invoke(cap, imms, caps)?.wait_async().await
    }

    /// See [`Process::copy`].
    pub async fn copy(
        &self,
        src: &MemoryCap,
        dst: &MemoryCap,
        completion: Option<&RequestCap>,
    ) -> Result<(), SdkError> {
        self.inner
            .start_copy(src, dst, completion)?
            .wait_async()
            .await
    }

    /// See [`Process::revoke`].
    pub async fn revoke(&self, cap: impl Into<Cap>) -> Result<(), SdkError> {
        self.inner.start_revoke(cap)?.wait_async().await
    }

    /// See [`Process::drop_cap`].
    pub async fn drop_cap(&self, cap: impl Into<Cap>) -> Result<(), SdkError> {
        self.inner.start_drop_cap(cap)?.wait_async().await
    }

    /// See [`Process::monitor`].
    pub async fn monitor(&self, cap: impl Into<Cap>, notify: &RequestCap) -> Result<(), SdkError> {
        self.inner.start_monitor(cap, notify)?.wait_async().await
    }

    /// See [`Process::publish`].
    pub async fn publish(
        &self,
        name: impl AsRef<[u8]>,
        cap: impl Into<Cap>,
    ) -> Result<(), SdkError> {
        self.inner.start_publish(name, cap)?.wait_async().await
    }

    /// See [`Process::unpublish`].
    pub async fn unpublish(&self, name: impl AsRef<[u8]>) -> Result<(), SdkError> {
        self.inner.start_unpublish(name)?.wait_async().await
    }

    /// See [`Process::lookup`].
    pub async fn lookup(&self, name: impl AsRef<[u8]>, wait: Duration) -> Result<Cap, SdkError> {
        self.inner.start_lookup(name, wait)?.wait_async().await
    }

    /// Awaits the next invocation without a handler, up to `timeout`
    /// (see [`Process::next_invocation_timeout`]).
    pub async fn next_invocation(&self, timeout: Duration) -> Result<Invocation, SdkError> {
        let queue = self.inner.invocation_queue();
        match tokio::time::timeout(timeout, queue.pop_async()).await {
            Ok(Ok(inv)) => Ok(inv),
            Ok(Err(PopError::Closed)) => Err(self.inner.disconnected_error()),
            Ok(Err(PopError::Timeout)) | Err(_) => Err(SdkError::Timeout {
                what: "an invocation",
                after: timeout,
            }),
        }
    }
}
