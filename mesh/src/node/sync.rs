//! Anti-entropy. Every `sync_interval` a node opens an exchange with one random member:
//! it sends a fingerprint of its member table, a fingerprint of its progress (the
//! newest sequence number it knows of each origin), and what its table says of the two
//! ends of the exchange. The member answers with its entries for the two ends; with its
//! progress when the progress fingerprints differ, and with its table when the table
//! fingerprints differ, asking in either case for the opener's in return. In a settled
//! cluster both agree, and an exchange costs two small datagrams instead of two tables
//! of every member and two lists of every origin. A node that saw loss lately lists its
//! progress in the request instead of fingerprinting it, so that the partner learns
//! from the first datagram, not from the third.
//!
//! Gossip carries each membership update a bounded number of times, so in a large or
//! lossy cluster a few nodes miss one (a join, a death, a rejoin after a partition);
//! the next exchange brings it, instead of the node's own probes stumbling on it up to
//! a cluster's worth of periods later. Likewise an origin's digests are few: a node
//! that lost an origin's newest entries and every digest after them learns from a peer
//! that the stream goes further, and asks the origin for the rest. A peer's word is
//! only a reason to ask: it never opens a hole, so a false claim cannot make a node
//! give entries up.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use foca::Identity as _;
use rand::RngExt;

use super::Node;
use crate::identity::{AddrKey, Member, NodeId};
use crate::origins::end_hash;
use crate::time::{self, Instant};
use crate::timers::Wake;
use crate::wire::{self, Header, SyncItem};

/// Answers a node gives per interval at most. About one is expected (every member
/// starts one exchange per interval with a random partner); the cap keeps a stream of
/// requests from making this node an amplifier.
pub(super) const ANSWERS_PER_INTERVAL: u32 = 4;

/// Times a suspect notice goes again after the first (see [`Node::tell_suspect`]).
const SUSPECT_NOTICE_REPEATS: u8 = 3;

/// Origins a node asks per interval at most where its part of their stream starts.
/// Asks are rare (an origin's first entries and every digest naming where a node
/// starts must all be lost); the cap spreads them out when a node lost many at once.
pub(crate) const START_ASKS_PER_INTERVAL: u32 = 16;

/// Of those, the asks an exchange spends on streams that never learned where they
/// start; the rest stay for origins a peer names that this node never heard at all.
pub(crate) const UNANCHORED_ASKS_PER_INTERVAL: u32 = START_ASKS_PER_INTERVAL / 2;

/// Entries of a peer's table up to which each is looked up in foca's table directly
/// rather than in a view of it.
const DIRECT_LOOKUPS: usize = 4;

impl Node {
    /// Sets the next exchange between half and one and a half intervals from now, so
    /// nodes started together do not exchange in lockstep.
    pub(super) fn schedule_sync(&mut self) {
        let interval = self.config.membership.sync_interval;
        let nanos = time::nanos(interval);
        let delay = self
            .rng
            .random_range(nanos / 2..=nanos.saturating_add(nanos / 2));
        let at = self.now + Duration::from_nanos(delay);
        self.timers.set(at, Wake::Sync);
    }

    /// Opens an exchange with one random live member: fingerprints of this node's
    /// table and progress, asking for the member's answer.
    pub(super) fn start_sync(&mut self) {
        self.sync_answers_left = ANSWERS_PER_INTERVAL;
        self.start_asks_left = START_ASKS_PER_INTERVAL;
        self.schedule_sync();
        self.ask_unanchored_origins();
        if self.members.is_empty() {
            return;
        }
        let pick = self.rng.random_range(0..self.members.len());
        if let Some(partner) = self.nth_member(pick) {
            // On lossy links the request carries the progress itself: the partner
            // learns from it even when the rest of the exchange is lost.
            let listed = self.seen_loss_lately();
            let mut items = vec![SyncItem::Summary {
                fingerprint: self.table_fingerprint(partner),
            }];
            if !listed {
                items.push(SyncItem::ProgressSummary {
                    fingerprint: self.progress_fingerprint(),
                });
            }
            items.extend(self.ends_of_exchange(partner));
            if listed {
                self.send_sync(partner, true, items);
            } else {
                self.transmit_sync(partner, true, &items);
            }
        }
    }

