//! Several nodes driven by hand over a virtual network: deterministic, no sockets.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::*;

const LATENCY: Duration = Duration::from_millis(1);

type Outcome = Result<Acks, AwaitFailure>;

fn addr(index: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + index as u16))
}

fn config(index: usize, seeds: &[usize]) -> NodeConfig {
    let zone = Zone::new(format!("zone-{}", index % 3)).unwrap();
    let mut config = NodeConfig::new(NodeId(100 + index as u64), addr(index), zone);
    config.seeds = seeds.iter().map(|&s| addr(s)).collect();
    config.membership = MembershipConfig::local();
    config.generation = 1;
    config
}

/// A virtual network of nodes. Datagrams take `LATENCY`; `loss` drops a fraction of
/// them at random (seeded); `drop_data_to` drops the next data datagram to one node;
/// `cut_data` drops every data datagram on a directed link; `partition` drops
/// everything between two groups.
struct Net {
    now: Instant,
    nodes: BTreeMap<usize, Node>,
    in_flight: BTreeMap<(Instant, u64), (SocketAddr, SocketAddr, Bytes)>,
    sent: u64,
    loss: f64,
    rng: ChaCha8Rng,
    drop_data_to: Option<usize>,
    cut_data: BTreeSet<(usize, usize)>,
    partition: Option<(BTreeSet<usize>, BTreeSet<usize>)>,
    /// Datagrams sent, by (sender, message kind byte).
    sent_by_kind: BTreeMap<(usize, u8), u64>,
    deliveries: BTreeMap<usize, Vec<Delivery>>,
    resyncs: BTreeMap<usize, Vec<(NodeId, u64)>>,
    member_events: BTreeMap<usize, Vec<Event>>,
    awaits: BTreeMap<usize, Vec<(AwaitId, Outcome)>>,
    trace: DefaultHasher,
    /// Drops a datagram when it returns true: (sender, receiver, payload).
    filter: Option<DatagramFilter>,
    /// Nodes whose timers fire this late, as a real process's do.
    timer_lag: BTreeMap<usize, Duration>,
}

type DatagramFilter = Box<dyn FnMut(usize, usize, &[u8]) -> bool>;

impl Net {
    fn new(seed: u64) -> Net {
        Net {
            timer_lag: BTreeMap::new(),
            now: Instant::ZERO,
            nodes: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            sent: 0,
            loss: 0.0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            drop_data_to: None,
            cut_data: BTreeSet::new(),
            partition: None,
            sent_by_kind: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            resyncs: BTreeMap::new(),
            member_events: BTreeMap::new(),
            awaits: BTreeMap::new(),
            trace: DefaultHasher::new(),
            filter: None,
        }
    }

    fn start(&mut self, index: usize, config: NodeConfig) {
        let node = Node::new(config, self.now).unwrap();
        self.nodes.insert(index, node);
        self.drain(index);
    }

    fn node(&mut self, index: usize) -> &mut Node {
        self.nodes.get_mut(&index).unwrap()
    }

    fn publish(&mut self, index: usize, key: &str) -> Published {
        let now = self.now;
        let published = self
            .node(index)
            .publish(now, Invalidation::key(key))
            .unwrap();
        self.drain(index);
        published
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.keys().copied().find(|&i| self::addr(i) == addr)
    }

    fn awaited(&mut self, index: usize, key: &str, goal: Goal, within: Duration) -> AwaitId {
        let now = self.now;
        let node = self.node(index);
        let id = node
            .publish_awaited(now, Invalidation::key(key), goal, now + within)
            .unwrap();
        self.drain(index);
        id
    }

    fn outcome(&self, index: usize, id: AwaitId) -> Option<&Result<Acks, AwaitFailure>> {
        let done = self.awaits.get(&index)?;
        done.iter()
            .find(|(done, _)| *done == id)
            .map(|(_, outcome)| outcome)
    }

    fn crash(&mut self, index: usize) {
        self.nodes.remove(&index);
    }

    fn sent_of(&self, index: usize, kind: wire::MessageKind) -> u64 {
        self.sent_by_kind
            .get(&(index, kind as u8))
            .copied()
            .unwrap_or(0)
    }

    /// Carries out everything node `index` asked for, in the documented order.
    fn drain(&mut self, index: usize) {
        let Some(node) = self.nodes.get_mut(&index) else {
            return;
        };
        while let Some(event) = node.poll_event() {
            match event {
                Event::Delivered(delivery) => {
                    self.deliveries.entry(index).or_default().push(delivery);
                }
                Event::Resync { origin, missed } => {
                    self.resyncs
                        .entry(index)
                        .or_default()
                        .push((origin, missed));
                }
                Event::AwaitDone { id, outcome } => {
                    self.awaits.entry(index).or_default().push((id, outcome));
                }
                other => self.member_events.entry(index).or_default().push(other),
            }
        }
        let from = node.local().addr;
        while let Some(transmit) = node.poll_transmit() {
            transmit.payload.hash(&mut self.trace);
            self.sent += 1;
            let kind = transmit.payload.get(3).copied().unwrap_or_default();
            *self.sent_by_kind.entry((index, kind)).or_default() += 1;
            let at = self.now + LATENCY;
            self.in_flight.insert(
                (at, self.sent),
                (from, transmit.destination, transmit.payload),
            );
        }
    }

    /// Advances to the next datagram arrival or timer, whichever is first.
    fn step(&mut self) -> bool {
        let next_packet = self.in_flight.keys().next().map(|(at, _)| *at);
        let next_timer = self.next_timer();
        let Some(next) = [next_packet, next_timer].into_iter().flatten().min() else {
            return false;
        };
        self.now = self.now.max(next);
        if next_packet == Some(next) {
            let (_, (from, to, payload)) = self.in_flight.pop_first().unwrap();
            self.deliver(from, to, &payload);
        } else {
            let due: Vec<usize> = self
                .nodes
                .keys()
                .filter(|i| self.timer_of(**i).is_some_and(|at| at <= next))
                .copied()
                .collect();
            for index in due {
                let now = self.now;
                self.node(index).handle_timeout(now);
                self.drain(index);
            }
        }
        true
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
        let (Some(index), Some(sender)) = (self.index_of(to), self.index_of(from)) else {
            return;
        };
        let is_data = payload.get(3) == Some(&(wire::MessageKind::Data as u8));
        if let Some(filter) = self.filter.as_mut()
            && filter(sender, index, payload)
        {
            return;
        }
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return;
        }
        if is_data && self.drop_data_to == Some(index) {
            self.drop_data_to = None;
            return;
        }
        if is_data && self.cut_data.contains(&(sender, index)) {
            return;
        }
        if let Some((left, right)) = &self.partition {
            let split = |a: &usize, b: &usize| left.contains(a) && right.contains(b);
            if split(&sender, &index) || split(&index, &sender) {
                return;
            }
        }
        let now = self.now;
        self.node(index).handle_packet(now, from, payload);
        self.drain(index);
    }

    fn run_for(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.peek_next().is_some_and(|at| at <= end) {
            self.step();
        }
        self.now = end;
    }

    /// Steps until `done` holds; false if it did not within `limit` of virtual time.
    fn run_until(&mut self, limit: Duration, done: impl Fn(&Net) -> bool) -> bool {
        let end = self.now + limit;
        while !done(self) {
            if self.peek_next().is_none_or(|at| at > end) {
                return false;
            }
            self.step();
        }
        true
    }

    fn peek_next(&self) -> Option<Instant> {
        let packet = self.in_flight.keys().next().map(|(at, _)| *at);
        [packet, self.next_timer()].into_iter().flatten().min()
    }

    /// When node `index` runs its timers next: its deadline, plus its lag.
    fn timer_of(&self, index: usize) -> Option<Instant> {
        let lag = self.timer_lag.get(&index).copied().unwrap_or_default();
        self.nodes[&index].poll_timeout().map(|at| at + lag)
    }

    fn next_timer(&self) -> Option<Instant> {
        self.nodes.keys().filter_map(|i| self.timer_of(*i)).min()
    }

    fn converged(&self, size: usize) -> bool {
        self.nodes.values().all(|n| n.members().len() == size - 1)
    }

    fn keys_at(&self, index: usize) -> Vec<String> {
        let deliveries = self
            .deliveries
            .get(&index)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        deliveries
            .iter()
            .map(|d| d.invalidation.key.clone())
            .collect()
    }
}

/// Six nodes split into two halves of three for longer than `remove_down_after`, so
/// that each half forgets the other entirely; node 0 published "during" in the split.
/// The partition is still in place.
fn halves_that_forgot_each_other(seed: u64) -> Net {
    let mut net = cluster(6, seed);
    net.partition = Some(([0, 1, 2].into(), [3, 4, 5].into()));
    net.run_for(Duration::from_secs(1));
    net.publish(0, "during");
    net.run_for(Duration::from_secs(20));
    assert!((0..6).all(|i| net.nodes[&i].members().len() == 2));
    net
}

