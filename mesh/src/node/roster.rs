//! The live members of one zone, kept in the two orders relays are chosen in.
//!
//! An origin picks relays for every batch and every digest round. It used to copy
//! each zone's addresses out of an ordered set for each pick (nine zones of a hundred
//! members each in a thousand-node cluster) and rank a zone afresh for each digest
//! relay; a roster keeps both orders ready, updated only when a member comes or goes.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::id_map::IdMap;
use crate::identity::NodeId;

/// One zone's live members (this node excluded).
#[derive(Debug, Default)]
pub(super) struct ZoneRoster {
    /// By address.
    addrs: Vec<SocketAddr>,
    /// Beside each of `addrs`, whether it is in the second half of the zone
    /// ([`in_second_half`]): a relay forwarding to half of its zone reads it for each
    /// member of a hundred, where hashing every address took a percent of a
    /// thousand-node run.
    second_half: Vec<bool>,
    /// By [`relay_rank`], highest first; equal ranks by address, highest first.
    ranked: Vec<(u64, SocketAddr)>,
}

impl ZoneRoster {
    pub(super) fn len(&self) -> usize {
        self.addrs.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The members' addresses, in address order.
    pub(super) fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The members' addresses in address order: all of them, or those of one half
    /// (the second when `half` is `Some(true)`).
    pub(super) fn addrs_in(&self, half: Option<bool>) -> impl Iterator<Item = SocketAddr> + '_ {
        self.addrs
            .iter()
            .zip(&self.second_half)
            .filter(move |(_, second)| half.is_none_or(|wanted| wanted == **second))
            .map(|(addr, _)| *addr)
    }

    pub(super) fn insert(&mut self, addr: SocketAddr) {
        if let Err(at) = self.addrs.binary_search(&addr) {
            self.addrs.insert(at, addr);
            self.second_half.insert(at, in_second_half(&addr));
            let entry = (relay_rank(&addr), addr);
            let at = self.ranked.partition_point(|known| *known > entry);
            self.ranked.insert(at, entry);
        }
    }

    pub(super) fn remove(&mut self, addr: &SocketAddr) {
        if let Ok(at) = self.addrs.binary_search(addr) {
            self.addrs.remove(at);
            self.second_half.remove(at);
            let entry = (relay_rank(addr), *addr);
            let at = self.ranked.partition_point(|known| *known > entry);
            self.ranked.remove(at);
        }
    }

    /// Whether any of the members is in `suspects`.
    pub(super) fn any_in(&self, suspects: &BTreeSet<SocketAddr>) -> bool {
        !suspects.is_empty() && self.addrs.iter().any(|addr| suspects.contains(addr))
    }

    /// Where the digests an origin sends in digest slot `slot` (its clock divided
    /// into `digest_interval`s; a round after the first counts on from the first's
    /// slot) enter the zone: its members not in `suspects` (all of them, if every one
    /// is suspected), ranked by a hash of their address, and the `slot`-th of them
    /// (counting round and round). Every origin ranks alike and rounds follow one
    /// another a `digest_interval` apart, so:
    /// - the digests of every origin sending within one slot meet at one relay, which
    ///   sends its zone one datagram for all of them; choosing by round instead, the
    ///   second and third rounds of origins that published earlier went to other
    ///   relays in the same interval, and each relay sent its own datagram to the
    ///   whole zone;
    /// - an origin's successive rounds take successive relays, as many as the zone
    ///   has.
    ///
    /// Two origins that see a zone differently during churn, or whose clocks
    /// disagree, may pick different relays: that costs datagrams, not coverage.
    pub(super) fn digest_relay(
        &self,
        suspects: &BTreeSet<SocketAddr>,
        slot: u64,
    ) -> Option<SocketAddr> {
        let nth = |len: usize| (slot % len as u64) as usize;
        let mut healthy = self
            .ranked
            .iter()
            .filter(|(_, addr)| !suspects.contains(addr));
        let pool_len = match healthy.clone().count() {
            0 if self.ranked.is_empty() => return None,
            0 => return Some(self.ranked[nth(self.ranked.len())].1),
            count => count,
        };
        healthy.nth(nth(pool_len)).map(|(_, addr)| *addr)
    }
}

