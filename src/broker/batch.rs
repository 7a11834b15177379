//! Adaptive batching for broker buses. At low rates each publish goes out at once, as
//! its own message; once the rate over the last 100 ms passes `burst_rate`, publishes
//! gather for `batch_window` and leave together, a repeated key coalescing into its
//! latest publish (a global scope stays global).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use syncbus_mesh::{InvalidationKind, Scope};
use tokio::time::Instant;

use super::codec::Entry;

/// The span the publish rate is measured over.
const RATE_SPAN: Duration = Duration::from_millis(100);

/// Entries waiting to be sent, and the recent publish rate.
pub(crate) struct Batcher {
    state: Mutex<State>,
}

struct State {
    pending: Vec<Entry>,
    index: HashMap<(InvalidationKind, String), usize>,
    flush_scheduled: bool,
    span_start: Instant,
    in_span: u64,
    previous_span: u64,
}

/// What became of a queued entry.
pub(crate) enum Queued {
    /// First in the batch: the caller schedules the flush.
    First,
    /// Joined a batch whose flush is already scheduled.
    Joined,
    /// Merged into a pending entry for the same key.
    Coalesced,
}

impl Batcher {
    pub(crate) fn new() -> Batcher {
        Batcher {
            state: Mutex::new(State {
                pending: Vec::new(),
                index: HashMap::new(),
                flush_scheduled: false,
                span_start: Instant::now(),
                in_span: 0,
                previous_span: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Updated with no code in between that can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one publish; true when publishes are arriving faster than `burst_rate`
    /// per second, or a batch is already gathering.
    pub(crate) fn bursting(&self, burst_rate: u64) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        let elapsed = now.duration_since(state.span_start);
        if elapsed >= RATE_SPAN {
            state.previous_span = if elapsed >= RATE_SPAN * 2 {
                0
            } else {
                state.in_span
            };
            state.in_span = 0;
            state.span_start = now;
        }
        state.in_span += 1;
        let per_span = burst_rate.saturating_mul(RATE_SPAN.as_millis() as u64) / 1000;
        state.flush_scheduled || state.in_span.max(state.previous_span) > per_span
    }

    /// Queues `entry`, coalescing with a pending entry for the same key; gives it back
    /// when `max_pending` entries already wait.
    pub(crate) fn push(&self, mut entry: Entry, max_pending: usize) -> Result<Queued, Entry> {
        let mut state = self.lock();
        let key = (entry.kind, entry.key.clone());
        if let Some(&at) = state.index.get(&key) {
            let merged = &mut state.pending[at];
            if merged.scope == Scope::Global {
                entry.scope = Scope::Global;
            }
            *merged = entry;
            return Ok(Queued::Coalesced);
        }
        if state.pending.len() >= max_pending {
            return Err(entry);
        }
        let at = state.pending.len();
        state.pending.push(entry);
        state.index.insert(key, at);
        if std::mem::replace(&mut state.flush_scheduled, true) {
            Ok(Queued::Joined)
        } else {
            Ok(Queued::First)
        }
    }

    /// Takes the batch, ready to send.
    pub(crate) fn take(&self) -> Vec<Entry> {
        let mut state = self.lock();
        state.index.clear();
        state.flush_scheduled = false;
        std::mem::take(&mut state.pending)
    }
}

/// Splits entries into runs whose encoded size stays under `limit` bytes (estimated
/// generously; a single entry is never split).
pub(crate) fn chunks(entries: Vec<Entry>, limit: usize) -> Vec<Vec<Entry>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for entry in entries {
        let estimate = 32
            + entry.key.len()
            + entry.region.as_ref().map_or(0, String::len)
            + entry.clock.0.keys().map(|w| w.len() + 10).sum::<usize>();
        if !current.is_empty() && size + estimate > limit {
            chunks.push(std::mem::take(&mut current));
            size = 0;
        }
        size += estimate;
        current.push(entry);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncbus_mesh::Invalidation;

    fn entry(key: &str, scope: Scope) -> Entry {
        let mut invalidation = Invalidation::key(key);
        invalidation.scope = scope;
        Entry::new(invalidation, None)
    }

    #[test]
    fn repeated_keys_coalesce_and_a_global_scope_stays_global() {
        let batcher = Batcher::new();
        assert!(matches!(
            batcher.push(entry("a", Scope::Global), 2),
            Ok(Queued::First)
        ));
        assert!(matches!(
            batcher.push(entry("b", Scope::Local), 2),
            Ok(Queued::Joined)
        ));
        assert!(matches!(
            batcher.push(entry("a", Scope::Local), 2),
            Ok(Queued::Coalesced)
        ));
        assert!(batcher.push(entry("c", Scope::Local), 2).is_err(), "full");
        let taken = batcher.take();
        assert_eq!(taken.len(), 2);
        assert_eq!(
            (taken[0].key.as_str(), taken[0].scope),
            ("a", Scope::Global)
        );
        assert!(matches!(
            batcher.push(entry("c", Scope::Local), 2),
            Ok(Queued::First)
        ));
    }

    #[test]
    fn chunks_stay_under_the_limit_and_keep_order() {
        let entries: Vec<Entry> = (0..100)
            .map(|i| entry(&format!("key:{i:04}"), Scope::Local))
            .collect();
        let chunks = chunks(entries, 500);
        assert!(chunks.len() > 5);
        let keys: Vec<String> = chunks.iter().flatten().map(|e| e.key.clone()).collect();
        assert_eq!(keys.len(), 100);
        assert_eq!(keys[99], "key:0099");
        let huge = entry(&"k".repeat(2000), Scope::Local);
        assert_eq!(
            super::chunks(vec![huge], 500).len(),
            1,
            "never split an entry"
        );
    }
}
