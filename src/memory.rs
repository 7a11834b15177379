//! A bus inside one process: for tests, and for applications whose caches share a
//! process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use syncbus_mesh::{Delivery, Invalidation, InvalidationKind, NodeId};

use crate::bus::{Acknowledged, Bus, PublishOptions};
use crate::error::Error;
use crate::event::{Event, EventKind, Peer};
use crate::metrics::Metrics;
use crate::subscription::{Registry, Subscription, Topic};

/// Settings of an [`InMemoryBus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InMemoryConfig {
    /// Events each subscription queues before it overflows into a resync. Default 1,024.
    pub subscriber_capacity: usize,
    /// How long publishes gather before delivery; repeated keys within the window
    /// coalesce. Default zero: every publish is delivered at once. A non-zero window
    /// needs a tokio runtime.
    pub batch_window: Duration,
}

impl Default for InMemoryConfig {
    fn default() -> Self {
        InMemoryConfig {
            subscriber_capacity: 1024,
            batch_window: Duration::ZERO,
        }
    }
}

/// A [`Bus`] whose subscribers all live in this process.
///
/// For awaited publishes a replica is a subscription: `publish_and_await(key, 2, ..)`
/// succeeds when two subscriptions to `key` queued the event. Zones do not exist here,
/// so topology goals return [`Error::QuorumUnsupported`].
///
/// Cloning gives another handle to the same bus. Dropping the last handle ends every
/// subscription.
#[derive(Clone)]
pub struct InMemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    config: InMemoryConfig,
    registry: Arc<Registry>,
    batch: Mutex<Batch>,
    published: AtomicU64,
    coalesced: AtomicU64,
    acknowledged: AtomicU64,
}

#[derive(Default)]
struct Batch {
    pending: Vec<Invalidation>,
    index: HashMap<(InvalidationKind, String), usize>,
    flush_scheduled: bool,
}

impl Default for InMemoryBus {
    fn default() -> Self {
        InMemoryBus::new()
    }
}

impl InMemoryBus {
    /// A bus with default settings: immediate delivery, 1,024 queued events per
    /// subscription.
    pub fn new() -> InMemoryBus {
        InMemoryBus::with_config(InMemoryConfig::default())
    }

    /// A bus with `config`.
    pub fn with_config(config: InMemoryConfig) -> InMemoryBus {
        let registry = Registry::new(config.subscriber_capacity);
        InMemoryBus {
            inner: Arc::new(Inner {
                id: NodeId(getrandom::u64().unwrap_or_default()),
                config,
                registry,
                batch: Mutex::new(Batch::default()),
                published: AtomicU64::new(0),
                coalesced: AtomicU64::new(0),
                acknowledged: AtomicU64::new(0),
            }),
        }
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.registry.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn publish_kind(
        &self,
        kind: InvalidationKind,
        key: &str,
        options: PublishOptions,
    ) -> Result<(), Error> {
        self.check_open()?;
        options.check_deadline()?;
        let invalidation = options.invalidation(kind, key);
        let window = self.inner.config.batch_window;
        if window.is_zero() {
            self.inner.published.fetch_add(1, Ordering::Relaxed);
            self.inner.deliver(invalidation);
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::config("batch_window", "a non-zero window needs a tokio runtime")
        })?;
        let mut batch = self.inner.lock_batch();
        let slot = (kind, key.to_owned());
        if let Some(&at) = batch.index.get(&slot) {
            batch.pending[at] = invalidation;
            self.inner.coalesced.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let at = batch.pending.len();
        batch.index.insert(slot, at);
        batch.pending.push(invalidation);
        self.inner.published.fetch_add(1, Ordering::Relaxed);
        if !batch.flush_scheduled {
            batch.flush_scheduled = true;
            let inner = Arc::clone(&self.inner);
            runtime.spawn(async move {
                tokio::time::sleep(window).await;
                inner.flush();
            });
        }
        Ok(())
    }

    fn subscribe_topic(&self, topic: Topic) -> Result<Subscription, Error> {
        self.inner.registry.subscribe(topic)
    }
}

impl Drop for Inner {
    /// The last handle is gone: end every subscription, as documented.
    fn drop(&mut self) {
        self.registry.close();
    }
}

impl Inner {
    fn lock_batch(&self) -> MutexGuard<'_, Batch> {
        // The batch is updated with no code in between that can panic.
        self.batch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Delivers to local subscriptions; returns how many queued the event.
    fn deliver(&self, invalidation: Invalidation) -> usize {
        let delivery = Delivery {
            origin: self.id,
            zone: None,
            invalidation,
        };
        self.registry.dispatch(Event::from_delivery(delivery))
    }

