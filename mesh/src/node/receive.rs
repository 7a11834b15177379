//! The receiver side: delivery, relaying within the zone, acknowledgements, repair
//! requests, digests and giving up what cannot be repaired.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::{trace, warn};

use super::Node;
use crate::event::{Delivery, Event};
use crate::identity::NodeId;
use crate::origins::Receipt;
use crate::timers::Wake;
use crate::wire::{self, FLAG_FORWARD, FLAG_HALF, FLAG_SECOND_HALF, Header};

/// Ranges one repair request names at most; more wait for the next request.
const MAX_REPAIR_RANGES: usize = 64;
/// Entries held past holes across all origins at most (a few hundred kilobytes); past
/// it, the origin holding the most gives its holes up. Bounds what out-of-order or
/// forged sequence numbers can make a node keep.
const MAX_ENTRIES_PAST_GAPS: usize = 16_384;
/// Times a node asks an origin where its part of a stream first heard past the start
/// begins, while no answer comes; as many as the digests that would otherwise have told it.
const START_ASKS_PER_STREAM: u8 = super::publish::DIGEST_REPEATS;
/// Repair requests and hole deadlines are served by scans over every stream, at
/// instants on this grid: holes in a thousand streams (a node back from a partition)
/// then cost a scan every few milliseconds, not a scan per stream per round.
const SCAN_GRID: Duration = Duration::from_millis(5);

impl Node {
    pub(super) fn receive_batch(
        &mut self,
        from: SocketAddr,
        header: &Header,
        datagram: &[u8],
        body: &[u8],
    ) {
        let decoded = wire::data_body(header, body).and_then(|body| wire::decode_batch(&body));
        let batch = match decoded {
            Ok(batch) => batch,
            Err(error) => return self.count_decode_error(from, error),
        };
        if !self.accept_relayed(from, header, batch.origin, datagram) {
            return;
        }
        let now = self.now;
        let by_id = &self.by_id;
        let live = || by_id.contains_key(&batch.origin);
        let (mut stream, evicted) = self
            .origins
            .stream(batch.origin, batch.first_seq, now, live);
        let zone = stream.zone(|| by_id.get(&batch.origin).map(|m| m.zone.clone()));
        let mut owed = Vec::new();
        for (offset, entry) in batch.entries.into_iter().enumerate() {
            let seq = batch.first_seq + offset as u64;
            // A retransmission may be the answer to a lost ack: acknowledge again.
            if entry.ack {
                owed.push(seq);
            }
            match stream.receive(seq, now) {
                Receipt::Duplicate => self.stats.duplicates += 1,
                Receipt::New => {
                    self.stats.received += 1;
                    self.events.push_back(Event::Delivered(Delivery {
                        origin: batch.origin,
                        zone: zone.clone(),
                        invalidation: entry.invalidation,
                    }));
                }
            }
        }
        let past_gap = stream.entries_past_gap();
        let overflowing = past_gap as u64 > self.config.reorder_window;
        let missed = if overflowing {
            stream.give_up_gaps()
        } else {
            0
        };
        stream.plan_repair(now + self.config.repair_delay);
        let watch = stream.wants_watch(self.config.gap_timeout);
        drop(stream);
        if !owed.is_empty() {
            self.acks_owed.entry(batch.origin).or_default().extend(owed);
        }
        self.forgot(evicted);
        self.raise_resync(batch.origin, missed);
        if self.origins.take_made_unanchored() {
            // Unless a digest of this node's own, sent when the origin learned of it,
            // is on its way, this node may have lost the first entries: ask.
            let at = now + self.config.digest_interval;
            self.origins.ask_later(at, batch.origin, 0);
            self.timers.set_shared(at, Wake::AskStarts);
        }
        if past_gap > 0 {
            self.cap_entries_past_gaps();
        }
        // A complete stream, the usual case, has nothing to queue.
        if watch {
            self.schedule_gap_work(batch.origin);
        }
    }

