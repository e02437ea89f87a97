//! One-shot completion slots and a closable queue, each usable from blocking
//! code (Mutex + Condvar, with a deadline) and from async code (Waker).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Locks a mutex, ignoring poisoning (our critical sections never leave
/// state half-updated).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A value filled once by the reader thread and taken once by a waiter.
pub(crate) struct Slot<T> {
    state: Mutex<SlotState<T>>,
    cv: Condvar,
}

struct SlotState<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

impl<T> Slot<T> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Slot {
            state: Mutex::new(SlotState {
                value: None,
                waker: None,
            }),
            cv: Condvar::new(),
        })
    }

    /// Fills the slot (a second fill replaces an untaken value) and wakes the
    /// waiter, blocking or async.
    pub(crate) fn fill(&self, value: T) {
        let waker = {
            let mut s = lock(&self.state);
            s.value = Some(value);
            s.waker.take()
        };
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Blocks until filled or `timeout` passes (`None`).
    pub(crate) fn wait(&self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now().checked_add(timeout);
        let mut s = lock(&self.state);
        loop {
            if let Some(v) = s.value.take() {
                return Some(v);
            }
            let left = match deadline {
                Some(d) => d.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return None;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Takes the value if filled, else registers `waker`.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn poll_take(&self, waker: &Waker) -> Option<T> {
        let mut s = lock(&self.state);
        match s.value.take() {
            Some(v) => Some(v),
            None => {
                match &mut s.waker {
                    Some(w) if w.will_wake(waker) => {}
                    w => *w = Some(waker.clone()),
                }
                None
            }
        }
    }
}

/// Future resolving when a [`Slot`] is filled.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
pub(crate) struct SlotFuture<T> {
    pub(crate) slot: Arc<Slot<T>>,
}

impl<T> Future for SlotFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.slot.poll_take(cx.waker()) {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

/// A multi-producer multi-consumer FIFO that can be closed; consumers block
/// with a deadline or await.
pub(crate) struct Queue<T> {
    state: Mutex<QueueState<T>>,
    cv: Condvar,
}

struct QueueState<T> {
    items: VecDeque<T>,
    wakers: Vec<Waker>,
    closed: bool,
}

/// Why [`Queue::pop`] returned nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PopError {
    Timeout,
    Closed,
}

impl<T> Queue<T> {
    pub(crate) fn new() -> Self {
        Queue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                wakers: Vec::new(),
                closed: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// Appends an item; returns it back if the queue is closed.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let wakers = {
            let mut s = lock(&self.state);
            if s.closed {
                return Err(item);
            }
            s.items.push_back(item);
            std::mem::take(&mut s.wakers)
        };
        self.cv.notify_one();
        for w in wakers {
            w.wake();
        }
        Ok(())
    }

    /// Closes the queue: items already queued can still be popped.
    pub(crate) fn close(&self) {
        let wakers = {
            let mut s = lock(&self.state);
            s.closed = true;
            std::mem::take(&mut s.wakers)
        };
        self.cv.notify_all();
        for w in wakers {
            w.wake();
        }
    }

    /// Removes and returns the queued items matching `pred`, in order.
    pub(crate) fn take_where(&self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut s = lock(&self.state);
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(s.items.len());
        for item in s.items.drain(..) {
            if pred(&item) {
                taken.push(item);
            } else {
                kept.push_back(item);
            }
        }
        s.items = kept;
        taken
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.state).items.len()
    }

    /// Blocks for the next item until `timeout` passes.
    pub(crate) fn pop(&self, timeout: Duration) -> Result<T, PopError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut s = lock(&self.state);
        loop {
            if let Some(v) = s.items.pop_front() {
                return Ok(v);
            }
            if s.closed {
                return Err(PopError::Closed);
            }
            let left = match deadline {
                Some(d) => d
                    .checked_duration_since(Instant::now())
                    .ok_or(PopError::Timeout)?,
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return Err(PopError::Timeout);
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Async pop (without timeout: wrap it in one).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn pop_async(&self) -> PopFuture<'_, T> {
        PopFuture { queue: self }
    }
}

/// Future of [`Queue::pop_async`]: `Err(())` once closed and empty.
pub(crate) struct PopFuture<'a, T> {
    queue: &'a Queue<T>,
}

impl<T> Future for PopFuture<'_, T> {
    type Output = Result<T, PopError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = lock(&self.queue.state);
        if let Some(v) = s.items.pop_front() {
            return Poll::Ready(Ok(v));
        }
        if s.closed {
            return Poll::Ready(Err(PopError::Closed));
        }
        if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            s.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn slot_blocking_fill_from_other_thread() {
        let slot = Slot::new();
        let s2 = slot.clone();
        let t = thread::spawn(move || s2.fill(7u32));
        assert_eq!(slot.wait(Duration::from_secs(10)), Some(7));
        t.join().unwrap();
    }

    #[test]
    fn slot_times_out_when_never_filled() {
        let slot: Arc<Slot<u32>> = Slot::new();
        assert_eq!(slot.wait(Duration::from_millis(5)), None);
        assert_eq!(slot.wait(Duration::ZERO), None);
        slot.fill(1);
        assert_eq!(slot.wait(Duration::ZERO), Some(1));
    }

    #[test]
    fn slot_future_wakes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let slot = Slot::new();
        let s2 = slot.clone();
        let t = thread::spawn(move || s2.fill("done"));
        let v = rt.block_on(SlotFuture { slot });
        assert_eq!(v, "done");
        t.join().unwrap();
    }

    #[test]
    fn queue_fifo_timeout_close() {
        let q = Arc::new(Queue::new());
        assert_eq!(q.pop(Duration::from_millis(1)), Err(PopError::Timeout));
        q.push(1).unwrap();
        q.push(2).unwrap();
        q.push(10).unwrap();
        assert_eq!(q.take_where(|v| *v >= 10), vec![10]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(Duration::ZERO), Ok(1));
        q.close();
        assert_eq!(q.push(3), Err(3));
        assert_eq!(q.pop(Duration::ZERO), Ok(2));
        assert_eq!(q.pop(Duration::from_secs(5)), Err(PopError::Closed));
    }

    #[test]
    fn queue_async_pop_wakes_on_push_and_close() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let q = Arc::new(Queue::new());
        let q2 = q.clone();
        let t = thread::spawn(move || {
            q2.push(5u8).unwrap();
            q2.close();
        });
        assert_eq!(rt.block_on(q.pop_async()), Ok(5));
        assert_eq!(rt.block_on(q.pop_async()), Err(PopError::Closed));
        t.join().unwrap();
    }
}
