//! The task that runs one mesh node: socket in, core, socket and subscribers out.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use syncbus_mesh::{Event as CoreEvent, Instant, Invalidation, Limits, Member, Node, Stats};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::event::{Event, Peer, ResyncReason};
use crate::subscription::Registry;

/// Datagrams or commands handled in one go before outputs are drained. Draining after a
/// run of publishes is what packs them into full datagrams.
const BURST: usize = 256;

/// What the handles ask of the task.
pub(crate) enum Command {
    Publish(Invalidation),
    Leave(oneshot::Sender<()>),
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
    pub(crate) send_errors: AtomicU64,
    pub(crate) running: AtomicBool,
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
    pub(crate) socket: UdpSocket,
    pub(crate) discovery: Option<Discovery>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) epoch: tokio::time::Instant,
    pub(crate) max_datagram: usize,
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
        let _stopped = StoppedOnDrop(Arc::clone(&self.shared));
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
                received = self.socket.recv_from(&mut buf) => self.receive_burst(received, &mut buf),
                received = recv_discovery(self.discovery.as_ref(), &mut beacon_buf) => {
                    self.receive(received, &beacon_buf);
                }
                () = sleep_until(wake) => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                }
                _ = beacon.tick(), if self.discovery.is_some() => self.send_beacon().await,
            }
            self.flush().await;
        }
        self.leave().await;
        if let Stop::Asked(done) = stop {
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
                Some(Command::Publish(invalidation)) => self.publish(invalidation),
                Some(Command::Leave(done)) => return Stop::Asked(done),
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

    fn publish(&mut self, invalidation: Invalidation) {
        // Handles check the limits before queueing, so a refusal here means the node
        // has left; the publish is dropped with the rest of the node.
        if let Err(error) = self.node.publish(invalidation) {
            debug!(%error, "publish refused by the node");
        }
    }

    fn receive_burst(&mut self, first: io::Result<(usize, SocketAddr)>, buf: &mut [u8]) {
        self.receive(first, buf);
        for _ in 1..BURST {
            match self.socket.try_recv_from(buf) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                received => self.receive(received, buf),
            }
        }
    }

    fn receive(&mut self, received: io::Result<(usize, SocketAddr)>, buf: &[u8]) {
        match received {
            Ok((len, from)) => {
                let now = self.now();
                self.node.handle_packet(now, from, &buf[..len]);
            }
            // ICMP errors from earlier sends surface here on some platforms; the node's
            // failure detection handles unreachable peers.
            Err(error) => debug!(%error, "receive failed"),
        }
    }

    async fn send_beacon(&mut self) {
        if let Some(discovery) = &self.discovery {
            let beacon = self.node.discovery_beacon();
            if let Err(error) = self.socket.send_to(&beacon, discovery.group).await {
                debug!(%error, group = %discovery.group, "discovery beacon failed");
            }
        }
    }

    async fn leave(&mut self) {
        let now = self.now();
        self.node.leave(now);
        self.flush().await;
        debug!("left the cluster");
    }

    /// Sends what the node queued and hands events to subscribers.
    async fn flush(&mut self) {
        while let Some(transmit) = self.node.poll_transmit() {
            if let Err(error) = self
                .socket
                .send_to(&transmit.payload, transmit.destination)
                .await
            {
                self.shared.send_errors.fetch_add(1, Ordering::Relaxed);
                debug!(%error, peer = %transmit.destination, "send failed");
            }
        }
        let mut members_changed = false;
        while let Some(event) = self.node.poll_event() {
            match event {
                CoreEvent::Delivered(delivery) => {
                    self.shared
                        .registry
                        .dispatch(&Event::from_delivery(delivery));
                }
                CoreEvent::Resync { origin, missed } => {
                    let reason = ResyncReason::Lost { missed };
                    self.shared.registry.resync_all(&reason, Some(origin));
                }
                CoreEvent::MemberUp(_) | CoreEvent::MemberDown(_) => members_changed = true,
                other => warn!(?other, "unhandled mesh event"),
            }
        }
        if members_changed {
            let peers = self.node.members().map(peer_of).collect();
            self.shared.peers.send_replace(peers);
        }
        if let Ok(mut stats) = self.shared.stats.lock() {
            stats.clone_from(self.node.stats());
        }
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
