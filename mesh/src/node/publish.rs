//! The origin side: batching, retention, acknowledgement tracking, retransmission,
//! repair serving and digests.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tracing::debug;

use super::{Node, roster};
use crate::error::PublishError;
use crate::event::{Acks, AwaitFailure, AwaitId, Delivery, Event, Goal, Published};
use crate::identity::{NodeId, Zone};
use crate::invalidation::Invalidation;
use crate::time::{self, Instant};
use crate::timers::{TimerKey, Wake};
use crate::wire::{self, FLAG_FORWARD, FLAG_HALF, FLAG_SECOND_HALF};

/// Digests an origin sends after its last publish before falling silent: tail loss goes
/// unnoticed only if all of them are lost too.
pub(super) const DIGEST_REPEATS: u8 = 5;

/// Of those rounds, the first ones reach zones reached through relays (one relay per
/// zone per round, which tells its whole zone: nine in ten of a large cluster's digest
/// rounds) while links lose nothing, as far as this node can tell: it neither asked
/// for a repair nor was asked for one within [`LOSS_MEMORY`]. After loss every round
/// goes. A node that loses the newest entries and every digest learns it from its next
/// member-table exchange instead.
const RELAYED_DIGEST_ROUNDS: u8 = 3;

/// How long a repair request, sent or received, keeps a node sending every digest
/// round.
const LOSS_MEMORY: Duration = Duration::from_secs(60);
/// Retransmission backoff stops doubling here.
const MAX_RETRANSMIT_BACKOFF: Duration = Duration::from_secs(1);
/// Entries one repair request is answered with at most, so that a small request cannot
/// make the origin send its whole retention.
const MAX_REPAIR_ENTRIES: usize = 1024;

/// SipHash with fixed keys: the same on every run.
type FixedHasher = BuildHasherDefault<DefaultHasher>;

/// One invalidation waiting for the next batch.
struct Pending {
    invalidation: Invalidation,
    awaits: Vec<AwaitId>,
}

/// An entry some awaited publish waits on: who acknowledged it so far.
struct Flight {
    acked: BTreeMap<NodeId, Zone>,
    awaits: Vec<AwaitId>,
    sent_at: Instant,
    retry_at: Instant,
    backoff: Duration,
}

struct Await {
    goal: Goal,
    /// The entry's sequence number, once it left in a batch.
    seq: Option<u64>,
    deadline: TimerKey,
}

/// The last `capacity` entries this node published, encoded, by sequence number,
/// back to back in one buffer: no allocation per entry on the publish path.
struct Retention {
    /// Sequence number of the oldest retained entry.
    first: u64,
    bytes: Vec<u8>,
    /// Where the oldest retained entry starts in `bytes`; what lies before it is
    /// dropped once it is the larger part of the buffer.
    start: usize,
    /// Where each retained entry ends in `bytes`, oldest first.
    ends: VecDeque<usize>,
    capacity: usize,
}

impl Retention {
    fn new(capacity: usize) -> Retention {
        Retention {
            first: 1,
            bytes: Vec::new(),
            start: 0,
            ends: VecDeque::new(),
            capacity,
        }
    }

    fn push(&mut self, entry: &[u8]) {
        if self.ends.len() == self.capacity {
            match self.ends.pop_front() {
                Some(end) => self.start = end,
                // A capacity of zero retains nothing.
                None => return self.first += 1,
            }
            self.first += 1;
        }
        if self.start > self.bytes.len() / 2 {
            self.compact();
        }
        self.bytes.extend_from_slice(entry);
        self.ends.push_back(self.bytes.len());
    }

    /// Drops the bytes of entries no longer retained, and gives memory back once the
    /// buffer has room for four times what it holds (after a burst of large entries),
    /// keeping room for twice as much, so that the next few pushes do not grow it again.
    fn compact(&mut self) {
        let dropped = self.start;
        self.bytes.drain(..dropped);
        for end in &mut self.ends {
            *end -= dropped;
        }
        self.start = 0;
        if self.bytes.capacity() > Self::KEPT_ROOM.max(4 * self.bytes.len()) {
            self.bytes
                .shrink_to(Self::KEPT_ROOM.max(2 * self.bytes.len()));
        }
    }

    /// Room the buffer keeps however little it holds: shrinking below it saves too
    /// little to be worth the copy.
    const KEPT_ROOM: usize = 64 * 1024;

    fn get(&self, seq: u64) -> Option<&[u8]> {
        let index = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        let end = *self.ends.get(index)?;
        let start = match index {
            0 => self.start,
            _ => self.ends[index - 1],
        };
        self.bytes.get(start..end)
    }
}

