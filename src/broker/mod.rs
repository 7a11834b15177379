//! Buses over a message broker. One engine serves every broker: it encodes what the
//! [`Bus`] trait asks for into [`codec`] payloads, filters keys locally (one broker
//! subscription per bus, not one per key), counts acknowledgements from distinct remote
//! nodes and zones, and learns who is there from presence beacons. A [`Transport`]
//! per broker only moves payloads and says whether the connection is up, and when it
//! came back after a drop: subscribers then get one resync when what was published
//! meanwhile is gone (NATS core, Redis pub/sub), none when the broker's log still has
//! it (Kafka).

mod batch;
mod codec;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "redis")]
mod redis;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use syncbus_mesh::{Drops, Goal, InvalidationKind, NodeId, Zone};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, trace};

use crate::bus::{Acknowledged, Bus, DEFAULT_AWAIT_TIMEOUT, PublishOptions};
use crate::error::Error;
use crate::event::{Event, EventKind, Peer, ResyncReason};
use crate::metrics::Metrics;
use crate::subscription::{Registry, Subscription, Topic};
use codec::{Body, Entry, Envelope, PayloadError};

/// Batches are split to stay under this many bytes before compression: well inside the
/// default message limits of NATS (1 MiB) and Redis.
const BATCH_BYTES: usize = 64 * 1024;
/// Longest a send may take, whatever the caller's deadline.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the goodbye may hold up `shutdown`.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(500);
/// Instances counted as peers at most; beacons from more are ignored.
const MAX_PEERS: usize = 10_000;
/// Longest region name, and longest vector-clock writer, accepted from the broker.
const MAX_REGION_LEN: usize = 256;
/// How far behind a sender's newest number a message may arrive and still count as a
/// late duplicate rather than a sender that started again.
const LATE_DUPLICATES: u64 = 1024;
/// Most vector-clock writers accepted in one entry from the broker.
const MAX_CLOCK_WRITERS: usize = 64;

/// Settings shared by every broker bus.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// This bus instance's id; acknowledgements count distinct ids. Default: random.
    pub node_id: NodeId,
    /// This instance's failure domain, for zone goals. Default `default`.
    pub zone: Zone,
    /// How often this instance tells the others it is there. Default 1 s.
    pub presence_interval: Duration,
    /// An instance not heard from for this long no longer counts towards goals.
    /// Default 3.5 s.
    pub peer_timeout: Duration,
    /// Events each subscription queues before it overflows into a resync. Default 1,024.
    pub subscriber_capacity: usize,
    /// Longest key accepted. Default 1,024 bytes.
    pub max_key_len: usize,
    /// Largest payload sent or accepted, compressed or not. Default 1 MiB.
    pub max_payload: usize,
    /// Publishes per second above which they gather into batches. Default 1,000.
    pub burst_rate: u64,
    /// How long a batch gathers once publishes come faster than `burst_rate`. Default
    /// 10 ms.
    pub batch_window: Duration,
    /// Entries a batch holds at most; `try_publish` then fails with `QueueFull`, and
    /// `publish` sends the batch first. Default 65,536.
    pub max_pending: usize,
    /// Kafka only: how long the broker may hold a fetch open while there is nothing new.
    /// Apache Kafka and Redpanda answer as soon as records arrive, so this costs no
    /// latency there; tansu 0.6 holds every fetch for the whole time, so there it bounds
    /// how late records are read (lower it for lower latency at more requests).
    /// Default 100 ms.
    pub fetch_wait: Duration,
}

