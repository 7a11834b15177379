//! Errors of the mesh core.

use thiserror::Error;

/// A configuration value that cannot work. Nothing was started.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {field}: {reason}")]
pub struct ConfigError {
    /// The setting at fault, named as in the config struct.
    pub field: &'static str,
    /// What is wrong with it and what would be accepted.
    pub reason: String,
}

impl ConfigError {
    /// An error about `field`, saying what is wrong with it.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }
}

/// Why [`Node::publish`](crate::Node::publish) refused an invalidation. Nothing was
/// queued.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PublishError {
    /// The key is longer than the configured limit, or the whole invalidation (key,
    /// region and vector clock) cannot fit in one datagram. Shorten the key or raise
    /// `max_key_len` / `max_datagram_size` on every node.
    #[error("key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLarge {
        /// Encoded size of the key (or of the whole invalidation when that is what
        /// overflows).
        len: usize,
        /// The largest size accepted.
        max: usize,
    },
    /// The node has left the cluster; create a new one.
    #[error("node has left the cluster")]
    Closed,
    /// The goal asks for more replicas or zones than the live members offer. Nothing
    /// was published.
    #[error("goal needs {required} but only {available} are reachable")]
    Unreachable {
        /// Replicas or zones the goal asks for.
        required: usize,
        /// Live remote members (or their distinct zones).
        available: usize,
    },
    /// `max_awaits` awaited publishes are in flight already. Nothing was published;
    /// retry when some complete.
    #[error("too many awaited publishes in flight")]
    TooManyAwaits,
}

/// Why an incoming datagram was dropped. Each kind is counted in
/// [`Stats`](crate::Stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Shorter than the fixed header, or a body that ends early.
    #[error("datagram truncated")]
    Truncated,
    /// Not a syncbus datagram.
    #[error("bad magic bytes")]
    BadMagic,
    /// A syncbus datagram of a protocol version this node does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// A message kind this node does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Flags this node does not understand (for example compression or sealing it was
    /// not built for).
    #[error("unsupported flags {0:#04x}")]
    UnsupportedFlags(u8),
    /// The body does not decode, or claims more items than its bytes can hold.
    #[error("malformed body")]
    Malformed,
    /// The checksum does not match: the datagram was damaged on the way.
    #[error("checksum mismatch")]
    Corrupt,
}
