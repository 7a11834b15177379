//! Configuration of a [`MeshBus`](super::MeshBus) and its validation.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use syncbus_mesh::{Encryption, MembershipConfig, NodeConfig, NodeId, Zone};

use crate::error::Error;

/// Settings of one mesh node. Start from [`MeshConfig::new`] and change what you need.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Local address to bind the UDP socket to. Port 0 picks a free port.
    pub bind: SocketAddr,
    /// The address peers reach this node at. Defaults to the bound address; required
    /// when binding to 0.0.0.0 or `::`.
    pub advertise: Option<SocketAddr>,
    /// Members to announce to while this node knows no other member. Given seeds, the
    /// node reports itself unhealthy while it is alone.
    pub seeds: Vec<SocketAddr>,
    /// This node's failure domain.
    pub zone: Zone,
    /// Cluster name; nodes of other clusters are ignored. Default `"syncbus"`.
    pub cluster: String,
    /// Failure-detection timing. Default [`MembershipConfig::lan`].
    pub membership: MembershipConfig,
    /// Multicast discovery, in addition to seeds. Off by default.
    pub multicast: Option<MulticastDiscovery>,
    /// Largest datagram, headers included. Default 1,400 bytes.
    pub max_datagram_size: usize,
    /// Longest key accepted. Default 512 bytes.
    pub max_key_len: usize,
    /// How long a hole in an origin's sequence may stay open before subscribers get a
    /// resync. Default 2 s.
    pub gap_timeout: Duration,
    /// Events each subscription queues before it overflows into a resync. Default 1,024.
    pub subscriber_capacity: usize,
    /// Publishes waiting for the node's task; `publish` waits when it is full. Default
    /// 8,192.
    pub publish_queue: usize,
    /// Socket send and receive buffer to ask the kernel for (it may grant less).
    /// Default 4 MiB, so bursts survive a briefly busy task.
    pub socket_buffer: usize,
    /// Fault injection for tests and demonstrations: the fraction of incoming datagrams
    /// (0.0 to 1.0) to drop at random, as if the network lost them. Default 0.
    pub inbound_loss: f64,
    /// Seal every datagram with a cluster key (XChaCha20-Poly1305); see
    /// [`Encryption`] and [`SealMode`](syncbus_mesh::SealMode). Default none. Keys
    /// rotate at run time through [`MeshBus::install_key`](super::MeshBus::install_key)
    /// and its siblings; a node started without encryption cannot gain it running.
    pub encryption: Option<Encryption>,
    /// Carry datagrams over QUIC with mutual TLS instead of plain UDP (the `quic`
    /// feature). Default none. Datagrams are then at most
    /// [`QuicConfig::mtu_floor`](super::QuicConfig::mtu_floor) less 64 bytes, whatever
    /// `max_datagram_size` says, and multicast discovery is not available.
    #[cfg(feature = "quic")]
    pub quic: Option<super::QuicConfig>,
}

/// Finding peers by IPv4 multicast on a local network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MulticastDiscovery {
    /// The group and port beacons go to, for example `239.255.42.99:7947`.
    pub group: SocketAddrV4,
    /// The local interface to join the group on.
    pub interface: Ipv4Addr,
    /// How often a beacon is sent. Default 2 s.
    pub interval: Duration,
}

impl MulticastDiscovery {
    /// Discovery on `group` through `interface`, a beacon every 2 s.
    pub fn new(group: SocketAddrV4, interface: Ipv4Addr) -> MulticastDiscovery {
        MulticastDiscovery {
            group,
            interface,
            interval: Duration::from_secs(2),
        }
    }
}

impl MeshConfig {
    /// Defaults for a node bound to `bind`.
    pub fn new(bind: SocketAddr) -> MeshConfig {
        MeshConfig {
            bind,
            advertise: None,
            seeds: Vec::new(),
            zone: Zone::default(),
            cluster: "syncbus".to_owned(),
            membership: MembershipConfig::lan(),
            multicast: None,
            max_datagram_size: 1400,
            max_key_len: 512,
            gap_timeout: Duration::from_secs(2),
            subscriber_capacity: 1024,
            publish_queue: 8192,
            socket_buffer: 4 << 20,
            inbound_loss: 0.0,
            encryption: None,
            #[cfg(feature = "quic")]
            quic: None,
        }
    }

