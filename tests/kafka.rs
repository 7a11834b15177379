//! The Kafka bus against a real Kafka-compatible broker (tansu, on memory storage): the
//! shared one on 127.0.0.1:9092 (the test command installs and starts it), and private
//! ones on other ports for the tests that kill one or cut its connections. Besides the
//! broker suite in `support/broker.rs`: where a new instance starts reading, and the
//! replay of the log after a connection was cut.
#![cfg(feature = "kafka")]

#[macro_use]
mod support;

use std::time::Duration;
use support::broker::{Broker, PrivateServer, fast_config, instances_on, topic};
use support::proxy::Proxy;
use support::{eventually, within};

use syncbus::{Bus, PublishOptions};

const SHARED: &str = "127.0.0.1:9092";

fn shared() -> Broker {
    Broker::Kafka(SHARED.into())
}

/// A tansu broker of the test's own, listening on a free port and telling clients to
/// connect to `advertised` (its own port when `None`).
fn tansu(advertised: Option<u16>) -> PrivateServer {
    let port = support::broker::free_tcp_port();
    let advertised = format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port));
    let args = [
        "broker",
        "--listener-url",
        "tcp://127.0.0.1:{port}",
        "--advertised-listener-url",
        &advertised,
        "--storage-engine",
        "memory://tansu/",
    ];
    PrivateServer::start_on(port, "tansu", &args)
}

fn private() -> (Broker, PrivateServer) {
    let server = tansu(None);
    (Broker::Kafka(format!("127.0.0.1:{}", server.port)), server)
}

broker_suite!(shared(), private(), &["", "a b", "a/b", "a*", ".."]);

