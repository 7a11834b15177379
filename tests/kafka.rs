//! The Kafka bus against a real Kafka-compatible broker (tansu, on memory storage): the
//! shared one on 127.0.0.1:9092 (the test command installs and starts it), and private
//! ones on other ports for the tests that kill one or cut its connections. Besides the
//! broker suite in `support/broker.rs`: where a new instance starts reading, and the
//! replay of the log after a connection was cut.
#![cfg(feature = "kafka")]

#[macro_use]
mod support;

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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
