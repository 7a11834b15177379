//! The `Bus` trait every backend implements, and the options of a publish.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use syncbus_mesh::{Invalidation, InvalidationKind, NodeId, Scope, VectorClock, Zone};

use crate::error::Error;
use crate::event::Peer;
use crate::metrics::Metrics;
use crate::subscription::Subscription;

/// How long an awaited publish waits for acknowledgements when its options name no
/// deadline: long enough for retransmissions across a lossy LAN, short enough that a
/// caller holding a request open hears back.
pub const DEFAULT_AWAIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Metadata and deadline of one publish. `PublishOptions::default()` is a plain, local
/// invalidation with no deadline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// The region the write happened in, carried to subscribers.
    pub region: Option<String>,
    /// How far the event should travel between federated clusters.
    pub scope: Scope,
    /// The writer's vector clock, carried untouched.
    pub vector_clock: VectorClock,
    /// When to give up: waiting for room in the outgoing queue, and for
    /// acknowledgements. Awaited publishes without one use [`DEFAULT_AWAIT_TIMEOUT`].
    pub deadline: Option<Instant>,
}

impl PublishOptions {
    /// Options with nothing set.
    pub fn new() -> PublishOptions {
        PublishOptions::default()
    }

    /// Names the region.
    pub fn region(mut self, region: impl Into<String>) -> PublishOptions {
        self.region = Some(region.into());
        self
    }

    /// Sets the scope.
    pub fn scope(mut self, scope: Scope) -> PublishOptions {
        self.scope = scope;
        self
    }

    /// Sets the vector clock.
    pub fn vector_clock(mut self, clock: VectorClock) -> PublishOptions {
        self.vector_clock = clock;
        self
    }

    /// Gives up at `deadline`.
    pub fn deadline(mut self, deadline: Instant) -> PublishOptions {
        self.deadline = Some(deadline);
        self
    }

    /// Gives up `timeout` from now.
    pub fn timeout(self, timeout: Duration) -> PublishOptions {
        self.deadline(Instant::now() + timeout)
    }

    /// `Timeout` if the deadline has passed already.
    pub(crate) fn check_deadline(&self) -> Result<(), Error> {
        match self.deadline {
            Some(deadline) if deadline <= Instant::now() => Err(Error::Timeout),
            _ => Ok(()),
        }
    }

    pub(crate) fn invalidation(&self, kind: InvalidationKind, key: &str) -> Invalidation {
        Invalidation {
            kind,
            key: key.to_owned(),
            region: self.region.clone(),
            scope: self.scope,
            vector_clock: self.vector_clock.clone(),
        }
    }
}

/// Who acknowledged an awaited publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acknowledged {
    /// Distinct replicas that applied the invalidation.
    pub replicas: usize,
    /// Those replicas' node ids, where the bus knows them.
    pub nodes: Vec<NodeId>,
    /// The distinct zones among them, where the bus knows them.
    pub zones: Vec<Zone>,
}

/// A bus that carries invalidations between the nodes of a cluster.
///
/// Object-safe: hold it as `Arc<dyn Bus>` and pick the backend from configuration.
///
/// Semantics every backend keeps:
/// - a publish of a key already waiting in the same outgoing batch coalesces with it;
/// - acknowledgements count distinct remote replicas, never the publisher itself, and a
///   goal that cannot be met by the replicas known now fails at once;
/// - a backend that cannot count acknowledgements honestly returns
///   [`Error::QuorumUnsupported`];
/// - a subscriber that may have missed events receives a resync event (see
///   [`EventKind::Resync`](crate::EventKind::Resync)) instead of silently losing them.
#[async_trait]
pub trait Bus: Send + Sync {
    /// Broadcasts an invalidation of `key`, to this bus's own subscribers too. Returns
    /// once it is accepted for delivery (queued or sent), not when it arrives. Waits
    /// while the outgoing queue is full, up to the options' deadline.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped before it returns, nothing was published.
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), Error>;

    /// Like [`publish`](Self::publish), but never waits: when the outgoing queue is
    /// full it returns [`Error::QueueFull`] at once and publishes nothing.
    fn try_publish(&self, key: &str, options: PublishOptions) -> Result<(), Error>;

    /// Broadcasts an invalidation of `key` and waits until `replicas` distinct remote
    /// replicas applied it (delivered it to their subscribers, or found none), or the
    /// deadline passes ([`DEFAULT_AWAIT_TIMEOUT`] when the options name none).
    ///
    /// A goal larger than the replicas known now fails at once with
    /// [`Error::QuorumNotSatisfied`] and publishes nothing. At the deadline, the error
    /// says who acknowledged.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the wait and frees its tracking; an invalidation
    /// already queued still goes out.
    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error>;

    /// Like [`publish_and_await`](Self::publish_and_await), but waits until the
    /// acknowledging replicas span `min_zones` distinct zones (the publisher's own zone
    /// counts only through other nodes in it).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the wait and frees its tracking; an invalidation
    /// already queued still goes out.
    async fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error>;

    /// Subscribes to invalidations of exactly `key`.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped before it returns, no subscription was added.
    async fn subscribe(&self, key: &str) -> Result<Subscription, Error>;

    /// Subscribes to invalidations of every key starting with `prefix` (`""` for all).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped before it returns, no subscription was added.
    async fn subscribe_prefix(&self, prefix: &str) -> Result<Subscription, Error>;

    /// Ends `subscription`: it is removed at once, and its stream ends after the events
    /// already queued. Unsubscribing twice is not an error.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped before it returns, the subscription is untouched.
    async fn unsubscribe(&self, subscription: &Subscription) -> Result<(), Error>;

    /// Broadcasts the revocation of lease `id`. Reaches lease subscribers only.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped before it returns, nothing was published.
    async fn revoke_lease(&self, id: &str, options: PublishOptions) -> Result<(), Error>;

    /// Subscribes to revocations of lease `id`.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped before it returns, no subscription was added.
    async fn subscribe_lease(&self, id: &str) -> Result<Subscription, Error>;

    /// Ends a lease subscription; the same as [`unsubscribe`](Self::unsubscribe).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped before it returns, the subscription is untouched.
    async fn unsubscribe_lease(&self, subscription: &Subscription) -> Result<(), Error> {
        self.unsubscribe(subscription).await
    }

    /// Shuts the bus down: pending events are sent where the backend can, every
    /// subscription ends, and later operations fail with [`Error::Closed`]. The mesh
    /// leaves its cluster so peers see it gone at once.
    ///
    /// # Cancel safety
    ///
    /// The shutdown, once started, completes in the background.
    async fn shutdown(&self) -> Result<(), Error>;

    /// True only when the bus can deliver: running, connected, and (for the mesh) not
    /// alone when it was given seeds.
    fn is_healthy(&self) -> bool;

    /// The live remote members the bus knows.
    fn peers(&self) -> Vec<Peer>;

    /// The bus's counters.
    fn metrics(&self) -> Metrics;
}
