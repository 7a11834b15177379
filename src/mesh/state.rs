//! The mesh node and its bookkeeping, shared by the driver task and the handles, behind
//! a lock (`Core`), and what the handles read without it (`Shared`).
//!
//! The driver task owns the socket's receiving side and the timers. A publish usually
//! reaches the node through the driver's command queue, which lets a run of publishes
//! pack into full datagrams. But a task hand-over costs a wake-up, which is most of the
//! one-way latency on a quiet node, so a publish that finds the node idle goes
//! straight from the caller: it locks the core, publishes, unlocks and sends the
//! datagram from its own thread (see [`Core::publish_direct`]).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use syncbus_mesh::{
    Acks, AwaitFailure, AwaitId, Event as CoreEvent, Goal, Instant, Invalidation, Limits, Member,
    Node, Stats, Transmit,
};
use tokio::sync::{Notify, oneshot, watch};
use tracing::{debug, warn};

use crate::bus::Acknowledged;
use crate::error::Error;
use crate::event::{Event, Peer, ResyncReason};
use crate::subscription::Registry;

/// A publish goes straight from the caller only if the node published nothing for this
/// long: publishes closer together go through the driver's queue, so that a burst or a
/// steady stream packs into full datagrams instead of costing syscalls per key.
const QUIET: Duration = Duration::from_micros(200);

/// [`Shared::last_publish`] before the first publish.
pub(crate) const NEVER: u64 = u64::MAX;

/// State the handles read without going through the task.
pub(crate) struct Shared {
    pub(crate) registry: Arc<Registry>,
    pub(crate) local: Member,
    pub(crate) limits: Limits,
    /// Given seeds, a node alone is not healthy.
    pub(crate) expects_peers: bool,
    pub(crate) peers: watch::Sender<Vec<Peer>>,
    pub(crate) stats: Mutex<Stats>,
    pub(crate) awaits_in_flight: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) running: AtomicBool,
    /// Numbers awaited publishes so a dropped caller can cancel its own.
    pub(crate) next_ticket: AtomicU64,
    pub(crate) injected_drops: AtomicU64,
    /// The zero of the node's clock.
    pub(crate) epoch: tokio::time::Instant,
    /// Publishes queued for the driver or handled by it but not yet sent; while there
    /// are any, a publish may not go straight from the caller, or it would overtake them.
    pub(crate) unsent_publishes: AtomicU64,
    /// When the last publish came (node clock, nanoseconds), or `NEVER`.
    pub(crate) last_publish: AtomicU64,
    /// The node-clock deadline (nanoseconds) the driver sleeps until; `u64::MAX` for none.
    pub(crate) driver_sleeps_until: AtomicU64,
    /// Wakes the driver after a direct publish that left it work or an earlier timer.
    pub(crate) wake_driver: Notify,
}

impl Shared {
    /// The node's clock: time since the node started.
    pub(crate) fn now(&self) -> Instant {
        let elapsed = self.epoch.elapsed().as_nanos();
        Instant::from_nanos(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }

    /// Notes a publish; true if the node published nothing for [`QUIET`] before it.
    pub(crate) fn quiet_before_publish(&self) -> bool {
        let now = self.now().as_nanos();
        let previous = self.last_publish.swap(now, Ordering::Relaxed);
        previous == NEVER || now.saturating_sub(previous) >= QUIET.as_nanos() as u64
    }

    /// Counts and logs a datagram the socket refused.
    pub(crate) fn send_failed(&self, error: &io::Error, to: SocketAddr) {
        self.send_errors.fetch_add(1, Ordering::Relaxed);
        debug!(%error, peer = %to, "send failed");
    }
}

/// The node, behind a mutex that nobody holds across a send or an await.
pub(crate) struct LockedCore(Mutex<Core>);

impl LockedCore {
    pub(crate) fn new(core: Core) -> LockedCore {
        LockedCore(Mutex::new(core))
    }

