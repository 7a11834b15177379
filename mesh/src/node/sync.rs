//! Anti-entropy. Every `sync_interval` a node sends its table to one random member,
//! which answers with its own: every member foca knows, with its state, and the newest
//! sequence number known of each origin.
//!
//! Gossip carries each membership update a bounded number of times, so in a large or
//! lossy cluster a few nodes miss one (a join, a death, a rejoin after a partition);
//! the next exchange brings it, instead of the node's own probes stumbling on it up to
//! a cluster's worth of periods later. Likewise an origin's digests are few: a node
//! that lost an origin's newest entries and every digest after them learns from a peer
//! that the stream goes further, and asks the origin for the rest. A peer's word is
//! only a reason to ask: it never opens a hole, so a false claim cannot make a node
//! give entries up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use rand::RngExt;

use super::Node;
use crate::identity::Member;
use crate::timers::Wake;
use crate::wire::{self, Header, SyncItem};

/// Answers a node gives per interval at most. About one is expected (every member
/// starts one exchange per interval with a random partner); the cap keeps a stream of
/// requests from making this node an amplifier.
pub(super) const ANSWERS_PER_INTERVAL: u32 = 4;

impl Node {
    /// Sets the next exchange between half and one and a half intervals from now, so
    /// nodes started together do not exchange in lockstep.
    pub(super) fn schedule_sync(&mut self) {
        let interval = self.config.membership.sync_interval;
        let nanos = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
        let delay = self
            .rng
            .random_range(nanos / 2..=nanos.saturating_add(nanos / 2));
        let at = self.now + Duration::from_nanos(delay);
        self.timers.set(at, Wake::Sync);
    }

    /// Sends this node's table to one random live member, asking for its table back.
    pub(super) fn start_sync(&mut self) {
        self.sync_answers_left = ANSWERS_PER_INTERVAL;
        self.schedule_sync();
        if self.members.is_empty() {
            return;
        }
        let pick = self.rng.random_range(0..self.members.len());
        if let Some(partner) = self.members.keys().nth(pick).copied() {
            self.send_table(partner, true);
        }
    }

    /// The whole table foca keeps (members declared down included, so deaths spread
    /// too), with this node itself at the front; then the newest sequence number this
    /// node knows of for itself and for each live origin it follows.
    fn send_table(&mut self, to: SocketAddr, answer: bool) {
        let members = self.swim.iter_membership_state();
        let mut items = Vec::with_capacity(members.len() + 1 + self.by_id.len());
        items.push(SyncItem::Member(foca::Member::alive(self.local.clone())));
        items.extend(members.cloned().map(SyncItem::Member));
        let own = (self.local.id, self.last_published());
        let followed = self
            .origins
            .known_ends()
            .filter(|(origin, _)| self.by_id.contains_key(origin));
        let progress = std::iter::once(own)
            .chain(followed)
            .filter(|(_, last)| *last > 0)
            .map(|(origin, last)| SyncItem::Progress { origin, last });
        items.extend(progress);
        let max = self.config.datagram_budget();
        for datagram in wire::encode_sync(self.cluster, answer, &items, max) {
            self.queue_transmit(to, datagram);
        }
    }

    /// Hands foca what a live member's table says that this node did not know, asks
    /// origins for entries past what this node knows of their streams, and answers with
    /// this node's table when asked. Tables from anyone else are dropped: an answer is
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
        for item in items {
            match item {
                SyncItem::Member(member) => table.push(member),
                SyncItem::Progress { origin, last } => self.hear_claim(origin, last),
            }
        }
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
            let outcome = self.drive_swim(|swim, out| swim.apply_many(news.into_iter(), true, out));
            if let Err(error) = outcome {
                tracing::debug!(peer = %from, %error, "member table from a peer rejected");
                self.stats.dropped.membership += 1;
            }
        }
        let asked = header.flags & wire::FLAG_ANSWER != 0;
        if asked && self.sync_answers_left > 0 {
            self.sync_answers_left -= 1;
            self.send_table(from, false);
        }
    }

    /// The entries of a peer's table that would change foca's: identities it does not
    /// know, alive, and newer states of those it knows. Identities declared down that
    /// it never knew are left out: there is nothing to take back.
    fn news(&self, table: Vec<foca::Member<Member>>) -> Vec<foca::Member<Member>> {
        // By address, with whether foca knows the address.
        let mut news: BTreeMap<SocketAddr, (foca::Member<Member>, bool)> = table
            .into_iter()
            .map(|member| (member.id().addr, (member, false)))
            .collect();
        for known in self.swim.iter_membership_state() {
            let addr = known.id().addr;
            match news.get_mut(&addr) {
                // "Known" is by identity: a death of another identity at a known
                // address is not news (a forged one would otherwise keep coming back).
                Some((update, seen)) if changes(known, update) => *seen = known.id() == update.id(),
                Some(_) => {
                    news.remove(&addr);
                }
                None => {}
            }
        }
        news.into_values()
            .filter(|(update, known)| {
                if update.id().addr == self.local.addr {
                    // Only a suspicion or death of this node, or an older identity at
                    // its address, is news; foca refutes or retires them.
                    update.id() != &self.local || update.state() != foca::State::Alive
                } else {
                    *known || update.state() != foca::State::Down
                }
            })
            .map(|(update, _)| update)
            .collect()
    }
}

/// Whether `update` tells foca something about `known` (same address): another
/// identity (foca settles which one wins), or a later incarnation or graver state of
/// the same one. Down is final for an identity.
fn changes(known: &foca::Member<Member>, update: &foca::Member<Member>) -> bool {
    if known.id() != update.id() {
        return true;
    }
    if known.state() == foca::State::Down {
        return false;
    }
    let rank = |state: foca::State| match state {
        foca::State::Alive => 0,
        foca::State::Suspect => 1,
        foca::State::Down => 2,
    };
    update.incarnation() > known.incarnation()
        || (update.incarnation() == known.incarnation()
            && rank(update.state()) > rank(known.state()))
}
