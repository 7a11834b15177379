//! Membership datagrams on their way to foca: held to the member limit, and cleared of
//! updates foca already holds.
//!
//! foca finds the member an update is about by comparing its address with every
//! member's in turn. In a large cluster most updates are copies of news a node heard
//! already (each update is gossiped about a dozen times), so at a thousand members those
//! searches were the largest cost of a cluster forming or a partition healing. Copies are
//! dropped here, against an indexed view of foca's table, before foca searches for them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::ops::Range;

use foca::{Codec as _, Identity as _};
use tracing::{trace, warn};

use super::{Node, sync};
use crate::identity::{AddrKey, Member, NodeId};
use crate::swim_codec::SwimCodec;
use crate::wire;

/// How close to `max_members` the member table must be before membership datagrams
/// are checked against it: more than any one datagram can name.
const MEMBER_LIMIT_MARGIN: usize = 256;

/// Room left in a member table near `max_members`, and the addresses already in it.
pub(super) struct MemberRoom {
    left: usize,
    known: BTreeSet<SocketAddr>,
}

impl MemberRoom {
    /// Whether news about `addr` may reach foca: a known address always, a new one
    /// while room is left (which it then takes).
    pub(super) fn admit(&mut self, addr: SocketAddr) -> bool {
        if self.known.contains(&addr) {
            return true;
        }
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        self.known.insert(addr);
        true
    }
}

/// A sender's identity, as the key of the notices of it that were ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct NoticeSender {
    addr: AddrKey,
    generation: u64,
    id: NodeId,
}

impl NoticeSender {
    fn of(member: &Member) -> NoticeSender {
        NoticeSender {
            addr: AddrKey::from(member.addr),
            generation: member.generation,
            id: member.id,
        }
    }
}

/// What a membership datagram becomes before foca reads it.
enum Screened {
    /// Unchanged: nothing to cut, or a body foca should judge (and refuse) itself.
    AsIs,
    /// Updates were cut: past the member limit, or already held.
    Rewritten(Vec<u8>),
    /// From a new sender the member table has no room for.
    Refused,
}

/// A membership datagram taken apart: where its updates start and end, and each
/// update with the bytes it was read from.
struct Parsed {
    sender: Member,
    /// The sender says this node is down.
    says_down: bool,
    /// The message is a Feed: a sample of the members the sender holds live.
    feed: bool,
    head: Range<usize>,
    updates: Vec<(foca::Member<Member>, Range<usize>)>,
    tail: Range<usize>,
}

impl Parsed {
    /// Cuts the deaths of `forgotten` members; how many there were.
    fn cut_deaths_of(&mut self, forgotten: &BTreeSet<SocketAddr>) -> usize {
        let named = self.updates.len();
        self.updates.retain(|(update, _)| {
            update.state() != foca::State::Down || !forgotten.contains(&update.id().addr)
        });
        named - self.updates.len()
    }
}

impl Node {
    /// A membership datagram: screened, then read by foca. An announcement marked as a
    /// renewal (`flags`) is answered with a short sample of members: the renewed node
    /// announces itself to every member it held down (`Node::forget_downs`) and hears
    /// most of them answer directly, and it kept its table of the others.
    pub(super) fn receive_membership(&mut self, from: SocketAddr, flags: u8, body: &[u8]) {
        let rewritten;
        let body = match self.screen_membership(body) {
            Screened::AsIs => body,
            Screened::Rewritten(within) => {
                rewritten = within;
                &rewritten[..]
            }
            Screened::Refused => return,
        };
        self.outbox.short_feeds = flags & wire::FLAG_RENEWAL != 0;
        let outcome = self.drive_swim(|swim, out| swim.handle_data(body, out));
        self.outbox.short_feeds = false;
        if let Err(error) = outcome {
            trace!(peer = %from, %error, "membership message rejected");
            self.stats.dropped.membership += 1;
        }
    }