#[test]
fn at_a_heal_only_the_smaller_side_renews_its_identities() {
    let size = 7;
    let mut net = cluster(size, 95);
    let generations = |net: &Net| -> Vec<u64> {
        (0..size)
            .map(|i| net.nodes[&i].local().generation)
            .collect()
    };
    let before = generations(&net);
    // Split into five and two, long enough for each side to declare the other down,
    // not long enough for either to forget the other (`remove_down_after` is 15 s).
    net.partition = Some(([0, 1, 2, 3, 4].into(), [5, 6].into()));
    assert!(net.run_until(Duration::from_secs(10), |n| {
        (0..5).all(|i| n.nodes[&i].members().len() == 4)
            && (5..7).all(|i| n.nodes[&i].members().len() == 1)
    }));
    net.partition = None;
    assert!(net.run_until(Duration::from_secs(15), |n| n.converged(size)));
    let after = generations(&net);
    assert_eq!(
        after[..5],
        before[..5],
        "the larger side kept its identities"
    );
    assert!(
        (5..7).all(|i| after[i] > before[i]),
        "the smaller side renewed"
    );
    assert!((0..5).any(|i| net.nodes[&i].stats().down_notices_ignored > 0));
}

/// How many updates a datagram carries, if it is a Feed (foca's answer to an
/// announcement: a sample of the members the sender holds live).
fn feed_size(datagram: &[u8]) -> Option<u16> {
    let (header, body) = wire::read_header(datagram).ok()?;
    if header.kind != wire::MessageKind::Membership {
        return None;
    }
    crate::node::feed_len(body).and_then(|len| u16::try_from(len).ok())
}

/// Nine nodes split seven to two for long enough that each side declares the other
/// down: at the heal the two renew and announce themselves to the seven.
fn seven_and_two_before_a_heal(seed: u64) -> Net {
    let size = 9;
    let mut net = cluster_of_seeded_nodes(size, seed);
    net.partition = Some(([0, 1, 2, 3, 4, 5, 6].into(), [7, 8].into()));
    assert!(net.run_until(Duration::from_secs(15), |n| {
        (0..7).all(|i| n.nodes[&i].members().len() == 6)
            && (7..9).all(|i| n.nodes[&i].members().len() == 1)
    }));
    net
}

#[test]
fn a_renewed_node_announcing_itself_gets_short_feeds() {
    let size = 9;
    let mut net = seven_and_two_before_a_heal(95);
    // Feeds sent, as (sender, receiver, updates carried).
    let feeds: Rc<RefCell<Vec<(usize, usize, u16)>>> = Rc::default();
    let seen = Rc::clone(&feeds);
    net.filter = Some(Box::new(move |from, to, payload| {
        seen.borrow_mut()
            .extend(feed_size(payload).map(|n| (from, to, n)));
        false
    }));
    net.partition = None;
    assert!(net.run_until(Duration::from_secs(15), |n| n.converged(size)));
    let to_renewed: Vec<u16> = feeds
        .borrow()
        .iter()
        .filter(|(from, to, _)| *from < 7 && *to >= 7)
        .map(|(_, _, n)| *n)
        .collect();
    assert!(
        to_renewed.len() >= 7,
        "feeds to the renewed: {to_renewed:?}"
    );
    let sample = crate::node::RENEWAL_FEED_SAMPLE as u16;
    assert!(to_renewed.iter().all(|n| *n <= sample), "{to_renewed:?}");
    // A node joining afresh gets the whole sample.
    feeds.borrow_mut().clear();
    net.start(size, config(size, &[0]));
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(size + 1)));
    let to_joiner: Vec<u16> = feeds
        .borrow()
        .iter()
        .filter(|(from, to, _)| *from == 0 && *to == size)
        .map(|(_, _, n)| *n)
        .collect();
    assert!(
        to_joiner.first().is_some_and(|n| *n > sample),
        "{to_joiner:?}"
    );
}

#[test]
fn a_heal_under_loss_converges_though_renewed_nodes_get_short_feeds() {
    // Each renewed node hears most members answer it directly; the few members in
    // each answer cover the answers lost. Over these trials (the nodes' draws and the
    // losses both seeded by the trial), the mean was 643 ms with four members in each
    // answer, 640 ms with whole Feeds and 928 ms with no members.
    let trials = 100;
    let mut total = Duration::ZERO;
    for seed in 0..trials {
        let mut net = seven_and_two_before_a_heal(1000 + seed);
        net.loss = 0.05;
        net.partition = None;
        let healed = net.now;
        assert!(net.run_until(Duration::from_secs(30), |n| n.converged(9)));
        total += net.now.saturating_duration_since(healed);
    }
    let mean = total / trials as u32;
    assert!(mean < Duration::from_millis(750), "mean {mean:?}");
}

#[test]
fn gossip_wakes_a_node_only_while_it_has_membership_news() {
    let mut net = cluster(4, 31);
    // A joiner is news: the nodes that hear of it queue it and gossip it.
    net.start(4, config(4, &[0]));
    assert!(net.run_until(Duration::from_secs(5), |n| {
        n.nodes.values().any(|node| {
            let (queued, pending) = node.debug_gossip();
            queued > 0 && pending
        })
    }));
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(5)));
    // Each update is sent a bounded number of times; then nothing is queued, and no
    // node wakes to gossip.
    assert!(net.run_until(Duration::from_secs(60), |n| {
        n.nodes
            .values()
            .all(|node| node.debug_gossip() == (0, false))
    }));
    net.run_for(Duration::from_secs(10));
    for (index, node) in &net.nodes {
        assert_eq!(node.debug_gossip(), (0, false), "node {index}");
    }
}

fn cluster(size: usize, seed: u64) -> Net {
    cluster_drawing(size, seed, |_| 0)
}

/// A cluster whose nodes' own random draws (probe order, exchange partners, timer
/// jitter) also come from `seed`: trials over seeds then sample the nodes' choices
/// too, not only the network's losses.
fn cluster_of_seeded_nodes(size: usize, seed: u64) -> Net {
    cluster_drawing(size, seed, |index| {
        crate::node::mix(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    })
}

/// A cluster joined through node 0, each node's random seed mixed with
/// `node_seed(index)`.
fn cluster_drawing(size: usize, seed: u64, node_seed: impl Fn(usize) -> u64) -> Net {
    let mut net = Net::new(seed);
    for index in 0..size {
        let seeds: &[usize] = if index == 0 { &[] } else { &[0] };
        let mut config = config(index, seeds);
        config.rng_seed ^= node_seed(index);
        net.start(index, config);
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(size)));
    net
}

#[test]
fn nodes_join_through_a_seed_and_converge() {
    let net = cluster(5, 1);
    let zones: Vec<_> = net.nodes[&0]
        .members()
        .map(|m| m.zone.to_string())
        .collect();
    assert_eq!(zones.len(), 4);
    assert!(zones.contains(&"zone-1".to_owned()) && zones.contains(&"zone-2".to_owned()));
}

#[test]
fn a_publish_reaches_every_node_exactly_once() {
    let mut net = cluster(4, 2);
    assert_eq!(net.publish(1, "user:42"), Published::Queued);
    net.run_for(Duration::from_millis(50));
    for index in 0..4 {
        assert_eq!(net.keys_at(index), ["user:42"], "node {index}");
    }
    let delivery = &net.deliveries[&3][0];
    assert_eq!(delivery.origin, NodeId(101));
    assert_eq!(delivery.zone.as_ref().map(Zone::as_str), Some("zone-1"));
    assert_eq!(net.nodes[&1].stats().published, 1);
    assert_eq!(net.nodes[&2].stats().received, 1);
}

#[test]
fn a_key_already_pending_coalesces() {
    let mut net = cluster(3, 3);
    let node = net.node(0);
    assert_eq!(
        node.publish(Instant::ZERO, Invalidation::key("k")).unwrap(),
        Published::Queued
    );
    assert_eq!(
        node.publish(Instant::ZERO, Invalidation::key("k")).unwrap(),
        Published::Coalesced
    );
    assert_eq!(
        node.publish(Instant::ZERO, Invalidation::lease("k"))
            .unwrap(),
        Published::Queued
    );
    net.drain(0);
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.keys_at(1), ["k", "k"]);
    let kinds: Vec<_> = net.deliveries[&1]
        .iter()
        .map(|d| d.invalidation.kind)
        .collect();
    assert_eq!(kinds, [InvalidationKind::Key, InvalidationKind::Lease]);
    assert_eq!(net.nodes[&0].stats().coalesced, 1);
}

