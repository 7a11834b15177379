//! The NATS bus against a real NATS server: the shared one on 127.0.0.1:4222 (the test
//! command starts it when it is down), and private servers on other ports for the
//! tests that kill one.
#![cfg(feature = "nats")]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{eventually, within};
use syncbus::{BrokerBus, BrokerConfig, Bus, Error, EventKind, PublishOptions, ResyncReason, Zone};

const SHARED_SERVER: &str = "nats://127.0.0.1:4222";

/// A subject no other test uses.
fn subject() -> String {
    format!("syncbus.test.{:016x}", getrandom::u64().unwrap())
}

fn config(zone: &str) -> BrokerConfig {
    let mut config = BrokerConfig::new(Zone::new(zone).unwrap());
    config.presence_interval = Duration::from_millis(100);
    config.peer_timeout = Duration::from_millis(1000);
    config
}

async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(url)
        .await
        .unwrap()
}

/// Instances on one new subject, one per zone given, each seeing all the others.
async fn bus(url: &str, zones: &[&str]) -> Vec<BrokerBus> {
    bus_on(url, &subject(), zones).await
}

async fn bus_on(url: &str, subject: &str, zones: &[&str]) -> Vec<BrokerBus> {
    let mut buses = Vec::new();
    for zone in zones {
        let bus = BrokerBus::nats(client(url).await, subject, config(zone))
            .await
            .unwrap();
        buses.push(bus);
    }
    for bus in &buses {
        eventually("presence", || bus.peers().len() == zones.len() - 1).await;
    }
    buses
}

