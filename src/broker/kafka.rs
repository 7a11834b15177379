//! Kafka as a broker transport: events and presence as records of the bus's topic,
//! acknowledgements as records of `<topic>.acks` keyed by the recipient's node id. Both
//! topics have one partition (made on first use), so every instance reads one total
//! order and a sender's sequence numbers arrive in the order they were sent.
//!
//! Unlike NATS core and Redis pub/sub, Kafka keeps a log: each instance remembers the
//! offset it has read up to and, after the connection comes back, reads on from there,
//! so nothing published meanwhile is missed. Subscribers are told to resync only when
//! the log no longer holds what the instance missed: retention removed it (the
//! resync counts the records skipped), or the broker lost the log altogether (a broker
//! on memory storage restarted), which shows when the record just before the offset
//! is no longer the one read there.
//!
//! Three connections per instance: one produces, one fetches each topic. A Kafka
//! broker answers the requests on one connection in order, so a fetch waiting for new
//! records would otherwise hold up every publish behind it. A connection on which a
//! request timed out is replaced: a broker behind a partition leaves it open but dead.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rskafka::BackoffConfig;
use rskafka::chrono::DateTime;
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::{Record, RecordAndOffset};
use syncbus_mesh::NodeId;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::{BrokerBus, BrokerConfig, Shared, Transport};
use crate::error::Error;

/// Longest wait for a connection, a reply, or a client's own retries.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a fetch that found nothing and came back before `fetch_wait`: bounds
/// the requests to a broker that does not wait.
const IDLE_POLL: Duration = Duration::from_millis(10);
const FIRST_RETRY: Duration = Duration::from_millis(50);
const LAST_RETRY: Duration = Duration::from_secs(1);
/// Longest Kafka topic name, less the room the acknowledgement topic's suffix needs.
const MAX_TOPIC_LEN: usize = 249 - ACK_SUFFIX.len();
const ACK_SUFFIX: &str = ".acks";
/// How many bytes of records one fetch may return; well over the largest payload.
const FETCH_BYTES: Range<i32> = 1..8 * 1024 * 1024;

/// The producing connection and its handles on the two topics.
struct Producer {
    client: Client,
    events: PartitionClient,
    acks: PartitionClient,
}

impl Producer {
    async fn connect(brokers: &[String], topic: &str) -> Result<Producer, KafkaError> {
        let client = connect(brokers, true).await?;
        create_topics(&client, topic).await;
        Ok(Producer {
            events: partition(&client, topic).await?,
            acks: partition(&client, &ack_topic(topic)).await?,
            client,
        })
    }
}

struct KafkaTransport {
    brokers: Vec<String>,
    topic: String,
    /// Made again (on the next send) after a send failed or timed out.
    producer: tokio::sync::Mutex<Option<Arc<Producer>>>,
    connected: AtomicBool,
    closed: Notify,
    is_closed: AtomicBool,
}

impl KafkaTransport {
    async fn producer(&self) -> Result<Arc<Producer>, Error> {
        let mut slot = self.producer.lock().await;
        if let Some(producer) = &*slot {
            return Ok(producer.clone());
        }
        let made = tokio::time::timeout(IO_TIMEOUT, Producer::connect(&self.brokers, &self.topic))
            .await
            .map_err(|_| Error::Unavailable("no Kafka broker answered".into()))?
            .map_err(|e| Error::Unavailable(format!("Kafka: {e}")))?;
        let made = Arc::new(made);
        *slot = Some(made.clone());
        Ok(made)
    }

