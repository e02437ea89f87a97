//! Eventfd kicks: how one side of a ring wakes the other after it
//! announced it sleeps.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use fractos_transport::Kick;
use rustix::event::{EventfdFlags, PollFd, PollFlags};

use crate::ShmError;

/// A non-blocking eventfd. Clones share it. [`Kick::kick`] adds one;
/// [`EventFd::wait`] sleeps until it is non-zero (or a timeout) and resets
/// it.
#[derive(Clone, Debug)]
pub struct EventFd {
    fd: Arc<OwnedFd>,
}

impl EventFd {
    /// A fresh eventfd (close-on-exec, non-blocking, counter 0).
    pub fn new() -> Result<EventFd, ShmError> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| ShmError::Io {
                what: "creating an eventfd",
                source: e.into(),
            })?;
        Ok(EventFd { fd: Arc::new(fd) })
    }

    /// Wraps an eventfd another process sent, after checking it is one
    /// (an 8-byte non-blocking read or write succeeds on nothing else in
    /// the way we use it; we check the `/proc` link name).
    pub fn from_fd(fd: OwnedFd) -> Result<EventFd, ShmError> {
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .map_err(|source| ShmError::Io {
            what: "examining a received file descriptor",
            source,
        })?;
        if link.to_string_lossy() != "anon_inode:[eventfd]" {
            return Err(ShmError::NotEventFd);
        }
        // Make sure a blocking read can never stall the controller.
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| ShmError::Io {
            what: "examining an eventfd",
            source: e.into(),
        })?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK).map_err(|e| {
            ShmError::Io {
                what: "making an eventfd non-blocking",
                source: e.into(),
            }
        })?;
        Ok(EventFd { fd: Arc::new(fd) })
    }

    /// The descriptor (to pass to another process, or to register with an
    /// event loop).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Resets the counter; returns whether it was non-zero.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 8];
        matches!(rustix::io::read(&*self.fd, &mut buf), Ok(8))
    }

    /// Sleeps until kicked or `timeout` passes (`None`: no timeout), then
    /// resets the counter. Returns whether it was kicked.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        self.wait_or_hangup(None, timeout).0
    }

    /// As [`EventFd::wait`], also waking when `socket` hangs up (the other
    /// process died). Returns (kicked, hung up).
    pub fn wait_or_hangup(
        &self,
        socket: Option<BorrowedFd<'_>>,
        timeout: Option<Duration>,
    ) -> (bool, bool) {
        let ts = timeout.map(|d| rustix::event::Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        let mut fds = vec![PollFd::new(&*self.fd, PollFlags::IN)];
        if let Some(s) = socket {
            fds.push(PollFd::from_borrowed_fd(s, PollFlags::RDHUP));
        }
        let _ = rustix::event::poll(&mut fds, ts.as_ref());
        let hup = fds.get(1).is_some_and(|f| {
            f.revents()
                .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
        });
        (self.drain(), hup)
    }
}

/// An eventfd awaited on a tokio runtime (feature `tokio`).
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncEventFd {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

#[cfg(feature = "tokio")]
impl AsyncEventFd {
    /// Registers (a duplicate of) `e` with the current runtime's reactor.
    /// Must be called on a tokio runtime.
    pub fn new(e: &EventFd) -> std::io::Result<AsyncEventFd> {
        let fd = e.fd().try_clone_to_owned()?;
        // SAFETY: `fd` is a valid open descriptor owned by the `AsyncFd`
        // from here on: nothing else can close it or make it refer to
        // another file while registered, and `OwnedFd::as_raw_fd` always
        // returns the same number.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)?;
        Ok(AsyncEventFd { fd })
    }

    /// Waits until the eventfd is kicked, then resets it.
    pub async fn kicked(&self) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            match rustix::io::read(guard.get_inner(), &mut buf) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Kick for EventFd {
    fn kick(&mut self) {
        // EAGAIN (counter at its maximum) means a kick is pending anyway.
        let _ = rustix::io::write(&*self.fd, &1u64.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn kicks_wake_waiters_and_timeouts_expire() {
        let e = EventFd::new().unwrap();
        let t = Instant::now();
        assert!(!e.wait(Some(Duration::from_millis(20))));
        assert!(t.elapsed() >= Duration::from_millis(15));
        let mut k = e.clone();
        k.kick();
        k.kick();
        assert!(e.wait(Some(Duration::from_secs(5))));
        assert!(!e.drain(), "one wait resets all kicks");
        let mut k2 = EventFd::from_fd(e.fd().try_clone_to_owned().unwrap()).unwrap();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            k2.kick();
        });
        assert!(e.wait(Some(Duration::from_secs(5))));
        h.join().unwrap();
        // A memfd is not an eventfd.
        let m = crate::Mapping::create("x", 1).unwrap();
        assert!(matches!(
            EventFd::from_fd(m.fd().try_clone_to_owned().unwrap()),
            Err(ShmError::NotEventFd)
        ));
    }
}