    /// A batch on arrival: this node's own comes back only by mistake and is dropped;
    /// one marked for forwarding is relayed within the zone. True when the batch is to
    /// be processed.
    fn accept_relayed(
        &mut self,
        from: SocketAddr,
        header: &Header,
        origin: NodeId,
        datagram: &[u8],
    ) -> bool {
        if origin == self.local.id {
            self.stats.dropped.own += 1;
            return false;
        }
        if header.flags & FLAG_FORWARD != 0 {
            self.forward_in_zone(from, header, origin, datagram);
        }
        true
    }

    /// Counts a stream forgotten to make room, and reports what it still lacked.
    fn forgot(&mut self, evicted: Option<crate::origins::Evicted>) {
        if let Some(evicted) = evicted {
            self.stats.origins_evicted += 1;
            self.raise_resync(evicted.origin, evicted.missed);
            if evicted.missed == 0 && evicted.unanchored {
                self.raise_unknown_resync(
                    evicted.origin,
                    "forgot a stream whose start it never learned",
                );
            }
        }
    }

    /// Holds out-of-order state to its global bound.
    fn cap_entries_past_gaps(&mut self) {
        if self.origins.entries_past_gaps() > MAX_ENTRIES_PAST_GAPS
            && let Some((origin, missed)) = self.origins.give_up_largest()
        {
            self.raise_resync(origin, missed);
        }
    }

    /// An origin died or left. A hole it leaves can no longer be repaired: give it up
    /// now. Without a hole, loss is still possible if the origin sent entries after its
    /// last digest (it may have died with some of them in flight): say so, with an
    /// unknown count. An origin that left gracefully sent a final digest first.
    pub(super) fn origin_gone(&mut self, origin: NodeId) {
        let Some(mut stream) = self.origins.get_mut(origin) else {
            return;
        };
        // Entries known to be missed, or why some may have been.
        let loss = if stream.has_gap() {
            Some(Ok(stream.give_up_gaps()))
        } else if !stream.is_anchored() {
            // Entries before the first one heard may have been owed, and only the
            // origin could have said so.
            stream.mark_confirmed();
            stream.anchor();
            Some(Err("origin gone before saying where this node starts"))
        } else if !stream.is_confirmed() {
            stream.mark_confirmed();
            Some(Err("origin gone with entries unconfirmed"))
        } else {
            None
        };
        drop(stream);
        match loss {
            Some(Ok(missed)) => self.raise_resync(origin, missed),
            Some(Err(why)) => self.raise_unknown_resync(origin, why),
            None => {}
        }
    }

    /// After a change to `origin`'s stream: wakes this node for its next repair and
    /// its deadline.
    fn schedule_gap_work(&mut self, origin: NodeId) {
        let (repair_at, deadline) = self.origins.watch(origin, self.config.gap_timeout);
        if let Some(at) = repair_at {
            self.timers
                .set_shared(at.round_up_to(SCAN_GRID), Wake::Repair);
        }
        if let Some(at) = deadline {
            self.timers
                .set_shared(at.round_up_to(SCAN_GRID), Wake::GapCheck);
        }
    }

    /// As a relay: passes a batch on to the other members of this zone at once (to
    /// those of one half, when the origin marked it so), marked so that they do not
    /// forward it again.
    fn forward_in_zone(
        &mut self,
        from: SocketAddr,
        header: &Header,
        origin: NodeId,
        datagram: &[u8],
    ) {
        let forwarded = wire::with_relay_flags(datagram, 0);
        let origin_addr = self.by_id.get(&origin).map(|m| m.addr);
        let half = (header.flags & FLAG_HALF != 0).then_some(header.flags & FLAG_SECOND_HALF != 0);
        let targets: Vec<SocketAddr> = self
            .own_zone_roster()
            .into_iter()
            .flat_map(|roster| roster.addrs_in(half))
            .filter(|addr| *addr != from && Some(*addr) != origin_addr)
            .collect();
        trace!(%origin, relayed_to = targets.len(), "relaying a batch within the zone");
        for target in targets {
            self.queue_transmit_in_zone(target, forwarded.clone());
        }
    }

    /// This zone's roster: the zone peers in address order, with their halves.
    fn own_zone_roster(&self) -> Option<&super::roster::ZoneRoster> {
        let roster = self.zones.get(&self.local.zone);
        debug_assert!(
            roster.map_or(0, |r| r.len()) == self.zone_peers.len()
                && roster.is_none_or(|r| r.addrs().iter().all(|a| self.zone_peers.contains(a))),
            "the zone's roster is the zone peers"
        );
        roster
    }

