//! The discrete-event loop: real `syncbus-mesh` nodes, virtual time, faults.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use syncbus_mesh::{Event, Goal, Instant, Invalidation, Node, NodeConfig, NodeId, Transmit, Zone};

use crate::queue::EventQueue;
use crate::scenario::{FaultKind, Identity, Scenario};

/// Every random stream is its own ChaCha8 generator, seeded from the run's seed and the
/// stream's name, so that adding a node or a fault never shifts another stream.
fn stream(seed: u64, domain: u64, a: u64, b: u64) -> ChaCha8Rng {
    let mut x = seed ^ domain.rotate_left(48) ^ a.rotate_left(24) ^ b;
    // splitmix64 finaliser: nearby inputs give unrelated seeds.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ChaCha8Rng::seed_from_u64(x ^ (x >> 31))
}

const NODE_STREAM: u64 = 1;
const LINK_STREAM: u64 = 2;
const WORKLOAD_STREAM: u64 = 3;

/// The trace hash: FNV-1a's offset and prime, taken a 64-bit word at a time rather
/// than a byte at a time (every delivered datagram passes through it, and a byte at a
/// time was a tenth of a thousand-node run), with the length mixed in last. Stable
/// across builds and platforms: words are read little-endian.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TraceHash(u64);

impl TraceHash {
    fn new() -> TraceHash {
        TraceHash(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(word);
            self.mix(u64::from_le_bytes(buf));
        }
        let rest = words.remainder();
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        self.mix(u64::from_le_bytes(buf));
        self.mix(bytes.len() as u64);
    }

    fn mix(&mut self, word: u64) {
        self.0 = (self.0 ^ word)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(23);
    }

    fn add_u64(&mut self, value: u64) {
        self.mix(value);
    }

    pub(crate) fn value(self) -> u64 {
        self.0
    }
}

// Slots are numbered in 32 bits in `Action` (a scenario has at most `MAX_NODES`), so
// that a queued action takes 40 bytes.
const _: () = assert!(crate::scenario::MAX_NODES <= u32::MAX as usize);

/// Something scheduled.
#[derive(Debug)]
enum Action {
    Deliver {
        from: u32,
        to: u32,
        payload: Bytes,
    },
    Wake {
        node: u32,
    },
    Publish,
    FaultStart(usize),
    FaultEnd(usize),
    Restart(usize),
    CheckConvergence {
        window: usize,
    },
    /// Records what the timeline picture shows, once per simulated second.
    Sample,
}

/// How often the timeline is sampled.
const SAMPLE_EVERY: u64 = 1_000_000_000;

/// One simulated process slot.
pub(crate) struct Slot {
    pub(crate) zone: String,
    /// The zone's position in the topology, for counting without comparing names.
    zone_index: usize,
    pub(crate) addr: SocketAddr,
    pub(crate) node: Option<Node>,
    pub(crate) id: NodeId,
    /// Starts so far; each start gets a higher generation.
    pub(crate) starts: u64,
    pub(crate) started_at: u64,
    /// The wake-up currently queued for this node.
    scheduled: Option<u64>,
    rng: ChaCha8Rng,
    clock: NodeClock,
    /// While paused: how many datagrams may wait, and those waiting.
    paused: Option<usize>,
    inbox: VecDeque<(usize, Bytes)>,
}

/// A node's clock against simulated time: it reads `base_node` at `base_sim` and runs
/// at `rate` from there.
#[derive(Clone, Copy, Debug)]
struct NodeClock {
    base_sim: u64,
    base_node: u64,
    rate: f64,
}

impl NodeClock {
    const TRUE: NodeClock = NodeClock {
        base_sim: 0,
        base_node: 0,
        rate: 1.0,
    };

    /// What the node's clock reads at simulated time `now`.
    fn read(self, now: u64) -> u64 {
        let elapsed = now.saturating_sub(self.base_sim) as f64 * self.rate;
        self.base_node.saturating_add(elapsed as u64)
    }

    /// The simulated time at which the node's clock reads `reading`.
    fn when(self, reading: u64) -> u64 {
        let ahead = reading.saturating_sub(self.base_node) as f64 / self.rate;
        self.base_sim.saturating_add(ahead.ceil() as u64)
    }
}

/// A live node whose member table is not the live set.
#[derive(Debug)]
pub(crate) struct Disagreement {
    pub(crate) node: usize,
    pub(crate) lacks: Vec<usize>,
    pub(crate) stale: usize,
}

