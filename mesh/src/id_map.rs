//! A map keyed by node id (or by address), laid out so that a lookup reads one place
//! in memory.
//!
//! A node following a thousand origins looks one of them up for every entry and digest
//! it receives, in memory that is cold by then (a simulator runs a thousand such nodes
//! in turn). `std`'s map reads a group of control bytes and then the entry, one cache
//! miss after the other. Here the entries sit in one array, each at the slot its key
//! hashes to or a few slots after it (linear probing, at most half full), so a lookup
//! starts reading the entry itself.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;

use crate::identity::{AddrKey, NodeId};

/// What an [`IdMap`] can be keyed by: a node id, or an address.
pub(crate) trait MapKey: Copy + Eq {
    /// The key as one word, to hash.
    fn word(self) -> u64;
}

impl MapKey for NodeId {
    fn word(self) -> u64 {
        self.0
    }
}

impl MapKey for SocketAddr {
    fn word(self) -> u64 {
        AddrKey::from(self).hash_word()
    }
}

/// Node ids (or other keys) to values; iterated in no particular order.
pub(crate) struct IdMap<V, K: MapKey = NodeId> {
    /// A power of two long, or empty; at most half full.
    slots: Vec<Option<Slot<K, V>>>,
    /// A bit per slot, set when it holds an entry: passes over every entry (sums over
    /// a thousand streams at every member-table exchange) read only the full slots.
    occupied: Vec<u64>,
    len: usize,
    /// Mixed into every hash: ids come off the wire, and a peer that could predict
    /// where they land could pick ids that all collide.
    key: u64,
}

// The id first, so that the key and the start of the value share a cache line.
#[repr(C)]
struct Slot<K, V> {
    id: K,
    value: V,
}

