//! One suite, every bus: the same tests run against the in-memory bus, a mesh of two
//! nodes on loopback, and (with their features) the NATS, Redis and Kafka buses on the
//! local servers. Each test gets a fresh pair of instances, "a" and "b", that see each other.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{eventually, local_config, wait_for_peers, within};
use syncbus::{Bus, Error, EventKind, InMemoryBus, MeshBus, PublishOptions};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Mesh,
    #[cfg(feature = "nats")]
    Nats,
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "kafka")]
    Kafka,
}

fn kinds() -> Vec<Kind> {
    vec![
        Kind::Memory,
        Kind::Mesh,
        #[cfg(feature = "nats")]
        Kind::Nats,
        #[cfg(feature = "redis")]
        Kind::Redis,
        #[cfg(feature = "kafka")]
        Kind::Kafka,
    ]
}

/// Two instances of one bus that see each other. The in-memory bus has no instances
/// but its handles: both are the same bus.
async fn pair(kind: Kind) -> (Arc<dyn Bus>, Arc<dyn Bus>) {
    match kind {
        Kind::Memory => {
            let bus = InMemoryBus::new();
            (Arc::new(bus.clone()), Arc::new(bus))
        }
        Kind::Mesh => {
            let a = MeshBus::bind(local_config("a", &[])).await.unwrap();
            let b = MeshBus::bind(local_config("b", &[a.local_addr()]))
                .await
                .unwrap();
            wait_for_peers(&a, |p| p.len() == 1).await;
            wait_for_peers(&b, |p| p.len() == 1).await;
            (Arc::new(a), Arc::new(b))
        }
        #[cfg(feature = "nats")]
        Kind::Nats => {
            brokers(support::broker::Broker::Nats(
                "nats://127.0.0.1:4222".into(),
            ))
            .await
        }
        #[cfg(feature = "redis")]
        Kind::Redis => {
            brokers(support::broker::Broker::Redis(
                "redis://127.0.0.1:6379/".into(),
            ))
            .await
        }
        #[cfg(feature = "kafka")]
        Kind::Kafka => brokers(support::broker::Broker::Kafka("127.0.0.1:9092".into())).await,
    }
}

#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
async fn brokers(broker: support::broker::Broker) -> (Arc<dyn Bus>, Arc<dyn Bus>) {
    let mut buses = support::broker::instances(&broker, &["a", "b"]).await;
    let b = buses.pop().unwrap();
    let a = buses.pop().unwrap();
    (Arc::new(a), Arc::new(b))
}

fn options() -> PublishOptions {
    PublishOptions::default()
}

#[tokio::test]
async fn keys_prefixes_and_leases_reach_exactly_their_subscribers() {
    for kind in kinds() {
        let (a, b) = pair(kind).await;
        let mut exact = b.subscribe("user:1").await.unwrap();
        let mut prefix = b.subscribe_prefix("user:").await.unwrap();
        let mut lease = b.subscribe_lease("user:1").await.unwrap();
        let mut own = a.subscribe("user:1").await.unwrap();
        a.publish("order:1", options()).await.unwrap();
        a.publish("user:2", options()).await.unwrap();
        a.publish("user:1", options().region("eu")).await.unwrap();
        a.revoke_lease("user:1", options()).await.unwrap();

        let event = within("exact", exact.recv()).await.unwrap();
        assert_eq!(
            (event.kind, event.key.as_str()),
            (EventKind::Invalidate, "user:1"),
            "{kind:?}"
        );
        assert_eq!(event.region.as_deref(), Some("eu"), "{kind:?}");
        let first = within("prefix", prefix.recv()).await.unwrap().key;
        let second = within("prefix", prefix.recv()).await.unwrap().key;
        assert_eq!([first, second], ["user:2", "user:1"], "{kind:?}");
        let revoked = within("lease", lease.recv()).await.unwrap();
        assert_eq!(revoked.kind, EventKind::LeaseRevoked, "{kind:?}");
        assert_eq!(
            within("own", own.recv()).await.unwrap().key,
            "user:1",
            "{kind:?}"
        );
        // Exactly once each, and nothing else.
        for sub in [&mut exact, &mut prefix, &mut lease, &mut own] {
            assert!(sub.try_recv().is_err(), "{kind:?}: an extra event");
        }
        assert_eq!(a.metrics().published, 4, "{kind:?}");
        shut(&a, &b).await;
    }
}