/// One published invalidation, and what became of it.
pub(crate) struct Publication {
    pub(crate) origin: usize,
    pub(crate) origin_id: NodeId,
    pub(crate) at: u64,
    pub(crate) delivered: Receipts,
    /// An awaited publish refused at once: nothing was published.
    pub(crate) refused: bool,
}

/// By receiving node: when it first delivered one publication, and the latest run of
/// the node (its start count) that delivered it. A slot per node, where an ordered map
/// searched cold memory for each of a large run's ten million deliveries: 12 bytes per
/// node per publication, delivered or not, against about 35 per delivery in the map.
pub(crate) struct Receipts {
    by_node: Vec<Receipt>,
}

/// Packed to 12 bytes: a thousand-node run keeps one per node for each of its ten
/// thousand publications, 130 MB where 16-byte receipts took 173 MB.
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Receipt {
    /// [`NOT_DELIVERED`](Receipt::NOT_DELIVERED) until delivered.
    at: u64,
    /// The start count, saturated at `u32::MAX` (four billion restarts of one node).
    run: u32,
}

impl Receipt {
    const NOT_DELIVERED: u64 = u64::MAX;
    const NONE: Receipt = Receipt {
        at: Receipt::NOT_DELIVERED,
        run: 0,
    };
}

impl Receipts {
    pub(crate) fn new(nodes: usize) -> Receipts {
        Receipts {
            by_node: vec![Receipt::NONE; nodes],
        }
    }

    /// When `node` first delivered it.
    pub(crate) fn first(&self, node: usize) -> Option<u64> {
        self.by_node
            .get(node)
            .map(|receipt| receipt.at)
            .filter(|at| *at != Receipt::NOT_DELIVERED)
    }

    /// When each node that delivered it first did, in node order.
    pub(crate) fn times(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.by_node.len()).filter_map(|node| self.first(node))
    }

    /// Notes a delivery to `run` of `node` at `at`; false if that run had it already.
    fn note(&mut self, node: usize, run: u64, at: u64) -> bool {
        let run = u32::try_from(run).unwrap_or(u32::MAX);
        let Some(receipt) = self.by_node.get_mut(node) else {
            return true;
        };
        // Copied out: a packed field cannot be compared in place.
        let (first_at, last_run) = (receipt.at, receipt.run);
        if first_at == Receipt::NOT_DELIVERED {
            *receipt = Receipt { at, run };
        } else if last_run == run {
            return false;
        } else {
            // Delivered to an earlier run, which is gone with its cache.
            receipt.run = run;
        }
        true
    }
}

/// One awaited publish and its outcome.
pub(crate) struct AwaitRecord {
    pub(crate) publication: usize,
    pub(crate) outcome: Option<(u64, Result<Vec<NodeId>, String>)>,
}

/// What the run observed, for the checks and the summary.
#[derive(Default)]
pub(crate) struct Observations {
    pub(crate) publications: Vec<Publication>,
    pub(crate) resyncs: BTreeMap<usize, Vec<(NodeId, u64)>>,
    /// (time, observer, subject) for every member-down event.
    pub(crate) downs: Vec<(u64, usize, NodeId)>,
    /// (time, node, id) of every crash.
    pub(crate) crashes: Vec<(u64, usize, NodeId)>,
    /// (window end, when every live node saw every other) per fault window.
    pub(crate) convergence: Vec<(u64, Option<u64>)>,
    /// Fault windows as (start, end).
    pub(crate) windows: Vec<(u64, u64)>,
    pub(crate) awaits: Vec<AwaitRecord>,
    pub(crate) awaits_refused: u64,
    pub(crate) events: u64,
    /// Invalidations delivered again to the same run of a node.
    pub(crate) duplicates: u64,
    /// Once a second: per zone, the members in that zone as the live nodes see them, on
    /// average.
    pub(crate) samples: Vec<(u64, Vec<f64>)>,
}

/// A scenario being run.
pub struct Simulation {
    pub(crate) scenario: Scenario,
    pub(crate) seed: u64,
    pub(crate) now: u64,
    pub(crate) end: u64,
    pub(crate) workload_end: u64,
    queue: EventQueue<Action>,
    pub(crate) slots: Vec<Slot>,
    /// Active window faults, by timeline index.
    active: BTreeSet<usize>,
    workload: ChaCha8Rng,
    /// Links in the bad state of bursty loss.
    bad_links: BTreeMap<(usize, usize), bool>,
    pub(crate) trace: TraceHash,
    pub(crate) seen: Observations,
    awaits_by_node: BTreeMap<(usize, u64), usize>,
    /// What `drain` takes from a node, in buffers kept from one call to the next.
    drained_events: Vec<Event>,
    drained_transmits: Vec<Transmit>,
}

