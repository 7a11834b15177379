//! What the core hands back to its driver.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::identity::{Member, NodeId, Zone};
use crate::invalidation::Invalidation;

/// A datagram for the driver to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// The whole datagram, header included. Shared between the copies of a batch sent
    /// to several members.
    pub payload: Bytes,
}

/// Something the driver must act on, drained with [`Node::poll_event`](crate::Node::poll_event).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An invalidation to hand to local subscribers: published here or received from a
    /// peer, exactly once per node either way.
    Delivered(Delivery),
    /// Invalidations from `origin` were lost and cannot be recovered. Every local
    /// subscriber may have missed something and should drop what it caches.
    Resync {
        /// The node whose invalidations were lost.
        origin: NodeId,
        /// How many were lost, as far as sequence numbers tell; 0 when unknown (the
        /// origin died while its latest entries may still have been in flight).
        missed: u64,
    },
    /// A member joined, or came back.
    MemberUp(Member),
    /// A member left or was declared down.
    MemberDown(Member),
    /// An awaited publish reached its goal, or cannot any more.
    AwaitDone {
        /// The id [`Node::publish_awaited`](crate::Node::publish_awaited) returned.
        id: AwaitId,
        /// Who acknowledged, or why the goal failed and who had acknowledged by then.
        outcome: Result<Acks, AwaitFailure>,
    },
}

/// Identifies one awaited publish of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AwaitId(pub u64);

/// What an awaited publish waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Acknowledgements from this many distinct remote nodes.
    Replicas(usize),
    /// Acknowledgements from remote nodes in this many distinct zones.
    Zones(usize),
}

impl Goal {
    /// How many replicas or zones the goal asks for.
    pub fn required(self) -> usize {
        match self {
            Goal::Replicas(n) | Goal::Zones(n) => n,
        }
    }
}

/// The remote nodes that acknowledged an entry, and their zones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acks {
    /// Distinct acknowledging nodes, ordered by id.
    pub nodes: Vec<NodeId>,
    /// Distinct zones among them, ordered by name.
    pub zones: Vec<Zone>,
}

/// Why an awaited publish failed. The invalidation itself was sent either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AwaitFailure {
    /// The deadline passed first.
    Timeout {
        /// Who had acknowledged by then.
        acked: Acks,
    },
    /// Members left or died, and those still live cannot meet the goal.
    Unreachable {
        /// Who had acknowledged by then.
        acked: Acks,
        /// Acknowledged plus live members (or their distinct zones) when it failed.
        available: usize,
    },
    /// This node left the cluster first.
    Closed {
        /// Who had acknowledged by then.
        acked: Acks,
    },
}

impl AwaitFailure {
    /// Who had acknowledged when the publish failed.
    pub fn acked(&self) -> &Acks {
        match self {
            AwaitFailure::Timeout { acked }
            | AwaitFailure::Unreachable { acked, .. }
            | AwaitFailure::Closed { acked } => acked,
        }
    }
}

/// An invalidation ready for local subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The node that published it.
    pub origin: NodeId,
    /// The origin's zone, when the origin is a live member.
    pub zone: Option<Zone>,
    /// The invalidation itself.
    pub invalidation: Invalidation,
}

/// What became of a publish the core accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Queued as a new entry of the outgoing batch.
    Queued,
    /// The same key was already waiting in the outgoing batch; the two became one entry
    /// carrying the newer metadata.
    Coalesced,
}

