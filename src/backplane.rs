//! Publishing in the background, for callers that must never wait on the bus: a
//! request handler invalidating a key, say. Submitted keys wait in a bounded queue, a
//! repeated key replacing its waiting publish; a task publishes them one by one, each
//! within `publish_timeout`. A failure is reported on the failure stream, and a publish
//! the bus could not make (it is unreachable, or timed out) waits at the head of the
//! queue until the bus is healthy again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tracing::debug;

use crate::bus::{Bus, PublishOptions};
use crate::error::Error;

/// Settings of a [`BackgroundPublisher`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackgroundConfig {
    /// Keys waiting at most; `submit` fails with `QueueFull` beyond. Default 10,000.
    pub queue_capacity: usize,
    /// How long one publish may take before it counts as failed. Default 1 s.
    pub publish_timeout: Duration,
    /// How often an unhealthy bus is checked again. Default 100 ms.
    pub health_check_every: Duration,
    /// Failures the stream holds before newer ones are dropped (and counted).
    /// Default 1,024.
    pub failure_capacity: usize,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        BackgroundConfig {
            queue_capacity: 10_000,
            publish_timeout: Duration::from_secs(1),
            health_check_every: Duration::from_millis(100),
            failure_capacity: 1024,
        }
    }
}

/// A publish that failed in the background.
#[derive(Debug)]
pub struct PublishFailure {
    /// The key that was being published.
    pub key: String,
    /// Why it failed.
    pub error: Error,
    /// True when the publish stays queued and is tried again once the bus is healthy;
    /// false when it was dropped (the bus refused it for good, a key too large, say).
    pub retrying: bool,
}

/// Accepts invalidations without waiting and publishes them in the background.
/// Cloning gives another handle to the same queue; the publishing task ends when the
/// last handle is dropped, dropping what still waits.
#[derive(Clone)]
pub struct BackgroundPublisher {
    shared: Arc<Shared>,
}

struct Shared {
    config: BackgroundConfig,
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    order: VecDeque<String>,
    waiting: HashMap<String, PublishOptions>,
    /// True while the task is publishing one: `pending` counts it.
    in_flight: bool,
    failures_dropped: u64,
}

impl BackgroundPublisher {
    /// Starts publishing to `bus` in a task on the current tokio runtime; returns the
    /// handle and the stream of failures.
    pub fn spawn(
        bus: Arc<dyn Bus>,
        config: BackgroundConfig,
    ) -> Result<(BackgroundPublisher, mpsc::Receiver<PublishFailure>), Error> {
        if config.queue_capacity == 0 || config.failure_capacity == 0 {
            return Err(Error::config(
                "queue_capacity",
                "queue_capacity and failure_capacity must be positive",
            ));
        }
        if config.publish_timeout.is_zero() || config.health_check_every.is_zero() {
            return Err(Error::config(
                "publish_timeout",
                "publish_timeout and health_check_every must be positive",
            ));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::config("runtime", "needs a tokio runtime"))?;
        let (report, failures) = mpsc::channel(config.failure_capacity);
        let shared = Arc::new(Shared {
            config,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        });
        runtime.spawn(publish_queued(Arc::downgrade(&shared), bus, report));
        Ok((BackgroundPublisher { shared }, failures))
    }

    /// Queues an invalidation of `key`, never waiting. A publish of the same key still
    /// waiting is replaced by this one. Fails with `QueueFull` when `queue_capacity`
    /// keys wait.
    pub fn submit(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        let mut queue = self.shared.lock();
        if let Some(waiting) = queue.waiting.get_mut(key) {
            *waiting = options;
            return Ok(());
        }
        if queue.order.len() >= self.shared.config.queue_capacity {
            return Err(Error::QueueFull);
        }
        queue.order.push_back(key.to_owned());
        queue.waiting.insert(key.to_owned(), options);
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Keys waiting or being published.
    pub fn pending(&self) -> usize {
        let queue = self.shared.lock();
        queue.order.len() + usize::from(queue.in_flight)
    }

    /// Failures not reported because the failure stream was full.
    pub fn failures_dropped(&self) -> u64 {
        self.shared.lock().failures_dropped
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Updated with no code in between that can panic.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next(&self) -> Option<(String, PublishOptions)> {
        let mut queue = self.lock();
        let key = queue.order.pop_front()?;
        let options = queue.waiting.remove(&key)?;
        queue.in_flight = true;
        Some((key, options))
    }

    /// Puts a failed publish back at the head, unless a newer one for the key waits.
    fn requeue(&self, key: String, options: PublishOptions) {
        let mut queue = self.lock();
        if !queue.waiting.contains_key(&key) {
            queue.order.push_front(key.clone());
            queue.waiting.insert(key, options);
        }
    }

    fn report(&self, report: &mpsc::Sender<PublishFailure>, failure: PublishFailure) {
        if report.try_send(failure).is_err() {
            self.lock().failures_dropped += 1;
        }
    }
}

/// The publishing task: one publish at a time, waiting out an unhealthy bus.
async fn publish_queued(
    shared: Weak<Shared>,
    bus: Arc<dyn Bus>,
    report: mpsc::Sender<PublishFailure>,
) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some((key, options)) = strong.next() else {
            // Nothing to do: wait for a submit, waking now and then to notice that every
            // handle was dropped (the queue is then gone at the next turn).
            let every = strong.config.health_check_every;
            let _ = tokio::time::timeout(every * 10, strong.wake.notified()).await;
            continue;
        };
        let timeout = strong.config.publish_timeout;
        let outcome = match tokio::time::timeout(timeout, bus.publish(&key, options.clone())).await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::Timeout),
        };
        strong.lock().in_flight = false;
        let Err(error) = outcome else {
            continue;
        };
        let retrying = matches!(
            error,
            Error::Unavailable(_)
                | Error::Transport(_)
                | Error::Timeout
                | Error::CircuitOpen
                | Error::QueueFull
        );
        debug!(%key, %error, retrying, "background publish failed");
        if retrying {
            strong.requeue(key.clone(), options);
        }
        strong.report(
            &report,
            PublishFailure {
                key,
                error,
                retrying,
            },
        );
        if retrying {
            let every = strong.config.health_check_every;
            drop(strong);
            wait_until_healthy(&bus, every, &shared).await;
        }
    }
}

/// Waits at least `every`, then until the bus is healthy or every handle is gone: a
/// bus that reports healthy but keeps failing is retried once per `every`, not in a
/// tight loop.
async fn wait_until_healthy(bus: &Arc<dyn Bus>, every: Duration, shared: &Weak<Shared>) {
    loop {
        tokio::time::sleep(every).await;
        if bus.is_healthy() || shared.strong_count() == 0 {
            return;
        }
    }
}