/// Everything the origin side keeps.
pub(super) struct Outgoing {
    pending: Vec<Pending>,
    /// Where the newest pending entry of each (kind, key) hash is in `pending`, for
    /// coalescing; the entry is compared in full before it is coalesced, so a hash
    /// collision only costs a missed coalescing. Looked up, never iterated, so its hash
    /// order cannot reach behaviour; the hasher has fixed keys.
    pending_index: HashMap<u64, usize, FixedHasher>,
    next_seq: u64,
    retention: Retention,
    flights: BTreeMap<u64, Flight>,
    awaits: BTreeMap<AwaitId, Await>,
    next_await: u64,
    digests_left: u8,
    /// The digest slot of the current rounds' first: round r takes the relays of slot
    /// `first_round_slot + r - 1`.
    first_round_slot: u64,
    /// Per member, the first sequence number it is owed. Kept when a member goes
    /// down, so that one coming back after a partition is still owed what it missed.
    owed_from: BTreeMap<NodeId, u64>,
    /// When recent batches left, with their first sequence number, for `join_grace`.
    recent: VecDeque<(Instant, u64)>,
    /// Members that still need to be told, in digests of their own, the first sequence
    /// number they are owed; with how many such digests remain.
    needs_first: BTreeMap<NodeId, u8>,
    /// When this node last saw loss on its links: a member asked it to repair entries,
    /// or it asked an origin to. Keeps every digest round going for [`LOSS_MEMORY`].
    loss_seen_at: Option<Instant>,
    /// Smoothed round trip from sending an awaited entry to its first acknowledgement.
    srtt: Option<Duration>,
}

impl Outgoing {
    #[cfg(test)]
    pub(super) fn debug_sizes(&self) -> (usize, usize, usize) {
        (self.recent.len(), self.flights.len(), self.owed_from.len())
    }

    pub(super) fn awaits_in_flight(&self) -> usize {
        self.awaits.len()
    }

    pub(super) fn new(retention: usize) -> Outgoing {
        Outgoing {
            pending: Vec::new(),
            pending_index: HashMap::default(),
            next_seq: 1,
            retention: Retention::new(retention),
            flights: BTreeMap::new(),
            awaits: BTreeMap::new(),
            next_await: 1,
            digests_left: 0,
            first_round_slot: 0,
            owed_from: BTreeMap::new(),
            recent: VecDeque::new(),
            needs_first: BTreeMap::new(),
            loss_seen_at: None,
            srtt: None,
        }
    }

    /// Forgets batches older than `horizon`: a member joining now is not owed them.
    fn trim_recent(&mut self, horizon: Instant) {
        while self.recent.front().is_some_and(|(at, _)| *at < horizon) {
            self.recent.pop_front();
        }
    }
}

/// A member to send a digest of its own to: its id, its address, and whether it is
/// in this node's zone.
type Recipient = (NodeId, SocketAddr, bool);

/// Where one batch goes: straight to some members, through relays to the rest. Relays
/// are chosen from the zones' rosters when the plan is used, so a plan holds only
/// while membership does not change: it is made and used within one input.
struct FanoutPlan {
    /// This zone and small zones, in zone order.
    direct: Vec<SocketAddr>,
    /// The small zones' part of `direct`: the members reached directly elsewhere.
    direct_elsewhere: Vec<SocketAddr>,
    /// The other zones, reached through relays, in zone order.
    relay_zones: Vec<Zone>,
    /// The members foca suspects, which are relays only when nothing else is left;
    /// usually none.
    suspects: BTreeSet<SocketAddr>,
}

/// Does `acked` meet `goal`?
fn goal_met(goal: Goal, acked: &BTreeMap<NodeId, Zone>) -> bool {
    match goal {
        Goal::Replicas(n) => acked.len() >= n,
        Goal::Zones(m) => acked.values().collect::<BTreeSet<_>>().len() >= m,
    }
}

fn acks_of(acked: &BTreeMap<NodeId, Zone>) -> Acks {
    Acks {
        nodes: acked.keys().copied().collect(),
        zones: acked
            .values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    }
}

impl Node {
    /// Adds an invalidation to the next batch, or merges it with an identical one
    /// already waiting.
    pub(super) fn enqueue(
        &mut self,
        invalidation: Invalidation,
        await_id: Option<AwaitId>,
    ) -> Result<Published, PublishError> {
        if self.left {
            return Err(PublishError::Closed);
        }
        self.limits.check(&invalidation)?;
        let slot = FixedHasher::default().hash_one((invalidation.kind, &invalidation.key));
        let outgoing = &mut self.outgoing;
        let same = |pending: &Pending| {
            pending.invalidation.kind == invalidation.kind
                && pending.invalidation.key == invalidation.key
        };
        if let Some(&index) = outgoing.pending_index.get(&slot)
            && same(&outgoing.pending[index])
        {
            let pending = &mut outgoing.pending[index];
            // The newer metadata wins, but a global publish stays global.
            let scope = pending.invalidation.scope.max(invalidation.scope);
            pending.invalidation = Invalidation {
                scope,
                ..invalidation
            };
            pending.awaits.extend(await_id);
            self.stats.coalesced += 1;
            return Ok(Published::Coalesced);
        }
        outgoing.pending_index.insert(slot, outgoing.pending.len());
        outgoing.pending.push(Pending {
            invalidation,
            awaits: await_id.into_iter().collect(),
        });
        self.stats.published += 1;
        Ok(Published::Queued)
    }

