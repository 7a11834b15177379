//! The mesh backend: the `syncbus-mesh` core driven over UDP by a tokio task.

mod config;
mod driver;
mod socket;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use syncbus_mesh::{InvalidationKind, Limits, Member, Node, NodeId, Stats};
use tokio::sync::{mpsc, oneshot, watch};

pub use config::{MeshConfig, MulticastDiscovery};
use driver::{Command, Discovery, Driver, Shared};

use crate::bus::{Acknowledged, Bus, PublishOptions};
use crate::error::Error;
use crate::event::Peer;
use crate::metrics::Metrics;
use crate::subscription::{Registry, Subscription, Topic};

/// A [`Bus`] over the brokerless UDP mesh.
///
/// Each `MeshBus` is one cluster member: a UDP socket and a tokio task running the
/// `syncbus-mesh` state machine. Members find each other through seeds (and optionally
/// multicast), watch each other with SWIM, and send every invalidation to every live
/// member in batches.
///
/// Not yet supported: awaited publishes ([`publish_and_await`](Bus::publish_and_await)
/// and [`publish_and_await_topology`](Bus::publish_and_await_topology) return
/// [`Error::QuorumUnsupported`]) and retransmission of lost datagrams (a loss becomes a
/// resync event).
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
}

impl MeshBus {
    /// Binds the socket, starts the node on the current tokio runtime and begins
    /// announcing to the seeds. Returns before the node has found anyone; watch
    /// [`watch_peers`](Self::watch_peers) or [`is_healthy`](Bus::is_healthy) for that.
    ///
    /// Errors: [`Error::InvalidConfig`] for a setting that cannot work (an unspecified
    /// advertise address, a port already in use, a multicast group that cannot be
    /// joined), [`Error::Transport`] when the OS refuses the socket otherwise.
    pub async fn bind(config: MeshConfig) -> Result<MeshBus, Error> {
        config.validate()?;
        let socket = socket::bind_unicast(config.bind, config.socket_buffer)?;
        let local_addr = socket.local_addr()?;
        let advertise = config.advertise_for(local_addr);
        let discovery = match &config.multicast {
            Some(multicast) => Some(Discovery {
                socket: tokio::net::UdpSocket::from_std(socket::join_multicast(
                    &socket, multicast,
                )?)?,
                group: multicast.group,
                interval: multicast.interval,
            }),
            None => None,
        };
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
            send_errors: AtomicU64::new(0),
            running: AtomicBool::new(true),
        });
        let (commands, inbox) = mpsc::channel(config.publish_queue);
        let driver = Driver {
            node,
            socket: tokio::net::UdpSocket::from_std(socket)?,
            discovery,
            commands: inbox,
            shared: Arc::clone(&shared),
            epoch,
            max_datagram: config.max_datagram_size,
        };
        tokio::spawn(driver.run());
        Ok(MeshBus {
            handle: Arc::new(Handle {
                shared,
                commands,
                local_addr,
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

    async fn publish_kind(
        &self,
        kind: InvalidationKind,
        key: &str,
        options: PublishOptions,
    ) -> Result<(), Error> {
        self.check_running()?;
        options.check_deadline()?;
        let invalidation = options.invalidation(kind, key);
        self.shared().limits.check(&invalidation)?;
        let reserve = self.handle.commands.reserve();
        let permit = match options.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), reserve)
                .await
                .map_err(|_| Error::Timeout)?,
            None => reserve.await,
        };
        permit
            .map_err(|_| Error::Closed)?
            .send(Command::Publish(invalidation));
        Ok(())
    }

    fn subscribe_topic(&self, topic: Topic) -> Result<Subscription, Error> {
        self.check_running()?;
        self.shared().registry.subscribe(topic)
    }
}

#[async_trait]
impl Bus for MeshBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.publish_kind(InvalidationKind::Key, key, options).await
    }

    /// Not supported yet: returns [`Error::QuorumUnsupported`] and publishes nothing.
    async fn publish_and_await(
        &self,
        _key: &str,
        _replicas: usize,
        _options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        Err(Error::QuorumUnsupported)
    }

    /// Not supported yet: returns [`Error::QuorumUnsupported`] and publishes nothing.
    async fn publish_and_await_topology(
        &self,
        _key: &str,
        _min_zones: usize,
        _options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        Err(Error::QuorumUnsupported)
    }

    async fn subscribe(&self, key: &str) -> Result<Subscription, Error> {
        self.subscribe_topic(Topic::Key(key.to_owned()))
    }

    async fn subscribe_prefix(&self, prefix: &str) -> Result<Subscription, Error> {
        self.subscribe_topic(Topic::Prefix(prefix.to_owned()))
    }

    async fn unsubscribe(&self, subscription: &Subscription) -> Result<(), Error> {
        if !subscription.belongs_to(&self.shared().registry) {
            return Err(Error::ForeignSubscription);
        }
        self.shared().registry.unsubscribe(subscription);
        Ok(())
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
            missed: stats.missed,
            duplicates: stats.duplicates,
            datagrams_sent: stats.datagrams_sent,
            bytes_sent: stats.bytes_sent,
            datagrams_received: stats.datagrams_received,
            bytes_received: stats.bytes_received,
            send_errors: shared.send_errors.load(Ordering::Relaxed),
            dropped: stats.dropped,
            ..Metrics::default()
        };
        shared.registry.counters().fill(&mut metrics);
        metrics
    }
}