impl<V, K: MapKey> IdMap<V, K> {
    pub(crate) fn new() -> IdMap<V, K> {
        IdMap {
            slots: Vec::new(),
            occupied: Vec::new(),
            len: 0,
            key: RandomState::new().hash_one(0u64),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains_key(&self, id: &K) -> bool {
        self.position(*id).is_some()
    }

    pub(crate) fn get(&self, id: &K) -> Option<&V> {
        let at = self.position(*id)?;
        self.slots[at].as_ref().map(|slot| &slot.value)
    }

    /// Reads the slot where each of `ids` hashes and the one after it (nine in ten
    /// entries of a table half full sit in one of the two), so that lookups of them
    /// that follow find their entries in cache. These reads do not wait for one
    /// another, so the processor overlaps their cache misses, where lookups interleaved
    /// with the work on each entry take them one at a time: a zone's shared digests
    /// name a score of origins in one datagram.
    pub(crate) fn warm(&self, ids: impl Iterator<Item = K>) {
        if self.slots.is_empty() {
            return;
        }
        let mask = self.slots.len() - 1;
        let id_at = |at: usize| self.slots[at].as_ref().map_or(0, |slot| slot.id.word());
        let read = ids.fold(0, |read, id| {
            let home = self.home(id);
            read ^ id_at(home) ^ id_at((home + 1) & mask)
        });
        std::hint::black_box(read);
    }

    pub(crate) fn get_mut(&mut self, id: &K) -> Option<&mut V> {
        let at = self.position(*id)?;
        self.slots[at].as_mut().map(|slot| &mut slot.value)
    }

    /// The value of `id`, made by `make` if there was none.
    pub(crate) fn get_or_insert_with(&mut self, id: K, make: impl FnOnce() -> V) -> &mut V {
        match self.position(id) {
            Some(at) => {
                &mut self.slots[at]
                    .get_or_insert_with(|| Slot { id, value: make() })
                    .value
            }
            None => {
                // Made before the map changes, so that a panic in `make` leaves it whole.
                let value = make();
                if (self.len + 1) * 2 > self.slots.len() {
                    self.grow();
                }
                let at = self.free_slot(id);
                self.mark(at, true);
                self.len += 1;
                &mut self.slots[at].insert(Slot { id, value }).value
            }
        }
    }

    pub(crate) fn remove(&mut self, id: &K) -> Option<V> {
        let mut hole = self.position(*id)?;
        let removed = self.slots[hole].take().map(|slot| slot.value);
        self.mark(hole, false);
        self.len -= 1;
        // Entries after the hole that probed past it move back into it, so that every
        // entry stays reachable from its home slot without crossing an empty one.
        let mask = self.slots.len() - 1;
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let Some(slot) = &self.slots[at] else {
                break;
            };
            let home = self.home(slot.id);
            // Whether `home` lies cyclically in (hole, at]: then the entry stays.
            let stays = if hole < at {
                hole < home && home <= at
            } else {
                hole < home || home <= at
            };
            if !stays {
                self.slots[hole] = self.slots[at].take();
                self.mark(hole, true);
                self.mark(at, false);
                hole = at;
            }
        }
        removed
    }

    /// In slot order. Found from the set bits, a word of them at a time: a test per
    /// slot mispredicted a branch for about every other slot of a table half full.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let full = self
            .occupied
            .iter()
            .enumerate()
            .flat_map(|(word_at, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    let bit = bits.trailing_zeros() as usize;
                    bits &= bits.checked_sub(1)?;
                    Some(word_at * 64 + bit)
                })
            });
        full.filter_map(|at| self.slots[at].as_ref())
            .map(|slot| (&slot.id, &slot.value))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        let occupied = &self.occupied;
        self.slots
            .iter_mut()
            .enumerate()
            .filter(|(at, _)| is_set(occupied, *at))
            .filter_map(|(_, slot)| slot.as_mut())
            .map(|slot| (&slot.id, &mut slot.value))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, value)| value)
    }

    fn mark(&mut self, at: usize, full: bool) {
        let bit = 1 << (at % 64);
        if full {
            self.occupied[at / 64] |= bit;
        } else {
            self.occupied[at / 64] &= !bit;
        }
    }

    fn home(&self, id: K) -> usize {
        (crate::node::mix(id.word() ^ self.key) as usize) & (self.slots.len() - 1)
    }

    /// Where `id` is, if present.
    fn position(&self, id: K) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut at = self.home(id);
        loop {
            match &self.slots[at] {
                Some(slot) if slot.id == id => return Some(at),
                Some(_) => at = (at + 1) & mask,
                None => return None,
            }
        }
    }

    /// The first empty slot from where `id` hashes, onwards.
    fn free_slot(&self, id: K) -> usize {
        let mask = self.slots.len() - 1;
        let mut at = self.home(id);
        while self.slots[at].is_some() {
            at = (at + 1) & mask;
        }
        at
    }

    /// Makes room for `len` entries without growing again.
    pub(crate) fn reserve(&mut self, len: usize) {
        if len * 2 > self.slots.len() {
            self.resize((len * 2).next_power_of_two().max(16));
        }
    }

    fn grow(&mut self) {
        self.resize((self.slots.len() * 2).max(16));
    }

    /// Moves every entry into a table of `size` slots, a power of two.
    fn resize(&mut self, size: usize) {
        let old = std::mem::replace(&mut self.slots, Vec::with_capacity(size));
        self.slots.resize_with(size, || None);
        self.occupied = vec![0; size.div_ceil(64)];
        for slot in old.into_iter().flatten() {
            let at = self.free_slot(slot.id);
            self.slots[at] = Some(slot);
            self.mark(at, true);
        }
    }
}

fn is_set(bits: &[u64], at: usize) -> bool {
    bits[at / 64] >> (at % 64) & 1 == 1
}

impl<V, K: MapKey> Default for IdMap<V, K> {
    fn default() -> Self {
        IdMap::new()
    }
}