    /// Starts tracking an awaited publish.
    pub(super) fn begin_await(
        &mut self,
        goal: Goal,
        deadline: Instant,
    ) -> Result<AwaitId, PublishError> {
        let outgoing = &mut self.outgoing;
        if outgoing.awaits.len() >= self.config.max_awaits {
            return Err(PublishError::TooManyAwaits);
        }
        let id = AwaitId(outgoing.next_await);
        outgoing.next_await += 1;
        if goal.required() == 0 {
            let outcome = Ok(Acks::default());
            self.events.push_back(Event::AwaitDone { id, outcome });
            return Ok(id);
        }
        let deadline = self.timers.set(deadline, Wake::AwaitDeadline(id));
        outgoing.awaits.insert(
            id,
            Await {
                goal,
                seq: None,
                deadline,
            },
        );
        Ok(id)
    }

    /// Stops tracking `id` without an event.
    pub(super) fn forget_await(&mut self, id: AwaitId) {
        let outgoing = &mut self.outgoing;
        let Some(tracked) = outgoing.awaits.remove(&id) else {
            return;
        };
        self.timers.cancel(tracked.deadline);
        let Some(seq) = tracked.seq else {
            return;
        };
        if let Some(flight) = outgoing.flights.get_mut(&seq) {
            flight.awaits.retain(|other| *other != id);
            if flight.awaits.is_empty() {
                outgoing.flights.remove(&seq);
            }
        }
    }

    /// Ends `id` with `outcome`.
    fn finish_await(&mut self, id: AwaitId, outcome: Result<Acks, AwaitFailure>) {
        if self.outgoing.awaits.contains_key(&id) {
            self.forget_await(id);
            self.events.push_back(Event::AwaitDone { id, outcome });
        }
    }

    /// How many replicas (or zones) `goal` could still count: those in `acked` plus
    /// every live member.
    pub(super) fn reachable(&self, goal: Goal, acked: &BTreeMap<NodeId, Zone>) -> usize {
        let live = self.by_id.iter().filter(|(id, _)| !acked.contains_key(*id));
        match goal {
            Goal::Replicas(_) => acked.len() + live.count(),
            Goal::Zones(_) => {
                let live_zones = live.map(|(_, member)| &member.zone);
                acked
                    .values()
                    .chain(live_zones)
                    .collect::<BTreeSet<_>>()
                    .len()
            }
        }
    }

    fn acked_for(&self, id: AwaitId) -> BTreeMap<NodeId, Zone> {
        let seq = self.outgoing.awaits.get(&id).and_then(|a| a.seq);
        let flight = seq.and_then(|seq| self.outgoing.flights.get(&seq));
        flight.map(|f| f.acked.clone()).unwrap_or_default()
    }

    pub(super) fn expire_await(&mut self, id: AwaitId) {
        let acked = acks_of(&self.acked_for(id));
        self.finish_await(id, Err(AwaitFailure::Timeout { acked }));
    }

    /// Fails every awaited publish that the live members can no longer satisfy.
    pub(super) fn fail_unreachable_awaits(&mut self) {
        let ids: Vec<(AwaitId, Goal)> = self
            .outgoing
            .awaits
            .iter()
            .map(|(id, a)| (*id, a.goal))
            .collect();
        for (id, goal) in ids {
            let acked = self.acked_for(id);
            let available = self.reachable(goal, &acked);
            if available < goal.required() {
                let acked = acks_of(&acked);
                self.finish_await(id, Err(AwaitFailure::Unreachable { acked, available }));
            }
        }
    }

    /// Fails every awaited publish because this node is leaving.
    pub(super) fn fail_all_awaits(&mut self) {
        let ids: Vec<AwaitId> = self.outgoing.awaits.keys().copied().collect();
        for id in ids {
            let acked = acks_of(&self.acked_for(id));
            self.finish_await(id, Err(AwaitFailure::Closed { acked }));
        }
    }

