//! The broker buses' shared test suite: every broker runs the same tests, each against
//! a real server (`Broker` says which and where).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, within};
use syncbus::{BrokerBus, BrokerConfig, Bus, Error, EventKind, PublishOptions, ResyncReason, Zone};

/// A broker server to test against.
#[derive(Clone, Debug)]
pub enum Broker {
    #[cfg(feature = "nats")]
    Nats(String),
    #[cfg(feature = "redis")]
    Redis(String),
    /// A Kafka bootstrap address, `host:port`.
    #[cfg(feature = "kafka")]
    Kafka(String),
}

impl Broker {
    /// A bus instance on `topic` (a NATS subject, a Redis channel) in `zone`.
    pub async fn bus(&self, topic: &str, zone: &str) -> BrokerBus {
        self.bus_with(topic, fast_config(zone)).await.unwrap()
    }

    pub async fn bus_with(&self, topic: &str, config: BrokerConfig) -> Result<BrokerBus, Error> {
        match self {
            #[cfg(feature = "nats")]
            Broker::Nats(url) => BrokerBus::nats(nats_client(url).await, topic, config).await,
            #[cfg(feature = "redis")]
            Broker::Redis(url) => {
                BrokerBus::redis(redis::Client::open(url.as_str()).unwrap(), topic, config).await
            }
            #[cfg(feature = "kafka")]
            Broker::Kafka(address) => BrokerBus::kafka(vec![address.clone()], topic, config).await,
        }
    }

    /// Publishes `payload` on `topic` with a plain client, as anyone could.
    pub async fn send_raw(&self, topic: &str, payload: Vec<u8>) {
        match self {
            #[cfg(feature = "nats")]
            Broker::Nats(url) => {
                let client = nats_client(url).await;
                client
                    .publish(topic.to_owned(), payload.into())
                    .await
                    .unwrap();
                client.flush().await.unwrap();
            }
            #[cfg(feature = "redis")]
            Broker::Redis(url) => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut connection = client.get_multiplexed_async_connection().await.unwrap();
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(topic)
                    .arg(payload)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
            }
            #[cfg(feature = "kafka")]
            Broker::Kafka(address) => kafka::produce(address, topic, payload).await,
        }
    }
}

/// Presence fast enough for tests.
pub fn fast_config(zone: &str) -> BrokerConfig {
    let mut config = BrokerConfig::new(Zone::new(zone).unwrap());
    config.presence_interval = Duration::from_millis(100);
    config.peer_timeout = Duration::from_millis(1000);
    config
}

#[cfg(feature = "nats")]
async fn nats_client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(url)
        .await
        .unwrap()
}

#[cfg(feature = "kafka")]
pub mod kafka {
    use rskafka::chrono::DateTime;
    use rskafka::client::ClientBuilder;
    use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
    use rskafka::record::Record;

    /// A plain client's handle on partition 0 of `topic`, which must exist.
    pub async fn partition(address: &str, topic: &str) -> PartitionClient {
        let client = ClientBuilder::new(vec![address.to_owned()])
            .build()
            .await
            .unwrap();
        client
            .partition_client(topic, 0, UnknownTopicHandling::Retry)
            .await
            .unwrap()
    }

    /// Appends a hand-built record batch (RecordBatch v2, one record of value `junk`)
    /// to partition 0 of `topic` with a raw Produce v3 request, bypassing any client:
    /// with `base_timestamp` out of range, or with the control flag on a record that is
    /// no control record, it is a batch a client cannot decode.
    pub async fn produce_raw_batch(address: &str, topic: &str, base_timestamp: i64, control: bool) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let record = {
            let mut body = vec![0u8]; // attributes
            body.extend(varint(0)); // timestamp delta
            body.extend(varint(0)); // offset delta
            body.extend(varint(-1)); // no key
            body.extend(varint(4));
            body.extend_from_slice(b"junk");
            body.extend(varint(0)); // no headers
            let mut record = varint(body.len() as i64);
            record.extend(body);
            record
        };
        let attributes: i16 = if control { 0x20 } else { 0 };
        let mut after_crc = Vec::new();
        after_crc.extend(attributes.to_be_bytes());
        after_crc.extend(0i32.to_be_bytes()); // last offset delta
        after_crc.extend(base_timestamp.to_be_bytes());
        after_crc.extend(base_timestamp.to_be_bytes());
        after_crc.extend((-1i64).to_be_bytes()); // producer id
        after_crc.extend((-1i16).to_be_bytes()); // producer epoch
        after_crc.extend((-1i32).to_be_bytes()); // base sequence
        after_crc.extend(1i32.to_be_bytes()); // records
        after_crc.extend(record);
        let mut after_length = 0i32.to_be_bytes().to_vec(); // leader epoch
        after_length.push(2); // magic
        after_length.extend(crc32c(&after_crc).to_be_bytes());
        after_length.extend(after_crc);
        let mut batch = 0i64.to_be_bytes().to_vec(); // base offset
        batch.extend((after_length.len() as i32).to_be_bytes());
        batch.extend(after_length);

