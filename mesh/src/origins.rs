//! Per-origin sequence tracking on the receiving side: de-duplication, holes, repair
//! scheduling and giving up.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use crate::id_map::IdMap;
use crate::identity::{NodeId, Zone};
use crate::time::Instant;

/// What a receiver knows of one origin's sequence numbers.
///
/// Every number below `next` was delivered or given up; `ahead` holds numbers past
/// `next` already delivered; `known_end` is the highest number known to exist (from
/// entries or the origin's digests). A hole exists while `next <= known_end`.
#[derive(Debug)]
pub(crate) struct OriginStream {
    /// The first sequence number heard; entries below it are accepted only while the
    /// stream is young, in case the first datagrams arrived out of order.
    start: u64,
    young_until: Instant,
    next: u64,
    /// Entries heard out of order; none in the usual case, which then costs a pointer
    /// instead of two empty sets in the memory read for every entry.
    out_of_order: Option<Box<OutOfOrder>>,
    known_end: u64,
    /// When the stream last made progress while a hole was open.
    gap_since: Option<Instant>,
    /// A peer's word that the origin reached this number, past `known_end`: a reason
    /// to ask the origin, never a hole. Zero when there is none.
    claimed_end: u64,
    /// When the claim was first heard, for its deadline.
    claim_since: Option<Instant>,
    /// When to ask the origin for the missing entries next.
    repair_at: Option<Instant>,
    last_heard: Instant,
    /// Nothing below this is owed, whatever a digest says: this node already delivered
    /// up to here in a stream it had to forget.
    floor: u64,
    /// A digest said the stream is complete, and nothing arrived since.
    confirmed: bool,
    /// The origin has said, in a digest of this node's own, where this node starts.
    anchored: bool,
    /// Where this stream sits in `Origins::repairs` and `Origins::deadlines`.
    queued_repair: Option<Instant>,
    queued_deadline: Option<Instant>,
    /// The origin's zone, once it was known as a member: every delivery carries it,
    /// and the stream is at hand where the member table would be one more search.
    zone: Option<Zone>,
    /// The origin is a live member: only those streams count in the progress a node
    /// tells its peers. Kept by the node whenever its member table changes.
    live: bool,
}

/// The entries of a stream heard out of order.
#[derive(Debug, Default)]
struct OutOfOrder {
    /// Below the start, heard while the stream was young.
    early: BTreeSet<u64>,
    /// Past `next`.
    ahead: BTreeSet<u64>,
}

/// Whether a received entry is new.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Receipt {
    New,
    Duplicate,
}

impl OriginStream {
    /// A stream first heard of at `seq`. What the origin sent before this node heard of
    /// it is not this node's to miss. A stream heard from its very first entry is
    /// anchored at once: nothing comes before it, so no digest need say where it starts.
    fn starting_at(seq: u64, now: Instant, youth: Duration) -> OriginStream {
        OriginStream {
            start: seq,
            young_until: now + youth,
            next: seq,
            out_of_order: None,
            known_end: seq.saturating_sub(1),
            gap_since: None,
            claimed_end: 0,
            claim_since: None,
            repair_at: None,
            last_heard: now,
            floor: 1,
            confirmed: false,
            anchored: seq == 1,
            queued_repair: None,
            queued_deadline: None,
            zone: None,
            live: false,
        }
    }

    /// The origin's zone: remembered, or else found by `lookup` and remembered if found
    /// (an origin's zone never changes: a restart is a new origin).
    pub(crate) fn zone(&mut self, lookup: impl FnOnce() -> Option<Zone>) -> Option<Zone> {
        if self.zone.is_none() {
            self.zone = lookup();
        }
        self.zone.clone()
    }

    pub(crate) fn receive(&mut self, seq: u64, now: Instant) -> Receipt {
        self.last_heard = now;
        if seq < self.start {
            return self.receive_early(seq, now);
        }
        let before = self.next;
        if seq == self.next {
            // In order: the usual case costs no set insertion.
            self.next += 1;
        } else if seq < self.next || !self.out_of_order().ahead.insert(seq) {
            return Receipt::Duplicate;
        }
        self.known_end = self.known_end.max(seq);
        self.confirmed = false;
        self.advance_from(before, now);
        Receipt::New
    }

    /// An entry older than the first one heard: new if the stream is still young (the
    /// first datagrams crossed on the way) and it was not seen yet.
    fn receive_early(&mut self, seq: u64, now: Instant) -> Receipt {
        if now >= self.young_until || seq < self.floor {
            // What was delivered while young stays recorded until the origin says where
            // this node starts: a digest that comes later (an answer to this node's
            // ask) must not open those entries again as holes.
            if self.anchored
                && let Some(sets) = &mut self.out_of_order
            {
                sets.early.clear();
                self.tidy();
            }
            return Receipt::Duplicate;
        }
        let early = &mut self.out_of_order().early;
        if early.len() < MAX_EARLY && early.insert(seq) {
            return Receipt::New;
        }
        Receipt::Duplicate
    }

    /// The sets of entries heard out of order, made if there were none.
    fn out_of_order(&mut self) -> &mut OutOfOrder {
        self.out_of_order.get_or_insert_default()
    }

    /// Drops the sets of entries heard out of order once both are empty.
    fn tidy(&mut self) {
        if self
            .out_of_order
            .as_ref()
            .is_some_and(|sets| sets.early.is_empty() && sets.ahead.is_empty())
        {
            self.out_of_order = None;
        }
    }

    /// How many entries past `next` were heard, and how many below the start.
    fn out_of_order_counts(&self) -> (usize, usize) {
        self.out_of_order
            .as_ref()
            .map_or((0, 0), |sets| (sets.ahead.len(), sets.early.len()))
    }

    /// The origin says this node is owed every entry from `first` on. Entries below
    /// the stream's start that are owed become holes to repair; what was received since
    /// the start stays received. When that would mean tracking more than `window`
    /// entries, the entries below the start are given up instead: the start moves to
    /// `first` and the count given up is returned, once.
    pub(crate) fn extend_start(&mut self, first: u64, window: usize, now: Instant) -> u64 {
        let first = first.max(self.floor);
        if first >= self.start {
            return 0;
        }
        let received = self.next.saturating_sub(self.start) as usize;
        let (ahead, early) = self.out_of_order_counts();
        if received + ahead + early > window {
            let seen = self.out_of_order.as_mut().map_or(0, |sets| {
                std::mem::take(&mut sets.early).range(first..).count()
            });
            let missed = (self.start - first).saturating_sub(seen as u64);
            self.tidy();
            self.start = first;
            return missed.max(1);
        }
        let (start, next) = (self.start, self.next);
        let sets = self.out_of_order();
        let early = std::mem::take(&mut sets.early);
        sets.ahead.extend(start..next);
        sets.ahead.extend(early.range(first..));
        self.start = first;
        self.next = first;
        self.advance(now);
        0
    }