impl BrokerConfig {
    /// Defaults, with a random node id.
    pub fn new(zone: Zone) -> BrokerConfig {
        BrokerConfig {
            node_id: NodeId(getrandom::u64().unwrap_or_default()),
            zone,
            presence_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_millis(3500),
            subscriber_capacity: 1024,
            max_key_len: 1024,
            max_payload: 1 << 20,
            burst_rate: 1000,
            batch_window: Duration::from_millis(10),
            max_pending: 65_536,
            fetch_wait: Duration::from_millis(100),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if self.presence_interval.is_zero() || self.peer_timeout <= self.presence_interval {
            return Err(Error::config(
                "peer_timeout",
                "presence_interval must be positive and shorter than peer_timeout",
            ));
        }
        if self.subscriber_capacity == 0 || self.max_key_len == 0 {
            return Err(Error::config(
                "subscriber_capacity",
                "subscriber_capacity and max_key_len must be positive",
            ));
        }
        if self.max_payload < 1024 {
            return Err(Error::config("max_payload", "must be at least 1,024 bytes"));
        }
        if self.fetch_wait > Duration::from_secs(10) {
            return Err(Error::config("fetch_wait", "must be at most 10 s"));
        }
        if self.batch_window > Duration::from_secs(1) || self.max_pending == 0 {
            return Err(Error::config(
                "batch_window",
                "batch_window must be at most 1 s and max_pending positive",
            ));
        }
        Ok(())
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig::new(Zone::default())
    }
}

/// What a broker must do for the engine.
#[async_trait]
pub(crate) trait Transport: Send + Sync + 'static {
    /// Sends a payload to every instance on the bus, this one included (it skips its
    /// own).
    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), Error>;
    /// Sends a payload to one instance.
    async fn send_to(&self, node: NodeId, payload: Vec<u8>) -> Result<(), Error>;
    /// True while the connection to the broker is up.
    fn is_connected(&self) -> bool;
    /// Stops receiving.
    async fn close(&self);
}

/// A [`Bus`] over a message broker: NATS with the `nats` feature, Redis pub/sub with
/// the `redis` feature, Kafka with the `kafka` feature.
///
/// Every instance has a node id and a zone. Receivers acknowledge awaited publishes
/// on a reply path, and `publish_and_await` counts distinct remote instances (and their
/// zones) as the mesh does; instances are known from presence beacons, so a goal more
/// than the instances heard from can meet fails at once. A publish while the broker is
/// unreachable fails with [`Error::Unavailable`] rather than reporting success for a
/// message that may be dropped. The connection coming back raises one resync on every
/// subscription, except on Kafka, whose log is replayed instead (a resync only for
/// what the log no longer holds). Cloning gives another handle to the same bus.
#[derive(Clone)]
pub struct BrokerBus {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    config: BrokerConfig,
    registry: Arc<Registry>,
    transport: Arc<dyn Transport>,
    peers: Mutex<BTreeMap<NodeId, (Zone, Instant)>>,
    awaits: Mutex<BTreeMap<u64, Waiter>>,
    next_ack: AtomicU64,
    closed: AtomicBool,
    counters: Counters,
    batcher: batch::Batcher,
    /// The last broadcast sequence number sent; held while a broadcast is sent, so the
    /// numbers leave in order.
    broadcast_seq: tokio::sync::Mutex<u64>,
    /// The last sequence number heard from each sender.
    sequences: Mutex<HashMap<NodeId, u64>>,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    coalesced: AtomicU64,
    acknowledged: AtomicU64,
    sent: AtomicU64,
    bytes_sent: AtomicU64,
    received: AtomicU64,
    bytes_received: AtomicU64,
    send_errors: AtomicU64,
    reconnects: AtomicU64,
    unknown_acks: AtomicU64,
    /// Messages of other senders lost on the way, as their sequence numbers tell.
    missed: AtomicU64,
    dropped: Mutex<Drops>,
}

struct Waiter {
    goal: Goal,
    acked: BTreeMap<NodeId, Zone>,
    done: Option<oneshot::Sender<()>>,
}

impl BrokerBus {
    pub(crate) fn start(config: BrokerConfig, transport: Arc<dyn Transport>) -> BrokerBus {
        let shared = Arc::new(Shared {
            registry: Registry::new(config.subscriber_capacity),
            config,
            transport,
            peers: Mutex::new(BTreeMap::new()),
            awaits: Mutex::new(BTreeMap::new()),
            // Random, so ids cannot be guessed from counting.
            next_ack: AtomicU64::new(getrandom::u64().unwrap_or(1) >> 1),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            batcher: batch::Batcher::new(),
            broadcast_seq: tokio::sync::Mutex::new(0),
            sequences: Mutex::new(HashMap::new()),
        });
        tokio::spawn(announce_presence(Arc::downgrade(&shared)));
        BrokerBus { shared }
    }