        let mut request = Vec::new();
        request.extend(0i16.to_be_bytes()); // Produce
        request.extend(3i16.to_be_bytes()); // version 3
        request.extend(7i32.to_be_bytes()); // correlation id
        request.extend(3i16.to_be_bytes());
        request.extend_from_slice(b"raw"); // client id
        request.extend((-1i16).to_be_bytes()); // no transactional id
        request.extend((-1i16).to_be_bytes()); // acks: all
        request.extend(5000i32.to_be_bytes()); // timeout
        request.extend(1i32.to_be_bytes());
        request.extend((topic.len() as i16).to_be_bytes());
        request.extend_from_slice(topic.as_bytes());
        request.extend(1i32.to_be_bytes());
        request.extend(0i32.to_be_bytes()); // partition 0
        request.extend((batch.len() as i32).to_be_bytes());
        request.extend(batch);
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(&(request.len() as i32).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&request).await.unwrap();
        let mut size = [0u8; 4];
        stream.read_exact(&mut size).await.unwrap();
        let mut answer = vec![0u8; i32::from_be_bytes(size) as usize];
        stream.read_exact(&mut answer).await.unwrap();
    }

    /// Zigzag varint, as record fields are written.
    fn varint(n: i64) -> Vec<u8> {
        let mut n = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    /// CRC-32C (Castagnoli), as record batches carry it.
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Appends one record with `payload` to `topic`.
    pub async fn produce(address: &str, topic: &str, payload: Vec<u8>) {
        let record = Record {
            key: None,
            value: Some(payload),
            headers: Default::default(),
            timestamp: DateTime::from_timestamp_millis(0).unwrap(),
        };
        partition(address, topic)
            .await
            .produce(vec![record], Compression::NoCompression)
            .await
            .unwrap();
    }
}

/// A topic no other test uses.
pub fn topic() -> String {
    format!("syncbus.test.{:016x}", getrandom::u64().unwrap())
}

/// Instances on one new topic, one per zone given, each seeing all the others.
pub async fn instances(broker: &Broker, zones: &[&str]) -> Vec<BrokerBus> {
    instances_on(broker, &topic(), zones).await
}

pub async fn instances_on(broker: &Broker, topic: &str, zones: &[&str]) -> Vec<BrokerBus> {
    let mut buses = Vec::new();
    for zone in zones {
        buses.push(broker.bus(topic, zone).await);
    }
    for bus in &buses {
        eventually("presence", || bus.peers().len() == zones.len() - 1).await;
    }
    buses
}

async fn shut_all(buses: &[BrokerBus]) {
    for bus in buses {
        bus.shutdown().await.unwrap();
    }
}

/// Skips resyncs (a reconnect may add one) and returns the next event's key.
async fn next_key(sub: &mut syncbus::Subscription) -> String {
    loop {
        let event = within("an event", sub.recv()).await.unwrap();
        if !event.is_resync() {
            return event.key;
        }
    }
}

