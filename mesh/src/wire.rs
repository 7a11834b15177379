//! The wire format.
//!
//! Every datagram starts with a fixed 13-byte header:
//!
//! ```text
//! 0      2        3       4       5                13
//! | "SB" | version | kind | flags | cluster id (u64, big-endian) | body ...
//! ```
//!
//! The body depends on the kind:
//! - membership: a foca message, encoded by foca's postcard codec;
//! - data: a batch head (origin, first sequence number, entry count) then the entries,
//!   each postcard-encoded; entry `i` has sequence number `first + i`;
//! - discover: the sender's advertised address (multicast discovery beacons).
//!
//! Decoding never panics, and never allocates more than the datagram's own bytes
//! justify: every count is checked against the bytes left before anything is reserved.

use std::net::SocketAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::identity::NodeId;
use crate::invalidation::{Invalidation, InvalidationKind, Scope, VectorClock};

/// The first two bytes of every syncbus datagram.
pub const MAGIC: [u8; 2] = *b"SB";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 13;
/// Worst-case length of a batch head: three varints (origin, first sequence number,
/// entry count).
pub(crate) const BATCH_HEAD_MAX: usize = 10 + 10 + 5;
/// Bytes an entry takes beyond its key at the least: kind, scope, a key length of up to
/// three bytes, no region, an empty clock.
pub(crate) const ENTRY_OVERHEAD: usize = 7;
/// An entry is at least this long on the wire, which bounds the count a body may claim.
const MIN_ENTRY_LEN: usize = 5;
/// A clock pair is at least this long: an empty name and a one-byte counter.
const MIN_CLOCK_PAIR_LEN: usize = 2;

/// Hash of the cluster name carried by every datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClusterId(pub u64);

impl ClusterId {
    /// FNV-1a of the name: stable across builds and platforms, unlike std's hasher.
    pub fn from_name(name: &str) -> ClusterId {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in name.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        ClusterId(hash)
    }
}

/// What a datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    /// SWIM membership, handled by foca.
    Membership = 1,
    /// A batch of invalidations.
    Data = 2,
    /// A multicast discovery beacon.
    Discover = 3,
}

impl TryFrom<u8> for MessageKind {
    type Error = DecodeError;

    fn try_from(value: u8) -> Result<Self, DecodeError> {
        match value {
            1 => Ok(MessageKind::Membership),
            2 => Ok(MessageKind::Data),
            3 => Ok(MessageKind::Discover),
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

/// The fixed header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the body holds.
    pub kind: MessageKind,
    /// Reserved for compression and sealing; this version sends and accepts zero only.
    pub flags: u8,
    /// The sender's cluster.
    pub cluster: ClusterId,
}

/// Appends a header to `out`.
pub fn write_header(out: &mut Vec<u8>, kind: MessageKind, cluster: ClusterId) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&cluster.0.to_be_bytes());
}

/// Splits a datagram into its header and body.
pub fn read_header(datagram: &[u8]) -> Result<(Header, &[u8]), DecodeError> {
    let Some((head, body)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Truncated);
    };
    if head[0..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if head[2] != VERSION {
        return Err(DecodeError::UnsupportedVersion(head[2]));
    }
    let kind = MessageKind::try_from(head[3])?;
    let flags = head[4];
    if flags != 0 {
        return Err(DecodeError::UnsupportedFlags(flags));
    }
    let mut cluster = [0; 8];
    cluster.copy_from_slice(&head[5..13]);
    let cluster = ClusterId(u64::from_be_bytes(cluster));
    Ok((
        Header {
            kind,
            flags,
            cluster,
        },
        body,
    ))
}

/// The most bytes one encoded entry may take in a datagram of `max_datagram` bytes.
pub fn max_entry_len(max_datagram: usize) -> usize {
    max_datagram.saturating_sub(HEADER_LEN + BATCH_HEAD_MAX)
}

#[derive(Serialize)]
struct EntryOut<'a> {
    kind: InvalidationKind,
    scope: Scope,
    key: &'a str,
    region: Option<&'a str>,
    clock_len: u32,
}

#[derive(Deserialize)]
struct EntryIn<'a> {
    kind: InvalidationKind,
    scope: Scope,
    key: &'a str,
    region: Option<&'a str>,
    clock_len: u32,
}