#[test]
fn large_bursts_split_into_datagrams_within_the_limit() {
    let mut net = cluster(2, 4);
    let keys: Vec<String> = (0..2000).map(|i| format!("{i:040}")).collect();
    let node = net.node(0);
    for key in &keys {
        node.publish(Instant::ZERO, Invalidation::key(key.clone()))
            .unwrap();
    }
    let transmits: Vec<Transmit> = std::iter::from_fn(|| node.poll_transmit()).collect();
    assert!(
        transmits.len() < 100,
        "{} datagrams for 2000 keys",
        transmits.len()
    );
    let now = net.now;
    for transmit in transmits {
        assert!(
            transmit.payload.len() <= 1400,
            "{} bytes",
            transmit.payload.len()
        );
        net.node(1).handle_packet(now, addr(0), &transmit.payload);
    }
    net.drain(1);
    assert_eq!(net.keys_at(1), keys);
}

#[test]
fn keys_that_cannot_fit_are_refused() {
    let mut net = cluster(2, 5);
    let node = net.node(0);
    let error = node
        .publish(Instant::ZERO, Invalidation::key("x".repeat(513)))
        .unwrap_err();
    assert_eq!(error, PublishError::KeyTooLarge { len: 513, max: 512 });
    let mut huge_clock = Invalidation::key("k");
    for writer in 0..200 {
        huge_clock
            .vector_clock
            .0
            .insert(format!("writer-{writer}"), u64::MAX);
    }
    assert!(matches!(
        node.publish(Instant::ZERO, huge_clock),
        Err(PublishError::KeyTooLarge { .. })
    ));
    assert_eq!(node.stats().published, 0);
}

#[test]
fn a_node_started_before_its_seed_joins_when_the_seed_appears() {
    let mut net = Net::new(6);
    net.start(1, config(1, &[0]));
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.nodes[&1].members().len(), 0);
    net.start(0, config(0, &[]));
    assert!(net.run_until(Duration::from_secs(2), |n| n.converged(2)));
}

#[test]
fn a_leaving_node_is_seen_gone_before_failure_detection_would_notice() {
    let mut net = cluster(5, 7);
    let now = net.now;
    net.node(4).leave(now);
    net.drain(4);
    assert!(net.node(4).has_left());
    assert!(
        net.node(4)
            .publish(Instant::ZERO, Invalidation::key("late"))
            .is_err()
    );
    let start = net.now;
    let gone = |n: &Net| (0..4).all(|i| n.nodes[&i].members().all(|m| m.addr != addr(4)));
    assert!(net.run_until(Duration::from_secs(5), gone));
    let took = net.now.saturating_duration_since(start);
    assert!(took < Duration::from_millis(300), "took {took:?}");
}

#[test]
fn a_restart_on_the_same_address_replaces_the_old_identity() {
    let mut net = cluster(3, 8);
    net.nodes.remove(&2);
    let mut restarted = config(2, &[0]);
    restarted.node_id = NodeId(999);
    restarted.generation = 2;
    net.start(2, restarted);
    let replaced = |n: &Net| {
        (0..2).all(|i| {
            let ids: Vec<_> = n.nodes[&i].members().map(|m| m.id).collect();
            ids.len() == 2 && ids.contains(&NodeId(999))
        })
    };
    assert!(net.run_until(Duration::from_secs(5), replaced));
    let events = &net.member_events[&0];
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::MemberDown(m) if m.id == NodeId(102)))
    );
}

#[test]
fn foreign_and_malformed_datagrams_are_counted_not_fatal() {
    let mut net = cluster(2, 9);
    let now = net.now;
    let node = net.node(0);
    let mut foreign = Vec::new();
    wire::write_header(
        &mut foreign,
        wire::MessageKind::Data,
        wire::ClusterId::from_name("other"),
    );
    node.handle_packet(now, addr(9), &wire::checksummed(foreign));
    node.handle_packet(now, addr(9), b"hello, this is not syncbus");
    node.handle_packet(now, addr(9), b"SB\x01\x02\x00");
    let mut bad_body = Vec::new();
    wire::write_header(
        &mut bad_body,
        wire::MessageKind::Data,
        wire::ClusterId::from_name("syncbus"),
    );
    bad_body.extend_from_slice(&[0xff; 40]);
    let bad_body = wire::checksummed(bad_body);
    node.handle_packet(now, addr(9), &bad_body);
    let mut damaged = bad_body.to_vec();
    damaged[wire::HEADER_LEN + 3] ^= 1;
    node.handle_packet(now, addr(9), &damaged);
    node.handle_packet(now, addr(9), &vec![0; 2000]);
    let dropped = &node.stats().dropped;
    assert_eq!(dropped.wrong_cluster, 1);
    assert_eq!(dropped.bad_magic, 1);
    assert_eq!(dropped.truncated, 1);
    assert_eq!(dropped.malformed, 1);
    assert_eq!(dropped.corrupt, 1);
    assert_eq!(dropped.oversize, 1);
    assert_eq!(dropped.total(), 6);
}

/// Five nodes, and a sixth (5) whose member table holds three, after it had time to
/// fill up.
fn cluster_with_a_full_node() -> Net {
    let mut net = cluster(5, 31);
    let mut limited = config(5, &[0]);
    limited.max_members = 3;
    net.start(5, limited);
    net.run_for(Duration::from_secs(15));
    net
}

#[test]
fn the_member_table_holds_at_most_max_members() {
    let net = cluster_with_a_full_node();
    let node = &net.nodes[&5];
    assert!(node.members().len() <= 3, "{}", node.members().len());
    assert!(node.stats().dropped.member_limit > 0);
    // It still takes part: the members it holds see it, and it sees them.
    assert_eq!(node.members().len(), 3);
    let seen_by = (0..5)
        .filter(|&i| net.nodes[&i].members().any(|m| m.addr == addr(5)))
        .count();
    assert!(seen_by >= 3, "seen by {seen_by}");
    let mut zero = config(0, &[]);
    zero.max_members = 0;
    let error = Node::new(zero, Instant::ZERO).err().unwrap();
    assert!(error.to_string().contains("max_members"), "{error}");
}

/// A membership datagram from `from` to `to`, laid out as foca lays it out, carrying
/// `updates`.
fn membership_datagram(
    net: &Net,
    from: usize,
    to: usize,
    updates: &[foca::Member<Member>],
) -> Bytes {
    let header = foca::Header {
        src: member_seen(net, from, to),
        src_incarnation: 0,
        dst: member_seen(net, to, from),
        message: foca::Message::Gossip,
    };
    encode_membership(&header, Some(updates))
}

/// A notice, from the identity `sender`, that node `to` is down.
fn down_notice(net: &Net, sender: &Member, to: usize) -> Bytes {
    let header = foca::Header {
        src: sender.clone(),
        src_incarnation: 0,
        dst: net.nodes[&to].local().clone(),
        message: foca::Message::TurnUndead,
    };
    encode_membership(&header, None)
}

/// A membership datagram: `header`, then, for messages that carry them, `updates`.
fn encode_membership(
    header: &foca::Header<Member>,
    updates: Option<&[foca::Member<Member>]>,
) -> Bytes {
    let mut datagram = Vec::new();
    let cluster = wire::ClusterId::from_name("syncbus");
    wire::write_header(&mut datagram, wire::MessageKind::Membership, cluster);
    datagram.extend_from_slice(&crate::swim_codec::encode_message(header, updates));
    wire::checksummed(datagram)
}

#[test]
fn a_sender_with_an_overlong_zone_is_refused_and_probing_goes_on() {
    let mut net = cluster(2, 7);
    for (port, name, refused) in [(9, "z".repeat(64), false), (10, "z".repeat(300), true)] {
        let forged = Member {
            id: NodeId(0xdead + port as u64),
            addr: addr(port),
            zone: Zone::unchecked(&name),
            generation: 1,
        };
        let header = foca::Header {
            src: forged.clone(),
            src_incarnation: 0,
            dst: net.nodes[&0].local().clone(),
            message: foca::Message::Gossip,
        };
        let before = net.nodes[&0].stats().dropped.membership;
        let now = net.now;
        net.node(0)
            .handle_packet(now, addr(port), &encode_membership(&header, Some(&[])));
        net.drain(0);
        let dropped = net.nodes[&0].stats().dropped.membership - before;
        assert_eq!(dropped, u64::from(refused), "zone of {}", name.len());
    }
    // foca, had it taken the second sender in, would have stopped probing.
    net.run_for(Duration::from_secs(5));
    net.crash(1);
    assert!(net.run_until(Duration::from_secs(30), |n| {
        !n.nodes[&0].members().any(|m| m.addr == addr(1))
    }));
}

