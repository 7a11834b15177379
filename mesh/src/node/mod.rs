//! The mesh node: a sans-IO state machine.
//!
//! `mod.rs` holds the API, input dispatch and membership; `publish.rs` the origin side
//! (batching, retention, acknowledgement tracking, retransmission, repair serving,
//! digests); `receive.rs` the receiver side (delivery, relaying, acks, repair requests);
//! `sync.rs` the periodic member-table exchange that repairs what gossip missed.

mod gossip;
mod publish;
mod receive;
mod roster;
mod sync;

#[cfg(test)]
pub(crate) use gossip::{RENEWAL_FEED_SAMPLE, feed_len};
pub(crate) use gossip::{short_feed, without_deaths_of};
pub(crate) use sync::mix;
#[cfg(test)]
pub(crate) use sync::{START_ASKS_PER_INTERVAL, UNANCHORED_ASKS_PER_INTERVAL};

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use bytes::Bytes;
use foca::OwnedNotification;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tracing::{debug, trace, warn};

use crate::config::NodeConfig;
use crate::error::{ConfigError, DecodeError, PublishError};
use crate::event::{AwaitId, Event, Goal, Published, Stats, Transmit};
use crate::identity::{Member, NodeId, Zone};
use crate::invalidation::Invalidation;
use crate::membership::{Outbox, Swim};
use crate::origins::Origins;
use crate::seal::{self, ClusterKey, KeyError, OpenError, SealMode, Sealer};
use crate::swim_codec::SwimCodec;
use crate::time::{self, Instant};
use crate::timers::{Timers, Wake};
use crate::wire::{self, ClusterId, MessageKind};
use publish::Outgoing;

/// Leave messages go straight to this many members at most; gossip carries them on.
const MAX_LEAVE_FANOUT: usize = 64;
/// Members declared down that a node left alone announces to, each rejoin tick.
const ANNOUNCE_TO_DOWN_WHEN_ALONE: usize = 4;