    /// Sends the acknowledgements owed, one datagram per origin where they fit.
    pub(super) fn flush_acks(&mut self) {
        let per_datagram = wire::max_list_len(self.config.datagram_budget()).max(1);
        for (origin, mut seqs) in std::mem::take(&mut self.acks_owed) {
            let Some(addr) = self.by_id.get(&origin).map(|m| m.addr) else {
                self.stats.acks_unroutable += seqs.len() as u64;
                continue;
            };
            seqs.sort_unstable();
            seqs.dedup();
            for chunk in seqs.chunks(per_datagram) {
                self.stats.acks_sent += chunk.len() as u64;
                let datagram = wire::encode_ack(self.cluster, self.local.id, chunk);
                self.queue_transmit(addr, datagram);
            }
        }
    }

    /// Asks origins for the entries missing from their streams.
    pub(super) fn request_due_repairs(&mut self) {
        let interval = self.config.repair_interval;
        // A range is two sequence numbers; all must fit one datagram, sealed or not.
        let fit = wire::max_list_len(self.config.datagram_budget()) / 2;
        let due = self
            .origins
            .due_repairs(self.now, interval, MAX_REPAIR_RANGES.min(fit).max(1));
        for (origin, ranges) in due {
            // An origin that is not a live member cannot answer; the hole's deadline
            // turns it into a resync.
            if let Some(addr) = self.by_id.get(&origin).map(|m| m.addr) {
                self.stats.repairs_requested += 1;
                self.note_loss();
                let datagram = wire::encode_repair(self.cluster, origin, &ranges);
                self.queue_transmit(addr, datagram);
            }
        }
        if let Some(next) = self.origins.next_repair() {
            self.timers
                .set_shared(next.round_up_to(SCAN_GRID), Wake::Repair);
        }
    }

    /// Gives up holes that stayed open past `gap_timeout`.
    pub(super) fn give_up_expired_gaps(&mut self) {
        let (holes, claims) = self.origins.expire(self.now, self.config.gap_timeout);
        for (origin, missed) in holes {
            self.raise_resync(origin, missed);
        }
        for origin in claims {
            self.raise_unknown_resync(origin, "the origin never confirmed entries a peer had");
        }
        if let Some(deadline) = self.origins.next_gap_deadline(self.config.gap_timeout) {
            self.timers
                .set_shared(deadline.round_up_to(SCAN_GRID), Wake::GapCheck);
        }
    }

    /// A digest says which of the origin's entries this node is owed: a hole at the
    /// end, at the start, or a stream this node never heard a single entry of. A digest
    /// shared by a zone (`first` 0) arrives through a relay and only tells the end.
    pub(super) fn receive_digest(&mut self, from: SocketAddr, header: &Header, body: &[u8]) {
        let digest = match wire::decode_digest(body) {
            Ok(digest) => digest,
            Err(error) => return self.count_decode_error(from, error),
        };
        if digest.origin == self.local.id {
            self.stats.dropped.own += 1;
            return;
        }
        if header.flags & FLAG_FORWARD != 0 {
            self.hold_for_zone(digest.origin, digest.last);
        }
        if digest.first == 0 {
            return self.learn_shared_end(digest.origin, digest.last, true);
        }
        let now = self.now;
        let window = self.config.reorder_window as usize;
        let uptime = now.saturating_duration_since(self.started);
        let by_id = &self.by_id;
        let live = || by_id.contains_key(&digest.origin);
        let (mut stream, evicted) = self.origins.stream(digest.origin, digest.first, now, live);
        // The first time the origin says where this node starts: if it published
        // before that, while this node was already running (and caching), this
        // node cannot know what it missed. A fresh joiner has nothing to miss.
        let unknown_past = stream.anchor() && digest.first > 1 && uptime > self.config.join_grace;
        let given_up = stream.extend_start(digest.first, window, now);
        stream.learn_end(digest.last, true, now);
        let complete = !(stream.has_gap() || stream.has_claim());
        drop(stream);
        // Made and anchored at once: nothing to ask.
        self.origins.take_made_unanchored();
        self.forgot(evicted);
        self.raise_resync(digest.origin, given_up);
        if unknown_past {
            self.raise_unknown_resync(
                digest.origin,
                "met an origin that published before it knew this node",
            );
        }
        if !complete {
            self.plan_gap_work(digest.origin);
        }
    }

