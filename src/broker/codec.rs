//! The payload every broker bus sends. Versioned, LZ4-compressed when that saves
//! bytes, and decoded as untrusted input: sizes are checked before anything is
//! allocated, and nothing in here can panic.
//!
//! ```text
//! 0      2         3       4                      12
//! | "SQ" | version | flags | sequence (u64, LE)   | body (LZ4 block with a u32 LE
//!                                                    size prefix when flags & 1)
//! ```
//!
//! The sequence numbers a sender's broadcasts 1, 2, 3, ... in the order it sends them
//! (0 on messages to one instance), so a receiver notices one the broker or its client
//! dropped. The body is a postcard [`Envelope`]: who sent it (node id and zone), and a
//! batch of entries, acknowledgements, or a presence beacon.

use serde::{Deserialize, Serialize};
use syncbus_mesh::{Invalidation, InvalidationKind, NodeId, Scope, VectorClock, Zone};

const MAGIC: [u8; 2] = *b"SQ";
const VERSION: u8 = 2;
const FLAG_LZ4: u8 = 0x01;
const HEADER_LEN: usize = 12;
/// Bodies shorter than this are sent as they are: LZ4 rarely saves anything on them.
const COMPRESS_FROM: usize = 256;

/// One message between bus instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) node: NodeId,
    pub(crate) zone: String,
    pub(crate) body: Body,
}

/// What a message carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Body {
    /// Invalidations and lease revocations.
    Batch(Vec<Entry>),
    /// The sender applied the entries that asked for these acknowledgement ids.
    Ack(Vec<u64>),
    /// The sender is alive; peers count it for acknowledgement goals.
    Presence,
    /// The sender is shutting down.
    Leaving,
}

/// One invalidation on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) kind: InvalidationKind,
    pub(crate) key: String,
    pub(crate) region: Option<String>,
    pub(crate) scope: Scope,
    pub(crate) clock: VectorClock,
    /// Set when the publisher awaits acknowledgements: the id to acknowledge.
    pub(crate) ack: Option<u64>,
}

impl Entry {
    pub(crate) fn new(invalidation: Invalidation, ack: Option<u64>) -> Entry {
        Entry {
            kind: invalidation.kind,
            key: invalidation.key,
            region: invalidation.region,
            scope: invalidation.scope,
            clock: invalidation.vector_clock,
            ack,
        }
    }
}

/// Why a payload was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PayloadError {
    Truncated,
    BadMagic,
    UnsupportedVersion,
    Oversize,
    Malformed,
}

/// Encodes `envelope`, compressed when that is smaller.
pub(crate) fn encode(envelope: &Envelope) -> Vec<u8> {
    // Serialising plain structs of strings and integers into a Vec cannot fail.
    let body = postcard::to_allocvec(envelope).unwrap_or_default();
    frame(body)
}

/// Like `encode`, but refuses (with the size) an envelope whose body, uncompressed,
/// is larger than `max`: receivers refuse those, however well they compress.
pub(crate) fn encode_within(envelope: &Envelope, max: usize) -> Result<Vec<u8>, usize> {
    let body = postcard::to_allocvec(envelope).unwrap_or_default();
    if body.len() > max {
        return Err(body.len());
    }
    Ok(frame(body))
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    if body.len() >= COMPRESS_FROM {
        let packed = lz4_flex::block::compress_prepend_size(&body);
        if packed.len() < body.len() {
            out.push(FLAG_LZ4);
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&packed);
            return out;
        }
    }
    out.push(0);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&body);
    out
}

/// Writes the sender's sequence number into an encoded payload.
pub(crate) fn stamp(payload: &mut [u8], seq: u64) {
    if let Some(slot) = payload.get_mut(4..HEADER_LEN) {
        slot.copy_from_slice(&seq.to_le_bytes());
    }
}

