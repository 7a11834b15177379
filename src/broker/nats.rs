//! NATS core as a broker transport: events and presence on the bus's subject,
//! acknowledgements on `<subject>.ack.<node id>`. async-nats reconnects and
//! resubscribes by itself; the client's connect counter tells when that happened, and
//! NATS core keeps nothing for a disconnected subscriber, so each reconnect is a gap.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_trait::async_trait;
use futures_util::StreamExt;
use syncbus_mesh::NodeId;
use tokio::sync::Notify;
use tracing::debug;

use super::{BrokerBus, BrokerConfig, Shared, Transport};
use crate::error::Error;

/// How often the connect counter is read. A reconnect is counted whenever it happened,
/// so a short drop between two reads is still seen.
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// Longest construction waits for the server to confirm the subscriptions.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

struct NatsTransport {
    client: async_nats::Client,
    subject: String,
    closed: Notify,
}

impl NatsTransport {
    fn ack_subject(&self, node: NodeId) -> String {
        format!("{}.ack.{node}", self.subject)
    }
}

#[async_trait]
impl Transport for NatsTransport {
    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), Error> {
        self.client
            .publish(self.subject.clone(), payload.into())
            .await
            .map_err(|e| Error::Unavailable(format!("NATS publish failed: {e}")))
    }

    async fn send_to(&self, node: NodeId, payload: Vec<u8>) -> Result<(), Error> {
        self.client
            .publish(self.ack_subject(node), payload.into())
            .await
            .map_err(|e| Error::Unavailable(format!("NATS publish failed: {e}")))
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    async fn close(&self) {
        self.closed.notify_waiters();
        self.closed.notify_one();
    }
}

impl BrokerBus {
    /// A bus over NATS core, on `subject` (for example `warp.events`), with a client
    /// the application connected. Publishes go to `subject`; acknowledgements to
    /// `<subject>.ack.<node id>`. Every instance on the same subject and server forms
    /// one bus.
    ///
    /// NATS core delivers at most once and keeps nothing for a disconnected
    /// subscriber: after the client reconnects, every subscription receives one resync.
    pub async fn nats(
        client: async_nats::Client,
        subject: &str,
        config: BrokerConfig,
    ) -> Result<BrokerBus, Error> {
        config.validate()?;
        validate_subject(subject)?;
        let transport = Arc::new(NatsTransport {
            client: client.clone(),
            subject: subject.to_owned(),
            closed: Notify::new(),
        });
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                client
                    .subscribe(subject)
                    .await
                    .map_err(|e| Error::Unavailable(format!("NATS subscribe failed: {e}")))
            }
        };
        let events = subscribe(subject.to_owned()).await?;
        let acks = subscribe(transport.ack_subject(config.node_id)).await?;
        // Returns only once the server has the subscriptions: a bus must not miss what
        // is published right after it was built.
        match tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Unavailable(format!("NATS flush failed: {e}"))),
            Err(_) => return Err(Error::Unavailable("NATS server did not answer".into())),
        }
        let bus = BrokerBus::start(config, transport.clone());
        let shared = Arc::downgrade(bus.shared());
        tokio::spawn(receive(shared, transport, events, acks));
        Ok(bus)
    }
}

fn validate_subject(subject: &str) -> Result<(), Error> {
    let valid = !subject.is_empty()
        && subject
            .split('.')
            .all(|token| !token.is_empty() && token != "*" && token != ">")
        && !subject.chars().any(char::is_whitespace);
    if !valid {
        return Err(Error::config(
            "subject",
            format!("{subject:?} must be a NATS subject without wildcards or spaces"),
        ));
    }
    Ok(())
}

/// Feeds payloads to the engine, sends the acknowledgements they ask for, and turns
/// reconnects into resyncs, until the bus is shut down or dropped.
async fn receive(
    shared: std::sync::Weak<Shared>,
    transport: Arc<NatsTransport>,
    mut events: async_nats::Subscriber,
    mut acks: async_nats::Subscriber,
) {
    let connects = AtomicU64::new(
        transport
            .client
            .statistics()
            .connects
            .load(Ordering::Relaxed),
    );
    let mut watch = tokio::time::interval(WATCH_EVERY);
    loop {
        let message = tokio::select! {
            () = transport.closed.notified() => return,
            message = events.next() => message,
            message = acks.next() => message,
            _ = watch.tick() => {
                // A bus dropped without shutdown ends this task (and its subscriptions).
                let Some(shared) = shared.upgrade() else { return };
                let now = transport.client.statistics().connects.load(Ordering::Relaxed);
                if now != connects.swap(now, Ordering::Relaxed) {
                    // The client resubscribes after reconnecting; make sure the server
                    // has the subscriptions before telling subscribers to resync.
                    let _ = tokio::time::timeout(FLUSH_TIMEOUT, transport.client.flush()).await;
                    shared.reconnected();
                }
                continue;
            }
        };
        let Some(message) = message else {
            debug!("NATS subscription ended");
            return;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.is_closed() {
            return;
        }
        if let Some((origin, ack)) = shared.receive(&message.payload)
            && let Err(error) = shared.send(Some(origin), ack).await
        {
            debug!(%error, "acknowledgement not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_checked() {
        assert!(validate_subject("warp.events").is_ok());
        for bad in ["", "warp.*", "warp.>", "a..b", "has space", "."] {
            assert!(validate_subject(bad).is_err(), "{bad:?}");
        }
    }
}
