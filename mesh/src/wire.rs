//! The wire format.
//!
//! Every datagram starts with a fixed 17-byte header:
//!
//! ```text
//! 0      2        3       4       5                             13          17
//! | "SB" | version | kind | flags | cluster id (u64, big-endian) | CRC-32 BE | body ...
//! ```
//!
//! The CRC-32 covers the whole datagram except itself: a datagram damaged on the way is
//! dropped and counted before any of it is decoded.
//!
//! Flags: [`FLAG_COMPRESSED`] on data (the body is a varint of its uncompressed length
//! and an LZ4 block), [`FLAG_FORWARD`] on data and digests (the receiver relays the
//! datagram within its zone), [`FLAG_ANSWER`] on syncs.
//!
//! The body depends on the kind:
//! - membership: a foca message, encoded by foca's postcard codec;
//! - data: a batch head (origin, first sequence number, entry count) then the entries,
//!   each postcard-encoded; entry `i` has sequence number `first + i`;
//! - discover: the sender's advertised address (multicast discovery beacons);
//! - ack: the acknowledging node and the sequence numbers it applied;
//! - repair: an origin and the ranges of its sequence numbers the sender lacks; no
//!   range at all asks the origin where the sender's part of its stream starts, which
//!   it answers with a digest of the sender's own;
//! - digest: an origin's newest sequence number, and the first one the receiving member
//!   is owed, so receivers notice tail loss and loss of their first entries;
//! - gone: an origin's oldest retained sequence number, in answer to a repair it can
//!   no longer serve;
//! - zone digests: a count, then that many (origin, newest sequence number) pairs: the
//!   shared digests a relay gathered from several origins over one interval, sent to
//!   its zone in one datagram instead of one per origin;
//! - sync: part of the sender's table, items one after another: foca members (declared
//!   down or not), or a fingerprint standing for all but the entries for the two ends
//!   of the exchange, and, for each origin, the newest sequence number the sender knows
//!   of, or a fingerprint standing for those (the periodic exchange that repairs what
//!   gossip and digests missed); with
//!   [`FLAG_ANSWER`], the receiver answers: with its progress and its entries for the
//!   two ends when the request's fingerprint matches its table, else with its table.
//!
//! Decoding never panics, and never allocates more than the datagram's own bytes
//! justify: every count is checked against the bytes left before anything is reserved.
//!
//! A node with a cluster key wraps each of these datagrams whole in a sealed one (kind
//! 9), described in the `seal` module: authenticated encryption replaces what the
//! checksum alone cannot give.

use std::net::SocketAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::identity::{Member, NodeId};
use crate::invalidation::{Invalidation, InvalidationKind, Scope, VectorClock};

/// The first two bytes of every syncbus datagram.
pub const MAGIC: [u8; 2] = *b"SB";
/// The protocol version this build speaks. Version 2 pads foca's messages
/// (`swim_codec`), which version 1 cannot read: the two drop each other's datagrams as
/// of an unsupported version rather than misread them.
pub const VERSION: u8 = 2;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 17;
/// Where the flags byte sits in the header.
pub(crate) const FLAGS_AT: usize = 4;
/// Worst-case length of a batch head: three varints (origin, first sequence number,
/// entry count).
pub(crate) const BATCH_HEAD_MAX: usize = 10 + 10 + 5;
/// Bytes an entry takes beyond its key at the least: flags, scope, a key length of up to
/// three bytes, no region, an empty clock.
pub(crate) const ENTRY_OVERHEAD: usize = 7;
/// Sequence numbers stay below this, so arithmetic on them never overflows. An origin
/// would need 2^63 publishes to reach it.
pub const MAX_SEQ: u64 = 1 << 63;
/// Header flag: the body is LZ4-compressed.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Header flag: the receiver is a relay and forwards the batch within its zone.
pub const FLAG_FORWARD: u8 = 0x02;
/// Header flag on a sync: the receiver should answer with its own membership table.
pub const FLAG_ANSWER: u8 = 0x04;
/// Header flag on a batch marked for forwarding: the relay forwards it to half of its
/// zone only, the members in the half [`FLAG_SECOND_HALF`] names; another relay of the
/// zone has the other half.
pub const FLAG_HALF: u8 = 0x08;
/// Header flag with [`FLAG_HALF`]: the second half of the zone, not the first.
pub const FLAG_SECOND_HALF: u8 = 0x10;
/// Header flag on a membership announcement: the sender renewed its identity and
/// kept its table of members, so the receiver answers with a short sample of members.
pub const FLAG_RENEWAL: u8 = 0x20;
/// The flags that tell a relay what to forward.
const RELAY_FLAGS: u8 = FLAG_FORWARD | FLAG_HALF | FLAG_SECOND_HALF;
/// A compressed body never expands beyond this: checked before anything is allocated.
pub const MAX_DECOMPRESSED: usize = 64 * 1024;
/// Uncompressed bytes packed into one datagram at most, whatever the compression ratio.
const MAX_PACKED: usize = 32 * 1024;
/// Entry flag: a lease revocation rather than a key invalidation.
const ENTRY_LEASE: u8 = 0x01;
/// Entry flag: the origin waits for an acknowledgement of this entry.
const ENTRY_ACK: u8 = 0x02;
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
    /// Acknowledgements of entries that asked for one.
    Ack = 4,
    /// A request to retransmit missing entries.
    Repair = 5,
    /// An origin's newest sequence number.
    Digest = 6,
    /// An origin's answer that it no longer retains what was asked for.
    Gone = 7,
    /// Part of the sender's membership table.
    Sync = 8,
    /// Several origins' newest sequence numbers, gathered by a relay for its zone.
    ZoneDigests = 10,
}