    /// Asks the origins of streams that never learned where they start (see
    /// [`Origins::unanchored`](crate::origins::Origins::unanchored)) to say so.
    fn ask_unanchored_origins(&mut self) {
        // Live origins only, before the cap: streams of origins gone stay unanchored,
        // and must not take every ask.
        let live: Vec<NodeId> = self
            .origins
            .unanchored(self.now)
            .into_iter()
            .filter(|origin| self.by_id.contains_key(origin))
            .collect();
        // In turn, starting after the last origin asked: origins that never answer (one
        // that does not hold this node as a member, say) cannot keep every ask.
        let start = self
            .last_start_ask
            .map_or(0, |last| live.partition_point(|origin| *origin <= last));
        let budget = self.start_asks_left.min(UNANCHORED_ASKS_PER_INTERVAL);
        let turn: Vec<NodeId> = live[start..]
            .iter()
            .chain(&live[..start])
            .take(budget as usize)
            .copied()
            .collect();
        if let Some(&last) = turn.last() {
            self.last_start_ask = Some(last);
        }
        for origin in turn {
            self.ask_where_stream_starts(origin);
        }
    }

    /// Tells a member this node just started suspecting (its probe failed; foca then
    /// sets the timer that declares it down) that it is suspected, in a sync datagram
    /// listing only its entry, so it can refute. Gossip alone carries a suspicion a
    /// bounded number of times to random members, and may never reach the one member
    /// that must hear it (Lifeguard, an extension of SWIM, makes probers of a suspect
    /// carry the suspicion to it for the same reason). The notice goes again three
    /// times, a quarter of `suspect_to_down_after` apart, while the member stays
    /// suspected at that incarnation: a single notice lost on a lossy link left the
    /// member to be declared down. One small datagram per failed probe and repeat.
    pub(super) fn tell_suspect(&mut self, suspect: &Member, incarnation: foca::Incarnation) {
        if self.members.get(&suspect.addr) != Some(suspect) {
            return;
        }
        self.send_suspect_notice(suspect, incarnation);
        self.schedule_suspect_notices();
        let entry = (suspect.clone(), incarnation, SUSPECT_NOTICE_REPEATS);
        self.suspects_told.insert(suspect.addr, entry);
    }

    fn send_suspect_notice(&mut self, suspect: &Member, incarnation: foca::Incarnation) {
        let entry = foca::Member::new(suspect.clone(), incarnation, foca::State::Suspect);
        self.transmit_sync(suspect.addr, false, &[SyncItem::Member(entry)]);
    }

    fn schedule_suspect_notices(&mut self) {
        let at = self.now + self.config.membership.suspect_to_down_after / 4;
        self.timers.set_shared(at, Wake::TellSuspects);
    }

    /// Tells each member this node still suspects, at the incarnation its probe
    /// failed at, again; forgets those that refuted, were declared down or left.
    pub(super) fn tell_suspects_again(&mut self) {
        let told = std::mem::take(&mut self.suspects_told);
        for (addr, (suspect, incarnation, left)) in told {
            let still = self.swim_entry(addr).is_some_and(|entry| {
                entry.id() == &suspect
                    && entry.incarnation() == incarnation
                    && entry.state() == foca::State::Suspect
            });
            if !still || left == 0 {
                continue;
            }
            self.send_suspect_notice(&suspect, incarnation);
            if left > 1 {
                self.suspects_told
                    .insert(addr, (suspect, incarnation, left - 1));
            }
        }
        if !self.suspects_told.is_empty() {
            self.schedule_suspect_notices();
        }
    }

    /// What this node's table says of the two ends of an exchange, which the
    /// fingerprint leaves out: this node itself, alive, and its entry for `partner`.
    /// Gossip about a node is least likely to reach that very node (it is suspected
    /// because its links lose datagrams); this is how a node that missed its own
    /// suspicion still learns it in time to refute it, and how a restarted node's
    /// new identity reaches a partner that still knows the old one.
    fn ends_of_exchange(&self, partner: SocketAddr) -> impl Iterator<Item = SyncItem> + use<> {
        let local = foca::Member::alive(self.local.clone());
        let theirs = self.swim_entry(partner).cloned();
        std::iter::once(local).chain(theirs).map(SyncItem::Member)
    }