pub async fn instances_deliver_to_each_other_filtering_keys_locally(broker: Broker) {
    let buses = instances(&broker, &["a", "b"]).await;
    let mut exact = buses[1].subscribe("user:1").await.unwrap();
    let mut prefix = buses[1].subscribe_prefix("user:").await.unwrap();
    let mut lease = buses[1].subscribe_lease("user:1").await.unwrap();
    let mut own = buses[0].subscribe("user:1").await.unwrap();
    let options = PublishOptions::default;
    buses[0].publish("user:2", options()).await.unwrap();
    buses[0].publish("user:1", options()).await.unwrap();
    buses[0].revoke_lease("user:1", options()).await.unwrap();

    let first = within("exact", exact.recv()).await.unwrap();
    assert_eq!(
        (first.kind, first.key.as_str()),
        (EventKind::Invalidate, "user:1")
    );
    assert_eq!(first.origin, Some(buses[0].node_id()));
    assert_eq!(first.zone.as_ref().map(Zone::as_str), Some("a"));
    let keys = [next_key(&mut prefix).await, next_key(&mut prefix).await];
    assert_eq!(keys, ["user:2", "user:1"]);
    // Leases are a namespace of their own.
    let revoked = within("lease", lease.recv()).await.unwrap();
    assert_eq!(revoked.kind, EventKind::LeaseRevoked);
    assert!(exact.try_recv().is_err() && prefix.try_recv().is_err());
    // The publisher's own subscribers get its publishes too, once.
    assert_eq!(within("own", own.recv()).await.unwrap().key, "user:1");
    assert!(own.try_recv().is_err());
    assert_eq!(buses[0].metrics().published, 3);
    // Unsubscribing (or dropping) ends delivery to that subscription only.
    buses[1].unsubscribe(&exact).await.unwrap();
    drop(lease);
    buses[0].publish("user:1", options()).await.unwrap();
    assert_eq!(next_key(&mut prefix).await, "user:1");
    assert!(within("end", exact.recv()).await.is_none());
    shut_all(&buses).await;
    assert!(matches!(
        buses[0].publish("k", options()).await,
        Err(Error::Closed)
    ));
    assert!(within("closed", prefix.recv()).await.is_none());
}

pub async fn awaited_publishes_count_distinct_remote_instances_and_zones(broker: Broker) {
    let buses = instances(&broker, &["a", "b", "b", "c"]).await;
    let options = PublishOptions::default;
    let acked = buses[0].publish_and_await("k", 3, options()).await.unwrap();
    assert_eq!(acked.replicas, 3);
    assert!(!acked.nodes.contains(&buses[0].node_id()));
    let acked = buses[0]
        .publish_and_await_topology("k", 2, options())
        .await
        .unwrap();
    assert!(acked.zones.len() >= 2);
    // A goal the instances heard from cannot meet fails at once.
    let refused = buses[0].publish_and_await_topology("k", 3, options()).await;
    assert!(
        matches!(
            refused,
            Err(Error::QuorumNotSatisfied {
                available: 2,
                acked: 0,
                ..
            })
        ),
        "{refused:?}"
    );
    // An instance that leaves stops counting.
    buses[3].shutdown().await.unwrap();
    eventually("leave seen", || buses[0].peers().len() == 2).await;
    let quick = || PublishOptions::default().timeout(Duration::from_millis(500));
    let acked = buses[0].publish_and_await("k", 2, quick()).await.unwrap();
    assert_eq!(acked.replicas, 2);
    assert_eq!(buses[0].metrics().awaits_in_flight, 0);
    shut_all(&buses[..3]).await;
}

pub async fn malformed_payloads_are_counted_and_change_nothing(broker: Broker) {
    let topic = topic();
    let buses = instances_on(&broker, &topic, &["a"]).await;
    let mut all = buses[0].subscribe_prefix("").await.unwrap();
    // Magic, version 2, flags, an 8-byte sequence number, then the body.
    let junk: [&[u8]; 5] = [
        b"SQ\x02",
        b"XX\x02\x00\0\0\0\0\0\0\0\0garbage",
        b"SQ\x07\x00\0\0\0\0\0\0\0\0",
        b"SQ\x02\x01\0\0\0\0\0\0\0\0\xff\xff\xff\xff\x00",
        b"SQ\x02\x00\0\0\0\0\0\0\0\0\xff\xff\xff",
    ];
    for payload in junk {
        broker.send_raw(&topic, payload.to_vec()).await;
    }
    eventually("drops counted", || {
        let d = buses[0].metrics().dropped;
        d.truncated + d.bad_magic + d.unsupported_version + d.oversize + d.malformed == 5
    })
    .await;
    let d = buses[0].metrics().dropped;
    assert_eq!((d.truncated, d.bad_magic, d.unsupported_version), (1, 1, 1));
    assert_eq!((d.oversize, d.malformed), (1, 1));
    assert!(all.try_recv().is_err());
    assert!(buses[0].is_healthy());
    shut_all(&buses).await;
}

