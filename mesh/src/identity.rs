//! Who a node is: its id, address, zone and generation.

use std::cell::RefCell;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// A node's identifier: random, 64 bits, fixed for the life of a process.
///
/// Displayed as 16 hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(NodeId)
    }
}

/// The longest zone name, in bytes. Zones travel in every membership message.
pub const MAX_ZONE_LEN: usize = 64;

/// A failure domain: a rack, an availability zone, a data centre.
///
/// Dissemination and acknowledgement goals count zones, so nodes that fail together
/// should share one. Shared, not copied: every delivery names its origin's zone, and
/// every member-table entry carries one. A thin pointer (to a shared `String`): a
/// member then takes 56 bytes rather than 64, and foca's table, which it searches from
/// one end on every datagram, fits an entry in a cache line.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Zone(Arc<String>);

impl Zone {
    /// A zone name: 1 to [`MAX_ZONE_LEN`] bytes of printable ASCII, without spaces.
    pub fn new(name: impl Into<String>) -> Result<Zone, ConfigError> {
        let name = name.into();
        let printable = name.bytes().all(|b| b.is_ascii_graphic());
        if name.is_empty() || name.len() > MAX_ZONE_LEN || !printable {
            return Err(ConfigError::new(
                "zone",
                format!(
                    "{name:?} must be 1 to {MAX_ZONE_LEN} printable ASCII characters, without spaces"
                ),
            ));
        }
        Ok(Zone(Arc::new(name)))
    }

    /// The zone's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Stands in for the unknown zone of a seed that has only an address so far.
    pub(crate) fn unknown() -> Zone {
        Zone(Arc::new(String::new()))
    }

    /// Any name, unchecked: for tests that forge what a peer may send.
    #[cfg(test)]
    pub(crate) fn unchecked(name: &str) -> Zone {
        Zone(Arc::new(name.to_owned()))
    }
}

impl Default for Zone {
    fn default() -> Self {
        Zone(Arc::new("default".to_owned()))
    }
}

// On the wire a zone is its name, as the plain string it always was.
impl Serialize for Zone {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ZoneVisitor)
    }
}

/// Builds the shared name straight from the decoder's bytes, without an owned `String`
/// on the way (member tables decode a zone per entry).
struct ZoneVisitor;

impl serde::de::Visitor<'_> for ZoneVisitor {
    type Value = Zone;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a zone name")
    }

    /// Refuses what `Zone::new` would (the empty name of a seed not yet met aside):
    /// a member with a longer name does not fit foca's encoding of members, and foca,
    /// having taken the sender into its table before finding that out, stops probing.
    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Zone, E> {
        if name.len() > MAX_ZONE_LEN || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(E::custom(format_args!(
                "a zone name of 0 to {MAX_ZONE_LEN} printable ASCII characters"
            )));
        }
        Ok(Zone::shared(name))
    }
}

/// Zone names a thread keeps to share, at most: a cluster has a handful of zones, and
/// names past these (forged ones, say) simply get their own allocation.
const MAX_SHARED_ZONES: usize = 64;

thread_local! {
    /// The zone names decoded on this thread, each allocated once.
    static SHARED_ZONES: RefCell<Vec<Zone>> = const { RefCell::new(Vec::new()) };
}

impl Zone {
    /// The zone named `name`, sharing the allocation of an equal name decoded before
    /// on this thread. Every member-table entry and delivery names a zone, so sharing
    /// saves an allocation per decoded entry, and equal zones then compare by address
    /// instead of by reading both names.
    fn shared(name: &str) -> Zone {
        SHARED_ZONES.with_borrow_mut(|zones| {
            if let Some(zone) = zones.iter().find(|zone| zone.as_str() == name) {
                return zone.clone();
            }
            let zone = Zone(Arc::new(name.to_owned()));
            if zones.len() < MAX_SHARED_ZONES {
                zones.push(zone.clone());
            }
            zone
        })
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Zone({:?})", self.0)
    }
}

/// A cluster member as the membership protocol knows it.
///
/// The address is unique in the cluster: when a node restarts on the same address with a
/// higher generation, its new identity replaces the old one everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node's id.
    pub id: NodeId,
    /// The address peers send datagrams to.
    pub addr: SocketAddr,
    /// The node's failure domain.
    pub zone: Zone,
    /// Distinguishes incarnations of a node at the same address: the driver uses the
    /// process start time, and it rises by one when a node rejoins after being declared
    /// down.
    pub generation: u64,
}

impl Member {
    /// A placeholder for a seed known only by address. Announcements addressed to it are
    /// accepted by whoever owns the address.
    pub(crate) fn seed(addr: SocketAddr) -> Member {
        Member {
            id: NodeId(0),
            addr,
            zone: Zone::unknown(),
            generation: 0,
        }
    }
}

/// A member's address in the form foca compares: foca finds a member by comparing its
/// address with every member's in turn, on every update, so two integer comparisons
/// instead of a `SocketAddr`'s field by field matter at a thousand members. Equal
/// exactly when the addresses are, but for IPv6 flow labels, which name no endpoint.
///
/// Also the key of a node's view of foca's table (`node/sync.rs`).
///
/// Three 64-bit fields. A `u128` is aligned to 16 bytes, which made the key 32 bytes,
/// and foca keeps one in every entry of its broadcast queue, which it passes over
/// whole for every update it takes. Fields also compare in fewer instructions than a
/// `u128` or a `[u64; 2]`: foca's search of its table for each update took 5.1
/// billion instructions over a thousand nodes' first 12 simulated seconds with them,
/// 11.8 billion with either of the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrKey {
    /// The address's high 64 bits (0 for IPv4), in the order's first place.
    high: u64,
    /// The address's low 64 bits (an IPv4 address whole).
    low: u64,
    /// The port in the low 16 bits, an IPv6 scope id above it, and bit 48 set for IPv4.
    rest: u64,
}

