//! The mesh backend: the `syncbus-mesh` core driven over UDP by a tokio task.

mod config;
mod driver;
mod link;
#[cfg(feature = "quic")]
mod quic;
mod socket;
mod state;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use syncbus_mesh::{
    ClusterKey, Goal, Invalidation, InvalidationKind, Limits, Member, Node, NodeId, SealMode, Stats,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};

pub use config::{MeshConfig, MulticastDiscovery};
use driver::{AwaitRequest, Command, Discovery, Driver, InjectedLoss, KeyringChange};
use link::Link;
#[cfg(feature = "quic")]
pub use quic::QuicConfig;
use state::{Core, Direct, LockedCore, Shared};

use crate::bus::{Acknowledged, Bus, DEFAULT_AWAIT_TIMEOUT, PublishOptions};
use crate::error::Error;
use crate::event::Peer;
use crate::metrics::Metrics;
use crate::subscription::{Registry, Subscription, Topic};

/// The node's datagram carrier, and its multicast discovery socket if any.
fn bind_link(config: &MeshConfig) -> Result<(Link, Option<Discovery>), Error> {
    #[cfg(feature = "quic")]
    if let Some(quic) = &config.quic {
        return Ok((Link::Quic(quic::QuicLink::bind(config.bind, quic)?), None));
    }
    let socket = socket::bind_unicast(config.bind, config.socket_buffer)?;
    let discovery = match &config.multicast {
        Some(multicast) => Some(Discovery {
            socket: tokio::net::UdpSocket::from_std(socket::join_multicast(&socket, multicast)?)?,
            group: multicast.group,
            interval: multicast.interval,
        }),
        None => None,
    };
    Ok((
        Link::Udp(Arc::new(tokio::net::UdpSocket::from_std(socket)?)),
        discovery,
    ))
}

/// A [`Bus`] over the brokerless UDP mesh.
///
/// Each `MeshBus` is one cluster member: a UDP socket and a tokio task running the
/// `syncbus-mesh` state machine. Members find each other through seeds (and optionally
/// multicast) and watch each other with SWIM. Invalidations go out in batches: to every
/// member of this node's zone, and through two relays to each other zone. Receivers
/// repair lost entries from the origin; what cannot be repaired becomes a resync event.
/// Awaited publishes count acknowledgements from distinct remote nodes.
///
/// Cloning gives another handle to the same node. Dropping the last handle makes the
/// node leave its cluster gracefully in the background; call
/// [`shutdown`](Bus::shutdown) to wait for that.
#[derive(Clone)]
pub struct MeshBus {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    local_addr: SocketAddr,
    core: Arc<LockedCore>,
    /// The node's UDP socket, for publishes that go straight from the caller; `None`
    /// over QUIC, whose connections the driver task owns.
    direct: Option<Arc<tokio::net::UdpSocket>>,
}