pub async fn bad_settings_are_refused_with_the_field_named(broker: Broker, bad_topics: &[&str]) {
    for topic in bad_topics {
        let config = BrokerConfig::new(Zone::default());
        let error = broker.bus_with(topic, config).await.err().unwrap();
        assert!(
            matches!(error, Error::InvalidConfig(_)),
            "{topic:?}: {error}"
        );
    }
    let mut bad = BrokerConfig::new(Zone::default());
    bad.peer_timeout = bad.presence_interval;
    let error = broker.bus_with("ok", bad).await.err().unwrap();
    assert!(error.to_string().contains("peer_timeout"), "{error}");
}

/// A loopback TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker server of the test's own on a free port, killed when dropped.
pub struct PrivateServer {
    pub port: u16,
    program: &'static str,
    args: Vec<String>,
    child: Option<Child>,
}

impl PrivateServer {
    /// Starts `program` with `args`, where `{port}` stands for the chosen port.
    pub fn start(program: &'static str, args: &[&str]) -> PrivateServer {
        PrivateServer::start_on(free_tcp_port(), program, args)
    }

    /// Like `start`, on `port`.
    pub fn start_on(port: u16, program: &'static str, args: &[&str]) -> PrivateServer {
        let args = args
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        let mut server = PrivateServer {
            port,
            program,
            args,
            child: None,
        };
        server.restart();
        server
    }

