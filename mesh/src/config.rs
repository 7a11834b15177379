//! Node configuration, with presets for the networks the mesh runs on.

use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::time::Duration;

use crate::error::ConfigError;
use crate::identity::{NodeId, Zone};
use crate::seal::{Encryption, MAX_KEYS, SEAL_OVERHEAD};
use crate::wire;

/// The smallest `max_datagram_size` accepted: the IPv6 minimum MTU less IP and UDP
/// headers leaves room for this on any path.
pub const MIN_DATAGRAM_SIZE: usize = 512;
/// The largest `max_datagram_size` accepted: one UDP payload.
pub const MAX_DATAGRAM_SIZE: usize = 65_507;

/// Everything a [`Node`](crate::Node) needs to start.
///
/// Build one with [`NodeConfig::new`] and adjust fields; [`Node::new`](crate::Node::new)
/// validates it.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Name shared by every node of the cluster. Datagrams carry a hash of it, and a
    /// node drops (and counts) datagrams from other clusters.
    pub cluster: String,
    /// This node's id; pick it at random, anew for every start of the process:
    /// sequence numbers start again with it, and receivers that still remember the old
    /// id would take the new entries for ones they have already seen.
    pub node_id: NodeId,
    /// Distinguishes this start from earlier ones at the same address; the driver uses
    /// the wall-clock start time in milliseconds. A higher generation replaces a lower one.
    pub generation: u64,
    /// This node's failure domain.
    pub zone: Zone,
    /// The address peers reach this node at. Must be a concrete address, not 0.0.0.0.
    pub advertise: SocketAddr,
    /// Nodes to announce to while this node knows no other member.
    pub seeds: Vec<SocketAddr>,
    /// Largest datagram sent or accepted, headers included. Default 1,400 bytes, which
    /// fits an Ethernet MTU with room for IP, UDP and tunnel headers.
    pub max_datagram_size: usize,
    /// Longest key accepted by `publish`, in bytes. Default 512. Every invalidation must
    /// also fit in one datagram with its region and vector clock.
    pub max_key_len: usize,
    /// Failure-detection and gossip timing.
    pub membership: MembershipConfig,
    /// How long a hole in an origin's sequence may stay open before it is given up and
    /// reported as a resync. Default 2 s: datagrams reordered on a LAN arrive far sooner.
    pub gap_timeout: Duration,
    /// How many sequence numbers past a hole a receiver keeps track of before giving
    /// the hole up at once. Default 4,096.
    pub reorder_window: u64,
    /// Origins whose sequence state is kept; past this the origin heard from longest
    /// ago is forgotten. Default 4,096.
    pub max_origins: usize,
    /// Members of each other zone an origin sends a batch to; they forward it within
    /// their zone. Default 2: one relay may die mid-flight and the zone still hears of
    /// the batch. Zones this small or smaller get the batch directly.
    pub relays_per_zone: usize,
    /// Entries an origin keeps to answer repair requests. Default 4,096 (a few hundred
    /// kilobytes with short keys); a receiver that falls further behind gets a resync.
    pub retention: usize,
    /// How long a receiver waits, after noticing a hole, before asking for the missing
    /// entries: reordered datagrams usually fill it first. Default 10 ms.
    pub repair_delay: Duration,
    /// How often a receiver asks again while a hole stays open. Default 100 ms.
    pub repair_interval: Duration,
    /// How often an origin that published recently tells members its newest sequence
    /// number, so loss of its last entries is noticed. Default 200 ms; an idle origin
    /// stops after five digests.
    pub digest_interval: Duration,
    /// How long an origin waits for an acknowledgement before sending the entry again
    /// to the silent members; doubles on every retry up to 1 s. Default 50 ms.
    pub retransmit_after: Duration,
    /// Awaited publishes tracked at once; more are refused. Default 16,384.
    pub max_awaits: usize,
    /// Identities the member table holds at most (alive, suspect and down ones alike).
    /// Membership news about more is refused and counted (`member_limit`), and a node
    /// that is not in the table when it is full cannot join through this node. Set it
    /// well above the cluster's size. Default 16,384.
    pub max_members: usize,
    /// LZ4-compress batches when that saves bytes, packing more entries per datagram.
    /// Default on. Receivers decode either way.
    pub compress: bool,
    /// When an origin learns of a new member, the member is owed the entries published
    /// this long before, too: it may have known the origin, and cached values, a little
    /// earlier than the origin knew it. Default 2 s, well above how long membership
    /// takes to spread on a LAN; the member repairs those entries from retention.
    pub join_grace: Duration,
    /// Seed of the node's random number generator (probe order, gossip targets), and,
    /// with the node id and generation, of its nonce prefix when sealing: draw it from
    /// the OS.
    pub rng_seed: u64,
    /// Authenticated encryption of every datagram under a cluster key. Default none.
    /// Keys can be rotated while the node runs, but a node started without encryption
    /// cannot gain it running: sealing takes [`SEAL_OVERHEAD`] bytes of every datagram.
    pub encryption: Option<Encryption>,
}