    /// This instance's node id, as its acknowledgements and events name it.
    pub fn node_id(&self) -> NodeId {
        self.shared.config.node_id
    }

    /// The engine shared with the transport's receiving task.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn check_key(&self, key: &str) -> Result<(), Error> {
        let max = self.shared.config.max_key_len;
        if key.len() > max {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max,
            });
        }
        Ok(())
    }

    /// Sends one entry and delivers it to this instance's own subscribers.
    async fn send_entry(
        &self,
        kind: InvalidationKind,
        key: &str,
        options: &PublishOptions,
        ack: Option<u64>,
    ) -> Result<(), Error> {
        self.check_open()?;
        options.check_deadline()?;
        self.check_key(key)?;
        let invalidation = options.invalidation(kind, key);
        let envelope = self
            .shared
            .envelope(Body::Batch(vec![Entry::new(invalidation, ack)]));
        let max = self.shared.config.max_payload;
        let payload =
            codec::encode_within(&envelope, max).map_err(|len| Error::KeyTooLarge { len, max })?;
        self.shared.send_by(None, payload, options.deadline).await?;
        self.shared
            .counters
            .published
            .fetch_add(1, Ordering::Relaxed);
        if let Body::Batch(entries) = envelope.body {
            for entry in entries {
                self.shared.deliver(entry, None);
            }
        }
        Ok(())
    }

    /// A publish nobody awaits: sent at once at low rates, batched under a burst.
    async fn publish_plain(
        &self,
        kind: InvalidationKind,
        key: &str,
        options: PublishOptions,
    ) -> Result<(), Error> {
        self.check_open()?;
        options.check_deadline()?;
        self.check_key(key)?;
        let config = &self.shared.config;
        if !self.shared.batcher.bursting(config.burst_rate) {
            return self.send_entry(kind, key, &options, None).await;
        }
        self.shared.check_connected()?;
        let mut entry = Entry::new(options.invalidation(kind, key), None);
        self.shared.check_size(&entry)?;
        loop {
            match self.shared.batcher.push(entry, config.max_pending) {
                Ok(queued) => {
                    self.shared.queued(queued, config.batch_window);
                    return Ok(());
                }
                // Full: send what waits, then queue again.
                Err(back) => {
                    entry = back;
                    self.shared.flush().await;
                }
            }
        }
    }

    async fn publish_awaited(
        &self,
        key: &str,
        goal: Goal,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        self.check_open()?;
        let available = self.shared.available(goal);
        if goal.required() > available {
            return Err(Error::QuorumNotSatisfied {
                acked: 0,
                zones: 0,
                required: goal.required(),
                available,
                acknowledged: Acknowledged::default(),
                published: false,
            });
        }
        let (done, finished) = oneshot::channel();
        let id = self.shared.next_ack.fetch_add(1, Ordering::Relaxed);
        let waiter = Waiter {
            goal,
            acked: BTreeMap::new(),
            done: Some(done),
        };
        self.shared.lock_awaits().insert(id, waiter);
        // Removes the waiter however this function ends, including a dropped future.
        let _forget = ForgetAwait {
            shared: &self.shared,
            id,
        };
        if goal.required() == 0 {
            self.send_entry(InvalidationKind::Key, key, &options, None)
                .await?;
            return Ok(Acknowledged::default());
        }
        self.send_entry(InvalidationKind::Key, key, &options, Some(id))
            .await?;
        let deadline = options
            .deadline
            .unwrap_or_else(|| std::time::Instant::now() + DEFAULT_AWAIT_TIMEOUT);
        let met = tokio::time::timeout_at(Instant::from_std(deadline), finished).await;
        let acked = self.shared.acked(id);
        match met {
            Ok(Ok(())) => Ok(acked),
            // The waiter was dropped: the bus shut down.
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::QuorumNotSatisfied {
                acked: acked.replicas,
                zones: acked.zones.len(),
                required: goal.required(),
                available: self.shared.available(goal),
                acknowledged: acked,
                published: true,
            }),
        }
    }
}