impl<V: std::fmt::Debug, K: MapKey + std::fmt::Debug> std::fmt::Debug for IdMap<V, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        Reserve(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct ids, so that removals hit and probe runs form and wrap.
        prop_oneof![
            (0..64u64, any::<u32>()).prop_map(|(id, v)| Op::Insert(id, v)),
            (0..64u64).prop_map(Op::Remove),
            (0..100usize).prop_map(Op::Reserve),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_a_map(ops in proptest::collection::vec(op(), 0..400)) {
            let mut map = IdMap::new();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(id, v) => {
                        *map.get_or_insert_with(NodeId(id), || v) = v;
                        model.insert(id, v);
                    }
                    Op::Remove(id) => {
                        prop_assert_eq!(map.remove(&NodeId(id)), model.remove(&id));
                    }
                    Op::Reserve(len) => map.reserve(len),
                }
                // Reads only: nothing to see but that it does not panic.
                map.warm((0..66).map(NodeId));
                prop_assert_eq!(map.len(), model.len());
                for id in 0..64 {
                    prop_assert_eq!(map.get(&NodeId(id)), model.get(&id));
                }
                prop_assert!(map.slots.is_empty() || map.len() * 2 <= map.slots.len());
                for (at, slot) in map.slots.iter().enumerate() {
                    prop_assert_eq!(slot.is_some(), is_set(&map.occupied, at));
                }
            }
            let mut listed: Vec<(u64, u32)> = map.iter().map(|(id, v)| (id.0, *v)).collect();
            listed.sort_unstable();
            prop_assert_eq!(listed, model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_map_filled_up_to_what_it_reserved_does_not_grow() {
        let mut map = IdMap::new();
        map.reserve(1000);
        let slots = map.slots.len();
        assert_eq!(slots, 2048);
        for id in 0..1000 {
            map.get_or_insert_with(NodeId(id), || id);
        }
        assert_eq!(map.slots.len(), slots);
        assert!((0..1000).all(|id| map.get(&NodeId(id)) == Some(&id)));
        map.reserve(10);
        assert_eq!(map.slots.len(), slots, "never shrinks");
    }

    /// Keyed by address: equal only when the whole address is, scope and all, though
    /// addresses differing in scope alone hash alike.
    #[test]
    fn addresses_key_a_map_by_their_whole_value() {
        let v4 = |port| SocketAddr::from(([127, 1, 0, 1], port));
        let v6 = |scope| {
            let ip = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
            SocketAddr::V6(std::net::SocketAddrV6::new(ip, 7000, 0, scope))
        };
        let mut set: IdMap<(), SocketAddr> = IdMap::new();
        for addr in [v4(7000), v4(7001), v6(1), v6(2)] {
            set.get_or_insert_with(addr, || ());
        }
        assert_eq!(set.len(), 4);
        assert!(set.contains_key(&v6(2)) && !set.contains_key(&v6(3)));
        assert!(!set.contains_key(&v4(7002)));
        assert_eq!(set.remove(&v6(1)), Some(()));
        assert!(set.contains_key(&v6(2)) && !set.contains_key(&v6(1)));
    }

    #[test]
    fn a_value_that_fails_to_be_made_leaves_the_map_whole() {
        let mut map: IdMap<u32> = IdMap::new();
        map.get_or_insert_with(NodeId(1), || 1);
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            map.get_or_insert_with(NodeId(5), || panic!("no value"));
        }));
        assert!(failed.is_err());
        assert_eq!(map.len(), 1);
        assert_eq!(map.iter().count(), 1);
        assert!(!map.contains_key(&NodeId(5)));
    }

    #[test]
    fn a_value_is_made_only_when_missing() {
        let mut map = IdMap::new();
        assert_eq!(*map.get_or_insert_with(NodeId(7), || 1), 1);
        assert_eq!(*map.get_or_insert_with(NodeId(7), || 2), 1);
        for (_, value) in map.iter_mut() {
            *value += 10;
        }
        assert_eq!(map.values().sum::<i32>(), 11);
        assert_eq!(map.get(&NodeId(7)), Some(&11));
        assert!(map.contains_key(&NodeId(7)));
        assert!(!map.contains_key(&NodeId(8)));
        assert_eq!(map.remove(&NodeId(8)), None);
        assert_eq!(format!("{map:?}"), "{NodeId(0000000000000007): 11}");
    }
}