    /// Keeps membership news within `max_members` (a datagram from a new sender the
    /// table has no room for is refused; updates about new identities past the room
    /// left are cut) and cuts the updates foca already holds.
    fn screen_membership(&mut self, body: &[u8]) -> Screened {
        // Undecodable bodies go to foca as they are, which refuses and counts them.
        let Some(mut parsed) = parse_membership(body) else {
            return Screened::AsIs;
        };
        let mut room = self.member_room();
        if let Some(room) = room.as_mut()
            && !room.admit(parsed.sender.addr)
        {
            self.count_member_limit(1);
            return Screened::Refused;
        }
        if parsed.says_down
            && self.outnumbers_its_downs(&parsed.sender)
            && self.within_notice_grace(&parsed.sender)
        {
            self.stats.down_notices_ignored += 1;
            return Screened::Refused;
        }
        if parsed.updates.is_empty() {
            return Screened::AsIs;
        }
        let named = parsed.updates.len();
        if let Some(room) = room.as_mut() {
            parsed
                .updates
                .retain(|(member, _)| room.admit(member.id().addr));
            let cut = named - parsed.updates.len();
            if cut > 0 {
                self.count_member_limit(cut as u64);
            }
        }
        // A member forgotten at a renewal must not be taken as down again from a peer
        // still spreading the death, which this node would then spread itself.
        parsed.cut_deaths_of(&self.outbox.forgotten);
        // A member declared down and then forgotten by foca must not be held on the
        // word of a view taken before: no view older than `remove_down_after` is used.
        let max_age = self.config.membership.remove_down_after;
        self.table_view.refresh(self.now, &self.swim, max_age);
        let view = &self.table_view;
        view.warm(parsed.updates.iter().map(|(update, _)| &update.id().addr));
        let mut tie = ties(view.get(&parsed.sender.addr), &parsed.sender);
        // One search of the view per update serves both questions.
        let held: Vec<bool> = parsed
            .updates
            .iter()
            .map(|(update, _)| {
                let known = view.get(&update.id().addr);
                tie |= ties(known, update.id());
                // Updates about this node's address always go through: foca refutes them.
                update.id().addr != self.local.addr && sync::holds(known, update)
            })
            .collect();
        if tie {
            // foca settles a tie in favour of whichever identity it heard last, so its
            // entry may have moved away from the view's, and may move back within this
            // datagram: nothing is cut, and the view is taken again next time.
            self.table_view.forget();
        } else {
            let cut = held.iter().filter(|held| **held).count();
            let mut held = held.into_iter();
            parsed.updates.retain(|_| !held.next().unwrap_or(false));
            self.stats.member_updates_already_held += cut as u64;
        }
        if parsed.updates.len() == named {
            return Screened::AsIs;
        }
        Screened::Rewritten(rewrite(body, &parsed))
    }

    /// Whether a notice that this node is down, from `sender`, is to be ignored: the
    /// sender is not a live member here (this node holds it down, or holds a newer
    /// identity at its address), and this node holds more members live than down. That
    /// is a partition healing, seen from its larger side: both sides declared each other
    /// down, and if each acted on the other's notices every node of the cluster would
    /// renew its identity. The smaller side renews (it holds more down than live) and
    /// then forgets whom it held down, so the larger side keeps its identities.
    /// Notices from live members, and any notice when the sides are even, are acted on.
    fn outnumbers_its_downs(&self, sender: &Member) -> bool {
        let mut sender_live = false;
        let (mut live, mut down) = (0usize, 0usize);
        for member in self.swim.iter_membership_state() {
            if member.state() == foca::State::Down {
                down += 1;
            } else {
                live += 1;
                sender_live |= member.id() == sender;
            }
        }
        !sender_live && live > down
    }

