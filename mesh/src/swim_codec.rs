//! foca's messages on the wire: postcard, with every member update padded to one
//! width.
//!
//! Why the padding: foca fills a message with queued updates by taking them off its
//! queue one by one until the message is exactly full, and puts back every update it
//! took but could not fit. With updates of varying lengths a message is almost never
//! exactly full, so every message sent walked the whole queue: while a thousand nodes
//! form a cluster each holds about a thousand updates, and that walk was two fifths of
//! the time the cluster took to form. With every update the same width, and the header
//! padded so that the room left after it is a whole number of updates, the message
//! fills exactly and foca stops at the last update that fits.
//!
//! Layout:
//! - header: the postcard header; then, for messages that carry updates, one byte
//!   `pad` and `pad` bytes of padding;
//! - member update: one byte `len`, then `len` bytes: the postcard update and its
//!   padding.
//!
//! The width is the longest update this node has encoded so far (plus its length
//! byte), and starts at the width of this node's own entry with the longest id (ids are
//! random 64-bit numbers, so half of them take the longest encoding). It only grows, so
//! updates queued before it grew are shorter, and a message holding them is filled the
//! slow way, which is still correct. Starting from nothing, the first updates a node
//! queued at a thousand-node boot were one byte short, and a third of the heap pops
//! foca made filling messages went to the messages that carried them; starting from
//! its own entry, a cluster whose zone names are as long as this node's has one width
//! throughout.

use bytes::{Buf, BufMut};
use foca::{Codec, Header, Message};

use crate::identity::{Member, NodeId};

/// Room to serialize one header: three identities (a ping request names a target)
/// with the longest zone names, and the message.
const SCRATCH: usize = 512;

/// The member-update codec of every node: see the module documentation.
#[derive(Debug, Default, Clone)]
pub(crate) struct SwimCodec {
    /// Bytes each update takes, length byte included; 0 until one is encoded.
    width: usize,
}

impl SwimCodec {
    /// The codec of the node `local`: its width starts at that of `local`'s entry with
    /// the longest id.
    pub(crate) fn for_node(local: &Member) -> SwimCodec {
        let widest = Member {
            id: NodeId(u64::MAX),
            ..local.clone()
        };
        let entry = foca::Member::new(widest, 0, foca::State::Alive);
        let mut codec = SwimCodec::default();
        // A member too long to encode leaves the width to grow from nothing, as before.
        let _ = codec.encode_member(&entry, &mut Vec::new());
        codec
    }

    /// Whether foca follows this message's header with a count of updates.
    fn carries_updates(message: &Message<Member>) -> bool {
        !matches!(
            message,
            Message::Announce | Message::TurnUndead | Message::Broadcast
        )
    }

    /// Padding that leaves room for whole updates after the header, the pad byte and
    /// foca's two-byte update count, out of `room` bytes left after the header.
    fn header_padding(&self, room: usize) -> usize {
        match (self.width, room.checked_sub(3)) {
            (0, _) | (_, None) => 0,
            (width, Some(for_updates)) => for_updates % width,
        }
    }
}

impl Codec<Member> for SwimCodec {
    type Error = postcard::Error;

