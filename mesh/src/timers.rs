//! The node's timer queue: deadlines in the caller's time, fired in deadline order.

use std::collections::BTreeMap;

use foca::Timer;

use crate::identity::Member;
use crate::time::Instant;

/// Why the node wants to be woken.
#[derive(Debug)]
pub(crate) enum Wake {
    /// A timer foca asked for.
    Swim(Timer<Member>),
    /// Announce to the seeds again if still alone.
    Rejoin,
    /// Give up sequence holes whose deadline passed.
    GapCheck,
}

/// Deadlines ordered by time, then by insertion, so equal deadlines fire in the order
/// they were set and runs are reproducible.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    queue: BTreeMap<(Instant, u64), Wake>,
    inserted: u64,
}

impl Timers {
    pub(crate) fn set(&mut self, at: Instant, wake: Wake) {
        self.inserted += 1;
        self.queue.insert((at, self.inserted), wake);
    }

    /// Removes and returns the earliest timer due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Wake> {
        let entry = self.queue.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        Some(entry.remove())
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.keys().next().map(|(at, _)| *at)
    }

    /// The earliest pending gap check, so a new hole does not schedule a second one.
    pub(crate) fn gap_check_at(&self) -> Option<Instant> {
        self.queue
            .iter()
            .find(|(_, wake)| matches!(wake, Wake::GapCheck))
            .map(|((at, _), _)| *at)
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
    }
}
