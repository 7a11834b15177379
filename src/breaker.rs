//! A circuit breaker over any bus: after `failure_threshold` failures in a row it
//! opens, and calls fail at once with [`Error::CircuitOpen`] instead of waiting on a
//! sick broker; after `open_for`, one call goes through as a probe, and its outcome
//! closes the circuit or opens it again.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::bus::{Acknowledged, Bus, PublishOptions};
use crate::error::Error;
use crate::event::Peer;
use crate::metrics::Metrics;
use crate::subscription::Subscription;

/// Settings of a [`CircuitBreaker`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures in a row that open the circuit. Default 5.
    pub failure_threshold: u32,
    /// How long the circuit stays open before a probe may pass. Default 5 s.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is on its way; everything else is refused until it returns.
    HalfOpen,
}

/// Wraps a bus so that a failing backend is not waited on call after call.
///
/// Failures are the errors that say the backend is sick: `Unavailable`, `Transport`
/// and `Timeout`. Refusals that are the caller's (a key too large, an unreachable goal,
/// a full queue) pass through without counting. Subscriptions are never blocked: they
/// are local, and their resyncs report what a sick broker lost. `is_healthy()` is false
/// while the circuit is open.
pub struct CircuitBreaker {
    inner: Arc<dyn Bus>,
    config: BreakerConfig,
    state: Mutex<State>,
}

impl CircuitBreaker {
    /// A breaker, closed, around `inner`.
    pub fn new(inner: Arc<dyn Bus>, config: BreakerConfig) -> Result<CircuitBreaker, Error> {
        if config.failure_threshold == 0 || config.open_for.is_zero() {
            return Err(Error::config(
                "failure_threshold",
                "failure_threshold and open_for must be positive",
            ));
        }
        Ok(CircuitBreaker {
            inner,
            config,
            state: Mutex::new(State::Closed { failures: 0 }),
        })
    }

    /// True while calls are refused without trying.
    pub fn is_open(&self) -> bool {
        match *self.lock() {
            State::Closed { .. } => false,
            State::Open { until } => Instant::now() < until,
            State::HalfOpen => true,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Updated with no code in between that can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets a call through, or refuses it while the circuit is open. True when the call
    /// is the probe of a half-open circuit.
    fn admit(&self) -> Result<bool, Error> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok(false),
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                Ok(true)
            }
            State::Open { .. } | State::HalfOpen => Err(Error::CircuitOpen),
        }
    }

    /// Records how an admitted call went.
    fn record<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        let sick = matches!(
            result,
            Err(Error::Unavailable(_) | Error::Transport(_) | Error::Timeout)
        );
        let mut state = self.lock();
        *state = match (&*state, sick) {
            (_, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, true) if failures + 1 < self.config.failure_threshold => {
                State::Closed {
                    failures: failures + 1,
                }
            }
            (_, true) => State::Open {
                until: Instant::now() + self.config.open_for,
            },
        };
        result
    }

    async fn guarded<T, F>(&self, call: F) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<T, Error>>,
    {
        let mut probe = Probe {
            breaker: self,
            pending: self.admit()?,
        };
        let result = call.await;
        probe.pending = false;
        self.record(result)
    }
}

/// A probe whose caller stopped waiting leaves the circuit open but ready for the next
/// probe, rather than half-open for ever.
struct Probe<'a> {
    breaker: &'a CircuitBreaker,
    pending: bool,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if self.pending {
            *self.breaker.lock() = State::Open {
                until: Instant::now(),
            };
        }
    }
}

