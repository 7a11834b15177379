//! What travels: an invalidation of a cache key or a lease, with its metadata.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What an invalidation names.
///
/// Keys and leases are separate namespaces: revoking lease `x` never reaches a
/// subscriber of key `x` or of key `lease:x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum InvalidationKind {
    /// A cache key to drop.
    Key,
    /// A lease that was revoked.
    Lease,
}

/// How far an invalidation should travel once several clusters are federated.
///
/// The mesh itself delivers both to every member; relays between clusters forward only
/// `Global` events.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Scope {
    /// This cluster only.
    #[default]
    Local,
    /// Every federated cluster.
    Global,
}

/// A vector clock: a counter per writer, for applications that order writes causally.
///
/// syncbus carries it untouched; it never compares clocks itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VectorClock(pub BTreeMap<String, u64>);

impl VectorClock {
    /// An empty clock.
    pub fn new() -> VectorClock {
        VectorClock::default()
    }

    /// Sets `writer`'s counter, returning the clock for chaining.
    pub fn with(mut self, writer: impl Into<String>, counter: u64) -> VectorClock {
        self.0.insert(writer.into(), counter);
        self
    }

    /// True when no writer has a counter.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One invalidation as published and delivered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Invalidation {
    /// Key or lease.
    pub kind: InvalidationKind,
    /// The cache key, or the lease id.
    pub key: String,
    /// The region it was published in, when the publisher named one.
    pub region: Option<String>,
    /// How far it should travel between federated clusters.
    pub scope: Scope,
    /// The publisher's vector clock, carried untouched.
    pub vector_clock: VectorClock,
}

impl Invalidation {
    /// An invalidation of cache key `key` with no metadata.
    pub fn key(key: impl Into<String>) -> Invalidation {
        Invalidation {
            kind: InvalidationKind::Key,
            key: key.into(),
            region: None,
            scope: Scope::Local,
            vector_clock: VectorClock::new(),
        }
    }

    /// A revocation of lease `id` with no metadata.
    pub fn lease(id: impl Into<String>) -> Invalidation {
        Invalidation {
            kind: InvalidationKind::Lease,
            ..Invalidation::key(id)
        }
    }
}