#[tokio::test]
async fn a_new_instance_starts_at_the_log_end_as_the_high_watermark_gives_it() {
    let broker = shared();
    let topic = topic();
    let buses = instances_on(&broker, &topic, &["a"]).await;
    for key in ["old:1", "old:2"] {
        buses[0]
            .publish(key, PublishOptions::default())
            .await
            .unwrap();
    }
    // The log end is the offset after the last record. Some brokers (tansu 0.6) answer
    // ListOffsets(latest) with the last record's offset instead; the bus reads the end
    // from a fetch's high watermark, which must be right.
    let partition = support::broker::kafka::partition(SHARED, &topic).await;
    let (records, high_watermark) = partition.fetch_records(0, 1..1 << 20, 0).await.unwrap();
    let last = records.last().unwrap().offset;
    assert_eq!(high_watermark, last + 1);

    let late = broker.bus(&topic, "b").await;
    let mut all = late.subscribe_prefix("").await.unwrap();
    buses[0]
        .publish("new", PublishOptions::default())
        .await
        .unwrap();
    let first = within("an event", all.recv()).await.unwrap();
    assert_eq!(first.key, "new", "replayed what came before: {first:?}");
    for bus in buses.iter().chain([&late]) {
        bus.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_cut_connection_is_replayed_from_the_log_without_a_resync() {
    // Clients reach the broker only through the proxy, which the broker advertises.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let server = tansu(Some(proxy_port));
    let proxy = Proxy::start(listener, server.port);
    let broker = Broker::Kafka(format!("127.0.0.1:{proxy_port}"));
    let topic = topic();

    let subscriber = broker.bus_with(&topic, fast_config("b")).await.unwrap();
    let mut all = subscriber.subscribe_prefix("k").await.unwrap();
    // The subscriber's connections go dead; an instance that connects afterwards
    // publishes while the subscriber cannot read.
    proxy.stall_existing();
    let publisher = broker.bus(&topic, "a").await;
    for i in 0..5 {
        let key = format!("k{i}");
        publisher
            .publish(&key, PublishOptions::default())
            .await
            .unwrap();
    }
    // The subscriber notices the dead connection, connects again, finds the log as it
    // left it, and reads on from its offset: everything arrives, in order, no resync.
    for i in 0..5 {
        let event = within("a replayed event", all.recv()).await.unwrap();
        assert!(!event.is_resync(), "{event:?}");
        assert_eq!(event.key, format!("k{i}"));
    }
    eventually("reconnect counted", || subscriber.metrics().reconnects >= 1).await;
    assert_eq!(subscriber.metrics().missed, 0);
    assert!(subscriber.is_healthy());
    for bus in [&publisher, &subscriber] {
        bus.shutdown().await.unwrap();
    }
    drop(server);
}

#[tokio::test]
async fn a_bus_whose_brokers_are_all_down_fails_to_start_with_unavailable() {
    // A port that was free a moment ago: nothing listens there.
    let port = support::broker::free_tcp_port();
    let broker = Broker::Kafka(format!("127.0.0.1:{port}"));
    let refused = within("the refusal", broker.bus_with(&topic(), fast_config("a"))).await;
    assert!(
        matches!(refused, Err(syncbus::Error::Unavailable(_))),
        "{:?}",
        refused.err()
    );
    let none = syncbus::BrokerBus::kafka(Vec::new(), "t", fast_config("a")).await;
    assert!(matches!(none, Err(syncbus::Error::InvalidConfig(_))));
}

#[tokio::test]
async fn a_batch_the_client_cannot_decode_is_skipped_with_a_resync() {
    let broker = shared();
    let topic = topic();
    let buses = instances_on(&broker, &topic, &["a", "b"]).await;
    let mut sub = buses[1].subscribe_prefix("k").await.unwrap();
    buses[0]
        .publish("k1", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(within("k1", sub.recv()).await.unwrap().key, "k1");
    // A timestamp out of range, then a control flag on a plain record: rskafka fails to
    // decode either. Each is skipped and its loss reported.
    for (timestamp, control) in [(1 << 62, false), (0, true)] {
        support::broker::kafka::produce_raw_batch(SHARED, &topic, timestamp, control).await;
    }
    buses[0]
        .publish("k2", PublishOptions::default())
        .await
        .unwrap();
    let mut resyncs = 0;
    loop {
        let event = within("k2", sub.recv()).await.unwrap();
        if event.is_resync() {
            resyncs += 1;
            continue;
        }
        assert_eq!(event.key, "k2");
        break;
    }
    assert!(resyncs >= 1, "the skipped batches were not reported");
    assert!(buses[1].metrics().dropped.malformed >= 1);
    assert!(buses.iter().all(Bus::is_healthy));
    // A new instance starts behind the undecodable batches.
    let late = broker.bus(&topic, "c").await;
    let mut late_sub = late.subscribe_prefix("k").await.unwrap();
    buses[0]
        .publish("k3", PublishOptions::default())
        .await
        .unwrap();
    loop {
        let event = within("k3", late_sub.recv()).await.unwrap();
        if !event.is_resync() {
            assert_eq!(event.key, "k3");
            break;
        }
    }
    for bus in buses.iter().chain([&late]) {
        bus.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_broker_that_restarts_at_once_with_a_new_log_is_never_read_on_silently() {
    // Presence beacons far apart, so that the only records are the test's.
    let quiet = |zone: &str| {
        let mut config = fast_config(zone);
        config.presence_interval = Duration::from_secs(20);
        config.peer_timeout = Duration::from_secs(60);
        config
    };
    for _ in 0..3 {
        let (broker, mut server) = private();
        let topic = topic();
        let reader = broker.bus_with(&topic, quiet("b")).await.unwrap();
        let mut sub = reader.subscribe_prefix("").await.unwrap();
        for _ in 0..5 {
            broker.send_raw(&topic, b"junk".to_vec()).await;
        }
        eventually("junk read", || reader.metrics().dropped.truncated == 5).await;
        // The broker comes back with an empty log, and a new instance fills it past
        // the reader's offset at once.
        server.kill();
        server.restart();
        let writer = broker.bus_with(&topic, quiet("c")).await.unwrap();
        for key in ["first"].into_iter().chain(["filler"; 10]) {
            writer
                .publish(key, PublishOptions::default())
                .await
                .unwrap();
        }
        // The reader gets the first invalidation, or a resync that covers it.
        let event = within("first, or a resync", sub.recv()).await.unwrap();
        assert!(
            event.is_resync() || event.key == "first",
            "{:?} arrived with nothing before it",
            event.key
        );
        for bus in [&reader, &writer] {
            bus.shutdown().await.unwrap();
        }
    }
}
