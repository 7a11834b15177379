//! The mesh node: a sans-IO state machine.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use bytes::Bytes;
use foca::{Identity as _, OwnedNotification, PostcardCodec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tracing::{debug, trace, warn};

use crate::config::NodeConfig;
use crate::error::{ConfigError, DecodeError, PublishError};
use crate::event::{Delivery, Event, Published, Stats, Transmit};
use crate::identity::{Member, NodeId, Zone};
use crate::invalidation::{Invalidation, InvalidationKind};
use crate::membership::{Outbox, Swim};
use crate::origins::{Origins, Receipt};
use crate::time::Instant;
use crate::timers::{Timers, Wake};
use crate::wire::{self, ClusterId, MessageKind};

/// Leave messages go straight to this many members at most; gossip carries them on.
const MAX_LEAVE_FANOUT: usize = 64;

/// The size limits an invalidation must meet, derived from a [`NodeConfig`].
///
/// Drivers can check a publish with these before handing it to the node's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest key accepted.
    pub max_key_len: usize,
    /// Longest encoded entry (key, region, vector clock) that fits in one datagram.
    pub max_entry_len: usize,
}

impl Limits {
    /// The limits that `config` implies.
    pub fn new(config: &NodeConfig) -> Limits {
        Limits {
            max_key_len: config.max_key_len,
            max_entry_len: wire::max_entry_len(config.max_datagram_size),
        }
    }

    /// `Ok` when `invalidation` can be published under these limits.
    pub fn check(&self, invalidation: &Invalidation) -> Result<(), PublishError> {
        let len = invalidation.key.len();
        if len > self.max_key_len {
            return Err(PublishError::KeyTooLarge {
                len,
                max: self.max_key_len,
            });
        }
        let mut encoded = Vec::with_capacity(len + 16);
        wire::encode_entry(invalidation, &mut encoded);
        if encoded.len() > self.max_entry_len {
            return Err(PublishError::KeyTooLarge {
                len: encoded.len(),
                max: self.max_entry_len,
            });
        }
        Ok(())
    }
}

/// One mesh node, without I/O.
///
/// The node never reads a clock, opens a socket or draws entropy of its own: the driver
/// feeds it datagrams and the time, and carries out what it asks. Same inputs, same
/// outputs.
///
/// # Driving a node
///
/// Inputs, each taking the current time where it matters:
/// - [`handle_packet`](Self::handle_packet) for every datagram received;
/// - [`handle_timeout`](Self::handle_timeout) once [`poll_timeout`](Self::poll_timeout)'s
///   instant is reached;
/// - [`publish`](Self::publish) and [`leave`](Self::leave) from the application.
///
/// After any input, drain the outputs in this order:
/// 1. [`poll_transmit`](Self::poll_transmit) until `None`, sending each datagram
///    (this is also when pending publishes are packed into batches, so draining after a
///    run of publishes sends them together);
/// 2. [`poll_event`](Self::poll_event) until `None`;
/// 3. [`poll_timeout`](Self::poll_timeout), to know when to call `handle_timeout` next.
pub struct Node {
    local: Member,
    cluster: ClusterId,
    config: NodeConfig,
    limits: Limits,
    swim: Swim,
    swim_config: foca::Config,
    outbox: Outbox,
    /// Live members by address (never this node).
    members: BTreeMap<SocketAddr, Member>,
    /// Zones of live members by id, for tagging deliveries.
    zones: BTreeMap<NodeId, Zone>,
    origins: Origins,
    pending: Vec<Invalidation>,
    pending_index: BTreeMap<(InvalidationKind, String), usize>,
    next_seq: u64,
    timers: Timers,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    left: bool,
}

impl Node {
    /// Starts a node at `now`. It announces itself to its seeds on the first
    /// [`handle_timeout`](Self::handle_timeout), which [`poll_timeout`](Self::poll_timeout)
    /// asks for at once.
    pub fn new(config: NodeConfig, now: Instant) -> Result<Node, ConfigError> {
        config.validate()?;
        let local = Member {
            id: config.node_id,
            addr: config.advertise,
            zone: config.zone.clone(),
            generation: config.generation,
        };
        let cluster = ClusterId::from_name(&config.cluster);
        let swim_config = config
            .membership
            .to_foca(config.max_datagram_size - wire::HEADER_LEN);
        let rng = ChaCha8Rng::seed_from_u64(config.rng_seed);
        let swim = Swim::new(local.clone(), swim_config.clone(), rng, PostcardCodec);
        let mut timers = Timers::default();
        timers.set(now, Wake::Rejoin);
        Ok(Node {
            limits: Limits::new(&config),
            origins: Origins::new(config.max_origins),
            local,
            cluster,
            config,
            swim,
            swim_config,
            outbox: Outbox::new(cluster),
            members: BTreeMap::new(),
            zones: BTreeMap::new(),
            pending: Vec::new(),
            pending_index: BTreeMap::new(),
            next_seq: 1,
            timers,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            left: false,
        })
    }

