//! The task that runs one mesh node: socket in, core, socket and subscribers out.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use syncbus_mesh::{ClusterKey, Goal, Instant, Invalidation, KeyError, Node, SealMode, Transmit};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::link::Link;
use super::state::{Core, LockedCore, Shared};
use crate::bus::Acknowledged;
use crate::error::Error;

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
    pub(crate) core: Arc<LockedCore>,
    pub(crate) link: Link,
    pub(crate) discovery: Option<Discovery>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) max_datagram: usize,
    pub(crate) loss: InjectedLoss,
    /// Datagrams taken from the node, sent once the core is unlocked.
    pub(crate) outbox: Vec<Transmit>,
    /// Publish commands handled since the last send; they count as unsent until then.
    pub(crate) publishes_handled: u64,
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
        let mut wake = self.flush().await;
        let shared = Arc::clone(&self.shared);
        while matches!(stop, Stop::Running) {
            tokio::select! {
                command = self.commands.recv() => stop = self.command_burst(command),
                received = self.link.recv(&mut buf) => self.receive_burst(received, &mut buf),
                received = recv_discovery(self.discovery.as_ref(), &mut beacon_buf) => {
                    self.receive_discovery(received, &beacon_buf);
                }
                () = sleep_until(wake) => {
                    let now = self.shared.now();
                    self.core.lock().node.handle_timeout(now);
                }
                // A direct publish left datagrams or moved the next timer; the flush
                // below sees both.
                () = shared.wake_driver.notified() => {}
                _ = beacon.tick(), if self.discovery.is_some() => self.send_beacon().await,
            }
            wake = self.flush().await;
        }
        // Refuse new commands, but send the publishes already queued before leaving.
        self.commands.close();
        let mut waiting = Vec::new();
        if let Stop::Asked(done) = stop {
            waiting.push(done);
        }
        let core = Arc::clone(&self.core);
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Leave(done) => waiting.push(done),
                other => self.handle_command(&mut core.lock(), other),
            }
        }
        self.leave().await;
        // Stopped before anyone hears so: later calls see `Closed`.
        drop(stopped);
        for done in waiting {
            let _ = done.send(());
        }
    }

    /// When the node's next timer fires, noted for direct publishes to compare with.
    fn next_wake(&self, core: &Core) -> Option<tokio::time::Instant> {
        let next = core.node.poll_timeout();
        let nanos = next.map_or(u64::MAX, Instant::as_nanos);
        self.shared
            .driver_sleeps_until
            .store(nanos, Ordering::Release);
        next.map(|at| self.shared.epoch + Duration::from_nanos(at.as_nanos()))
    }

    /// Handles `first` and whatever else is already queued, up to a burst.
    fn command_burst(&mut self, first: Option<Command>) -> Stop {
        let core = Arc::clone(&self.core);
        let mut core = core.lock();
        let mut next = first;
        for handled in 1.. {
            match next {
                Some(Command::Leave(done)) => return Stop::Asked(done),
                Some(command) => self.handle_command(&mut core, command),
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

    fn handle_command(&mut self, core: &mut Core, command: Command) {
        match command {
            Command::Publish(invalidation) => {
                self.publishes_handled += 1;
                // Handles check the limits before queueing, so a refusal here means
                // the node has left; the publish is dropped with the rest of the node.
                let now = self.shared.now();
                if let Err(error) = core.node.publish(now, invalidation) {
                    debug!(%error, "publish refused by the node");
                }
            }
            Command::PublishAwaited(request) => {
                self.publishes_handled += 1;
                self.publish_awaited(core, request);
            }
            Command::CancelAwait(ticket) => core.cancel_await(ticket),
            Command::SetInboundLoss(rate) => self.loss.rate = rate,
            Command::Keyring(change, reply) => {
                let _ = reply.send(change_keyring(&mut core.node, change));
            }
            Command::SealMode(reply) => drop(reply.send(core.node.seal_mode())),
            // `command_burst` and the final drain take leaves before they get here.
            Command::Leave(done) => drop(done.send(())),
        }
    }

    fn publish_awaited(&self, core: &mut Core, request: AwaitRequest) {
        let now = self.shared.now();
        let until = request
            .deadline
            .saturating_duration_since(self.shared.epoch);
        let deadline = Instant::from_nanos(u64::try_from(until.as_nanos()).unwrap_or(u64::MAX));
        match core
            .node
            .publish_awaited(now, request.invalidation, request.goal, deadline)
        {
            Ok(id) => core.track_await(id, request.ticket, request.goal, request.reply),
            Err(error) => drop(request.reply.send(Err(error.into()))),
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
                let now = self.shared.now();
                self.core.lock().node.handle_packet(now, from, &buf[..len]);
            }
            // ICMP errors from earlier sends surface here on some platforms; the node's
            // failure detection handles unreachable peers.
            Err(error) => debug!(%error, "receive failed"),
        }
    }

    fn receive_discovery(&mut self, received: io::Result<(usize, SocketAddr)>, buf: &[u8]) {
        match received {
            Ok((len, from)) => {
                let now = self.shared.now();
                self.core
                    .lock()
                    .node
                    .handle_discovery(now, from, &buf[..len]);
            }
            Err(error) => debug!(%error, "discovery receive failed"),
        }
    }

    async fn send_beacon(&mut self) {
        if let Some(discovery) = &self.discovery {
            let beacon = self.core.lock().node.discovery_beacon();
            let group = SocketAddr::V4(discovery.group);
            if let Err(error) = self.link.send(&beacon, group).await {
                debug!(%error, group = %discovery.group, "discovery beacon failed");
            }
        }
    }

    async fn leave(&mut self) {
        let now = self.shared.now();
        self.core.lock().node.leave(now);
        self.flush().await;
        // A direct publish may have spilled datagrams during that last flush.
        let late = self.core.lock().close();
        self.send_all(late).await;
        self.link.close().await;
        debug!("left the cluster");
    }

    /// Hands the node's events over and sends what it queued (after what direct
    /// publishes spilled), then the peer list if it changed: the core unlocked while
    /// sending. Returns when the node's next timer fires.
    async fn flush(&mut self) -> Option<tokio::time::Instant> {
        let mut outbox = std::mem::take(&mut self.outbox);
        let (peers, wake) = {
            let mut core = self.core.lock();
            self.publishes_handled += core.take_spilled(&mut outbox);
            core.drain(&self.shared, &mut outbox);
            (core.take_peers_update(), self.next_wake(&core))
        };
        if let Some(peers) = peers {
            self.shared.peers.send_replace(peers);
        }
        self.outbox = self.send_all(outbox).await;
        if self.publishes_handled > 0 {
            self.shared
                .unsent_publishes
                .fetch_sub(self.publishes_handled, Ordering::AcqRel);
            self.publishes_handled = 0;
        }
        wake
    }

    /// Sends `datagrams`; returns the emptied vector for reuse.
    async fn send_all(&mut self, mut datagrams: Vec<Transmit>) -> Vec<Transmit> {
        for transmit in datagrams.drain(..) {
            let sent = self
                .link
                .send(&transmit.payload, transmit.destination)
                .await;
            if let Err(error) = sent {
                self.shared.send_failed(&error, transmit.destination);
            }
        }
        datagrams
    }
}

fn change_keyring(node: &mut Node, change: KeyringChange) -> Result<Vec<String>, KeyError> {
    match change {
        KeyringChange::List => {}
        KeyringChange::Install(key) => node.install_key(key)?,
        KeyringChange::Use(key) => node.use_key(&key)?,
        KeyringChange::Remove(key) => node.remove_key(&key)?,
        KeyringChange::Mode(mode) => node.set_seal_mode(mode)?,
    }
    Ok(node.key_fingerprints())
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