/// Convergence is checked this often after a window ends.
const CONVERGENCE_POLL: u64 = 100_000_000;

impl Simulation {
    /// Builds the cluster of `scenario` for a run with `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Simulation {
        let end = scenario.run.duration.nanos();
        // The workload stops early enough for the last invalidations to settle: a
        // newest entry lost with every digest after it is found by a member-table
        // exchange, which comes once per node per sync interval.
        let sync = scenario
            .membership
            .resolve(scenario.node_count())
            .sync_interval;
        let sync = u64::try_from(sync.as_nanos()).unwrap_or(u64::MAX);
        let settle = (end / 4).min(sync.saturating_mul(3).max(10_000_000_000));
        let mut sim = Simulation {
            now: 0,
            end,
            workload_end: end - settle,
            queue: EventQueue::new(),
            slots: Vec::new(),
            active: BTreeSet::new(),
            workload: stream(seed, WORKLOAD_STREAM, 0, 0),
            bad_links: BTreeMap::new(),
            trace: TraceHash::new(),
            seen: Observations::default(),
            awaits_by_node: BTreeMap::new(),
            drained_events: Vec::new(),
            drained_transmits: Vec::new(),
            seed,
            scenario,
        };
        sim.create_slots();
        let late: BTreeSet<usize> = sim
            .scenario
            .timeline
            .iter()
            .filter_map(|fault| match fault.kind {
                FaultKind::Join { node } => Some(node),
                _ => None,
            })
            .collect();
        for index in (0..sim.slots.len()).filter(|i| !late.contains(i)) {
            sim.start(index, false);
        }
        for (index, fault) in sim.scenario.timeline.clone().iter().enumerate() {
            sim.schedule(fault.at.nanos(), Action::FaultStart(index));
            if fault.kind.is_window() {
                let window_end = fault.at.nanos() + fault.duration.nanos();
                sim.schedule(window_end, Action::FaultEnd(index));
                sim.seen.windows.push((fault.at.nanos(), window_end));
            }
        }
        sim.schedule(0, Action::Sample);
        if sim.scenario.workload.rate > 0.0 {
            let first = sim.scenario.workload.start.nanos() + sim.publish_interval();
            sim.schedule(first, Action::Publish);
        }
        sim
    }

    fn create_slots(&mut self) {
        let zones: Vec<(String, usize)> = self
            .scenario
            .topology
            .zones
            .iter()
            .map(|zone| (zone.name.clone(), zone.nodes))
            .collect();
        for (zone_index, (name, count)) in zones.into_iter().enumerate() {
            for _ in 0..count {
                let index = self.slots.len();
                // Addresses in 127.0.0.0/8 only name the simulated nodes; nothing is sent.
                let ip = Ipv4Addr::new(127, 1, (index / 250) as u8, (index % 250) as u8 + 1);
                self.slots.push(Slot {
                    zone: name.clone(),
                    zone_index,
                    addr: SocketAddr::from((ip, 7000)),
                    node: None,
                    id: NodeId(0),
                    starts: 0,
                    started_at: 0,
                    scheduled: None,
                    rng: stream(self.seed, LINK_STREAM, index as u64, 0),
                    clock: NodeClock::TRUE,
                    paused: None,
                    inbox: VecDeque::new(),
                });
            }
        }
    }

    /// Starts (or restarts) the node in slot `index`.
    fn start(&mut self, index: usize, reuse_id: bool) {
        let seeds: Vec<SocketAddr> = (0..self.scenario.topology.seeds)
            .map(|seed| self.slots[seed].addr)
            .filter(|addr| *addr != self.slots[index].addr)
            .collect();
        let membership = self.scenario.membership.resolve(self.slots.len());
        let slot = &mut self.slots[index];
        slot.starts += 1;
        let mut ids = stream(self.seed, NODE_STREAM, index as u64, slot.starts);
        if !reuse_id {
            slot.id = NodeId(ids.random());
        }
        let zone = Zone::new(slot.zone.clone()).unwrap_or_default();
        let mut config = NodeConfig::new(slot.id, slot.addr, zone);
        config.seeds = seeds;
        config.membership = membership;
        config.generation = slot.starts;
        config.rng_seed = ids.random();
        slot.started_at = self.now;
        slot.scheduled = None;
        let now = Instant::from_nanos(slot.clock.read(self.now));
        slot.node = Node::new(config, now).ok();
        self.drain(index);
    }

    fn schedule(&mut self, at: u64, action: Action) {
        self.queue.push(at, action);
    }

    fn publish_interval(&self) -> u64 {
        (1e9 / self.scenario.workload.rate) as u64
    }

    /// Runs to the end of the scenario.
    pub fn run(&mut self) {
        self.run_with_progress(|_| {});
    }

    /// Runs to the end, calling `progress` with the simulated time every ten simulated
    /// seconds.
    pub fn run_with_progress(&mut self, mut progress: impl FnMut(u64)) {
        let mut next_report = 0;
        while self.step() {
            if self.now >= next_report {
                progress(self.now);
                next_report = self.now + 10_000_000_000;
            }
        }
    }

    /// Handles the next event (a datagram arriving, a node's timer, a fault, a
    /// publish); false, and the clock at the end, once the scenario is over.
    pub fn step(&mut self) -> bool {
        let Some((at, action)) = self.queue.pop_due_by(self.end) else {
            self.now = self.end;
            return false;
        };
        self.now = at;
        self.seen.events += 1;
        self.trace.add_u64(at);
        self.handle(action);
        true
    }

    fn handle(&mut self, action: Action) {
        match action {
            Action::Deliver { from, to, payload } => {
                let (from, to) = (from as usize, to as usize);
                self.trace.add(&payload);
                let slot = &mut self.slots[to];
                if let Some(room) = slot.paused {
                    // A stalled process: the datagram waits in its socket buffer.
                    if slot.inbox.len() < room {
                        slot.inbox.push_back((from, payload));
                    }
                    return;
                }
                self.deliver(from, to, &payload);
                self.drain(to);
            }
            Action::Wake { node } => {
                let index = node as usize;
                let slot = &mut self.slots[index];
                if slot.scheduled != Some(self.now) || slot.paused.is_some() {
                    return;
                }
                slot.scheduled = None;
                let now = Instant::from_nanos(slot.clock.read(self.now));
                if let Some(node) = slot.node.as_mut() {
                    node.handle_timeout(now);
                    self.drain(index);
                }
            }
            Action::Publish => self.publish(),
            Action::FaultStart(index) => self.fault_start(index),
            Action::FaultEnd(index) => {
                self.active.remove(&index);
                if let FaultKind::Pause { node, .. } = self.scenario.timeline[index].kind {
                    self.resume(node);
                }
                let window = self.seen.convergence.len();
                self.seen.convergence.push((self.now, None));
                self.schedule(self.now, Action::CheckConvergence { window });
            }
            Action::Restart(index) => {
                if let FaultKind::Crash { node, identity, .. } = self.scenario.timeline[index].kind
                {
                    self.start(node, identity == Identity::Reuse);
                }
            }
            Action::Sample => {
                self.sample();
                self.schedule(self.now + SAMPLE_EVERY, Action::Sample);
            }
            Action::CheckConvergence { window } => {
                if self.converged() {
                    self.seen.convergence[window].1 = Some(self.now);
                } else {
                    self.schedule(
                        self.now + CONVERGENCE_POLL,
                        Action::CheckConvergence { window },
                    );
                }
            }
        }
    }

    fn deliver(&mut self, from: usize, to: usize, payload: &[u8]) {
        let from_addr = self.slots[from].addr;
        let slot = &mut self.slots[to];
        let now = Instant::from_nanos(slot.clock.read(self.now));
        if let Some(node) = slot.node.as_mut() {
            node.handle_packet(now, from_addr, payload);
        }
    }

    /// A paused node runs again: it reads what waited, then runs its timers.
    fn resume(&mut self, index: usize) {
        self.slots[index].paused = None;
        let waiting = std::mem::take(&mut self.slots[index].inbox);
        for (from, payload) in waiting {
            self.deliver(from, index, &payload);
        }
        let slot = &mut self.slots[index];
        slot.scheduled = None;
        let now = Instant::from_nanos(slot.clock.read(self.now));
        if let Some(node) = slot.node.as_mut() {
            node.handle_timeout(now);
        }
        self.drain(index);
    }

    /// The zones in order, as the topology names them.
    pub(crate) fn zone_names(&self) -> Vec<String> {
        self.scenario
            .topology
            .zones
            .iter()
            .map(|z| z.name.clone())
            .collect()
    }

    fn sample(&mut self) {
        let zones = &self.scenario.topology.zones;
        let mut seen = vec![0.0; zones.len()];
        let mut live = 0usize;
        for slot in &self.slots {
            let Some(node) = slot.node.as_ref() else {
                continue;
            };
            live += 1;
            // Each node counts itself too, so a zone's line shows its size when all agree.
            seen[slot.zone_index] += 1.0;
            // The node's count per zone, not its members one by one: a thousand nodes
            // hold a million members, in memory cold by the time of a sample.
            for (zone, size) in node.zone_sizes() {
                if let Some(index) = zones.iter().position(|z| z.name == zone.as_str()) {
                    seen[index] += size as f64;
                }
            }
        }
        let count = live.max(1) as f64;
        let averages = seen.into_iter().map(|total| total / count).collect();
        self.seen.samples.push((self.now, averages));
    }

    /// True when every live node sees exactly every other live node.
    pub(crate) fn converged(&self) -> bool {
        self.disagreement().is_none()
    }

    /// The first live node whose member table differs from the live set: its slot, the
    /// slots of live nodes it lacks, and the count of members it holds that are not
    /// live (dead, or an earlier identity of a restarted node).
    pub(crate) fn disagreement(&self) -> Option<Disagreement> {
        let live: BTreeMap<NodeId, usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.node.is_some())
            .map(|(index, s)| (s.id, index))
            .collect();
        self.slots.iter().enumerate().find_map(|(index, slot)| {
            let node = slot.node.as_ref()?;
            let members: BTreeSet<NodeId> = node.members().map(|m| m.id).collect();
            let lacks: Vec<usize> = live
                .iter()
                .filter(|(id, other)| **other != index && !members.contains(id))
                .map(|(_, other)| *other)
                .collect();
            let stale = members.iter().filter(|id| !live.contains_key(id)).count();
            (!lacks.is_empty() || stale > 0).then_some(Disagreement {
                node: index,
                lacks,
                stale,
            })
        })
    }

    fn fault_start(&mut self, index: usize) {
        let fault = self.scenario.timeline[index].clone();
        match fault.kind {
            FaultKind::Crash {
                node,
                restart_after,
                ..
            } => {
                let id = self.slots[node].id;
                if self.slots[node].node.take().is_some() {
                    self.seen.crashes.push((self.now, node, id));
                }
                self.slots[node].scheduled = None;
                if let Some(after) = restart_after {
                    self.schedule(self.now + after.nanos(), Action::Restart(index));
                }
            }
            FaultKind::Join { node } => {
                if self.slots[node].node.is_none() {
                    self.start(node, false);
                }
            }
            FaultKind::Pause { node, buffer } => {
                self.slots[node].paused = Some(buffer);
                self.active.insert(index);
            }
            FaultKind::Clock {
                node,
                drift_ppm,
                step,
            } => {
                let slot = &mut self.slots[node];
                let reading = slot.clock.read(self.now) + step.nanos();
                slot.clock = NodeClock {
                    base_sim: self.now,
                    base_node: reading,
                    rate: 1.0 + drift_ppm / 1e6,
                };
                slot.scheduled = None;
                self.drain(node);
            }
            FaultKind::Leave { node } => {
                let now = Instant::from_nanos(self.now);
                if let Some(member) = self.slots[node].node.as_mut() {
                    member.leave(now);
                    self.drain(node);
                }
                self.slots[node].node = None;
            }
            _ => {
                self.active.insert(index);
            }
        }
    }

    /// Fraction of datagrams from `from` to `to` the active faults drop.
    fn cut(&self, from: usize, to: usize) -> f64 {
        let mut loss: f64 = 0.0;
        for index in &self.active {
            let fault = &self.scenario.timeline[*index].kind;
            let here = match fault {
                FaultKind::IsolateZone { zone, loss } => {
                    let inside = |n: usize| self.slots[n].zone == *zone;
                    if inside(from) != inside(to) {
                        *loss
                    } else {
                        0.0
                    }
                }
                FaultKind::Split { groups, loss } => {
                    let group = |n: usize| groups.iter().position(|g| g.contains(&n));
                    if group(from) != group(to) { *loss } else { 0.0 }
                }
                FaultKind::OneWay { from: a, to: b } if (*a, *b) == (from, to) => 1.0,
                _ => 0.0,
            };
            loss = loss.max(here);
        }
        loss
    }

    fn publish(&mut self) {
        let next = self.now + self.publish_interval();
        if next < self.workload_end {
            self.schedule(next, Action::Publish);
        }
        let origins: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].node.is_some() && self.slots[i].paused.is_none())
            .filter(|&i| {
                let zones = &self.scenario.workload.origin_zones;
                zones.is_empty() || zones.contains(&self.slots[i].zone)
            })
            .collect();
        if origins.is_empty() {
            return;
        }
        let origin = origins[self.workload.random_range(0..origins.len())];
        let key_number = self.workload.random_range(0..self.scenario.workload.keys);
        let publication = self.seen.publications.len();
        // The publication number makes every key unique, so deliveries can be traced.
        let key = format!("k{key_number}#{publication}");
        self.seen.publications.push(Publication {
            origin,
            origin_id: self.slots[origin].id,
            at: self.now,
            delivered: Receipts::new(self.slots.len()),
            refused: false,
        });
        let every = self.scenario.workload.await_every;
        let now = Instant::from_nanos(self.now);
        let deadline =
            Instant::from_nanos(self.now + self.scenario.workload.await_deadline.nanos());
        let goal = Goal::Replicas(self.scenario.workload.await_replicas);
        let Some(node) = self.slots[origin].node.as_mut() else {
            return;
        };
        if every > 0 && (publication as u64).is_multiple_of(every) {
            match node.publish_awaited(now, Invalidation::key(key), goal, deadline) {
                Ok(id) => {
                    self.awaits_by_node
                        .insert((origin, id.0), self.seen.awaits.len());
                    self.seen.awaits.push(AwaitRecord {
                        publication,
                        outcome: None,
                    });
                }
                Err(_) => {
                    self.seen.awaits_refused += 1;
                    self.seen.publications[publication].refused = true;
                }
            }
        } else {
            let _ = node.publish(now, Invalidation::key(key));
        }
        self.drain(origin);
    }

    /// Carries out what node `index` asked for, and records what it reported.
    fn drain(&mut self, index: usize) {
        let Some(node) = self.slots[index].node.as_mut() else {
            return;
        };
        let mut events = std::mem::take(&mut self.drained_events);
        events.extend(std::iter::from_fn(|| node.poll_event()));
        let mut transmits = std::mem::take(&mut self.drained_transmits);
        transmits.extend(std::iter::from_fn(|| node.poll_transmit()));
        let wake = node.poll_timeout().map(Instant::as_nanos);
        let wake = wake.map(|at| self.slots[index].clock.when(at));
        for event in events.drain(..) {
            self.record(index, event);
        }
        for transmit in transmits.drain(..) {
            let Some(to) = self.slot_of(transmit.destination) else {
                continue;
            };
            self.send(index, to, transmit.payload);
        }
        self.drained_events = events;
        self.drained_transmits = transmits;
        // A deadline already past is due now; record the time actually queued, or the
        // wake-up would be taken for a stale one and the node would never wake again.
        if let Some(at) = wake.map(|at| at.max(self.now))
            && self.slots[index].scheduled.is_none_or(|queued| at < queued)
        {
            self.slots[index].scheduled = Some(at);
            self.schedule(at, Action::Wake { node: index as u32 });
        }
    }

    fn slot_of(&self, addr: SocketAddr) -> Option<usize> {
        match addr {
            SocketAddr::V4(v4) if v4.ip().octets()[..2] == [127, 1] => {
                let [_, _, high, low] = v4.ip().octets();
                let index = usize::from(high) * 250 + usize::from(low) - 1;
                (index < self.slots.len()).then_some(index)
            }
            _ => None,
        }
    }

    /// Puts a datagram on the wire from `from` to `to`: lost, corrupted, delayed,
    /// reordered or duplicated as the network, its rules and the active faults say,
    /// with `from`'s own random stream.
    fn send(&mut self, from: usize, to: usize, payload: Bytes) {
        let cut = self.cut(from, to);
        let network = &self.scenario.network;
        if network.mtu.is_some_and(|mtu| payload.len() > mtu) {
            return;
        }
        let rule = network
            .rules
            .iter()
            .find(|r| r.from_zone == self.slots[from].zone && r.to_zone == self.slots[to].zone);
        let loss = rule.and_then(|r| r.loss).unwrap_or(network.loss);
        let latency = rule
            .and_then(|r| r.latency.clone())
            .unwrap_or_else(|| network.latency.clone());
        let (duplicate, corrupt) = (network.duplicate, network.corrupt);
        let (reorder, reorder_delay) = (network.reorder, network.reorder_delay.nanos());
        let burst = network.burst.clone();
        let rng = &mut self.slots[from].rng;
        if (cut > 0.0 && rng.random_bool(cut)) || (loss > 0.0 && rng.random_bool(loss)) {
            return;
        }
        if let Some(burst) = burst {
            let bad = self.bad_links.entry((from, to)).or_insert(false);
            let flip = if *bad { burst.leave } else { burst.enter };
            if rng.random_bool(flip) {
                *bad = !*bad;
            }
            if *bad && rng.random_bool(burst.loss) {
                return;
            }
        }
        let payload = if corrupt > 0.0 && rng.random_bool(corrupt) && !payload.is_empty() {
            let mut damaged = payload.to_vec();
            let at = rng.random_range(0..damaged.len());
            damaged[at] ^= rng.random_range(1..=255u8);
            Bytes::from(damaged)
        } else {
            payload
        };
        let copies = if duplicate > 0.0 && rng.random_bool(duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let rng = &mut self.slots[from].rng;
            let spread = latency.max.nanos() - latency.min.nanos();
            let mut delay = latency.min.nanos();
            if spread > 0 {
                delay += rng.random_range(0..=spread);
            }
            if latency.tail_probability > 0.0 && rng.random_bool(latency.tail_probability) {
                delay += latency.tail.nanos();
            }
            if reorder > 0.0 && rng.random_bool(reorder) {
                delay += rng.random_range(0..=reorder_delay);
            }
            let action = Action::Deliver {
                from: from as u32,
                to: to as u32,
                payload: payload.clone(),
            };
            self.schedule(self.now + delay.max(1), action);
        }
    }

    fn record(&mut self, index: usize, event: Event) {
        match event {
            Event::Delivered(delivery) => {
                let key = &delivery.invalidation.key;
                let publication = key
                    .rsplit_once('#')
                    .and_then(|(_, n)| n.parse::<usize>().ok());
                if let Some(record) = publication.and_then(|p| self.seen.publications.get_mut(p)) {
                    let run = self.slots[index].starts;
                    if !record.delivered.note(index, run, self.now) {
                        self.seen.duplicates += 1;
                    }
                }
            }
            Event::Resync { origin, .. } => {
                self.seen
                    .resyncs
                    .entry(index)
                    .or_default()
                    .push((origin, self.now));
            }
            Event::MemberDown(member) => self.seen.downs.push((self.now, index, member.id)),
            Event::AwaitDone { id, outcome } => {
                if let Some(&record) = self.awaits_by_node.get(&(index, id.0)) {
                    let outcome = outcome.map(|acks| acks.nodes).map_err(|f| format!("{f:?}"));
                    self.seen.awaits[record].outcome = Some((self.now, outcome));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncbus_mesh::{Delivery, Invalidation};

    fn delivered(key: &str) -> Event {
        Event::Delivered(Delivery {
            origin: NodeId(1),
            zone: None,
            invalidation: Invalidation::key(key),
        })
    }

    #[test]
    fn a_second_delivery_to_the_same_run_of_a_node_is_a_duplicate_and_to_a_new_run_is_not() {
        let text =
            "[run]\nduration = \"10s\"\n\n[topology]\nzones = [{ name = \"a\", nodes = 2 }]\n";
        let mut sim = Simulation::new(Scenario::parse(text).unwrap(), 1);
        sim.seen.publications.push(Publication {
            origin: 0,
            origin_id: NodeId(1),
            at: 0,
            delivered: Receipts::new(sim.slots.len()),
            refused: false,
        });
        let key = "k#0";
        sim.record(1, delivered(key));
        sim.record(1, delivered(key));
        assert_eq!(sim.seen.duplicates, 1);
        // Node 1 restarts: its new run may get the invalidation once more, not twice.
        sim.slots[1].starts += 1;
        sim.record(1, delivered(key));
        assert_eq!(sim.seen.duplicates, 1);
        sim.record(1, delivered(key));
        assert_eq!(sim.seen.duplicates, 2);
    }
}