impl MeshBus {
    /// Binds the socket, starts the node on the current tokio runtime and begins
    /// announcing to the seeds. Returns before the node has found anyone; watch
    /// [`watch_peers`](Self::watch_peers) or [`is_healthy`](Bus::is_healthy) for that.
    ///
    /// Errors: [`Error::InvalidConfig`] for a setting that cannot work (an unspecified
    /// advertise address or one with an IPv6 scope id, a port already in use, a
    /// multicast group that cannot be joined), [`Error::Transport`] when the OS refuses
    /// the socket otherwise.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the work happens before the first await point, so a dropped call
    /// either never started or returned; no node is left running without a handle.
    pub async fn bind(config: MeshConfig) -> Result<MeshBus, Error> {
        config.validate()?;
        let (link, discovery) = bind_link(&config)?;
        let local_addr = match &link {
            Link::Udp(socket) => socket.local_addr()?,
            #[cfg(feature = "quic")]
            Link::Quic(quic) => quic.local_addr()?,
        };
        let advertise = config.advertise_for(local_addr);
        let node_config = config.node_config(advertise);
        let epoch = tokio::time::Instant::now();
        let node = Node::new(node_config, syncbus_mesh::Instant::ZERO)?;
        let shared = Arc::new(Shared {
            registry: Registry::new(config.subscriber_capacity),
            local: node.local().clone(),
            limits: node.limits(),
            expects_peers: !config.seeds.is_empty(),
            peers: watch::Sender::new(Vec::new()),
            stats: Mutex::new(Stats::default()),
            awaits_in_flight: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            running: AtomicBool::new(true),
            next_ticket: AtomicU64::new(1),
            injected_drops: AtomicU64::new(0),
            epoch,
            unsent_publishes: AtomicU64::new(0),
            last_publish: AtomicU64::new(state::NEVER),
            driver_sleeps_until: AtomicU64::new(u64::MAX),
            wake_driver: Notify::new(),
        });
        let core = Arc::new(LockedCore::new(Core::new(node)));
        let direct = link.udp();
        let (commands, inbox) = mpsc::channel(config.publish_queue);
        let driver = Driver {
            core: Arc::clone(&core),
            link,
            discovery,
            commands: inbox,
            shared: Arc::clone(&shared),
            max_datagram: config.datagram_limit(),
            loss: InjectedLoss::new(config.inbound_loss, config::random_u64()),
            outbox: Vec::new(),
            publishes_handled: 0,
        };
        tokio::spawn(driver.run());
        Ok(MeshBus {
            handle: Arc::new(Handle {
                shared,
                commands,
                local_addr,
                core,
                direct,
            }),
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }

    /// This node as its peers see it: id, advertised address, zone.
    pub fn member(&self) -> &Member {
        &self.handle.shared.local
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.handle.shared.local.id
    }

    /// The size limits every publish must meet.
    pub fn limits(&self) -> Limits {
        self.handle.shared.limits
    }

    /// Changes [`MeshConfig::inbound_loss`] while running (fault injection for tests
    /// and demonstrations). Takes effect once the node's task has the command.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropped before it returns, the setting may or may not have been
    /// queued; call it again to be sure.
    pub async fn set_inbound_loss(&self, rate: f64) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(Error::config("inbound_loss", "must be between 0.0 and 1.0"));
        }
        let send = self.handle.commands.send(Command::SetInboundLoss(rate));
        send.await.map_err(|_| Error::Closed)
    }

    /// Installs a cluster key: datagrams sealed with it open from now on. Rotating
    /// without downtime: install the new key on every node, then
    /// [`use_key`](Self::use_key) it on every node, then
    /// [`remove_key`](Self::remove_key) the old one everywhere. Returns the installed
    /// keys' fingerprints, the one that seals first.
    ///
    /// Errors: [`Error::Keyring`] (the node started without encryption, or the
    /// keyring is full), [`Error::Closed`].
    pub async fn install_key(&self, key: ClusterKey) -> Result<Vec<String>, Error> {
        self.keyring(KeyringChange::Install(key)).await
    }

    /// Seals with an installed key from now on.
    pub async fn use_key(&self, key: &ClusterKey) -> Result<Vec<String>, Error> {
        self.keyring(KeyringChange::Use(key.clone())).await
    }

    /// Removes an installed key other than the one that seals.
    pub async fn remove_key(&self, key: &ClusterKey) -> Result<Vec<String>, Error> {
        self.keyring(KeyringChange::Remove(key.clone())).await
    }

    /// Changes how plaintext is treated (see [`SealMode`] for moving a running
    /// cluster from plaintext to sealed datagrams).
    pub async fn set_seal_mode(&self, mode: SealMode) -> Result<Vec<String>, Error> {
        self.keyring(KeyringChange::Mode(mode)).await
    }

    /// The installed keys' fingerprints, the one that seals first; empty without
    /// encryption.
    pub async fn key_fingerprints(&self) -> Result<Vec<String>, Error> {
        self.keyring(KeyringChange::List).await
    }