/// The live members of this node's zone: ids by address, hashed, for the question
/// asked of every transmit and every datagram of a zone's digests, whether an address
/// is one of them (a search of an ordered map read a few cold nodes of a B-tree each
/// time). In address order, the same addresses are the zone's [`ZoneRoster`].
#[derive(Default)]
pub(super) struct ZonePeers {
    ids: IdMap<NodeId, SocketAddr>,
}

impl ZonePeers {
    pub(super) fn insert(&mut self, addr: SocketAddr, id: NodeId) {
        *self.ids.get_or_insert_with(addr, || id) = id;
    }

    pub(super) fn remove(&mut self, addr: &SocketAddr) {
        self.ids.remove(addr);
    }

    pub(super) fn contains(&self, addr: &SocketAddr) -> bool {
        self.ids.contains_key(addr)
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Ids by address, in no particular order: sort what the order would show in.
    pub(super) fn iter_unordered(&self) -> impl Iterator<Item = (&SocketAddr, &NodeId)> {
        self.ids.iter()
    }
}

/// Picks up to `wanted` members of `pool` at random into `chosen`: each draw takes one
/// of those left, and the last one left takes its place, as `Vec::swap_remove` would
/// (the draws, and so the choice, are those of the copy-and-remove this replaces), but
/// without copying the pool.
pub(super) fn choose_from(
    pool: &[SocketAddr],
    wanted: usize,
    rng: &mut ChaCha8Rng,
    chosen: &mut Vec<SocketAddr>,
) {
    // Positions whose member a removal replaced: at most `wanted` of them.
    let mut moved: Vec<(usize, SocketAddr)> = Vec::new();
    let at = |moved: &[(usize, SocketAddr)], index: usize| {
        moved
            .iter()
            .rev()
            .find(|(position, _)| *position == index)
            .map_or(pool[index], |(_, addr)| *addr)
    };
    let mut left = pool.len();
    while chosen.len() < wanted && left > 0 {
        let pick = rng.random_range(0..left);
        chosen.push(at(&moved, pick));
        let last = at(&moved, left - 1);
        moved.push((pick, last));
        left -= 1;
    }
}

/// Whether a member is in the second half of its zone, for relays that forward a
/// batch to one half each: by its rank, so every node sees the halves alike.
pub(super) fn in_second_half(addr: &SocketAddr) -> bool {
    relay_rank(addr) & 1 == 1
}

/// A member's rank among the relays of its zone: from its address as explicit
/// integers, so the same on every node and every build.
fn relay_rank(addr: &SocketAddr) -> u64 {
    let (family, bits, port) = super::sync::address_words(addr);
    let words = [
        u64::from(family) << 16 | u64::from(port),
        bits as u64,
        (bits >> 64) as u64,
    ];
    words
        .iter()
        .fold(0, |hash, word| super::sync::mix(hash ^ word))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    /// The choice a roster's relay must equal: rank the healthy members (or, with none,
    /// the suspected ones) afresh, highest first, and take the `slot`-th.
    fn ranked_afresh(
        healthy: &[SocketAddr],
        suspected: &[SocketAddr],
        slot: u64,
    ) -> Option<SocketAddr> {
        let pool = if healthy.is_empty() {
            suspected
        } else {
            healthy
        };
        let mut ranked: Vec<(u64, SocketAddr)> =
            pool.iter().map(|addr| (relay_rank(addr), *addr)).collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        ranked
            .get((slot % ranked.len().max(1) as u64) as usize)
            .map(|(_, addr)| *addr)
    }

    /// The choice `choose_from` must equal: copy the pool, and draw with `swap_remove`.
    fn drawn_from_a_copy(
        pool: &[SocketAddr],
        wanted: usize,
        rng: &mut ChaCha8Rng,
        chosen: &mut Vec<SocketAddr>,
    ) {
        let mut pool = pool.to_vec();
        while chosen.len() < wanted && !pool.is_empty() {
            let pick = rng.random_range(0..pool.len());
            chosen.push(pool.swap_remove(pick));
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 7946))
    }

    fn roster_of(addrs: &[SocketAddr]) -> ZoneRoster {
        let mut roster = ZoneRoster::default();
        for addr in addrs {
            roster.insert(*addr);
        }
        roster
    }