impl TryFrom<u8> for MessageKind {
    type Error = DecodeError;

    fn try_from(value: u8) -> Result<Self, DecodeError> {
        match value {
            1 => Ok(MessageKind::Membership),
            2 => Ok(MessageKind::Data),
            3 => Ok(MessageKind::Discover),
            4 => Ok(MessageKind::Ack),
            5 => Ok(MessageKind::Repair),
            6 => Ok(MessageKind::Digest),
            7 => Ok(MessageKind::Gone),
            8 => Ok(MessageKind::Sync),
            10 => Ok(MessageKind::ZoneDigests),
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

/// The fixed header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the body holds.
    pub kind: MessageKind,
    /// [`FLAG_COMPRESSED`] and [`FLAG_FORWARD`] on data, [`FLAG_FORWARD`] on digests,
    /// [`FLAG_ANSWER`] on syncs.
    pub flags: u8,
    /// The sender's cluster.
    pub cluster: ClusterId,
}

/// Appends a header to `out`, with room for the checksum that [`checksummed`] fills in once
/// the body is complete.
pub fn write_header(out: &mut Vec<u8>, kind: MessageKind, cluster: ClusterId) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&cluster.0.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
}

fn checksum(datagram: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&datagram[..13]);
    crc.update(&datagram[HEADER_LEN..]);
    crc.finalize()
}

/// Completes a datagram built with [`write_header`]: fills in its checksum.
pub fn checksummed(mut datagram: Vec<u8>) -> Bytes {
    if datagram.len() >= HEADER_LEN {
        let crc = checksum(&datagram);
        datagram[13..HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
    }
    Bytes::from(datagram)
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
    if head[13..] != checksum(datagram).to_be_bytes() {
        return Err(DecodeError::Corrupt);
    }
    let kind = MessageKind::try_from(head[3])?;
    let flags = head[4];
    let allowed = match kind {
        MessageKind::Data => FLAG_COMPRESSED | RELAY_FLAGS,
        MessageKind::Digest => FLAG_FORWARD,
        MessageKind::Sync => FLAG_ANSWER,
        MessageKind::Membership => FLAG_RENEWAL,
        _ => 0,
    };
    if flags & !allowed != 0 {
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
    flags: u8,
    scope: Scope,
    key: &'a str,
    region: Option<&'a str>,
    clock_len: u32,
}

#[derive(Deserialize)]
struct EntryIn<'a> {
    flags: u8,
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

/// Appends one encoded entry to `out`; `ack` asks receivers to acknowledge it.
pub fn encode_entry(invalidation: &Invalidation, ack: bool, out: &mut Vec<u8>) {
    let clock = &invalidation.vector_clock.0;
    let mut flags = if ack { ENTRY_ACK } else { 0 };
    if invalidation.kind == InvalidationKind::Lease {
        flags |= ENTRY_LEASE;
    }
    let head = EntryOut {
        flags,
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

/// The length [`encode_entry`] gives `invalidation`, without encoding it: what the size
/// limits check on every publish. Postcard writes lengths, counts and integers as
/// varints, flags raw, and a unit variant or an option's tag in one byte.
pub fn entry_len(invalidation: &Invalidation) -> usize {
    let text = |s: &str| varint_len(s.len() as u64) + s.len();
    let clock = &invalidation.vector_clock.0;
    let clock_len = u32::try_from(clock.len()).unwrap_or(u32::MAX);
    let region = invalidation.region.as_deref().map_or(0, text);
    let entries: usize = clock
        .iter()
        .map(|(writer, counter)| text(writer) + varint_len(*counter))
        .sum();
    // Flags, scope and the region's tag: a byte each.
    3 + text(&invalidation.key) + region + varint_len(u64::from(clock_len)) + entries
}

/// Bytes of a postcard varint holding `value`: seven bits each.
fn varint_len(value: u64) -> usize {
    (64 - value.leading_zeros() as usize).max(1).div_ceil(7)
}

fn append<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // Serialising plain structs of strings and integers into a Vec cannot fail.
    let taken = std::mem::take(out);
    *out = postcard::to_extend(value, taken).unwrap_or_default();
}

/// Decodes one entry from the front of `bytes`, returning it and the rest.
fn decode_entry(bytes: &[u8]) -> Result<(Entry, &[u8]), DecodeError> {
    let (head, mut rest): (EntryIn<'_>, _) =
        postcard::take_from_bytes(bytes).map_err(|_| DecodeError::Malformed)?;
    if head.flags & !(ENTRY_LEASE | ENTRY_ACK) != 0 {
        return Err(DecodeError::Malformed);
    }
    let kind = if head.flags & ENTRY_LEASE != 0 {
        InvalidationKind::Lease
    } else {
        InvalidationKind::Key
    };
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
        kind,
        key: head.key.to_owned(),
        region: head.region.map(str::to_owned),
        scope: head.scope,
        vector_clock: clock,
    };
    let ack = head.flags & ENTRY_ACK != 0;
    Ok((Entry { invalidation, ack }, rest))
}

/// One decoded entry of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The invalidation.
    pub invalidation: Invalidation,
    /// Whether the origin waits for an acknowledgement.
    pub ack: bool,
}

/// A decoded data batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The node that published the entries.
    pub origin: NodeId,
    /// Sequence number of the first entry; the rest follow consecutively.
    pub first_seq: u64,
    /// The entries, in sequence order.
    pub entries: Vec<Entry>,
}

/// The head of a data datagram: who published its entries and how they are numbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchInfo {
    /// The publishing node.
    pub origin: NodeId,
    /// Sequence number of the first entry.
    pub first_seq: u64,
    /// Number of entries.
    pub count: u32,
}