    /// The origin says its newest entry is `last`: `direct`ly, in a digest sent to
    /// this node, or through a relay, which may have held it for a while.
    pub(crate) fn learn_end(&mut self, last: u64, direct: bool, now: Instant) {
        self.last_heard = now;
        // The origin's own word settles what a peer claimed; a relayed word may be
        // older than the claim, and settles it only if it reaches as far.
        if direct || last >= self.claimed_end {
            self.drop_claim();
        }
        if last > self.known_end {
            self.known_end = last;
            self.advance(now);
        }
        self.confirmed = last >= self.known_end && !self.has_gap() && !self.has_claim();
    }

    /// The newest sequence number known to exist, from entries and the origin's
    /// digests.
    pub(crate) fn known_end(&self) -> u64 {
        self.known_end
    }

    /// True when the last word from the origin was a digest saying this stream is
    /// complete; if the origin dies now, nothing of its can have been lost.
    pub(crate) fn is_confirmed(&self) -> bool {
        self.confirmed
    }

    /// Whether the origin said where this node starts, or the stream was heard from
    /// its first entry.
    pub(crate) fn is_anchored(&self) -> bool {
        self.anchored
    }

    /// Notes that the origin said where this node starts; true the first time only.
    pub(crate) fn anchor(&mut self) -> bool {
        !std::mem::replace(&mut self.anchored, true)
    }

    /// Records that nothing more is expected to be lost (a resync covered it).
    pub(crate) fn mark_confirmed(&mut self) {
        self.confirmed = true;
    }

    /// Plans a repair right away if holes remain (after part of one was given up).
    pub(crate) fn replan_repair(&mut self, at: Instant) -> Option<Instant> {
        self.repair_at = None;
        self.plan_repair(at)
    }

    /// A peer says the origin reached `last`. Past what this stream knows, that is a
    /// claim: the origin is asked for the difference until it answers or the claim's
    /// deadline passes. Returns true when the claim is new or larger.
    pub(crate) fn hear_claim(&mut self, last: u64, now: Instant) -> bool {
        if last <= self.known_end.max(self.claimed_end) {
            return false;
        }
        self.claimed_end = last;
        self.claim_since.get_or_insert(now);
        true
    }

    /// True while a peer's claim is neither reached nor settled.
    /// Whether the origin is a live member (see [`Origins::set_live`]).
    pub(crate) fn is_live(&self) -> bool {
        self.live
    }

    pub(crate) fn has_claim(&self) -> bool {
        self.claimed_end > self.known_end
    }

    fn drop_claim(&mut self) {
        self.claimed_end = 0;
        self.claim_since = None;
        if !self.has_gap() {
            self.repair_at = None;
        }
    }

    /// When an unsettled claim is to be given up.
    pub(crate) fn claim_deadline(&self, gap_timeout: Duration) -> Option<Instant> {
        self.claim_since
            .filter(|_| self.has_claim())
            .map(|since| since + gap_timeout)
    }

    /// Gives up a claim whose deadline passed; true if there was one. The stream's
    /// position does not move: entries that still come are delivered.
    pub(crate) fn expire_claim(&mut self, now: Instant, gap_timeout: Duration) -> bool {
        if self.claim_deadline(gap_timeout).is_some_and(|at| at <= now) {
            self.drop_claim();
            return true;
        }
        false
    }

    fn advance(&mut self, now: Instant) {
        self.advance_from(self.next, now);
    }

    /// Moves `next` past the entries already received; `before` is where it stood
    /// before the change that called this.
    fn advance_from(&mut self, before: u64, now: Instant) {
        if let Some(sets) = &mut self.out_of_order {
            while sets.ahead.remove(&self.next) {
                self.next += 1;
            }
            self.tidy();
        }
        if !self.has_claim() {
            self.drop_claim();
        }
        if !self.has_gap() {
            self.gap_since = None;
            if !self.has_claim() {
                self.repair_at = None;
            }
        } else if self.gap_since.is_none() || self.next != before {
            self.gap_since = Some(now);
        }
    }

    pub(crate) fn has_gap(&self) -> bool {
        self.next <= self.known_end
    }

    /// When the open hole, if any, is to be given up.
    pub(crate) fn gap_deadline(&self, gap_timeout: Duration) -> Option<Instant> {
        self.gap_since.map(|since| since + gap_timeout)
    }

    /// The earlier of the hole's and the claim's deadlines.
    fn deadline(&self, gap_timeout: Duration) -> Option<Instant> {
        let hole = self.gap_deadline(gap_timeout);
        let claim = self.claim_deadline(gap_timeout);
        hole.into_iter().chain(claim).min()
    }

    /// Whether the stream has a repair or a deadline to queue: false for a complete
    /// stream, which [`Origins::watch`] then need not look up.
    pub(crate) fn wants_watch(&self, gap_timeout: Duration) -> bool {
        Watch::Repair.due(self, gap_timeout).is_some()
            || Watch::Deadline.due(self, gap_timeout).is_some()
    }

    /// Plans the first repair request for a new hole; returns when it is due, if a new
    /// one was planned.
    pub(crate) fn plan_repair(&mut self, at: Instant) -> Option<Instant> {
        if !(self.has_gap() || self.has_claim()) || self.repair_at.is_some() {
            return None;
        }
        self.repair_at = Some(at);
        self.repair_at
    }

    /// If a repair is due at `now`: the missing ranges (at most `limit`), and the next
    /// repair is planned `interval` later.
    pub(crate) fn take_due_repair(
        &mut self,
        now: Instant,
        interval: Duration,
        limit: usize,
    ) -> Option<Vec<(u64, u64)>> {
        if self.repair_at.is_none_or(|at| at > now) || !(self.has_gap() || self.has_claim()) {
            return None;
        }
        self.repair_at = Some(now + interval);
        Some(self.missing_ranges(limit))
    }

    /// When the next repair request is due, if anything is left to ask for.
    pub(crate) fn repair_at(&self) -> Option<Instant> {
        self.repair_at
            .filter(|_| self.has_gap() || self.has_claim())
    }