#[tokio::test]
async fn dropping_or_unsubscribing_ends_a_subscription_only() {
    for kind in kinds() {
        let (a, b) = pair(kind).await;
        let kept = b.subscribe("k").await.unwrap();
        let dropped = b.subscribe("k").await.unwrap();
        let ended = b.subscribe("k").await.unwrap();
        drop(dropped);
        b.unsubscribe(&ended).await.unwrap();
        b.unsubscribe(&ended).await.unwrap();
        let mut kept = kept;
        let before = b.metrics().delivered;
        a.publish("k", options()).await.unwrap();
        assert_eq!(
            within("kept", kept.recv()).await.unwrap().key,
            "k",
            "{kind:?}"
        );
        // Only the one subscription left took delivery.
        eventually("counted", || b.metrics().delivered > before).await;
        assert_eq!(b.metrics().delivered - before, 1, "{kind:?}");
        // A subscription of another bus is refused.
        let stranger = InMemoryBus::new().subscribe("k").await.unwrap();
        assert!(matches!(
            b.unsubscribe(&stranger).await,
            Err(Error::ForeignSubscription)
        ));
        shut(&a, &b).await;
    }
}

#[tokio::test]
async fn a_burst_of_one_key_coalesces_or_arrives_whole() {
    for kind in kinds() {
        let (a, b) = pair(kind).await;
        let mut sub = b.subscribe("hot").await.unwrap();
        for _ in 0..500 {
            a.publish("hot", options()).await.unwrap();
        }
        a.publish("hot", options().region("last")).await.unwrap();
        // However the bus batches, the last publish arrives, and never more events than
        // publishes.
        let mut events = 0;
        loop {
            let event = within("the last publish", sub.recv()).await.unwrap();
            assert!(!event.is_resync(), "{kind:?}: {event:?}");
            events += 1;
            if event.region.as_deref() == Some("last") {
                break;
            }
        }
        assert!(events <= 501, "{kind:?}");
        let metrics = a.metrics();
        assert_eq!(metrics.published + metrics.coalesced, 501, "{kind:?}");
        shut(&a, &b).await;
    }
}

#[tokio::test]
async fn an_awaited_publish_counts_the_other_instance_and_refuses_the_impossible() {
    for kind in kinds() {
        let (a, b) = pair(kind).await;
        // In memory a replica is a subscription; elsewhere, another instance.
        let _replica = b.subscribe("k").await.unwrap();
        let timeout = || options().timeout(Duration::from_secs(5));
        let acked = a.publish_and_await("k", 1, timeout()).await.unwrap();
        assert_eq!(acked.replicas, 1, "{kind:?}");
        let refused = a.publish_and_await("k", 5, timeout()).await;
        assert!(
            matches!(
                refused,
                Err(Error::QuorumNotSatisfied {
                    acked: 0,
                    published: false,
                    ..
                })
            ),
            "{kind:?}: {refused:?}"
        );
        assert_eq!(a.metrics().awaits_in_flight, 0, "{kind:?}");
        shut(&a, &b).await;
    }
}

#[tokio::test]
async fn after_shutdown_calls_fail_with_closed() {
    for kind in kinds() {
        let (a, b) = pair(kind).await;
        let mut sub = a.subscribe("k").await.unwrap();
        a.shutdown().await.unwrap();
        assert!(
            matches!(a.publish("k", options()).await, Err(Error::Closed)),
            "{kind:?}"
        );
        assert!(
            matches!(a.subscribe("k").await, Err(Error::Closed)),
            "{kind:?}"
        );
        assert!(within("end", sub.recv()).await.is_none(), "{kind:?}");
        assert!(!a.is_healthy(), "{kind:?}");
        b.shutdown().await.unwrap();
    }
}

async fn shut(a: &Arc<dyn Bus>, b: &Arc<dyn Bus>) {
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