/// Every this many rejoin ticks, a node that has members still announces to seeds it
/// does not see: that is how the halves of a healed partition find each other again.
const SEED_REFRESH_TICKS: u32 = 30;

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
            max_entry_len: wire::max_entry_len(config.datagram_budget()),
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
        let encoded = wire::entry_len(invalidation);
        if encoded > self.max_entry_len {
            return Err(PublishError::KeyTooLarge {
                len: encoded,
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
/// - [`publish`](Self::publish), [`publish_awaited`](Self::publish_awaited),
///   [`cancel_await`](Self::cancel_await) and [`leave`](Self::leave) from the
///   application.
///
/// After any input, drain the outputs in this order:
/// 1. [`poll_event`](Self::poll_event) until `None`, handing deliveries to local
///    subscribers;
/// 2. [`poll_transmit`](Self::poll_transmit) until `None`, sending each datagram. This
///    is when pending publishes are packed into batches (so draining after a run of
///    publishes sends them together) and when acknowledgements go out (so an ack leaves
///    only after step 1 delivered what it acknowledges);
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
    /// The same members by id.
    by_id: BTreeMap<NodeId, Member>,
    /// Their addresses by zone.
    zones: BTreeMap<Zone, roster::ZoneRoster>,
    /// The live members in this node's zone, for relaying: ids by address.
    zone_peers: roster::ZonePeers,
    /// Origins' newest sequence numbers that reached this node as a relay, held to go
    /// to its zone together.
    zone_digests: BTreeMap<NodeId, u64>,
    origins: Origins,
    outgoing: Outgoing,
    /// Sequence numbers to acknowledge, by origin.
    acks_owed: BTreeMap<NodeId, Vec<u64>>,
    /// Relay choice; separate from foca's generator so membership does not shift it.
    rng: ChaCha8Rng,
    /// The latest time any input carried; outputs produced without a time use it.
    now: Instant,
    started: Instant,
    timers: Timers,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    left: bool,
    rejoin_ticks: u32,
    /// Member-table exchanges this node may still answer in this sync interval.
    sync_answers_left: u32,
    /// Members whose probe by this node failed, with the incarnation suspected and how
    /// many more times to tell them (see [`Node::tell_suspect`]).
    suspects_told: BTreeMap<SocketAddr, (Member, foca::Incarnation, u8)>,
    /// Origins this node may still ask, in this sync interval, where its part of their
    /// stream starts.
    start_asks_left: u32,
    /// The unanchored origin asked last at an exchange; the next exchange's asks start
    /// after it.
    last_start_ask: Option<NodeId>,
    /// foca's table as last looked at, for comparing peers' tables against.
    table_view: sync::TableView,
    /// Senders whose notices that this node is down were ignored, by identity, with
    /// when the first was (see `gossip.rs`).
    ignored_notices: BTreeMap<gossip::NoticeSender, Instant>,
    /// When this node last forgot members it held down (`Outbox::forgotten`).
    forgotten_at: Option<Instant>,
    /// The keyring, when the node seals.
    sealer: Option<Sealer>,
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
            .to_foca(config.datagram_budget() - wire::HEADER_LEN);
        let swim_rng = ChaCha8Rng::seed_from_u64(config.rng_seed);
        let swim = Swim::new(
            local.clone(),
            swim_config.clone(),
            swim_rng,
            SwimCodec::for_node(&local),
        );
        let mut timers = Timers::default();
        timers.set(now, Wake::Rejoin);
        let sealer = match &config.encryption {
            Some(encryption) => Some(
                Sealer::new(encryption, nonce_prefix(&config)?)
                    .map_err(|e| ConfigError::new("encryption", e.to_string()))?,
            ),
            None => None,
        };
        let mut node = Node {
            limits: Limits::new(&config),
            origins: Origins::new(config.max_origins, config.gap_timeout),
            outgoing: Outgoing::new(config.retention),
            rng: ChaCha8Rng::seed_from_u64(config.rng_seed.rotate_left(32) ^ 0x5eed),
            local,
            cluster,
            config,
            swim,
            swim_config,
            outbox: Outbox::new(cluster),
            members: BTreeMap::new(),
            by_id: BTreeMap::new(),
            zones: BTreeMap::new(),
            zone_peers: roster::ZonePeers::default(),
            zone_digests: BTreeMap::new(),
            acks_owed: BTreeMap::new(),
            now,
            started: now,
            timers,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            left: false,
            rejoin_ticks: 0,
            sync_answers_left: sync::ANSWERS_PER_INTERVAL,
            suspects_told: BTreeMap::new(),
            start_asks_left: sync::START_ASKS_PER_INTERVAL,
            last_start_ask: None,
            table_view: sync::TableView::default(),
            ignored_notices: BTreeMap::new(),
            forgotten_at: None,
            sealer,
        };
        // Room for the cluster's streams from the start, not doubled as they come.
        let expected = node.config.membership.expected_cluster_size as usize;
        node.origins.reserve(expected);
        node.schedule_sync();
        Ok(node)
    }

    /// This node as members see it.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// The live members this node knows, itself excluded, ordered by address.
    pub fn members(&self) -> impl ExactSizeIterator<Item = &Member> {
        self.members.values()
    }

    /// How many live members each zone has (this node not counted), by zone name.
    pub fn zone_sizes(&self) -> impl ExactSizeIterator<Item = (&Zone, usize)> {
        self.zones.iter().map(|(zone, addrs)| (zone, addrs.len()))
    }

    /// The size limits publishes must meet.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Counters since the node started.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Awaited publishes still waiting for their goal.
    pub fn awaits_in_flight(&self) -> usize {
        self.outgoing.awaits_in_flight()
    }

    /// Sizes of internal tables, for tests that check they stay bounded: (timers
    /// queued, recent batches, flights, owed-from records).
    #[cfg(test)]
    pub(crate) fn debug_sizes(&self) -> (usize, usize, usize, usize) {
        let (recent, flights, owed) = self.outgoing.debug_sizes();
        (self.timers.len(), recent, flights, owed)
    }

    /// foca's queued updates, and whether a gossip wake-up (the node's own or
    /// foca's periodic one) is pending.
    #[cfg(test)]
    pub(crate) fn debug_gossip(&self) -> (usize, bool) {
        let pending = self.timers.any(|wake| {
            matches!(
                wake,
                Wake::Gossip | Wake::Swim(foca::Timer::PeriodicGossip(_))
            )
        });
        (self.swim.updates_backlog(), pending)
    }

    #[cfg(test)]
    pub(crate) fn debug_past_gaps(&self) -> usize {
        self.origins.entries_past_gaps()
    }

    /// foca's entry for the member at `addr`: its incarnation and state.
    #[cfg(test)]
    pub(crate) fn debug_entry(&self, addr: SocketAddr) -> Option<(u16, foca::State)> {
        self.swim_entry(addr)
            .map(|member| (member.incarnation(), member.state()))
    }

    /// foca's entry for the member at `addr` (foca keeps one per address), found by a
    /// pass over its table: for a few lookups, not for a peer's whole table.
    fn swim_entry(&self, addr: SocketAddr) -> Option<&foca::Member<Member>> {
        self.swim
            .iter_membership_state()
            .find(|member| member.id().addr == addr)
    }

    /// True once [`leave`](Self::leave) was called.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Queues an invalidation for every member and for local subscribers.
    ///
    /// The entry is packed, delivered locally and sent with the next
    /// [`poll_event`](Self::poll_event) or [`poll_transmit`](Self::poll_transmit). A key
    /// already waiting to be sent coalesces with the waiting entry.
    pub fn publish(
        &mut self,
        now: Instant,
        invalidation: Invalidation,
    ) -> Result<Published, PublishError> {
        self.tick(now);
        self.enqueue(invalidation, None)
    }

    /// Like [`publish`](Self::publish), and asks every receiver to acknowledge once it
    /// has delivered the entry. An [`Event::AwaitDone`] with the returned id follows:
    /// as soon as the acknowledgements meet `goal`, when members die and the rest
    /// cannot meet it, or at `deadline`. Silent members get the entry again, with
    /// backoff, until then.
    ///
    /// A goal the live members cannot meet is refused at once, and nothing is
    /// published. A goal of zero completes at once.
    pub fn publish_awaited(
        &mut self,
        now: Instant,
        invalidation: Invalidation,
        goal: Goal,
        deadline: Instant,
    ) -> Result<AwaitId, PublishError> {
        self.tick(now);
        if self.left {
            return Err(PublishError::Closed);
        }
        self.limits.check(&invalidation)?;
        let available = self.reachable(goal, &BTreeMap::new());
        if goal.required() > available {
            return Err(PublishError::Unreachable {
                required: goal.required(),
                available,
            });
        }
        let id = self.begin_await(goal, deadline)?;
        self.enqueue(invalidation, Some(id))?;
        Ok(id)
    }

    /// Stops tracking an awaited publish: no [`Event::AwaitDone`] will come for it. The
    /// invalidation itself still goes out.
    pub fn cancel_await(&mut self, id: AwaitId) {
        self.forget_await(id);
    }

    /// Feeds one received datagram to the node. Anything invalid is dropped and counted
    /// in [`Stats::dropped`]; nothing here can fail or panic.
    pub fn handle_packet(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.tick(now);
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
        let Some(opened) = self.unseal(from, datagram, false) else {
            return;
        };
        let datagram = opened.as_deref().unwrap_or(datagram);
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
            MessageKind::Membership => self.receive_membership(from, header.flags, body),
            MessageKind::Data => self.receive_batch(from, &header, datagram, body),
            // Beacons count only from the multicast group (`handle_discovery`): a unicast
            // one would make this node announce itself to any address a sender names.
            MessageKind::Discover => self.stats.dropped.unsupported_kind += 1,
            MessageKind::Ack => self.receive_ack(from, body),
            MessageKind::Repair => self.receive_repair(from, body),
            MessageKind::Digest => self.receive_digest(from, &header, body),
            MessageKind::Gone => self.receive_gone(from, body),
            MessageKind::Sync => self.receive_sync(from, &header, body),
            MessageKind::ZoneDigests => self.receive_zone_digests(from, body),
        }
    }

    /// Feeds one datagram received on the multicast discovery group. Only discovery
    /// beacons are accepted there; a beacon from a node that is not a member makes this
    /// node announce itself to it.
    pub fn handle_discovery(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.tick(now);
        if self.left {
            return;
        }
        let Some(opened) = self.unseal(from, datagram, true) else {
            return;
        };
        let datagram = opened.as_deref().unwrap_or(datagram);
        match wire::read_header(datagram) {
            Ok((header, body))
                if header.kind == MessageKind::Discover && header.cluster == self.cluster =>
            {
                self.receive_discover(from, body);
            }
            Ok(_) => self.stats.dropped.wrong_cluster += 1,
            Err(error) => self.count_decode_error(from, error),
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        if self.left {
            return;
        }
        while let Some(wake) = self.timers.pop_due(now) {
            match wake {
                Wake::Swim(timer) => {
                    let outcome = self.drive_swim(|swim, out| swim.handle_timer(timer, out));
                    if let Err(error) = outcome {
                        debug!(%error, "membership timer failed");
                    }
                }
                Wake::Rejoin => self.rejoin(),
                Wake::GapCheck => self.give_up_expired_gaps(),
                Wake::Repair => self.request_due_repairs(),
                Wake::Retransmit => self.retransmit_due(),
                Wake::AwaitDeadline(id) => self.expire_await(id),
                Wake::Digest => self.send_digest(),
                Wake::ZoneDigests => self.flush_zone_digests(),
                Wake::Sync => self.start_sync(),
                Wake::TellSuspects => self.tell_suspects_again(),
                Wake::AskStarts => self.ask_unanchored_origins_due(),
                Wake::Gossip => self.gossip(),
            }
        }
    }

    /// Leaves the cluster: sends what is pending, then tells members this node is gone
    /// so they see it leave at once instead of after failure detection. Afterwards the
    /// node drops every datagram and refuses publishes; drain
    /// [`poll_transmit`](Self::poll_transmit) to send the goodbyes.
    pub fn leave(&mut self, now: Instant) {
        self.tick(now);
        if self.left {
            return;
        }
        self.flush_pending();
        // Digests held as a relay go now: the zone would not hear them otherwise.
        self.flush_zone_digests();
        // A final digest lets members confirm they have everything before this node
        // disappears; without it they could not tell a leave from a crash mid-send.
        self.send_final_digests();
        // foca sends the leave to `num_indirect_probes` members and puts it in at most
        // `max_transmissions` messages: widen both so every member hears it directly.
        let mut config = self.swim_config.clone();
        let fanout = self.members.len().clamp(1, MAX_LEAVE_FANOUT);
        if let Some(fanout) = std::num::NonZeroUsize::new(fanout) {
            config.num_indirect_probes = fanout;
        }
        let transmissions = u8::try_from(fanout).unwrap_or(u8::MAX);
        if let Some(transmissions) = std::num::NonZeroU8::new(transmissions) {
            config.max_transmissions = config.max_transmissions.max(transmissions);
        }
        if self.swim.set_config(config).is_err() {
            warn!("could not widen the leave fan-out; gossip will spread the leave");
        }
        self.left = true;
        if let Err(error) = self.drive_swim(|swim, out| swim.leave_cluster(out)) {
            warn!(%error, "leaving the cluster failed; peers will detect the departure");
        }
        self.timers.clear();
        self.fail_all_awaits();
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.transmits.is_empty() {
            self.flush_pending();
            self.flush_acks();
        }
        self.transmits.pop_front()
    }

    /// The next event for the driver, if any. Pending publishes are packed at the first
    /// of `poll_event` and `poll_transmit` after an input, and delivered locally then,
    /// so local subscribers see the same coalesced entry as peers.
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.events.is_empty() {
            self.flush_pending();
        }
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next; `None` once the node
    /// has left.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// A multicast discovery beacon announcing this node, for drivers that do discovery.
    /// Nodes that receive it announce themselves to this node.
    pub fn discovery_beacon(&mut self) -> Bytes {
        let beacon = wire::encode_discover(self.cluster, self.local.addr);
        self.sealed(beacon)
    }

    /// Installs a cluster key: datagrams sealed with it open from now on. The first
    /// step of a rotation, on every node.
    pub fn install_key(&mut self, key: ClusterKey) -> Result<(), KeyError> {
        self.keyring()?.install(key)
    }

    /// Seals with an installed key from now on. The second step of a rotation, on
    /// every node once every node has the key.
    pub fn use_key(&mut self, key: &ClusterKey) -> Result<(), KeyError> {
        self.keyring()?.make_primary(key)
    }

    /// Removes an installed key other than the one that seals. The last step of a
    /// rotation, once no node seals with it.
    pub fn remove_key(&mut self, key: &ClusterKey) -> Result<(), KeyError> {
        self.keyring()?.remove(key)
    }

    /// Changes how plaintext is treated; see [`SealMode`] for moving a cluster from
    /// plaintext to sealed datagrams.
    pub fn set_seal_mode(&mut self, mode: SealMode) -> Result<(), KeyError> {
        self.keyring()?.set_mode(mode);
        Ok(())
    }

    /// The sealing mode, or `None` for a node without encryption.
    pub fn seal_mode(&self) -> Option<SealMode> {
        self.sealer.as_ref().map(Sealer::mode)
    }

    /// Fingerprints of the installed keys, the one that seals first; empty without
    /// encryption.
    pub fn key_fingerprints(&self) -> Vec<String> {
        self.sealer
            .as_ref()
            .map(Sealer::fingerprints)
            .unwrap_or_default()
    }

    fn keyring(&mut self) -> Result<&mut Sealer, KeyError> {
        self.sealer.as_mut().ok_or(KeyError::NoEncryption)
    }

    /// Seals an outgoing datagram when this node seals.
    fn sealed(&mut self, datagram: Bytes) -> Bytes {
        match &mut self.sealer {
            Some(sealer) if sealer.mode().seals() => sealer.seal(self.cluster, &datagram).into(),
            _ => datagram,
        }
    }

    /// Opens a sealed datagram (`Some(Some(plaintext))`), passes a plaintext one this
    /// node accepts (`Some(None)`), or drops and counts it (`None`).
    /// Sealed datagrams are taken only for what they may carry where they arrived:
    /// discovery beacons on the multicast group (`discovery`), membership from anyone
    /// else, and everything else from members only.
    fn unseal(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        discovery: bool,
    ) -> Option<Option<Vec<u8>>> {
        let mode = self.seal_mode();
        let dropped = &mut self.stats.dropped;
        if !seal::is_sealed(datagram) {
            // Junk is counted by what is wrong with it; a well-formed plaintext datagram
            // by the refusal.
            if mode == Some(SealMode::Require) && wire::read_header(datagram).is_ok() {
                dropped.plaintext += 1;
                if dropped.plaintext.is_power_of_two() {
                    warn!(peer = %from, count = dropped.plaintext,
                        "refused a plaintext datagram: this node requires sealed datagrams");
                }
                return None;
            }
            return Some(None);
        }
        if seal::sealed_cluster(datagram) != Some(self.cluster) {
            dropped.wrong_cluster += 1;
            return None;
        }
        let Some(sealer) = &mut self.sealer else {
            dropped.unauthenticated += 1;
            if dropped.unauthenticated.is_power_of_two() {
                warn!(peer = %from, count = dropped.unauthenticated,
                    "dropped a sealed datagram: this node has no cluster key");
            }
            return None;
        };
        let opened = match sealer.open(datagram) {
            Ok(opened) => opened,
            Err(OpenError::Truncated) => {
                dropped.truncated += 1;
                return None;
            }
            Err(_) => {
                dropped.unauthenticated += 1;
                if dropped.unauthenticated.is_power_of_two() {
                    warn!(peer = %from, count = dropped.unauthenticated,
                        "dropped a datagram that none of this node's keys opens: \
                         a wrong cluster key, or a forgery");
                }
                return None;
            }
        };
        // Judged before its counter is used, so a copy sent where it does not belong
        // cannot use up the counter of the genuine one.
        let kind = match wire::read_header(&opened.plain) {
            Ok((header, _)) => header.kind,
            Err(error) => {
                self.count_decode_error(from, error);
                return None;
            }
        };
        let fits = match kind {
            MessageKind::Discover => discovery,
            MessageKind::Membership => !discovery,
            // Past the membership protocol, only members speak; a datagram of a node
            // that is gone, or never was, replayed by someone else is dropped here.
            _ => !discovery && self.members.contains_key(&from),
        };
        let dropped = &mut self.stats.dropped;
        if !fits {
            // On the wrong path, or from a node that is not a member.
            if discovery || kind == MessageKind::Discover || kind == MessageKind::Membership {
                dropped.unsupported_kind += 1;
            } else {
                dropped.unknown_peer += 1;
            }
            return None;
        }
        let Some(sealer) = &mut self.sealer else {
            return None;
        };
        match sealer.accept(&opened) {
            Ok(()) => Some(Some(opened.plain)),
            Err(_) => {
                dropped.replayed += 1;
                trace!(peer = %from, "dropped a replayed datagram");
                None
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
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
            DecodeError::Corrupt => dropped.corrupt += 1,
        }
    }

    fn queue_transmit(&mut self, destination: SocketAddr, payload: Bytes) {
        // The zone's members are kept apart already: no lookup among all members, no
        // comparison of zone names.
        let in_zone = self.zone_peers.contains(&destination);
        self.push_transmit(destination, payload, in_zone);
    }

    /// Sends to a member of this zone, sparing the search of
    /// [`queue_transmit`](Self::queue_transmit) on paths that relay to the whole zone.
    fn queue_transmit_in_zone(&mut self, destination: SocketAddr, payload: Bytes) {
        self.push_transmit(destination, payload, true);
    }

    fn push_transmit(&mut self, destination: SocketAddr, payload: Bytes, in_zone: bool) {
        let payload = self.sealed(payload);
        let len = payload.len() as u64;
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += len;
        if in_zone {
            self.stats.datagrams_sent_in_zone += 1;
            self.stats.bytes_sent_in_zone += len;
        } else {
            self.stats.datagrams_sent_across_zones += 1;
            self.stats.bytes_sent_across_zones += len;
        }
        self.transmits.push_back(Transmit {
            destination,
            payload,
        });
    }

    fn raise_resync(&mut self, origin: NodeId, missed: u64) {
        if missed == 0 {
            return;
        }
        warn!(%origin, missed, "invalidations lost; subscribers must resync");
        self.stats.resyncs += 1;
        // Forged sequence numbers can claim absurd counts.
        self.stats.missed = self.stats.missed.saturating_add(missed);
        self.events.push_back(Event::Resync { origin, missed });
    }

    fn receive_discover(&mut self, from: SocketAddr, body: &[u8]) {
        let addr = match wire::decode_discover(body) {
            Ok(addr) => addr,
            Err(error) => return self.count_decode_error(from, error),
        };
        if addr == self.local.addr || self.members.contains_key(&addr) {
            return;
        }
        debug!(peer = %addr, "discovered a node by multicast");
        self.announce_to(addr);
    }

    fn rejoin(&mut self) {
        self.rejoin_ticks = self.rejoin_ticks.wrapping_add(1);
        let alone = self.members.is_empty();
        if alone || self.rejoin_ticks.is_multiple_of(SEED_REFRESH_TICKS) {
            for seed in self.config.seeds.clone() {
                if seed != self.local.addr && !self.members.contains_key(&seed) {
                    self.announce_to(seed);
                }
            }
        }
        if alone {
            // A node with no live member runs no foca timers, so it does not announce
            // to the members it declared down either; without seeds (or with seeds
            // that are gone) it would wait forever for someone to call. The other
            // side may be as stuck: a node that renewed its identity after being
            // declared down also runs no foca timers until a member comes alive.
            // So the node calls the nodes it last knew.
            let down: Vec<SocketAddr> = self
                .swim
                .iter_membership_state()
                .filter(|member| member.state() == foca::State::Down)
                .map(|member| member.id().addr)
                .filter(|addr| !self.config.seeds.contains(addr))
                .take(ANNOUNCE_TO_DOWN_WHEN_ALONE)
                .collect();
            for addr in down {
                self.announce_to(addr);
            }
        }
        let next = self.now + self.config.membership.rejoin_interval;
        self.timers.set(next, Wake::Rejoin);
    }

    fn announce_to(&mut self, addr: SocketAddr) {
        let seed = Member::seed(addr);
        if let Err(error) = self.drive_swim(|swim, out| swim.announce(seed, out)) {
            debug!(peer = %addr, %error, "announce failed");
        }
    }

    /// Runs one foca operation and carries out what it asked for.
    fn drive_swim<F>(&mut self, operation: F) -> Result<(), foca::Error>
    where
        F: FnOnce(&mut Swim, &mut Outbox) -> Result<(), foca::Error>,
    {
        let result = operation(&mut self.swim, &mut self.outbox);
        // Told it is down by a member it holds down, foca renews this node and then
        // tells that member it is down, under the new identity. The member is about to
        // be forgotten and announced to (`forget_downs`); if the announcement reached it
        // first, it would take the notice from a live member and renew too: at the
        // thousand-node heal, about fifty nodes of the larger side did.
        let renewed = self
            .outbox
            .notifications
            .iter()
            .any(|notification| matches!(notification, OwnedNotification::Rejoin(_)));
        for (destination, payload) in std::mem::take(&mut self.outbox.datagrams) {
            if renewed && gossip::is_down_notice(&payload) {
                continue;
            }
            self.queue_transmit(destination, payload);
        }
        for (timer, after) in std::mem::take(&mut self.outbox.timers) {
            if let foca::Timer::ChangeSuspectToDown {
                member_id,
                incarnation,
                ..
            } = &timer
            {
                self.tell_suspect(member_id, *incarnation);
            }
            self.timers.set(self.now + after, Wake::Swim(timer));
        }
        for notification in std::mem::take(&mut self.outbox.notifications) {
            self.apply_notification(notification);
        }
        if self
            .forgotten_at
            .is_some_and(|at| self.now >= at + self.config.membership.remove_down_after)
        {
            // By now every member has forgotten those deaths too.
            self.outbox.forgotten.clear();
            self.forgotten_at = None;
        }
        if self.swim.updates_backlog() > 0 {
            let at = self.next_gossip_tick();
            self.timers.set_shared(at, Wake::Gossip);
        }
        result
    }

    /// The next tick, after now, of this node's `gossip_interval` grid, as foca's own
    /// timer would tick: news waits half an interval on average, not a whole one. The
    /// grid is offset by an amount drawn from the node id, so that nodes on one clock
    /// (the simulator's) do not all gossip at the same instants.
    fn next_gossip_tick(&self) -> Instant {
        let interval_ns = time::nanos(self.config.membership.gossip_interval).max(1);
        // Ticks are at `offset + k * interval`.
        let offset = sync::mix(self.local.id.0) % interval_ns;
        let now = self.now.as_nanos();
        let tick = match now.checked_sub(offset) {
            None => offset,
            Some(since) => (since / interval_ns + 1)
                .saturating_mul(interval_ns)
                .saturating_add(offset),
        };
        Instant::from_nanos(tick)
    }

    /// Gossips foca's queued membership updates to a few members. The node, not
    /// foca, keeps this timer, so that it runs only while updates are queued: foca's
    /// own fires every `gossip_interval` whether or not there is news, and in the
    /// thousand-node scenario those idle wake-ups were half of all wake-ups.
    fn gossip(&mut self) {
        if self.swim.updates_backlog() == 0 {
            return;
        }
        if let Err(error) = self.drive_swim(|swim, out| swim.gossip(out)) {
            debug!(%error, "membership gossip failed");
        }
    }

    fn apply_notification(&mut self, notification: OwnedNotification<Member>) {
        match notification {
            OwnedNotification::MemberUp(member) => self.member_up(member),
            OwnedNotification::MemberDown(member) => {
                // Declared down again since: that death is news to spread.
                self.outbox.forgotten.remove(&member.addr);
                self.member_down(&member);
            }
            OwnedNotification::Rename(before, after) => {
                let active = self.swim.iter_members().any(|m| m.id() == &after);
                if before.id == after.id && self.members.contains_key(&before.addr) && active {
                    // The same process renewed its identity: nothing changed for users.
                    self.insert_member(after);
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
                self.ignored_notices.clear();
                self.forget_downs();
            }
        }
    }

    /// After the cluster declared this node down: the members it holds down are
    /// forgotten at once, before this node answers anyone under its new identity,
    /// rather than after `remove_down_after`, and each is announced to. A node declared
    /// down was most likely on the smaller side of a partition; holding the other side
    /// down under its new identity, it would tell each of them so when they meet again,
    /// and make every one of them renew its identity too (the whole cluster, at a heal).
    /// One announcement per member forgotten, at most `max_members`.
    fn forget_downs(&mut self) {
        let removals = self
            .timers
            .take_where(|wake| matches!(wake, Wake::Swim(foca::Timer::RemoveDown(_))));
        for removal in removals {
            let Wake::Swim(foca::Timer::RemoveDown(member)) = removal else {
                continue;
            };
            let timer = foca::Timer::RemoveDown(member.clone());
            if let Err(error) = self.drive_swim(|swim, out| swim.handle_timer(timer, out)) {
                debug!(%error, "could not forget a member held down");
            }
            // foca still has the death queued to gossip; told to the other side, it
            // would make a member there that holds the dead one live take it as
            // down, and renew when they next meet.
            self.outbox.forgotten.insert(member.addr);
            self.forgotten_at = Some(self.now);
            // Announced to, the member learns this node's new identity at once and
            // answers: a healed partition converges in a round trip, and its repairs
            // find both ends knowing each other. Marked as a renewal, the answer
            // carries a short sample of members: this node kept its table.
            self.outbox.renewal = true;
            let outcome = self.drive_swim(|swim, out| swim.announce(member, out));
            self.outbox.renewal = false;
            if let Err(error) = outcome {
                debug!(%error, "could not announce to a member held down");
            }
        }
    }

    fn member_up(&mut self, mut member: Member) {
        if self.members.get(&member.addr) == Some(&member) {
            return;
        }
        // Members of one zone share one copy of its name: a delivery carries the
        // origin's zone, and cloning a name held once per member touches cold memory.
        if member.zone == self.local.zone {
            member.zone = self.local.zone.clone();
        } else if let Some((zone, _)) = self.zones.get_key_value(&member.zone) {
            member.zone = zone.clone();
        }
        debug!(peer = %member.addr, zone = %member.zone, id = %member.id, "member up");
        if let Some(replaced) = self.insert_member(member.clone()) {
            self.events.push_back(Event::MemberDown(replaced));
        }
        self.owe_from_now(&member);
        self.events.push_back(Event::MemberUp(member));
    }

    /// Puts `member` in the member table and the indexes kept from it (by id, this
    /// zone's addresses, sizes per zone); returns the member it replaced at its address.
    fn insert_member(&mut self, member: Member) -> Option<Member> {
        let replaced = self.members.insert(member.addr, member.clone());
        if let Some(replaced) = &replaced {
            self.unindex_member(replaced);
        }
        if member.zone == self.local.zone {
            self.zone_peers.insert(member.addr, member.id);
        }
        self.zones
            .entry(member.zone.clone())
            .or_default()
            .insert(member.addr);
        self.origins.set_live(member.id, true);
        self.by_id.insert(member.id, member);
        replaced
    }

    /// The `n`th live member, counting zone by zone and each zone in address order:
    /// a random one in a few steps, where walking the member table to it read a few
    /// hundred entries in memory gone cold.
    fn nth_member(&self, mut n: usize) -> Option<SocketAddr> {
        debug_assert_eq!(
            self.zones
                .values()
                .map(roster::ZoneRoster::len)
                .sum::<usize>(),
            self.members.len(),
            "the zones' rosters hold every member"
        );
        for roster in self.zones.values() {
            match roster.addrs().get(n) {
                Some(addr) => return Some(*addr),
                None => n -= roster.len(),
            }
        }
        None
    }

    /// Takes `member` out of the indexes kept from the member table.
    fn unindex_member(&mut self, member: &Member) {
        self.by_id.remove(&member.id);
        self.origins.set_live(member.id, false);
        self.zone_peers.remove(&member.addr);
        if let Some(addrs) = self.zones.get_mut(&member.zone) {
            addrs.remove(&member.addr);
            if addrs.is_empty() {
                self.zones.remove(&member.zone);
            }
        }
    }

    fn member_down(&mut self, member: &Member) {
        if self.members.get(&member.addr) != Some(member) {
            return;
        }
        debug!(peer = %member.addr, zone = %member.zone, id = %member.id, "member down");
        self.members.remove(&member.addr);
        self.unindex_member(member);
        self.events.push_back(Event::MemberDown(member.clone()));
        self.origin_gone(member.id);
        self.fail_unreachable_awaits();
    }
}

/// The random part of this node's nonces: drawn from the OS for every start, so no two
/// starts share it even with the same configuration; mixed with the node's seed, id and
/// generation, so a weak OS source alone does not decide it either.
fn nonce_prefix(config: &NodeConfig) -> Result<[u8; 16], ConfigError> {
    let mut prefix = [0; 16];
    getrandom::fill(&mut prefix).map_err(|e| {
        ConfigError::new(
            "encryption",
            format!("no randomness from the OS for nonces: {e}"),
        )
    })?;
    let mut seed = [0; 32];
    seed[..8].copy_from_slice(&config.rng_seed.to_le_bytes());
    seed[8..16].copy_from_slice(&config.node_id.0.to_le_bytes());
    seed[16..24].copy_from_slice(&config.generation.to_le_bytes());
    seed[24..].copy_from_slice(b"nonce-pf");
    let mut mixed = [0; 16];
    rand::Rng::fill_bytes(&mut ChaCha8Rng::from_seed(seed), &mut mixed);
    for (byte, mix) in prefix.iter_mut().zip(mixed) {
        *byte ^= mix;
    }
    Ok(prefix)
}