    /// Forgets `producer`, unless another send already replaced it.
    async fn discard(&self, producer: &Arc<Producer>) {
        let mut slot = self.producer.lock().await;
        if slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, producer)) {
            *slot = None;
        }
    }

    async fn produce(&self, acks: bool, record: Record) -> Result<(), Error> {
        let producer = self.producer().await?;
        let to = if acks {
            &producer.acks
        } else {
            &producer.events
        };
        let produced = tokio::time::timeout(
            IO_TIMEOUT,
            to.produce(vec![record], Compression::NoCompression),
        )
        .await;
        let error = match produced {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(error)) => {
                if is_unknown_topic(&error) {
                    // The broker lost the topics (restarted on memory storage).
                    create_topics(&producer.client, &self.topic).await;
                } else {
                    self.discard(&producer).await;
                }
                Error::Unavailable(format!("Kafka produce failed: {error}"))
            }
            Err(_) => {
                self.discard(&producer).await;
                Error::Timeout
            }
        };
        Err(error)
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), Error> {
        self.produce(false, record(None, payload)).await
    }

    async fn send_to(&self, node: NodeId, payload: Vec<u8>) -> Result<(), Error> {
        let key = node.0.to_be_bytes().to_vec();
        self.produce(true, record(Some(key), payload)).await
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    async fn close(&self) {
        self.is_closed.store(true, Ordering::Release);
        self.closed.notify_waiters();
        // The producer's connections close with it.
        *self.producer.lock().await = None;
    }
}

fn record(key: Option<Vec<u8>>, value: Vec<u8>) -> Record {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64);
    Record {
        key,
        value: Some(value),
        headers: Default::default(),
        timestamp: DateTime::from_timestamp_millis(millis).unwrap_or_default(),
    }
}

impl BrokerBus {
    /// A bus over Kafka: `brokers` to bootstrap from (for example
    /// `["127.0.0.1:9092"]`) and `topic` (for example `warp.events`). Events go to
    /// `topic`, acknowledgements to `<topic>.acks`; both are made with one partition if
    /// they do not exist. Every instance on the same topic and cluster forms one bus.
    ///
    /// A new instance starts at the end of the log: it does not replay what was
    /// published before it existed. After a dropped connection it replays what it
    /// missed from the log, and every subscription gets a resync only if the log no
    /// longer holds it. Returns `Unavailable` if no broker answers within 2 s.
    pub async fn kafka(
        brokers: Vec<String>,
        topic: &str,
        config: BrokerConfig,
    ) -> Result<BrokerBus, Error> {
        config.validate()?;
        validate_topic(topic)?;
        validate_brokers(&brokers)?;
        let connecting = async {
            let producer = Producer::connect(&brokers, topic).await?;
            // Start at the log ends, so nothing published before this instance replays.
            let events = Follower::at_end(&brokers, topic, config.fetch_wait).await?;
            let acks = Follower::at_end(&brokers, &ack_topic(topic), config.fetch_wait).await?;
            Ok::<_, KafkaError>((producer, events, acks))
        };
        let (producer, events, acks) = match tokio::time::timeout(IO_TIMEOUT * 3, connecting).await
        {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => return Err(Error::Unavailable(format!("Kafka: {error}"))),
            Err(_) => return Err(Error::Unavailable("no Kafka broker answered".into())),
        };
        let transport = Arc::new(KafkaTransport {
            brokers,
            topic: topic.to_owned(),
            producer: tokio::sync::Mutex::new(Some(Arc::new(producer))),
            connected: AtomicBool::new(true),
            closed: Notify::new(),
            is_closed: AtomicBool::new(false),
        });
        let node = config.node_id;
        let bus = BrokerBus::start(config, transport.clone());
        let shared = Arc::downgrade(bus.shared());
        tokio::spawn(follow(
            shared.clone(),
            transport.clone(),
            events,
            Stream::Events,
        ));
        tokio::spawn(follow(shared, transport, acks, Stream::Acks(node)));
        Ok(bus)
    }
}

fn validate_brokers(brokers: &[String]) -> Result<(), Error> {
    if brokers.is_empty() {
        return Err(Error::config("brokers", "at least one broker address"));
    }
    for broker in brokers {
        let valid = broker.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0)
        });
        if !valid {
            return Err(Error::config(
                "brokers",
                format!("{broker:?} is not HOST:PORT, such as 127.0.0.1:9092"),
            ));
        }
    }
    Ok(())
}