    /// This node as members see it.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// The live members this node knows, itself excluded, ordered by address.
    pub fn members(&self) -> impl ExactSizeIterator<Item = &Member> {
        self.members.values()
    }

    /// The size limits publishes must meet.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Counters since the node started.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// True once [`leave`](Self::leave) was called.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Queues an invalidation for every member and for local subscribers.
    ///
    /// The local delivery is queued at once as an [`Event::Delivered`]; the datagrams go
    /// out with the next [`poll_transmit`](Self::poll_transmit). A key already waiting to
    /// be sent coalesces with the waiting entry.
    pub fn publish(&mut self, invalidation: Invalidation) -> Result<Published, PublishError> {
        if self.left {
            return Err(PublishError::Closed);
        }
        self.limits.check(&invalidation)?;
        let slot = (invalidation.kind, invalidation.key.clone());
        if let Some(&index) = self.pending_index.get(&slot) {
            self.pending[index] = invalidation;
            self.stats.coalesced += 1;
            return Ok(Published::Coalesced);
        }
        self.events.push_back(Event::Delivered(Delivery {
            origin: self.local.id,
            zone: Some(self.local.zone.clone()),
            invalidation: invalidation.clone(),
        }));
        self.pending_index.insert(slot, self.pending.len());
        self.pending.push(invalidation);
        self.stats.published += 1;
        Ok(Published::Queued)
    }