#[async_trait]
impl Bus for CircuitBreaker {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.guarded(self.inner.publish(key, options)).await
    }

    fn try_publish(&self, key: &str, options: PublishOptions) -> Result<(), Error> {
        self.admit()?;
        self.record(self.inner.try_publish(key, options))
    }

    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        self.guarded(self.inner.publish_and_await(key, replicas, options))
            .await
    }

    async fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        options: PublishOptions,
    ) -> Result<Acknowledged, Error> {
        self.guarded(
            self.inner
                .publish_and_await_topology(key, min_zones, options),
        )
        .await
    }

    async fn subscribe(&self, key: &str) -> Result<Subscription, Error> {
        self.inner.subscribe(key).await
    }

    async fn subscribe_prefix(&self, prefix: &str) -> Result<Subscription, Error> {
        self.inner.subscribe_prefix(prefix).await
    }

    async fn unsubscribe(&self, subscription: &Subscription) -> Result<(), Error> {
        self.inner.unsubscribe(subscription).await
    }

    async fn revoke_lease(&self, id: &str, options: PublishOptions) -> Result<(), Error> {
        self.guarded(self.inner.revoke_lease(id, options)).await
    }

    async fn subscribe_lease(&self, id: &str) -> Result<Subscription, Error> {
        self.inner.subscribe_lease(id).await
    }

    async fn shutdown(&self) -> Result<(), Error> {
        self.inner.shutdown().await
    }

    fn is_healthy(&self) -> bool {
        !self.is_open() && self.inner.is_healthy()
    }

    fn peers(&self) -> Vec<Peer> {
        self.inner.peers()
    }

    fn metrics(&self) -> Metrics {
        self.inner.metrics()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;

    /// A backend that fails while told to, counting the calls that reach it.
    #[derive(Default)]
    struct Flaky {
        failing: AtomicBool,
        hanging: AtomicBool,
        calls: AtomicU32,
    }

    impl Flaky {
        fn outcome(&self) -> Result<(), Error> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.failing.load(Ordering::Relaxed) {
                return Err(Error::Unavailable("test backend down".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Bus for Flaky {
        async fn publish(&self, key: &str, _: PublishOptions) -> Result<(), Error> {
            if key.len() > 3 {
                return Err(Error::KeyTooLarge {
                    len: key.len(),
                    max: 3,
                });
            }
            if self.hanging.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            self.outcome()
        }
        fn try_publish(&self, _: &str, _: PublishOptions) -> Result<(), Error> {
            self.outcome()
        }
        async fn publish_and_await(
            &self,
            _: &str,
            _: usize,
            _: PublishOptions,
        ) -> Result<Acknowledged, Error> {
            self.outcome().map(|()| Acknowledged::default())
        }
        async fn publish_and_await_topology(
            &self,
            _: &str,
            _: usize,
            _: PublishOptions,
        ) -> Result<Acknowledged, Error> {
            self.outcome().map(|()| Acknowledged::default())
        }
        async fn subscribe(&self, _: &str) -> Result<Subscription, Error> {
            Err(Error::Closed)
        }
        async fn subscribe_prefix(&self, _: &str) -> Result<Subscription, Error> {
            Err(Error::Closed)
        }
        async fn unsubscribe(&self, _: &Subscription) -> Result<(), Error> {
            Ok(())
        }
        async fn revoke_lease(&self, _: &str, _: PublishOptions) -> Result<(), Error> {
            self.outcome()
        }
        async fn subscribe_lease(&self, _: &str) -> Result<Subscription, Error> {
            Err(Error::Closed)
        }
        async fn shutdown(&self) -> Result<(), Error> {
            Ok(())
        }
        fn is_healthy(&self) -> bool {
            true
        }
        fn peers(&self) -> Vec<Peer> {
            Vec::new()
        }
        fn metrics(&self) -> Metrics {
            Metrics::default()
        }
    }

    fn breaker(flaky: &Arc<Flaky>) -> CircuitBreaker {
        let config = BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
        };
        CircuitBreaker::new(flaky.clone(), config).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_a_probe_decides_what_next() {
        let flaky = Arc::new(Flaky::default());
        let breaker = breaker(&flaky);
        let publish = || breaker.publish("k", PublishOptions::default());
        flaky.failing.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            assert!(matches!(publish().await, Err(Error::Unavailable(_))));
        }
        assert!(matches!(publish().await, Err(Error::CircuitOpen)));
        assert!(matches!(
            breaker.try_publish("k", PublishOptions::default()),
            Err(Error::CircuitOpen)
        ));
        assert_eq!(
            flaky.calls.load(Ordering::Relaxed),
            3,
            "refused without trying"
        );
        assert!(!breaker.is_healthy());
        // After open_for one probe passes; it fails, so the circuit opens again.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(publish().await, Err(Error::Unavailable(_))));
        assert!(matches!(publish().await, Err(Error::CircuitOpen)));
        // The backend recovers: the next probe closes the circuit.
        flaky.failing.store(false, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(publish().await.is_ok());
        assert!(publish().await.is_ok());
        assert!(breaker.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_own_errors_do_not_count() {
        let flaky = Arc::new(Flaky::default());
        let breaker = breaker(&flaky);
        for _ in 0..10 {
            let refused = breaker.publish("too long", PublishOptions::default()).await;
            assert!(matches!(refused, Err(Error::KeyTooLarge { .. })));
        }
        assert!(!breaker.is_open());
        assert!(
            breaker
                .publish("k", PublishOptions::default())
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_whose_caller_gave_up_leaves_room_for_the_next() {
        let flaky = Arc::new(Flaky::default());
        let breaker = breaker(&flaky);
        flaky.failing.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            let _ = breaker.publish("k", PublishOptions::default()).await;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        // The probe hangs, and its caller stops waiting.
        flaky.hanging.store(true, Ordering::Relaxed);
        let probe = breaker.publish("k", PublishOptions::default());
        let gave_up = tokio::time::timeout(Duration::from_millis(10), probe).await;
        assert!(gave_up.is_err(), "{gave_up:?}");
        flaky.hanging.store(false, Ordering::Relaxed);
        flaky.failing.store(false, Ordering::Relaxed);
        assert!(
            breaker
                .publish("k", PublishOptions::default())
                .await
                .is_ok()
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let zero = BreakerConfig {
            failure_threshold: 0,
            ..BreakerConfig::default()
        };
        let bus: Arc<dyn Bus> = Arc::new(Flaky::default());
        assert!(CircuitBreaker::new(bus, zero).is_err());
    }
}