    #[test]
    fn digest_slots_take_distinct_relays_the_same_for_every_origin() {
        let zone: Vec<SocketAddr> = (0..3).map(addr).collect();
        let none = BTreeSet::new();
        let roster = roster_of(&zone);
        let relays: Vec<SocketAddr> = (40..44)
            .map(|slot| roster.digest_relay(&none, slot).unwrap())
            .collect();
        let distinct: BTreeSet<SocketAddr> = relays[..3].iter().copied().collect();
        assert_eq!(distinct.len(), 3, "{relays:?}");
        assert_eq!(relays[3], relays[0], "past the last member, start over");
        // Another origin learned the zone in another order: the same relays.
        let reversed: Vec<SocketAddr> = zone.iter().rev().copied().collect();
        let other = roster_of(&reversed);
        for (slot, relay) in (40..44).zip(&relays) {
            assert_eq!(other.digest_relay(&none, slot), Some(*relay));
        }
        // Suspected members only when no healthy one is left.
        let suspects: BTreeSet<SocketAddr> = zone[1..].iter().copied().collect();
        assert_eq!(roster.digest_relay(&suspects, 2), Some(zone[0]));
        let all: BTreeSet<SocketAddr> = zone.iter().copied().collect();
        assert!(zone.contains(&roster.digest_relay(&all, 1).unwrap()));
        assert_eq!(ZoneRoster::default().digest_relay(&none, 1), None);
    }

    #[test]
    fn members_leave_both_orders() {
        let mut roster = roster_of(&[addr(3), addr(1), addr(2), addr(1)]);
        assert_eq!(roster.addrs(), [addr(1), addr(2), addr(3)]);
        roster.remove(&addr(2));
        roster.remove(&addr(9));
        assert_eq!(roster.addrs(), [addr(1), addr(3)]);
        let none = BTreeSet::new();
        let relays: BTreeSet<SocketAddr> = (0..4)
            .filter_map(|slot| roster.digest_relay(&none, slot))
            .collect();
        assert_eq!(relays, BTreeSet::from([addr(1), addr(3)]));
        roster.remove(&addr(1));
        roster.remove(&addr(3));
        assert!(roster.is_empty());
        assert_eq!(roster.digest_relay(&none, 0), None);
    }

    proptest! {
        /// Whatever the order members came and went in, and whoever is suspected, a
        /// roster picks the relay ranking afresh would, and draws the relays a copy
        /// of the pool would.
        #[test]
        fn choices_match_choosing_afresh(
            joins in proptest::collection::vec(0u8..40, 0..60),
            leaves in proptest::collection::vec(0u8..40, 0..20),
            suspected in proptest::collection::btree_set(0u8..40, 0..10),
            slot in any::<u64>(),
            seed in any::<u64>(),
            wanted in 0usize..5,
        ) {
            let mut roster = ZoneRoster::default();
            let mut members = BTreeSet::new();
            for i in &joins {
                roster.insert(addr(*i));
                members.insert(addr(*i));
            }
            for i in &leaves {
                roster.remove(&addr(*i));
                members.remove(&addr(*i));
            }
            let members: Vec<SocketAddr> = members.into_iter().collect();
            prop_assert_eq!(roster.addrs(), &members[..]);
            prop_assert_eq!(roster.len(), members.len());
            let suspects: BTreeSet<SocketAddr> = suspected.iter().map(|i| addr(*i)).collect();
            let (sick, healthy): (Vec<SocketAddr>, Vec<SocketAddr>) =
                members.iter().partition(|a| suspects.contains(a));
            prop_assert_eq!(
                roster.digest_relay(&suspects, slot),
                ranked_afresh(&healthy, &sick, slot)
            );
            prop_assert_eq!(roster.any_in(&suspects), !sick.is_empty());
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut reference = ChaCha8Rng::seed_from_u64(seed);
            for pool in [&healthy, &sick] {
                choose_from(pool, wanted, &mut rng, &mut ours);
                drawn_from_a_copy(pool, wanted, &mut reference, &mut theirs);
            }
            prop_assert_eq!(ours, theirs);
            prop_assert_eq!(rng.random_range(0..u64::MAX), reference.random_range(0..u64::MAX));
        }
    }
}