/// Builds a data datagram from entries already encoded with [`encode_entry`].
pub fn encode_batch(cluster: ClusterId, info: BatchInfo, encoded_entries: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + BATCH_HEAD_MAX + encoded_entries.len());
    write_header(&mut out, MessageKind::Data, cluster);
    let head = BatchHead {
        origin: info.origin.0,
        first_seq: info.first_seq,
        count: info.count,
    };
    append(&head, &mut out);
    out.extend_from_slice(encoded_entries);
    checksummed(out)
}

/// Decodes the body of a data datagram.
pub fn decode_batch(body: &[u8]) -> Result<Batch, DecodeError> {
    let (head, mut rest): (BatchHead, _) =
        postcard::take_from_bytes(body).map_err(|_| DecodeError::Malformed)?;
    let count = head.count as usize;
    if count == 0 || count > rest.len() / MIN_ENTRY_LEN {
        return Err(DecodeError::Malformed);
    }
    let end = head.first_seq.checked_add(u64::from(head.count));
    if head.first_seq == 0 || end.is_none_or(|end| end > MAX_SEQ) {
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

/// A copy of `datagram` whose flags telling a relay what to forward
/// ([`FLAG_FORWARD`], [`FLAG_HALF`], [`FLAG_SECOND_HALF`]) are `relay_flags`.
pub(crate) fn with_relay_flags(datagram: &[u8], relay_flags: u8) -> Bytes {
    let mut copy = datagram.to_vec();
    if let Some(flags) = copy.get_mut(FLAGS_AT) {
        *flags = (*flags & !RELAY_FLAGS) | (relay_flags & RELAY_FLAGS);
    }
    checksummed(copy)
}

/// The body of a data datagram, decompressed if its header says so. The claimed size
/// is checked against [`MAX_DECOMPRESSED`] before anything is allocated.
pub fn data_body<'a>(
    header: &Header,
    body: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, DecodeError> {
    if header.flags & FLAG_COMPRESSED == 0 {
        return Ok(std::borrow::Cow::Borrowed(body));
    }
    let (len, block): (u32, _) =
        postcard::take_from_bytes(body).map_err(|_| DecodeError::Malformed)?;
    let len = len as usize;
    if len == 0 || len > MAX_DECOMPRESSED {
        return Err(DecodeError::Malformed);
    }
    let mut out = vec![0; len];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(written) if written == len => Ok(std::borrow::Cow::Owned(out)),
        _ => Err(DecodeError::Malformed),
    }
}

/// Builds the data datagrams for consecutive encoded entries starting at `first_seq`:
/// as few as fit in `max_datagram` bytes each, compressing when `compress` is set and
/// that saves bytes (packing more entries per datagram).
pub fn build_batches(
    cluster: ClusterId,
    origin: NodeId,
    first_seq: u64,
    entries: &[&[u8]],
    max_datagram: usize,
    compress: bool,
) -> Vec<Bytes> {
    let plain_budget = max_entry_len(max_datagram);
    let mut datagrams = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        // The most entries that fit uncompressed (always at least one).
        let mut end = start + 1;
        let mut size = entries[start].len();
        while end < entries.len() && size + entries[end].len() <= plain_budget {
            size += entries[end].len();
            end += 1;
        }
        let info = |end: usize| BatchInfo {
            origin,
            first_seq: first_seq + start as u64,
            count: u32::try_from(end - start).unwrap_or(u32::MAX),
        };
        let mut best = encode_batch(cluster, info(end), &entries[start..end].concat());
        let mut best_end = end;
        if compress {
            if let Some(smaller) = compressed(&best, max_datagram) {
                best = smaller;
            }
            // Grow by a quarter while the compressed datagram still fits.
            while best_end < entries.len() {
                let grown = (best_end + (best_end - start).div_ceil(4)).min(entries.len());
                let body = entries[start..grown].concat();
                if body.len() > MAX_PACKED {
                    break;
                }
                let candidate = encode_batch(cluster, info(grown), &body);
                match compressed(&candidate, max_datagram) {
                    Some(fits) => {
                        best = fits;
                        best_end = grown;
                    }
                    None => break,
                }
            }
        }
        datagrams.push(best);
        start = best_end;
    }
    datagrams
}

/// `datagram` with its body compressed, if the result is smaller and fits.
fn compressed(datagram: &[u8], max_datagram: usize) -> Option<Bytes> {
    let body = &datagram[HEADER_LEN..];
    let block = lz4_flex::block::compress(body);
    let mut out = Vec::with_capacity(HEADER_LEN + 5 + block.len());
    out.extend_from_slice(&datagram[..HEADER_LEN]);
    out[4] |= FLAG_COMPRESSED;
    append(&u32::try_from(body.len()).ok()?, &mut out);
    out.extend_from_slice(&block);
    (out.len() < datagram.len() && out.len() <= max_datagram).then(|| checksummed(out))
}