fn validate_topic(topic: &str) -> Result<(), Error> {
    let valid = !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(Error::config(
            "topic",
            format!(
                "{topic:?} must be 1 to {MAX_TOPIC_LEN} ASCII letters, digits, '.', '_' or '-'"
            ),
        ));
    }
    Ok(())
}

/// A client. rskafka retries a broken connection forever by default; the producer's
/// retries are bounded by the send timeout, and a follower's are off altogether: a
/// follower must see every break, to check the log before it reads on (a broker that
/// restarted quickly on memory storage has a new log the client would read on in
/// silently).
async fn connect(brokers: &[String], retries: bool) -> Result<Client, KafkaError> {
    let backoff = BackoffConfig {
        init_backoff: FIRST_RETRY,
        max_backoff: LAST_RETRY / 2,
        base: 2.0,
        deadline: Some(if retries { IO_TIMEOUT } else { Duration::ZERO }),
    };
    ClientBuilder::new(brokers.to_vec())
        .client_id("syncbus")
        .backoff_config(backoff)
        .build()
        .await
}

fn ack_topic(topic: &str) -> String {
    format!("{topic}{ACK_SUFFIX}")
}

/// A follower's connection to partition 0 of `topic`, without rskafka's retries; a
/// few tries of its own, for a leader not elected yet.
async fn open_partition(brokers: &[String], topic: &str) -> Result<PartitionClient, KafkaError> {
    let mut tries = 0;
    loop {
        let made = async { partition(&connect(brokers, false).await?, topic).await };
        match made.await {
            Ok(partition) => return Ok(partition),
            Err(error) if tries >= 3 => return Err(error),
            Err(_) => tries += 1,
        }
        tokio::time::sleep(FIRST_RETRY).await;
    }
}

async fn partition(client: &Client, topic: &str) -> Result<PartitionClient, KafkaError> {
    client
        .partition_client(topic, 0, UnknownTopicHandling::Error)
        .await
}

/// Makes the bus's two topics, each with one partition; topics that already exist
/// are left as they are.
async fn create_topics(client: &Client, topic: &str) {
    let Ok(controller) = client.controller_client() else {
        return;
    };
    for name in [topic.to_owned(), ack_topic(topic)] {
        let made = tokio::time::timeout(IO_TIMEOUT, controller.create_topic(&name, 1, 1, 1_000));
        match made.await {
            Ok(Ok(())) => debug!(topic = name, "Kafka topic created"),
            Ok(Err(error)) if is_error(&error, ProtocolError::TopicAlreadyExists) => {}
            Ok(Err(error)) => debug!(topic = name, %error, "Kafka topic not created"),
            Err(_) => debug!(topic = name, "Kafka topic creation timed out"),
        }
    }
}

/// The offset the next record will get. Read from a fetch's high watermark, not from
/// ListOffsets: some Kafka-compatible brokers (tansu 0.6) answer ListOffsets(latest)
/// with the last record's offset rather than the one after it. If the batch fetched
/// there cannot be decoded, ListOffsets's answer has to do.
async fn log_end(partition: &PartitionClient) -> Result<i64, KafkaError> {
    let latest = partition.get_offset(OffsetAt::Latest).await?;
    match partition.fetch_records(latest, 1..1024, 0).await {
        Ok((_, high_watermark)) => Ok(high_watermark),
        Err(error) if is_undecodable(&error) => Ok(latest),
        Err(error) => Err(error),
    }
}

/// Whether the client failed to decode what the broker sent: a compressed batch (the
/// bus's client has no codecs), a control batch it cannot parse, a bad timestamp.
fn is_undecodable(error: &KafkaError) -> bool {
    use rskafka::client::error::RequestError;
    matches!(
        error,
        KafkaError::InvalidResponse(_)
            | KafkaError::Request(
                RequestError::ReadError(_)
                    | RequestError::ReadVersionedError(_)
                    | RequestError::TooMuchData { .. }
            )
    )
}

