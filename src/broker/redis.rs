//! Redis pub/sub as a broker transport: events and presence on the bus's channel,
//! acknowledgements on `<channel>:ack:<node id>`. Redis keeps nothing for a subscriber
//! that was away, so the transport reconnects by itself (backing off from 100 ms to
//! 2 s) and each new subscription after a drop is a gap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use syncbus_mesh::NodeId;
use tokio::sync::{Mutex, Notify};
use tracing::debug;

use super::{BrokerBus, BrokerConfig, Shared, Transport};
use crate::error::Error;

/// Longest wait for a connection or a reply before the broker counts as unreachable.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(2);

struct RedisTransport {
    client: redis::Client,
    channel: String,
    /// For publishing; made again after an error.
    publisher: Mutex<Option<MultiplexedConnection>>,
    /// True while the subscriber connection is up: the bus's health. A publish that
    /// fails drops the publishing connection, and the next one makes a new one.
    subscribed: AtomicBool,
    closed: Notify,
    is_closed: AtomicBool,
}

impl RedisTransport {
    fn ack_channel(&self, node: NodeId) -> String {
        format!("{}:ack:{node}", self.channel)
    }

    fn io_config() -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(IO_TIMEOUT))
            .set_response_timeout(Some(IO_TIMEOUT))
    }

    async fn publish(&self, channel: String, payload: Vec<u8>) -> Result<(), Error> {
        let mut publisher = self.publisher.lock().await;
        if publisher.is_none() {
            let made = self
                .client
                .get_multiplexed_async_connection_with_config(&Self::io_config())
                .await;
            *publisher = Some(made.map_err(unreachable)?);
        }
        let Some(connection) = publisher.as_mut() else {
            return Err(Error::Unavailable("no Redis connection".into()));
        };
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async(connection)
            .await;
        if sent.is_err() {
            *publisher = None;
        }
        sent.map(drop).map_err(unreachable)
    }
}

fn unreachable(error: redis::RedisError) -> Error {
    Error::Unavailable(format!("Redis: {error}"))
}

#[async_trait]
impl Transport for RedisTransport {
    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), Error> {
        self.publish(self.channel.clone(), payload).await
    }

    async fn send_to(&self, node: NodeId, payload: Vec<u8>) -> Result<(), Error> {
        self.publish(self.ack_channel(node), payload).await
    }

    fn is_connected(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    async fn close(&self) {
        self.is_closed.store(true, Ordering::Release);
        self.closed.notify_waiters();
        self.closed.notify_one();
    }
}

impl BrokerBus {
    /// A bus over Redis pub/sub on `channel` (for example `warp.events`), with a client
    /// the application configured (`redis::Client::open("redis://127.0.0.1/")`).
    /// Publishes go to `channel`; acknowledgements to `<channel>:ack:<node id>`.
    ///
    /// Redis pub/sub delivers at most once and keeps nothing for a disconnected
    /// subscriber: the bus reconnects by itself, and every subscription then receives
    /// one resync. Returns once subscribed, or `Unavailable` if Redis cannot be reached.
    pub async fn redis(
        client: redis::Client,
        channel: &str,
        config: BrokerConfig,
    ) -> Result<BrokerBus, Error> {
        config.validate()?;
        if channel.is_empty() || channel.chars().any(|c| c.is_whitespace() || c == '*') {
            return Err(Error::config(
                "channel",
                format!("{channel:?} must be a Redis channel name without spaces or globs"),
            ));
        }
        let transport = Arc::new(RedisTransport {
            client,
            channel: channel.to_owned(),
            publisher: Mutex::new(None),
            subscribed: AtomicBool::new(false),
            closed: Notify::new(),
            is_closed: AtomicBool::new(false),
        });
        let acks = transport.ack_channel(config.node_id);
        let first = subscribe(&transport, &acks).await?;
        let bus = BrokerBus::start(config, transport.clone());
        tokio::spawn(receive(
            Arc::downgrade(bus.shared()),
            transport,
            acks,
            first,
        ));
        Ok(bus)
    }
}

/// A subscriber connection on the bus's channel and this instance's ack channel.
async fn subscribe(transport: &RedisTransport, acks: &str) -> Result<redis::aio::PubSub, Error> {
    let connect = async {
        let mut pubsub = transport.client.get_async_pubsub().await?;
        pubsub.subscribe(&transport.channel).await?;
        pubsub.subscribe(acks).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(IO_TIMEOUT, connect).await {
        Ok(Ok(pubsub)) => {
            transport.subscribed.store(true, Ordering::Release);
            Ok(pubsub)
        }
        Ok(Err(error)) => Err(Error::Unavailable(format!("Redis subscribe: {error}"))),
        Err(_) => Err(Error::Unavailable("Redis subscribe timed out".into())),
    }
}

/// Feeds payloads to the engine and sends the acknowledgements they ask for; when the
/// subscriber connection drops, subscribes again (a gap: resync), until the bus is
/// shut down or dropped.
async fn receive(
    shared: std::sync::Weak<Shared>,
    transport: Arc<RedisTransport>,
    acks: String,
    first: redis::aio::PubSub,
) {
    let mut pubsub = Some(first);
    let mut retry = FIRST_RETRY;
    loop {
        if let Some(connection) = pubsub.take() {
            retry = FIRST_RETRY;
            let mut messages = connection.into_on_message();
            let mut alive = tokio::time::interval(LAST_RETRY);
            loop {
                let message = tokio::select! {
                    () = transport.closed.notified() => return,
                    message = messages.next() => message,
                    // A bus dropped without shutdown ends this task and its connection.
                    _ = alive.tick() => {
                        if shared.strong_count() == 0 {
                            return;
                        }
                        continue;
                    }
                };
                let Some(message) = message else { break };
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                if let Some((origin, ack)) = shared.receive(message.get_payload_bytes())
                    && let Err(error) = shared.send(Some(origin), ack).await
                {
                    debug!(%error, "acknowledgement not sent");
                }
            }
            debug!("Redis subscriber connection dropped; reconnecting");
            transport.subscribed.store(false, Ordering::Release);
        }
        if transport.is_closed.load(Ordering::Acquire) || shared.upgrade().is_none() {
            return;
        }
        tokio::select! {
            () = transport.closed.notified() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(LAST_RETRY);
        match subscribe(&transport, &acks).await {
            Ok(connection) => {
                pubsub = Some(connection);
                // Redis is back, and the publishing connection is one from before.
                *transport.publisher.lock().await = None;
                match shared.upgrade() {
                    Some(shared) => shared.reconnected(),
                    None => return,
                }
            }
            Err(error) => debug!(%error, "Redis still unreachable"),
        }
    }
}