    /// The inclusive ranges of sequence numbers still missing, oldest first.
    pub(crate) fn missing_ranges(&self, limit: usize) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        let mut from = self.next;
        let ahead = self.out_of_order.as_ref().map(|sets| &sets.ahead);
        for &seen in ahead.into_iter().flatten() {
            if ranges.len() == limit {
                return ranges;
            }
            if seen > from {
                ranges.push((from, seen - 1));
            }
            from = seen + 1;
        }
        if from <= self.known_end && ranges.len() < limit {
            ranges.push((from, self.known_end));
        }
        if self.has_claim() && ranges.len() < limit {
            let from = self.known_end.max(self.next.saturating_sub(1)) + 1;
            ranges.push((from, self.claimed_end));
        }
        ranges
    }

    /// Gives up every missing entry; returns how many.
    pub(crate) fn give_up_gaps(&mut self) -> u64 {
        self.give_up_below(self.known_end + 1)
    }

    /// Gives up every missing entry below `oldest` (the origin no longer retains them);
    /// returns how many.
    pub(crate) fn give_up_below(&mut self, oldest: u64) -> u64 {
        if oldest <= self.next {
            return 0;
        }
        let limit = oldest.min(self.known_end + 1);
        let mut seen = 0;
        if let Some(sets) = &mut self.out_of_order {
            let kept = sets.ahead.split_off(&limit);
            seen = std::mem::replace(&mut sets.ahead, kept).len() as u64;
            self.tidy();
        }
        let missed = limit.saturating_sub(self.next) - seen;
        self.next = self.next.max(limit);
        let now = self.last_heard;
        self.gap_since = None;
        self.repair_at = None;
        self.advance(now);
        missed
    }

    pub(crate) fn entries_past_gap(&self) -> usize {
        self.out_of_order_counts().0
    }
}

/// Entries below a young stream's start remembered at most.
const MAX_EARLY: usize = 1024;

/// Every origin this node has heard from, bounded in number.
#[derive(Debug)]
pub(crate) struct Origins {
    /// The streams, looked up by origin. Each datagram looks one up, in memory that a
    /// node following a thousand origins keeps cold: a lookup in an [`IdMap`] starts
    /// at the entry, where a search of an ordered map read half a dozen cache lines (a
    /// quarter of a simulated thousand-node cluster's steady state went to those
    /// searches) and `std`'s hash map two one after the other. Randomly keyed, since
    /// origin ids come off the wire. Iterated only where the order cannot show:
    /// for sums, for a minimum or maximum with the id as tiebreak, and for lists
    /// sorted afterwards (one pass through the table and a sort of small pairs costs
    /// far less than looking each origin up in id order).
    streams: IdMap<OriginStream>,
    /// The hashes of the live streams' ends, summed: kept as streams change, where the
    /// progress fingerprint of every member-table exchange read a thousand streams.
    ends: EndSum,
    max: usize,
    /// How long a new stream accepts entries older than its first.
    youth: Duration,
    /// Where forgotten streams had got to, so that a stream made again for the same
    /// origin neither delivers nor repairs what was delivered before. Bounded by `max`.
    floors: BTreeMap<NodeId, u64>,
    /// Streams with a repair planned, by when, one entry per stream. An entry may be
    /// early (the plan moved later) but never late, as long as every change to a stream
    /// is followed by [`watch`](Self::watch); each is checked against its stream when
    /// due. A node following a thousand origins would otherwise scan them all on every
    /// repair round.
    repairs: BTreeSet<(Instant, NodeId)>,
    /// Likewise, the deadlines of holes and claims.
    deadlines: BTreeSet<(Instant, NodeId)>,
    /// Asks planned for streams made unanchored: by when the origin is next asked
    /// where this node starts, with the asks made so far. Bounded by `max`; the
    /// earliest are dropped first, for member-table exchanges to ask about.
    planned_asks: BTreeSet<(Instant, NodeId, u8)>,
    /// A stream was made unanchored, and the node has not taken note yet.
    made_unanchored: bool,
    /// Some stream may be unanchored: false once a pass found none, until a stream is
    /// made unanchored (a stream never loses its anchor). Spares every member-table
    /// exchange a pass over a thousand streams that are all anchored.
    any_unanchored: bool,
}

/// A stream forgotten to make room, with the entries it still lacked.
pub(crate) struct Evicted {
    pub(crate) origin: NodeId,
    pub(crate) missed: u64,
    /// The origin never said where this node starts: entries before the first one
    /// heard may have been owed, and now never will be asked for.
    pub(crate) unanchored: bool,
}

impl Origins {
    pub(crate) fn new(max: usize, youth: Duration) -> Origins {
        Origins {
            streams: IdMap::new(),
            ends: EndSum::default(),
            max,
            youth,
            floors: BTreeMap::new(),
            repairs: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            planned_asks: BTreeSet::new(),
            made_unanchored: false,
            any_unanchored: false,
        }
    }

    /// Makes room for streams from `origins` origins (at most the bound) at once: a
    /// node expecting a cluster of a thousand would otherwise double its table seven
    /// times as their first entries come, each time into fresh memory.
    pub(crate) fn reserve(&mut self, origins: usize) {
        self.streams.reserve(origins.min(self.max));
    }

    /// Notes when `origin`'s stream next needs attention, and returns it: its planned
    /// repair and the deadline of its hole or claim. Called after every change to the
    /// stream.
    pub(crate) fn watch(
        &mut self,
        origin: NodeId,
        gap_timeout: Duration,
    ) -> (Option<Instant>, Option<Instant>) {
        // One lookup for both queues: this runs after every batch and digest.
        let Some(stream) = self.streams.get_mut(&origin) else {
            return (None, None);
        };
        (
            Watch::Repair.enqueue(stream, &mut self.repairs, origin, gap_timeout),
            Watch::Deadline.enqueue(stream, &mut self.deadlines, origin, gap_timeout),
        )
    }

    fn parts(
        &mut self,
        watch: Watch,
    ) -> (&mut IdMap<OriginStream>, &mut BTreeSet<(Instant, NodeId)>) {
        match watch {
            Watch::Repair => (&mut self.streams, &mut self.repairs),
            Watch::Deadline => (&mut self.streams, &mut self.deadlines),
        }
    }

    /// Queues the stream at its time, unless an entry no later is already queued;
    /// returns the time.
    fn requeue(&mut self, watch: Watch, origin: NodeId, gap_timeout: Duration) -> Option<Instant> {
        let (streams, queue) = self.parts(watch);
        let stream = streams.get_mut(&origin)?;
        watch.enqueue(stream, queue, origin, gap_timeout)
    }