fn is_error(error: &KafkaError, wanted: ProtocolError) -> bool {
    matches!(error, KafkaError::ServerError { protocol_error, .. } if *protocol_error == wanted)
}

fn is_unknown_topic(error: &KafkaError) -> bool {
    is_error(error, ProtocolError::UnknownTopicOrPartition)
}

/// Which topic a follower reads, and so what its records mean.
#[derive(Clone, Copy)]
enum Stream {
    Events,
    /// Acknowledgements, of which only those keyed with this node id are this
    /// instance's.
    Acks(NodeId),
}

/// Reads one partition from an offset the bus keeps, on a connection of its own.
struct Follower {
    brokers: Vec<String>,
    topic: String,
    partition: PartitionClient,
    /// The next offset to read.
    offset: i64,
    /// The last record read, to tell after a drop whether the log is still the same.
    last: Option<Record>,
    /// How long the broker may hold a fetch while there is nothing new.
    wait: Duration,
}

/// What a follower found about the log after the connection came back.
enum Resumed {
    /// The log still holds everything from the offset on: replay it.
    Intact,
    /// Retention removed this many records this instance had not read.
    Trimmed(u64),
    /// The log is not the one read before (the broker lost it): start over at its
    /// beginning.
    Replaced,
}

impl Follower {
    /// A follower of `topic` that reads from the log's current end on.
    /// A follower of `topic` that reads from the log's current end on. It remembers
    /// the last record already there, so that a log replaced before it read anything
    /// is still recognised.
    async fn at_end(
        brokers: &[String],
        topic: &str,
        wait: Duration,
    ) -> Result<Follower, KafkaError> {
        let partition = open_partition(brokers, topic).await?;
        let offset = log_end(&partition).await?;
        let last = match partition.fetch_records(offset - 1, 1..1024, 0).await {
            Ok((records, _)) => records
                .into_iter()
                .find(|r| r.offset == offset - 1)
                .map(|r| r.record),
            Err(_) => None,
        };
        Ok(Follower {
            brokers: brokers.to_vec(),
            topic: topic.to_owned(),
            offset,
            partition,
            last,
            wait,
        })
    }

    /// Replaces the connection, after a request on it timed out.
    async fn reconnect(&mut self) -> Result<(), KafkaError> {
        let made = open_partition(&self.brokers, &self.topic);
        self.partition = tokio::time::timeout(IO_TIMEOUT, made)
            .await
            .unwrap_or(Err(KafkaError::Timeout))?;
        Ok(())
    }

    /// Moves past a batch the client cannot decode, to the first offset from which a
    /// fetch succeeds (found by doubling, then halving): what was skipped is lost for
    /// this instance. Returns how many offsets were skipped.
    async fn skip_undecodable(&mut self) -> Result<u64, KafkaError> {
        let end = log_end(&self.partition).await?.max(self.offset + 1);
        let bad = self.offset;
        let (mut low, mut step) = (bad, 1);
        let mut high = end;
        while low + 1 < high {
            let probe = (low + step).min(high);
            if self.decodes_at(probe).await? {
                high = probe;
                break;
            }
            low = probe;
            step *= 2;
        }
        while low + 1 < high {
            let middle = low + (high - low) / 2;
            if self.decodes_at(middle).await? {
                high = middle;
            } else {
                low = middle;
            }
        }
        self.offset = high;
        Ok((high - bad) as u64)
    }

