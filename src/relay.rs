//! A relay between a cluster's own bus and a federation bus shared by several clusters
//! (regions). Invalidations published with [`Scope::Global`] cross in both directions,
//! keeping their region and vector clock; local-scope ones stay where they are.
//!
//! Every bus delivers a publish to its publisher's own subscribers too, so each
//! invalidation the relay publishes comes back to it once on the bus it published on.
//! The relay counts what it published and lets exactly that many matching events pass
//! unrelayed: nothing is echoed back, and an application's own publish of the same key
//! is still relayed, whichever of the two arrives first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use syncbus_mesh::Scope;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::bus::{Bus, PublishOptions};
use crate::error::Error;
use crate::event::{Event, EventKind};
use crate::subscription::Subscription;

/// What the relay carried so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Global invalidations published on the federation bus.
    pub to_federation: u64,
    /// Global invalidations published on the local bus.
    pub to_local: u64,
    /// Events that were the relay's own publishes coming back, not relayed.
    pub echoes: u64,
    /// Publishes that failed (the bus was unavailable, say); the other side may have
    /// missed them, and resyncs when that bus reconnects.
    pub failed: u64,
    /// Resyncs seen on either bus.
    pub resyncs: u64,
}

/// Relays global invalidations between a local bus and a federation bus until dropped
/// or stopped.
pub struct Relay {
    shared: Arc<Shared>,
    tasks: [JoinHandle<()>; 2],
}

#[derive(Default)]
struct Shared {
    /// Publishes the relay made and has not seen come back, per bus and event.
    echoes: [Mutex<HashMap<EchoKey, u32>>; 2],
    to_federation: AtomicU64,
    to_local: AtomicU64,
    echoes_seen: AtomicU64,
    failed: AtomicU64,
    resyncs: AtomicU64,
}

/// What identifies an echo: everything the relay copied.
type EchoKey = (String, Option<String>, Vec<(String, u64)>);

const LOCAL: usize = 0;
const FEDERATION: usize = 1;

impl Relay {
    /// Starts relaying between `local` and `federation` (on the current tokio runtime).
    pub async fn start(local: Arc<dyn Bus>, federation: Arc<dyn Bus>) -> Result<Relay, Error> {
        let from_local = local.subscribe_prefix("").await?;
        let from_federation = federation.subscribe_prefix("").await?;
        let shared = Arc::new(Shared::default());
        let tasks = [
            tokio::spawn(relay(shared.clone(), from_local, LOCAL, federation.clone())),
            tokio::spawn(relay(
                shared.clone(),
                from_federation,
                FEDERATION,
                local.clone(),
            )),
        ];
        Ok(Relay { shared, tasks })
    }

    /// What the relay carried so far.
    pub fn stats(&self) -> RelayStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RelayStats {
            to_federation: load(&self.shared.to_federation),
            to_local: load(&self.shared.to_local),
            echoes: load(&self.shared.echoes_seen),
            failed: load(&self.shared.failed),
            resyncs: load(&self.shared.resyncs),
        }
    }

    /// Stops relaying.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Shared {
    fn echoes(&self, side: usize) -> MutexGuard<'_, HashMap<EchoKey, u32>> {
        // Updated with no code in between that can panic.
        self.echoes[side].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True, and forgotten, when `event` is one of the relay's own publishes on `side`.
    fn is_echo(&self, side: usize, event: &Event) -> bool {
        let mut echoes = self.echoes(side);
        let key = echo_key(event);
        match echoes.get_mut(&key) {
            Some(count) => {
                *count -= 1;
                if *count == 0 {
                    echoes.remove(&key);
                }
                true
            }
            None => false,
        }
    }
}

fn echo_key(event: &Event) -> EchoKey {
    let clock = event
        .vector_clock
        .0
        .iter()
        .map(|(writer, counter)| (writer.clone(), *counter))
        .collect();
    (event.key.clone(), event.region.clone(), clock)
}