/// Decodes a payload of at most `max_len` bytes, compressed or not: the envelope, and
/// the sender's sequence number (0 for messages to one instance).
pub(crate) fn decode(payload: &[u8], max_len: usize) -> Result<(Envelope, u64), PayloadError> {
    if payload.len() > max_len {
        return Err(PayloadError::Oversize);
    }
    let Some((head, body)) = payload.split_first_chunk::<HEADER_LEN>() else {
        return Err(PayloadError::Truncated);
    };
    if head[..2] != MAGIC {
        return Err(PayloadError::BadMagic);
    }
    if head[2] != VERSION {
        return Err(PayloadError::UnsupportedVersion);
    }
    let mut seq = [0; 8];
    seq.copy_from_slice(&head[4..HEADER_LEN]);
    let seq = u64::from_le_bytes(seq);
    let unpacked;
    let body = match head[3] {
        0 => body,
        FLAG_LZ4 => {
            let Some((size, block)) = body.split_first_chunk::<4>() else {
                return Err(PayloadError::Truncated);
            };
            let size = u32::from_le_bytes(*size) as usize;
            // Checked before the buffer is allocated.
            if size > max_len {
                return Err(PayloadError::Oversize);
            }
            unpacked =
                lz4_flex::block::decompress(block, size).map_err(|_| PayloadError::Malformed)?;
            &unpacked[..]
        }
        _ => return Err(PayloadError::Malformed),
    };
    match postcard::from_bytes::<Envelope>(body) {
        Ok(envelope) if Zone::new(envelope.zone.clone()).is_ok() => Ok((envelope, seq)),
        _ => Err(PayloadError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(keys: usize) -> Envelope {
        let entries = (0..keys)
            .map(|i| {
                let mut invalidation = Invalidation::key(format!("user:{i:08}"));
                invalidation.region = Some("eu".into());
                Entry::new(invalidation, (i % 2 == 0).then_some(i as u64))
            })
            .collect();
        Envelope {
            node: NodeId(7),
            zone: "z1".into(),
            body: Body::Batch(entries),
        }
    }

    #[test]
    fn small_and_large_payloads_round_trip_and_large_ones_shrink() {
        for keys in [1, 500] {
            let envelope = batch(keys);
            let mut payload = encode(&envelope);
            assert_eq!(decode(&payload, 1 << 20), Ok((envelope.clone(), 0)));
            stamp(&mut payload, 42);
            assert_eq!(decode(&payload, 1 << 20), Ok((envelope, 42)));
            assert_eq!(payload[3], if keys == 1 { 0 } else { FLAG_LZ4 });
        }
        let ack = Envelope {
            body: Body::Ack(vec![1, 2, 3]),
            ..batch(0)
        };
        assert_eq!(decode(&encode(&ack), 1 << 20), Ok((ack, 0)));
    }

    #[test]
    fn bad_payloads_are_named_errors() {
        let payload = encode(&batch(500));
        assert_eq!(
            decode(&payload[..11], 1 << 20),
            Err(PayloadError::Truncated)
        );
        assert_eq!(
            decode(b"XX\x02\x00\0\0\0\0\0\0\0\0", 1 << 20),
            Err(PayloadError::BadMagic)
        );
        assert_eq!(
            decode(b"SQ\x09\x00\0\0\0\0\0\0\0\0", 1 << 20),
            Err(PayloadError::UnsupportedVersion)
        );
        assert_eq!(decode(&payload, 100), Err(PayloadError::Oversize));
        // A compressed body that claims to unpack to 4 GiB is refused before allocating.
        let mut claim = payload.clone();
        claim[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&claim, 1 << 20), Err(PayloadError::Oversize));
        let mut cut = payload.clone();
        cut.truncate(payload.len() - 10);
        assert_eq!(decode(&cut, 1 << 20), Err(PayloadError::Malformed));
        let bad_zone = Envelope {
            zone: "has space".into(),
            ..batch(1)
        };
        assert_eq!(
            decode(&encode(&bad_zone), 1 << 20),
            Err(PayloadError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = decode(&bytes, 1 << 20);
            let mut compressed = b"SQ\x02\x01\0\0\0\0\0\0\0\0".to_vec();
            compressed.extend_from_slice(&bytes);
            let _ = decode(&compressed, 1 << 20);
        }
    }
}
