//! The one error type of the bus API.

use syncbus_mesh::{ConfigError, PublishError};
use thiserror::Error;

use crate::bus::Acknowledged;

/// What went wrong with a bus operation, and what the caller can do about it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// This bus cannot count acknowledgements honestly, so it does not pretend to.
    /// Nothing was published. Use `publish`, or a bus that supports quorums.
    #[error("this bus cannot count acknowledgements")]
    QuorumUnsupported,
    /// Fewer replicas or zones acknowledged than required. `published` says which
    /// case: false when the goal was out of reach from the start and nothing was
    /// published; true when the invalidation went out and only `acked` replicas
    /// acknowledged before the deadline (or before the members that could were gone).
    #[error(
        "quorum not satisfied: {acked} replicas in {zones} zones acknowledged, \
         {required} required, {available} reachable"
    )]
    QuorumNotSatisfied {
        /// Distinct replicas that acknowledged.
        acked: usize,
        /// Distinct zones among them.
        zones: usize,
        /// The goal: replicas, or zones for topology goals.
        required: usize,
        /// Replicas (or zones) that could still acknowledge when it failed.
        available: usize,
        /// Which nodes and zones acknowledged, where the bus knows.
        acknowledged: Acknowledged,
        /// Whether the invalidation was published at all.
        published: bool,
    },
    /// The outgoing queue (for `try_publish`) or the table of awaited publishes is
    /// full. Nothing was published; retry later or use the waiting `publish`.
    #[error("queue full")]
    QueueFull,
    /// The deadline passed first. A publish that timed out before it was queued had no
    /// effect.
    #[error("deadline passed")]
    Timeout,
    /// The bus was shut down; build a new one.
    #[error("bus is closed")]
    Closed,
    /// The key (or the invalidation with its metadata) is too large to send. Nothing was
    /// published.
    #[error("key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLarge {
        /// Size of what was refused.
        len: usize,
        /// The largest size accepted.
        max: usize,
    },
    /// A configuration value cannot work; the message names the field. Nothing was
    /// started.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The subscription passed in was made by another bus; nothing changed.
    #[error("subscription belongs to another bus")]
    ForeignSubscription,
    /// The broker cannot be reached (or refused the operation); nothing was published.
    /// The bus keeps reconnecting; `is_healthy()` says when it is back.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A circuit breaker refused the call without trying: the backend failed too many
    /// times in a row. Nothing was published; retry once `is_healthy()` is true again.
    #[error("circuit open: the bus failed repeatedly and is not tried for now")]
    CircuitOpen,
    /// A cluster-key operation the node refused: no encryption, an unknown key, the
    /// key that seals, a full keyring.
    #[error("keyring: {0}")]
    Keyring(#[from] syncbus_mesh::KeyError),
    /// The operating system refused a socket operation.
    #[error("transport error: {0}")]
    Transport(#[from] std::io::Error),
}

impl From<PublishError> for Error {
    fn from(error: PublishError) -> Self {
        match error {
            PublishError::KeyTooLarge { len, max } => Error::KeyTooLarge { len, max },
            PublishError::Closed => Error::Closed,
            PublishError::Unreachable {
                required,
                available,
            } => Error::QuorumNotSatisfied {
                acked: 0,
                zones: 0,
                required,
                available,
                acknowledged: Acknowledged::default(),
                published: false,
            },
            PublishError::TooManyAwaits => Error::QueueFull,
        }
    }
}

impl Error {
    /// A configuration error about `field`.
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidConfig(ConfigError::new(field, reason))
    }
}