    fn flush(&self) {
        let pending = {
            let mut batch = self.lock_batch();
            batch.flush_scheduled = false;
            batch.index.clear();
            std::mem::take(&mut batch.pending)
        };
        for invalidation in pending {
            self.deliver(invalidation);
        }
    }

    /// Takes `key` out of the waiting batch, if there; the caller publishes it now.
    fn take_pending(&self, key: &str) -> bool {
        let mut batch = self.lock_batch();
        let Some(at) = batch.index.remove(&(InvalidationKind::Key, key.to_owned())) else {
            return false;
        };
        batch.pending.remove(at);
        for index in batch.index.values_mut() {
            if *index > at {
                *index -= 1;
            }
        }
        true
    }
}

#[async_trait]
impl Bus for InMemoryBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.publish_kind(InvalidationKind::Key, key, options)
    }

    /// Never finds the queue full: in-memory delivery does not queue.
    fn try_publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.publish_kind(InvalidationKind::Key, key, options)
    }

    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        self.check_open()?;
        options.check_deadline()?;
        if replicas == 0 {
            self.publish(key, options).await?;
            return Ok(Acknowledged::default());
        }
        let available = self.inner.registry.audience(&EventKind::Invalidate, key);
        if available < replicas {
            return Err(Error::QuorumNotSatisfied {
                acked: 0,
                zones: 0,
                required: replicas,
                available,
                acknowledged: Acknowledged::default(),
                published: false,
            });
        }
        if self.inner.take_pending(key) {
            self.inner.coalesced.fetch_add(1, Ordering::Relaxed);
        } else {
            self.inner.published.fetch_add(1, Ordering::Relaxed);
        }
        let acked = self
            .inner
            .deliver(options.invalidation(InvalidationKind::Key, key));
        self.inner
            .acknowledged
            .fetch_add(acked as u64, Ordering::Relaxed);
        if acked < replicas {
            return Err(Error::QuorumNotSatisfied {
                acked,
                zones: 0,
                required: replicas,
                available,
                acknowledged: Acknowledged {
                    replicas: acked,
                    ..Acknowledged::default()
                },
                published: true,
            });
        }
        Ok(Acknowledged {
            replicas: acked,
            nodes: Vec::new(),
            zones: Vec::new(),
        })
    }

    async fn publish_and_await_topology(
        &self,
        _key: &str,
        _min_zones: usize,
        _options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        Err(Error::QuorumUnsupported)
    }

    async fn subscribe(&self, key: &str) -> Result<Subscription, Error> {
        self.subscribe_topic(Topic::Key(key.to_owned()))
    }

    async fn subscribe_prefix(&self, prefix: &str) -> Result<Subscription, Error> {
        self.subscribe_topic(Topic::Prefix(prefix.to_owned()))
    }

    async fn unsubscribe(&self, subscription: &Subscription) -> Result<(), Error> {
        self.inner.registry.unsubscribe_own(subscription)
    }

    async fn revoke_lease(&self, id: &str, options: PublishOptions) -> Result<(), Error> {
        self.publish_kind(InvalidationKind::Lease, id, options)
    }

    async fn subscribe_lease(&self, id: &str) -> Result<Subscription, Error> {
        self.subscribe_topic(Topic::Lease(id.to_owned()))
    }

    async fn shutdown(&self) -> Result<(), Error> {
        self.inner.flush();
        self.inner.registry.close();
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        !self.inner.registry.is_closed()
    }

    fn peers(&self) -> Vec<Peer> {
        Vec::new()
    }

    fn metrics(&self) -> Metrics {
        let mut metrics = Metrics {
            published: self.inner.published.load(Ordering::Relaxed),
            coalesced: self.inner.coalesced.load(Ordering::Relaxed),
            acknowledged: self.inner.acknowledged.load(Ordering::Relaxed),
            ..Metrics::default()
        };
        self.inner.registry.counters().fill(&mut metrics);
        metrics
    }
}