    /// How the node treats plaintext now; `None` for a node without encryption.
    pub async fn seal_mode(&self) -> Result<Option<SealMode>, Error> {
        let (reply, answer) = oneshot::channel();
        let send = self.handle.commands.send(Command::SealMode(reply));
        send.await.map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)
    }

    async fn keyring(&self, change: KeyringChange) -> Result<Vec<String>, Error> {
        let (reply, answer) = oneshot::channel();
        let send = self.handle.commands.send(Command::Keyring(change, reply));
        send.await.map_err(|_| Error::Closed)?;
        answer
            .await
            .map_err(|_| Error::Closed)?
            .map_err(Error::Keyring)
    }

    /// The live remote members, updated on every change. Wait for a condition with
    /// `watch::Receiver::wait_for`.
    pub fn watch_peers(&self) -> watch::Receiver<Vec<Peer>> {
        self.handle.shared.peers.subscribe()
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    fn check_running(&self) -> Result<(), Error> {
        if !self.shared().running.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Everything a publish checks before it queues: running, deadline, size.
    fn prepare(
        &self,
        kind: InvalidationKind,
        key: &str,
        options: &PublishOptions,
    ) -> Result<Invalidation, Error> {
        self.check_running()?;
        options.check_deadline()?;
        let invalidation = options.invalidation(kind, key);
        self.shared().limits.check(&invalidation)?;
        Ok(invalidation)
    }

    async fn publish_kind(
        &self,
        kind: InvalidationKind,
        key: &str,
        options: PublishOptions,
    ) -> Result<(), Error> {
        let invalidation = self.prepare(kind, key, &options)?;
        let Some(invalidation) = self.publish_direct(invalidation)? else {
            return Ok(());
        };
        let reserve = self.handle.commands.reserve();
        let permit = match options.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), reserve)
                .await
                .map_err(|_| Error::Timeout)?,
            None => reserve.await,
        };
        let permit = permit.map_err(|_| Error::Closed)?;
        self.queue_publish(permit, Command::Publish(invalidation));
        Ok(())
    }

    /// Publishes from the caller's thread if the node is idle (see
    /// [`Core::publish_direct`]); hands the invalidation back to be queued otherwise.
    fn publish_direct(&self, invalidation: Invalidation) -> Result<Option<Invalidation>, Error> {
        let Some(socket) = &self.handle.direct else {
            return Ok(Some(invalidation));
        };
        let shared = self.shared();
        // Under load, publishes queue: see that without contending for the lock with
        // the driver, which holds it through bursts of commands.
        if !shared.quiet_before_publish() || shared.unsent_publishes.load(Ordering::Acquire) > 0 {
            return Ok(Some(invalidation));
        }
        let datagrams = match self.handle.core.lock().publish_direct(shared, invalidation) {
            Direct::Busy(invalidation) => return Ok(Some(invalidation)),
            Direct::Refused => return Err(Error::Closed),
            Direct::Send { datagrams, wake } => {
                if wake {
                    shared.wake_driver.notify_one();
                }
                datagrams
            }
        };
        let mut unsent = datagrams.into_iter();
        while let Some(datagram) = unsent.next() {
            match socket.try_send_to(&datagram.payload, datagram.destination) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    // The driver waits for room in the socket's buffer, unless it has
                    // sent its last datagrams: then not every member got this.
                    if !self.handle.core.lock().spill(shared, datagram, unsent) {
                        return Err(Error::Closed);
                    }
                    shared.wake_driver.notify_one();
                    break;
                }
                Err(error) => shared.send_failed(&error, datagram.destination),
            }
        }
        Ok(None)
    }

    /// Queues a publish for the driver; until it is sent, publishes skip the fast path.
    fn queue_publish(&self, permit: mpsc::Permit<'_, Command>, command: Command) {
        self.shared()
            .unsent_publishes
            .fetch_add(1, Ordering::AcqRel);
        permit.send(command);
    }

    fn try_publish_kind(
        &self,
        kind: InvalidationKind,
        key: &str,
        options: PublishOptions,
    ) -> Result<(), Error> {
        let invalidation = self.prepare(kind, key, &options)?;
        let Some(invalidation) = self.publish_direct(invalidation)? else {
            return Ok(());
        };
        let permit = self
            .handle
            .commands
            .try_reserve()
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(()) => Error::QueueFull,
                mpsc::error::TrySendError::Closed(()) => Error::Closed,
            })?;
        self.queue_publish(permit, Command::Publish(invalidation));
        Ok(())
    }

    async fn publish_awaited(
        &self,
        key: &str,
        goal: Goal,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        let invalidation = self.prepare(InvalidationKind::Key, key, &options)?;
        // Awaited publishes always queue, but count as activity all the same.
        let _ = self.shared().quiet_before_publish();
        let deadline = options.deadline.map_or_else(
            || tokio::time::Instant::now() + DEFAULT_AWAIT_TIMEOUT,
            Into::into,
        );
        let permit = tokio::time::timeout_at(deadline, self.handle.commands.reserve())
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|_| Error::Closed)?;
        let ticket = self.shared().next_ticket.fetch_add(1, Ordering::Relaxed);
        let (reply, outcome) = oneshot::channel();
        let request = AwaitRequest {
            invalidation,
            goal,
            deadline,
            ticket,
            reply,
        };
        self.queue_publish(permit, Command::PublishAwaited(request));
        let mut cancel = CancelOnDrop {
            commands: self.handle.commands.clone(),
            ticket,
            armed: true,
        };
        // The node answers by the deadline at the latest; a task that is gone drops
        // the reply, which reads as closed.
        let result = outcome.await.unwrap_or(Err(Error::Closed));
        cancel.armed = false;
        result
    }

    fn subscribe_topic(&self, topic: Topic) -> Result<Subscription, Error> {
        self.check_running()?;
        let (Topic::Key(name) | Topic::Prefix(name) | Topic::Lease(name)) = &topic;
        let max = self.shared().limits.max_key_len;
        if name.len() > max {
            return Err(Error::KeyTooLarge {
                len: name.len(),
                max,
            });
        }
        self.shared().registry.subscribe(topic)
    }
}