#[derive(Serialize, Deserialize)]
struct ListHead {
    node: u64,
    count: u32,
}

/// A node and a list of sequence numbers (acks) or of ranges (repairs).
fn encode_list(kind: MessageKind, cluster: ClusterId, node: NodeId, values: &[u64]) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + 16 + values.len() * 3);
    write_header(&mut out, kind, cluster);
    let count = u32::try_from(values.len()).unwrap_or(u32::MAX);
    append(
        &ListHead {
            node: node.0,
            count,
        },
        &mut out,
    );
    for value in values.iter().take(count as usize) {
        append(value, &mut out);
    }
    checksummed(out)
}

/// Decodes a list of at least `min_count` values.
fn decode_list(body: &[u8], min_count: usize) -> Result<(NodeId, Vec<u64>), DecodeError> {
    let (head, mut rest): (ListHead, _) =
        postcard::take_from_bytes(body).map_err(|_| DecodeError::Malformed)?;
    let count = head.count as usize;
    // Every value takes at least one byte.
    if count < min_count || count > rest.len() {
        return Err(DecodeError::Malformed);
    }
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let (value, tail): (u64, _) =
            postcard::take_from_bytes(rest).map_err(|_| DecodeError::Malformed)?;
        values.push(value);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok((NodeId(head.node), values))
}

/// Most sequence numbers one ack datagram carries: 10 bytes each at worst.
pub(crate) fn max_list_len(max_datagram: usize) -> usize {
    max_datagram.saturating_sub(HEADER_LEN + 16) / 10
}

/// An acknowledgement by `acker` of the origin's entries `seqs`.
pub fn encode_ack(cluster: ClusterId, acker: NodeId, seqs: &[u64]) -> Bytes {
    encode_list(MessageKind::Ack, cluster, acker, seqs)
}

/// Decodes an ack body: the acknowledging node and the sequence numbers.
pub fn decode_ack(body: &[u8]) -> Result<(NodeId, Vec<u64>), DecodeError> {
    decode_list(body, 1)
}

/// A request for `origin`'s entries in the inclusive `ranges`.
pub fn encode_repair(cluster: ClusterId, origin: NodeId, ranges: &[(u64, u64)]) -> Bytes {
    let flat: Vec<u64> = ranges.iter().flat_map(|&(from, to)| [from, to]).collect();
    encode_list(MessageKind::Repair, cluster, origin, &flat)
}

/// Decodes a repair body: the origin and the inclusive ranges asked for.
pub fn decode_repair(body: &[u8]) -> Result<(NodeId, Vec<(u64, u64)>), DecodeError> {
    // No range at all asks where the sender's part of the stream starts.
    let (origin, flat) = decode_list(body, 0)?;
    if flat.len() % 2 != 0 {
        return Err(DecodeError::Malformed);
    }
    let ranges: Vec<(u64, u64)> = flat
        .chunks_exact(2)
        .map(|pair| (pair[0], pair[1]))
        .collect();
    if ranges
        .iter()
        .any(|&(from, to)| from == 0 || from > to || to > MAX_SEQ)
    {
        return Err(DecodeError::Malformed);
    }
    Ok((origin, ranges))
}

#[derive(Serialize, Deserialize)]
struct Marker {
    origin: u64,
    seq: u64,
}

fn encode_marker(kind: MessageKind, cluster: ClusterId, origin: NodeId, seq: u64) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + 20);
    write_header(&mut out, kind, cluster);
    append(
        &Marker {
            origin: origin.0,
            seq,
        },
        &mut out,
    );
    checksummed(out)
}

fn decode_marker(body: &[u8]) -> Result<(NodeId, u64), DecodeError> {
    match postcard::take_from_bytes::<Marker>(body) {
        Ok((marker, [])) if marker.seq > 0 && marker.seq <= MAX_SEQ => {
            Ok((NodeId(marker.origin), marker.seq))
        }
        _ => Err(DecodeError::Malformed),
    }
}

#[derive(Serialize, Deserialize)]
struct DigestBody {
    origin: u64,
    last: u64,
    first: u64,
}

/// What an origin tells one member: its newest sequence number, and the first one it
/// owes that member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    /// The origin.
    pub origin: NodeId,
    /// Its newest sequence number.
    pub last: u64,
    /// The first sequence number the receiving member should have, or 0 in a digest
    /// shared by a whole zone (relayed), which says nothing about where members start.
    pub first: u64,
}

/// Encodes a digest.
pub fn encode_digest(cluster: ClusterId, digest: Digest) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + 30);
    write_header(&mut out, MessageKind::Digest, cluster);
    let body = DigestBody {
        origin: digest.origin.0,
        last: digest.last,
        first: digest.first,
    };
    append(&body, &mut out);
    checksummed(out)
}

/// Decodes a digest body.
pub fn decode_digest(body: &[u8]) -> Result<Digest, DecodeError> {
    match postcard::take_from_bytes::<DigestBody>(body) {
        Ok((d, [])) if d.first <= d.last.saturating_add(1) && d.last < MAX_SEQ => Ok(Digest {
            origin: NodeId(d.origin),
            last: d.last,
            first: d.first,
        }),
        _ => Err(DecodeError::Malformed),
    }
}