    fn encode_header(
        &mut self,
        header: &Header<Member>,
        mut buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        let mut scratch = [0u8; SCRATCH];
        let encoded = postcard::to_slice(header, &mut scratch)?;
        put(&mut buf, encoded)?;
        if Self::carries_updates(&header.message) {
            // Below the width, which is at most 256 (see encode_member).
            let pad = self.header_padding(buf.remaining_mut());
            put_prefixed(&mut buf, &[], pad)?;
        }
        Ok(())
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<Member>, Self::Error> {
        let data = buf.chunk();
        let (header, rest) = postcard::take_from_bytes::<Header<Member>>(data)?;
        let mut used = data.len() - rest.len();
        if Self::carries_updates(&header.message) {
            used += 1 + take_prefixed(rest)?.len();
        }
        buf.advance(used);
        Ok(header)
    }

    fn encode_member(
        &mut self,
        member: &foca::Member<Member>,
        mut buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        let mut scratch = [0u8; SCRATCH];
        let encoded = postcard::to_slice(member, &mut scratch)?;
        // The length byte counts the update and its padding: at most 255.
        if encoded.len() > usize::from(u8::MAX) {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.width = self.width.max(1 + encoded.len());
        let padding = self.width - 1 - encoded.len();
        put_prefixed(&mut buf, encoded, padding)
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<foca::Member<Member>, Self::Error> {
        let entry = take_prefixed(buf.chunk())?;
        let (member, _padding) = postcard::take_from_bytes(entry)?;
        buf.advance(1 + entry.len());
        Ok(member)
    }
}

/// A whole message as foca lays it out: `header`, then, for messages that carry
/// them, the count of `updates` and the updates. For tests that forge messages.
#[cfg(test)]
pub(crate) fn encode_message(
    header: &Header<Member>,
    updates: Option<&[foca::Member<Member>]>,
) -> Vec<u8> {
    let mut codec = SwimCodec::default();
    let mut body = Vec::new();
    codec.encode_header(header, &mut body).unwrap();
    if let Some(updates) = updates {
        body.extend_from_slice(&(updates.len() as u16).to_be_bytes());
        for update in updates {
            codec.encode_member(update, &mut body).unwrap();
        }
    }
    body
}

/// Writes a length byte, `bytes` and `padding` zeros: the length counts both. The
/// caller keeps the total within 255.
fn put_prefixed(
    buf: &mut impl BufMut,
    bytes: &[u8],
    padding: usize,
) -> Result<(), postcard::Error> {
    let len = bytes.len() + padding;
    put(buf, &[len as u8])?;
    put(buf, bytes)?;
    put(buf, &[0; 255][..padding])
}

/// The bytes after a length byte, as many as it says.
fn take_prefixed(data: &[u8]) -> Result<&[u8], postcard::Error> {
    let (&len, rest) = data
        .split_first()
        .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
    rest.get(..usize::from(len))
        .ok_or(postcard::Error::DeserializeUnexpectedEnd)
}

/// Writes `bytes` if they fit: a full buffer is an error, not a panic.
fn put(buf: &mut impl BufMut, bytes: &[u8]) -> Result<(), postcard::Error> {
    if buf.remaining_mut() < bytes.len() {
        return Err(postcard::Error::SerializeBufferFull);
    }
    buf.put_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use std::num::{NonZeroU32, NonZeroUsize};

    use bytes::BufMut;
    use foca::{Codec, Header, Message, State};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::SwimCodec;
    use crate::identity::{Member, NodeId, Zone};
    use crate::membership::Outbox;
    use crate::wire::{self, ClusterId};

    /// Members whose encodings differ in length: IPv4 and IPv6 addresses, zone names
    /// of several lengths, small and large ids.
    fn member(i: u64) -> Member {
        let addr: SocketAddr = if i.is_multiple_of(3) {
            format!("[fd00::{i:x}]:7000").parse().unwrap()
        } else {
            SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 7000))
        };
        Member {
            id: NodeId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (i % 40)),
            addr,
            zone: Zone::new("z".repeat(1 + (i % 7) as usize)).unwrap(),
            generation: i,
        }
    }

    fn update(i: u64) -> foca::Member<Member> {
        foca::Member::new(member(i), (i * 37 % 400) as u16, State::Alive)
    }

    fn encoded(codec: &mut SwimCodec, update: &foca::Member<Member>) -> Vec<u8> {
        let mut buf = Vec::new();
        codec.encode_member(update, &mut buf).unwrap();
        buf
    }

    #[test]
    fn updates_decode_whatever_width_they_were_padded_to() {
        let mut codec = SwimCodec::default();
        let updates: Vec<_> = (1..40).map(update).collect();
        let mut buf = Vec::new();
        for update in &updates {
            codec.encode_member(update, &mut buf).unwrap();
        }
        let mut data = &buf[..];
        for update in &updates {
            assert_eq!(&codec.decode_member(&mut data).unwrap(), update);
        }
        assert!(data.is_empty());
        // Once the width has grown to the longest, every update takes that width.
        let widths: BTreeSet<usize> = updates
            .iter()
            .map(|update| encoded(&mut codec, update).len())
            .collect();
        assert_eq!(widths.len(), 1, "{widths:?}");
    }

    #[test]
    fn a_nodes_codec_starts_at_the_width_of_its_own_entry_with_the_longest_id() {
        let local = Member {
            id: NodeId(3),
            ..member(1)
        };
        let with_id = |id: u64| {
            let member = Member {
                id: NodeId(id),
                ..local.clone()
            };
            foca::Member::new(member, 0, State::Alive)
        };
        let mut codec = SwimCodec::for_node(&local);
        let first = encoded(&mut codec, &with_id(5)).len();
        assert_eq!(first, encoded(&mut codec, &with_id(u64::MAX - 1)).len());
        // A codec starting from nothing pads its first update to that update's length.
        let mut fresh = SwimCodec::default();
        assert!(encoded(&mut fresh, &with_id(5)).len() < first);
    }