impl AddrKey {
    /// The key as three words, for hashing.
    pub(crate) fn words(&self) -> [u64; 3] {
        [self.low, self.high, self.rest]
    }

    /// The key hashed to one word (each word mixed in turn).
    pub(crate) fn hash_word(&self) -> u64 {
        self.words()
            .iter()
            .fold(0, |hash, word| crate::node::mix(hash ^ word))
    }

    fn new(ip: u128, rest: u64) -> AddrKey {
        AddrKey {
            high: (ip >> 64) as u64,
            low: ip as u64,
            rest,
        }
    }
}

impl From<SocketAddr> for AddrKey {
    fn from(addr: SocketAddr) -> AddrKey {
        match addr {
            SocketAddr::V4(v4) => {
                AddrKey::new(u32::from(*v4.ip()).into(), u64::from(v4.port()) | 1 << 48)
            }
            SocketAddr::V6(v6) => AddrKey::new(
                u128::from(*v6.ip()),
                u64::from(v6.port()) | u64::from(v6.scope_id()) << 16,
            ),
        }
    }
}

impl foca::Identity for Member {
    type Addr = AddrKey;

    fn renew(&self) -> Option<Self> {
        Some(Member {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> AddrKey {
        AddrKey::from(self.addr)
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, self.id) > (adversary.generation, adversary.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity as _;

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn focas_table_entries_and_address_keys_stay_small() {
        assert_eq!(size_of::<Zone>(), 8);
        assert_eq!(size_of::<foca::Member<Member>>(), 64);
        assert_eq!(size_of::<AddrKey>(), 24);
    }

    #[test]
    fn address_keys_are_equal_exactly_when_the_addresses_are() {
        let addrs: Vec<SocketAddr> = [
            "10.0.0.1:7946",
            "10.0.0.1:7947",
            "10.0.0.2:7946",
            "[::ffff:10.0.0.1]:7946",
            "[fe80::1%2]:7946",
            "[fe80::1%3]:7946",
            "[fe80::1]:7946",
            "[::1]:7946",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        for a in &addrs {
            for b in &addrs {
                assert_eq!(AddrKey::from(*a) == AddrKey::from(*b), a == b, "{a} {b}");
            }
        }
    }

    #[test]
    fn zone_names_are_validated() {
        assert!(Zone::new("eu-west-1a").is_ok());
        assert!(Zone::new("").is_err());
        assert!(Zone::new("has space").is_err());
        assert!(Zone::new("x".repeat(MAX_ZONE_LEN + 1)).is_err());
    }

    #[test]
    fn a_restart_wins_over_the_old_identity() {
        let addr = "127.0.0.1:7000".parse().unwrap();
        let old = Member {
            id: NodeId(9),
            addr,
            zone: Zone::default(),
            generation: 100,
        };
        let new = Member {
            id: NodeId(1),
            generation: 200,
            ..old.clone()
        };
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        assert!(old.renew().unwrap().win_addr_conflict(&old));
    }

    #[test]
    fn a_zone_travels_as_its_name() {
        let zone = Zone::new("eu-west-1a").unwrap();
        let encoded = postcard::to_allocvec(&zone).unwrap();
        assert_eq!(encoded, postcard::to_allocvec("eu-west-1a").unwrap());
        assert_eq!(postcard::from_bytes::<Zone>(&encoded).unwrap(), zone);
        // What `Zone::new` refuses does not decode either, but a seed's empty name does.
        let decode =
            |name: &str| postcard::from_bytes::<Zone>(&postcard::to_allocvec(name).unwrap());
        assert!(decode(&"z".repeat(MAX_ZONE_LEN)).is_ok());
        assert!(decode(&"z".repeat(MAX_ZONE_LEN + 1)).is_err());
        assert!(decode("has space").is_err());
        assert!(decode("").is_ok());
    }

    #[test]
    fn decoded_zones_share_one_allocation_per_name_up_to_a_bound() {
        let decode = |name: &str| -> Zone {
            postcard::from_bytes(&postcard::to_allocvec(name).unwrap()).unwrap()
        };
        let (a, b) = (decode("eu-west-1a"), decode("eu-west-1a"));
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert!(!Arc::ptr_eq(&a.0, &decode("eu-west-1b").0));
        // Names past the bound still decode, each into its own allocation.
        for i in 0..MAX_SHARED_ZONES {
            assert_eq!(decode(&format!("zone-{i}")).as_str(), format!("zone-{i}"));
        }
        let (c, d) = (decode("late"), decode("late"));
        assert_eq!(c, d);
        assert!(!Arc::ptr_eq(&c.0, &d.0));
    }

    #[test]
    fn node_ids_print_and_parse_as_hex() {
        let id = NodeId(0xabc);
        assert_eq!(id.to_string(), "0000000000000abc");
        assert_eq!("0000000000000abc".parse::<NodeId>().unwrap(), id);
    }
}