    /// Checks what can be checked before binding.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.advertise.is_none() && self.bind.ip().is_unspecified() {
            return Err(Error::config(
                "advertise",
                format!(
                    "binding to {} needs an advertise address peers can reach",
                    self.bind
                ),
            ));
        }
        if let Some(advertise) = self.advertise
            && advertise.ip().is_unspecified()
        {
            return Err(Error::config(
                "advertise",
                format!("{advertise} is not an address peers can reach"),
            ));
        }
        // Addresses travel without their IPv6 scope id, so peers would know this node
        // by another address than its own.
        if let SocketAddr::V6(scoped) = self.advertise.unwrap_or(self.bind)
            && scoped.scope_id() != 0
        {
            return Err(Error::config(
                "advertise",
                format!(
                    "{scoped} has a scope id, which does not travel to peers; advertise an \
                     address without one (a global or unique local address)"
                ),
            ));
        }
        if let Some(seed) = self
            .seeds
            .iter()
            .find(|s| s.ip().is_unspecified() || s.port() == 0)
        {
            return Err(Error::config(
                "seeds",
                format!("{seed} is not a reachable address"),
            ));
        }
        if let Some(multicast) = &self.multicast {
            if !multicast.group.ip().is_multicast() || multicast.group.port() == 0 {
                return Err(Error::config(
                    "multicast.group",
                    format!("{} is not a multicast group with a port", multicast.group),
                ));
            }
            if multicast.interval.is_zero() {
                return Err(Error::config("multicast.interval", "must be positive"));
            }
        }
        #[cfg(feature = "quic")]
        if self.quic.is_some() && self.multicast.is_some() {
            return Err(Error::config(
                "multicast",
                "multicast discovery needs plain UDP; with QUIC, give seeds",
            ));
        }
        if self.subscriber_capacity == 0 {
            return Err(Error::config("subscriber_capacity", "must be positive"));
        }
        if self.publish_queue == 0 {
            return Err(Error::config("publish_queue", "must be positive"));
        }
        if !(0.0..=1.0).contains(&self.inbound_loss) {
            return Err(Error::config("inbound_loss", "must be between 0.0 and 1.0"));
        }
        if let Some(seed) = self.seeds.iter().find(|s| !same_family(s, &self.bind)) {
            return Err(Error::config(
                "seeds",
                format!(
                    "{seed} cannot be reached from a socket bound to {}",
                    self.bind
                ),
            ));
        }
        Ok(())
    }

    /// The largest datagram sent or accepted: `max_datagram_size`, or less over QUIC.
    pub(crate) fn datagram_limit(&self) -> usize {
        #[cfg(feature = "quic")]
        if let Some(quic) = &self.quic {
            return self.max_datagram_size.min(quic.max_datagram());
        }
        self.max_datagram_size
    }

    /// The advertised address, once the socket is bound to `bound`.
    pub(crate) fn advertise_for(&self, bound: SocketAddr) -> SocketAddr {
        match self.advertise {
            Some(advertise) if advertise.port() == 0 => {
                SocketAddr::new(advertise.ip(), bound.port())
            }
            Some(advertise) => advertise,
            None => bound,
        }
    }

    /// The core's configuration for a node advertised at `advertise`.
    pub(crate) fn node_config(&self, advertise: SocketAddr) -> NodeConfig {
        let mut config = NodeConfig::new(NodeId(random_u64()), advertise, self.zone.clone());
        config.cluster = self.cluster.clone();
        config.generation = start_generation();
        config.seeds = self.seeds.clone();
        config.membership = self.membership.clone();
        config.max_datagram_size = self.datagram_limit();
        config.max_key_len = self.max_key_len;
        config.gap_timeout = self.gap_timeout;
        config.rng_seed = random_u64();
        config.encryption = self.encryption.clone();
        config
    }
}

/// Whether a socket bound to `bind` can send to `seed`: the same IP family, or an
/// unspecified IPv6 bind (dual-stack).
fn same_family(seed: &SocketAddr, bind: &SocketAddr) -> bool {
    seed.is_ipv4() == bind.is_ipv4() || (bind.is_ipv6() && bind.ip().is_unspecified())
}

/// Entropy from the operating system. Falls back to the clock, which is unique enough
/// for a node id where the OS has no entropy source.
pub(crate) fn random_u64() -> u64 {
    getrandom::u64()
        .unwrap_or_else(|_| start_generation().rotate_left(17) ^ u64::from(std::process::id()))
}

/// Milliseconds since the Unix epoch: a restarted node's generation beats the one it
/// had before.
fn start_generation() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}