    pub fn restart(&mut self) {
        let child = Command::new(self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} must be installed (scripts/test.sh does it): {e}",
                    self.program
                )
            });
        self.child = Some(child);
        let port = self.port;
        let up = (0..200).any(|_| {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if !ok {
                std::thread::sleep(Duration::from_millis(25));
            }
            ok
        });
        assert!(up, "{} did not listen on {port} within 5 s", self.program);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stalled server must be able to die.
            self.signal("-CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stalls the server (SIGSTOP): connections stay open and nothing answers, as in a
    /// network partition.
    pub fn stall(&self) {
        self.signal("-STOP");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn a_restarted_server_means_a_resync_and_publishing_resumes(
    broker: Broker,
    server: &mut PrivateServer,
) {
    let buses = instances(&broker, &["a", "b"]).await;
    let mut sub = buses[1].subscribe_prefix("k").await.unwrap();
    buses[0]
        .publish("k1", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(next_key(&mut sub).await, "k1");

    server.kill();
    eventually("unhealthy", || buses.iter().all(|b| !b.is_healthy())).await;
    // Nothing is reported sent while the broker is gone, and nothing hangs.
    let refused = within("refusal", buses[0].publish("k2", PublishOptions::default())).await;
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");
    let awaited = PublishOptions::default().timeout(Duration::from_millis(200));
    let refused = within("awaited", buses[0].publish_and_await("k2", 1, awaited)).await;
    assert!(refused.is_err(), "{refused:?}");

    server.restart();
    let resync = within("resync", sub.recv()).await.unwrap();
    assert_eq!(resync.kind, EventKind::Resync(ResyncReason::Disconnected));
    eventually("healthy", || buses.iter().all(|b| b.is_healthy())).await;
    eventually("presence again", || buses[0].peers().len() == 1).await;
    buses[0]
        .publish("k3", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(next_key(&mut sub).await, "k3");
    eventually("reconnect counted", || buses[1].metrics().reconnects >= 1).await;
    shut_all(&buses).await;
}

pub async fn two_drops_leave_every_subscription_working(
    broker: Broker,
    server: &mut PrivateServer,
) {
    let buses = instances(&broker, &["a", "b"]).await;
    let mut subs = Vec::new();
    for i in 0..200 {
        subs.push(buses[1].subscribe(&format!("key:{i}")).await.unwrap());
    }
    for _ in 0..2 {
        server.kill();
        eventually("down", || !buses[1].is_healthy()).await;
        server.restart();
        eventually("up", || buses.iter().all(|b| b.is_healthy())).await;
    }
    eventually("presence again", || buses[0].peers().len() == 1).await;
    for i in 0..200 {
        let key = format!("key:{i}");
        buses[0]
            .publish(&key, PublishOptions::default())
            .await
            .unwrap();
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        assert_eq!(next_key(sub).await, format!("key:{i}"));
    }
    shut_all(&buses).await;
}

pub async fn a_burst_is_batched_and_repeated_keys_coalesce(broker: Broker) {
    // A low threshold, so that even a slow machine publishes in a burst.
    let topic = topic();
    let mut config = fast_config("a");
    config.burst_rate = 50;
    let publisher = broker.bus_with(&topic, config).await.unwrap();
    let buses = vec![publisher, broker.bus(&topic, "b").await];
    for bus in &buses {
        eventually("presence", || bus.peers().len() == 1).await;
    }
    let mut remote = buses[1].subscribe_prefix("burst:").await.unwrap();
    let before = buses[0].metrics();
    // 600 publishes of 200 keys, then 100 without waiting: fewer events than the
    // subscription holds, so nothing overflows while the test is not reading.
    for i in 0..600 {
        let key = format!("burst:{}", i % 200);
        buses[0]
            .publish(&key, PublishOptions::default())
            .await
            .unwrap();
    }
    for i in 0..100 {
        buses[0]
            .try_publish(&format!("burst:try{i}"), PublishOptions::default())
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 300 {
        let event = within("an event", remote.recv()).await.unwrap();
        assert!(!event.is_resync(), "{event:?}");
        seen.insert(event.key);
    }
    let after = buses[0].metrics();
    let sent = after.datagrams_sent - before.datagrams_sent;
    let coalesced = after.coalesced - before.coalesced;
    assert!(coalesced > 0, "no key coalesced");
    assert!(sent < 200, "{sent} messages for 700 publishes: not batched");
    assert_eq!(after.published - before.published + coalesced, 700);
    shut_all(&buses).await;
}

pub async fn a_breaker_stops_trying_a_dead_broker_and_closes_when_it_is_back(
    broker: Broker,
    server: &mut PrivateServer,
) {
    use std::sync::Arc;
    use syncbus::{BreakerConfig, CircuitBreaker};
    let buses = instances(&broker, &["a", "b"]).await;
    let config = BreakerConfig {
        failure_threshold: 3,
        open_for: Duration::from_millis(200),
    };
    let inner: Arc<dyn Bus> = Arc::new(buses[0].clone());
    let breaker = CircuitBreaker::new(inner, config).unwrap();
    breaker
        .publish("k0", PublishOptions::default())
        .await
        .unwrap();

    server.kill();
    eventually("unhealthy", || !buses[0].is_healthy()).await;
    for _ in 0..3 {
        let failed = breaker.publish("k", PublishOptions::default()).await;
        assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
    }
    let sent_before = buses[0].metrics().send_errors;
    let refused = breaker.publish("k", PublishOptions::default()).await;
    assert!(matches!(refused, Err(Error::CircuitOpen)), "{refused:?}");
    assert!(!breaker.is_healthy());
    assert_eq!(
        buses[0].metrics().send_errors,
        sent_before,
        "refused without trying"
    );

    server.restart();
    eventually("inner healthy", || buses.iter().all(|b| b.is_healthy())).await;
    // Once open_for has passed, a probe goes through and closes the circuit.
    eventually("breaker closed", || !breaker.is_open()).await;
    breaker
        .publish("k1", PublishOptions::default())
        .await
        .unwrap();
    assert!(breaker.is_healthy());
    shut_all(&buses).await;
}

pub async fn background_publishes_wait_out_a_dead_broker_and_coalesce(
    broker: Broker,
    server: &mut PrivateServer,
) {
    use std::sync::Arc;
    use syncbus::{BackgroundConfig, BackgroundPublisher};
    let buses = instances(&broker, &["a", "b"]).await;
    let mut remote = buses[1].subscribe_prefix("bg:").await.unwrap();
    let config = BackgroundConfig {
        queue_capacity: 100,
        publish_timeout: Duration::from_millis(500),
        health_check_every: Duration::from_millis(20),
        failure_capacity: 16,
    };
    let inner: Arc<dyn Bus> = Arc::new(buses[0].clone());
    let (background, mut failures) = BackgroundPublisher::spawn(inner, config).unwrap();

    background
        .submit("bg:0", PublishOptions::default())
        .unwrap();
    assert_eq!(next_key(&mut remote).await, "bg:0");

    server.kill();
    eventually("unhealthy", || !buses[0].is_healthy()).await;
    // Submitting never waits; a repeated key replaces its waiting publish.
    for round in 0..3 {
        for i in 1..=50 {
            let options = PublishOptions::default().region(format!("round{round}"));
            background.submit(&format!("bg:{i}"), options).unwrap();
        }
    }
    assert!(
        background.pending() <= 51,
        "{} pending",
        background.pending()
    );
    for i in 0..50 {
        background
            .submit(&format!("bg:extra{i}"), PublishOptions::default())
            .unwrap();
    }
    let refused = background.submit("bg:overflow", PublishOptions::default());
    assert!(matches!(refused, Err(Error::QueueFull)), "{refused:?}");
    let failure = within("a failure", failures.recv()).await.unwrap();
    assert!(failure.retrying, "{failure:?}");

    server.restart();
    // Everything queued goes out once the bus is back, each key once, the latest
    // version of each.
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 100 {
        let event = within("an event", remote.recv()).await.unwrap();
        if !event.is_resync() {
            seen.insert(event.key.clone(), event.region.clone());
        }
    }
    assert_eq!(
        seen.get("bg:7").cloned().flatten().as_deref(),
        Some("round2")
    );
    eventually("drained", || background.pending() == 0).await;
    shut_all(&buses).await;
}

/// Declares the whole broker suite as tests, given the shared broker, a function that
/// starts a private one (returning it as a `Broker` and its process), and the topic
/// names the broker must refuse.
macro_rules! broker_suite {
    ($shared:expr, $private:expr, $bad_topics:expr) => {
        use support::broker;

        #[tokio::test]
        async fn instances_deliver_to_each_other_filtering_keys_locally() {
            broker::instances_deliver_to_each_other_filtering_keys_locally($shared).await;
        }

        #[tokio::test]
        async fn awaited_publishes_count_distinct_remote_instances_and_zones() {
            broker::awaited_publishes_count_distinct_remote_instances_and_zones($shared).await;
        }

        #[tokio::test]
        async fn malformed_payloads_are_counted_and_change_nothing() {
            broker::malformed_payloads_are_counted_and_change_nothing($shared).await;
        }

        #[tokio::test]
        async fn bad_settings_are_refused_with_the_field_named() {
            broker::bad_settings_are_refused_with_the_field_named($shared, $bad_topics).await;
        }

        #[tokio::test]
        async fn a_burst_is_batched_and_repeated_keys_coalesce() {
            broker::a_burst_is_batched_and_repeated_keys_coalesce($shared).await;
        }

        #[tokio::test]
        async fn entries_larger_than_this_bus_accepts_are_dropped() {
            broker::entries_larger_than_this_bus_accepts_are_dropped($shared).await;
        }

        #[tokio::test]
        async fn shutdown_during_an_await_ends_it_with_closed() {
            broker::shutdown_during_an_await_ends_it_with_closed($shared).await;
        }

        #[tokio::test]
        async fn a_stalled_broker_holds_no_call_past_its_deadline() {
            let (broker, mut server) = $private;
            broker::a_stalled_broker_holds_no_call_past_its_deadline(broker, &mut server).await;
        }

        #[tokio::test]
        async fn a_restarted_server_means_a_resync_and_publishing_resumes() {
            let (broker, mut server) = $private;
            broker::a_restarted_server_means_a_resync_and_publishing_resumes(broker, &mut server)
                .await;
        }

        #[tokio::test]
        async fn two_drops_leave_every_subscription_working() {
            let (broker, mut server) = $private;
            broker::two_drops_leave_every_subscription_working(broker, &mut server).await;
        }

        #[tokio::test]
        async fn a_breaker_stops_trying_a_dead_broker_and_closes_when_it_is_back() {
            let (broker, mut server) = $private;
            broker::a_breaker_stops_trying_a_dead_broker_and_closes_when_it_is_back(
                broker,
                &mut server,
            )
            .await;
        }

        #[tokio::test]
        async fn background_publishes_wait_out_a_dead_broker_and_coalesce() {
            let (broker, mut server) = $private;
            broker::background_publishes_wait_out_a_dead_broker_and_coalesce(broker, &mut server)
                .await;
        }
    };
}

pub async fn entries_larger_than_this_bus_accepts_are_dropped(broker: Broker) {
    let topic = topic();
    let mut generous = fast_config("a");
    generous.max_key_len = 200_000;
    let sender = broker.bus_with(&topic, generous).await.unwrap();
    let receiver = broker.bus(&topic, "b").await;
    for bus in [&sender, &receiver] {
        eventually("presence", || bus.peers().len() == 1).await;
    }
    let mut all = receiver.subscribe_prefix("").await.unwrap();
    let huge = "k".repeat(100_000);
    sender
        .publish(&huge, PublishOptions::default())
        .await
        .unwrap();
    sender
        .publish("small", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(next_key(&mut all).await, "small");
    eventually("dropped", || receiver.metrics().dropped.malformed == 1).await;
    // The sender refuses, itself, what no receiver would take.
    let region = "r".repeat(2 << 20);
    let refused = sender
        .publish("k", PublishOptions::default().region(region))
        .await;
    assert!(
        matches!(refused, Err(Error::KeyTooLarge { .. })),
        "{refused:?}"
    );
    shut_all(&[sender, receiver]).await;
}

pub async fn shutdown_during_an_await_ends_it_with_closed(broker: Broker) {
    let mut buses = instances(&broker, &["a", "b"]).await;
    // The other instance vanishes without a goodbye: it still counts for a while, but
    // will never acknowledge.
    drop(buses.pop());
    let a = buses.pop().unwrap();
    let timeout = PublishOptions::default().timeout(Duration::from_secs(10));
    let (awaited, ()) = tokio::join!(a.publish_and_await("k", 1, timeout), async {
        eventually("await in flight", || a.metrics().awaits_in_flight == 1).await;
        a.shutdown().await.unwrap();
    });
    assert!(matches!(awaited, Err(Error::Closed)), "{awaited:?}");
}

pub async fn a_stalled_broker_holds_no_call_past_its_deadline(
    broker: Broker,
    server: &mut PrivateServer,
) {
    // Publishes are sent one by one here (no batching), so each one meets the broker.
    let topic = topic();
    let mut unbatched = fast_config("a");
    unbatched.burst_rate = u64::MAX;
    let buses = vec![
        broker.bus_with(&topic, unbatched).await.unwrap(),
        broker.bus(&topic, "b").await,
    ];
    for bus in &buses {
        eventually("presence", || bus.peers().len() == 1).await;
    }
    server.stall();
    // A client may buffer a while before it blocks, so publishes may still be accepted;
    // none may hold its caller past its deadline (each is bounded by `within`), and
    // any that fails says so.
    let region = "r".repeat(8 * 1024);
    for _ in 0..3_000 {
        let options = PublishOptions::default()
            .region(region.clone())
            .timeout(Duration::from_millis(300));
        if let Err(error) = within("a publish", buses[0].publish("k", options)).await {
            assert!(
                matches!(error, Error::Timeout | Error::Unavailable(_)),
                "{error:?}"
            );
            break;
        }
    }
    let awaited = PublishOptions::default().timeout(Duration::from_millis(300));
    assert!(
        within("an await", buses[0].publish_and_await("k", 1, awaited))
            .await
            .is_err()
    );
    // Shutting down does not wait on the broker.
    for bus in &buses {
        within("shutdown", bus.shutdown()).await.unwrap();
    }
    server.kill();
}
