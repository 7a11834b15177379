//! The core's notion of time: whatever clock the caller drives it with.

use std::fmt;
use std::num::NonZeroU64;
use std::ops::Add;
use std::time::Duration;

/// A point on the caller's clock, in whole nanoseconds since an epoch the caller picks.
///
/// The core never reads a clock. The tokio driver passes the time elapsed since it
/// started; the simulator passes virtual time. Only differences between instants matter.
///
/// Time ends a nanosecond before `u64::MAX` nanoseconds (in about 584 years): an
/// instant holds one more than its nanoseconds, never zero, so that an
/// `Option<Instant>` takes eight bytes rather than sixteen. A node keeps several per
/// origin it follows, and a thousand origins' state is read from cold memory.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(NonZeroU64);

/// A duration in whole nanoseconds, saturating at `u64::MAX` (about 584 years).
pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Instant {
    /// The caller's epoch.
    pub const ZERO: Instant = Instant::from_nanos(0);

    /// The instant `nanos` nanoseconds after the epoch (the end of time, past it).
    pub const fn from_nanos(nanos: u64) -> Self {
        match NonZeroU64::new(nanos.saturating_add(1)) {
            Some(held) => Instant(held),
            None => Instant(NonZeroU64::MAX),
        }
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0.get() - 1
    }

    /// The first instant at or after `self` that is a whole multiple of `grid`.
    pub fn round_up_to(self, grid: Duration) -> Instant {
        let grid = nanos(grid).max(1);
        Instant::from_nanos(self.as_nanos().div_ceil(grid).saturating_mul(grid))
    }

    /// Time from `earlier` to `self`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.as_nanos().saturating_sub(earlier.as_nanos()))
    }
}

impl Default for Instant {
    fn default() -> Instant {
        Instant::ZERO
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Instant").field(&self.as_nanos()).finish()
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;

    /// Saturates at the end of time rather than wrapping.
    fn add(self, rhs: Duration) -> Instant {
        Instant::from_nanos(self.as_nanos().saturating_add(nanos(rhs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_up_to_a_grid() {
        let grid = Duration::from_millis(5);
        let at = |ms: u64| Instant::from_nanos(ms * 1_000_000);
        assert_eq!(at(10).round_up_to(grid), at(10));
        assert_eq!(Instant::from_nanos(10_000_001).round_up_to(grid), at(15));
        assert_eq!(Instant::ZERO.round_up_to(grid), Instant::ZERO);
        assert_eq!(
            at(7).round_up_to(Duration::ZERO),
            at(7),
            "no grid: unchanged"
        );
        let end = Instant::from_nanos(u64::MAX);
        assert!(end.round_up_to(grid) >= Instant::from_nanos(u64::MAX - 5_000_000));
    }

    #[test]
    fn an_optional_instant_takes_no_more_room_than_an_instant() {
        assert_eq!(size_of::<Option<Instant>>(), size_of::<u64>());
        assert_eq!(Instant::ZERO.as_nanos(), 0);
        assert_eq!(Instant::default(), Instant::ZERO);
        assert_eq!(Instant::from_nanos(7).as_nanos(), 7);
        assert!(Instant::from_nanos(7) < Instant::from_nanos(8));
        // The end of time: the last nanosecond is given up, and adding saturates.
        let end = Instant::from_nanos(u64::MAX);
        assert_eq!(end.as_nanos(), u64::MAX - 1);
        assert_eq!(end + Duration::from_secs(1), end);
        assert_eq!(format!("{:?}", Instant::from_nanos(5)), "Instant(5)");
    }
}