#[test]
fn notices_from_a_member_held_down_are_ignored_only_for_a_grace() {
    let mut net = cluster(5, 41);
    // Node 0 holds node 4 down, and node 4 (in this test) holds node 0 down: each
    // still holds more members live than down.
    let four = member_seen(&net, 4, 0);
    let now = net.now;
    let death = membership_datagram(&net, 1, 0, &[foca::Member::down(four.clone())]);
    net.node(0).handle_packet(now, addr(1), &death);
    assert!(!net.nodes[&0].members().any(|m| m.addr == addr(4)));
    let generation = net.nodes[&0].local().generation;
    let ignored = |net: &Net| net.nodes[&0].stats().down_notices_ignored;
    let grace = config(0, &[]).membership.rejoin_interval * 10;
    // Within the grace from the first, the sender may be the smaller side of a heal
    // about to renew: ignored.
    let notice = down_notice(&net, &four, 0);
    net.node(0).handle_packet(now, addr(4), &notice);
    net.node(0).handle_packet(now + grace / 2, addr(4), &notice);
    assert_eq!(ignored(&net), 2);
    assert_eq!(net.nodes[&0].local().generation, generation);
    // Another identity's first notice starts its own grace.
    let renewed_four = Member {
        generation: four.generation + 1,
        ..four.clone()
    };
    let other = down_notice(&net, &renewed_four, 0);
    net.node(0).handle_packet(now + grace, addr(4), &other);
    assert_eq!(ignored(&net), 3);
    assert_eq!(net.nodes[&0].local().generation, generation);
    // The same sender past the grace is not renewing: node 0 renews.
    net.node(0).handle_packet(now + grace, addr(4), &notice);
    assert_eq!(ignored(&net), 3);
    assert!(net.nodes[&0].local().generation > generation);
    // It forgets node 4 and announces itself to it, without telling it in turn that
    // it is down (node 4 would act on that once it knows the new identity as live).
    let messages: Vec<foca::Message<Member>> = std::iter::from_fn(|| net.node(0).poll_transmit())
        .filter(|transmit| transmit.destination == addr(4))
        .map(|transmit| {
            use foca::Codec as _;
            let (_, mut body) = wire::read_header(&transmit.payload).unwrap();
            let mut codec = crate::swim_codec::SwimCodec::default();
            codec.decode_header(&mut body).unwrap().message
        })
        .collect();
    assert!(messages.contains(&foca::Message::Announce), "{messages:?}");
    assert!(
        !messages.contains(&foca::Message::TurnUndead),
        "{messages:?}"
    );
}

#[test]
fn gossip_of_what_foca_holds_is_dropped_before_foca_reads_it() {
    let mut net = cluster(4, 12);
    assert!(net.run_until(Duration::from_secs(5), |net| net.converged(4)));
    let known = member_seen(&net, 2, 0);
    assert_eq!(
        net.nodes[&0].debug_entry(addr(2)),
        Some((0, foca::State::Alive))
    );
    let stranger = Member {
        id: NodeId(999),
        addr: addr(9),
        zone: Zone::default(),
        generation: 1,
    };
    let held = |net: &Net| net.nodes[&0].stats().member_updates_already_held;
    let before = held(&net);
    // A copy of what node 0 holds goes; a suspicion of it and a new member reach foca.
    let updates = [
        foca::Member::alive(known.clone()),
        foca::Member::new(known.clone(), 0, foca::State::Suspect),
        foca::Member::alive(stranger.clone()),
    ];
    let datagram = membership_datagram(&net, 1, 0, &updates);
    let now = net.now;
    net.node(0).handle_packet(now, addr(1), &datagram);
    assert_eq!(held(&net), before + 1);
    assert_eq!(
        net.nodes[&0].debug_entry(addr(2)),
        Some((0, foca::State::Suspect))
    );
    assert!(net.nodes[&0].members().any(|m| m.id == stranger.id));
    // The view, taken before, still says alive; foca's suspicion is graver, so foca
    // would ignore the copy too.
    let copy = membership_datagram(&net, 1, 0, &updates[..1]);
    net.node(0).handle_packet(now, addr(1), &copy);
    assert_eq!(held(&net), before + 2);
    // A member's own address always reaches foca, which refutes what it hears of it.
    let about_itself = [foca::Member::alive(member_seen(&net, 0, 1))];
    let datagram = membership_datagram(&net, 1, 0, &about_itself);
    net.node(0).handle_packet(now, addr(1), &datagram);
    assert_eq!(held(&net), before + 2);
}

/// Node `of` as node `seen_by` knows it.
fn member_seen(net: &Net, of: usize, seen_by: usize) -> Member {
    let seen = net.nodes[&seen_by].members();
    seen.into_iter()
        .find(|m| m.addr == addr(of))
        .unwrap()
        .clone()
}

#[test]
fn gossip_of_a_member_foca_forgot_reaches_foca_however_recent_the_view() {
    // Node 0 forgets members declared down after 100 ms, well within a view's age.
    let mut net = Net::new(21);
    for index in 0..4 {
        let mut config = config(index, if index == 0 { &[] } else { &[0] });
        if index == 0 {
            config.membership.remove_down_after = Duration::from_millis(100);
        }
        net.start(index, config);
    }
    assert!(net.run_until(Duration::from_secs(5), |net| net.converged(4)));
    net.partition = Some(([0].into(), [1, 2, 3].into()));
    let known = member_seen(&net, 2, 0);
    let alive = membership_datagram(&net, 1, 0, &[foca::Member::alive(known.clone())]);
    let down = membership_datagram(&net, 1, 0, &[foca::Member::down(known.clone())]);
    let now = net.now;
    net.node(0).handle_packet(now, addr(1), &alive);
    net.node(0).handle_packet(now, addr(1), &down);
    net.drain(0);
    net.run_for(Duration::from_millis(200));
    assert_eq!(net.nodes[&0].debug_entry(addr(2)), None, "forgotten");
    let now = net.now;
    net.node(0).handle_packet(now, addr(1), &alive);
    assert_eq!(
        net.nodes[&0].debug_entry(addr(2)),
        Some((0, foca::State::Alive))
    );
}

#[test]
fn gossip_naming_two_identities_that_tie_is_not_cut() {
    let mut net = cluster(4, 22);
    assert!(net.run_until(Duration::from_secs(5), |net| net.converged(4)));
    let real = member_seen(&net, 2, 0);
    // Same id, generation and address, another zone: neither identity wins, and foca
    // keeps whichever it heard last.
    let twin = Member {
        zone: Zone::new("elsewhere").unwrap(),
        ..real.clone()
    };
    let zone_at_0 = |net: &Net| member_seen(net, 2, 0).zone;
    let now = net.now;
    let datagram = membership_datagram(&net, 1, 0, &[foca::Member::alive(twin.clone())]);
    net.node(0).handle_packet(now, addr(1), &datagram);
    net.drain(0);
    assert_eq!(zone_at_0(&net).as_str(), "elsewhere");
    // The real identity again: a copy of what the view holds, yet foca takes it.
    let datagram = membership_datagram(&net, 1, 0, &[foca::Member::alive(real.clone())]);
    net.node(0).handle_packet(now, addr(1), &datagram);
    net.drain(0);
    assert_eq!(zone_at_0(&net), real.zone);
    // Both in one datagram: foca ends with the last.
    let both = [foca::Member::alive(twin), foca::Member::alive(real.clone())];
    let datagram = membership_datagram(&net, 1, 0, &both);
    net.node(0).handle_packet(now, addr(1), &datagram);
    net.drain(0);
    assert_eq!(zone_at_0(&net), real.zone);
}

#[test]
fn updates_cut_for_the_member_limit_are_not_counted_as_held() {
    let mut net = cluster_with_a_full_node();
    let sender = net.nodes[&5].members().next().unwrap().addr;
    let sender = (0..5).find(|&i| addr(i) == sender).unwrap();
    let stranger = |i: u64| Member {
        id: NodeId(900 + i),
        addr: SocketAddr::from(([127, 0, 0, 9], 9000 + i as u16)),
        zone: Zone::default(),
        generation: 1,
    };
    let updates = [
        foca::Member::alive(stranger(1)),
        foca::Member::alive(stranger(2)),
    ];
    let datagram = membership_datagram(&net, sender, 5, &updates);
    let before = net.nodes[&5].stats().clone();
    let now = net.now;
    net.node(5).handle_packet(now, addr(sender), &datagram);
    let after = net.nodes[&5].stats();
    assert_eq!(after.dropped.member_limit, before.dropped.member_limit + 2);
    assert_eq!(
        after.member_updates_already_held,
        before.member_updates_already_held
    );
}

