//! The task that runs one mesh node: socket in, core, socket and subscribers out.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use syncbus_mesh::{
    Acks, AwaitFailure, AwaitId, ClusterKey, Event as CoreEvent, Goal, Instant, Invalidation,
    KeyError, Limits, Member, Node, SealMode, Stats,
};
use tokio::net::UdpSocket;

use super::link::Link;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::bus::Acknowledged;
use crate::error::Error;
use crate::event::{Event, Peer, ResyncReason};
use crate::subscription::Registry;

/// Datagrams or commands handled in one go before outputs are drained. Draining after a
/// run of publishes is what packs them into full datagrams.
const BURST: usize = 256;

/// What the handles ask of the task.
pub(crate) enum Command {
    Publish(Invalidation),
    PublishAwaited(AwaitRequest),
    /// The caller stopped waiting for the awaited publish with this ticket.
    CancelAwait(u64),
    SetInboundLoss(f64),
    /// A keyring change; answers with the installed keys' fingerprints.
    Keyring(
        KeyringChange,
        oneshot::Sender<Result<Vec<String>, KeyError>>,
    ),
    /// Answers with the node's seal mode (`None` without encryption).
    SealMode(oneshot::Sender<Option<SealMode>>),
    Leave(oneshot::Sender<()>),
}

/// What a [`Command::Keyring`] asks of the node.
pub(crate) enum KeyringChange {
    /// Nothing: only the fingerprints.
    List,
    Install(ClusterKey),
    Use(ClusterKey),
    Remove(ClusterKey),
    Mode(SealMode),
}

/// An awaited publish on its way to the task.
pub(crate) struct AwaitRequest {
    pub(crate) invalidation: Invalidation,
    pub(crate) goal: Goal,
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) ticket: u64,
    pub(crate) reply: oneshot::Sender<Result<Acknowledged, Error>>,
}

/// An awaited publish the node is tracking.
pub(crate) struct Awaiting {
    ticket: u64,
    goal: Goal,
    reply: oneshot::Sender<Result<Acknowledged, Error>>,
}

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
}

/// Whether the task goes on, and who to tell when it stops.
enum Stop {
    Running,
    /// `shutdown` was called.
    Asked(oneshot::Sender<()>),
    /// Every handle was dropped.
    HandlesGone,
}

pub(crate) struct Discovery {
    pub(crate) socket: UdpSocket,
    pub(crate) group: SocketAddrV4,
    pub(crate) interval: Duration,
}

pub(crate) struct Driver {
    pub(crate) node: Node,
    pub(crate) link: Link,
    pub(crate) discovery: Option<Discovery>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) epoch: tokio::time::Instant,
    pub(crate) max_datagram: usize,
    pub(crate) awaiting: HashMap<AwaitId, Awaiting>,
    pub(crate) tickets: HashMap<u64, AwaitId>,
    pub(crate) loss: InjectedLoss,
}

/// Drops a fraction of incoming datagrams, for tests and demonstrations of repair.
pub(crate) struct InjectedLoss {
    rate: f64,
    state: u64,
}

impl InjectedLoss {
    pub(crate) fn new(rate: f64, seed: u64) -> InjectedLoss {
        InjectedLoss {
            rate,
            state: seed | 1,
        }
    }

    /// True for the datagrams to drop. splitmix64: plenty for fault injection.
    fn drops(&mut self) -> bool {
        if self.rate <= 0.0 {
            return false;
        }
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        unit < self.rate
    }
}

/// Marks the node stopped however the task ends, so no handle reports health or waits
/// on a task that is gone.
struct StoppedOnDrop(Arc<Shared>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.0.peers.send_replace(Vec::new());
        self.0.registry.close();
    }
}