/// Most (origin, newest sequence number) pairs one zone-digests datagram of at most
/// `max_datagram` bytes carries: 20 bytes a pair at worst, after a 5-byte count.
pub fn max_zone_digests(max_datagram: usize) -> usize {
    max_datagram.saturating_sub(HEADER_LEN + 5) / 20
}

/// Encodes origins' newest sequence numbers in one datagram; the caller keeps to
/// [`max_zone_digests`].
pub fn encode_zone_digests(cluster: ClusterId, ends: &[(NodeId, u64)]) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + 5 + ends.len() * 12);
    write_header(&mut out, MessageKind::ZoneDigests, cluster);
    let count = u32::try_from(ends.len()).unwrap_or(u32::MAX);
    append(&count, &mut out);
    for (origin, last) in ends.iter().take(count as usize) {
        append(&(origin.0, *last), &mut out);
    }
    checksummed(out)
}

/// Decodes a zone-digests body: at least one (origin, newest sequence number) pair.
pub fn decode_zone_digests(body: &[u8]) -> Result<Vec<(NodeId, u64)>, DecodeError> {
    let (count, mut rest): (u32, _) =
        postcard::take_from_bytes(body).map_err(|_| DecodeError::Malformed)?;
    let count = count as usize;
    // Every pair takes at least two bytes.
    if count == 0 || count > rest.len() / 2 {
        return Err(DecodeError::Malformed);
    }
    let mut ends = Vec::with_capacity(count);
    for _ in 0..count {
        let ((origin, last), tail): ((u64, u64), _) =
            postcard::take_from_bytes(rest).map_err(|_| DecodeError::Malformed)?;
        if last >= MAX_SEQ {
            return Err(DecodeError::Malformed);
        }
        ends.push((NodeId(origin), last));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok(ends)
}

/// `origin` retains nothing older than `oldest` any more.
pub fn encode_gone(cluster: ClusterId, origin: NodeId, oldest: u64) -> Bytes {
    encode_marker(MessageKind::Gone, cluster, origin, oldest)
}

/// Decodes a gone body: the origin and its oldest retained sequence number.
pub fn decode_gone(body: &[u8]) -> Result<(NodeId, u64), DecodeError> {
    decode_marker(body)
}

/// One line of a node's table in a sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncItem {
    /// A member as the sender's foca knows it, declared down or not.
    Member(foca::Member<Member>),
    /// The newest sequence number the sender knows `origin` to have published.
    Progress {
        /// The origin.
        origin: NodeId,
        /// Its newest sequence number the sender knows of.
        last: u64,
    },
    /// Stands for the sender's members in the request that opens an exchange: a
    /// fingerprint of its table, leaving out members declared down and the entries of
    /// both ends of the exchange (which travel beside it as `Member` items). The
    /// receiver sends its whole table only when its own fingerprint differs.
    Summary {
        /// The fingerprint (see the sync module of the node).
        fingerprint: u64,
    },
    /// Stands for the sender's progress in the request that opens an exchange: a
    /// fingerprint of every (origin, newest sequence number) pair it would have sent.
    /// The receiver sends its own progress only when its fingerprint differs.
    ProgressSummary {
        /// The fingerprint (see the sync module of the node).
        fingerprint: u64,
    },
}

/// Packs a node's table into as few sync datagrams of at most `max_datagram` bytes as
/// it fits in; `answer` asks the receiver for its own table in return, on the first
/// datagram only.
pub fn encode_sync(
    cluster: ClusterId,
    answer: bool,
    items: &[SyncItem],
    max_datagram: usize,
) -> Vec<Bytes> {
    let start = |answer: bool| {
        let mut out = Vec::with_capacity(max_datagram);
        write_header(&mut out, MessageKind::Sync, cluster);
        if answer {
            out[4] = FLAG_ANSWER;
        }
        out
    };
    let mut datagrams = Vec::new();
    // Only the first datagram asks for an answer: one answer per exchange.
    let mut out = start(answer);
    let mut encoded = Vec::new();
    for item in items {
        encoded.clear();
        append(item, &mut encoded);
        if out.len() + encoded.len() > max_datagram && out.len() > HEADER_LEN {
            datagrams.push(checksummed(std::mem::replace(&mut out, start(false))));
        }
        // An item that could never fit (an absurd zone name) is left out.
        if HEADER_LEN + encoded.len() <= max_datagram {
            out.extend_from_slice(&encoded);
        }
    }
    if out.len() > HEADER_LEN || datagrams.is_empty() {
        datagrams.push(checksummed(out));
    }
    datagrams
}

/// Decodes a sync body: the items it lists.
pub fn decode_sync(mut body: &[u8]) -> Result<Vec<SyncItem>, DecodeError> {
    let mut items = Vec::new();
    while !body.is_empty() {
        let (item, rest) =
            postcard::take_from_bytes::<SyncItem>(body).map_err(|_| DecodeError::Malformed)?;
        if matches!(item, SyncItem::Progress { last, .. } if last >= MAX_SEQ) {
            return Err(DecodeError::Malformed);
        }
        items.push(item);
        body = rest;
    }
    Ok(items)
}

