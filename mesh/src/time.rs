//! The core's notion of time: whatever clock the caller drives it with.

use std::ops::Add;
use std::time::Duration;

/// A point on the caller's clock, in whole nanoseconds since an epoch the caller picks.
///
/// The core never reads a clock. The tokio driver passes the time elapsed since it
/// started; the simulator passes virtual time. Only differences between instants matter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The caller's epoch.
    pub const ZERO: Instant = Instant(0);

    /// The instant `nanos` nanoseconds after the epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Instant(nanos)
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// The first instant at or after `self` that is a whole multiple of `grid`.
    pub fn round_up_to(self, grid: Duration) -> Instant {
        let grid = u64::try_from(grid.as_nanos()).unwrap_or(u64::MAX).max(1);
        Instant(self.0.div_ceil(grid).saturating_mul(grid))
    }

    /// Time from `earlier` to `self`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;

    /// Saturates at the end of time rather than wrapping.
    fn add(self, rhs: Duration) -> Instant {
        let nanos = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
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
}