impl NodeConfig {
    /// A configuration with defaults for a node at `advertise` in `zone`.
    pub fn new(node_id: NodeId, advertise: SocketAddr, zone: Zone) -> NodeConfig {
        NodeConfig {
            cluster: "syncbus".to_owned(),
            node_id,
            generation: 0,
            zone,
            advertise,
            seeds: Vec::new(),
            max_datagram_size: 1400,
            max_key_len: 512,
            membership: MembershipConfig::lan(),
            gap_timeout: Duration::from_secs(2),
            reorder_window: 4096,
            max_origins: 4096,
            relays_per_zone: 2,
            retention: 4096,
            repair_delay: Duration::from_millis(10),
            repair_interval: Duration::from_millis(100),
            digest_interval: Duration::from_millis(200),
            retransmit_after: Duration::from_millis(50),
            max_awaits: 16_384,
            max_members: 16_384,
            compress: true,
            join_grace: Duration::from_secs(2),
            rng_seed: node_id.0,
            encryption: None,
        }
    }

    /// The bytes of each datagram left for the plaintext datagram: `max_datagram_size`,
    /// less what sealing adds when the node seals.
    pub fn datagram_budget(&self) -> usize {
        match self.encryption {
            Some(_) => self.max_datagram_size.saturating_sub(SEAL_OVERHEAD),
            None => self.max_datagram_size,
        }
    }

    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster.is_empty() {
            return Err(ConfigError::new("cluster", "must not be empty"));
        }
        if self.advertise.ip().is_unspecified() || self.advertise.port() == 0 {
            return Err(ConfigError::new(
                "advertise",
                format!("{} is not an address peers can reach", self.advertise),
            ));
        }
        if !(MIN_DATAGRAM_SIZE..=MAX_DATAGRAM_SIZE).contains(&self.max_datagram_size) {
            return Err(ConfigError::new(
                "max_datagram_size",
                format!(
                    "{} is outside {MIN_DATAGRAM_SIZE}..={MAX_DATAGRAM_SIZE}",
                    self.max_datagram_size
                ),
            ));
        }
        if let Some(encryption) = &self.encryption
            && (encryption.keys.is_empty() || encryption.keys.len() > MAX_KEYS)
        {
            return Err(ConfigError::new(
                "encryption.keys",
                format!("{} keys; give 1 to {MAX_KEYS}", encryption.keys.len()),
            ));
        }
        let fits = wire::max_entry_len(self.datagram_budget()) - wire::ENTRY_OVERHEAD;
        if self.max_key_len == 0 || self.max_key_len > fits {
            return Err(ConfigError::new(
                "max_key_len",
                format!(
                    "{} must be between 1 and {fits} for this datagram size",
                    self.max_key_len
                ),
            ));
        }
        if self.gap_timeout.is_zero() {
            return Err(ConfigError::new("gap_timeout", "must be positive"));
        }
        let counts = [
            ("reorder_window", self.reorder_window as usize),
            ("max_origins", self.max_origins),
            ("relays_per_zone", self.relays_per_zone),
            ("retention", self.retention),
            ("max_awaits", self.max_awaits),
            ("max_members", self.max_members),
        ];
        if let Some((field, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return Err(ConfigError::new(field, "must be positive"));
        }
        let durations = [
            ("repair_delay", self.repair_delay),
            ("repair_interval", self.repair_interval),
            ("digest_interval", self.digest_interval),
            ("retransmit_after", self.retransmit_after),
        ];
        if let Some((field, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::new(field, "must be positive"));
        }
        self.membership.validate()
    }
}

/// Timing of SWIM failure detection and gossip.
///
/// Detection time is roughly `probe_period + probe_rtt + suspect_to_down_after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// How often each node probes one random member.
    pub probe_period: Duration,
    /// How long to wait for a direct probe's answer before asking others to probe.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly, and the gossip fan-out.
    pub num_indirect_probes: usize,
    /// How long a suspected member has to refute before it is declared down.
    pub suspect_to_down_after: Duration,
    /// How long a member declared down is remembered (and kept from rejoining with the
    /// same identity).
    pub remove_down_after: Duration,
    /// How often membership updates are gossiped beyond the probe traffic, while any
    /// are queued.
    pub gossip_interval: Duration,
    /// How often a node that knows no member announces itself to its seeds again.
    pub rejoin_interval: Duration,
    /// How often each node compares its member table with one random member's (push
    /// and pull). Gossip carries each update a bounded number of times, so in large or
    /// lossy clusters a few nodes miss one; this exchange repairs that within a few
    /// intervals. Costs two progress lists (about 12 bytes per origin, plus two member
    /// entries) per node per interval, and two tables (about 40 bytes per member) when
    /// the tables differ.
    pub sync_interval: Duration,
    /// Cluster size the retransmission count of membership updates is tuned for. The
    /// presets assume 32 (8 for `local`); raise it to the real size for larger clusters
    /// (a simulated 1,000-node boot with 32 left two thirds of the nodes with
    /// incomplete member tables after two minutes; with 1,000 they converged), but do
    /// not lower it: fewer retransmissions cost lossy small clusters false deaths.
    /// A node also makes room at start for this many origins' streams (256 bytes per
    /// origin, up to `max_origins`), rather than growing its table as they come.
    pub expected_cluster_size: u32,
}

