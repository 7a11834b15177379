//! The syncbus mesh protocol, without I/O.
//!
//! A [`Node`] is a state machine: SWIM membership (through `foca`) plus a data plane that
//! carries batches of invalidations with per-origin sequence numbers. It reads no clock,
//! opens no socket and draws no entropy: a driver feeds it datagrams and the time and
//! sends what it asks. The tokio driver in the `syncbus` crate and the deterministic
//! simulator run this same code; a game loop can drive it directly.
//!
//! See [`Node`] for the order in which a driver calls in and drains out.
//!
//! # Known gaps
//!
//! - Datagrams are not authenticated: any host that can reach the port and knows the
//!   cluster name can inject invalidations or membership messages.
//! - An origin that crashes before any entry or digest of its latest publishes reached
//!   a member leaves that member unaware of them; peers that did receive them do not
//!   pass them on.
//! - `docs/ARCHITECTURE.md` in the repository lists the rest.

#![forbid(unsafe_code)]

mod config;
mod error;
mod event;
mod id_map;
mod identity;
mod invalidation;
mod membership;
mod node;
mod origins;
mod seal;
mod swim_codec;
#[cfg(test)]
mod tests;
mod time;
mod timers;
pub mod wire;

pub use config::{MAX_DATAGRAM_SIZE, MIN_DATAGRAM_SIZE, MembershipConfig, NodeConfig};
pub use error::{ConfigError, DecodeError, PublishError};
pub use event::{
    Acks, AwaitFailure, AwaitId, Delivery, Drops, Event, Goal, Published, Stats, Transmit,
};
pub use identity::{MAX_ZONE_LEN, Member, NodeId, Zone};
pub use invalidation::{Invalidation, InvalidationKind, Scope, VectorClock};
pub use node::{Limits, Node};
pub use seal::{
    ClusterKey, Encryption, KeyError, MAX_KEYS, SEAL_OVERHEAD, SealMode, seal_datagram,
};
pub use time::Instant;