    /// The core, also after a panic elsewhere: the node's state is only ever changed
    /// by its own methods, which leave it consistent or panic inside the core.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) struct Core {
    pub(crate) node: Node,
    awaiting: HashMap<AwaitId, Awaiting>,
    tickets: HashMap<u64, AwaitId>,
    /// Datagrams a caller could not send without blocking; the driver sends them.
    spilled: Vec<Transmit>,
    /// Publishes among `spilled`, counted in `Shared::unsent_publishes` until sent.
    spilled_publishes: u64,
    /// Membership changed since the driver last published the peer list. Only the
    /// driver publishes it, and with the core unlocked: a handle holding a borrow of
    /// the list must not be able to stall a thread that holds the core.
    peers_changed: bool,
    /// The driver sent its last datagrams; nothing spilled now would leave.
    closed: bool,
}

/// An awaited publish the node is tracking.
struct Awaiting {
    ticket: u64,
    goal: Goal,
    reply: oneshot::Sender<Result<Acknowledged, Error>>,
}

impl Core {
    pub(crate) fn new(node: Node) -> Core {
        Core {
            node,
            awaiting: HashMap::new(),
            tickets: HashMap::new(),
            spilled: Vec::new(),
            spilled_publishes: 0,
            peers_changed: false,
            closed: false,
        }
    }

    /// Publishes for a caller that will send the result from its own thread, if the
    /// node is idle: no publish queued for the driver or still unsent (this one would
    /// overtake it).
    pub(crate) fn publish_direct(&mut self, shared: &Shared, invalidation: Invalidation) -> Direct {
        if shared.unsent_publishes.load(Ordering::Acquire) > 0 {
            return Direct::Busy(invalidation);
        }
        let now = shared.now();
        if let Err(error) = self.node.publish(now, invalidation) {
            // Handles check the limits first, so the node has left.
            debug!(%error, "publish refused by the node");
            return Direct::Refused;
        }
        let mut datagrams = Vec::new();
        self.drain(shared, &mut datagrams);
        let earlier_timer = self
            .node
            .poll_timeout()
            .is_some_and(|at| at.as_nanos() < shared.driver_sleeps_until.load(Ordering::Acquire));
        let wake = earlier_timer || self.peers_changed;
        Direct::Send { datagrams, wake }
    }

    /// Leaves the rest of a publish's datagrams, which the socket would not take
    /// without blocking, to the driver. Until the driver sent them they count as an
    /// unsent publish, so no later publish goes direct and overtakes them. False once
    /// the driver has stopped sending.
    pub(crate) fn spill(
        &mut self,
        shared: &Shared,
        first: Transmit,
        rest: impl Iterator<Item = Transmit>,
    ) -> bool {
        if self.closed {
            return false;
        }
        shared.unsent_publishes.fetch_add(1, Ordering::AcqRel);
        self.spilled_publishes += 1;
        self.spilled.push(first);
        self.spilled.extend(rest);
        true
    }

    /// Moves spilled datagrams into `out`; returns how many publishes they carry.
    pub(crate) fn take_spilled(&mut self, out: &mut Vec<Transmit>) -> u64 {
        out.append(&mut self.spilled);
        std::mem::take(&mut self.spilled_publishes)
    }

    /// The live remote members, if they changed since the last call.
    pub(crate) fn take_peers_update(&mut self) -> Option<Vec<Peer>> {
        std::mem::take(&mut self.peers_changed).then(|| self.node.members().map(peer_of).collect())
    }

    /// After the driver's last send: refuses further spills and returns what was
    /// spilled before, for the driver to send.
    pub(crate) fn close(&mut self) -> Vec<Transmit> {
        self.closed = true;
        self.spilled_publishes = 0;
        std::mem::take(&mut self.spilled)
    }