#[test]
fn a_lost_datagram_is_repaired_from_the_origin() {
    let mut net = cluster(3, 10);
    net.publish(0, "a");
    net.run_for(Duration::from_millis(10));
    net.drop_data_to = Some(2);
    net.publish(0, "b");
    net.run_for(Duration::from_millis(10));
    net.publish(0, "c");
    net.run_for(Duration::from_millis(5));
    assert_eq!(net.keys_at(2), ["a", "c"], "b is missing until repaired");
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.keys_at(2), ["a", "c", "b"]);
    assert!(!net.resyncs.contains_key(&2));
    assert!(net.nodes[&2].stats().repairs_requested >= 1);
    assert!(net.nodes[&0].stats().retransmitted >= 1);
}

#[test]
fn loss_of_the_newest_entry_shows_in_a_digest_and_is_repaired() {
    let mut net = cluster(3, 15);
    net.publish(0, "a");
    net.run_for(Duration::from_millis(10));
    net.drop_data_to = Some(2);
    net.publish(0, "last");
    // Nothing follows "last": only the origin's digest can reveal the loss.
    let digest = NodeConfig::new(NodeId(0), addr(0), Zone::default()).digest_interval;
    net.run_for(digest + Duration::from_millis(50));
    assert_eq!(net.keys_at(2), ["a", "last"]);
    assert!(!net.resyncs.contains_key(&2));
}

#[test]
fn a_hole_the_origin_no_longer_retains_becomes_one_resync() {
    let mut net = Net::new(16);
    for index in 0..3 {
        let mut config = config(index, if index == 0 { &[] } else { &[0] });
        config.retention = 4;
        net.start(index, config);
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(3)));
    net.publish(0, "first");
    net.run_for(Duration::from_millis(10));
    net.cut_data.insert((0, 2));
    for i in 0..20 {
        net.publish(0, &format!("k{i}"));
        net.run_for(Duration::from_millis(2));
    }
    net.cut_data.clear();
    net.publish(0, "after");
    net.run_for(Duration::from_secs(1));
    // 20 entries were missed; the origin kept the last 4 (k17, k18, k19, after).
    assert_eq!(net.resyncs[&2], [(NodeId(100), 17)]);
    assert_eq!(net.keys_at(2), ["first", "after", "k17", "k18", "k19"]);
    assert_eq!(net.keys_at(1).len(), 22);
}

#[test]
fn holes_left_by_an_origin_that_died_become_resyncs() {
    let mut net = cluster(3, 17);
    net.publish(0, "a");
    net.run_for(Duration::from_millis(10));
    net.drop_data_to = Some(2);
    net.publish(0, "b");
    net.run_for(Duration::from_millis(2));
    net.publish(0, "c");
    net.run_for(Duration::from_millis(2));
    net.crash(0);
    net.run_for(Duration::from_secs(5));
    assert_eq!(net.keys_at(2), ["a", "c"]);
    assert_eq!(net.resyncs[&2], [(NodeId(100), 1)]);
}

#[test]
fn reordered_first_datagrams_are_both_delivered() {
    let mut net = cluster(2, 18);
    let node = net.node(0);
    node.publish(Instant::ZERO, Invalidation::key("a")).unwrap();
    while node.poll_event().is_some() {}
    let first: Vec<Transmit> = std::iter::from_fn(|| node.poll_transmit()).collect();
    node.publish(Instant::ZERO, Invalidation::key("b")).unwrap();
    while node.poll_event().is_some() {}
    let second: Vec<Transmit> = std::iter::from_fn(|| node.poll_transmit()).collect();
    let now = net.now;
    for transmit in second
        .iter()
        .chain(&first)
        .filter(|t| t.destination == addr(1))
    {
        net.node(1).handle_packet(now, addr(0), &transmit.payload);
    }
    net.drain(1);
    assert_eq!(net.keys_at(1), ["b", "a"]);
}

#[test]
fn duplicated_datagrams_deliver_once() {
    let mut net = cluster(2, 11);
    net.node(0)
        .publish(Instant::ZERO, Invalidation::key("dup"))
        .unwrap();
    let transmit = net.node(0).poll_transmit().unwrap();
    let now = net.now;
    for _ in 0..3 {
        net.node(1).handle_packet(now, addr(0), &transmit.payload);
    }
    net.drain(1);
    assert_eq!(net.keys_at(1), ["dup"]);
    assert_eq!(net.nodes[&1].stats().duplicates, 2);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut net = cluster(5, seed);
        net.loss = 0.1;
        for i in 0..50 {
            net.publish(i % 5, &format!("key-{i}"));
            net.run_for(Duration::from_millis(7));
        }
        net.run_for(Duration::from_secs(3));
        (net.trace.finish(), net.sent)
    };
    assert_eq!(run(12), run(12));
    assert_ne!(run(12).0, run(13).0);
}

#[test]
fn under_random_loss_every_invalidation_is_delivered_or_resynced() {
    for seed in 14..20 {
        let mut net = cluster(5, seed);
        net.loss = 0.2;
        let mut published: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for i in 0..200 {
            let key = format!("key-{i}");
            net.publish(i % 5, &key);
            published.entry(i % 5).or_default().push(key);
            net.run_for(Duration::from_millis(5));
        }
        net.run_for(Duration::from_secs(5));
        for receiver in 0..5 {
            let got: BTreeSet<String> = net.keys_at(receiver).into_iter().collect();
            let resyncs = net.resyncs.get(&receiver).into_iter().flatten();
            let resynced: BTreeSet<NodeId> = resyncs.map(|(origin, _)| *origin).collect();
            for (origin, keys) in &published {
                if resynced.contains(&NodeId(100 + *origin as u64)) {
                    continue;
                }
                for key in keys {
                    assert!(
                        got.contains(key),
                        "seed {seed}: node {receiver} lost {key} silently"
                    );
                }
            }
        }
    }
}

fn ids(acks: &Acks) -> Vec<u64> {
    acks.nodes.iter().map(|id| id.0).collect()
}

#[test]
fn an_awaited_publish_completes_when_enough_replicas_acknowledge() {
    let mut net = cluster(5, 20);
    let id = net.awaited(0, "k", Goal::Replicas(4), Duration::from_secs(5));
    net.run_for(Duration::from_millis(20));
    let acks = net.outcome(0, id).unwrap().clone().unwrap();
    assert_eq!(ids(&acks), [101, 102, 103, 104]);
    assert_eq!(acks.zones.len(), 3);
    assert_eq!(net.nodes[&0].awaits_in_flight(), 0);
    // Completion came with the acknowledgements, not at the deadline.
    assert!(net.awaits[&0].len() == 1);
}

#[test]
fn a_zone_goal_counts_distinct_zones_of_remote_nodes() {
    let mut net = cluster(6, 21);
    let id = net.awaited(0, "k", Goal::Zones(3), Duration::from_secs(5));
    net.run_for(Duration::from_millis(20));
    let acks = net.outcome(0, id).unwrap().clone().unwrap();
    assert!(acks.zones.len() >= 3, "{acks:?}");
    assert!(
        !acks.nodes.contains(&NodeId(100)),
        "the publisher never counts itself"
    );
}

#[test]
fn a_goal_the_members_cannot_meet_fails_at_once() {
    let mut net = cluster(5, 22);
    let now = net.now;
    let node = net.node(0);
    let error = node
        .publish_awaited(now, Invalidation::key("k"), Goal::Replicas(5), now)
        .unwrap_err();
    assert_eq!(
        error,
        PublishError::Unreachable {
            required: 5,
            available: 4
        }
    );
    let error = node
        .publish_awaited(now, Invalidation::key("k"), Goal::Zones(4), now)
        .unwrap_err();
    assert_eq!(
        error,
        PublishError::Unreachable {
            required: 4,
            available: 3
        }
    );
    assert_eq!(node.stats().published, 0);
}

#[test]
fn silent_members_get_retransmissions_until_they_acknowledge() {
    let mut net = cluster(4, 23);
    net.drop_data_to = Some(3);
    let id = net.awaited(0, "k", Goal::Replicas(3), Duration::from_secs(5));
    net.run_for(Duration::from_millis(20));
    assert!(net.outcome(0, id).is_none(), "node 3 has not seen it yet");
    net.run_for(Duration::from_millis(200));
    assert_eq!(
        ids(&net.outcome(0, id).unwrap().clone().unwrap()),
        [101, 102, 103]
    );
    assert!(net.nodes[&0].stats().retransmitted >= 1);
    assert_eq!(net.keys_at(3), ["k"]);
}

#[test]
fn the_deadline_reports_who_acknowledged() {
    let mut net = cluster(4, 24);
    net.cut_data.insert((0, 3));
    let id = net.awaited(0, "k", Goal::Replicas(3), Duration::from_secs(1));
    net.run_for(Duration::from_millis(999));
    assert!(net.outcome(0, id).is_none());
    net.run_for(Duration::from_millis(2));
    let Some(Err(AwaitFailure::Timeout { acked })) = net.outcome(0, id) else {
        panic!("{:?}", net.awaits);
    };
    assert_eq!(ids(acked), [101, 102]);
    assert_eq!(net.nodes[&0].awaits_in_flight(), 0);
}

