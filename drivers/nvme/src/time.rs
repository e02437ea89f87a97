//! Time without a clock: callers pass `now`.

use core::ops::Add;
use core::time::Duration;

/// A point in time, in nanoseconds since an arbitrary epoch chosen by the
/// caller (the kernel uses its TSC clock, tests a virtual one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The instant `nanos` nanoseconds after the epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;

    fn add(self, d: Duration) -> Instant {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }
}

/// A source of `now` for the driver's few blocking steps (reset, enable,
/// admin commands). The I/O path never reads a clock: it takes `now` as an
/// argument.
pub trait Clock {
    /// The current time.
    fn now(&self) -> Instant;
}
