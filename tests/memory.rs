//! The in-memory bus: every behaviour the Bus trait promises, in one process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use syncbus::{
    Bus, Error, EventKind, InMemoryBus, InMemoryConfig, PublishOptions, ResyncReason, TryRecvError,
};

fn options() -> PublishOptions {
    PublishOptions::default()
}

#[tokio::test]
async fn a_publish_reaches_a_subscriber_and_is_counted() {
    let bus = InMemoryBus::new();
    let mut sub = bus.subscribe("user:1").await.unwrap();
    bus.publish("user:1", options().region("eu")).await.unwrap();
    let event = sub.recv().await.unwrap();
    assert_eq!(event.kind, EventKind::Invalidate);
    assert_eq!(event.key, "user:1");
    assert_eq!(event.region.as_deref(), Some("eu"));
    let metrics = bus.metrics();
    assert_eq!((metrics.published, metrics.delivered), (1, 1));
}

#[tokio::test]
async fn awaited_publish_counts_subscriptions_as_replicas() {
    let bus = InMemoryBus::new();
    let mut sub = bus.subscribe("k").await.unwrap();
    let acked = bus.publish_and_await("k", 1, options()).await.unwrap();
    assert_eq!(acked.replicas, 1);
    assert_eq!(sub.recv().await.unwrap().key, "k");

    let error = bus.publish_and_await("k", 2, options()).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::QuorumNotSatisfied {
                acked: 0,
                required: 2,
                available: 1,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        bus.metrics().published,
        1,
        "the failed goal published nothing"
    );
    assert_eq!(sub.try_recv(), Err(TryRecvError::Empty));
}

#[tokio::test]
async fn topology_goals_are_unsupported_in_one_process() {
    let bus = InMemoryBus::new();
    let error = bus
        .publish_and_await_topology("k", 1, options())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::QuorumUnsupported));
    assert_eq!(bus.metrics().published, 0);
}

#[tokio::test(start_paused = true)]
async fn a_key_already_pending_coalesces_and_counts_once() {
    let bus = InMemoryBus::with_config(InMemoryConfig {
        batch_window: Duration::from_millis(10),
        ..InMemoryConfig::default()
    });
    let mut sub = bus.subscribe("k").await.unwrap();
    bus.publish("k", options()).await.unwrap();
    bus.publish("k", options().region("latest")).await.unwrap();
    let event = sub.recv().await.unwrap();
    assert_eq!(
        event.region.as_deref(),
        Some("latest"),
        "the newer metadata wins"
    );
    let metrics = bus.metrics();
    assert_eq!(
        (metrics.published, metrics.coalesced, metrics.delivered),
        (1, 1, 1)
    );
    // After the window the same key is a new event again.
    bus.publish("k", options()).await.unwrap();
    assert_eq!(sub.recv().await.unwrap().key, "k");
    assert_eq!(bus.metrics().published, 2);
}

#[tokio::test]
async fn a_publish_past_its_deadline_changes_nothing() {
    let bus = InMemoryBus::new();
    let mut sub = bus.subscribe("k").await.unwrap();
    let past = Instant::now() - Duration::from_millis(1);
    let error = bus
        .publish("k", options().deadline(past))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout));
    let error = bus
        .publish_and_await("k", 1, options().deadline(past))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout));
    assert_eq!(bus.metrics().published, 0);
    assert_eq!(sub.try_recv(), Err(TryRecvError::Empty));
}

#[tokio::test]
async fn dropped_futures_change_nothing() {
    let bus = InMemoryBus::new();
    drop(bus.publish("k", options()));
    drop(bus.subscribe("k"));
    assert_eq!(bus.metrics().published, 0);
    let error = bus.publish_and_await("k", 1, options()).await.unwrap_err();
    assert!(
        matches!(error, Error::QuorumNotSatisfied { available: 0, .. }),
        "no subscription was added"
    );

    let mut sub = bus.subscribe("k").await.unwrap();
    drop(bus.unsubscribe(&sub));
    bus.publish("k", options()).await.unwrap();
    assert_eq!(
        sub.recv().await.unwrap().key,
        "k",
        "the subscription survived"
    );
}