#[test]
fn a_member_dying_mid_flight_fails_the_goal_before_the_deadline() {
    let mut net = cluster(4, 25);
    net.cut_data.insert((0, 3));
    let id = net.awaited(0, "k", Goal::Replicas(3), Duration::from_secs(60));
    net.crash(3);
    assert!(net.run_until(Duration::from_secs(10), |n| n.outcome(0, id).is_some()));
    let Some(Err(AwaitFailure::Unreachable { acked, available })) = net.outcome(0, id) else {
        panic!("{:?}", net.awaits);
    };
    assert_eq!((ids(acked), *available), (vec![101, 102], 2));
}

#[test]
fn cancelling_an_await_frees_it_and_still_publishes() {
    let mut net = cluster(3, 26);
    net.cut_data.insert((0, 2));
    let id = net.awaited(0, "k", Goal::Replicas(2), Duration::from_secs(5));
    assert_eq!(net.nodes[&0].awaits_in_flight(), 1);
    net.node(0).cancel_await(id);
    assert_eq!(net.nodes[&0].awaits_in_flight(), 0);
    net.run_for(Duration::from_secs(6));
    assert!(net.outcome(0, id).is_none());
    assert_eq!(net.keys_at(1), ["k"]);
}

#[test]
fn a_thousand_awaited_publishes_share_few_ack_datagrams() {
    let mut net = cluster(3, 27);
    let now = net.now;
    let node = net.node(0);
    let ids: Vec<AwaitId> = (0..1000)
        .map(|i| {
            let key = Invalidation::key(format!("k{i}"));
            node.publish_awaited(now, key, Goal::Replicas(2), now + Duration::from_secs(5))
                .unwrap()
        })
        .collect();
    net.drain(0);
    let acks_before = net.sent_of(1, wire::MessageKind::Ack);
    net.run_for(Duration::from_millis(50));
    let done = ids
        .iter()
        .filter(|id| matches!(net.outcome(0, **id), Some(Ok(_))))
        .count();
    assert_eq!(done, 1000);
    let ack_datagrams = net.sent_of(1, wire::MessageKind::Ack) - acks_before;
    assert!(
        ack_datagrams <= 20,
        "{ack_datagrams} ack datagrams for 1000 entries"
    );
}

fn zoned_cluster(per_zone: usize, zones: usize, seed: u64) -> Net {
    zoned_cluster_with(per_zone, zones, seed, |_, _| {})
}

/// A converged cluster of `zones` zones of `per_zone` nodes, each node's config
/// changed by `tweak` first.
fn zoned_cluster_with(
    per_zone: usize,
    zones: usize,
    seed: u64,
    tweak: impl Fn(usize, &mut NodeConfig),
) -> Net {
    let mut net = Net::new(seed);
    for index in 0..per_zone * zones {
        let mut c = config(index, if index == 0 { &[] } else { &[0] });
        c.zone = Zone::new(format!("zone-{}", index % zones)).unwrap();
        tweak(index, &mut c);
        net.start(index, c);
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(per_zone * zones)));
    net
}

#[test]
fn other_zones_get_one_copy_per_relay_and_relays_complete_them() {
    let mut net = zoned_cluster(3, 3, 28);
    let before = net.nodes[&0].stats().clone();
    net.publish(0, "k");
    let after = net.nodes[&0].stats().clone();
    // Two relays in each of the two other zones; both other members of zone 0 direct.
    assert_eq!(
        after.datagrams_sent_across_zones - before.datagrams_sent_across_zones,
        4
    );
    assert_eq!(
        after.datagrams_sent_in_zone - before.datagrams_sent_in_zone,
        2
    );
    net.run_for(Duration::from_millis(20));
    for index in 0..9 {
        assert_eq!(net.keys_at(index), ["k"], "node {index}");
    }
}

/// Data datagrams delivered from now on, by receiving node.
fn count_data_received(net: &mut Net) -> Rc<RefCell<BTreeMap<usize, usize>>> {
    let counts = Rc::new(RefCell::new(BTreeMap::new()));
    let counting = Rc::clone(&counts);
    let data = wire::MessageKind::Data as u8;
    net.filter = Some(Box::new(move |_, to, payload| {
        if payload.get(3) == Some(&data) {
            *counting.borrow_mut().entry(to).or_default() += 1;
        }
        false
    }));
    counts
}

#[test]
fn two_relays_of_a_zone_each_forward_to_half_of_it_while_there_is_no_loss() {
    let (per_zone, zones) = (8, 3);
    let mut net = zoned_cluster(per_zone, zones, 91);
    let received = count_data_received(&mut net);
    net.publish(0, "k");
    net.run_for(Duration::from_millis(20));
    let received = received.borrow();
    for zone in 1..zones {
        let members: Vec<usize> = (0..per_zone * zones)
            .filter(|i| i % zones == zone)
            .collect();
        assert!(members.iter().all(|i| net.keys_at(*i) == ["k"]));
        // One copy each; a relay in the other relay's half gets a second.
        let copies: usize = members
            .iter()
            .map(|i| received.get(i).copied().unwrap_or(0))
            .sum();
        assert!(
            (per_zone..=per_zone + 2).contains(&copies),
            "zone {zone}: {copies} copies for {per_zone} members"
        );
    }
}

#[test]
fn after_loss_both_relays_forward_to_the_whole_zone() {
    let (per_zone, zones) = (8, 3);
    let mut net = zoned_cluster(per_zone, zones, 92);
    // Node 0 misses node 1's entry and asks for it: it has seen loss.
    let cut = cut_data_to(&mut net, 0);
    net.publish(1, "x");
    net.run_for(Duration::from_millis(20));
    cut.set(false);
    net.publish(1, "y");
    assert!(net.run_until(Duration::from_secs(5), |n| n.keys_at(0).len() == 2));
    assert!(net.nodes[&0].stats().repairs_requested > 0);
    let received = count_data_received(&mut net);
    net.publish(0, "k");
    net.run_for(Duration::from_millis(20));
    let received = received.borrow();
    for index in (0..per_zone * zones).filter(|i| i % zones != 0) {
        // Two copies: one from each relay, or, for a relay, its own and the other's.
        assert_eq!(received.get(&index), Some(&2), "node {index}");
    }
}

#[test]
fn when_the_relays_die_mid_flight_repair_completes_the_zone() {
    let mut net = zoned_cluster(3, 3, 29);
    net.publish(0, "k");
    let relays: BTreeSet<usize> = net
        .in_flight
        .values()
        .filter(|(_, _, payload)| payload.get(4).is_some_and(|f| f & wire::FLAG_FORWARD != 0))
        .filter_map(|(_, to, _)| net.index_of(*to))
        .collect();
    assert_eq!(relays.len(), 4);
    for relay in &relays {
        net.crash(*relay);
    }
    net.run_for(Duration::from_secs(1));
    for index in (0..9).filter(|i| !relays.contains(i)) {
        assert_eq!(net.keys_at(index), ["k"], "node {index}");
    }
}

#[test]
fn the_halves_of_a_healed_partition_converge_and_catch_up() {
    let mut net = halves_that_forgot_each_other(30);
    net.partition = None;
    assert!(net.run_until(Duration::from_secs(30), |n| n.converged(6)));
    net.publish(0, "after");
    net.run_for(Duration::from_secs(1));
    for index in 3..6 {
        let got = net.keys_at(index);
        let resynced = net.resyncs.contains_key(&index);
        assert!(got.contains(&"after".to_owned()), "node {index}: {got:?}");
        assert!(
            got.contains(&"during".to_owned()) || resynced,
            "node {index} lost it silently"
        );
    }
}

#[test]
fn members_returning_from_a_partition_get_digests_and_the_rest_none() {
    let mut net = halves_that_forgot_each_other(31);
    net.partition = None;
    // Digests node 0 sends to each node from the heal on (it publishes nothing more).
    let digests = log_digests(&mut net, 0);
    assert!(net.run_until(Duration::from_secs(30), |n| n.converged(6)));
    net.run_for(Duration::from_secs(5));
    let sent: Vec<usize> = (0..6).map(|node| digests.to(node)).collect();
    // Its own half has had everything since before the partition.
    assert_eq!(sent[1..3], [0, 0], "digests by destination: {sent:?}");
    for index in 3..6 {
        assert!(sent[index] > 0, "digests by destination: {sent:?}");
        let got = net.keys_at(index);
        assert!(
            got.contains(&"during".to_owned()) || net.resyncs.contains_key(&index),
            "node {index} lost it silently"
        );
    }
}

mod faults;
mod sealing;
mod sync;