struct ForgetAwait<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ForgetAwait<'_> {
    fn drop(&mut self) {
        self.shared.lock_awaits().remove(&self.id);
    }
}

impl Shared {
    fn envelope(&self, body: Body) -> Envelope {
        Envelope {
            node: self.config.node_id,
            zone: self.config.zone.as_str().to_owned(),
            body,
        }
    }

    fn lock_awaits(&self) -> MutexGuard<'_, BTreeMap<u64, Waiter>> {
        // Updated with no code in between that can panic; a poisoned lock still holds
        // consistent data.
        self.awaits.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_peers(&self) -> MutexGuard<'_, BTreeMap<NodeId, (Zone, Instant)>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses an entry that alone would make a payload receivers refuse.
    fn check_size(&self, entry: &Entry) -> Result<(), Error> {
        let max = self.config.max_payload.min(BATCH_BYTES);
        let alone = self.envelope(Body::Batch(vec![entry.clone()]));
        codec::encode_within(&alone, max)
            .map(drop)
            .map_err(|len| Error::KeyTooLarge { len, max })
    }

    fn check_connected(&self) -> Result<(), Error> {
        if !self.transport.is_connected() {
            return Err(Error::Unavailable("the broker is unreachable".into()));
        }
        Ok(())
    }

    /// Counts a queued entry, and schedules the flush of a new batch.
    fn queued(self: &Arc<Self>, queued: batch::Queued, window: Duration) {
        match queued {
            batch::Queued::First => {
                self.counters.published.fetch_add(1, Ordering::Relaxed);
                let shared = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    if let Some(shared) = shared.upgrade() {
                        shared.flush().await;
                    }
                });
            }
            batch::Queued::Joined => {
                self.counters.published.fetch_add(1, Ordering::Relaxed);
            }
            batch::Queued::Coalesced => {
                self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends the waiting batch, split to stay well under the broker's message size,
    /// and delivers it to this instance's own subscribers. A batch that cannot be sent
    /// was already reported accepted: its sequence number is skipped, so the others
    /// see the jump at this instance's next broadcast and resync.
    async fn flush(&self) {
        let entries = self.batcher.take();
        for chunk in batch::chunks(entries, BATCH_BYTES) {
            let payload = codec::encode(&self.envelope(Body::Batch(chunk.clone())));
            if let Err(error) = self.send(None, payload).await {
                debug!(%error, entries = chunk.len(), "batch not sent");
                *self.broadcast_seq.lock().await += 1;
            }
            for entry in chunk {
                self.deliver(entry, None);
            }
        }
    }

    /// Sends to one instance, or to all, within `SEND_TIMEOUT`; refuses while the
    /// broker is unreachable so a dropped message is never reported sent.
    async fn send(&self, to: Option<NodeId>, payload: Vec<u8>) -> Result<(), Error> {
        self.send_by(to, payload, None).await
    }

    /// Like `send`, giving up at `deadline` if that comes before `SEND_TIMEOUT`: a
    /// broker that stopped answering (a partition, a stalled server) looks connected
    /// until its client notices, and must not hold callers past their deadline.
    async fn send_by(
        &self,
        to: Option<NodeId>,
        mut payload: Vec<u8>,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), Error> {
        self.check_connected()?;
        let len = payload.len() as u64;
        let mut give_up = Instant::now() + SEND_TIMEOUT;
        if let Some(deadline) = deadline {
            give_up = give_up.min(Instant::from_std(deadline));
        }
        let sending = async {
            match to {
                Some(node) => self.transport.send_to(node, payload).await,
                None => {
                    // Numbered and sent under one lock, so numbers leave in order. A
                    // send that failed outright used no number; one that timed out may
                    // yet arrive, so its number is used.
                    let mut last = self.broadcast_seq.lock().await;
                    let seq = *last + 1;
                    codec::stamp(&mut payload, seq);
                    let sent = tokio::time::timeout_at(give_up, self.transport.broadcast(payload))
                        .await
                        .unwrap_or(Err(Error::Timeout));
                    if matches!(sent, Ok(()) | Err(Error::Timeout)) {
                        *last = seq;
                    }
                    sent
                }
            }
        };
        let sent = tokio::time::timeout_at(give_up, sending)
            .await
            .unwrap_or(Err(Error::Timeout));
        match sent {
            Ok(()) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                self.counters.bytes_sent.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    fn deliver(&self, entry: Entry, from: Option<(NodeId, Zone)>) {
        let kind = match entry.kind {
            InvalidationKind::Key => EventKind::Invalidate,
            InvalidationKind::Lease => EventKind::LeaseRevoked,
        };
        let (origin, zone) = match from {
            Some((node, zone)) => (node, zone),
            None => (self.config.node_id, self.config.zone.clone()),
        };
        self.registry.dispatch(Event {
            kind,
            key: entry.key,
            origin: Some(origin),
            zone: Some(zone),
            region: entry.region,
            scope: entry.scope,
            vector_clock: entry.clock,
        });
    }

    /// Handles one payload from the broker. Returns the acknowledgement to send, if
    /// the payload asked for any: (origin, payload).
    pub(crate) fn receive(&self, payload: &[u8]) -> Option<(NodeId, Vec<u8>)> {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_received
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let (envelope, seq) = match codec::decode(payload, self.config.max_payload) {
            Ok(decoded) => decoded,
            Err(error) => {
                trace!(?error, "dropped a payload from the broker");
                self.count_drop(error);
                return None;
            }
        };
        if envelope.node == self.config.node_id {
            // Our own, echoed by the broker; delivered locally when sent.
            return None;
        }
        let Ok(zone) = Zone::new(envelope.zone) else {
            return None;
        };
        let from = envelope.node;
        if seq > 0 {
            self.follow_sequence(from, seq);
        }
        match envelope.body {
            Body::Leaving => {
                self.lock_peers().remove(&from);
                self.lock_sequences().remove(&from);
                None
            }
            Body::Presence => {
                self.seen(from, zone);
                None
            }
            Body::Ack(ids) => {
                // Only instances heard from count; an acknowledgement is not a beacon.
                if self.lock_peers().contains_key(&from) {
                    self.count_acks(from, &zone, &ids);
                } else {
                    self.counters.unknown_acks.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Body::Batch(entries) => {
                if !entries.iter().all(|entry| self.acceptable(entry)) {
                    self.count_drop(PayloadError::Malformed);
                    return None;
                }
                self.seen(from, zone.clone());
                let mut acks = Vec::new();
                for entry in entries {
                    acks.extend(entry.ack);
                    self.deliver(entry, Some((from, zone.clone())));
                }
                // Acknowledged only once delivered to this instance's subscriptions.
                (!acks.is_empty()).then(|| (from, codec::encode(&self.envelope(Body::Ack(acks)))))
            }
        }
    }

    /// Whether an entry from the broker is within what this bus would itself send: a
    /// forged one could otherwise make every subscription hold megabytes.
    fn acceptable(&self, entry: &Entry) -> bool {
        entry.key.len() <= self.config.max_key_len
            && entry
                .region
                .as_ref()
                .is_none_or(|r| r.len() <= MAX_REGION_LEN)
            && entry.clock.0.len() <= MAX_CLOCK_WRITERS
            && entry
                .clock
                .0
                .keys()
                .all(|writer| writer.len() <= MAX_REGION_LEN)
    }

    fn lock_sequences(&self) -> MutexGuard<'_, HashMap<NodeId, u64>> {
        self.sequences.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a sender's broadcast sequence number. A jump means the broker or its
    /// client dropped messages of that sender on the way here (a slow consumer, say):
    /// every subscription resyncs, naming it. A number a little behind the newest is a
    /// late duplicate; one far behind means the sender started again under the same
    /// id, and what it sent in between is unknown.
    fn follow_sequence(&self, from: NodeId, seq: u64) {
        let mut sequences = self.lock_sequences();
        if sequences.len() >= MAX_PEERS && !sequences.contains_key(&from) {
            return;
        }
        let missed = match sequences.get(&from).copied() {
            None => None,
            Some(last) if seq == last + 1 => None,
            Some(last) if seq > last => Some(seq - last - 1),
            // A message seen before, arriving again, perhaps after later ones: a client
            // that retried a send it thought lost (Kafka keeps both copies). Nothing
            // new, nothing lost, and the newest number seen stays.
            Some(last) if last - seq < LATE_DUPLICATES => return,
            // Far behind: the sender started again under the same id.
            Some(_) => Some(0),
        };
        sequences.insert(from, seq);
        let Some(missed) = missed else {
            return;
        };
        drop(sequences);
        debug!(origin = %from, missed, "messages of a sender lost on the way");
        self.counters.missed.fetch_add(missed, Ordering::Relaxed);
        self.registry
            .resync_all(&ResyncReason::Lost { missed }, Some(from));
    }

    /// A message from the broker that could not even be read as a payload.
    pub(crate) fn count_malformed(&self) {
        self.count_drop(PayloadError::Malformed);
    }

    fn count_drop(&self, error: PayloadError) {
        let mut dropped = self
            .counters
            .dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match error {
            PayloadError::Truncated => dropped.truncated += 1,
            PayloadError::BadMagic => dropped.bad_magic += 1,
            PayloadError::UnsupportedVersion => dropped.unsupported_version += 1,
            PayloadError::Oversize => dropped.oversize += 1,
            PayloadError::Malformed => dropped.malformed += 1,
        }
    }

    fn seen(&self, node: NodeId, zone: Zone) {
        let mut peers = self.lock_peers();
        if peers.len() >= MAX_PEERS && !peers.contains_key(&node) {
            let horizon = self.config.peer_timeout;
            peers.retain(|_, (_, seen)| seen.elapsed() < horizon);
            if peers.len() >= MAX_PEERS {
                return;
            }
        }
        peers.insert(node, (zone, Instant::now()));
    }

    fn count_acks(&self, node: NodeId, zone: &Zone, ids: &[u64]) {
        let mut awaits = self.lock_awaits();
        for id in ids {
            let Some(waiter) = awaits.get_mut(id) else {
                continue;
            };
            if waiter.acked.insert(node, zone.clone()).is_none() {
                self.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            let met = match waiter.goal {
                Goal::Replicas(n) => waiter.acked.len() >= n,
                Goal::Zones(n) => waiter.acked.values().collect::<BTreeSet<_>>().len() >= n,
            };
            if met && let Some(done) = waiter.done.take() {
                let _ = done.send(());
            }
        }
    }

    fn acked(&self, id: u64) -> Acknowledged {
        let awaits = self.lock_awaits();
        let Some(waiter) = awaits.get(&id) else {
            return Acknowledged::default();
        };
        let zones: BTreeSet<Zone> = waiter.acked.values().cloned().collect();
        Acknowledged {
            replicas: waiter.acked.len(),
            nodes: waiter.acked.keys().copied().collect(),
            zones: zones.into_iter().collect(),
        }
    }

    /// Live peers (heard from within `peer_timeout`), or their zones, for a goal.
    fn available(&self, goal: Goal) -> usize {
        let peers = self.live_peers();
        match goal {
            Goal::Replicas(_) => peers.len(),
            Goal::Zones(_) => peers.values().collect::<BTreeSet<_>>().len(),
        }
    }

    fn live_peers(&self) -> BTreeMap<NodeId, Zone> {
        let horizon = self.config.peer_timeout;
        let mut peers = self.lock_peers();
        peers.retain(|_, (_, seen)| seen.elapsed() < horizon);
        peers
            .iter()
            .map(|(id, (zone, _))| (*id, zone.clone()))
            .collect()
    }

    /// The connection came back after a drop: whatever was published meanwhile is
    /// gone, so every subscription is told once. (What this instance handed to the
    /// client just before the drop and never reached the broker used sequence numbers:
    /// the others see the jump at its next broadcast.)
    pub(crate) fn reconnected(&self) {
        debug!("broker connection restored; subscribers must resync");
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        self.registry.resync_all(&ResyncReason::Disconnected, None);
        // Everything until now is covered by that resync: follow senders afresh.
        self.lock_sequences().clear();
    }

    /// The connection came back and the broker kept what was published meanwhile (a
    /// log, which the transport reads on from where it was): nothing to resync.
    pub(crate) fn resumed(&self) {
        debug!("broker connection restored; nothing was lost");
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// `missed` messages this instance never read are gone for good (a log's
    /// retention removed them): every subscription is told, naming no sender.
    pub(crate) fn missed_for_good(&self, missed: u64) {
        self.counters.missed.fetch_add(missed, Ordering::Relaxed);
        self.registry
            .resync_all(&ResyncReason::Lost { missed }, None);
        self.lock_sequences().clear();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Tells the others this instance is there, every `presence_interval`, until the bus
/// is dropped or shut down.
async fn announce_presence(shared: std::sync::Weak<Shared>) {
    let interval = match shared.upgrade() {
        Some(shared) => shared.config.presence_interval,
        None => return,
    };
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.is_closed() {
            return;
        }
        let payload = codec::encode(&shared.envelope(Body::Presence));
        if let Err(error) = shared.send(None, payload).await {
            trace!(%error, "presence beacon not sent");
        }
    }
}

#[async_trait]
impl Bus for BrokerBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.publish_plain(InvalidationKind::Key, key, options)
            .await
    }

    fn try_publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.check_open()?;
        options.check_deadline()?;
        self.check_key(key)?;
        self.shared.check_connected()?;
        // Flushing needs a task; without a runtime there is nothing to run it on.
        tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Unavailable("try_publish needs a tokio runtime".into()))?;
        let config = &self.shared.config;
        let window = if self.shared.batcher.bursting(config.burst_rate) {
            config.batch_window
        } else {
            Duration::ZERO
        };
        let entry = Entry::new(options.invalidation(InvalidationKind::Key, key), None);
        self.shared.check_size(&entry)?;
        let queued = self
            .shared
            .batcher
            .push(entry, config.max_pending)
            .map_err(|_| Error::QueueFull)?;
        self.shared.queued(queued, window);
        Ok(())
    }

    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        self.publish_awaited(key, Goal::Replicas(replicas), options)
            .await
    }

    async fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        self.publish_awaited(key, Goal::Zones(min_zones), options)
            .await
    }

    async fn subscribe(&self, key: &str) -> Result<Subscription, Error> {
        // A closed registry refuses with `Closed`, as the bus does.
        self.shared.registry.subscribe(Topic::Key(key.to_owned()))
    }

    async fn subscribe_prefix(&self, prefix: &str) -> Result<Subscription, Error> {
        self.shared
            .registry
            .subscribe(Topic::Prefix(prefix.to_owned()))
    }

    async fn unsubscribe(&self, subscription: &Subscription) -> Result<(), Error> {
        self.shared.registry.unsubscribe_own(subscription)
    }

    async fn revoke_lease(&self, id: &str, options: PublishOptions) -> Result<(), Error> {
        self.publish_plain(InvalidationKind::Lease, id, options)
            .await
    }

    async fn subscribe_lease(&self, id: &str) -> Result<Subscription, Error> {
        self.shared.registry.subscribe(Topic::Lease(id.to_owned()))
    }

    async fn shutdown(&self) -> Result<(), Error> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Local state first, so a broker that stopped answering cannot leave the bus
        // half shut: waiters end (with Closed), subscriptions end.
        self.shared.lock_awaits().clear();
        self.shared.registry.close();
        let sending = async {
            self.shared.flush().await;
            let goodbye = codec::encode(&self.shared.envelope(Body::Leaving));
            self.shared.send(None, goodbye).await
        };
        match tokio::time::timeout(GOODBYE_TIMEOUT, sending).await {
            Ok(Ok(())) => {}
            _ => debug!("could not say goodbye; peers will time this instance out"),
        }
        self.shared.transport.close().await;
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        !self.shared.is_closed() && self.shared.transport.is_connected()
    }

    fn peers(&self) -> Vec<Peer> {
        self.shared
            .live_peers()
            .into_iter()
            .map(|(id, zone)| Peer {
                id,
                addr: None,
                zone: Some(zone),
            })
            .collect()
    }

    fn metrics(&self) -> Metrics {
        let c = &self.shared.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut metrics = Metrics {
            published: load(&c.published),
            coalesced: load(&c.coalesced),
            acknowledged: load(&c.acknowledged),
            datagrams_sent: load(&c.sent),
            bytes_sent: load(&c.bytes_sent),
            datagrams_received: load(&c.received),
            bytes_received: load(&c.bytes_received),
            send_errors: load(&c.send_errors),
            reconnects: load(&c.reconnects),
            missed: load(&c.missed),
            awaits_in_flight: self.shared.lock_awaits().len() as u64,
            dropped: {
                let mut dropped = c.dropped.lock().map(|d| d.clone()).unwrap_or_default();
                dropped.unknown_peer += load(&c.unknown_acks);
                dropped
            },
            ..Metrics::default()
        };
        self.shared.registry.counters().fill(&mut metrics);
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker that accepts everything and delivers nothing: the tests feed the
    /// engine themselves.
    struct Sink;

    #[async_trait]
    impl Transport for Sink {
        async fn broadcast(&self, _: Vec<u8>) -> Result<(), Error> {
            Ok(())
        }
        async fn send_to(&self, _: NodeId, _: Vec<u8>) -> Result<(), Error> {
            Ok(())
        }
        fn is_connected(&self) -> bool {
            true
        }
        async fn close(&self) {}
    }

    fn from_sender(seq: u64, key: &str) -> Vec<u8> {
        let envelope = Envelope {
            node: NodeId(77),
            zone: "z".into(),
            body: Body::Batch(vec![Entry::new(syncbus_mesh::Invalidation::key(key), None)]),
        };
        let mut payload = codec::encode(&envelope);
        codec::stamp(&mut payload, seq);
        payload
    }

    #[tokio::test]
    async fn a_jump_in_a_senders_numbers_is_a_resync_naming_it() {
        let bus = BrokerBus::start(BrokerConfig::default(), Arc::new(Sink));
        let mut sub = bus.subscribe_prefix("").await.unwrap();
        let shared = bus.shared();
        for (seq, key) in [(5000, "a"), (5001, "b"), (5004, "c")] {
            shared.receive(&from_sender(seq, key));
        }
        let events: Vec<Event> = std::iter::from_fn(|| sub.try_recv().ok()).collect();
        assert_eq!(events.len(), 4, "{events:?}");
        assert_eq!((events[0].key.as_str(), events[1].key.as_str()), ("a", "b"));
        // The two lost between 6 and 9 are reported before what came after them.
        assert_eq!(
            events[2].kind,
            EventKind::Resync(ResyncReason::Lost { missed: 2 })
        );
        assert_eq!(events[2].origin, Some(NodeId(77)));
        assert_eq!(events[3].key, "c");
        assert_eq!(bus.metrics().missed, 2);
        // A copy of an earlier message after later ones (a retried send the broker
        // kept twice): delivered again, but no resync, and the next number is no jump.
        shared.receive(&from_sender(5001, "b"));
        shared.receive(&from_sender(5005, "e"));
        assert_eq!(sub.try_recv().unwrap().key, "b");
        assert_eq!(sub.try_recv().unwrap().key, "e");
        assert_eq!(bus.metrics().missed, 2);
        // Numbers far behind: the sender started again; unknown loss.
        shared.receive(&from_sender(1, "d"));
        let resync = sub.try_recv().unwrap();
        assert_eq!(
            resync.kind,
            EventKind::Resync(ResyncReason::Lost { missed: 0 })
        );
        assert_eq!(resync.origin, Some(NodeId(77)));
        assert_eq!(sub.try_recv().unwrap().key, "d");
    }
}