impl Driver {
    pub(crate) async fn run(mut self) {
        let stopped = StoppedOnDrop(Arc::clone(&self.shared));
        // One byte more than the limit, so an oversized datagram shows as oversized
        // instead of arriving truncated.
        let mut buf = vec![0u8; self.max_datagram + 1];
        let mut beacon_buf = vec![0u8; self.max_datagram + 1];
        let beacon_every = self
            .discovery
            .as_ref()
            .map_or(Duration::from_secs(3600), |d| d.interval);
        let mut beacon = tokio::time::interval(beacon_every);
        let mut stop = Stop::Running;
        self.flush().await;
        while matches!(stop, Stop::Running) {
            let wake = self
                .node
                .poll_timeout()
                .map(|at| self.epoch + Duration::from_nanos(at.as_nanos()));
            tokio::select! {
                command = self.commands.recv() => stop = self.command_burst(command),
                received = self.link.recv(&mut buf) => self.receive_burst(received, &mut buf),
                received = recv_discovery(self.discovery.as_ref(), &mut beacon_buf) => {
                    self.receive_discovery(received, &beacon_buf);
                }
                () = sleep_until(wake) => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                }
                _ = beacon.tick(), if self.discovery.is_some() => self.send_beacon().await,
            }
            self.flush().await;
        }
        // Refuse new commands, but send the publishes already queued before leaving.
        self.commands.close();
        let mut waiting = Vec::new();
        if let Stop::Asked(done) = stop {
            waiting.push(done);
        }
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Leave(done) => waiting.push(done),
                other => self.handle_command(other),
            }
        }
        self.leave().await;
        // Stopped before anyone hears so: later calls see `Closed`.
        drop(stopped);
        for done in waiting {
            let _ = done.send(());
        }
    }

    fn now(&self) -> Instant {
        let elapsed = self.epoch.elapsed().as_nanos();
        Instant::from_nanos(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }

    /// Handles `first` and whatever else is already queued, up to a burst.
    fn command_burst(&mut self, first: Option<Command>) -> Stop {
        let mut next = first;
        for handled in 1.. {
            match next {
                Some(Command::Leave(done)) => return Stop::Asked(done),
                Some(command) => self.handle_command(command),
                None => return Stop::HandlesGone,
            }
            if handled == BURST {
                break;
            }
            next = match self.commands.try_recv() {
                Ok(command) => Some(command),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
        }
        Stop::Running
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Publish(invalidation) => self.publish(invalidation),
            Command::PublishAwaited(request) => self.publish_awaited(request),
            Command::CancelAwait(ticket) => {
                if let Some(id) = self.tickets.remove(&ticket) {
                    self.awaiting.remove(&id);
                    self.node.cancel_await(id);
                }
            }
            Command::SetInboundLoss(rate) => self.loss.rate = rate,
            Command::Keyring(change, reply) => {
                let _ = reply.send(self.change_keyring(change));
            }
            Command::SealMode(reply) => drop(reply.send(self.node.seal_mode())),
            // `command_burst` and the final drain take leaves before they get here.
            Command::Leave(done) => drop(done.send(())),
        }
    }

    fn change_keyring(&mut self, change: KeyringChange) -> Result<Vec<String>, KeyError> {
        match change {
            KeyringChange::List => {}
            KeyringChange::Install(key) => self.node.install_key(key)?,
            KeyringChange::Use(key) => self.node.use_key(&key)?,
            KeyringChange::Remove(key) => self.node.remove_key(&key)?,
            KeyringChange::Mode(mode) => self.node.set_seal_mode(mode)?,
        }
        Ok(self.node.key_fingerprints())
    }

    fn publish_awaited(&mut self, request: AwaitRequest) {
        let now = self.now();
        let until = request.deadline.saturating_duration_since(self.epoch);
        let deadline = Instant::from_nanos(u64::try_from(until.as_nanos()).unwrap_or(u64::MAX));
        match self
            .node
            .publish_awaited(now, request.invalidation, request.goal, deadline)
        {
            Ok(id) => {
                self.tickets.insert(request.ticket, id);
                let awaiting = Awaiting {
                    ticket: request.ticket,
                    goal: request.goal,
                    reply: request.reply,
                };
                self.awaiting.insert(id, awaiting);
            }
            Err(error) => drop(request.reply.send(Err(error.into()))),
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
                let zones: std::collections::BTreeSet<_> =
                    self.node.members().map(|m| &m.zone).collect();
                zones.len()
            }
        }
    }

    fn publish(&mut self, invalidation: Invalidation) {
        // Handles check the limits before queueing, so a refusal here means the node
        // has left; the publish is dropped with the rest of the node.
        let now = self.now();
        if let Err(error) = self.node.publish(now, invalidation) {
            debug!(%error, "publish refused by the node");
        }
    }

    fn receive_burst(&mut self, first: io::Result<(usize, SocketAddr)>, buf: &mut [u8]) {
        self.receive(first, buf);
        for _ in 1..BURST {
            match self.link.try_recv(buf) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                received => self.receive(received, buf),
            }
        }
    }

    fn receive(&mut self, received: io::Result<(usize, SocketAddr)>, buf: &[u8]) {
        match received {
            Ok(_) if self.loss.drops() => {
                self.shared.injected_drops.fetch_add(1, Ordering::Relaxed);
            }
            Ok((len, from)) => {
                let now = self.now();
                self.node.handle_packet(now, from, &buf[..len]);
            }
            // ICMP errors from earlier sends surface here on some platforms; the node's
            // failure detection handles unreachable peers.
            Err(error) => debug!(%error, "receive failed"),
        }
    }

    fn receive_discovery(&mut self, received: io::Result<(usize, SocketAddr)>, buf: &[u8]) {
        match received {
            Ok((len, from)) => {
                let now = self.now();
                self.node.handle_discovery(now, from, &buf[..len]);
            }
            Err(error) => debug!(%error, "discovery receive failed"),
        }
    }

    async fn send_beacon(&mut self) {
        if let Some(discovery) = &self.discovery {
            let beacon = self.node.discovery_beacon();
            let group = SocketAddr::V4(discovery.group);
            if let Err(error) = self.link.send(&beacon, group).await {
                debug!(%error, group = %discovery.group, "discovery beacon failed");
            }
        }
    }

    async fn leave(&mut self) {
        let now = self.now();
        self.node.leave(now);
        self.flush().await;
        self.link.close().await;
        debug!("left the cluster");
    }

    /// Dispatches the deliveries gathered so far, together.
    fn hand_over(&self, deliveries: &mut Vec<Event>) {
        if !deliveries.is_empty() {
            self.shared
                .registry
                .dispatch_all(std::mem::take(deliveries));
        }
    }

    /// Hands events to subscribers, then sends what the node queued: in that order, so
    /// an acknowledgement leaves only once the event it acknowledges was delivered.
    async fn flush(&mut self) {
        let mut members_changed = false;
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
            self.hand_over(&mut deliveries);
            match event {
                CoreEvent::Resync { origin, missed } => {
                    let reason = ResyncReason::Lost { missed };
                    self.shared.registry.resync_all(&reason, Some(origin));
                }
                CoreEvent::MemberUp(_) | CoreEvent::MemberDown(_) => members_changed = true,
                CoreEvent::AwaitDone { id, outcome } => self.finish_await(id, outcome),
                other => warn!(?other, "unhandled mesh event"),
            }
        }
        self.hand_over(&mut deliveries);
        if members_changed {
            let peers = self.node.members().map(peer_of).collect();
            self.shared.peers.send_replace(peers);
        }
        while let Some(transmit) = self.node.poll_transmit() {
            let sent = self
                .link
                .send(&transmit.payload, transmit.destination)
                .await;
            if let Err(error) = sent {
                self.shared.send_errors.fetch_add(1, Ordering::Relaxed);
                debug!(%error, peer = %transmit.destination, "send failed");
            }
        }
        if let Ok(mut stats) = self.shared.stats.lock() {
            stats.clone_from(self.node.stats());
        }
        let in_flight = self.node.awaits_in_flight() as u64;
        self.shared
            .awaits_in_flight
            .store(in_flight, Ordering::Relaxed);
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

async fn recv_discovery(
    discovery: Option<&Discovery>,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr)> {
    match discovery {
        Some(discovery) => discovery.socket.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