    /// Hands the node's events to subscribers and the rest of the process, then moves
    /// the datagrams it queued into `out`: in that order, so an acknowledgement leaves
    /// only once the event it acknowledges was delivered. A membership change is noted
    /// for [`take_peers_update`](Self::take_peers_update).
    pub(crate) fn drain(&mut self, shared: &Shared, out: &mut Vec<Transmit>) {
        // Deliveries go to subscribers together, in order, and before any other event.
        let mut deliveries = Vec::new();
        while let Some(event) = self.node.poll_event() {
            let event = match event {
                CoreEvent::Delivered(delivery) => {
                    deliveries.push(Event::from_delivery(delivery));
                    continue;
                }
                other => other,
            };
            hand_over(shared, &mut deliveries);
            match event {
                CoreEvent::Resync { origin, missed } => {
                    let reason = ResyncReason::Lost { missed };
                    shared.registry.resync_all(&reason, Some(origin));
                }
                CoreEvent::MemberUp(_) | CoreEvent::MemberDown(_) => self.peers_changed = true,
                CoreEvent::AwaitDone { id, outcome } => self.finish_await(id, outcome),
                other => warn!(?other, "unhandled mesh event"),
            }
        }
        hand_over(shared, &mut deliveries);
        while let Some(transmit) = self.node.poll_transmit() {
            out.push(transmit);
        }
        if let Ok(mut stats) = shared.stats.lock() {
            stats.clone_from(self.node.stats());
        }
        let in_flight = self.node.awaits_in_flight() as u64;
        shared.awaits_in_flight.store(in_flight, Ordering::Relaxed);
    }

    pub(crate) fn track_await(
        &mut self,
        id: AwaitId,
        ticket: u64,
        goal: Goal,
        reply: oneshot::Sender<Result<Acknowledged, Error>>,
    ) {
        self.tickets.insert(ticket, id);
        let awaiting = Awaiting {
            ticket,
            goal,
            reply,
        };
        self.awaiting.insert(id, awaiting);
    }

    pub(crate) fn cancel_await(&mut self, ticket: u64) {
        if let Some(id) = self.tickets.remove(&ticket) {
            self.awaiting.remove(&id);
            self.node.cancel_await(id);
        }
    }

    fn finish_await(&mut self, id: AwaitId, outcome: Result<Acks, AwaitFailure>) {
        let Some(awaiting) = self.awaiting.remove(&id) else {
            return;
        };
        self.tickets.remove(&awaiting.ticket);
        let result = match outcome {
            Ok(acks) => Ok(acknowledged(acks)),
            Err(AwaitFailure::Closed { .. }) => Err(Error::Closed),
            Err(failure) => {
                let available = match failure {
                    AwaitFailure::Unreachable { available, .. } => available,
                    _ => self.available(awaiting.goal),
                };
                let acked = acknowledged(failure.acked().clone());
                Err(Error::QuorumNotSatisfied {
                    acked: acked.replicas,
                    zones: acked.zones.len(),
                    required: awaiting.goal.required(),
                    available,
                    acknowledged: acked,
                    published: true,
                })
            }
        };
        // The caller may have stopped waiting; nothing is lost then.
        let _ = awaiting.reply.send(result);
    }

    /// Live remote members, or their distinct zones, for a goal.
    fn available(&self, goal: Goal) -> usize {
        match goal {
            Goal::Replicas(_) => self.node.members().len(),
            Goal::Zones(_) => {
                let zones: BTreeSet<_> = self.node.members().map(|m| &m.zone).collect();
                zones.len()
            }
        }
    }
}

/// What [`Core::publish_direct`] did.
pub(crate) enum Direct {
    /// The node is busy; queue the invalidation for the driver.
    Busy(Invalidation),
    /// Published: the caller sends these, and wakes the driver if `wake`, because the
    /// node's next timer is now earlier than the one the driver sleeps until.
    Send {
        datagrams: Vec<Transmit>,
        wake: bool,
    },
    /// The node has left the cluster.
    Refused,
}

/// Dispatches the deliveries gathered so far, together.
fn hand_over(shared: &Shared, deliveries: &mut Vec<Event>) {
    if !deliveries.is_empty() {
        shared.registry.dispatch_all(std::mem::take(deliveries));
    }
}

fn acknowledged(acks: Acks) -> Acknowledged {
    Acknowledged {
        replicas: acks.nodes.len(),
        nodes: acks.nodes,
        zones: acks.zones,
    }
}

pub(crate) fn peer_of(member: &Member) -> Peer {
    Peer {
        id: member.id,
        addr: Some(member.addr),
        zone: Some(member.zone.clone()),
    }
}