#[derive(Serialize, Deserialize)]
struct BatchHead {
    origin: u64,
    first_seq: u64,
    count: u32,
}

/// Appends one encoded entry to `out`.
pub fn encode_entry(invalidation: &Invalidation, out: &mut Vec<u8>) {
    let clock = &invalidation.vector_clock.0;
    let head = EntryOut {
        kind: invalidation.kind,
        scope: invalidation.scope,
        key: &invalidation.key,
        region: invalidation.region.as_deref(),
        clock_len: u32::try_from(clock.len()).unwrap_or(u32::MAX),
    };
    append(&head, out);
    for (writer, counter) in clock {
        append(&(writer.as_str(), *counter), out);
    }
}

fn append<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // Serialising plain structs of strings and integers into a Vec cannot fail.
    let taken = std::mem::take(out);
    *out = postcard::to_extend(value, taken).unwrap_or_default();
}

/// Decodes one entry from the front of `bytes`, returning it and the rest.
fn decode_entry(bytes: &[u8]) -> Result<(Invalidation, &[u8]), DecodeError> {
    let (head, mut rest): (EntryIn<'_>, _) =
        postcard::take_from_bytes(bytes).map_err(|_| DecodeError::Malformed)?;
    let clock_len = head.clock_len as usize;
    if clock_len > rest.len() / MIN_CLOCK_PAIR_LEN {
        return Err(DecodeError::Malformed);
    }
    let mut clock = VectorClock::new();
    for _ in 0..clock_len {
        let ((writer, counter), tail): ((&str, u64), _) =
            postcard::take_from_bytes(rest).map_err(|_| DecodeError::Malformed)?;
        clock.0.insert(writer.to_owned(), counter);
        rest = tail;
    }
    let invalidation = Invalidation {
        kind: head.kind,
        key: head.key.to_owned(),
        region: head.region.map(str::to_owned),
        scope: head.scope,
        vector_clock: clock,
    };
    Ok((invalidation, rest))
}

/// A decoded data batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The node that published the entries.
    pub origin: NodeId,
    /// Sequence number of the first entry; the rest follow consecutively.
    pub first_seq: u64,
    /// The invalidations, in sequence order.
    pub entries: Vec<Invalidation>,
}

/// Builds a data datagram from entries already encoded with [`encode_entry`].
pub fn encode_batch(
    cluster: ClusterId,
    origin: NodeId,
    first_seq: u64,
    count: u32,
    encoded_entries: &[u8],
) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + BATCH_HEAD_MAX + encoded_entries.len());
    write_header(&mut out, MessageKind::Data, cluster);
    let head = BatchHead {
        origin: origin.0,
        first_seq,
        count,
    };
    append(&head, &mut out);
    out.extend_from_slice(encoded_entries);
    Bytes::from(out)
}

/// Decodes the body of a data datagram.
pub fn decode_batch(body: &[u8]) -> Result<Batch, DecodeError> {
    let (head, mut rest): (BatchHead, _) =
        postcard::take_from_bytes(body).map_err(|_| DecodeError::Malformed)?;
    let count = head.count as usize;
    if count == 0 || count > rest.len() / MIN_ENTRY_LEN {
        return Err(DecodeError::Malformed);
    }
    if head.first_seq == 0 || head.first_seq.checked_add(head.count.into()).is_none() {
        return Err(DecodeError::Malformed);
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let (entry, tail) = decode_entry(rest)?;
        entries.push(entry);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok(Batch {
        origin: NodeId(head.origin),
        first_seq: head.first_seq,
        entries,
    })
}

/// Builds a discovery beacon announcing `advertise`.
pub fn encode_discover(cluster: ClusterId, advertise: SocketAddr) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + 24);
    write_header(&mut out, MessageKind::Discover, cluster);
    append(&advertise, &mut out);
    Bytes::from(out)
}