    #[test]
    fn a_header_leaves_room_for_whole_updates() {
        let mut codec = SwimCodec::default();
        for i in 1..10 {
            encoded(&mut codec, &update(i));
        }
        let width = encoded(&mut codec, &update(1)).len();
        let messages = [
            Message::Ping(3),
            Message::Ack(200),
            Message::Gossip,
            Message::Feed,
            Message::PingReq {
                target: member(6),
                probe_number: 1,
            },
        ];
        for limit in (120..1400).step_by(37) {
            for message in messages.clone() {
                let header = Header {
                    src: member(1),
                    src_incarnation: 2,
                    dst: member(3),
                    message,
                };
                let mut buf = Vec::with_capacity(limit).limit(limit);
                codec.encode_header(&header, &mut buf).unwrap();
                // foca writes a two-byte count of updates, then the updates.
                assert_eq!((buf.remaining_mut() - 2) % width, 0, "limit {limit}");
                let data = buf.into_inner();
                let mut rest = &data[..];
                assert_eq!(codec.decode_header(&mut rest).unwrap(), header);
                assert!(rest.is_empty());
            }
        }
        // Messages without updates are not padded.
        let announce = Header {
            src: member(1),
            src_incarnation: 0,
            dst: member(2),
            message: Message::Announce,
        };
        let mut buf = Vec::new();
        codec.encode_header(&announce, &mut buf).unwrap();
        assert_eq!(buf, postcard::to_allocvec(&announce).unwrap());
    }

    /// The lengths of the messages foca sends to gossip a queue of updates far longer
    /// than one message holds.
    fn gossip_lengths<C>(codec: C, max_packet: usize) -> Vec<usize>
    where
        C: Codec<Member, Error = postcard::Error>,
    {
        let mut config = foca::Config::new_lan(NonZeroU32::new(100).unwrap());
        config.max_packet_size = NonZeroUsize::new(max_packet).unwrap();
        let rng = ChaCha8Rng::seed_from_u64(5);
        let mut swim = foca::Foca::new(member(1000), config, rng, codec);
        let mut outbox = Outbox::new(ClusterId::from_name("test"));
        swim.apply_many((1..200).map(update), true, &mut outbox)
            .unwrap();
        assert!(swim.updates_backlog() > 100);
        outbox.datagrams.clear();
        swim.gossip(&mut outbox).unwrap();
        let lengths: Vec<usize> = outbox
            .datagrams
            .iter()
            .map(|(_, datagram)| datagram.len() - wire::HEADER_LEN)
            .collect();
        assert!(!lengths.is_empty());
        lengths
    }

    #[test]
    fn a_long_queue_fills_each_message_exactly() {
        for max_packet in [512, 1000, 1400] {
            let lengths = gossip_lengths(SwimCodec::default(), max_packet);
            assert!(lengths.iter().all(|len| *len == max_packet), "{lengths:?}");
            // Without the padding, messages end short of full: foca then takes every
            // queued update off its queue and puts it back, for each message.
            let plain = gossip_lengths(foca::PostcardCodec, max_packet);
            assert!(plain.iter().any(|len| *len < max_packet), "{plain:?}");
        }
    }

    #[test]
    fn malformed_updates_and_headers_are_errors() {
        let mut codec = SwimCodec::default();
        let good = encoded(&mut codec, &update(4));
        let cases: [&[u8]; 4] = [
            &[],
            // A length past the end.
            &[200, 1, 2, 3],
            // An empty entry.
            &[0, 1, 2],
            // An entry too short for its update.
            &[3, good[1], good[2], good[3]],
        ];
        for case in cases {
            let mut data = case;
            assert!(codec.decode_member(&mut data).is_err(), "{case:?}");
        }
        let header = Header {
            src: member(1),
            src_incarnation: 0,
            dst: member(2),
            message: Message::Ping(1),
        };
        let plain = postcard::to_allocvec(&header).unwrap();
        // No pad byte, then a pad byte promising more than there is.
        let mut data = &plain[..];
        assert!(codec.decode_header(&mut data).is_err());
        let mut promised = plain.clone();
        promised.extend_from_slice(&[5, 0, 0]);
        let mut data = &promised[..];
        assert!(codec.decode_header(&mut data).is_err());
    }
}
