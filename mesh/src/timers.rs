//! The node's timer queue: deadlines in the caller's time, fired in deadline order.

use std::collections::BTreeMap;

use foca::Timer;

use crate::event::AwaitId;
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
    /// Ask origins for missing entries.
    Repair,
    /// Send awaited entries again to members that have not acknowledged.
    Retransmit,
    /// An awaited publish's deadline.
    AwaitDeadline(AwaitId),
    /// Tell members this origin's newest sequence number.
    Digest,
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

    /// The earliest pending timer of the kind `matches` picks, so that a new reason to
    /// wake does not schedule a second timer of a kind that serves every reason.
    pub(crate) fn earliest(&self, matches: impl Fn(&Wake) -> bool) -> Option<Instant> {
        self.queue
            .iter()
            .find(|(_, wake)| matches(wake))
            .map(|((at, _), _)| *at)
    }

    /// Sets a timer of a shared kind for `at`, unless one at or before `at` exists.
    pub(crate) fn set_shared(&mut self, at: Instant, wake: Wake) {
        let kind = std::mem::discriminant(&wake);
        let existing = self.earliest(|other| std::mem::discriminant(other) == kind);
        if existing.is_none_or(|existing| existing > at) {
            self.set(at, wake);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
    }
}
