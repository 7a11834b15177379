//! The simulator's event queue: the earliest event first, events due at the same time
//! in the order they were scheduled.
//!
//! A heap of small keys (time, sequence, slot) over a slab of the events themselves.
//! The heap moves keys, not events, as it sifts: a key is 24 bytes, where an event with
//! its time and sequence took a cache line, so each level of the heap costs less
//! memory traffic. Each key has four children, not two: a run pops every one of its
//! tens of millions of events, and a pop sifts a key down the heap's height, which four
//! children halve, reading them from two adjacent cache lines.
//! Freed slots are taken again last-freed first, so the slab stays as small as the
//! number of events pending and its recently used part stays in cache.

/// Children per key in the heap.
const ARITY: usize = 4;

/// Events of type `E`, each due at a time in nanoseconds.
#[derive(Debug)]
pub(crate) struct EventQueue<E> {
    /// A heap: every key is no later than its children, at `ARITY * i + 1` onwards.
    keys: Vec<Key>,
    slab: Vec<Option<E>>,
    free: Vec<u32>,
    sequence: u64,
}

/// Where an event sits in the heap's order, and in the slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    at: u64,
    sequence: u64,
    slot: u32,
}

impl Key {
    /// Sequences are unique, so `slot` never decides.
    fn before(&self, other: &Key) -> bool {
        (self.at, self.sequence) < (other.at, other.sequence)
    }
}

impl<E> EventQueue<E> {
    pub(crate) fn new() -> EventQueue<E> {
        EventQueue {
            keys: Vec::new(),
            slab: Vec::new(),
            free: Vec::new(),
            sequence: 0,
        }
    }

    /// Queues `event` at `at`, after every event already queued at that time.
    ///
    /// # Panics
    ///
    /// If more than `u32::MAX` events are pending at once.
    pub(crate) fn push(&mut self, at: u64, event: E) {
        self.sequence += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot as usize] = Some(event);
                slot
            }
            None => {
                let slot = u32::try_from(self.slab.len()).expect("pending events fit u32");
                self.slab.push(Some(event));
                slot
            }
        };
        self.keys.push(Key {
            at,
            sequence: self.sequence,
            slot,
        });
        self.sift_up(self.keys.len() - 1);
    }

    /// Takes the earliest event, with when it is due, if it is due by `end`.
    pub(crate) fn pop_due_by(&mut self, end: u64) -> Option<(u64, E)> {
        if self.keys.first()?.at > end {
            return None;
        }
        self.pop()
    }

    /// Takes the earliest event, with when it is due.
    fn pop(&mut self) -> Option<(u64, E)> {
        let last = self.keys.pop()?;
        let key = match self.keys.first_mut() {
            Some(first) => {
                let key = std::mem::replace(first, last);
                self.sift_down(0);
                key
            }
            None => last,
        };
        let event = self.slab[key.slot as usize]
            .take()
            .expect("a queued key's slot holds its event");
        self.free.push(key.slot);
        Some((key.at, event))
    }

    /// Moves the key at `at` up past every parent due after it.
    fn sift_up(&mut self, mut at: usize) {
        let key = self.keys[at];
        while at > 0 {
            let parent = (at - 1) / ARITY;
            if !key.before(&self.keys[parent]) {
                break;
            }
            self.keys[at] = self.keys[parent];
            at = parent;
        }
        self.keys[at] = key;
    }

    /// Moves the key at `at` down past every child due before it.
    fn sift_down(&mut self, mut at: usize) {
        let key = self.keys[at];
        let len = self.keys.len();
        loop {
            let first = ARITY * at + 1;
            if first >= len {
                break;
            }
            let children = &self.keys[first..len.min(first + ARITY)];
            let mut earliest = 0;
            for (i, child) in children.iter().enumerate().skip(1) {
                if child.before(&children[earliest]) {
                    earliest = i;
                }
            }
            if !children[earliest].before(&key) {
                break;
            }
            self.keys[at] = children[earliest];
            at = first + earliest;
        }
        self.keys[at] = key;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeMap;

    /// Against an ordered map keyed by (time, push order): pushes and pops
    /// interleaved, many events due at equal times, slots freed and taken again.
    #[test]
    fn events_come_out_by_time_then_in_the_order_they_were_pushed() {
        let mut queue = EventQueue::new();
        let mut model = BTreeMap::new();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut pushed = 0u64;
        let mut most_pending = 0;
        for round in 0..5_000u64 {
            for _ in 0..rng.random_range(0..4) {
                let at = round + rng.random_range(0..20u64);
                queue.push(at, pushed);
                model.insert((at, pushed), pushed);
                pushed += 1;
                most_pending = most_pending.max(model.len());
            }
            for _ in 0..rng.random_range(0..4) {
                let due_by = round + rng.random_range(0..10u64);
                let expected = match model.first_key_value() {
                    Some((&(at, _), _)) if at <= due_by => model.pop_first(),
                    _ => None,
                };
                let expected = expected.map(|((at, _), id)| (at, id));
                assert_eq!(queue.pop_due_by(due_by), expected);
            }
        }
        while let Some(expected) = model.pop_first().map(|((at, _), id)| (at, id)) {
            assert_eq!(queue.pop(), Some(expected));
        }
        assert_eq!((queue.len(), queue.pop()), (0, None));
        assert_eq!(queue.slab.len(), most_pending, "slots are taken again");
    }
}