    /// Takes the first queued stream due by `now`.
    fn pop_due(&mut self, watch: Watch, now: Instant) -> Option<NodeId> {
        let (streams, queue) = self.parts(watch);
        let &(at, origin) = queue.first()?;
        if at > now {
            return None;
        }
        queue.pop_first();
        if let Some(stream) = streams.get_mut(&origin) {
            *watch.queued(stream) = None;
        }
        Some(origin)
    }

    /// The earliest time in the queue that is still true; entries whose stream moved
    /// later go back in at the new time, those whose stream needs nothing are dropped.
    fn next_due(&mut self, watch: Watch, gap_timeout: Duration) -> Option<Instant> {
        loop {
            let (streams, queue) = self.parts(watch);
            let &(at, origin) = queue.first()?;
            let stream = streams.get_mut(&origin);
            if stream.as_ref().and_then(|s| watch.due(s, gap_timeout)) == Some(at) {
                return Some(at);
            }
            queue.pop_first();
            if let Some(stream) = stream {
                *watch.queued(stream) = None;
            }
            self.requeue(watch, origin, gap_timeout);
        }
    }

    /// The stream of `origin`, created at `first_seq` if new (or where a forgotten
    /// stream of the same origin had got to), with `live` saying whether the origin is
    /// a live member. Returns the stream forgotten to make room, if any.
    pub(crate) fn stream(
        &mut self,
        origin: NodeId,
        first_seq: u64,
        now: Instant,
        live: impl FnOnce() -> bool,
    ) -> (StreamMut<'_>, Option<Evicted>) {
        let mut evicted = None;
        let mut floor = None;
        let created = !self.streams.contains_key(&origin);
        // A floor is only ever kept for a stream that is gone.
        if created {
            // Before evicting, which may drop the oldest floor to make room.
            floor = self.floors.remove(&origin);
            if self.streams.len() >= self.max {
                evicted = self.evict_quietest();
            }
        }
        let youth = self.youth;
        let stream = self.streams.get_or_insert_with(origin, || {
            // Where the forgotten stream had got to: below is delivered, above is owed.
            let start = floor.unwrap_or(first_seq);
            let mut stream = OriginStream::starting_at(start, now, youth);
            stream.floor = floor.unwrap_or(1);
            stream.live = live();
            stream
        });
        if created {
            self.ends.add(end_hash_of(origin, stream));
        }
        self.made_unanchored |= created && !stream.anchored;
        self.any_unanchored |= created && !stream.anchored;
        (StreamMut::new(origin, stream, &mut self.ends), evicted)
    }

    /// Asks `origin` where this node starts at `at`, the ask after `asked` others, if
    /// its stream is still unanchored then.
    pub(crate) fn ask_later(&mut self, at: Instant, origin: NodeId, asked: u8) {
        if self.planned_asks.len() >= self.max {
            self.planned_asks.pop_first();
        }
        self.planned_asks.insert((at, origin, asked));
    }

    /// Whether a stream was made unanchored since the last call.
    pub(crate) fn take_made_unanchored(&mut self) -> bool {
        std::mem::take(&mut self.made_unanchored)
    }

    /// When the next ask planned with [`ask_later`](Self::ask_later) is due.
    pub(crate) fn next_ask(&self) -> Option<Instant> {
        self.planned_asks.first().map(|(at, _, _)| *at)
    }

    /// The asks due by `now` whose stream is still unanchored (no digest of this
    /// node's own said where it starts, so entries before the first one heard may be
    /// owed), with the asks made before each. Each is returned once.
    pub(crate) fn asks_due(&mut self, now: Instant) -> Vec<(NodeId, u8)> {
        let mut due = Vec::new();
        while let Some(&(at, origin, asked)) = self.planned_asks.first() {
            if at > now {
                break;
            }
            self.planned_asks.pop_first();
            if self.streams.get(&origin).is_some_and(|s| !s.anchored) {
                due.push((origin, asked));
            }
        }
        due
    }

    /// Entries held past holes across every stream: the memory out-of-order arrivals
    /// take.
    pub(crate) fn entries_past_gaps(&self) -> usize {
        self.streams
            .values()
            .map(OriginStream::entries_past_gap)
            .sum()
    }

    /// Gives up the holes of the stream holding the most entries past them; returns
    /// the origin and the entries given up.
    pub(crate) fn give_up_largest(&mut self) -> Option<(NodeId, u64)> {
        let (id, stream) = self
            .streams
            .iter_mut()
            .max_by_key(|(id, stream)| (stream.entries_past_gap(), **id))?;
        Some((*id, stream.give_up_gaps()))
    }

    /// Notes whether `origin` is a live member, for its stream if there is one.
    pub(crate) fn set_live(&mut self, origin: NodeId, live: bool) {
        if let Some(mut stream) = self.get_mut(origin) {
            stream.live = live;
        }
    }

    /// The number of live streams past sequence number zero and the sum of the hashes
    /// of their ends ([`end_hash`]), without reading the streams.
    pub(crate) fn live_end_sum(&self) -> (u64, u64) {
        (self.ends.count, self.ends.sum)
    }

    /// The stream of every live origin that reached past sequence number zero, in
    /// origin order, with the newest sequence number known to exist.
    pub(crate) fn live_ends(&self) -> Vec<(NodeId, u64)> {
        let mut ends = Vec::with_capacity(self.streams.len());
        ends.extend(self.live_ends_unordered());
        ends.sort_unstable();
        ends
    }

    /// Whether the streams marked live are exactly those of the origins `is_live`
    /// names: the node keeps the marks as its member table changes.
    #[cfg(debug_assertions)]
    pub(crate) fn marks_live(&self, is_live: impl Fn(&NodeId) -> bool) -> bool {
        self.streams
            .iter()
            .all(|(origin, stream)| stream.live == is_live(origin))
    }

    /// What [`live_ends`](Self::live_ends) lists, in the table's own order.
    fn live_ends_unordered(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.streams
            .iter()
            .filter(|(_, stream)| stream.live && stream.known_end() > 0)
            .map(|(origin, stream)| (*origin, stream.known_end()))
    }

    /// [`live_end_sum`](Self::live_end_sum) taken afresh, by a pass through every
    /// stream: what the kept sum is checked against.
    #[cfg(any(test, debug_assertions))]
    pub(crate) fn recount_live_end_sum(&self) -> (u64, u64) {
        let mut ends = EndSum::default();
        for (origin, last) in self.live_ends_unordered() {
            ends.add(Some(end_hash(origin, last)));
        }
        (ends.count, ends.sum)
    }