    async fn decodes_at(&self, offset: i64) -> Result<bool, KafkaError> {
        match self.partition.fetch_records(offset, 1..1024, 0).await {
            Ok(_) => Ok(true),
            Err(error) if is_undecodable(&error) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn fetch(&self) -> Result<(Vec<RecordAndOffset>, i64), KafkaError> {
        let wait_ms = self.wait.as_millis().min(i32::MAX as u128) as i32;
        let fetching = self
            .partition
            .fetch_records(self.offset, FETCH_BYTES, wait_ms);
        tokio::time::timeout(IO_TIMEOUT + self.wait, fetching)
            .await
            .unwrap_or(Err(KafkaError::Timeout))
    }

    /// Checks the log against what was read before, and moves the offset to where
    /// reading must go on.
    async fn resume(&mut self) -> Result<Resumed, KafkaError> {
        let earliest = self.partition.get_offset(OffsetAt::Earliest).await?;
        let end = log_end(&self.partition).await?;
        let before = self.offset - 1;
        let last_still_there = match &self.last {
            Some(last) if before >= earliest && before < end => {
                // A small fetch: only the batch holding `before`, so a batch after it
                // that cannot be decoded does not fail the check.
                let (records, _) = self.partition.fetch_records(before, 1..1024, 0).await?;
                let first = records.first();
                Some(first.is_some_and(|r| r.offset == before && r.record.value == last.value))
            }
            _ => None,
        };
        let resumed = judge(self.offset, earliest, end, last_still_there);
        match resumed {
            Resumed::Intact => {}
            Resumed::Trimmed(_) => self.offset = earliest,
            Resumed::Replaced => (self.offset, self.last) = (earliest, None),
        }
        Ok(resumed)
    }
}

/// What the log now holds means for a follower that reads on from `offset`: the log
/// runs from `earliest` to `end` (exclusive), and `last_still_there` says whether the
/// record before `offset` is the one read there (`None` when that cannot be checked:
/// nothing read yet, or the record is outside the log).
fn judge(offset: i64, earliest: i64, end: i64, last_still_there: Option<bool>) -> Resumed {
    match last_still_there {
        _ if end < offset => Resumed::Replaced,
        Some(false) => Resumed::Replaced,
        _ if offset < earliest => Resumed::Trimmed((earliest - offset) as u64),
        _ => Resumed::Intact,
    }
}

/// Reads one topic and feeds its records to the engine, sending the acknowledgements
/// they ask for, until the bus is shut down or dropped. After an error it waits
/// (backing off), checks the log, and reads on.
async fn follow(
    shared: std::sync::Weak<Shared>,
    transport: Arc<KafkaTransport>,
    mut follower: Follower,
    stream: Stream,
) {
    let mut retry = FIRST_RETRY;
    // Set after an error: the log is checked before reading on.
    let mut broken = false;
    // Set after an error other than the log moving: the connection dropped.
    let mut disconnected = false;
    loop {
        if transport.is_closed.load(Ordering::Acquire) {
            return;
        }
        if broken {
            tokio::select! {
                () = transport.closed.notified() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).clamp(FIRST_RETRY, LAST_RETRY);
            let checked = tokio::time::timeout(IO_TIMEOUT * 2, follower.resume())
                .await
                .unwrap_or(Err(KafkaError::Timeout));
            let Some(engine) = shared.upgrade() else {
                return;
            };
            match checked {
                Ok(resumed) => {
                    if let Stream::Events = stream {
                        transport.connected.store(true, Ordering::Release);
                        report(&engine, resumed, disconnected);
                    }
                    (broken, disconnected, retry) = (false, false, FIRST_RETRY);
                }
                Err(error) => {
                    debug!(%error, "Kafka log check failed");
                    recover(&transport, &mut follower, &error).await;
                    disconnected = true;
                }
            }
            continue;
        }
        let started = Instant::now();
        let fetched = tokio::select! {
            () = transport.closed.notified() => return,
            fetched = follower.fetch() => fetched,
        };
        let Some(engine) = shared.upgrade() else {
            return;
        };
        match fetched {
            Ok((_, end)) if end < follower.offset => {
                // The log is shorter than what was read: the broker lost it.
                (broken, retry) = (true, Duration::ZERO);
            }
            Ok((records, _)) if records.is_empty() => {
                drop(engine);
                // Also when `fetch_wait` is zero: never a loop without a pause.
                if started.elapsed() < follower.wait.max(IDLE_POLL) {
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
            Ok((records, _)) => {
                for RecordAndOffset { record, offset } in records {
                    follower.offset = offset + 1;
                    deliver(&engine, &record, stream).await;
                    follower.last = Some(record);
                }
            }
            Err(error) if is_undecodable(&error) => {
                // A batch this client cannot read (compressed, or malformed): step over
                // it, and tell subscribers what they will never see.
                debug!(%error, "a Kafka batch could not be decoded; skipping it");
                engine.count_malformed();
                match follower.skip_undecodable().await {
                    Ok(skipped) => engine.missed_for_good(skipped),
                    Err(error) => {
                        debug!(%error, "Kafka fetch failed while skipping");
                        (broken, retry) = (true, FIRST_RETRY);
                    }
                }
            }
            Err(error) if is_error(&error, ProtocolError::OffsetOutOfRange) => {
                // The log moved under this instance while connected: retention, or a
                // broker that lost it and came back before anyone noticed.
                (broken, retry) = (true, Duration::ZERO);
            }
            Err(error) => {
                debug!(%error, "Kafka fetch failed");
                if let Stream::Events = stream {
                    transport.connected.store(false, Ordering::Release);
                }
                recover(&transport, &mut follower, &error).await;
                (broken, disconnected, retry) = (true, true, FIRST_RETRY);
            }
        }
    }
}

/// What can be done about a failed request before trying again.
async fn recover(transport: &KafkaTransport, follower: &mut Follower, error: &KafkaError) {
    if is_unknown_topic(error) {
        // The broker lost the topics (restarted on memory storage).
        if let Ok(producer) = transport.producer().await {
            create_topics(&producer.client, &transport.topic).await;
        }
    } else if matches!(error, KafkaError::Timeout)
        && let Err(error) = follower.reconnect().await
    {
        debug!(%error, "Kafka reconnect failed");
    }
}

/// Tells the engine what the log check after an error meant for its subscribers.
fn report(engine: &Shared, resumed: Resumed, disconnected: bool) {
    if disconnected && !matches!(resumed, Resumed::Replaced) {
        engine.resumed();
    }
    match resumed {
        Resumed::Intact => debug!("Kafka log intact; reading on from the kept offset"),
        Resumed::Trimmed(missed) => {
            debug!(missed, "Kafka retention removed records not yet read");
            engine.missed_for_good(missed);
        }
        Resumed::Replaced => {
            debug!("the Kafka log was lost; reading the new one from its start");
            engine.reconnected();
        }
    }
}

async fn deliver(engine: &Shared, record: &Record, stream: Stream) {
    let Some(value) = &record.value else {
        return;
    };
    if let Stream::Acks(node) = stream
        && record.key.as_deref() != Some(&node.0.to_be_bytes()[..])
    {
        return;
    }
    if let Some((origin, ack)) = engine.receive(value)
        && let Err(error) = engine.send(Some(origin), ack).await
    {
        debug!(%error, "acknowledgement not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_after_a_drop_is_judged_by_its_bounds_and_the_last_record() {
        // Read up to offset 10; the record at 9 is still the one read.
        assert!(matches!(judge(10, 0, 15, Some(true)), Resumed::Intact));
        // Nothing new, nothing read yet, or the record before trimmed exactly.
        assert!(matches!(judge(10, 0, 10, None), Resumed::Intact));
        assert!(matches!(judge(10, 10, 12, None), Resumed::Intact));
        // Retention removed 3 records not yet read.
        assert!(matches!(judge(10, 13, 20, None), Resumed::Trimmed(3)));
        // A shorter log, or another record where the last one was: a new log.
        assert!(matches!(judge(10, 0, 4, None), Resumed::Replaced));
        assert!(matches!(judge(10, 0, 4, Some(true)), Resumed::Replaced));
        assert!(matches!(judge(10, 0, 15, Some(false)), Resumed::Replaced));
    }

    #[test]
    fn topics_are_checked() {
        assert!(validate_topic("warp.events").is_ok());
        assert!(validate_topic("a-b_c.1").is_ok());
        let long = "t".repeat(MAX_TOPIC_LEN + 1);
        for bad in ["", ".", "..", "has space", "a/b", "a*", long.as_str()] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
    }
}