/// Carries global invalidations arriving on `side` to `other`.
async fn relay(shared: Arc<Shared>, mut events: Subscription, side: usize, other: Arc<dyn Bus>) {
    let other_side = 1 - side;
    while let Some(event) = events.recv().await {
        match event.kind {
            EventKind::Invalidate => {}
            EventKind::Resync(_) => {
                // What the other side missed cannot be named here; its own resync
                // (the bus that dropped) tells its subscribers.
                shared.resyncs.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => continue,
        }
        if event.scope != Scope::Global || shared.is_echo(side, &event) {
            if event.scope == Scope::Global {
                shared.echoes_seen.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        let mut options = PublishOptions::default()
            .scope(Scope::Global)
            .vector_clock(event.vector_clock.clone());
        if let Some(region) = &event.region {
            options = options.region(region.clone());
        }
        // Counted before publishing: the echo can arrive before `publish` returns.
        *shared
            .echoes(other_side)
            .entry(echo_key(&event))
            .or_default() += 1;
        match other.publish(&event.key, options).await {
            Ok(()) => {
                let counter = if side == LOCAL {
                    &shared.to_federation
                } else {
                    &shared.to_local
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                debug!(key = %event.key, %error, "relay publish failed");
                shared.failed.fetch_add(1, Ordering::Relaxed);
                shared.is_echo(other_side, &event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::memory::InMemoryBus;

    async fn next(sub: &mut Subscription) -> Event {
        tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("an event within 10 s")
            .expect("subscription open")
    }

    #[tokio::test]
    async fn global_invalidations_cross_both_ways_once_with_their_region() {
        let federation: Arc<dyn Bus> = Arc::new(InMemoryBus::new());
        let east: Arc<dyn Bus> = Arc::new(InMemoryBus::new());
        let west: Arc<dyn Bus> = Arc::new(InMemoryBus::new());
        let east_relay = Relay::start(east.clone(), federation.clone())
            .await
            .unwrap();
        let west_relay = Relay::start(west.clone(), federation.clone())
            .await
            .unwrap();
        let mut in_east = east.subscribe_prefix("").await.unwrap();
        let mut in_west = west.subscribe_prefix("").await.unwrap();
        let mut on_federation = federation.subscribe_prefix("").await.unwrap();

        let global = PublishOptions::default()
            .scope(Scope::Global)
            .region("eu-east");
        east.publish("local-only", PublishOptions::default())
            .await
            .unwrap();
        east.publish("user:1", global).await.unwrap();
        let crossed = next(&mut in_west).await;
        assert_eq!(crossed.key, "user:1");
        assert_eq!(crossed.region.as_deref(), Some("eu-east"));
        assert_eq!(crossed.scope, Scope::Global);
        assert_eq!(next(&mut on_federation).await.key, "user:1");

        // And back the other way, from the west.
        let global = PublishOptions::default().scope(Scope::Global);
        west.publish("user:2", global).await.unwrap();
        assert_eq!(next(&mut in_east).await.key, "local-only");
        assert_eq!(next(&mut in_east).await.key, "user:1");
        assert_eq!(next(&mut in_east).await.key, "user:2");
        assert_eq!(next(&mut on_federation).await.key, "user:2");

        // The west's own subscribers see its publish once.
        assert_eq!(next(&mut in_west).await.key, "user:2");
        // Nothing was echoed: each bus saw each invalidation once.
        tokio::task::yield_now().await;
        for sub in [&mut in_east, &mut in_west, &mut on_federation] {
            assert!(sub.try_recv().is_err());
        }
        let (east, west) = (east_relay.stats(), west_relay.stats());
        assert_eq!((east.to_federation, east.to_local), (1, 1));
        assert_eq!((west.to_federation, west.to_local), (1, 1));
    }

    #[tokio::test]
    async fn an_application_publish_of_a_key_just_relayed_still_crosses() {
        let federation: Arc<dyn Bus> = Arc::new(InMemoryBus::new());
        let east: Arc<dyn Bus> = Arc::new(InMemoryBus::new());
        let west: Arc<dyn Bus> = Arc::new(InMemoryBus::new());
        let _east_relay = Relay::start(east.clone(), federation.clone())
            .await
            .unwrap();
        let _west_relay = Relay::start(west.clone(), federation.clone())
            .await
            .unwrap();
        let mut in_east = east.subscribe_prefix("").await.unwrap();
        let global = || PublishOptions::default().scope(Scope::Global);
        west.publish("user:1", global()).await.unwrap();
        assert_eq!(next(&mut in_east).await.key, "user:1");
        // The east application changes the same key right away: it must reach the west.
        let mut in_west = west.subscribe_prefix("").await.unwrap();
        east.publish("user:1", global()).await.unwrap();
        assert_eq!(next(&mut in_west).await.key, "user:1");
    }
}