impl MembershipConfig {
    /// A data-centre LAN: 1 s probes, about 5 s to declare a silent node down.
    pub fn lan() -> MembershipConfig {
        MembershipConfig {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(500),
            num_indirect_probes: 3,
            suspect_to_down_after: Duration::from_secs(3),
            remove_down_after: Duration::from_secs(60),
            gossip_interval: Duration::from_millis(200),
            rejoin_interval: Duration::from_secs(1),
            sync_interval: Duration::from_secs(10),
            expected_cluster_size: 32,
        }
    }

    /// Links across regions: slower probes, more patience before declaring death.
    pub fn wan() -> MembershipConfig {
        MembershipConfig {
            probe_period: Duration::from_secs(3),
            probe_rtt: Duration::from_secs(1),
            num_indirect_probes: 3,
            suspect_to_down_after: Duration::from_secs(12),
            remove_down_after: Duration::from_secs(180),
            gossip_interval: Duration::from_millis(500),
            rejoin_interval: Duration::from_secs(3),
            sync_interval: Duration::from_secs(30),
            expected_cluster_size: 32,
        }
    }

    /// Nodes on one machine (loopback, tests, the demo): detection within about a
    /// second. Too eager for real networks.
    pub fn local() -> MembershipConfig {
        MembershipConfig {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(100),
            num_indirect_probes: 3,
            suspect_to_down_after: Duration::from_millis(600),
            remove_down_after: Duration::from_secs(15),
            gossip_interval: Duration::from_millis(100),
            rejoin_interval: Duration::from_millis(200),
            sync_interval: Duration::from_secs(2),
            expected_cluster_size: 8,
        }
    }

    /// Checks the settings: every duration positive, `probe_rtt` shorter than
    /// `probe_period`, counts positive.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let durations = [
            ("membership.probe_period", self.probe_period),
            ("membership.probe_rtt", self.probe_rtt),
            (
                "membership.suspect_to_down_after",
                self.suspect_to_down_after,
            ),
            ("membership.remove_down_after", self.remove_down_after),
            ("membership.gossip_interval", self.gossip_interval),
            ("membership.rejoin_interval", self.rejoin_interval),
            ("membership.sync_interval", self.sync_interval),
        ];
        if let Some((field, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::new(field, "must be positive"));
        }
        if self.probe_rtt >= self.probe_period {
            return Err(ConfigError::new(
                "membership.probe_rtt",
                "must be shorter than probe_period",
            ));
        }
        if self.num_indirect_probes == 0 || self.expected_cluster_size == 0 {
            return Err(ConfigError::new(
                "membership.num_indirect_probes",
                "num_indirect_probes and expected_cluster_size must be positive",
            ));
        }
        Ok(())
    }

    /// The foca configuration for packets of at most `max_packet` bytes.
    pub(crate) fn to_foca(&self, max_packet: usize) -> foca::Config {
        let size = NonZeroU32::new(self.expected_cluster_size).unwrap_or(NonZeroU32::MIN);
        let mut config = foca::Config::new_lan(size);
        let fanout = NonZeroUsize::new(self.num_indirect_probes).unwrap_or(NonZeroUsize::MIN);
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.num_indirect_probes = fanout;
        config.suspect_to_down_after = self.suspect_to_down_after;
        config.remove_down_after = Some(self.remove_down_after);
        config.max_packet_size = NonZeroUsize::new(max_packet).unwrap_or(NonZeroUsize::MIN);
        // The node gossips on its own timer, only while foca holds updates (see
        // `Node::gossip`); foca sends to `num_indirect_probes` members each time.
        config.periodic_gossip = None;
        // Announcing to members declared down, well within `remove_down_after`, is what
        // lets the halves of a healed partition find each other again (seeds that are
        // not members are announced to as well; see the node's rejoin timer).
        config.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.rejoin_interval * 30,
            num_members: NonZeroUsize::MIN,
        });
        config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.rejoin_interval * 5,
            num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
        });
        config.max_transmissions = config.max_transmissions.max(NonZeroU8::MIN);
        config
    }
}