#[test]
fn two_nodes_heal_after_one_stopped_hearing_the_other() {
    // Node 0 stops hearing node 1 for 9 s: it declares node 1 down, and node 1, told so,
    // renews its identity. Node 0 is then alone, with no seed and no foca timers
    // running; node 1 keeps node 0 as a suspect, with no foca timers either. Both must
    // still find each other.
    let mut net = Net::new(3);
    for (index, seeds) in [(0, vec![]), (1, vec![0])] {
        let mut config = config(index, &seeds);
        config.membership = MembershipConfig::lan();
        net.start(index, config);
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(2)));
    let cut = std::rc::Rc::new(std::cell::Cell::new(true));
    let active = cut.clone();
    net.filter = Some(Box::new(move |from, to, _| {
        active.get() && from == 1 && to == 0
    }));
    net.run_for(Duration::from_secs(9));
    cut.set(false);
    assert!(net.run_until(Duration::from_secs(15), |n| n.converged(2)));
    net.run_for(Duration::from_secs(2));
    net.publish(0, "from-0");
    net.publish(1, "from-1");
    net.run_for(Duration::from_secs(1));
    assert!(
        net.keys_at(1).contains(&"from-0".to_owned()),
        "{:?}",
        net.keys_at(1)
    );
    assert!(
        net.keys_at(0).contains(&"from-1".to_owned()),
        "{:?}",
        net.keys_at(0)
    );
}

#[test]
fn zone_sizes_follow_the_member_table() {
    let by_zone = |net: &Net, index: usize| {
        let mut sizes: BTreeMap<String, usize> = BTreeMap::new();
        for member in net.nodes[&index].members() {
            *sizes.entry(member.zone.as_str().to_owned()).or_default() += 1;
        }
        sizes
    };
    let reported = |net: &Net, index: usize| {
        let sizes = net.nodes[&index].zone_sizes();
        sizes
            .map(|(zone, size)| (zone.as_str().to_owned(), size))
            .collect::<BTreeMap<_, _>>()
    };
    let mut net = cluster(5, 83);
    for index in 0..5 {
        assert_eq!(reported(&net, index), by_zone(&net, index));
    }
    // Zones are the index modulo 3: node 0 sees nodes 1 and 4 in zone-1.
    assert_eq!(reported(&net, 0).get("zone-1"), Some(&2));
    // Node 4 stops: once it is declared down, its zone counts one fewer.
    net.nodes.remove(&4);
    assert!(
        net.run_until(Duration::from_secs(10), |n| n.nodes[&0].members().len()
            == 3)
    );
    assert_eq!(reported(&net, 0), by_zone(&net, 0));
    assert_eq!(reported(&net, 0).get("zone-1"), Some(&1));
}

#[test]
fn relayed_zones_get_every_digest_round_only_while_members_ask_for_repairs() {
    let mut net = zoned_cluster(3, 3, 84);
    let digests = log_digests(&mut net, 0);
    // No loss seen: two other zones, three rounds each.
    net.publish(0, "a");
    net.run_for(Duration::from_secs(2));
    assert_eq!(digests.relayed(), 6);
    // A member asks for a repair: every round goes, five to each zone.
    let cluster_id = wire::ClusterId::from_name("syncbus");
    let origin = net.nodes[&0].local().id;
    let ask = wire::encode_repair(cluster_id, origin, &[(1, 1)]);
    let now = net.now;
    net.node(0).handle_packet(now, addr(4), &ask);
    net.drain(0);
    digests.clear();
    net.publish(0, "b");
    net.run_for(Duration::from_secs(2));
    assert_eq!(digests.relayed(), 10);
}

#[test]
fn an_origins_rounds_take_distinct_relays_when_its_timer_fires_late() {
    // Zones of three: each relayed zone has as many members as relayed rounds.
    let mut net = zoned_cluster(3, 3, 87);
    let interval = NodeConfig::new(NodeId(0), addr(0), Zone::default()).digest_interval;
    let slot = interval.as_nanos() as u64;
    // The origin's timers fire 1 ms late, and it publishes 1.5 ms before a slot ends:
    // its second round fires just past the end of the slot after the first's, and a
    // relay read off the clock would skip a slot, sending the first and the third
    // round to the same member of a zone of three.
    net.timer_lag.insert(0, Duration::from_millis(1));
    let to_slot_end = slot - net.now.as_nanos() % slot;
    net.run_for(Duration::from_nanos(to_slot_end + slot - 1_500_000));
    let digests = log_digests(&mut net, 0);
    let relays = std::rc::Rc::clone(&digests.0);
    net.publish(0, "a");
    net.run_for(Duration::from_secs(2));
    let relayed: Vec<usize> = relays
        .borrow()
        .iter()
        .filter(|(_, forward)| *forward)
        .map(|(to, _)| *to)
        .collect();
    assert_eq!(relayed.len(), 6, "three rounds to two zones: {relayed:?}");
    for zone in 1..3 {
        let distinct: BTreeSet<usize> = relayed
            .iter()
            .filter(|to| **to % 3 == zone)
            .copied()
            .collect();
        assert_eq!(distinct.len(), 3, "zone-{zone}'s rounds: {relayed:?}");
    }
}

#[test]
fn a_relay_sends_its_zone_one_datagram_for_origins_that_publish_together() {
    // Zones are the index modulo 3: zone-2 is nodes 2, 5, 8 and 11, reached through
    // relays from origins 0 (zone-0) and 1 (zone-1).
    let mut net = zoned_cluster(4, 3, 86);
    net.publish(0, "a");
    net.publish(1, "b");
    net.run_for(Duration::from_secs(2));
    // Node 11 loses every copy of the next two entries: only digests can reveal them.
    let gathered = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = std::rc::Rc::clone(&gathered);
    let cut = std::rc::Rc::new(std::cell::Cell::new(true));
    let cutting = std::rc::Rc::clone(&cut);
    net.filter = Some(Box::new(move |_, to, payload| {
        let Ok((header, body)) = wire::read_header(payload) else {
            return false;
        };
        if header.kind == wire::MessageKind::ZoneDigests && to % 3 == 2 {
            let origins: BTreeSet<NodeId> = wire::decode_zone_digests(body)
                .unwrap()
                .into_iter()
                .map(|(origin, _)| origin)
                .collect();
            seen.borrow_mut().push((to, origins));
        }
        cutting.get() && to == 11 && header.kind == wire::MessageKind::Data
    }));
    net.publish(0, "a2");
    net.publish(1, "b2");
    net.run_for(Duration::from_millis(20));
    cut.set(false);
    net.run_for(Duration::from_secs(2));
    assert!(net.keys_at(11).contains(&"a2".to_owned()));
    assert!(net.keys_at(11).contains(&"b2".to_owned()));
    assert!(!net.resyncs.contains_key(&11));
    // Both origins sent each round to the same relay, which told its three zone peers
    // about both in one datagram.
    let both: BTreeSet<NodeId> = [0, 1].map(|i| net.nodes[&i].local().id).into();
    let gathered = gathered.borrow();
    assert!(gathered.len() >= 9, "three rounds at least: {gathered:?}");
    for (_, origins) in gathered.iter() {
        assert_eq!(origins, &both);
    }
}

#[test]
fn a_relay_that_leaves_sends_the_digests_it_holds_first() {
    let mut net = zoned_cluster(3, 3, 91);
    net.publish(0, "a");
    net.run_for(Duration::from_secs(2));
    // Node 2 (zone-2) gets node 0's digest to pass on, and leaves at once.
    let cluster_id = wire::ClusterId::from_name("syncbus");
    let digest = wire::Digest {
        origin: net.nodes[&0].local().id,
        last: 1,
        first: 0,
    };
    let forward =
        wire::with_relay_flags(&wire::encode_digest(cluster_id, digest), wire::FLAG_FORWARD);
    let now = net.now;
    let node = net.node(2);
    node.handle_packet(now, addr(0), &forward);
    node.leave(now);
    let mut told = BTreeSet::new();
    while let Some(transmit) = node.poll_transmit() {
        let (header, _) = wire::read_header(&transmit.payload).unwrap();
        if header.kind == wire::MessageKind::ZoneDigests {
            told.insert(transmit.destination);
        }
    }
    assert_eq!(told, [addr(5), addr(8)].into());
}