    /// Whether a notice that this node is down, from `sender`, which the rule above
    /// would ignore, comes within the grace given a sender: two rounds of announcing
    /// to members held down (one every five `rejoin_interval`s) from its first one.
    /// At a heal the smaller side renews its identities within one such round (each of
    /// its nodes announces to members it holds down, and is told it is down), after
    /// which no notice comes from the identities it had. A sender still telling this
    /// node it is down after two rounds is not renewing: it holds this node down as
    /// this node holds it, each with more members live than down, and without this
    /// grace both would ignore the other until `remove_down_after`. Past the grace the
    /// notice is acted on: this node renews, and announces itself to the sender.
    fn within_notice_grace(&mut self, sender: &Member) -> bool {
        let now = self.now;
        let grace = self.config.membership.rejoin_interval * 10;
        let forget_after = self.config.membership.remove_down_after.max(grace);
        let notices = &mut self.ignored_notices;
        notices.retain(|_, first| now < *first + forget_after);
        let key = NoticeSender::of(sender);
        match notices.get(&key) {
            Some(first) => now < *first + grace,
            // Bounded like the member table; a sender past the bound gets no grace.
            None if notices.len() >= self.config.max_members => false,
            None => {
                notices.insert(key, now);
                true
            }
        }
    }

    /// Room left in the member table, and the addresses in it, once the table is
    /// close enough to `max_members` that one datagram could fill it; `None` before.
    pub(super) fn member_room(&self) -> Option<MemberRoom> {
        let held = self.swim.iter_membership_state().len();
        if held + MEMBER_LIMIT_MARGIN < self.config.max_members {
            return None;
        }
        let known = self
            .swim
            .iter_membership_state()
            .map(|member| member.id().addr)
            .chain([self.local.addr])
            .collect();
        Some(MemberRoom {
            left: self.config.max_members.saturating_sub(held),
            known,
        })
    }

    pub(super) fn count_member_limit(&mut self, refused: u64) {
        let dropped = &mut self.stats.dropped;
        dropped.member_limit += refused;
        if dropped.member_limit.is_power_of_two() {
            warn!(
                max_members = self.config.max_members,
                count = dropped.member_limit,
                "the member table is full: news about more nodes refused"
            );
        }
    }
}

/// Whether `member` ties with `known`, the identity the view holds at its address:
/// another identity of the same generation and id, which neither wins over the other
/// (forged, or a node misconfigured with another's id).
fn ties(known: Option<&foca::Member<Member>>, member: &Member) -> bool {
    known.is_some_and(|known| {
        let known = known.id();
        known != member && !known.win_addr_conflict(member) && !member.win_addr_conflict(known)
    })
}

/// Whether a membership datagram, as it goes on the wire, tells its receiver that
/// it is down.
pub(super) fn is_down_notice(datagram: &[u8]) -> bool {
    let Ok((header, body)) = crate::wire::read_header(datagram) else {
        return false;
    };
    header.kind == crate::wire::MessageKind::Membership
        && parse_membership(body).is_some_and(|parsed| parsed.says_down)
}

/// A membership message from foca without the deaths it carries of `forgotten`
/// members; `None` when it carries none (or does not decode, which foca's own
/// messages always do).
pub(crate) fn without_deaths_of(body: &[u8], forgotten: &BTreeSet<SocketAddr>) -> Option<Vec<u8>> {
    if forgotten.is_empty() {
        return None;
    }
    let mut parsed = parse_membership(body)?;
    (parsed.cut_deaths_of(forgotten) > 0).then(|| rewrite(body, &parsed))
}

/// Members a Feed keeps when it answers a renewed node's announcement. The renewed
/// node hears from each member it announced to, but an announcement or its answer may
/// be lost, and nothing announces again: a few members in each answer cover those
/// (at a thousand-node heal each member is named in about four of the 900 answers a
/// renewed node gets). Nine nodes healing from a split of seven and two at 5% loss
/// converged in 643 ms on average over 100 trials with four, 640 ms with whole Feeds
/// and 928 ms with none.
pub(crate) const RENEWAL_FEED_SAMPLE: usize = 4;