    /// An origin's newest sequence number from a digest shared by a whole zone: it says
    /// nothing about where this node starts, so it only extends a stream already kept.
    /// Of a live origin's stream never heard (every entry of it lost on the way), only
    /// the origin can say where this node starts: it is asked. `direct` when the origin
    /// sent it to this node, not a relay (which may have held it for a while).
    fn learn_shared_end(&mut self, origin: NodeId, last: u64, direct: bool) {
        let Some(mut stream) = self.origins.get_mut(origin) else {
            if self.by_id.contains_key(&origin) {
                self.ask_where_stream_starts(origin);
            }
            return;
        };
        stream.learn_end(last, direct, self.now);
        let incomplete = stream.has_gap() || stream.has_claim();
        drop(stream);
        if incomplete {
            self.plan_gap_work(origin);
        }
    }

    /// As a relay: keeps an origin's shared digest for up to a `digest_interval`, to
    /// send it to this zone in one datagram with the others that arrive meanwhile.
    /// Origins send the same round of their digests to the same relay of a zone, so
    /// under a steady publish rate one datagram per member carries several origins.
    fn hold_for_zone(&mut self, origin: NodeId, last: u64) {
        if self.zone_digests.is_empty() {
            let at = self.now + self.config.digest_interval;
            self.timers.set_shared(at, Wake::ZoneDigests);
        }
        let held = self.zone_digests.entry(origin).or_insert(last);
        *held = (*held).max(last);
        if self.zone_digests.len() >= self.config.max_origins {
            self.flush_zone_digests();
        }
    }

    /// Sends this zone the digests held as a relay, as few datagrams as they fit.
    pub(super) fn flush_zone_digests(&mut self) {
        if self.zone_digests.is_empty() {
            return;
        }
        let ends: Vec<(NodeId, u64)> = std::mem::take(&mut self.zone_digests).into_iter().collect();
        let roster = self.own_zone_roster();
        let targets = roster.map_or_else(Vec::new, |roster| roster.addrs().to_vec());
        let per_datagram = wire::max_zone_digests(self.config.datagram_budget()).max(1);
        trace!(
            origins = ends.len(),
            relayed_to = targets.len(),
            "relaying digests within the zone"
        );
        for chunk in ends.chunks(per_datagram) {
            let datagram = wire::encode_zone_digests(self.cluster, chunk);
            for target in &targets {
                self.queue_transmit_in_zone(*target, datagram.clone());
            }
        }
    }

    /// Digests a relay of this zone gathered. Only those of a member of this zone are
    /// taken (relays tell only their own zone): they open holes, which a forger could
    /// otherwise open at will.
    pub(super) fn receive_zone_digests(&mut self, from: SocketAddr, body: &[u8]) {
        let ends = match wire::decode_zone_digests(body) {
            Ok(ends) => ends,
            Err(error) => return self.count_decode_error(from, error),
        };
        if !self.zone_peers.contains(&from) {
            self.stats.dropped.unknown_peer += 1;
            return;
        }
        self.origins.warm(ends.iter().map(|(origin, _)| *origin));
        for (origin, last) in ends {
            if origin != self.local.id {
                self.learn_shared_end(origin, last, false);
            }
        }
    }

