//! Counters every bus reports.

use std::sync::atomic::{AtomicU64, Ordering};

pub use syncbus_mesh::Drops;

/// A snapshot of a bus's counters. Monotonic from the bus's start. Fields a backend
/// has no use for stay zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Invalidations and lease revocations accepted for sending (coalesced ones excluded).
    pub published: u64,
    /// Publishes merged into an identical one still waiting to be sent.
    pub coalesced: u64,
    /// Events handed to subscriptions (one per subscription reached; resyncs excluded).
    pub delivered: u64,
    /// Acknowledgements counted towards awaited publishes.
    pub acknowledged: u64,
    /// Entries (invalidations) sent again: to members silent on an awaited publish, or
    /// to answer repair requests.
    pub retransmitted: u64,
    /// Resync events raised to subscriptions.
    pub resyncs: u64,
    /// Events dropped because a subscription's buffer was full (each covered by a
    /// resync).
    pub overflowed: u64,
    /// Invalidations known to be lost in the network (each covered by a resync).
    pub missed: u64,
    /// Entries received more than once and dropped.
    pub duplicates: u64,
    /// Datagrams or messages sent.
    pub datagrams_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Datagrams or messages received.
    pub datagrams_received: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Datagrams sent to members of this node's zone.
    pub datagrams_sent_in_zone: u64,
    /// Bytes in those datagrams.
    pub bytes_sent_in_zone: u64,
    /// Datagrams sent to members of other zones.
    pub datagrams_sent_across_zones: u64,
    /// Bytes in those datagrams.
    pub bytes_sent_across_zones: u64,
    /// Repair requests sent for missing entries.
    pub repairs_requested: u64,
    /// Member updates learned from periodic member-table exchanges: what membership
    /// gossip had not brought (mesh only).
    pub member_updates_synced: u64,
    /// Member updates in membership gossip that the node held already, dropped before
    /// the membership protocol searched its table for them (mesh only).
    pub member_updates_already_held: u64,
    /// Notices that this node was declared down, ignored because they came from nodes
    /// it holds down itself while it holds more nodes live than down: the larger side
    /// of a healing partition keeps its identities (mesh only).
    pub down_notices_ignored: u64,
    /// Sends the operating system (or the broker client) refused.
    pub send_errors: u64,
    /// Times a broker connection came back after a drop (broker buses only).
    pub reconnects: u64,
    /// Incoming datagrams dropped on purpose by fault injection (`inbound_loss`).
    pub injected_drops: u64,
    /// Awaited publishes still waiting for their goal (a gauge, not a counter).
    pub awaits_in_flight: u64,
    /// Incoming datagrams dropped, by reason.
    pub dropped: Drops,
}

/// Counters updated where subscriptions are served; shared by every bus.
#[derive(Debug, Default)]
pub(crate) struct DeliveryCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) overflowed: AtomicU64,
    pub(crate) resyncs: AtomicU64,
}

impl DeliveryCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copies the counters into `metrics`.
    pub(crate) fn fill(&self, metrics: &mut Metrics) {
        metrics.delivered = self.delivered.load(Ordering::Relaxed);
        metrics.overflowed = self.overflowed.load(Ordering::Relaxed);
        metrics.resyncs = self.resyncs.load(Ordering::Relaxed);
    }
}