#[tokio::test]
async fn leases_live_in_their_own_namespace() {
    let bus = InMemoryBus::new();
    let mut lease = bus.subscribe_lease("x").await.unwrap();
    let mut plain = bus.subscribe("x").await.unwrap();
    let mut prefixed = bus.subscribe("lease:x").await.unwrap();
    let mut everything = bus.subscribe_prefix("").await.unwrap();

    bus.revoke_lease("x", options()).await.unwrap();
    assert_eq!(lease.recv().await.unwrap().kind, EventKind::LeaseRevoked);
    bus.publish("lease:x", options()).await.unwrap();
    assert_eq!(prefixed.recv().await.unwrap().kind, EventKind::Invalidate);
    assert_eq!(everything.recv().await.unwrap().key, "lease:x");
    assert_eq!(plain.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(lease.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(everything.try_recv(), Err(TryRecvError::Empty));
}

#[tokio::test]
async fn unsubscribe_ends_the_stream() {
    let bus = InMemoryBus::new();
    let mut sub = bus.subscribe("k").await.unwrap();
    let lease = bus.subscribe_lease("l").await.unwrap();
    bus.publish("k", options()).await.unwrap();
    bus.unsubscribe(&sub).await.unwrap();
    bus.unsubscribe_lease(&lease).await.unwrap();
    assert_eq!(
        sub.next().await.unwrap().key,
        "k",
        "queued events are still yielded"
    );
    assert_eq!(sub.next().await, None);
    bus.publish("k", options()).await.unwrap();
    assert_eq!(bus.metrics().delivered, 1);
}

#[tokio::test]
async fn a_slow_subscriber_gets_a_resync_and_blocks_nobody() {
    let bus = InMemoryBus::with_config(InMemoryConfig {
        subscriber_capacity: 4,
        ..InMemoryConfig::default()
    });
    let mut slow = bus.subscribe_prefix("item:").await.unwrap();
    let mut fast = bus.subscribe_prefix("item:").await.unwrap();
    for i in 0..10 {
        bus.publish(&format!("item:{i}"), options()).await.unwrap();
        assert_eq!(fast.recv().await.unwrap().key, format!("item:{i}"));
    }
    for i in 0..4 {
        assert_eq!(slow.recv().await.unwrap().key, format!("item:{i}"));
    }
    let resync = slow.recv().await.unwrap();
    assert_eq!(resync.kind, EventKind::Resync(ResyncReason::Overflow));
    assert_eq!(resync.key, "item:");
    assert_eq!(slow.try_recv(), Err(TryRecvError::Empty));
    let metrics = bus.metrics();
    assert_eq!(
        (metrics.delivered, metrics.overflowed, metrics.resyncs),
        (14, 6, 1)
    );
}

#[tokio::test]
async fn subscriptions_from_another_bus_are_refused() {
    let one = InMemoryBus::new();
    let other = InMemoryBus::new();
    let sub = one.subscribe("k").await.unwrap();
    assert!(matches!(
        other.unsubscribe(&sub).await,
        Err(Error::ForeignSubscription)
    ));
}

#[tokio::test]
async fn shutdown_ends_every_subscription_and_refuses_more() {
    let bus: Arc<dyn Bus> = Arc::new(InMemoryBus::new());
    let mut sub = bus.subscribe("k").await.unwrap();
    assert!(bus.is_healthy());
    bus.shutdown().await.unwrap();
    assert!(!bus.is_healthy());
    assert_eq!(sub.recv().await, None);
    assert!(matches!(
        bus.publish("k", options()).await,
        Err(Error::Closed)
    ));
    assert!(matches!(bus.subscribe("k").await, Err(Error::Closed)));
    assert!(bus.peers().is_empty());
}

#[test]
fn a_batch_window_without_a_runtime_is_a_clear_error() {
    let bus = InMemoryBus::with_config(InMemoryConfig {
        batch_window: Duration::from_millis(5),
        ..InMemoryConfig::default()
    });
    let outcome = futures_executor_block_on(bus.publish("k", options()));
    assert!(matches!(outcome, Err(Error::InvalidConfig(e)) if e.field == "batch_window"));
}

/// Polls a future that never waits to completion without any runtime.
fn futures_executor_block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("the publish waited without a runtime"),
    }
}

#[tokio::test]
async fn dropping_the_last_handle_ends_subscriptions() {
    let bus = InMemoryBus::new();
    let mut sub = bus.subscribe("k").await.unwrap();
    let other_handle = bus.clone();
    drop(bus);
    other_handle.publish("k", options()).await.unwrap();
    assert_eq!(sub.recv().await.unwrap().key, "k");
    drop(other_handle);
    assert_eq!(sub.recv().await, None);
}

#[tokio::test]
async fn a_resync_owed_for_dropped_events_survives_shutdown() {
    let bus = InMemoryBus::with_config(InMemoryConfig {
        subscriber_capacity: 2,
        ..InMemoryConfig::default()
    });
    let mut sub = bus.subscribe("k").await.unwrap();
    for _ in 0..5 {
        bus.publish("k", options()).await.unwrap();
    }
    bus.shutdown().await.unwrap();
    let kinds: Vec<EventKind> = std::iter::from_fn(|| sub.try_recv().ok())
        .map(|e| e.kind)
        .collect();
    let overflow = EventKind::Resync(ResyncReason::Overflow);
    assert_eq!(
        kinds,
        [EventKind::Invalidate, EventKind::Invalidate, overflow]
    );
    assert_eq!(sub.try_recv(), Err(TryRecvError::Closed));
}