    /// Packs every pending invalidation into as few datagrams as fit and sends them
    /// out: to every member of this zone, and through relays to the other zones.
    pub(super) fn flush_pending(&mut self) {
        if self.outgoing.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.outgoing.pending);
        self.outgoing.pending_index.clear();
        let first_seq = self.outgoing.next_seq;
        let count = pending.len();
        // The entries back to back, and where each ends.
        let mut encoded = Vec::new();
        let mut ends = Vec::with_capacity(count);
        for (offset, entry) in pending.into_iter().enumerate() {
            let seq = first_seq + offset as u64;
            // Only an entry someone still waits on asks receivers to acknowledge.
            let ack = self.open_flight(seq, entry.awaits);
            wire::encode_entry(&entry.invalidation, ack, &mut encoded);
            ends.push(encoded.len());
            self.events.push_back(Event::Delivered(Delivery {
                origin: self.local.id,
                zone: Some(self.local.zone.clone()),
                invalidation: entry.invalidation,
            }));
        }
        self.outgoing.next_seq += count as u64;
        let plan = self.fanout_plan();
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let slices: Vec<&[u8]> = starts.zip(&ends).map(|(a, &b)| &encoded[a..b]).collect();
        for datagram in self.build_batches(first_seq, &slices) {
            self.disseminate(&plan, datagram);
        }
        for entry in &slices {
            self.outgoing.retention.push(entry);
        }
        let horizon = self.grace_horizon();
        self.outgoing.trim_recent(horizon);
        // One mark per sixteenth of the grace period is precise enough (a joiner is
        // owed slightly more, never less) and keeps this list short at any rate.
        let spacing = self.config.join_grace / 16;
        let last_mark = self.outgoing.recent.back().map(|(at, _)| *at);
        if last_mark.is_none_or(|at| at + spacing <= self.now) {
            self.outgoing.recent.push_back((self.now, first_seq));
        }
        self.outgoing.digests_left = DIGEST_REPEATS;
        let at = self.now + self.config.digest_interval;
        self.timers.set_shared(at, Wake::Digest);
    }

    /// Starts tracking acknowledgements of entry `seq` for the awaits still waiting on
    /// it; false when none is.
    fn open_flight(&mut self, seq: u64, awaits: Vec<AwaitId>) -> bool {
        let outgoing = &mut self.outgoing;
        let awaits: Vec<AwaitId> = awaits
            .into_iter()
            .filter(|id| match outgoing.awaits.get_mut(id) {
                Some(tracked) => {
                    tracked.seq = Some(seq);
                    true
                }
                None => false,
            })
            .collect();
        if awaits.is_empty() {
            return false;
        }
        let backoff = self.retransmit_delay();
        let retry_at = self.now + backoff;
        let flight = Flight {
            acked: BTreeMap::new(),
            awaits,
            sent_at: self.now,
            retry_at,
            backoff,
        };
        self.outgoing.flights.insert(seq, flight);
        self.timers.set_shared(retry_at, Wake::Retransmit);
        true
    }

    /// How long to wait for acknowledgements before sending again: the configured
    /// minimum, or twice the measured round trip on slower links, so that a long round
    /// trip does not make every remote node look silent.
    fn retransmit_delay(&self) -> Duration {
        let floor = self.config.retransmit_after;
        self.outgoing.srtt.map_or(floor, |srtt| {
            (srtt * 2).clamp(floor, MAX_RETRANSMIT_BACKOFF)
        })
    }

    /// Groups live members by zone: this zone and small zones get batches directly,
    /// larger zones through `relays_per_zone` relays, avoiding suspected members.
    fn fanout_plan(&self) -> FanoutPlan {
        self.fanout_plan_with(true)
    }

    /// A [`fanout_plan`](Self::fanout_plan), or, unless `relaying`, only its direct
    /// part: then no zone is reached through relays, and no suspect need be looked for
    /// (a pass over foca's table).
    fn fanout_plan_with(&self, relaying: bool) -> FanoutPlan {
        let suspects = if relaying {
            self.swim
                .iter_membership_state()
                .filter(|member| member.state() == foca::State::Suspect)
                .map(|member| member.id().addr)
                .collect()
        } else {
            BTreeSet::new()
        };
        let mut plan = FanoutPlan {
            direct: Vec::new(),
            direct_elsewhere: Vec::new(),
            relay_zones: Vec::new(),
            suspects,
        };
        for (zone, roster) in &self.zones {
            if *zone == self.local.zone {
                plan.direct.extend(roster.addrs());
            } else if roster.len() <= self.config.relays_per_zone {
                plan.direct.extend(roster.addrs());
                plan.direct_elsewhere.extend(roster.addrs());
            } else if relaying {
                plan.relay_zones.push(zone.clone());
            }
        }
        plan
    }

    fn disseminate(&mut self, plan: &FanoutPlan, datagram: Bytes) {
        for &addr in &plan.direct {
            self.queue_transmit(addr, datagram.clone());
        }
        if plan.relay_zones.is_empty() {
            return;
        }
        // While this node sees no loss, two relays of a zone each forward to half of
        // it: every member gets one copy rather than two. After loss, each forwards to
        // the whole zone, for a second path to every member; so does a lone relay, or
        // a third.
        // The half copies are made only when they can go.
        let whole = wire::with_relay_flags(&datagram, FLAG_FORWARD);
        let halves = (!self.seen_loss_lately()).then(|| {
            [FLAG_HALF, FLAG_HALF | FLAG_SECOND_HALF]
                .map(|half| wire::with_relay_flags(&datagram, FLAG_FORWARD | half))
        });
        for zone in &plan.relay_zones {
            let (relays, healthy) = self.choose_relays(zone, &plan.suspects);
            // A suspected relay (a zone with fewer than two healthy members) may be
            // dead: it gets no half of its own to drop.
            let halves = halves.as_ref().filter(|_| healthy >= 2);
            for (index, relay) in relays.into_iter().enumerate() {
                let copy = halves
                    .and_then(|halves| halves.get(index))
                    .unwrap_or(&whole);
                self.queue_transmit(relay, copy.clone());
            }
        }
    }

    /// Picks `relays_per_zone` relays of `zone` at random, members not in `suspects`
    /// first, so load spreads; returns them and how many members of the zone are not
    /// suspected. A zone gone since the plan was made (never, within one input) has
    /// none.
    fn choose_relays(
        &mut self,
        zone: &Zone,
        suspects: &BTreeSet<SocketAddr>,
    ) -> (Vec<SocketAddr>, usize) {
        let wanted = self.config.relays_per_zone;
        let mut chosen = Vec::with_capacity(wanted);
        let Some(roster) = self.zones.get(zone) else {
            return (chosen, 0);
        };
        if !roster.any_in(suspects) {
            roster::choose_from(roster.addrs(), wanted, &mut self.rng, &mut chosen);
            return (chosen, roster.len());
        }
        let (suspected, healthy): (Vec<SocketAddr>, Vec<SocketAddr>) = roster
            .addrs()
            .iter()
            .partition(|addr| suspects.contains(addr));
        for pool in [&healthy, &suspected] {
            roster::choose_from(pool, wanted, &mut self.rng, &mut chosen);
        }
        (chosen, healthy.len())
    }

    /// Sends awaited entries again to every live member that has not acknowledged.
    pub(super) fn retransmit_due(&mut self) {
        let now = self.now;
        let mut per_target: BTreeMap<SocketAddr, Vec<u64>> = BTreeMap::new();
        for (seq, flight) in &mut self.outgoing.flights {
            if flight.retry_at > now {
                continue;
            }
            for member in self.members.values() {
                if !flight.acked.contains_key(&member.id) {
                    per_target.entry(member.addr).or_default().push(*seq);
                }
            }
            flight.backoff = (flight.backoff * 2).min(MAX_RETRANSMIT_BACKOFF);
            flight.retry_at = now + flight.backoff;
        }
        for (target, seqs) in per_target {
            self.send_retained(target, &seqs);
        }
        if let Some(next) = self.outgoing.flights.values().map(|f| f.retry_at).min() {
            self.timers.set_shared(next, Wake::Retransmit);
        }
    }

    fn build_batches(&self, first_seq: u64, entries: &[&[u8]]) -> Vec<Bytes> {
        let (cluster, origin) = (self.cluster, self.local.id);
        let size = self.config.datagram_budget();
        wire::build_batches(
            cluster,
            origin,
            first_seq,
            entries,
            size,
            self.config.compress,
        )
    }

    /// Sends the retained entries `seqs` (ascending) to `target` directly.
    fn send_retained(&mut self, target: SocketAddr, seqs: &[u64]) {
        let mut runs: Vec<(u64, Vec<&[u8]>)> = Vec::new();
        for &seq in seqs {
            let Some(entry) = self.outgoing.retention.get(seq) else {
                continue;
            };
            match runs.last_mut() {
                Some((first, entries)) if *first + entries.len() as u64 == seq => {
                    entries.push(entry)
                }
                _ => runs.push((seq, vec![entry])),
            }
        }
        let mut datagrams = Vec::new();
        let mut resent = 0;
        for (first, entries) in runs {
            resent += entries.len() as u64;
            datagrams.extend(self.build_batches(first, &entries));
        }
        self.stats.retransmitted += resent;
        for datagram in datagrams {
            self.queue_transmit(target, datagram);
        }
    }

    pub(super) fn receive_ack(&mut self, from: SocketAddr, body: &[u8]) {
        let (acker, seqs) = match wire::decode_ack(body) {
            Ok(ack) => ack,
            Err(error) => return self.count_decode_error(from, error),
        };
        let Some(zone) = self.by_id.get(&acker).map(|m| m.zone.clone()) else {
            self.stats.dropped.unknown_peer += 1;
            return;
        };
        let mut met = Vec::new();
        for seq in seqs {
            let Some(flight) = self.outgoing.flights.get_mut(&seq) else {
                continue;
            };
            if flight.acked.insert(acker, zone.clone()).is_some() {
                continue;
            }
            self.stats.acks_received += 1;
            if flight.acked.len() == 1 {
                let sample = self.now.saturating_duration_since(flight.sent_at);
                let srtt = &mut self.outgoing.srtt;
                *srtt = Some(srtt.map_or(sample, |old| (old * 7 + sample) / 8));
            }
            for id in &flight.awaits {
                let goal = self.outgoing.awaits.get(id).map(|a| a.goal);
                if goal.is_some_and(|goal| goal_met(goal, &flight.acked)) {
                    met.push((*id, acks_of(&flight.acked)));
                }
            }
        }
        for (id, acks) in met {
            self.finish_await(id, Ok(acks));
        }
    }

    /// Answers a repair request from what is retained, and says what is gone.
    pub(super) fn receive_repair(&mut self, from: SocketAddr, body: &[u8]) {
        let (origin, ranges) = match wire::decode_repair(body) {
            Ok(request) => request,
            Err(error) => return self.count_decode_error(from, error),
        };
        // Answer members only: an answer is far larger than a request, and must not be
        // aimed at an address a forger names.
        if origin != self.local.id || !self.members.contains_key(&from) {
            self.stats.dropped.unknown_peer += 1;
            return;
        }
        if ranges.is_empty() {
            return self.tell_where_it_starts(from);
        }
        self.note_loss();
        let oldest = self.outgoing.retention.first;
        let newest = self.outgoing.next_seq - 1;
        let mut seqs = Vec::new();
        let mut gone = false;
        // A request reaching this node's newest entry (a receiver probing past the
        // end it knows, on a peer's word) also gets a digest: if the entries are lost
        // on the way, the digest still opens the hole, which is then repaired or given
        // up with a resync like any other.
        if newest > 0 && ranges.iter().any(|&(_, to_seq)| to_seq >= newest) {
            let datagram = wire::encode_digest(self.cluster, self.digest(0));
            self.queue_transmit(from, datagram);
        }
        for (from_seq, to_seq) in ranges {
            gone |= from_seq < oldest;
            let wanted = from_seq.max(oldest)..=to_seq.min(newest);
            let room = MAX_REPAIR_ENTRIES - seqs.len();
            seqs.extend(wanted.take(room));
        }
        debug!(peer = %from, entries = seqs.len(), gone, "serving a repair");
        if gone {
            let datagram = wire::encode_gone(self.cluster, self.local.id, oldest);
            self.queue_transmit(from, datagram);
        }
        seqs.sort_unstable();
        seqs.dedup();
        self.send_retained(from, &seqs);
    }

    /// The oldest moment a member joining now could have known this node from.
    fn grace_horizon(&self) -> Instant {
        let grace = time::nanos(self.config.join_grace);
        Instant::from_nanos(self.now.as_nanos().saturating_sub(grace))
    }

    /// Records what a new member is owed: every entry from here on, and those published
    /// within `join_grace` before. If that includes entries already sent, digests tell
    /// the member so it can repair them. Otherwise, if this node published before,
    /// digests of the member's own tell it where it starts all the same, the first at
    /// once and the rest every `digest_interval`: a member hearing that first at a
    /// later publish, past its own `join_grace`, could not tell the entries before it
    /// from ones it missed while running, and would have to resync.
    pub(super) fn owe_from_now(&mut self, member: &crate::identity::Member) {
        let horizon = self.grace_horizon();
        let outgoing = &mut self.outgoing;
        outgoing.trim_recent(horizon);
        let grace_start = outgoing
            .recent
            .front()
            .map_or(outgoing.next_seq, |(_, seq)| *seq);
        let first = match outgoing.owed_from.get(&member.id) {
            // Back after a partition or a false death: still owed everything since.
            Some(&earlier) => earlier.min(grace_start),
            None => grace_start,
        };
        outgoing.owed_from.insert(member.id, first);
        // Before this node's first publish the member is owed the whole stream, and its
        // first entry says where that starts: nothing comes before it. A member that
        // loses that entry hears of the stream from a later entry, a shared digest or
        // a peer's progress, and asks. So only members joining after a publish need
        // digests of their own (at a cluster's start, a thousand of them per member).
        if outgoing.next_seq > 1 {
            outgoing.needs_first.insert(member.id, DIGEST_REPEATS);
        }
        if outgoing.owed_from.len() > self.config.max_origins {
            let gone = outgoing
                .owed_from
                .keys()
                .copied()
                .find(|id| !self.by_id.contains_key(id));
            if let Some(gone) = gone {
                outgoing.owed_from.remove(&gone);
                outgoing.needs_first.remove(&gone);
            }
        }
        // Only the member hears of it: the others are owed nothing new, and rounds to
        // every member here would restart with each member that comes back (millions of
        // digests when a partition of a thousand nodes heals).
        if outgoing.next_seq > 1 {
            self.send_digest_to(member.id, member.addr);
            self.schedule_next_digest();
        }
    }

    /// Answers a member that asks where its part of this node's stream starts (a
    /// repair request naming no range): a digest of its own. Members ask when a peer
    /// follows this node's stream and they never heard a single entry or digest of it.
    fn tell_where_it_starts(&mut self, from: SocketAddr) {
        let Some(id) = self.members.get(&from).map(|m| m.id) else {
            return;
        };
        if self.outgoing.next_seq > 1 {
            self.send_digest_to(id, from);
        }
    }

    fn digest(&self, first: u64) -> wire::Digest {
        let next = self.outgoing.next_seq;
        wire::Digest {
            origin: self.local.id,
            last: next - 1,
            first: first.min(next),
        }
    }

    /// A digest of this member's own, naming the first entry it is owed.
    fn send_digest_to(&mut self, id: NodeId, addr: SocketAddr) {
        let in_zone = self.zone_peers.contains(&addr);
        self.send_digests_to(&[(id, addr, in_zone)]);
    }

    /// Digests of their own to `members` (each with whether it is in this node's
    /// zone), in order. Members owed from the same entry (most of a zone, usually)
    /// share one encoded datagram.
    fn send_digests_to(&mut self, members: &[Recipient]) {
        let next = self.outgoing.next_seq;
        let mut encoded: Option<(u64, Bytes)> = None;
        for &(id, addr, in_zone) in members {
            let first = self.outgoing.owed_from.get(&id).copied().unwrap_or(next);
            let first = first.max(1);
            let datagram = match &encoded {
                Some((shared, datagram)) if *shared == first => datagram.clone(),
                _ => {
                    let datagram = wire::encode_digest(self.cluster, self.digest(first));
                    encoded = Some((first, datagram.clone()));
                    datagram
                }
            };
            self.push_transmit(addr, datagram, in_zone);
            if let Some(remaining) = self.outgoing.needs_first.get_mut(&id) {
                *remaining = remaining.saturating_sub(1);
                if *remaining == 0 {
                    self.outgoing.needs_first.remove(&id);
                }
            }
        }
    }

    /// Loss seen on this node's links: its digests go in every round for a while.
    pub(super) fn note_loss(&mut self) {
        self.outgoing.loss_seen_at = Some(self.now);
    }

    /// Whether this node asked for a repair, or was asked for one, within
    /// [`LOSS_MEMORY`].
    pub(super) fn seen_loss_lately(&self) -> bool {
        self.outgoing
            .loss_seen_at
            .is_some_and(|at| self.now < at + LOSS_MEMORY)
    }

    /// This node's newest sequence number (0 before its first publish).
    pub(super) fn last_published(&self) -> u64 {
        self.outgoing.next_seq - 1
    }

    /// Tells members this node's newest sequence number, so loss of the latest entries
    /// shows. Members of this zone, and members anywhere that joined recently (after
    /// this node first published), get a digest of their own naming where they start;
    /// other zones get one shared digest through their relays, like a batch.
    pub(super) fn send_digest(&mut self) {
        if self.outgoing.next_seq == 1 {
            return;
        }
        if self.outgoing.digests_left == 0 {
            return self.send_digests_to_joiners();
        }
        self.outgoing.digests_left -= 1;
        let round = DIGEST_REPEATS - self.outgoing.digests_left;
        if round == 1 {
            self.outgoing.first_round_slot = self.digest_slot();
        }
        let relayed = self.seen_loss_lately() || round <= RELAYED_DIGEST_ROUNDS;
        let own_zone = self.local.zone.clone();
        // This zone's members, and joiners anywhere, in id order (sorted below).
        let mut personal: Vec<Recipient> = self
            .zone_peers
            .iter_unordered()
            .map(|(addr, id)| (*id, *addr, true))
            .chain(
                self.outgoing
                    .needs_first
                    .keys()
                    .filter_map(|id| self.by_id.get(id))
                    .filter(|m| m.zone != own_zone)
                    .map(|m| (m.id, m.addr, false)),
            )
            .collect();
        personal.sort_unstable();
        self.send_digests_to(&personal);
        let plan = self.fanout_plan_with(relayed);
        // A plan made without relaying names no relay zone.
        if !plan.relay_zones.is_empty() {
            // One relay per zone per round, a different one each round: the rounds give
            // the zone as many paths while costing one copy each.
            let shared = wire::encode_digest(self.cluster, self.digest(0));
            let forward = wire::with_relay_flags(&shared, wire::FLAG_FORWARD);
            // Counted from the first round rather than read off the clock: a round that
            // fires late (as a real timer does) would otherwise skip a slot, and its
            // rounds could reuse a relay of a three-member zone.
            let slot = self.outgoing.first_round_slot + u64::from(round - 1);
            for zone in &plan.relay_zones {
                let roster = self.zones.get(zone);
                if let Some(relay) = roster.and_then(|r| r.digest_relay(&plan.suspects, slot)) {
                    self.queue_transmit(relay, forward.clone());
                }
            }
        }
        // Small zones are reached directly, without relays.
        // Joiners had theirs among the personal ones.
        let direct: Vec<SocketAddr> = plan
            .direct_elsewhere
            .iter()
            .copied()
            .filter(|addr| {
                self.members
                    .get(addr)
                    .is_some_and(|m| !self.outgoing.needs_first.contains_key(&m.id))
            })
            .collect();
        if !direct.is_empty() {
            let shared = wire::encode_digest(self.cluster, self.digest(0));
            for addr in direct {
                self.queue_transmit(addr, shared.clone());
            }
        }
        self.schedule_next_digest();
    }

    /// Between publishes, members that joined recently still get their digests of
    /// their own, every `digest_interval` until each had its share: a joiner that
    /// missed the first would otherwise learn where it starts only at this node's next
    /// publish, past its `join_grace`, and have to resync.
    fn send_digests_to_joiners(&mut self) {
        // Members gone before they had their share get nothing more.
        let by_id = &self.by_id;
        let own_zone = &self.local.zone;
        let mut joiners: Vec<Recipient> = Vec::new();
        self.outgoing.needs_first.retain(|id, _| {
            let member = by_id.get(id);
            joiners.extend(member.map(|m| (m.id, m.addr, m.zone == *own_zone)));
            member.is_some()
        });
        self.send_digests_to(&joiners);
        self.schedule_next_digest();
    }

    /// The number of whole `digest_interval`s on this node's clock: the slot whose
    /// relays a first digest round takes (see [`roster::ZoneRoster::digest_relay`]).
    fn digest_slot(&self) -> u64 {
        self.now.as_nanos() / time::nanos(self.config.digest_interval).max(1)
    }

    /// Digest rounds continue while a publish's rounds remain or a joiner still needs
    /// to hear where it starts.
    fn schedule_next_digest(&mut self) {
        if self.outgoing.digests_left > 0 || !self.outgoing.needs_first.is_empty() {
            let at = self.now + self.config.digest_interval;
            self.timers.set_shared(at, Wake::Digest);
        }
    }

    /// Before leaving: every member gets a digest of its own, so it can tell whether it
    /// has everything; what it lacks then becomes a resync when this node is gone,
    /// instead of going unnoticed.
    pub(super) fn send_final_digests(&mut self) {
        if self.outgoing.next_seq == 1 {
            return;
        }
        let own_zone = &self.local.zone;
        let members: Vec<Recipient> = self
            .by_id
            .values()
            .map(|m| (m.id, m.addr, m.zone == *own_zone))
            .collect();
        self.send_digests_to(&members);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest() {
        let mut retention = Retention::new(2);
        for entry in [&[1u8][..], &[2, 2], &[3, 3, 3]] {
            retention.push(entry);
        }
        assert_eq!(retention.get(1), None);
        assert_eq!(retention.get(2), Some(&[2u8, 2][..]));
        assert_eq!(retention.get(3), Some(&[3u8, 3, 3][..]));
        assert_eq!(retention.get(4), None);
        // Long after the first entries were dropped, the buffer holds about the
        // retained entries only, and each still reads back whole.
        for n in 4..1_000u64 {
            let entry = vec![n as u8; (n % 7) as usize + 1];
            retention.push(&entry);
            assert_eq!(retention.get(n), Some(&entry[..]));
            assert_eq!(retention.get(n - 2), None);
        }
        assert!(
            retention.bytes.len() <= 4 * 8,
            "{} bytes",
            retention.bytes.len()
        );
        // After a burst of large entries, small ones give the memory back.
        let mut retention = Retention::new(100);
        for _ in 0..100 {
            retention.push(&[7; 60_000]);
        }
        for n in 0..200u8 {
            retention.push(&[n; 10]);
        }
        assert!(
            retention.bytes.capacity() <= 64 * 1024,
            "{} bytes of room",
            retention.bytes.capacity()
        );
        assert_eq!(retention.get(300), Some(&[199u8; 10][..]));
        let mut none = Retention::new(0);
        none.push(&[1]);
        assert_eq!((none.get(1), none.first), (None, 2));
    }

    #[test]
    fn zone_goals_count_distinct_zones() {
        let zone = |name: &str| Zone::new(name).unwrap();
        let acked = BTreeMap::from([
            (NodeId(1), zone("a")),
            (NodeId(2), zone("a")),
            (NodeId(3), zone("b")),
        ]);
        assert!(goal_met(Goal::Replicas(3), &acked));
        assert!(goal_met(Goal::Zones(2), &acked));
        assert!(!goal_met(Goal::Zones(3), &acked));
        assert_eq!(acks_of(&acked).zones, [zone("a"), zone("b")]);
    }
}