    /// Streams past their youth whose origin never said, in a digest of this node's
    /// own, where this node starts: each such digest was lost on the way, so entries
    /// before the first one heard may be owed and unknown.
    pub(crate) fn unanchored(&mut self, now: Instant) -> Vec<NodeId> {
        if !self.any_unanchored {
            return Vec::new();
        }
        let mut young = false;
        let mut origins: Vec<NodeId> = self
            .streams
            .iter()
            .filter(|(_, stream)| !stream.anchored)
            .filter(|(_, stream)| {
                young |= stream.young_until > now;
                stream.young_until <= now
            })
            .map(|(origin, _)| *origin)
            .collect();
        self.any_unanchored = young || !origins.is_empty();
        origins.sort_unstable();
        origins
    }

    /// Brings the streams of `origins` into cache ahead of their lookups (see
    /// [`IdMap::warm`]).
    pub(crate) fn warm(&self, origins: impl Iterator<Item = NodeId>) {
        self.streams.warm(origins);
    }

    /// The stream of `origin` if this node has heard from it.
    pub(crate) fn get_mut(&mut self, origin: NodeId) -> Option<StreamMut<'_>> {
        let stream = self.streams.get_mut(&origin)?;
        Some(StreamMut::new(origin, stream, &mut self.ends))
    }

    /// Forgets the stream heard from longest ago, preferring one without holes; gives
    /// its holes up and remembers where it had got to.
    fn evict_quietest(&mut self) -> Option<Evicted> {
        let (origin, _) = self
            .streams
            .iter()
            .min_by_key(|(id, stream)| (stream.has_gap(), stream.last_heard, **id))?;
        let origin = *origin;
        let mut stream = self.streams.remove(&origin)?;
        self.ends.remove(end_hash_of(origin, &stream));
        // Its queue entries go with it: origins cycling through `max` must not leave
        // the queues growing with their rate.
        if let Some(at) = stream.queued_repair {
            self.repairs.remove(&(at, origin));
        }
        if let Some(at) = stream.queued_deadline {
            self.deadlines.remove(&(at, origin));
        }
        let missed = stream.give_up_gaps();
        if self.floors.len() >= self.max
            && let Some(oldest) = self.floors.keys().next().copied()
        {
            self.floors.remove(&oldest);
        }
        self.floors.insert(origin, stream.next);
        Some(Evicted {
            origin,
            missed,
            unanchored: !stream.anchored,
        })
    }

    /// Gives up holes and claims whose deadline has passed. Returns each origin with
    /// the number of entries its hole covered, then the origins whose claim expired.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        gap_timeout: Duration,
    ) -> (Vec<(NodeId, u64)>, Vec<NodeId>) {
        let mut holes = Vec::new();
        let mut claims = Vec::new();
        while let Some(origin) = self.pop_due(Watch::Deadline, now) {
            let Some(stream) = self.streams.get_mut(&origin) else {
                continue;
            };
            if stream.gap_deadline(gap_timeout).is_some_and(|at| at <= now) {
                holes.push((origin, stream.give_up_gaps()));
            }
            if stream.expire_claim(now, gap_timeout) {
                claims.push(origin);
            }
            self.watch(origin, gap_timeout);
        }
        (holes, claims)
    }

    /// The earliest deadline of any open hole or unsettled claim.
    pub(crate) fn next_gap_deadline(&mut self, gap_timeout: Duration) -> Option<Instant> {
        self.next_due(Watch::Deadline, gap_timeout)
    }

    /// Repairs due at `now`: each origin with the ranges to ask it for.
    pub(crate) fn due_repairs(
        &mut self,
        now: Instant,
        interval: Duration,
        limit: usize,
    ) -> Vec<(NodeId, Vec<(u64, u64)>)> {
        let mut taken = Vec::new();
        while let Some(origin) = self.pop_due(Watch::Repair, now) {
            taken.push(origin);
        }
        let mut due = Vec::new();
        for origin in taken {
            let Some(stream) = self.streams.get_mut(&origin) else {
                continue;
            };
            if let Some(ranges) = stream.take_due_repair(now, interval, limit) {
                due.push((origin, ranges));
            }
            // Queued again only after the round, so that a next time that is not
            // later than `now` (a clock at its end) cannot keep this round going.
            // The gap timeout plays no part in repair times.
            self.requeue(Watch::Repair, origin, Duration::ZERO);
        }
        due
    }

    /// The earliest planned repair of any stream.
    pub(crate) fn next_repair(&mut self) -> Option<Instant> {
        self.next_due(Watch::Repair, Duration::ZERO)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.streams.len()
    }
}

/// The hash a live stream's end adds to the progress fingerprint: the same for every
/// node that knows `last` as `origin`'s newest sequence number.
pub(crate) fn end_hash(origin: NodeId, last: u64) -> u64 {
    crate::node::mix(crate::node::mix(origin.0) ^ last)
}

/// What `stream` adds to [`Origins::live_end_sum`]: nothing unless its origin is live
/// and it reached past zero.
fn end_hash_of(origin: NodeId, stream: &OriginStream) -> Option<u64> {
    (stream.live && stream.known_end > 0).then(|| end_hash(origin, stream.known_end))
}

/// A count and a wrapping sum of hashes, which entries leave in any order.
#[derive(Debug, Default)]
struct EndSum {
    count: u64,
    sum: u64,
}

impl EndSum {
    fn add(&mut self, hash: Option<u64>) {
        if let Some(hash) = hash {
            self.count += 1;
            self.sum = self.sum.wrapping_add(hash);
        }
    }

    fn remove(&mut self, hash: Option<u64>) {
        if let Some(hash) = hash {
            self.count -= 1;
            self.sum = self.sum.wrapping_sub(hash);
        }
    }
}

/// A stream lent out for changes. When it is given back (dropped), the sum of the
/// live streams' ends takes in whatever the changes did to its end or liveness, so
/// no change can slip past the sum.
pub(crate) struct StreamMut<'a> {
    origin: NodeId,
    stream: &'a mut OriginStream,
    ends: &'a mut EndSum,
    /// What the stream adds to the sum as lent.
    counted: Option<u64>,
}

impl<'a> StreamMut<'a> {
    fn new(origin: NodeId, stream: &'a mut OriginStream, ends: &'a mut EndSum) -> Self {
        let counted = end_hash_of(origin, stream);
        StreamMut {
            origin,
            stream,
            ends,
            counted,
        }
    }
}

impl Deref for StreamMut<'_> {
    type Target = OriginStream;

    fn deref(&self) -> &OriginStream {
        self.stream
    }
}

impl DerefMut for StreamMut<'_> {
    fn deref_mut(&mut self) -> &mut OriginStream {
        self.stream
    }
}