/// Tells the node to stop tracking an awaited publish whose caller stopped waiting.
struct CancelOnDrop {
    commands: mpsc::Sender<Command>,
    ticket: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            // With the queue full, the node frees the tracking at the deadline instead.
            let _ = self.commands.try_send(Command::CancelAwait(self.ticket));
        }
    }
}

#[async_trait]
impl Bus for MeshBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.publish_kind(InvalidationKind::Key, key, options).await
    }

    fn try_publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.try_publish_kind(InvalidationKind::Key, key, options)
    }

    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        self.publish_awaited(key, Goal::Replicas(replicas), options)
            .await
    }

    async fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        self.publish_awaited(key, Goal::Zones(min_zones), options)
            .await
    }

    async fn subscribe(&self, key: &str) -> Result<Subscription, Error> {
        self.subscribe_topic(Topic::Key(key.to_owned()))
    }

    async fn subscribe_prefix(&self, prefix: &str) -> Result<Subscription, Error> {
        self.subscribe_topic(Topic::Prefix(prefix.to_owned()))
    }

    async fn unsubscribe(&self, subscription: &Subscription) -> Result<(), Error> {
        self.shared().registry.unsubscribe_own(subscription)
    }

    async fn revoke_lease(&self, id: &str, options: PublishOptions) -> Result<(), Error> {
        self.publish_kind(InvalidationKind::Lease, id, options)
            .await
    }

    async fn subscribe_lease(&self, id: &str) -> Result<Subscription, Error> {
        self.subscribe_topic(Topic::Lease(id.to_owned()))
    }

    /// Leaves the cluster (peers see this node gone at once) and stops the task; every
    /// subscription ends. Publishes queued before the call are sent first. Calling it
    /// again returns at once.
    async fn shutdown(&self) -> Result<(), Error> {
        let (done, finished) = oneshot::channel();
        if self
            .handle
            .commands
            .send(Command::Leave(done))
            .await
            .is_ok()
        {
            // An error means the task is gone already, which is the goal.
            let _ = finished.await;
        }
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        let running = self.shared().running.load(Ordering::Acquire);
        let alone = self.shared().peers.borrow().is_empty();
        running && !(self.shared().expects_peers && alone)
    }

    fn peers(&self) -> Vec<Peer> {
        self.shared().peers.borrow().clone()
    }

    fn metrics(&self) -> Metrics {
        let shared = self.shared();
        let stats = shared.stats.lock().map(|s| s.clone()).unwrap_or_default();
        let mut metrics = Metrics {
            published: stats.published,
            coalesced: stats.coalesced,
            acknowledged: stats.acks_received,
            retransmitted: stats.retransmitted,
            repairs_requested: stats.repairs_requested,
            member_updates_synced: stats.member_updates_synced,
            member_updates_already_held: stats.member_updates_already_held,
            down_notices_ignored: stats.down_notices_ignored,
            datagrams_sent_in_zone: stats.datagrams_sent_in_zone,
            bytes_sent_in_zone: stats.bytes_sent_in_zone,
            datagrams_sent_across_zones: stats.datagrams_sent_across_zones,
            bytes_sent_across_zones: stats.bytes_sent_across_zones,
            missed: stats.missed,
            duplicates: stats.duplicates,
            datagrams_sent: stats.datagrams_sent,
            bytes_sent: stats.bytes_sent,
            datagrams_received: stats.datagrams_received,
            bytes_received: stats.bytes_received,
            send_errors: shared.send_errors.load(Ordering::Relaxed),
            injected_drops: shared.injected_drops.load(Ordering::Relaxed),
            awaits_in_flight: shared.awaits_in_flight.load(Ordering::Relaxed),
            dropped: stats.dropped,
            ..Metrics::default()
        };
        shared.registry.counters().fill(&mut metrics);
        metrics
    }
}
