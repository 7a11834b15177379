//! The glue between foca and the node: a foca runtime that collects what foca wants
//! done, for the node to turn into datagrams, timers and member events.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use foca::{NoCustomBroadcast, OwnedNotification, Runtime, Timer};
use rand_chacha::ChaCha8Rng;

use crate::identity::Member;
use crate::swim_codec::SwimCodec;
use crate::wire::{self, ClusterId, MessageKind};

pub(crate) type Swim = foca::Foca<Member, SwimCodec, ChaCha8Rng, NoCustomBroadcast>;

/// What one call into foca asked for.
#[derive(Debug)]
pub(crate) struct Outbox {
    cluster: ClusterId,
    pub(crate) datagrams: Vec<(SocketAddr, Bytes)>,
    pub(crate) timers: Vec<(Timer<Member>, Duration)>,
    pub(crate) notifications: Vec<OwnedNotification<Member>>,
    /// Members this node forgot it held down when it renewed its identity, whose
    /// deaths foca may still have queued (learning a member again does not replace
    /// them): they are cut from what foca sends, and from what it hears, until
    /// `remove_down_after` has passed or this node declares the member down again.
    pub(crate) forgotten: BTreeSet<SocketAddr>,
    /// Set while this node announces itself after renewing its identity: the
    /// announcements carry [`wire::FLAG_RENEWAL`] (see `Node::forget_downs`).
    pub(crate) renewal: bool,
    /// Set while foca reads an announcement that carries [`wire::FLAG_RENEWAL`]: the
    /// Feed foca answers with keeps only a few of its sample of members.
    pub(crate) short_feeds: bool,
}

impl Outbox {
    pub(crate) fn new(cluster: ClusterId) -> Outbox {
        Outbox {
            cluster,
            datagrams: Vec::new(),
            timers: Vec::new(),
            notifications: Vec::new(),
            forgotten: BTreeSet::new(),
            renewal: false,
            short_feeds: false,
        }
    }
}

impl Runtime<Member> for Outbox {
    fn notify(&mut self, notification: foca::Notification<'_, Member>) {
        self.notifications.push(notification.to_owned());
    }

    fn send_to(&mut self, to: Member, data: &[u8]) {
        let kept;
        let short = self
            .short_feeds
            .then(|| crate::node::short_feed(data))
            .flatten();
        let rewritten = short.or_else(|| crate::node::without_deaths_of(data, &self.forgotten));
        let data = match rewritten {
            Some(rewritten) => {
                kept = rewritten;
                &kept[..]
            }
            None => data,
        };
        let mut datagram = Vec::with_capacity(wire::HEADER_LEN + data.len());
        wire::write_header(&mut datagram, MessageKind::Membership, self.cluster);
        if self.renewal {
            datagram[wire::FLAGS_AT] = wire::FLAG_RENEWAL;
        }
        datagram.extend_from_slice(data);
        self.datagrams.push((to.addr, wire::checksummed(datagram)));
    }

    fn submit_after(&mut self, event: Timer<Member>, after: Duration) {
        self.timers.push((event, after));
    }
}
