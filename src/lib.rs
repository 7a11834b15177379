//! syncbus carries cache-invalidation events between the nodes of a cluster.
//!
//! Every backend implements one object-safe trait, [`Bus`]: publish an invalidation,
//! optionally wait until N remote replicas (or replicas in M zones) applied it, and
//! subscribe to keys, key prefixes or leases. A node's own subscribers receive its own
//! publishes too. Backends:
//!
//! - [`MeshBus`]: brokerless, over UDP, with SWIM membership. The protocol itself lives
//!   in the `syncbus-mesh` crate as a sans-IO state machine that a game loop or a
//!   simulator can drive without tokio.
//! - [`InMemoryBus`]: one process, for tests and in-process caches.
//! - `BrokerBus` (features `nats`, `redis`, `kafka`): over NATS core, Redis pub/sub or
//!   Kafka, for teams that already run a broker.
//!
//! No silent loss: a subscriber that may have missed events receives an event of kind
//! [`EventKind::Resync`] and should drop what that subscription covers.
//!
//! ```no_run
//! use syncbus::{Bus, MeshBus, MeshConfig, PublishOptions};
//!
//! # async fn run() -> Result<(), syncbus::Error> {
//! let mut config = MeshConfig::new("127.0.0.1:7946".parse().unwrap());
//! config.seeds = vec!["127.0.0.1:7947".parse().unwrap()];
//! let bus = MeshBus::bind(config).await?;
//!
//! let mut users = bus.subscribe_prefix("user:").await?;
//! bus.publish("user:42", PublishOptions::default()).await?;
//! while let Some(event) = users.recv().await {
//!     println!("drop {} from the cache ({:?})", event.key, event.kind);
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod backplane;
mod breaker;
#[cfg(feature = "broker")]
mod broker;
mod bus;
mod error;
mod event;
mod memory;
mod mesh;
mod metrics;
mod relay;
mod subscription;

pub use backplane::{BackgroundConfig, BackgroundPublisher, PublishFailure};
pub use breaker::{BreakerConfig, CircuitBreaker};
#[cfg(feature = "broker")]
pub use broker::{BrokerBus, BrokerConfig};
pub use bus::{Acknowledged, Bus, DEFAULT_AWAIT_TIMEOUT, PublishOptions};
pub use error::Error;
pub use event::{Event, EventKind, Peer, ResyncReason};
pub use memory::{InMemoryBus, InMemoryConfig};
#[cfg(feature = "quic")]
pub use mesh::QuicConfig;
pub use mesh::{MeshBus, MeshConfig, MulticastDiscovery};
pub use metrics::{Drops, Metrics};
pub use relay::{Relay, RelayStats};
pub use subscription::{Subscription, Topic, TryRecvError};
pub use syncbus_mesh::{
    ClusterKey, ConfigError, Encryption, Invalidation, InvalidationKind, KeyError, Limits, Member,
    MembershipConfig, NodeId, Scope, SealMode, VectorClock, Zone,
};

/// Compiles the README's example, so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