    /// The whole table foca keeps (members declared down included, so deaths spread
    /// too), with this node itself at the front, then this node's progress.
    fn send_table(&mut self, to: SocketAddr, answer: bool) {
        let members = self.swim.iter_membership_state();
        let mut items = Vec::with_capacity(members.len() + 1 + self.by_id.len());
        items.push(SyncItem::Member(foca::Member::alive(self.local.clone())));
        items.extend(members.cloned().map(SyncItem::Member));
        self.send_sync(to, answer, items);
    }

    /// Sends `items` followed by this node's progress.
    fn send_sync(&mut self, to: SocketAddr, answer: bool, mut items: Vec<SyncItem>) {
        let progress = self
            .progress()
            .map(|(origin, last)| SyncItem::Progress { origin, last });
        items.extend(progress);
        self.transmit_sync(to, answer, &items);
    }

    /// The newest sequence number this node knows of for itself and for each live
    /// origin it follows, leaving out origins that never published.
    fn progress(&self) -> impl Iterator<Item = (NodeId, u64)> + use<> {
        let own = (self.local.id, self.last_published());
        std::iter::once(own)
            .filter(|(_, last)| *last > 0)
            .chain(self.origins.live_ends())
    }

    /// A fingerprint of [`progress`](Self::progress): two nodes that know the same
    /// newest sequence number of the same origins (counting each one's own) compute the
    /// same one, and then neither has a claim to tell the other. The pairs' hashes are
    /// summed, so the order does not matter, and the streams' part of the sum is kept
    /// as they change.
    fn progress_fingerprint(&self) -> u64 {
        let (mut count, mut sum) = self.origins.live_end_sum();
        if let last @ 1.. = self.last_published() {
            count += 1;
            sum = sum.wrapping_add(end_hash(self.local.id, last));
        }
        #[cfg(debug_assertions)]
        {
            debug_assert!(self.origins.marks_live(|id| self.by_id.contains_key(id)));
            let recounted = self.origins.recount_live_end_sum();
            debug_assert_eq!(
                recounted,
                self.origins.live_end_sum(),
                "the kept sum drifted"
            );
        }
        mix(sum ^ mix(count))
    }

    /// Sends `items` in as many sync datagrams as they need.
    fn transmit_sync(&mut self, to: SocketAddr, answer: bool, items: &[SyncItem]) {
        let max = self.config.datagram_budget();
        for datagram in wire::encode_sync(self.cluster, answer, items, max) {
            self.queue_transmit(to, datagram);
        }
    }

    /// A fingerprint of foca's table without the entries about this node and
    /// `partner` (those travel beside it, see [`Node::ends_of_exchange`]): two nodes
    /// that agree on every other member compute the same one, whatever each believes
    /// of itself and of the other. Members declared down are left out too: a death
    /// is news only to a node that holds the member alive or suspect, and that entry
    /// already makes its fingerprint differ; while a node that joined after the death,
    /// or one that saw it at another incarnation, would otherwise disagree until the
    /// entry is removed and swap whole tables every time. The entries' hashes are
    /// summed, so the order foca keeps them in does not matter.
    fn table_fingerprint(&self, partner: SocketAddr) -> u64 {
        let local = self.local.addr;
        fingerprint(self.swim.iter_membership_state().filter(|m| {
            m.state() != foca::State::Down && m.id().addr != partner && m.id().addr != local
        }))
    }