/// A Feed from foca cut to its first [`RENEWAL_FEED_SAMPLE`] members (foca draws them
/// at random); `None` for any other message, or a Feed already that short.
pub(crate) fn short_feed(body: &[u8]) -> Option<Vec<u8>> {
    let mut parsed = parse_membership(body)?;
    if !parsed.feed || parsed.updates.len() <= RENEWAL_FEED_SAMPLE {
        return None;
    }
    parsed.updates.truncate(RENEWAL_FEED_SAMPLE);
    Some(rewrite(body, &parsed))
}

/// How many members a membership message carries, if it is a Feed.
#[cfg(test)]
pub(crate) fn feed_len(body: &[u8]) -> Option<usize> {
    parse_membership(body)
        .filter(|parsed| parsed.feed)
        .map(|parsed| parsed.updates.len())
}

/// Reads a membership datagram as foca lays it out: a header, then (except in custom
/// broadcasts) a big-endian count of updates and the updates, then whatever follows.
/// `None` when any of it does not decode.
fn parse_membership(body: &[u8]) -> Option<Parsed> {
    let offset = |rest: &[u8]| body.len() - rest.len();
    let mut data = body;
    let header = SwimCodec::default().decode_header(&mut data).ok()?;
    let head = 0..offset(data);
    let mut parsed = Parsed {
        says_down: header.message == foca::Message::TurnUndead,
        feed: header.message == foca::Message::Feed,
        sender: header.src,
        head: head.clone(),
        updates: Vec::new(),
        tail: head.end..body.len(),
    };
    if data.len() < 2 || header.message == foca::Message::Broadcast {
        return Some(parsed);
    }
    let count = u16::from_be_bytes([data[0], data[1]]);
    data = &data[2..];
    // No update takes fewer than eight bytes: a count the data cannot hold reserves
    // nothing for it.
    parsed
        .updates
        .reserve(usize::from(count).min(data.len() / 8));
    for _ in 0..count {
        let start = offset(data);
        let member = SwimCodec::default().decode_member(&mut data).ok()?;
        parsed.updates.push((member, start..offset(data)));
    }
    parsed.tail = offset(data)..body.len();
    Some(parsed)
}

/// The datagram again with only the updates `parsed` kept, each as the bytes it came
/// in.
fn rewrite(body: &[u8], parsed: &Parsed) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[parsed.head.clone()]);
    // At most the count the datagram named, so it fits in the same two bytes.
    out.extend_from_slice(&(parsed.updates.len() as u16).to_be_bytes());
    for (_, bytes) in &parsed.updates {
        out.extend_from_slice(&body[bytes.clone()]);
    }
    out.extend_from_slice(&body[parsed.tail.clone()]);
    out
}

#[cfg(test)]
mod tests {
    use foca::State;

    use super::*;
    use crate::identity::Zone;

    fn member(port: u16) -> Member {
        Member {
            id: NodeId(u64::from(port)),
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            zone: Zone::default(),
            generation: 1,
        }
    }

    fn gossip(updates: &[foca::Member<Member>]) -> Vec<u8> {
        let header = foca::Header {
            src: member(1),
            src_incarnation: 0,
            dst: member(2),
            message: foca::Message::Gossip,
        };
        crate::swim_codec::encode_message(&header, Some(updates))
    }

    #[test]
    fn only_deaths_of_forgotten_members_are_cut_from_a_message() {
        let forgotten: BTreeSet<SocketAddr> = [member(5).addr].into();
        let updates = [
            foca::Member::down(member(5)),
            foca::Member::new(member(5), 3, State::Suspect),
            foca::Member::down(member(6)),
            foca::Member::alive(member(7)),
        ];
        let body = gossip(&updates);
        let cut = without_deaths_of(&body, &forgotten).unwrap();
        let kept: Vec<_> = parse_membership(&cut)
            .unwrap()
            .updates
            .into_iter()
            .map(|(update, _)| update)
            .collect();
        assert_eq!(kept, updates[1..]);
        // Nothing to cut, or nobody forgotten: the message goes as it is.
        assert_eq!(without_deaths_of(&gossip(&updates[1..]), &forgotten), None);
        assert_eq!(without_deaths_of(&body, &BTreeSet::new()), None);
    }
}