    /// A peer's word, in a table exchange, that each `origin` published up to `last`.
    /// Past what this node knows of the stream, it is a claim: the origin is asked for
    /// the difference with the stream's repairs, until entries or the origin's digest
    /// settle it. A claim never opens a hole, so a false one cannot make this node give
    /// entries up; one still unsettled at its deadline raises a resync of unknown size
    /// and leaves the stream where it was. For a stream this node never heard of (its
    /// first entries and every digest naming where it starts were lost), only the
    /// origin can say where this node starts: it is asked. Claims about this node and
    /// about origins that are not live members are ignored.
    pub(super) fn hear_claims(&mut self, claims: &[(NodeId, u64)]) {
        let now = self.now;
        for &(origin, last) in claims {
            if origin == self.local.id {
                continue;
            }
            // A stream knows whether its origin is live, which spares the member table
            // a search for each of a peer's thousand origins.
            let Some(mut stream) = self.origins.get_mut(origin) else {
                if self.by_id.contains_key(&origin) {
                    self.ask_where_stream_starts(origin);
                }
                continue;
            };
            if stream.is_live() && stream.hear_claim(last, now) {
                stream.plan_repair(now + self.config.repair_delay);
                drop(stream);
                self.schedule_gap_work(origin);
            }
        }
    }

    /// Streams first heard past the origin's first entry (its first entries were lost
    /// on the way, or sent before the origin knew this node) with no digest of this
    /// node's own, a `digest_interval` later, saying where they start: the origin is
    /// asked, and again every `digest_interval` while it does not answer, as often as
    /// it would have sent its digests. Within the asks left for this sync interval;
    /// member-table exchanges ask about the rest.
    pub(super) fn ask_unanchored_origins_due(&mut self) {
        let again = self.now + self.config.digest_interval;
        for (origin, asked) in self.origins.asks_due(self.now) {
            // Not a member yet (its batch came through a relay first): it would not
            // answer; the next round may find it one.
            if self.by_id.contains_key(&origin) {
                self.ask_where_stream_starts(origin);
            }
            if asked + 1 < START_ASKS_PER_STREAM {
                self.origins.ask_later(again, origin, asked + 1);
            }
        }
        if let Some(at) = self.origins.next_ask() {
            self.timers.set_shared(at, Wake::AskStarts);
        }
    }

    /// Asks `origin` where this node's part of its stream starts, with a repair request
    /// naming no range; the origin answers with a digest of this node's own, which opens
    /// the stream and its holes like any other. A few asks per sync interval at most,
    /// so a node that lost track of many origins asks over several exchanges.
    pub(super) fn ask_where_stream_starts(&mut self, origin: NodeId) {
        let Some(addr) = self.by_id.get(&origin).map(|m| m.addr) else {
            return;
        };
        if self.start_asks_left == 0 {
            return;
        }
        self.start_asks_left -= 1;
        self.stats.repairs_requested += 1;
        let datagram = wire::encode_repair(self.cluster, origin, &[]);
        self.queue_transmit(addr, datagram);
    }

    /// After a stream learned where it ends: ask for what it lacks, by a deadline.
    fn plan_gap_work(&mut self, origin: NodeId) {
        let now = self.now;
        let Some(mut stream) = self.origins.get_mut(origin) else {
            return;
        };
        // A complete stream (the usual outcome of a digest) has nothing to plan.
        if !(stream.has_gap() || stream.has_claim()) {
            return;
        }
        let past_gap = stream.entries_past_gap();
        stream.plan_repair(now + self.config.repair_delay);
        drop(stream);
        if past_gap > 0 {
            self.cap_entries_past_gaps();
        }
        self.schedule_gap_work(origin);
    }

    /// A resync whose size cannot be known (`missed` 0).
    fn raise_unknown_resync(&mut self, origin: NodeId, why: &str) {
        warn!(%origin, why, "invalidations may have been missed; subscribers must resync");
        self.stats.resyncs += 1;
        self.events.push_back(Event::Resync { origin, missed: 0 });
    }

    pub(super) fn receive_gone(&mut self, from: SocketAddr, body: &[u8]) {
        let (origin, oldest) = match wire::decode_gone(body) {
            Ok(gone) => gone,
            Err(error) => return self.count_decode_error(from, error),
        };
        let Some(mut stream) = self.origins.get_mut(origin) else {
            self.stats.dropped.unknown_peer += 1;
            return;
        };
        let missed = stream.give_up_below(oldest);
        // Part of the hole may still be retained: ask for it again.
        stream.replan_repair(self.now + self.config.repair_delay);
        drop(stream);
        self.raise_resync(origin, missed);
        self.schedule_gap_work(origin);
    }
}