    /// Hands foca what a live member's table says that this node did not know, asks
    /// origins for entries past what this node knows of their streams, and answers when
    /// asked: with progress alone when the request's fingerprint matches this node's
    /// table, else with the table. Syncs from anyone else are dropped: an answer may be
    /// far larger than a request, and must not be aimed at an address a forger names.
    pub(super) fn receive_sync(&mut self, from: SocketAddr, header: &Header, body: &[u8]) {
        if !self.members.contains_key(&from) {
            self.stats.dropped.unknown_peer += 1;
            return;
        }
        let items = match wire::decode_sync(body) {
            Ok(items) => items,
            Err(error) => return self.count_decode_error(from, error),
        };
        let mut table = Vec::with_capacity(items.len());
        let mut claims = Vec::new();
        let mut summary = None;
        let mut progress_summary = None;
        for item in items {
            match item {
                SyncItem::Member(member) => table.push(member),
                SyncItem::Progress { origin, last } => claims.push((origin, last)),
                SyncItem::Summary { fingerprint } => summary = Some(fingerprint),
                SyncItem::ProgressSummary { fingerprint } => {
                    progress_summary = Some(fingerprint);
                }
            }
        }
        self.hear_claims(&claims);
        if !table.is_empty() {
            self.take_news(from, table);
        }
        let asked = header.flags & wire::FLAG_ANSWER != 0;
        if asked && self.sync_answers_left > 0 {
            self.sync_answers_left -= 1;
            match (summary, progress_summary) {
                // The tables agree: progress is all there may be to tell.
                (Some(theirs), _) if theirs == self.table_fingerprint(from) => {
                    self.answer_agreeing_tables(from, progress_summary);
                }
                // They differ: this node's table, and the peer's in return.
                (Some(_), _) => self.send_table(from, true),
                // The answer to an opening request whose progress differed: this node's
                // progress, so that both ends learn what the other knows.
                (None, Some(_)) => self.send_sync(from, false, Vec::new()),
                (None, None) => self.send_table(from, false),
            }
        }
    }

    /// Answers an opening request whose table fingerprint matches: the entries for
    /// the two ends, and nothing more when the progress fingerprints match too. When
    /// they differ, this node's progress, asking for the opener's in return. A request
    /// without a progress fingerprint carried its progress itself.
    fn answer_agreeing_tables(&mut self, from: SocketAddr, theirs: Option<u64>) {
        let mut items: Vec<SyncItem> = self.ends_of_exchange(from).collect();
        let ours = self.progress_fingerprint();
        match theirs {
            Some(theirs) if theirs == ours => self.transmit_sync(from, false, &items),
            Some(_) => {
                // First, so that it travels in the datagram that asks.
                items.insert(0, SyncItem::ProgressSummary { fingerprint: ours });
                self.send_sync(from, true, items);
            }
            None => self.send_sync(from, false, items),
        }
    }

    /// Hands foca the entries of a peer's table that change its view.
    fn take_news(&mut self, from: SocketAddr, table: Vec<foca::Member<Member>>) {
        let mut news = self.news(table);
        if let Some(mut room) = self.member_room() {
            let before = news.len();
            news.retain(|member| room.admit(member.id().addr));
            if news.len() < before {
                self.count_member_limit((before - news.len()) as u64);
            }
        }
        if !news.is_empty() {
            self.stats.member_updates_synced += news.len() as u64;
            self.table_view.expect(&news);
            let local = self.local.addr;
            let suspected = news.iter().any(|update| update.id().addr == local);
            let outcome = self.drive_swim(|swim, out| swim.apply_many(news.into_iter(), true, out));
            if let Err(error) = outcome {
                // foca may have stopped part way: the view must not claim the rest.
                self.table_view.forget();
                tracing::debug!(peer = %from, %error, "member table from a peer rejected");
                self.stats.dropped.membership += 1;
            } else if suspected {
                self.answer_suspicion(from);
            }
        }
    }

    /// After refuting a suspicion `from` told this node of, sends `from` a membership
    /// message: every one carries the sender's incarnation, so the refutation reaches
    /// the member that suspects this node (the one whose timer would declare it down)
    /// even if none of the refutation's gossip does.
    fn answer_suspicion(&mut self, from: SocketAddr) {
        let Some(suspecter) = self.members.get(&from).cloned() else {
            return;
        };
        if let Err(error) = self.drive_swim(|swim, out| swim.announce(suspecter, out)) {
            tracing::debug!(peer = %from, %error, "could not answer a suspicion");
        }
    }