#[test]
fn zone_digests_from_a_stranger_open_no_hole() {
    let mut net = zoned_cluster(3, 3, 87);
    net.publish(0, "a");
    net.run_for(Duration::from_secs(1));
    let origin = net.nodes[&0].local().id;
    let cluster_id = wire::ClusterId::from_name("syncbus");
    let forged = wire::encode_zone_digests(cluster_id, &[(origin, 1_000)]);
    let before = net.nodes[&2].stats().clone();
    let now = net.now;
    net.node(2).handle_packet(now, addr(40), &forged);
    net.drain(2);
    net.run_for(Duration::from_secs(1));
    // Nor from a member of another zone: relays tell only their own.
    net.node(2).handle_packet(now, addr(4), &forged);
    net.drain(2);
    net.run_for(Duration::from_secs(1));
    let after = net.nodes[&2].stats().clone();
    assert_eq!(after.dropped.unknown_peer, before.dropped.unknown_peer + 2);
    assert_eq!(after.repairs_requested, before.repairs_requested);
    // From a member of its zone, the zone digests are taken: node 2 asks for the
    // entries named.
    net.node(2).handle_packet(now, addr(5), &forged);
    net.drain(2);
    net.run_for(Duration::from_millis(200));
    assert!(net.nodes[&2].stats().repairs_requested > after.repairs_requested);
}

/// Digests of their own (naming where the receiver starts) that `origin` sends from
/// now on to members of other zones, counted.
fn count_personal_digests_across_zones(
    net: &mut Net,
    origin: usize,
    zones: usize,
) -> Rc<Cell<usize>> {
    let count = Rc::new(Cell::new(0));
    let counting = Rc::clone(&count);
    net.filter = Some(Box::new(move |from, to, payload| {
        let Ok((header, body)) = wire::read_header(payload) else {
            return false;
        };
        if from == origin
            && to % zones != origin % zones
            && header.kind == wire::MessageKind::Digest
        {
            let digest = wire::decode_digest(body).unwrap();
            counting.set(counting.get() + usize::from(digest.first > 0));
        }
        false
    }));
    count
}

#[test]
fn members_known_before_an_origins_first_publish_need_no_digest_of_their_own() {
    let mut net = zoned_cluster(3, 3, 88);
    let personal = count_personal_digests_across_zones(&mut net, 0, 3);
    net.publish(0, "first");
    net.run_for(Duration::from_secs(2));
    assert_eq!(personal.get(), 0);
    assert!((1..9).all(|i| net.keys_at(i) == ["first"]));
    // A member of another zone joining after it is told where it starts, in digests
    // of its own.
    net.start(10, config(10, &[0]));
    assert!(net.run_until(Duration::from_secs(10), |_| personal.get() > 0));
}

/// A cluster of three zones of three that never exchanges member tables: what a
/// node learns of a stream comes from entries and digests only.
fn cluster_without_exchanges(seed: u64) -> Net {
    zoned_cluster_with(3, 3, seed, |_, c| {
        c.membership.sync_interval = Duration::from_secs(3600);
    })
}

/// Drops every data datagram to `node` while the returned switch is on.
fn cut_data_to(net: &mut Net, node: usize) -> Rc<Cell<bool>> {
    let cut = Rc::new(Cell::new(true));
    let cutting = Rc::clone(&cut);
    let data = wire::MessageKind::Data as u8;
    net.filter = Some(Box::new(move |_, to, payload| {
        cutting.get() && to == node && payload.get(3) == Some(&data)
    }));
    cut
}

/// A cluster without exchanges in which node 0 lost node 1's first entry, "lost".
fn first_entry_lost_at_node_0(seed: u64) -> Net {
    let mut net = cluster_without_exchanges(seed);
    let cut = cut_data_to(&mut net, 0);
    net.publish(1, "lost");
    net.run_for(Duration::from_millis(20));
    cut.set(false);
    net
}

#[test]
fn a_member_that_lost_an_origins_first_entries_asks_where_it_starts() {
    let mut net = first_entry_lost_at_node_0(89);
    net.publish(1, "heard");
    let repaired = net.run_until(Duration::from_secs(5), |n| n.keys_at(0).len() == 2);
    assert!(repaired, "node 0 has only {:?}", net.keys_at(0));
    assert!(!net.resyncs.contains_key(&0));
}

#[test]
fn a_member_that_lost_an_origins_only_entry_asks_on_its_digest() {
    let mut net = first_entry_lost_at_node_0(90);
    let repaired = net.run_until(Duration::from_secs(5), |n| n.keys_at(0) == ["lost"]);
    assert!(repaired, "node 0 never asked where it starts");
    assert!(!net.resyncs.contains_key(&0));
}

#[test]
fn an_origin_that_dies_before_saying_where_a_stream_starts_leaves_a_resync() {
    let mut net = first_entry_lost_at_node_0(93);
    // Node 1's answers to node 0's asks never arrive; its zone's relays still tell
    // node 0 where the stream ends.
    let digest = wire::MessageKind::Digest as u8;
    net.filter = Some(Box::new(move |from, to, payload| {
        from == 1 && to == 0 && payload.get(3) == Some(&digest)
    }));
    net.publish(1, "heard");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.keys_at(0), ["heard"]);
    assert!(!net.resyncs.contains_key(&0));
    let origin = net.nodes[&1].local().id;
    net.crash(1);
    let told = net.run_until(Duration::from_secs(10), |n| {
        n.resyncs
            .get(&0)
            .is_some_and(|resyncs| resyncs.iter().any(|(o, _)| *o == origin))
    });
    assert!(told, "node 0 was not told it may have missed \"lost\"");
}

#[test]
fn a_zone_with_one_healthy_member_gets_whole_copies() {
    let (per_zone, zones) = (4, 3);
    let mut net = zoned_cluster(per_zone, zones, 94);
    // Node 0 suspects every member of zone 1 but node 1.
    let suspicions: Vec<_> = [4, 7, 10]
        .iter()
        .map(|&i| foca::Member::new(member_seen(&net, i, 0), 0, foca::State::Suspect))
        .collect();
    let datagram = membership_datagram(&net, 2, 0, &suspicions);
    let now = net.now;
    net.node(0).handle_packet(now, addr(2), &datagram);
    net.drain(0);
    net.publish(0, "k");
    let halves_to_zone = |zone: usize| {
        net.in_flight
            .values()
            .filter(|(from, _, payload)| {
                *from == addr(0) && payload.get(3) == Some(&(wire::MessageKind::Data as u8))
            })
            .filter(|(_, to, _)| net.index_of(*to).is_some_and(|i| i % zones == zone))
            .filter(|(_, _, payload)| payload.get(4).is_some_and(|f| f & wire::FLAG_HALF != 0))
            .count()
    };
    assert_eq!(halves_to_zone(1), 0, "a suspected relay got a half");
    assert_eq!(halves_to_zone(2), 2);
}

/// The digests `origin` sends from now on, as (destination, marked for forwarding).
fn log_digests(net: &mut Net, origin: usize) -> DigestLog {
    let log = DigestLog::default();
    let seen = std::rc::Rc::clone(&log.0);
    let digest = wire::MessageKind::Digest as u8;
    net.filter = Some(Box::new(move |from, to, payload| {
        if from == origin && payload.get(3) == Some(&digest) {
            let forward = payload.get(4).is_some_and(|f| f & wire::FLAG_FORWARD != 0);
            seen.borrow_mut().push((to, forward));
        }
        false
    }));
    log
}

#[derive(Default)]
struct DigestLog(std::rc::Rc<std::cell::RefCell<Vec<(usize, bool)>>>);

impl DigestLog {
    /// Digests sent through relays, to be forwarded within their zones.
    fn relayed(&self) -> usize {
        self.0
            .borrow()
            .iter()
            .filter(|(_, forward)| *forward)
            .count()
    }

    /// Digests sent to `node`.
    fn to(&self, node: usize) -> usize {
        self.0.borrow().iter().filter(|(to, _)| *to == node).count()
    }

    fn clear(&self) {
        self.0.borrow_mut().clear();
    }
}

#[test]
fn a_node_that_asked_for_a_repair_sends_every_digest_round() {
    let mut net = zoned_cluster(3, 3, 85);
    net.publish(0, "first");
    net.run_for(Duration::from_secs(2));
    // Node 0 misses node 1's entry "x" (every copy) and asks node 1 to repair it.
    let data = wire::MessageKind::Data as u8;
    let cut = std::rc::Rc::new(std::cell::Cell::new(true));
    let cutting = std::rc::Rc::clone(&cut);
    net.filter = Some(Box::new(move |_, to, payload| {
        cutting.get() && to == 0 && payload.get(3) == Some(&data)
    }));
    net.publish(1, "x");
    net.run_for(Duration::from_millis(20));
    cut.set(false);
    net.publish(1, "y");
    net.run_for(Duration::from_secs(2));
    assert!(net.nodes[&0].stats().repairs_requested > 0);
    assert!(net.keys_at(0).contains(&"x".to_owned()));
    // Its own publish now goes in every round: five through each other zone's relays.
    let digests = log_digests(&mut net, 0);
    net.publish(0, "z");
    net.run_for(Duration::from_secs(2));
    assert_eq!(digests.relayed(), 10);
}