impl Drop for StreamMut<'_> {
    fn drop(&mut self) {
        let now = end_hash_of(self.origin, self.stream);
        if now != self.counted {
            self.ends.remove(self.counted);
            self.ends.add(now);
        }
    }
}

/// The two times `Origins` keeps streams queued by.
#[derive(Clone, Copy)]
enum Watch {
    Repair,
    Deadline,
}

impl Watch {
    fn due(self, stream: &OriginStream, gap_timeout: Duration) -> Option<Instant> {
        match self {
            Watch::Repair => stream.repair_at(),
            Watch::Deadline => stream.deadline(gap_timeout),
        }
    }

    fn queued(self, stream: &mut OriginStream) -> &mut Option<Instant> {
        match self {
            Watch::Repair => &mut stream.queued_repair,
            Watch::Deadline => &mut stream.queued_deadline,
        }
    }

    /// Queues `stream` by when it is next due, unless it is queued no later already.
    fn enqueue(
        self,
        stream: &mut OriginStream,
        queue: &mut BTreeSet<(Instant, NodeId)>,
        origin: NodeId,
        gap_timeout: Duration,
    ) -> Option<Instant> {
        let wanted = self.due(stream, gap_timeout);
        let queued = self.queued(stream);
        match (*queued, wanted) {
            (_, None) => {}
            (Some(at), Some(due)) if at <= due => {}
            (earlier, Some(due)) => {
                if let Some(at) = earlier {
                    queue.remove(&(at, origin));
                }
                queue.insert((due, origin));
                *queued = Some(due);
            }
        }
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const T0: Instant = Instant::ZERO;

    #[test]
    fn in_order_entries_are_new_once() {
        let mut stream = OriginStream::starting_at(1, T0, Duration::from_secs(1));
        assert_eq!(stream.receive(1, T0), Receipt::New);
        assert_eq!(stream.receive(2, T0), Receipt::New);
        assert_eq!(stream.receive(1, T0), Receipt::Duplicate);
        assert!(!stream.has_gap());
        assert_eq!(stream.gap_deadline(Duration::from_secs(1)), None);
    }

    #[test]
    fn a_hole_filled_late_closes_without_loss() {
        let mut stream = OriginStream::starting_at(1, T0, Duration::from_secs(1));
        stream.receive(1, T0);
        stream.receive(3, T0);
        assert_eq!(stream.receive(3, T0), Receipt::Duplicate);
        assert_eq!(stream.missing_ranges(8), [(2, 2)]);
        assert!(stream.gap_deadline(Duration::from_secs(1)).is_some());
        assert_eq!(stream.receive(2, T0), Receipt::New);
        assert_eq!(stream.gap_deadline(Duration::from_secs(1)), None);
        assert_eq!(stream.give_up_gaps(), 0);
    }

    #[test]
    fn a_hole_given_up_counts_what_it_covered() {
        let mut stream = OriginStream::starting_at(1, T0, Duration::from_secs(1));
        stream.receive(1, T0);
        stream.receive(5, T0);
        stream.receive(7, T0);
        assert_eq!(stream.missing_ranges(8), [(2, 4), (6, 6)]);
        assert_eq!(stream.missing_ranges(1), [(2, 4)]);
        // 2, 3, 4 and 6 never arrived.
        assert_eq!(stream.give_up_gaps(), 4);
        assert_eq!(stream.receive(6, T0), Receipt::Duplicate);
        assert_eq!(stream.receive(8, T0), Receipt::New);
    }

    #[test]
    fn a_young_stream_accepts_entries_that_overtook_its_first() {
        let youth = Duration::from_secs(1);
        let mut stream = OriginStream::starting_at(5, T0, youth);
        assert_eq!(stream.receive(5, T0), Receipt::New);
        assert_eq!(stream.receive(4, T0), Receipt::New);
        assert_eq!(stream.receive(4, T0), Receipt::Duplicate);
        assert!(!stream.has_gap());
        assert_eq!(
            stream.receive(3, T0 + youth),
            Receipt::Duplicate,
            "too old once grown up"
        );
    }

    #[test]
    fn a_start_moved_back_keeps_what_was_received() {
        let mut stream = OriginStream::starting_at(5, T0, Duration::ZERO);
        stream.receive(5, T0);
        stream.receive(6, T0);
        assert_eq!(stream.extend_start(3, 100, T0), 0);
        assert_eq!(stream.missing_ranges(8), [(3, 4)]);
        assert_eq!(stream.receive(6, T0), Receipt::Duplicate);
        assert_eq!(stream.receive(3, T0), Receipt::New);
        assert_eq!(stream.receive(4, T0), Receipt::New);
        assert!(!stream.has_gap());
        assert_eq!(
            stream.extend_start(1, 1, T0),
            2,
            "too much to track: 1 and 2 given up"
        );
        assert_eq!(stream.extend_start(1, 1, T0), 0, "given up once only");
    }

    #[test]
    fn a_digest_reveals_tail_loss() {
        let mut stream = OriginStream::starting_at(1, T0, Duration::from_secs(1));
        stream.receive(1, T0);
        stream.learn_end(4, true, T0);
        assert!(stream.has_gap());
        assert_eq!(stream.missing_ranges(8), [(2, 4)]);
        stream.learn_end(3, true, T0);
        assert_eq!(
            stream.missing_ranges(8),
            [(2, 4)],
            "an older digest changes nothing"
        );
    }

    #[test]
    fn a_relayed_end_older_than_a_claim_leaves_the_claim() {
        let mut stream = OriginStream::starting_at(1, T0, Duration::from_secs(1));
        stream.receive(1, T0);
        assert!(stream.hear_claim(3, T0));
        stream.learn_end(1, false, T0);
        assert!(stream.has_claim(), "a relay's older word settles nothing");
        assert!(!stream.is_confirmed());
        stream.learn_end(3, false, T0);
        assert!(!stream.has_claim(), "one that reaches the claim settles it");
        assert!(stream.hear_claim(5, T0));
        stream.learn_end(3, true, T0);
        assert!(
            !stream.has_claim(),
            "the origin's own word settles any claim"
        );
    }

    #[test]
    fn what_the_origin_no_longer_has_is_given_up_alone() {
        let mut stream = OriginStream::starting_at(1, T0, Duration::from_secs(1));
        stream.receive(1, T0);
        stream.receive(4, T0);
        stream.receive(9, T0);
        // Missing: 2, 3, 5..=8. The origin keeps only 6 and later.
        assert_eq!(stream.give_up_below(6), 3);
        assert_eq!(stream.missing_ranges(8), [(6, 8)]);
        assert_eq!(stream.give_up_below(6), 0);
    }

    #[test]
    fn repairs_are_planned_once_and_repeat_at_the_interval() {
        let interval = Duration::from_millis(100);
        let mut stream = OriginStream::starting_at(1, T0, Duration::from_secs(1));
        stream.receive(1, T0);
        stream.receive(3, T0);
        let first = T0 + Duration::from_millis(10);
        assert_eq!(stream.plan_repair(first), Some(first));
        assert_eq!(stream.plan_repair(first), None);
        assert_eq!(stream.take_due_repair(T0, interval, 8), None);
        assert_eq!(
            stream.take_due_repair(first, interval, 8),
            Some(vec![(2, 2)])
        );
        assert_eq!(stream.repair_at(), Some(first + interval));
        stream.receive(2, T0);
        assert_eq!(stream.repair_at(), None);
    }

    #[test]
    fn expiry_follows_the_deadline() {
        let timeout = Duration::from_secs(2);
        let mut origins = Origins::new(8, Duration::from_secs(1));
        let (mut stream, _) = origins.stream(NodeId(1), 1, T0, || true);
        stream.receive(1, T0);
        stream.receive(3, T0);
        drop(stream);
        origins.watch(NodeId(1), timeout);
        assert_eq!(origins.next_gap_deadline(timeout), Some(T0 + timeout));
        let early = origins.expire(T0 + Duration::from_secs(1), timeout);
        assert!(early.0.is_empty() && early.1.is_empty());
        assert_eq!(
            origins.expire(T0 + timeout, timeout),
            (vec![(NodeId(1), 1)], vec![])
        );
        assert_eq!(origins.next_gap_deadline(timeout), None);
    }

    #[test]
    fn repairs_come_due_in_time_order_and_only_while_needed() {
        let ms = Duration::from_millis;
        let (interval, timeout) = (ms(100), Duration::from_secs(2));
        let mut origins = Origins::new(8, Duration::from_secs(1));
        for (origin, delay) in [(1, 30), (2, 10), (3, 20)] {
            let (mut stream, _) = origins.stream(NodeId(origin), 1, T0, || true);
            stream.receive(1, T0);
            stream.receive(3, T0);
            stream.plan_repair(T0 + ms(delay));
            drop(stream);
            origins.watch(NodeId(origin), timeout);
        }
        assert_eq!(origins.next_repair(), Some(T0 + ms(10)));
        let due = origins.due_repairs(T0 + ms(20), interval, 8);
        assert_eq!(
            due,
            vec![(NodeId(2), vec![(2, 2)]), (NodeId(3), vec![(2, 2)])]
        );
        // Origin 1's hole fills before its repair: nothing is asked, nothing stays queued.
        origins.get_mut(NodeId(1)).unwrap().receive(2, T0);
        origins.watch(NodeId(1), timeout);
        // The others are asked again one interval after this round.
        assert_eq!(origins.next_repair(), Some(T0 + ms(120)));
        assert!(origins.due_repairs(T0 + ms(30), interval, 8).is_empty());
        let again = origins.due_repairs(T0 + ms(120), interval, 8);
        assert_eq!(again.len(), 2);
        assert_eq!(origins.next_repair(), Some(T0 + ms(220)));
    }

    #[test]
    fn forgotten_streams_leave_the_queues() {
        let timeout = Duration::from_secs(2);
        let mut origins = Origins::new(4, Duration::from_secs(1));
        for origin in 0..1_000 {
            let (mut stream, _) = origins.stream(NodeId(origin), 1, T0, || true);
            stream.receive(1, T0);
            stream.receive(3, T0);
            stream.plan_repair(T0 + Duration::from_millis(10));
            drop(stream);
            origins.watch(NodeId(origin), timeout);
        }
        assert!(origins.repairs.len() <= 4 && origins.deadlines.len() <= 4);
    }

    #[test]
    fn a_repair_round_at_the_end_of_the_clock_ends() {
        let end = Instant::from_nanos(u64::MAX);
        let mut origins = Origins::new(4, Duration::from_secs(1));
        let (mut stream, _) = origins.stream(NodeId(1), 1, end, || true);
        stream.receive(1, end);
        stream.receive(3, end);
        stream.plan_repair(end);
        drop(stream);
        origins.watch(NodeId(1), Duration::from_secs(2));
        let due = origins.due_repairs(end, Duration::from_millis(100), 8);
        assert_eq!(due, vec![(NodeId(1), vec![(2, 2)])]);
    }

    #[test]
    fn a_deadline_moved_later_is_not_given_up_early() {
        let timeout = Duration::from_secs(2);
        let mut origins = Origins::new(8, Duration::from_secs(1));
        let (mut stream, _) = origins.stream(NodeId(1), 1, T0, || true);
        stream.receive(1, T0);
        stream.receive(4, T0);
        drop(stream);
        origins.watch(NodeId(1), timeout);
        // Progress at 1 s (entry 2 arrives) moves the hole's deadline to 3 s.
        let later = T0 + Duration::from_secs(1);
        origins.get_mut(NodeId(1)).unwrap().receive(2, later);
        origins.watch(NodeId(1), timeout);
        let at_two = origins.expire(T0 + timeout, timeout);
        assert!(at_two.0.is_empty(), "{at_two:?}");
        assert_eq!(origins.next_gap_deadline(timeout), Some(later + timeout));
        let at_three = origins.expire(later + timeout, timeout);
        assert_eq!(at_three.0, vec![(NodeId(1), 1)]);
        assert_eq!(origins.next_gap_deadline(timeout), None);
    }

    #[test]
    fn a_stream_made_again_after_eviction_resumes_where_it_was() {
        let mut origins = Origins::new(1, Duration::from_secs(1));
        let (mut stream, _) = origins.stream(NodeId(1), 1, T0, || true);
        for seq in 1..=5 {
            stream.receive(seq, T0);
        }
        drop(stream);
        let (_, evicted) = origins.stream(NodeId(2), 1, T0, || true);
        assert!(evicted.is_some());
        let (mut again, _) = origins.stream(NodeId(1), 8, T0, || true);
        assert_eq!(again.receive(8, T0), Receipt::New);
        assert_eq!(
            again.missing_ranges(8),
            [(6, 7)],
            "only what came after the old stream"
        );
        assert_eq!(again.extend_start(1, 100, T0), 0);
        assert_eq!(
            again.missing_ranges(8),
            [(6, 7)],
            "a digest cannot pull it back below"
        );
    }

    #[test]
    fn the_quietest_origin_is_forgotten_first() {
        let mut origins = Origins::new(2, Duration::from_secs(1));
        origins.stream(NodeId(1), 1, T0, || true);
        origins.stream(NodeId(2), 1, T0 + Duration::from_secs(1), || true);
        let (_, evicted) = origins.stream(NodeId(3), 1, T0 + Duration::from_secs(2), || true);
        assert!(evicted.is_some_and(|e| e.origin == NodeId(1) && e.missed == 0));
        assert_eq!(origins.len(), 2);
        assert!(!origins.streams.contains_key(&NodeId(1)));
    }

    #[test]
    fn a_stream_heard_from_its_first_entry_needs_no_anchor() {
        let mut origins = Origins::new(8, Duration::from_secs(1));
        origins.stream(NodeId(1), 1, T0, || true);
        assert!(!origins.take_made_unanchored());
        origins.stream(NodeId(2), 5, T0, || true);
        assert!(origins.take_made_unanchored());
        assert!(!origins.take_made_unanchored(), "noted once");
        assert_eq!(origins.unanchored(T0 + Duration::from_secs(1)), [NodeId(2)]);
    }

    /// The pass over every stream is skipped once it found none unanchored, and taken
    /// again when a stream is made unanchored; a young unanchored stream, not listed
    /// yet, keeps it from being skipped.
    #[test]
    fn unanchored_streams_are_listed_once_past_their_youth_whatever_was_skipped() {
        let mut origins = Origins::new(8, Duration::from_secs(1));
        let later = |secs| T0 + Duration::from_secs(secs);
        origins.stream(NodeId(1), 1, T0, || true);
        assert!(origins.unanchored(later(2)).is_empty());
        origins.stream(NodeId(2), 5, later(2), || true);
        assert!(origins.unanchored(later(2)).is_empty(), "still young");
        assert_eq!(origins.unanchored(later(3)), [NodeId(2)]);
        origins.get_mut(NodeId(2)).unwrap().anchor();
        assert!(origins.unanchored(later(3)).is_empty());
        assert!(!origins.any_unanchored, "the next pass is skipped");
        origins.stream(NodeId(3), 7, later(4), || true);
        assert_eq!(origins.unanchored(later(5)), [NodeId(3)]);
    }

    #[test]
    fn asks_come_due_once_and_only_while_the_stream_is_unanchored() {
        let mut origins = Origins::new(2, Duration::from_secs(1));
        origins.stream(NodeId(1), 5, T0, || true);
        origins.stream(NodeId(2), 5, T0, || true);
        let soon = T0 + Duration::from_millis(200);
        origins.ask_later(soon, NodeId(1), 0);
        origins.ask_later(soon, NodeId(2), 3);
        assert_eq!(origins.next_ask(), Some(soon));
        assert!(origins.asks_due(T0).is_empty());
        origins.get_mut(NodeId(2)).unwrap().anchor();
        assert_eq!(origins.asks_due(soon), [(NodeId(1), 0)]);
        assert!(origins.asks_due(soon).is_empty());
        assert_eq!(origins.next_ask(), None);
        // Bounded like the streams: the earliest ask gives way.
        for (at, origin) in [(3, 1), (1, 1), (2, 1)] {
            origins.ask_later(T0 + Duration::from_millis(at), NodeId(origin), 1);
        }
        assert_eq!(origins.next_ask(), Some(T0 + Duration::from_millis(2)));
    }

    /// The sum kept as streams change equals the sum taken over every stream: through
    /// entries, digests, changes of liveness and evictions.
    #[test]
    fn the_kept_sum_of_ends_follows_every_change() {
        let mut origins = Origins::new(3, Duration::from_secs(1));
        origins.stream(NodeId(1), 1, T0, || true).0.receive(1, T0);
        origins.stream(NodeId(2), 4, T0, || false).0.receive(4, T0);
        origins.stream(NodeId(3), 1, T0, || true);
        assert_eq!(origins.live_end_sum(), origins.recount_live_end_sum());
        assert_eq!(
            origins.live_end_sum().0,
            1,
            "a dead origin and an empty stream count not"
        );
        origins.set_live(NodeId(2), true);
        origins.get_mut(NodeId(3)).unwrap().learn_end(6, true, T0);
        assert_eq!(origins.live_end_sum(), origins.recount_live_end_sum());
        assert_eq!(origins.live_end_sum().0, 3);
        origins.set_live(NodeId(1), false);
        let (_, evicted) = origins.stream(NodeId(4), 1, T0 + Duration::from_secs(1), || true);
        assert!(evicted.is_some());
        assert_eq!(origins.live_end_sum(), origins.recount_live_end_sum());
    }

    /// Random sequences of every way a stream changes, with a small bound so that
    /// streams are evicted and made again: the kept sum never leaves the pass's.
    #[test]
    fn the_kept_sum_of_ends_survives_any_sequence_of_changes() {
        let timeout = Duration::from_millis(50);
        for seed in 0..200u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut origins = Origins::new(rng.random_range(1..7), Duration::from_millis(20));
            let mut now = T0;
            for _ in 0..300 {
                now = now + Duration::from_millis(rng.random_range(0..15));
                let origin = NodeId(rng.random_range(0..10));
                let (seq, live) = (rng.random_range(1..30), rng.random_bool(0.5));
                match rng.random_range(0..9) {
                    0 => drop(
                        origins
                            .stream(origin, seq, now, || live)
                            .0
                            .receive(seq + 2, now),
                    ),
                    1 => origins.set_live(origin, live),
                    2 => {
                        let _ = origins.expire(now, timeout);
                        let _ = origins.due_repairs(now, timeout, 4);
                    }
                    3 => {
                        let _ = origins.give_up_largest();
                    }
                    _ => {
                        if let Some(mut stream) = origins.get_mut(origin) {
                            match rng.random_range(0..5) {
                                0 => stream.learn_end(seq, live, now),
                                1 => drop(stream.extend_start(seq, 8, now)),
                                2 => drop(stream.give_up_below(seq)),
                                3 => drop(stream.hear_claim(seq, now)),
                                _ => drop(stream.receive(seq, now)),
                            }
                        }
                    }
                }
                assert_eq!(
                    origins.live_end_sum(),
                    origins.recount_live_end_sum(),
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn forgetting_an_unanchored_stream_says_so() {
        let mut origins = Origins::new(1, Duration::from_secs(1));
        origins.stream(NodeId(1), 5, T0, || true);
        let (_, evicted) = origins.stream(NodeId(2), 1, T0, || true);
        assert!(evicted.is_some_and(|e| e.unanchored && e.missed == 0));
        let (_, evicted) = origins.stream(NodeId(3), 1, T0, || true);
        assert!(evicted.is_some_and(|e| !e.unanchored));
    }
}
