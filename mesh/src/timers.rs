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
    /// Send this zone the digests this node relays.
    ZoneDigests,
    /// Swap member tables with a random member.
    Sync,
    /// Tell members this node suspects, again, that they are suspected.
    TellSuspects,
    /// Ask the origins of unanchored streams where this node starts.
    AskStarts,
    /// Gossip foca's queued membership updates.
    Gossip,
}

/// Identifies one timer, for cancelling it.
pub(crate) type TimerKey = (Instant, u64);

/// Deadlines ordered by time, then by insertion, so equal deadlines fire in the order
/// they were set and runs are reproducible.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    queue: BTreeMap<TimerKey, Wake>,
    inserted: u64,
    /// For the kinds set with `set_shared`: the earliest one pending.
    shared: BTreeMap<Kind, Instant>,
    /// The first deadline in `queue`, kept beside it: the driver asks for it after
    /// every input, and the queue's first entry is a walk down memory that a driver
    /// running many nodes (the simulator) finds cold.
    earliest: Option<Instant>,
}

/// The kinds of timer that serve every reason at once (one pending is enough).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    GapCheck,
    Repair,
    Retransmit,
    Digest,
    ZoneDigests,
    TellSuspects,
    AskStarts,
    Gossip,
    Other,
}

fn kind(wake: &Wake) -> Kind {
    match wake {
        Wake::GapCheck => Kind::GapCheck,
        Wake::Repair => Kind::Repair,
        Wake::Retransmit => Kind::Retransmit,
        Wake::Digest => Kind::Digest,
        Wake::ZoneDigests => Kind::ZoneDigests,
        Wake::TellSuspects => Kind::TellSuspects,
        Wake::AskStarts => Kind::AskStarts,
        Wake::Gossip => Kind::Gossip,
        Wake::Swim(_) | Wake::Rejoin | Wake::AwaitDeadline(_) | Wake::Sync => Kind::Other,
    }
}

impl Timers {
    pub(crate) fn set(&mut self, at: Instant, wake: Wake) -> TimerKey {
        self.inserted += 1;
        let key = (at, self.inserted);
        self.queue.insert(key, wake);
        self.earliest = Some(self.earliest.map_or(at, |earliest| earliest.min(at)));
        key
    }

    /// Removes a timer that is no longer needed.
    pub(crate) fn cancel(&mut self, key: TimerKey) {
        // Only a timer at the earliest deadline can move it.
        if self.queue.remove(&key).is_some() && Some(key.0) == self.earliest {
            self.find_earliest();
        }
    }

    fn find_earliest(&mut self) {
        self.earliest = self.queue.keys().next().map(|(at, _)| *at);
    }

    /// Removes and returns the earliest timer due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Wake> {
        let entry = self.queue.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        let wake = entry.remove();
        self.find_earliest();
        // The handler of a shared kind sets the next one itself, if it needs one.
        self.shared.remove(&kind(&wake));
        Some(wake)
    }

    /// Removes and returns the timers `matches` picks, in deadline order.
    pub(crate) fn take_where(&mut self, matches: impl Fn(&Wake) -> bool) -> Vec<Wake> {
        let keys: Vec<TimerKey> = self
            .queue
            .iter()
            .filter(|(_, wake)| matches(wake))
            .map(|(key, _)| *key)
            .collect();
        let taken = keys
            .iter()
            .filter_map(|key| self.queue.remove(key))
            .collect();
        self.find_earliest();
        taken
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        debug_assert_eq!(self.earliest, self.queue.keys().next().map(|(at, _)| *at));
        self.earliest
    }

    /// Sets a timer of a kind that serves every reason at once (a gap check, a repair
    /// round, ...) for `at`, unless one at or before `at` is pending already. A later
    /// one left pending fires harmlessly: its handler finds nothing due.
    pub(crate) fn set_shared(&mut self, at: Instant, wake: Wake) {
        let kind = kind(&wake);
        if self.shared.get(&kind).is_none_or(|existing| *existing > at) {
            self.shared.insert(kind, at);
            self.set(at, wake);
        }
    }

    #[cfg(test)]
    pub(crate) fn any(&self, matches: impl Fn(&Wake) -> bool) -> bool {
        self.queue.values().any(matches)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.shared.clear();
        self.earliest = None;
    }
}