    /// The entries of a peer's table that would change foca's: identities it does not
    /// know, alive, and newer states of those it knows. Identities declared down that
    /// it never knew are left out: there is nothing to take back.
    fn news(&mut self, table: Vec<foca::Member<Member>>) -> Vec<foca::Member<Member>> {
        // The few entries beside a fingerprint are looked up in foca's table directly:
        // cheaper than taking a view of a thousand members.
        let direct = table.len() <= DIRECT_LOOKUPS;
        if !direct {
            let max_age = self.config.membership.remove_down_after;
            self.table_view.refresh(self.now, &self.swim, max_age);
            self.table_view
                .warm(table.iter().map(|update| &update.id().addr));
        }
        // A peer sends one entry per address; if it sent more, the last wins.
        let mut seen = BTreeSet::new();
        let mut keep: Vec<bool> = table
            .iter()
            .rev()
            .map(|update| {
                let addr = update.id().addr;
                let known = if direct {
                    self.swim_entry(addr)
                } else {
                    self.table_view.get(&addr)
                };
                seen.insert(AddrKey::from(addr)) && self.is_news(update, known)
            })
            .collect();
        keep.reverse();
        table
            .into_iter()
            .zip(keep)
            .filter_map(|(update, keep)| keep.then_some(update))
            .collect()
    }

    /// Whether `update` is news, given foca's entry for its address.
    fn is_news(&self, update: &foca::Member<Member>, known: Option<&foca::Member<Member>>) -> bool {
        // "Known" is by identity: a death of another identity at a known address is
        // not news (a forged one would otherwise keep coming back).
        let known = match known {
            Some(known) if !changes(known, update) => return false,
            Some(known) => known.id() == update.id(),
            None => false,
        };
        if update.id().addr == self.local.addr {
            // Only a suspicion or death of this node, or an older identity at its
            // address, is news; foca refutes or retires them.
            update.id() != &self.local || update.state() != foca::State::Alive
        } else {
            known || update.state() != foca::State::Down
        }
    }
}

/// foca's table (one member per address) as it was when last looked at, indexed by
/// address. A peer's table arrives a datagram of a few dozen entries at a time, while
/// foca may know thousands of members and offers no lookup: a pass over foca's whole
/// table per datagram made these exchanges the largest cost of a thousand-node
/// cluster. Membership gossip is screened against the same view (`gossip.rs`). The
/// view is taken again once older than [`TableView::MAX_AGE`], and what this node
/// hands foca from an exchange is written into it meanwhile. A view slightly behind
/// foca errs harmlessly: an update foca already has is handed to foca again, and an
/// update the view wrongly takes as known waits for the next exchange.
///
/// The view is in memory that is cold by the time a datagram needs it, so a lookup
/// costs the cache lines it reads. The entries sit in the open-addressing table
/// itself, one cache line each: a lookup reads the entry it compares first,
/// where an index of positions read its slot and then the entry, and a binary search
/// over sorted addresses read about ten.
#[derive(Default)]
pub(super) struct TableView {
    taken: Option<Instant>,
    /// foca's entries, each in the first free slot from where its address hashes
    /// (linear probing). A power of two long, at least twice the number of entries.
    slots: Vec<Slot>,
    len: usize,
}

impl TableView {
    const MAX_AGE: Duration = Duration::from_millis(500);

    /// Makes the next [`refresh`](Self::refresh) take the view again.
    pub(super) fn forget(&mut self) {
        self.taken = None;
    }

    /// Takes the view again if it is older than `max_age` or
    /// [`MAX_AGE`](Self::MAX_AGE), whichever is shorter.
    pub(super) fn refresh(&mut self, now: Instant, swim: &super::Swim, max_age: Duration) {
        let max_age = max_age.min(Self::MAX_AGE);
        if self.taken.is_some_and(|at| now < at + max_age) {
            return;
        }
        self.taken = Some(now);
        let entries = swim.iter_membership_state();
        // Into the table of the last view when its size still fits: a fresh one each
        // time was mostly the kernel zeroing new pages while a large cluster formed.
        self.clear(Self::size_for(entries.len()));
        for entry in entries {
            self.place(entry.clone());
        }
    }

    /// Slots for `len` entries.
    fn size_for(len: usize) -> usize {
        (len * 2).next_power_of_two().max(16)
    }

    /// Empties the table, leaving it `size` slots long.
    fn clear(&mut self, size: usize) {
        self.slots.clear();
        self.slots.resize_with(size, Slot::default);
        self.len = 0;
    }

