//! Per-origin sequence tracking on the receiving side: de-duplication and gap detection.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::identity::NodeId;
use crate::time::Instant;

/// What a receiver knows of one origin's sequence numbers.
#[derive(Debug)]
pub(crate) struct OriginStream {
    /// Every sequence number below this was delivered or given up.
    next: u64,
    /// Sequence numbers at or past `next + 1` that were delivered already.
    ahead: BTreeSet<u64>,
    /// When the oldest open hole was last seen unchanged.
    gap_since: Option<Instant>,
    last_heard: Instant,
}

/// Whether a received entry is new.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Receipt {
    New,
    Duplicate,
}

impl OriginStream {
    /// A stream first heard of at `seq`. What the origin sent before this node heard of
    /// it is not this node's to miss.
    fn starting_at(seq: u64, now: Instant) -> OriginStream {
        OriginStream {
            next: seq,
            ahead: BTreeSet::new(),
            gap_since: None,
            last_heard: now,
        }
    }

    pub(crate) fn receive(&mut self, seq: u64, now: Instant) -> Receipt {
        self.last_heard = now;
        if seq < self.next || !self.ahead.insert(seq) {
            return Receipt::Duplicate;
        }
        let before = self.next;
        while self.ahead.remove(&self.next) {
            self.next += 1;
        }
        if self.ahead.is_empty() {
            self.gap_since = None;
        } else if self.gap_since.is_none() || self.next != before {
            self.gap_since = Some(now);
        }
        Receipt::New
    }

    /// When the open hole, if any, is to be given up.
    pub(crate) fn gap_deadline(&self, gap_timeout: Duration) -> Option<Instant> {
        self.gap_since.map(|since| since + gap_timeout)
    }

    /// Gives up every open hole and returns how many entries it covered.
    pub(crate) fn give_up_gaps(&mut self) -> u64 {
        let Some(&highest) = self.ahead.last() else {
            return 0;
        };
        let missed = (highest + 1 - self.next) - self.ahead.len() as u64;
        self.next = highest + 1;
        self.ahead.clear();
        self.gap_since = None;
        missed
    }

    pub(crate) fn entries_past_gap(&self) -> usize {
        self.ahead.len()
    }
}

/// Every origin this node has heard from, bounded in number.
#[derive(Debug)]
pub(crate) struct Origins {
    streams: BTreeMap<NodeId, OriginStream>,
    max: usize,
}

impl Origins {
    pub(crate) fn new(max: usize) -> Origins {
        Origins {
            streams: BTreeMap::new(),
            max,
        }
    }

    /// The stream of `origin`, created at `first_seq` if new. Returns whether an old
    /// origin had to be forgotten to make room.
    pub(crate) fn stream(
        &mut self,
        origin: NodeId,
        first_seq: u64,
        now: Instant,
    ) -> (&mut OriginStream, bool) {
        let mut evicted = false;
        if !self.streams.contains_key(&origin) && self.streams.len() >= self.max {
            evicted = self.evict_quietest();
        }
        let stream = self
            .streams
            .entry(origin)
            .or_insert_with(|| OriginStream::starting_at(first_seq, now));
        (stream, evicted)
    }

    fn evict_quietest(&mut self) -> bool {
        let quietest = self
            .streams
            .iter()
            .min_by_key(|(id, stream)| (stream.last_heard, **id))
            .map(|(id, _)| *id);
        quietest.is_some_and(|id| self.streams.remove(&id).is_some())
    }

    /// Gives up holes whose deadline has passed; returns each origin with the number of
    /// entries given up.
    pub(crate) fn expire(&mut self, now: Instant, gap_timeout: Duration) -> Vec<(NodeId, u64)> {
        let mut expired = Vec::new();
        for (id, stream) in &mut self.streams {
            if stream.gap_deadline(gap_timeout).is_some_and(|at| at <= now) {
                expired.push((*id, stream.give_up_gaps()));
            }
        }
        expired
    }

    /// The earliest deadline of any open hole.
    pub(crate) fn next_gap_deadline(&self, gap_timeout: Duration) -> Option<Instant> {
        self.streams
            .values()
            .filter_map(|stream| stream.gap_deadline(gap_timeout))
            .min()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Instant = Instant::ZERO;

    #[test]
    fn in_order_entries_are_new_once() {
        let mut stream = OriginStream::starting_at(1, T0);
        assert_eq!(stream.receive(1, T0), Receipt::New);
        assert_eq!(stream.receive(2, T0), Receipt::New);
        assert_eq!(stream.receive(1, T0), Receipt::Duplicate);
        assert_eq!(stream.gap_deadline(Duration::from_secs(1)), None);
    }

    #[test]
    fn a_hole_filled_late_closes_without_loss() {
        let mut stream = OriginStream::starting_at(1, T0);
        stream.receive(1, T0);
        stream.receive(3, T0);
        assert_eq!(stream.receive(3, T0), Receipt::Duplicate);
        assert!(stream.gap_deadline(Duration::from_secs(1)).is_some());
        assert_eq!(stream.receive(2, T0), Receipt::New);
        assert_eq!(stream.gap_deadline(Duration::from_secs(1)), None);
        assert_eq!(stream.give_up_gaps(), 0);
    }

    #[test]
    fn a_hole_given_up_counts_what_it_covered() {
        let mut stream = OriginStream::starting_at(1, T0);
        stream.receive(1, T0);
        stream.receive(5, T0);
        stream.receive(7, T0);
        // 2, 3, 4 and 6 never arrived.
        assert_eq!(stream.give_up_gaps(), 4);
        assert_eq!(stream.receive(6, T0), Receipt::Duplicate);
        assert_eq!(stream.receive(8, T0), Receipt::New);
    }

    #[test]
    fn expiry_follows_the_deadline() {
        let timeout = Duration::from_secs(2);
        let mut origins = Origins::new(8);
        let (stream, _) = origins.stream(NodeId(1), 1, T0);
        stream.receive(1, T0);
        stream.receive(3, T0);
        assert_eq!(origins.next_gap_deadline(timeout), Some(T0 + timeout));
        assert!(
            origins
                .expire(T0 + Duration::from_secs(1), timeout)
                .is_empty()
        );
        assert_eq!(origins.expire(T0 + timeout, timeout), vec![(NodeId(1), 1)]);
        assert_eq!(origins.next_gap_deadline(timeout), None);
    }

    #[test]
    fn the_quietest_origin_is_forgotten_first() {
        let mut origins = Origins::new(2);
        origins.stream(NodeId(1), 1, T0);
        origins.stream(NodeId(2), 1, T0 + Duration::from_secs(1));
        let (_, evicted) = origins.stream(NodeId(3), 1, T0 + Duration::from_secs(2));
        assert!(evicted);
        assert_eq!(origins.len(), 2);
        assert!(!origins.streams.contains_key(&NodeId(1)));
    }
}