/// Builds a discovery beacon announcing `advertise`.
pub fn encode_discover(cluster: ClusterId, advertise: SocketAddr) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + 24);
    write_header(&mut out, MessageKind::Discover, cluster);
    append(&advertise, &mut out);
    checksummed(out)
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

    /// A sealed datagram of `kind` with `body`.
    fn sealed(kind: MessageKind, cluster: ClusterId, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, kind, cluster);
        out.extend_from_slice(body);
        checksummed(out).to_vec()
    }

    /// `datagram` with byte `at` set to `value`, sealed again (a sender that means it).
    fn resealed(datagram: &[u8], at: usize, value: u8) -> Vec<u8> {
        let mut copy = datagram.to_vec();
        copy[at] = value;
        checksummed(copy).to_vec()
    }

    #[test]
    fn header_round_trips() {
        let cluster = ClusterId::from_name("prod");
        let out = sealed(MessageKind::Data, cluster, &[7]);
        let (header, body) = read_header(&out).unwrap();
        assert_eq!(header.kind, MessageKind::Data);
        assert_eq!(header.cluster, cluster);
        assert_eq!(body, [7]);
    }

    #[test]
    fn header_errors_are_specific() {
        let out = sealed(MessageKind::Data, ClusterId(1), &[]);
        assert_eq!(read_header(&out[..5]), Err(DecodeError::Truncated));
        assert_eq!(
            read_header(&resealed(&out, 0, b'X')),
            Err(DecodeError::BadMagic)
        );
        let old = resealed(&out, 2, 9);
        assert_eq!(read_header(&old), Err(DecodeError::UnsupportedVersion(9)));
        let unknown = resealed(&out, 3, 200);
        assert_eq!(read_header(&unknown), Err(DecodeError::UnknownKind(200)));
        let flagged = resealed(&out, 4, 0x80);
        assert_eq!(
            read_header(&flagged),
            Err(DecodeError::UnsupportedFlags(0x80))
        );
        let digest = sealed(MessageKind::Digest, ClusterId(1), &[]);
        assert!(
            read_header(&resealed(&digest, 4, FLAG_FORWARD)).is_ok(),
            "relays forward digests"
        );
        assert!(read_header(&resealed(&digest, 4, FLAG_COMPRESSED)).is_err());
        assert!(
            read_header(&resealed(&out, 4, RELAY_FLAGS)).is_ok(),
            "relays forward halves"
        );
        assert!(read_header(&resealed(&digest, 4, RELAY_FLAGS)).is_err());
        let membership = sealed(MessageKind::Membership, ClusterId(1), &[]);
        assert!(
            read_header(&resealed(&membership, 4, FLAG_RENEWAL)).is_ok(),
            "renewed nodes mark their announcements"
        );
        assert!(read_header(&resealed(&out, 4, FLAG_RENEWAL)).is_err());
        let ack = resealed(
            &sealed(MessageKind::Ack, ClusterId(1), &[]),
            4,
            FLAG_COMPRESSED,
        );
        assert_eq!(
            read_header(&ack),
            Err(DecodeError::UnsupportedFlags(FLAG_COMPRESSED))
        );
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
    fn sequence_numbers_near_the_limit_are_refused() {
        let mut encoded = Vec::new();
        encode_entry(&Invalidation::key("k"), false, &mut encoded);
        for (first_seq, ok) in [(MAX_SEQ - 1, true), (MAX_SEQ, false), (u64::MAX - 1, false)] {
            let info = BatchInfo {
                origin: NodeId(1),
                first_seq,
                count: 1,
            };
            let datagram = encode_batch(ClusterId(1), info, &encoded);
            let (_, body) = read_header(&datagram).unwrap();
            assert_eq!(decode_batch(body).is_ok(), ok, "first_seq {first_seq}");
        }
    }

    #[test]
    fn a_first_sequence_number_that_overflows_with_the_count_is_refused() {
        // Found by the `batch` fuzz target: first_seq u64::MAX - 8 plus a count of
        // about 2^32 wrapped past the limit check in release builds (and panicked in
        // debug builds).
        let body =
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x01\xf7\xff\xff\xf7\x22\xff\xf7\xd7\x7e";
        assert_eq!(decode_batch(body), Err(DecodeError::Malformed));
        let mut encoded = Vec::new();
        for _ in 0..3 {
            encode_entry(&Invalidation::key("k"), false, &mut encoded);
        }
        let info = BatchInfo {
            origin: NodeId(1),
            first_seq: u64::MAX - 1,
            count: 3,
        };
        let datagram = encode_batch(ClusterId(1), info, &encoded);
        let (_, body) = read_header(&datagram).unwrap();
        assert_eq!(decode_batch(body), Err(DecodeError::Malformed));
    }

    #[test]
    fn repetitive_keys_compress_into_fewer_datagrams() {
        let encoded: Vec<Vec<u8>> = (0..1000)
            .map(|i| {
                let mut out = Vec::new();
                encode_entry(
                    &Invalidation::key(format!("user:profile:{i:08}")),
                    false,
                    &mut out,
                );
                out
            })
            .collect();
        let slices: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        let plain = build_batches(ClusterId(1), NodeId(1), 1, &slices, 1400, false);
        let packed = build_batches(ClusterId(1), NodeId(1), 1, &slices, 1400, true);
        assert!(
            packed.len() * 2 <= plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
    }

    #[test]
    fn a_claimed_size_beyond_the_cap_is_refused_before_allocating() {
        let mut body = Vec::new();
        append(&(u32::MAX), &mut body);
        body.extend_from_slice(&[0; 8]);
        let header = Header {
            kind: MessageKind::Data,
            flags: FLAG_COMPRESSED,
            cluster: ClusterId(1),
        };
        assert_eq!(data_body(&header, &body), Err(DecodeError::Malformed));
    }

    #[test]
    fn a_datagram_damaged_on_the_way_is_refused() {
        let digest = Digest {
            origin: NodeId(4),
            last: 99,
            first: 3,
        };
        let sealed = encode_digest(ClusterId(1), digest);
        assert!(read_header(&sealed).is_ok());
        for at in [3, 5, HEADER_LEN, sealed.len() - 1] {
            let mut damaged = sealed.to_vec();
            damaged[at] ^= 0x10;
            assert_eq!(
                read_header(&damaged),
                Err(DecodeError::Corrupt),
                "byte {at}"
            );
        }
    }

    #[test]
    fn digests_and_gones_round_trip() {
        let digest = Digest {
            origin: NodeId(4),
            last: 99,
            first: 3,
        };
        let encoded = encode_digest(ClusterId(1), digest);
        let (_, body) = read_header(&encoded).unwrap();
        assert_eq!(decode_digest(body), Ok(digest));
        let backwards = Digest {
            first: 101,
            ..digest
        };
        let encoded = encode_digest(ClusterId(1), backwards);
        let (_, body) = read_header(&encoded).unwrap();
        assert_eq!(decode_digest(body), Err(DecodeError::Malformed));
        let gone = encode_gone(ClusterId(1), NodeId(4), 7);
        let (_, body) = read_header(&gone).unwrap();
        assert_eq!(decode_gone(body), Ok((NodeId(4), 7)));
        assert_eq!(decode_gone(&[]), Err(DecodeError::Malformed));
    }

    #[test]
    fn zone_digests_round_trip_and_refuse_what_does_not_add_up() {
        let budget = 1200;
        let ends: Vec<(NodeId, u64)> = (0..max_zone_digests(budget) as u64)
            .map(|i| (NodeId(u64::MAX - i), MAX_SEQ - 1 - i))
            .collect();
        let encoded = encode_zone_digests(ClusterId(1), &ends);
        assert!(
            encoded.len() <= budget,
            "worst case fits: {}",
            encoded.len()
        );
        let (header, body) = read_header(&encoded).unwrap();
        assert_eq!(header.kind, MessageKind::ZoneDigests);
        assert_eq!(decode_zone_digests(body), Ok(ends));
        let one = encode_zone_digests(ClusterId(1), &[(NodeId(3), 9)]);
        let (_, body) = read_header(&one).unwrap();
        assert_eq!(decode_zone_digests(body), Ok(vec![(NodeId(3), 9)]));
        let refused = [
            vec![0],          // no pair
            vec![200, 1, 1],  // more pairs claimed than bytes
            vec![1, 3],       // truncated pair
            vec![1, 3, 9, 0], // trailing byte
        ];
        for body in refused {
            assert_eq!(decode_zone_digests(&body), Err(DecodeError::Malformed));
        }
        let mut beyond = Vec::new();
        append(&1u32, &mut beyond);
        append(&(3u64, MAX_SEQ), &mut beyond);
        assert_eq!(decode_zone_digests(&beyond), Err(DecodeError::Malformed));
    }

    #[test]
    fn a_table_spans_several_syncs_and_round_trips() {
        use crate::identity::Zone;
        let mut items: Vec<SyncItem> = (0..100u16)
            .map(|i| {
                let member = Member {
                    id: NodeId(u64::from(i) << 40),
                    addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 7946)),
                    zone: Zone::new(format!("zone-{}", i % 3)).unwrap(),
                    generation: 1_700_000_000_000 + u64::from(i),
                };
                let state = [foca::State::Alive, foca::State::Suspect, foca::State::Down];
                SyncItem::Member(foca::Member::new(member, i % 5, state[usize::from(i % 3)]))
            })
            .collect();
        items.extend((0..50).map(|i| SyncItem::Progress {
            origin: NodeId(i << 50),
            last: i * 1000,
        }));
        let datagrams = encode_sync(ClusterId(9), true, &items, 500);
        assert!(datagrams.len() > 5, "{} datagrams", datagrams.len());
        let mut decoded = Vec::new();
        for (index, datagram) in datagrams.iter().enumerate() {
            assert!(datagram.len() <= 500);
            let (header, body) = read_header(datagram).unwrap();
            let flags = if index == 0 { FLAG_ANSWER } else { 0 };
            assert_eq!((header.kind, header.flags), (MessageKind::Sync, flags));
            decoded.extend(decode_sync(body).unwrap());
        }
        assert_eq!(decoded, items);
        let quiet = encode_sync(ClusterId(9), false, &items[..1], 500);
        let (header, body) = read_header(&quiet[0]).unwrap();
        assert_eq!(header.flags, 0);
        assert_eq!(decode_sync(body).unwrap(), items[..1]);
        assert_eq!(
            decode_sync(&body[..body.len() - 1]),
            Err(DecodeError::Malformed)
        );
        let absurd = SyncItem::Progress {
            origin: NodeId(1),
            last: MAX_SEQ,
        };
        let datagram = encode_sync(ClusterId(9), false, &[absurd], 500);
        let (_, body) = read_header(&datagram[0]).unwrap();
        assert_eq!(decode_sync(body), Err(DecodeError::Malformed));
    }

    #[test]
    fn discover_round_trips() {
        let addr: SocketAddr = "[::1]:7946".parse().unwrap();
        let datagram = encode_discover(ClusterId(3), addr);
        let (header, body) = read_header(&datagram).unwrap();
        assert_eq!(header.kind, MessageKind::Discover);
        assert_eq!(decode_discover(body), Ok(addr));
    }

    #[test]
    fn entry_len_counts_long_varints() {
        let mut entry = Invalidation::key("k".repeat(20_000));
        entry.region = Some("r".repeat(200));
        entry.vector_clock.0.insert("w".repeat(130), u64::MAX);
        entry.vector_clock.0.insert(String::new(), 0);
        let mut encoded = Vec::new();
        encode_entry(&entry, true, &mut encoded);
        assert_eq!(entry_len(&entry), encoded.len());
    }

    proptest! {
        #[test]
        fn entry_len_is_the_encoded_length(entry in arb_invalidation(), ack: bool) {
            let mut encoded = Vec::new();
            encode_entry(&entry, ack, &mut encoded);
            prop_assert_eq!(entry_len(&entry), encoded.len());
        }

        #[test]
        fn batches_round_trip(entries in proptest::collection::vec(arb_invalidation(), 1..20),
                              origin: u64, first_seq in 1u64..MAX_SEQ - 20) {
            let mut encoded = Vec::new();
            for (i, entry) in entries.iter().enumerate() {
                encode_entry(entry, i % 3 == 0, &mut encoded);
            }
            let info = BatchInfo { origin: NodeId(origin), first_seq, count: entries.len() as u32 };
            let datagram = encode_batch(ClusterId(5), info, &encoded);
            let (header, body) = read_header(&datagram).unwrap();
            prop_assert_eq!(header.kind, MessageKind::Data);
            let batch = decode_batch(body).unwrap();
            prop_assert_eq!(batch.origin, NodeId(origin));
            prop_assert_eq!(batch.first_seq, first_seq);
            let acks: Vec<bool> = batch.entries.iter().map(|e| e.ack).collect();
            let expected: Vec<bool> = (0..entries.len()).map(|i| i % 3 == 0).collect();
            prop_assert_eq!(acks, expected);
            let decoded: Vec<Invalidation> = batch.entries.into_iter().map(|e| e.invalidation).collect();
            prop_assert_eq!(decoded, entries);
        }

        #[test]
        fn built_batches_fit_and_decode_to_the_entries(
            entries in proptest::collection::vec(arb_invalidation(), 1..300),
            compress: bool,
        ) {
            let encoded: Vec<Vec<u8>> = entries.iter().map(|e| {
                let mut out = Vec::new();
                encode_entry(e, false, &mut out);
                out
            }).collect();
            let slices: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
            let datagrams = build_batches(ClusterId(1), NodeId(9), 5, &slices, 1400, compress);
            let mut decoded = Vec::new();
            let mut next_seq = 5;
            for datagram in &datagrams {
                prop_assert!(datagram.len() <= 1400);
                let (header, body) = read_header(datagram).unwrap();
                let body = data_body(&header, body).unwrap();
                let batch = decode_batch(&body).unwrap();
                prop_assert_eq!(batch.first_seq, next_seq);
                next_seq += batch.entries.len() as u64;
                decoded.extend(batch.entries.into_iter().map(|e| e.invalidation));
            }
            prop_assert_eq!(decoded, entries);
        }

        #[test]
        fn compressed_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let header = Header { kind: MessageKind::Data, flags: FLAG_COMPRESSED, cluster: ClusterId(1) };
            let _ = data_body(&header, &bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let body = read_header(&bytes).map_or(&bytes[..], |(_, body)| body);
            let _ = decode_batch(body);
            let _ = decode_discover(body);
            let _ = decode_ack(body);
            let _ = decode_repair(body);
            let _ = decode_digest(body);
            let _ = decode_gone(body);
            let _ = decode_sync(body);
        }

        #[test]
        fn acks_and_repairs_round_trip(node: u64, seqs in proptest::collection::vec(1u64.., 1..100),
                                       ranges in proptest::collection::vec((1u64..1000, 0u64..1000), 0..50)) {
            let ack = encode_ack(ClusterId(1), NodeId(node), &seqs);
            let (_, body) = read_header(&ack).unwrap();
            prop_assert_eq!(decode_ack(body).unwrap(), (NodeId(node), seqs));
            let ranges: Vec<(u64, u64)> = ranges.into_iter().map(|(from, len)| (from, from + len)).collect();
            let repair = encode_repair(ClusterId(1), NodeId(node), &ranges);
            let (_, body) = read_header(&repair).unwrap();
            prop_assert_eq!(decode_repair(body).unwrap(), (NodeId(node), ranges));
        }

        #[test]
        fn corrupted_batches_never_panic(entries in proptest::collection::vec(arb_invalidation(), 1..8),
                                         flip in any::<prop::sample::Index>(), value: u8) {
            let mut encoded = Vec::new();
            for entry in &entries {
                encode_entry(entry, true, &mut encoded);
            }
            let info = BatchInfo { origin: NodeId(1), first_seq: 1, count: entries.len() as u32 };
            let datagram = encode_batch(ClusterId(5), info, &encoded);
            let mut bytes = datagram.to_vec();
            let at = flip.index(bytes.len());
            bytes[at] = value;
            if let Ok((_, body)) = read_header(&bytes) {
                let _ = decode_batch(body);
            }
        }
    }
}