    /// Puts `entry`, whose address the table does not hold, in the first free slot
    /// for its address.
    fn place(&mut self, entry: foca::Member<Member>) {
        let slot = self
            .probe(&key_of(&entry))
            .find(|slot| self.slots[*slot].0.is_none());
        // The table is at most half full, so there is always a free slot.
        debug_assert!(slot.is_some(), "a view's table is never full");
        if let Some(slot) = slot {
            self.slots[slot] = Slot(Some(entry));
            self.len += 1;
        }
    }

    /// The slots to look in for `key`, in order: from where it hashes, onwards.
    fn probe(&self, key: &AddrKey) -> impl Iterator<Item = usize> + use<> {
        let mask = self.slots.len().wrapping_sub(1);
        let start = mix(key.hash_word()) as usize;
        (0..self.slots.len()).map(move |step| (start + step) & mask)
    }

    /// The slot holding the entry at `addr`.
    fn position(&self, addr: &SocketAddr) -> Option<usize> {
        let key = AddrKey::from(*addr);
        for slot in self.probe(&key) {
            if key_of(self.slots[slot].0.as_ref()?) == key {
                return Some(slot);
            }
        }
        None
    }

    /// Reads the slot where each of `addrs` hashes, so that the lookups of them that
    /// follow find their entries in cache: these reads do not wait for one another,
    /// and the processor overlaps their cache misses (see `IdMap::warm`). A membership
    /// datagram, or one of a peer's table, names dozens of members, each looked up in
    /// a view that is cold by the time the next datagram for this node comes.
    pub(super) fn warm<'a>(&self, addrs: impl Iterator<Item = &'a SocketAddr>) {
        let read = addrs.fold(0, |read, addr| {
            let slot = self.probe(&AddrKey::from(*addr)).next();
            let entry = slot.and_then(|slot| self.slots[slot].0.as_ref());
            read ^ entry.map_or(0, |entry| entry.id().id.0)
        });
        std::hint::black_box(read);
    }

    pub(super) fn get(&self, addr: &SocketAddr) -> Option<&foca::Member<Member>> {
        self.slots[self.position(addr)?].0.as_ref()
    }

    /// [`holds`] with this view's entry at the update's address.
    #[cfg(test)]
    pub(super) fn holds(&self, update: &foca::Member<Member>) -> bool {
        holds(self.get(&update.id().addr), update)
    }

    /// Records updates handed to foca as what foca now holds. Another identity at a
    /// known address takes the address only if foca would let it win the conflict;
    /// a losing one (an older identity) is discarded by foca, and the view keeps the
    /// identity foca keeps.
    fn expect(&mut self, updates: &[foca::Member<Member>]) {
        for update in updates {
            let known = self
                .position(&update.id().addr)
                .and_then(|slot| self.slots[slot].0.as_mut());
            match known {
                Some(known) => {
                    if known.id() == update.id() || !known.id().win_addr_conflict(update.id()) {
                        *known = update.clone();
                    }
                }
                None => {
                    if (self.len + 1) * 2 > self.slots.len() {
                        self.grow();
                    }
                    self.place(update.clone());
                }
            }
        }
    }

    /// Doubles the table (or makes the first one), placing every entry again.
    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.clear(Self::size_for(self.len + 1).max(old.len() * 2));
        for entry in old.into_iter().filter_map(|slot| slot.0) {
            self.place(entry);
        }
    }
}

/// A slot of the view's table, aligned to a cache line so that reading an entry reads
/// one line whatever the allocator's alignment.
#[derive(Default)]
#[repr(align(64))]
struct Slot(Option<foca::Member<Member>>);

/// The address of a view's entry as the index compares it.
fn key_of(entry: &foca::Member<Member>) -> AddrKey {
    AddrKey::from(entry.id().addr)
}

/// A socket address as the integers an entry's hash takes: family, address bits, port.
pub(super) fn address_words(addr: &SocketAddr) -> (u8, u128, u16) {
    match addr {
        SocketAddr::V4(v4) => (4, u32::from(*v4.ip()).into(), v4.port()),
        SocketAddr::V6(v6) => (6, u128::from(*v6.ip()), v6.port()),
    }
}