    /// Feeds one received datagram to the node. Anything invalid is dropped and counted
    /// in [`Stats::dropped`]; nothing here can fail or panic.
    pub fn handle_packet(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        if self.left {
            self.stats.dropped.after_leave += 1;
            return;
        }
        if datagram.len() > self.config.max_datagram_size {
            self.stats.dropped.oversize += 1;
            return;
        }
        let (header, body) = match wire::read_header(datagram) {
            Ok(parts) => parts,
            Err(error) => return self.count_decode_error(from, error),
        };
        if header.cluster != self.cluster {
            trace!(peer = %from, "dropped datagram from another cluster");
            self.stats.dropped.wrong_cluster += 1;
            return;
        }
        match header.kind {
            MessageKind::Membership => self.receive_membership(now, from, body),
            MessageKind::Data => self.receive_batch(now, from, body),
            MessageKind::Discover => self.receive_discover(now, from, body),
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.left {
            return;
        }
        while let Some(wake) = self.timers.pop_due(now) {
            match wake {
                Wake::Swim(timer) => {
                    if let Err(error) =
                        self.drive_swim(now, |swim, out| swim.handle_timer(timer, out))
                    {
                        debug!(%error, "membership timer failed");
                    }
                }
                Wake::Rejoin => self.rejoin(now),
                Wake::GapCheck => self.give_up_expired_gaps(now),
            }
        }
    }

    /// Leaves the cluster: sends what is pending, then tells members this node is gone
    /// so they see it leave at once instead of after failure detection. Afterwards the
    /// node drops every datagram and refuses publishes; drain
    /// [`poll_transmit`](Self::poll_transmit) to send the goodbyes.
    pub fn leave(&mut self, now: Instant) {
        if self.left {
            return;
        }
        self.flush();
        let mut config = self.swim_config.clone();
        let fanout = self.members.len().clamp(1, MAX_LEAVE_FANOUT);
        config.num_indirect_probes =
            std::num::NonZeroUsize::new(fanout).unwrap_or(config.num_indirect_probes);
        if self.swim.set_config(config).is_err() {
            warn!("could not widen the leave fan-out; gossip will spread the leave");
        }
        self.left = true;
        if let Err(error) = self.drive_swim(now, |swim, out| swim.leave_cluster(out)) {
            warn!(%error, "leaving the cluster failed; peers will detect the departure");
        }
        self.timers.clear();
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.transmits.is_empty() && !self.pending.is_empty() {
            self.flush();
        }
        self.transmits.pop_front()
    }

    /// The next event for the driver, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next; `None` once the node
    /// has left.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// A multicast discovery beacon announcing this node, for drivers that do discovery.
    /// Nodes that receive it announce themselves to this node.
    pub fn discovery_beacon(&self) -> Bytes {
        wire::encode_discover(self.cluster, self.local.addr)
    }

    fn count_decode_error(&mut self, from: SocketAddr, error: DecodeError) {
        trace!(peer = %from, %error, "dropped undecodable datagram");
        let dropped = &mut self.stats.dropped;
        match error {
            DecodeError::Truncated => dropped.truncated += 1,
            DecodeError::BadMagic => dropped.bad_magic += 1,
            DecodeError::UnsupportedVersion(_) => dropped.unsupported_version += 1,
            DecodeError::UnknownKind(_) | DecodeError::UnsupportedFlags(_) => {
                dropped.unsupported_kind += 1;
            }
            DecodeError::Malformed => dropped.malformed += 1,
        }
    }

    fn receive_membership(&mut self, now: Instant, from: SocketAddr, body: &[u8]) {
        if let Err(error) = self.drive_swim(now, |swim, out| swim.handle_data(body, out)) {
            trace!(peer = %from, %error, "membership message rejected");
            self.stats.dropped.membership += 1;
        }
    }

    fn receive_batch(&mut self, now: Instant, from: SocketAddr, body: &[u8]) {
        let batch = match wire::decode_batch(body) {
            Ok(batch) => batch,
            Err(error) => return self.count_decode_error(from, error),
        };
        if batch.origin == self.local.id {
            self.stats.dropped.own += 1;
            return;
        }
        let zone = self.zones.get(&batch.origin).cloned();
        let (stream, evicted) = self.origins.stream(batch.origin, batch.first_seq, now);
        for (seq, invalidation) in (batch.first_seq..).zip(batch.entries) {
            match stream.receive(seq, now) {
                Receipt::Duplicate => self.stats.duplicates += 1,
                Receipt::New => {
                    self.stats.received += 1;
                    self.events.push_back(Event::Delivered(Delivery {
                        origin: batch.origin,
                        zone: zone.clone(),
                        invalidation,
                    }));
                }
            }
        }
        let overflowing = stream.entries_past_gap() as u64 > self.config.reorder_window;
        let deadline = stream.gap_deadline(self.config.gap_timeout);
        if overflowing {
            let missed = stream.give_up_gaps();
            self.raise_resync(batch.origin, missed);
        } else if let Some(deadline) = deadline {
            self.schedule_gap_check(deadline);
        }
        if evicted {
            self.stats.origins_evicted += 1;
        }
    }

    fn receive_discover(&mut self, now: Instant, from: SocketAddr, body: &[u8]) {
        let addr = match wire::decode_discover(body) {
            Ok(addr) => addr,
            Err(error) => return self.count_decode_error(from, error),
        };
        if addr == self.local.addr || self.members.contains_key(&addr) {
            return;
        }
        debug!(peer = %addr, "discovered a node by multicast");
        self.announce_to(now, addr);
    }

    fn rejoin(&mut self, now: Instant) {
        if self.members.is_empty() {
            for seed in self.config.seeds.clone() {
                if seed != self.local.addr {
                    self.announce_to(now, seed);
                }
            }
        }
        self.timers
            .set(now + self.config.membership.rejoin_interval, Wake::Rejoin);
    }

    fn announce_to(&mut self, now: Instant, addr: SocketAddr) {
        let seed = Member::seed(addr);
        if let Err(error) = self.drive_swim(now, |swim, out| swim.announce(seed, out)) {
            debug!(peer = %addr, %error, "announce failed");
        }
    }

    fn schedule_gap_check(&mut self, deadline: Instant) {
        if self.timers.gap_check_at().is_none_or(|at| at > deadline) {
            self.timers.set(deadline, Wake::GapCheck);
        }
    }

    fn give_up_expired_gaps(&mut self, now: Instant) {
        for (origin, missed) in self.origins.expire(now, self.config.gap_timeout) {
            self.raise_resync(origin, missed);
        }
        if let Some(deadline) = self.origins.next_gap_deadline(self.config.gap_timeout) {
            self.schedule_gap_check(deadline);
        }
    }

    fn raise_resync(&mut self, origin: NodeId, missed: u64) {
        if missed == 0 {
            return;
        }
        warn!(%origin, missed, "invalidations lost; subscribers must resync");
        self.stats.resyncs += 1;
        self.stats.missed += missed;
        self.events.push_back(Event::Resync { origin, missed });
    }

    /// Packs every pending invalidation into as few datagrams as fit and queues a copy
    /// of each for every live member.
    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.pending_index.clear();
        let budget = self.limits.max_entry_len;
        let mut body = Vec::with_capacity(budget);
        let mut first = self.next_seq;
        let mut count: u32 = 0;
        for invalidation in &pending {
            let start = body.len();
            wire::encode_entry(invalidation, &mut body);
            if body.len() > budget && count > 0 {
                let overflow = body.split_off(start);
                self.send_batch(first, count, &body);
                first += u64::from(count);
                body = overflow;
                count = 0;
            }
            count += 1;
        }
        if count > 0 {
            self.send_batch(first, count, &body);
        }
        self.next_seq = first + u64::from(count);
    }

