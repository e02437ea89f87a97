//! A [`Channel`] over shared-memory rings.

use alloc::vec::Vec;

use crate::ring::{RingEndpoint, SharedMemory};
use crate::{Channel, Framing, Received, TransportError};

/// Wakes the other side of a ring after this side published bytes it
/// announced it would sleep through (an eventfd write on a Linux host).
pub trait Kick {
    /// Wakes the other side. Spurious kicks must be harmless.
    fn kick(&mut self);
}

/// For a consumer that never sleeps (it polls the rings).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoKick;

impl Kick for NoKick {
    fn kick(&mut self) {}
}

/// A byte-stream [`Channel`] over a [`RingEndpoint`]: either side of a
/// shared-memory channel. It needs nothing from the host's context, so it
/// implements `Channel<Cx>` for every `Cx`.
///
/// A corrupt ring (the other side wrote impossible counters) surfaces as
/// [`TransportError::Reset`].
#[derive(Debug)]
pub struct RingChannel<M, K> {
    ring: RingEndpoint<M>,
    kick: K,
    closed: bool,
    aborted: bool,
}

impl<M: SharedMemory, K: Kick> RingChannel<M, K> {
    /// A channel over `ring`, kicking the other side through `kick`.
    pub fn new(ring: RingEndpoint<M>, kick: K) -> Self {
        RingChannel {
            ring,
            kick,
            closed: false,
            aborted: false,
        }
    }

    /// The ring endpoint (to sleep on it, or to inspect it).
    pub fn ring(&mut self) -> &mut RingEndpoint<M> {
        &mut self.ring
    }

    fn kick_if_sleeping(&mut self) {
        if self.ring.peer_sleeping() {
            self.kick.kick();
        }
    }
}

impl<Cx: ?Sized, M: SharedMemory, K: Kick> Channel<Cx> for RingChannel<M, K> {
    fn framing(&self) -> Framing {
        Framing::Stream
    }

    fn send(&mut self, _: &mut Cx, data: &[u8]) -> Result<usize, TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        let n = self.ring.send(data).map_err(|_| TransportError::Reset)?;
        if n > 0 {
            self.kick_if_sleeping();
        }
        Ok(n)
    }

    fn recv(
        &mut self,
        _: &mut Cx,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Received, TransportError> {
        if self.aborted {
            return Err(TransportError::Closed);
        }
        match self
            .ring
            .recv(out, max)
            .map_err(|_| TransportError::Reset)?
        {
            0 => {
                // Closed only once everything sent before the close is in.
                if self.ring.peer_closed()
                    && self.ring.available().map_err(|_| TransportError::Reset)? == 0
                {
                    Ok(Received::Closed)
                } else {
                    Ok(Received::Empty)
                }
            }
            n => Ok(Received::Data(n)),
        }
    }

    fn close(&mut self, _: &mut Cx) {
        if !self.closed {
            self.closed = true;
            self.ring.close();
            self.kick_if_sleeping();
        }
    }

    fn abort(&mut self, cx: &mut Cx) {
        self.aborted = true;
        Channel::<Cx>::close(self, cx);
    }

    fn is_finished(&self, _: &mut Cx) -> bool {
        self.aborted || (self.closed && self.ring.peer_closed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{ring_area_len, AtomicMemory, RingSide, RING_MIN};
    use crate::FrameReader;

    #[derive(Default)]
    struct Count(usize);
    impl Kick for &mut Count {
        fn kick(&mut self) {
            self.0 += 1;
        }
    }

    #[test]
    fn frames_cross_a_ring_channel_and_sleepers_are_kicked_once_per_send() {
        let mem = AtomicMemory::new(ring_area_len(RING_MIN));
        let mut kicks = Count::default();
        let mut process = RingChannel::new(
            RingEndpoint::init(mem.clone(), 0, RING_MIN).unwrap(),
            NoKick,
        );
        let ctl = RingEndpoint::open(mem, 0, RingSide::Controller).unwrap();
        let mut controller = RingChannel::new(ctl, &mut kicks);

        let frame = [5, 0, 0, 0, b'h', b'e', b'l', b'l', b'o'];
        assert_eq!(
            Channel::<()>::send(&mut process, &mut (), &frame),
            Ok(frame.len())
        );
        let mut reader = FrameReader::new(1024);
        assert_eq!(reader.fill(&mut controller, &mut ()), Ok(true));
        assert_eq!(reader.next_frame().unwrap(), Some(&b"hello"[..]));

        // The process announces sleep: the controller's next send kicks.
        assert!(process.ring().prepare_sleep().unwrap());
        Channel::<()>::send(&mut controller, &mut (), b"x").unwrap();
        drop(controller);
        assert_eq!(kicks.0, 1);
    }

    #[test]
    fn close_is_seen_after_the_data_and_corruption_is_a_reset() {
        let mem = AtomicMemory::new(ring_area_len(RING_MIN));
        let mut p = RingChannel::new(
            RingEndpoint::init(mem.clone(), 0, RING_MIN).unwrap(),
            NoKick,
        );
        let mut c = RingChannel::new(
            RingEndpoint::open(mem.clone(), 0, RingSide::Controller).unwrap(),
            NoKick,
        );
        Channel::<()>::send(&mut p, &mut (), b"bye").unwrap();
        Channel::<()>::close(&mut p, &mut ());
        assert_eq!(
            Channel::<()>::send(&mut p, &mut (), b"more"),
            Err(TransportError::Closed)
        );
        let mut out = Vec::new();
        assert_eq!(
            Channel::<()>::recv(&mut c, &mut (), &mut out, 2),
            Ok(Received::Data(2))
        );
        assert_eq!(
            Channel::<()>::recv(&mut c, &mut (), &mut out, 9),
            Ok(Received::Data(1))
        );
        assert_eq!(
            Channel::<()>::recv(&mut c, &mut (), &mut out, 9),
            Ok(Received::Closed)
        );
        assert_eq!(out, b"bye");
        assert!(!Channel::<()>::is_finished(&c, &mut ()));
        Channel::<()>::close(&mut c, &mut ());
        assert!(Channel::<()>::is_finished(&c, &mut ()));

        // A process that scribbles over its head counter.
        let mem = AtomicMemory::new(ring_area_len(RING_MIN));
        let _p = RingEndpoint::init(mem.clone(), 0, RING_MIN).unwrap();
        let mut c = RingChannel::new(
            RingEndpoint::open(mem.clone(), 0, RingSide::Controller).unwrap(),
            NoKick,
        );
        mem.store_u64(256, u64::MAX);
        assert_eq!(
            Channel::<()>::recv(&mut c, &mut (), &mut out, 9),
            Err(TransportError::Reset)
        );
    }
}
