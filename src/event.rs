//! What subscribers receive, and who the bus knows.

use std::net::SocketAddr;

use syncbus_mesh::{Delivery, InvalidationKind, NodeId, Scope, VectorClock, Zone};

/// One event delivered to a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The invalidated key or revoked lease id. For a resync: the key, prefix or lease id
    /// the subscription was made for.
    pub key: String,
    /// The node that published it, where the bus knows.
    pub origin: Option<NodeId>,
    /// The origin's zone, where the bus knows.
    pub zone: Option<Zone>,
    /// The region named by the publisher.
    pub region: Option<String>,
    /// How far the publisher wanted it to travel between federated clusters.
    pub scope: Scope,
    /// The publisher's vector clock, untouched.
    pub vector_clock: VectorClock,
}

/// The kinds of event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// Drop the key from the cache.
    Invalidate,
    /// The lease was revoked.
    LeaseRevoked,
    /// The subscriber may have missed events: drop everything this subscription covers.
    Resync(ResyncReason),
}

/// Why a subscriber may have missed events.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResyncReason {
    /// The subscription's buffer was full and events were dropped: the consumer was too
    /// slow.
    Overflow,
    /// The connection to the broker dropped and came back: what was published
    /// meanwhile may be lost.
    Disconnected,
    /// Invalidations from a node were lost in the network and could not be recovered.
    /// `Event::origin` names the node.
    Lost {
        /// How many were lost, as far as sequence numbers tell.
        missed: u64,
    },
}

impl Event {
    /// An event with no metadata.
    pub fn new(kind: EventKind, key: impl Into<String>) -> Event {
        Event {
            kind,
            key: key.into(),
            origin: None,
            zone: None,
            region: None,
            scope: Scope::Local,
            vector_clock: VectorClock::new(),
        }
    }

    /// True for resync events.
    pub fn is_resync(&self) -> bool {
        matches!(self.kind, EventKind::Resync(_))
    }

    pub(crate) fn from_delivery(delivery: Delivery) -> Event {
        let invalidation = delivery.invalidation;
        let kind = match invalidation.kind {
            InvalidationKind::Key => EventKind::Invalidate,
            InvalidationKind::Lease => EventKind::LeaseRevoked,
        };
        Event {
            kind,
            key: invalidation.key,
            origin: Some(delivery.origin),
            zone: delivery.zone,
            region: invalidation.region,
            scope: invalidation.scope,
            vector_clock: invalidation.vector_clock,
        }
    }
}

/// A live member the bus knows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    /// The member's node id.
    pub id: NodeId,
    /// Its address, where the bus knows it.
    pub addr: Option<SocketAddr>,
    /// Its zone, where the bus knows it.
    pub zone: Option<Zone>,
}