    fn send_batch(&mut self, first_seq: u64, count: u32, body: &[u8]) {
        let datagram = wire::encode_batch(self.cluster, self.local.id, first_seq, count, body);
        let targets: Vec<SocketAddr> = self.members.keys().copied().collect();
        for destination in targets {
            self.queue_transmit(destination, datagram.clone());
        }
    }

    fn queue_transmit(&mut self, destination: SocketAddr, payload: Bytes) {
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += payload.len() as u64;
        self.transmits.push_back(Transmit {
            destination,
            payload,
        });
    }

    /// Runs one foca operation and carries out what it asked for.
    fn drive_swim<F>(&mut self, now: Instant, operation: F) -> Result<(), foca::Error>
    where
        F: FnOnce(&mut Swim, &mut Outbox) -> Result<(), foca::Error>,
    {
        let result = operation(&mut self.swim, &mut self.outbox);
        for (destination, payload) in std::mem::take(&mut self.outbox.datagrams) {
            self.queue_transmit(destination, payload);
        }
        for (timer, after) in std::mem::take(&mut self.outbox.timers) {
            self.timers.set(now + after, Wake::Swim(timer));
        }
        for notification in std::mem::take(&mut self.outbox.notifications) {
            self.apply_notification(notification);
        }
        result
    }

    fn apply_notification(&mut self, notification: OwnedNotification<Member>) {
        match notification {
            OwnedNotification::MemberUp(member) => self.member_up(member),
            OwnedNotification::MemberDown(member) => self.member_down(&member),
            OwnedNotification::Rename(before, after) => {
                let active = self.swim.iter_members().any(|m| m.id() == &after);
                if before.id == after.id && self.members.contains_key(&before.addr) && active {
                    // The same process renewed its identity: nothing changed for users.
                    self.members.insert(after.addr(), after);
                    return;
                }
                self.member_down(&before);
                if active {
                    self.member_up(after);
                }
            }
            OwnedNotification::Active => debug!("joined the cluster"),
            OwnedNotification::Idle => debug!("no live members left"),
            // Leaving declares this node down on purpose.
            OwnedNotification::Defunct if self.left => debug!("left the cluster"),
            OwnedNotification::Defunct => warn!("declared down by the cluster"),
            OwnedNotification::Rejoin(member) => {
                debug!(
                    generation = member.generation,
                    "rejoined with a renewed identity"
                );
                self.local = member;
            }
        }
    }

    fn member_up(&mut self, member: Member) {
        if self.members.get(&member.addr) == Some(&member) {
            return;
        }
        debug!(peer = %member.addr, zone = %member.zone, id = %member.id, "member up");
        if let Some(replaced) = self.members.insert(member.addr, member.clone()) {
            self.zones.remove(&replaced.id);
            self.events.push_back(Event::MemberDown(replaced));
        }
        self.zones.insert(member.id, member.zone.clone());
        self.events.push_back(Event::MemberUp(member));
    }

    fn member_down(&mut self, member: &Member) {
        if self.members.get(&member.addr) != Some(member) {
            return;
        }
        debug!(peer = %member.addr, zone = %member.zone, id = %member.id, "member down");
        self.members.remove(&member.addr);
        self.zones.remove(&member.id);
        self.events.push_back(Event::MemberDown(member.clone()));
    }
}