#[tokio::test]
async fn instances_deliver_to_each_other_filtering_keys_locally() {
    let buses = bus(SHARED_SERVER, &["a", "b"]).await;
    let mut exact = buses[1].subscribe("user:1").await.unwrap();
    let mut prefix = buses[1].subscribe_prefix("user:").await.unwrap();
    let mut lease = buses[1].subscribe_lease("user:1").await.unwrap();
    let mut own = buses[0].subscribe("user:1").await.unwrap();

    buses[0]
        .publish("user:2", PublishOptions::default())
        .await
        .unwrap();
    buses[0]
        .publish("user:1", PublishOptions::default())
        .await
        .unwrap();
    buses[0]
        .revoke_lease("user:1", PublishOptions::default())
        .await
        .unwrap();

    let first = within("exact", exact.recv()).await.unwrap();
    assert_eq!(
        (first.kind, first.key.as_str()),
        (EventKind::Invalidate, "user:1")
    );
    assert_eq!(first.origin, Some(buses[0].node_id()));
    assert_eq!(first.zone.as_ref().map(Zone::as_str), Some("a"));
    let keys = [
        within("prefix", prefix.recv()).await.unwrap().key,
        within("prefix", prefix.recv()).await.unwrap().key,
    ];
    assert_eq!(keys, ["user:2", "user:1"]);
    // Leases are a namespace of their own.
    let revoked = within("lease", lease.recv()).await.unwrap();
    assert_eq!(revoked.kind, EventKind::LeaseRevoked);
    assert!(exact.try_recv().is_err() && prefix.try_recv().is_err());
    // The publisher's own subscribers get its publishes too, once.
    assert_eq!(within("own", own.recv()).await.unwrap().key, "user:1");
    assert!(own.try_recv().is_err());
    let metrics = buses[0].metrics();
    assert_eq!(metrics.published, 3);
    for bus in &buses {
        bus.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn awaited_publishes_count_distinct_remote_instances_and_zones() {
    let buses = bus(SHARED_SERVER, &["a", "b", "b", "c"]).await;
    let acked = buses[0]
        .publish_and_await("k", 3, PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(acked.replicas, 3);
    assert!(!acked.nodes.contains(&buses[0].node_id()));
    let acked = buses[0]
        .publish_and_await_topology("k", 2, PublishOptions::default())
        .await
        .unwrap();
    assert!(acked.zones.len() >= 2);
    // A goal the instances heard from cannot meet fails at once.
    let refused = buses[0]
        .publish_and_await_topology("k", 3, PublishOptions::default())
        .await;
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
    // An instance that leaves stops counting, and a goal that needed it times out
    // honestly, saying who acknowledged.
    buses[3].shutdown().await.unwrap();
    eventually("leave seen", || buses[0].peers().len() == 2).await;
    let timeout = PublishOptions::default().timeout(Duration::from_millis(300));
    let acked = buses[0].publish_and_await("k", 2, timeout).await.unwrap();
    assert_eq!(acked.replicas, 2);
    assert_eq!(buses[0].metrics().awaits_in_flight, 0);
    for bus in &buses[..3] {
        bus.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn malformed_payloads_are_counted_and_change_nothing() {
    let subject = subject();
    let buses = bus_on(SHARED_SERVER, &subject, &["a"]).await;
    let mut all = buses[0].subscribe_prefix("").await.unwrap();
    let raw = client(SHARED_SERVER).await;
    let junk: [&[u8]; 5] = [
        b"",
        b"XX\x01\x00garbage",
        b"SQ\x07\x00",
        b"SQ\x01\x01\xff\xff\xff\xff\x00",
        b"SQ\x01\x00\xff\xff\xff",
    ];
    for payload in junk {
        raw.publish(subject.clone(), payload.to_vec().into())
            .await
            .unwrap();
    }
    raw.flush().await.unwrap();
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
    buses[0].shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_settings_are_refused_with_the_field_named() {
    let nats = client(SHARED_SERVER).await;
    for subject in ["", "a.*", "a b"] {
        let error = BrokerBus::nats(nats.clone(), subject, config("a"))
            .await
            .err()
            .unwrap();
        assert!(error.to_string().contains("subject"), "{error}");
    }
    let mut bad = config("a");
    bad.peer_timeout = bad.presence_interval;
    let error = BrokerBus::nats(nats, "ok", bad).await.err().unwrap();
    assert!(error.to_string().contains("peer_timeout"), "{error}");
}

/// A nats-server of the test's own on a free port, killed when dropped.
struct PrivateServer {
    port: u16,
    child: Option<Child>,
}

impl PrivateServer {
    fn start() -> PrivateServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = PrivateServer { port, child: None };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_restarted_server_means_one_resync_and_publishing_resumes() {
    let mut server = PrivateServer::start();
    let buses = bus(&server.url(), &["a", "b"]).await;
    let mut sub = buses[1].subscribe_prefix("k").await.unwrap();
    buses[0]
        .publish("k1", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(within("first", sub.recv()).await.unwrap().key, "k1");

    server.kill();
    eventually("unhealthy", || buses.iter().all(|b| !b.is_healthy())).await;
    // Nothing is reported sent while the broker is gone, and nothing hangs.
    let refused = within("refusal", buses[0].publish("k2", PublishOptions::default())).await;
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");
    let awaited = PublishOptions::default().timeout(Duration::from_millis(200));
    let refused = within("awaited", buses[0].publish_and_await("k2", 1, awaited)).await;
    assert!(refused.is_err(), "{refused:?}");

    server.restart();
    eventually("healthy", || buses.iter().all(|b| b.is_healthy())).await;
    let resync = within("resync", sub.recv()).await.unwrap();
    assert_eq!(resync.kind, EventKind::Resync(ResyncReason::Disconnected));
    eventually("presence again", || buses[0].peers().len() == 1).await;
    buses[0]
        .publish("k3", PublishOptions::default())
        .await
        .unwrap();
    // The publisher's own notice of its gap may arrive first: another resync, never
    // a lost event.
    let mut next = within("after restart", sub.recv()).await.unwrap();
    while next.is_resync() {
        next = within("after restart", sub.recv()).await.unwrap();
    }
    assert_eq!(next.key, "k3");
    eventually("reconnect counted", || buses[1].metrics().reconnects >= 1).await;
    for bus in &buses {
        bus.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn two_drops_within_half_a_second_leave_every_subscription_working() {
    let mut server = PrivateServer::start();
    let buses = bus(&server.url(), &["a", "b"]).await;
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
        buses[0]
            .publish(&format!("key:{i}"), PublishOptions::default())
            .await
            .unwrap();
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let mut event = within("delivery", sub.recv()).await.unwrap();
        while event.is_resync() {
            event = within("delivery", sub.recv()).await.unwrap();
        }
        assert_eq!(event.key, format!("key:{i}"));
    }
    for bus in &buses {
        bus.shutdown().await.unwrap();
    }
}