/// Decodes the body of a discovery beacon.
pub fn decode_discover(body: &[u8]) -> Result<SocketAddr, DecodeError> {
    match postcard::take_from_bytes::<SocketAddr>(body) {
        Ok((addr, [])) => Ok(addr),
        _ => Err(DecodeError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_invalidation() -> impl Strategy<Value = Invalidation> {
        let kind = prop_oneof![Just(InvalidationKind::Key), Just(InvalidationKind::Lease)];
        let scope = prop_oneof![Just(Scope::Local), Just(Scope::Global)];
        let clock = proptest::collection::btree_map(".{0,8}", any::<u64>(), 0..4);
        (
            kind,
            scope,
            ".{0,64}",
            proptest::option::of(".{0,12}"),
            clock,
        )
            .prop_map(|(kind, scope, key, region, clock)| Invalidation {
                kind,
                key,
                region,
                scope,
                vector_clock: VectorClock(clock),
            })
    }

    #[test]
    fn header_round_trips() {
        let cluster = ClusterId::from_name("prod");
        let mut out = Vec::new();
        write_header(&mut out, MessageKind::Data, cluster);
        out.push(7);
        let (header, body) = read_header(&out).unwrap();
        assert_eq!(header.kind, MessageKind::Data);
        assert_eq!(header.cluster, cluster);
        assert_eq!(body, [7]);
    }

    #[test]
    fn header_errors_are_specific() {
        let mut out = Vec::new();
        write_header(&mut out, MessageKind::Data, ClusterId(1));
        assert_eq!(read_header(&out[..5]), Err(DecodeError::Truncated));
        let mut bad = out.clone();
        bad[0] = b'X';
        assert_eq!(read_header(&bad), Err(DecodeError::BadMagic));
        let mut bad = out.clone();
        bad[2] = 9;
        assert_eq!(read_header(&bad), Err(DecodeError::UnsupportedVersion(9)));
        let mut bad = out.clone();
        bad[3] = 200;
        assert_eq!(read_header(&bad), Err(DecodeError::UnknownKind(200)));
        bad = out;
        bad[4] = 1;
        assert_eq!(read_header(&bad), Err(DecodeError::UnsupportedFlags(1)));
    }

    #[test]
    fn a_count_larger_than_the_body_is_rejected_before_allocating() {
        let mut body = Vec::new();
        append(
            &BatchHead {
                origin: 1,
                first_seq: 1,
                count: u32::MAX,
            },
            &mut body,
        );
        body.extend_from_slice(&[0; 16]);
        assert_eq!(decode_batch(&body), Err(DecodeError::Malformed));
    }

    #[test]
    fn discover_round_trips() {
        let addr: SocketAddr = "[::1]:7946".parse().unwrap();
        let datagram = encode_discover(ClusterId(3), addr);
        let (header, body) = read_header(&datagram).unwrap();
        assert_eq!(header.kind, MessageKind::Discover);
        assert_eq!(decode_discover(body), Ok(addr));
    }

    proptest! {
        #[test]
        fn batches_round_trip(entries in proptest::collection::vec(arb_invalidation(), 1..20),
                              origin: u64, first_seq in 1u64..u64::MAX / 2) {
            let mut encoded = Vec::new();
            for entry in &entries {
                encode_entry(entry, &mut encoded);
            }
            let datagram = encode_batch(ClusterId(5), NodeId(origin), first_seq,
                                        entries.len() as u32, &encoded);
            let (header, body) = read_header(&datagram).unwrap();
            prop_assert_eq!(header.kind, MessageKind::Data);
            let batch = decode_batch(body).unwrap();
            prop_assert_eq!(batch.origin, NodeId(origin));
            prop_assert_eq!(batch.first_seq, first_seq);
            prop_assert_eq!(batch.entries, entries);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            if let Ok((_, body)) = read_header(&bytes) {
                let _ = decode_batch(body);
                let _ = decode_discover(body);
            }
            let _ = decode_batch(&bytes);
        }

        #[test]
        fn corrupted_batches_never_panic(entries in proptest::collection::vec(arb_invalidation(), 1..8),
                                         flip in any::<prop::sample::Index>(), value: u8) {
            let mut encoded = Vec::new();
            for entry in &entries {
                encode_entry(entry, &mut encoded);
            }
            let datagram = encode_batch(ClusterId(5), NodeId(1), 1, entries.len() as u32, &encoded);
            let mut bytes = datagram.to_vec();
            let at = flip.index(bytes.len());
            bytes[at] = value;
            if let Ok((_, body)) = read_header(&bytes) {
                let _ = decode_batch(body);
            }
        }
    }
}