/// Counters kept by the core. Monotonic; never reset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Invalidations accepted by `publish` as new entries.
    pub published: u64,
    /// Publishes merged into an entry already waiting to be sent.
    pub coalesced: u64,
    /// Invalidations from peers delivered to this node (duplicates excluded).
    pub received: u64,
    /// Entries received again and dropped.
    pub duplicates: u64,
    /// Resync events raised for lost invalidations.
    pub resyncs: u64,
    /// Invalidations known to be lost (covered by those resyncs).
    pub missed: u64,
    /// Datagrams handed to the driver to send.
    pub datagrams_sent: u64,
    /// Bytes in those datagrams.
    pub bytes_sent: u64,
    /// Datagrams handed to the core by the driver.
    pub datagrams_received: u64,
    /// Bytes in those datagrams.
    pub bytes_received: u64,
    /// Origins forgotten because more than `max_origins` were tracked.
    pub origins_evicted: u64,
    /// Acknowledgements counted towards awaited publishes (duplicates excluded).
    pub acks_received: u64,
    /// Acknowledgements this node sent for entries it applied.
    pub acks_sent: u64,
    /// Acknowledgements not sent because the origin is no longer a live member.
    pub acks_unroutable: u64,
    /// Entries sent again: to members silent on an awaited publish, or to answer
    /// repair requests.
    pub retransmitted: u64,
    /// Repair requests this node sent for missing entries.
    pub repairs_requested: u64,
    /// Datagrams (and bytes) sent to members of this node's zone.
    pub datagrams_sent_in_zone: u64,
    /// Bytes in those datagrams.
    pub bytes_sent_in_zone: u64,
    /// Datagrams sent to members of other zones, or to addresses of unknown zone.
    pub datagrams_sent_across_zones: u64,
    /// Bytes in those datagrams.
    pub bytes_sent_across_zones: u64,
    /// Member updates learned from member-table exchanges: what gossip had not
    /// brought this node.
    pub member_updates_synced: u64,
    /// Member updates in membership gossip that foca held already (gossip repeats each
    /// update about a dozen times), dropped before foca searched its table for them.
    pub member_updates_already_held: u64,
    /// Notices that this node is down, from members it holds down itself, ignored
    /// because it holds more members live than down: the larger side of a healing
    /// partition keeps its identities. Ignored only for a grace from a sender's first
    /// notice (ten `rejoin_interval`s); later ones are acted on.
    pub down_notices_ignored: u64,
    /// Incoming datagrams dropped, by reason.
    pub dropped: Drops,
}

/// Incoming datagrams dropped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// Shorter than a header, or not a syncbus datagram.
    pub truncated: u64,
    /// Not starting with the syncbus magic bytes.
    pub bad_magic: u64,
    /// From a protocol version this node does not speak.
    pub unsupported_version: u64,
    /// Of a message kind or with flags this node does not know.
    pub unsupported_kind: u64,
    /// Carrying another cluster's id.
    pub wrong_cluster: u64,
    /// Larger than `max_datagram_size`.
    pub oversize: u64,
    /// A body that does not decode.
    pub malformed: u64,
    /// Damaged on the way (the checksum does not match).
    pub corrupt: u64,
    /// Membership messages foca rejected (stale, misaddressed or undecodable).
    pub membership: u64,
    /// Data this node sent itself, looped back.
    pub own: u64,
    /// Anything received after this node left the cluster.
    pub after_leave: u64,
    /// Acks, repairs and digests from or about nodes that are not live members, or
    /// for entries this node does not know.
    pub unknown_peer: u64,
    /// Sealed datagrams that no installed key opens (a wrong key, a forgery, damage),
    /// or that reached a node without encryption.
    pub unauthenticated: u64,
    /// Sealed datagrams opened before (a replay), or too old to tell.
    pub replayed: u64,
    /// Plaintext datagrams refused because this node requires sealing.
    pub plaintext: u64,
    /// Membership news about identities refused because the member table was full
    /// (`max_members`): whole datagrams from a new sender, single updates otherwise.
    pub member_limit: u64,
}

impl Drops {
    /// Every dropped datagram, whatever the reason.
    pub fn total(&self) -> u64 {
        self.truncated
            + self.bad_magic
            + self.unsupported_version
            + self.unsupported_kind
            + self.wrong_cluster
            + self.oversize
            + self.malformed
            + self.corrupt
            + self.membership
            + self.own
            + self.after_leave
            + self.unknown_peer
            + self.unauthenticated
            + self.replayed
            + self.plaintext
            + self.member_limit
    }
}
