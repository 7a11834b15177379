//! Several nodes driven by hand over a virtual network: deterministic, no sockets.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::*;

const LATENCY: Duration = Duration::from_millis(1);

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
/// them at random (seeded); `drop_next_data` drops data datagrams chosen by a test.
struct Net {
    now: Instant,
    nodes: BTreeMap<usize, Node>,
    in_flight: BTreeMap<(Instant, u64), (SocketAddr, SocketAddr, Bytes)>,
    sent: u64,
    loss: f64,
    rng: ChaCha8Rng,
    drop_data_to: Option<usize>,
    deliveries: BTreeMap<usize, Vec<Delivery>>,
    resyncs: BTreeMap<usize, Vec<(NodeId, u64)>>,
    member_events: BTreeMap<usize, Vec<Event>>,
    trace: DefaultHasher,
}

impl Net {
    fn new(seed: u64) -> Net {
        Net {
            now: Instant::ZERO,
            nodes: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            sent: 0,
            loss: 0.0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            drop_data_to: None,
            deliveries: BTreeMap::new(),
            resyncs: BTreeMap::new(),
            member_events: BTreeMap::new(),
            trace: DefaultHasher::new(),
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
        let published = self.node(index).publish(Invalidation::key(key)).unwrap();
        self.drain(index);
        published
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.keys().copied().find(|&i| self::addr(i) == addr)
    }

    /// Carries out everything node `index` asked for.
    fn drain(&mut self, index: usize) {
        let Some(node) = self.nodes.get_mut(&index) else {
            return;
        };
        let from = node.local().addr;
        while let Some(transmit) = node.poll_transmit() {
            transmit.payload.hash(&mut self.trace);
            self.sent += 1;
            let at = self.now + LATENCY;
            self.in_flight.insert(
                (at, self.sent),
                (from, transmit.destination, transmit.payload),
            );
        }
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
                other => self.member_events.entry(index).or_default().push(other),
            }
        }
    }

    /// Advances to the next datagram arrival or timer, whichever is first.
    fn step(&mut self) -> bool {
        let next_packet = self.in_flight.keys().next().map(|(at, _)| *at);
        let next_timer = self.nodes.values().filter_map(Node::poll_timeout).min();
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
                .iter()
                .filter(|(_, node)| node.poll_timeout().is_some_and(|at| at <= next))
                .map(|(i, _)| *i)
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
        let Some(index) = self.index_of(to) else {
            return;
        };
        let is_data = payload.get(3) == Some(&(wire::MessageKind::Data as u8));
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return;
        }
        if is_data && self.drop_data_to == Some(index) {
            self.drop_data_to = None;
            return;
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
        let timer = self.nodes.values().filter_map(Node::poll_timeout).min();
        [packet, timer].into_iter().flatten().min()
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

fn cluster(size: usize, seed: u64) -> Net {
    let mut net = Net::new(seed);
    for index in 0..size {
        let seeds: &[usize] = if index == 0 { &[] } else { &[0] };
        net.start(index, config(index, seeds));
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
        node.publish(Invalidation::key("k")).unwrap(),
        Published::Queued
    );
    assert_eq!(
        node.publish(Invalidation::key("k")).unwrap(),
        Published::Coalesced
    );
    assert_eq!(
        node.publish(Invalidation::lease("k")).unwrap(),
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
        node.publish(Invalidation::key(key.clone())).unwrap();
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
        .publish(Invalidation::key("x".repeat(513)))
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
        node.publish(huge_clock),
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
    assert!(net.node(4).publish(Invalidation::key("late")).is_err());
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
    node.handle_packet(now, addr(9), &foreign);
    node.handle_packet(now, addr(9), b"hello, this is not syncbus");
    node.handle_packet(now, addr(9), b"SB\x01\x02\x00");
    let mut bad_body = Vec::new();
    wire::write_header(
        &mut bad_body,
        wire::MessageKind::Data,
        wire::ClusterId::from_name("syncbus"),
    );
    bad_body.extend_from_slice(&[0xff; 40]);
    node.handle_packet(now, addr(9), &bad_body);
    node.handle_packet(now, addr(9), &vec![0; 2000]);
    let dropped = &node.stats().dropped;
    assert_eq!(dropped.wrong_cluster, 1);
    assert_eq!(dropped.bad_magic, 1);
    assert_eq!(dropped.truncated, 1);
    assert_eq!(dropped.malformed, 1);
    assert_eq!(dropped.oversize, 1);
    assert_eq!(dropped.total(), 5);
}

#[test]
fn a_lost_datagram_becomes_a_resync_naming_the_origin() {
    let mut net = cluster(3, 10);
    net.publish(0, "a");
    net.run_for(Duration::from_millis(10));
    net.drop_data_to = Some(2);
    net.publish(0, "b");
    net.run_for(Duration::from_millis(10));
    net.publish(0, "c");
    net.run_for(Duration::from_millis(10));
    assert_eq!(net.keys_at(2), ["a", "c"]);
    assert!(!net.resyncs.contains_key(&2));
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.resyncs[&2], [(NodeId(100), 1)]);
    assert_eq!(net.keys_at(1), ["a", "b", "c"]);
    assert!(!net.resyncs.contains_key(&1));
}

#[test]
fn duplicated_datagrams_deliver_once() {
    let mut net = cluster(2, 11);
    net.node(0).publish(Invalidation::key("dup")).unwrap();
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
    let mut net = cluster(5, 14);
    net.loss = 0.2;
    let mut published = Vec::new();
    for i in 0..200 {
        let key = format!("key-{i}");
        net.publish(i % 5, &key);
        published.push(key);
        net.run_for(Duration::from_millis(5));
    }
    net.run_for(Duration::from_secs(5));
    for index in 0..5 {
        let got = net.keys_at(index);
        let missed: u64 = net
            .resyncs
            .get(&index)
            .map_or(0, |r| r.iter().map(|(_, m)| m).sum());
        // Tail loss (nothing published after the lost entry) goes unnoticed until
        // digests exist, so only entries followed by later ones from the same origin
        // are owed a resync; count the rest as the known gap.
        assert!(got.len() as u64 + missed <= published.len() as u64);
        assert!(
            got.len() as u64 + missed >= published.len() as u64 - 5 * 5,
            "node {index}"
        );
    }
}