/// Whether foca holds `update` already, or something it prefers, going by `known`,
/// the view's entry at the update's address: the same identity, not down, at a later
/// or equal incarnation and no milder state. foca's entry for an identity only ever
/// moves on from what the view saw (a view is a copy taken earlier, plus updates foca
/// took since), so foca would ignore the update. Deaths are never held (foca takes one
/// at any incarnation), nor identities seen down: foca forgets them after
/// `remove_down_after`, and would then take them again.
pub(super) fn holds(known: Option<&foca::Member<Member>>, update: &foca::Member<Member>) -> bool {
    let down = foca::State::Down;
    update.state() != down
        && known.is_some_and(|known| known.state() != down && !changes(known, update))
}

/// Whether `update` tells foca something about `known` (same address): another
/// identity (foca settles which one wins), or a later incarnation or graver state of
/// the same one. Down is final for an identity.
///
/// A death at an incarnation older than the one held is not counted, though foca
/// would take it: the member refuted a suspicion that another node, not hearing the
/// refutation in time, turned into a death. Gossip still spreads that death; passing
/// it on through exchanges too made false deaths more common in simulations (in
/// `gaps/bursty-lan`, 258 of 400 seeds against 215, before suspect notices were
/// repeated).
fn changes(known: &foca::Member<Member>, update: &foca::Member<Member>) -> bool {
    if known.id() != update.id() {
        return true;
    }
    if known.state() == foca::State::Down {
        return false;
    }
    update.incarnation() > known.incarnation()
        || (update.incarnation() == known.incarnation()
            && rank(update.state()) > rank(known.state()))
}

/// States from the least to the most grave.
fn rank(state: foca::State) -> u8 {
    match state {
        foca::State::Alive => 0,
        foca::State::Suspect => 1,
        foca::State::Down => 2,
    }
}

/// The sum of the entries' hashes, mixed with their count.
fn fingerprint<'a>(entries: impl Iterator<Item = &'a foca::Member<Member>>) -> u64 {
    let (count, sum) = entries.fold((0u64, 0u64), |(count, sum), entry| {
        (count + 1, sum.wrapping_add(entry_hash(entry)))
    });
    mix(sum ^ mix(count))
}

/// A hash of one table entry, taken over its fields as explicit integers (never
/// through `Hash`, whose input differs between platforms), so that nodes on any
/// platform and build compute the same one.
fn entry_hash(entry: &foca::Member<Member>) -> u64 {
    let member = entry.id();
    let (family, ip, port) = address_words(&member.addr);
    let zone = member.zone.as_str().as_bytes();
    let words = [
        u64::from(family) << 16 | u64::from(port),
        (ip >> 64) as u64,
        ip as u64,
        member.id.0,
        member.generation,
        u64::from(entry.incarnation()) << 8 | u64::from(rank(entry.state())),
        zone.len() as u64,
    ];
    // Each chunk read as a little-endian word, built in a register: copying a short
    // chunk into a zeroed word in memory made every entry wait on a store that could
    // not be forwarded to the load, a fifth of each fingerprint's time.
    let zone_words = zone.chunks(8).map(|chunk| {
        chunk
            .iter()
            .rev()
            .fold(0, |word, &byte| word << 8 | u64::from(byte))
    });
    let hash = words
        .into_iter()
        .chain(zone_words)
        .fold(0, |hash: u64, word| {
            (hash ^ word)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(29)
        });
    mix(hash)
}

/// Spreads the bits of a hash (the finaliser of MurmurHash3), so that sums of
/// hashes of similar entries do not cancel out.
pub(crate) fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{NodeId, Zone};

    fn entry(i: u64, incarnation: u16, state: foca::State) -> foca::Member<Member> {
        let member = Member {
            id: NodeId(i),
            addr: SocketAddr::from(([10, 0, 0, i as u8], 7000)),
            zone: Zone::new(format!("zone-{}", i % 3)).unwrap(),
            generation: 1,
        };
        foca::Member::new(member, incarnation, state)
    }

    #[test]
    fn a_view_holds_only_what_foca_would_ignore() {
        use foca::State::{Alive, Down, Suspect};
        let view = |held: foca::Member<Member>| {
            let mut view = TableView::default();
            view.expect(&[held]);
            view
        };
        let suspect = view(entry(1, 2, Suspect));
        assert!(suspect.holds(&entry(1, 2, Suspect)), "a copy");
        assert!(suspect.holds(&entry(1, 2, Alive)), "milder");
        assert!(suspect.holds(&entry(1, 1, Suspect)), "older");
        assert!(!suspect.holds(&entry(1, 3, Alive)), "refuted");
        assert!(!suspect.holds(&entry(1, 0, Down)), "declared down");
        assert!(!suspect.holds(&entry(2, 0, Alive)), "another address");
        let mut restarted = entry(1, 0, Alive).id().clone();
        restarted.generation += 1;
        let restarted = foca::Member::new(restarted, 0, Alive);
        assert!(
            !suspect.holds(&restarted),
            "another identity at the address"
        );
        // foca forgets members down for long enough, then takes even a copy again.
        let down = view(entry(1, 2, Down));
        assert!(!down.holds(&entry(1, 2, Down)));
        assert!(!down.holds(&entry(1, 1, Alive)));
    }

    /// Nodes of different builds exchange these fingerprints: the hash of an entry is
    /// part of the protocol, and must not change with the way it is computed.
    #[test]
    fn an_entry_hashes_the_same_in_every_build() {
        let with_zone = |zone: &str, state| {
            let mut member = entry(7, 3, state).id().clone();
            member.zone = Zone::new(zone).unwrap();
            entry_hash(&foca::Member::new(member, 3, state))
        };
        let hashes = [
            with_zone("z", foca::State::Alive),
            with_zone("zone-one", foca::State::Suspect),
            with_zone("a-zone-of-nineteen", foca::State::Down),
        ];
        assert_eq!(
            hashes,
            [
                0x2cdf_cd8a_1077_082c,
                0xe15a_d5f2_81e3_9f4f,
                0x0edd_8e0b_d1a6_e51c
            ]
        );
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_view_slot_is_one_cache_line() {
        assert_eq!((size_of::<Slot>(), align_of::<Slot>()), (64, 64));
    }

    #[test]
    fn a_view_finds_every_address_it_holds_and_no_other() {
        let at = |i: u64| -> SocketAddr {
            if i.is_multiple_of(2) {
                SocketAddr::from(([10, 0, (i / 200) as u8, (i % 200) as u8], 7000))
            } else {
                format!("[fd00::{i:x}]:7000").parse().unwrap()
            }
        };
        let held = |i: u64| {
            let mut member = entry(i, 0, foca::State::Alive).id().clone();
            member.addr = at(i);
            foca::Member::new(member, 0, foca::State::Alive)
        };
        let mut view = TableView::default();
        // One at a time, so the index grows several times.
        for i in 0..600 {
            view.expect(&[held(i)]);
        }
        for i in 0..600 {
            assert_eq!(view.get(&at(i)), Some(&held(i)), "{}", at(i));
        }
        for i in 600..1200 {
            assert_eq!(view.get(&at(i)), None, "{}", at(i));
        }
        // Another port at a held address is another address.
        assert_eq!(view.get(&SocketAddr::from(([10, 0, 0, 2], 7001))), None);
    }

    #[test]
    fn a_fingerprint_ignores_order_and_sees_every_field_that_matters() {
        let table: Vec<_> = (0..50).map(|i| entry(i, 0, foca::State::Alive)).collect();
        let of = |entries: &[foca::Member<Member>]| fingerprint(entries.iter());
        let mut shuffled = table.clone();
        shuffled.reverse();
        shuffled.swap(3, 17);
        assert_eq!(of(&table), of(&shuffled));
        let mut changed = table.clone();
        changed[7] = entry(7, 1, foca::State::Alive);
        assert_ne!(of(&table), of(&changed), "incarnation");
        changed[7] = entry(7, 0, foca::State::Suspect);
        assert_ne!(of(&table), of(&changed), "state");
        changed[7] = entry(7, 0, foca::State::Alive);
        let mut moved = changed[7].id().clone();
        moved.zone = Zone::new("elsewhere").unwrap();
        changed[7] = foca::Member::new(moved, 0, foca::State::Alive);
        assert_ne!(of(&table), of(&changed), "zone");
        assert_ne!(of(&table), of(&table[1..]), "one entry fewer");
        assert_ne!(of(&[]), of(&table[..1]));
    }
}
