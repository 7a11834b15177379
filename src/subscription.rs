//! Subscriptions and the registry that routes events to them.
//!
//! Every bus filters locally: one registry per bus, one bounded queue per subscription.
//! A full queue never blocks the bus or other subscribers; the subscriber instead gets a
//! single [`ResyncReason::Overflow`] once it catches up.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use futures_core::Stream;
use syncbus_mesh::NodeId;

use crate::error::Error;
use crate::event::{Event, EventKind, ResyncReason};
use crate::metrics::DeliveryCounters;

/// What a subscription listens to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// Invalidations of exactly this key.
    Key(String),
    /// Invalidations of every key that starts with this prefix (the empty prefix
    /// matches every key).
    Prefix(String),
    /// Revocations of this lease. Leases are a namespace of their own: no key, however
    /// spelled, matches a lease.
    Lease(String),
}

impl Topic {
    fn name(&self) -> &str {
        match self {
            Topic::Key(name) | Topic::Prefix(name) | Topic::Lease(name) => name,
        }
    }
}

/// Why [`Subscription::try_recv`] returned nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryRecvError {
    /// No event is waiting now.
    Empty,
    /// The subscription ended: unsubscribed, or the bus shut down.
    Closed,
}

/// A stream of events for one [`Topic`].
///
/// Receive with [`recv`](Self::recv), [`try_recv`](Self::try_recv) or as a
/// [`Stream`]. Events wait in a bounded queue; when it is full, further events are
/// dropped and a single resync event follows the queued ones, so nothing is lost
/// silently.
///
/// Dropping a subscription unsubscribes it. After an explicit unsubscribe or a bus
/// shutdown, the events already queued (and a resync owed for dropped ones) are still
/// yielded, then the stream ends.
pub struct Subscription {
    slot: Arc<Slot>,
    registry: Weak<Registry>,
}

impl Subscription {
    /// What this subscription listens to.
    pub fn topic(&self) -> &Topic {
        &self.slot.topic
    }

    /// The next event, or `None` once the subscription has ended.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: if the future is dropped before it completes, no event is lost.
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        let mut state = self.slot.lock();
        match state.take_next() {
            Some(event) => Ok(event),
            None if state.closed => Err(TryRecvError::Closed),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Polls for the next event; `Ready(None)` once the subscription has ended.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut state = self.slot.lock();
        if let Some(event) = state.take_next() {
            return Poll::Ready(Some(event));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Events waiting in the queue now.
    pub fn len(&self) -> usize {
        self.slot.lock().queue.len()
    }

    /// True when no event is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn belongs_to(&self, registry: &Arc<Registry>) -> bool {
        std::ptr::eq(self.registry.as_ptr(), Arc::as_ptr(registry))
    }
}

impl Stream for Subscription {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_recv(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.slot.id)
            .field("topic", &self.slot.topic)
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.remove(&self.slot);
        }
    }
}

/// One subscription's queue, shared by the registry (producer) and the handle.
struct Slot {
    id: u64,
    topic: Topic,
    state: Mutex<SlotState>,
}

struct SlotState {
    queue: VecDeque<Event>,
    /// A resync owed once the queue drains (raised while the queue was full).
    owed_resync: Option<Event>,
    closed: bool,
    waker: Option<Waker>,
}

impl SlotState {
    /// The next queued event, then the resync owed for events dropped while full
    /// (even after the subscription closed: what was dropped is still unreported).
    fn take_next(&mut self) -> Option<Event> {
        self.queue.pop_front().or_else(|| self.owed_resync.take())
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Queues `event` if there is room and no resync is owed; otherwise drops it and
    /// owes the subscriber a resync (raised once until received). The caller wakes
    /// the subscriber when the outcome says so.
    fn accept(&mut self, event: Event, capacity: usize, topic: &Topic) -> Offer {
        if self.closed {
            return Offer::Closed;
        }
        if self.queue.len() < capacity && self.owed_resync.is_none() {
            self.queue.push_back(event);
            return Offer::Queued;
        }
        let raised = self.owed_resync.is_none();
        if raised {
            let mut resync = Event::new(EventKind::Resync(ResyncReason::Overflow), topic.name());
            resync.origin = event.origin;
            self.owed_resync = Some(resync);
        }
        Offer::Overflowed(raised)
    }
}

/// The outcome of offering an event to one subscription.
enum Offer {
    Queued,
    /// Dropped for a full queue; `true` when this raised the subscriber's resync.
    Overflowed(bool),
    Closed,
}

impl Offer {
    /// Whether the subscriber has something new to take.
    fn wakes(&self) -> bool {
        matches!(self, Offer::Queued | Offer::Overflowed(true))
    }
}

/// Outcomes of a dispatch, counted into the registry's counters once at the end.
#[derive(Default)]
struct Tally {
    queued: usize,
    overflowed: u64,
    resyncs: u64,
}

impl Tally {
    fn count(&mut self, offer: Offer) {
        match offer {
            Offer::Queued => self.queued += 1,
            Offer::Overflowed(raised) => {
                self.overflowed += 1;
                self.resyncs += u64::from(raised);
            }
            Offer::Closed => {}
        }
    }

    /// Adds to `counters`; returns how many events were queued.
    fn record(self, counters: &DeliveryCounters) -> usize {
        DeliveryCounters::add(&counters.delivered, self.queued as u64);
        DeliveryCounters::add(&counters.overflowed, self.overflowed);
        DeliveryCounters::add(&counters.resyncs, self.resyncs);
        self.queued
    }
}

/// Events bound for each subscription a dispatch reaches, in order.
#[derive(Default)]
struct Staged<'a> {
    reached: Vec<(&'a Arc<Slot>, Vec<Event>)>,
    /// Where each subscription's events are in `reached`, by subscription id.
    at: BTreeMap<u64, usize>,
}

impl<'a> Staged<'a> {
    fn push(&mut self, slot: &'a Arc<Slot>, event: Event) {
        // Consecutive events usually reach the same subscription.
        if let Some((last, events)) = self.reached.last_mut()
            && last.id == slot.id
        {
            return events.push(event);
        }
        match self.at.get(&slot.id) {
            Some(&at) => self.reached[at].1.push(event),
            None => {
                self.at.insert(slot.id, self.reached.len());
                self.reached.push((slot, vec![event]));
            }
        }
    }
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding this lock cannot leave the queue half-updated, so a
        // poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn offer(&self, event: Event, capacity: usize) -> Offer {
        let mut state = self.lock();
        let offer = state.accept(event, capacity, &self.topic);
        if offer.wakes() {
            state.wake();
        }
        offer
    }

    /// Offers `events` in order under one lock, with one wake-up.
    fn offer_all(&self, events: Vec<Event>, capacity: usize, tally: &mut Tally) {
        let mut state = self.lock();
        let mut wake = false;
        for event in events {
            let offer = state.accept(event, capacity, &self.topic);
            wake |= offer.wakes();
            tally.count(offer);
        }
        if wake {
            state.wake();
        }
    }

    /// Queues a resync unless one not yet received already covers it. Returns whether
    /// one was raised.
    fn offer_resync(&self, reason: &ResyncReason, origin: Option<NodeId>, capacity: usize) -> bool {
        let mut state = self.lock();
        let covered = state.queue.back().is_some_and(Event::is_resync);
        if state.closed || state.owed_resync.is_some() || covered {
            return false;
        }
        let mut resync = Event::new(EventKind::Resync(reason.clone()), self.topic.name());
        resync.origin = origin;
        if state.queue.len() < capacity {
            state.queue.push_back(resync);
        } else {
            state.owed_resync = Some(resync);
        }
        state.wake();
        true
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.wake();
    }
}

/// Routes events to the subscriptions of one bus.
pub(crate) struct Registry {
    index: Mutex<Index>,
    capacity: usize,
    counters: DeliveryCounters,
}

#[derive(Default)]
struct Index {
    next_id: u64,
    keys: HashMap<String, Vec<Arc<Slot>>>,
    leases: HashMap<String, Vec<Arc<Slot>>>,
    prefixes: Vec<Arc<Slot>>,
    closed: bool,
}

impl Index {
    fn list_for(&mut self, topic: &Topic) -> &mut Vec<Arc<Slot>> {
        match topic {
            Topic::Key(key) => self.keys.entry(key.clone()).or_default(),
            Topic::Lease(id) => self.leases.entry(id.clone()).or_default(),
            Topic::Prefix(_) => &mut self.prefixes,
        }
    }

    /// Every subscription an event of `kind` for `key` reaches.
    fn matching<'s: 'k, 'k>(
        &'s self,
        kind: &EventKind,
        key: &'k str,
    ) -> impl Iterator<Item = &'s Arc<Slot>> + 'k {
        let (exact, prefixes) = match kind {
            EventKind::Invalidate => (self.keys.get(key), Some(&self.prefixes)),
            EventKind::LeaseRevoked => (self.leases.get(key), None),
            EventKind::Resync(_) => (None, None),
        };
        let by_prefix = prefixes.into_iter().flatten().filter(move |slot| {
            matches!(&slot.topic, Topic::Prefix(prefix) if key.starts_with(prefix.as_str()))
        });
        exact.into_iter().flatten().chain(by_prefix)
    }

    /// Hands `event` to `deliver` once for every matching subscription: a copy to
    /// each but the last, and the event itself to the last, so the usual single
    /// subscriber costs no copy at all.
    fn fan_out<'s>(&'s self, event: Event, mut deliver: impl FnMut(&'s Arc<Slot>, Event)) {
        let mut last: Option<&Arc<Slot>> = None;
        for slot in self.matching(&event.kind, &event.key) {
            if let Some(previous) = last.replace(slot) {
                deliver(previous, event.clone());
            }
        }
        if let Some(slot) = last {
            deliver(slot, event);
        }
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Slot>> {
        let keys = self.keys.values().flatten();
        keys.chain(self.leases.values().flatten())
            .chain(&self.prefixes)
    }
}

impl Registry {
    /// A registry whose subscriptions each queue up to `capacity` events.
    pub(crate) fn new(capacity: usize) -> Arc<Registry> {
        Arc::new(Registry {
            index: Mutex::new(Index::default()),
            capacity: capacity.max(1),
            counters: DeliveryCounters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // Every update of the index completes before anything can panic.
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn counters(&self) -> &DeliveryCounters {
        &self.counters
    }

    /// A new subscription to `topic`, or `Closed` after [`close`](Self::close).
    pub(crate) fn subscribe(self: &Arc<Self>, topic: Topic) -> Result<Subscription, Error> {
        let mut index = self.lock();
        if index.closed {
            return Err(Error::Closed);
        }
        index.next_id += 1;
        let slot = Arc::new(Slot {
            id: index.next_id,
            topic,
            state: Mutex::new(SlotState {
                queue: VecDeque::new(),
                owed_resync: None,
                closed: false,
                waker: None,
            }),
        });
        index.list_for(&slot.topic).push(Arc::clone(&slot));
        Ok(Subscription {
            slot,
            registry: Arc::downgrade(self),
        })
    }

    /// Removes a subscription and ends its stream. False if it was already gone.
    pub(crate) fn unsubscribe(&self, subscription: &Subscription) -> bool {
        self.remove(&subscription.slot)
    }

    /// What every bus's `unsubscribe` does: refuses a subscription made by another
    /// bus, else removes it (again is not an error).
    pub(crate) fn unsubscribe_own(
        self: &Arc<Self>,
        subscription: &Subscription,
    ) -> Result<(), Error> {
        if !subscription.belongs_to(self) {
            return Err(Error::ForeignSubscription);
        }
        self.unsubscribe(subscription);
        Ok(())
    }

    fn remove(&self, slot: &Arc<Slot>) -> bool {
        let mut index = self.lock();
        let list = index.list_for(&slot.topic);
        let before = list.len();
        list.retain(|other| other.id != slot.id);
        let removed = list.len() < before;
        if list.is_empty() {
            match &slot.topic {
                Topic::Key(key) => drop(index.keys.remove(key)),
                Topic::Lease(id) => drop(index.leases.remove(id)),
                Topic::Prefix(_) => {}
            }
        }
        drop(index);
        slot.close();
        removed
    }

    /// How many subscriptions an event of `kind` for `key` would reach.
    pub(crate) fn audience(&self, kind: &EventKind, key: &str) -> usize {
        self.lock().matching(kind, key).count()
    }

    /// Offers `event` to every matching subscription; returns how many queued it.
    pub(crate) fn dispatch(&self, event: Event) -> usize {
        let index = self.lock();
        let mut tally = Tally::default();
        index.fan_out(event, |slot, event| {
            tally.count(slot.offer(event, self.capacity));
        });
        tally.record(&self.counters)
    }

    /// Offers each of `events`, in order, to every matching subscription, as
    /// [`dispatch`](Self::dispatch) does one by one, but taking the index's lock once,
    /// each subscription's lock once and waking each subscriber once: what a node
    /// uses for the deliveries of a burst of datagrams. Returns how many queued.
    pub(crate) fn dispatch_all(&self, events: Vec<Event>) -> usize {
        let index = self.lock();
        let mut staged = Staged::default();
        for event in events {
            index.fan_out(event, |slot, event| staged.push(slot, event));
        }
        let mut tally = Tally::default();
        for (slot, events) in staged.reached {
            slot.offer_all(events, self.capacity, &mut tally);
        }
        tally.record(&self.counters)
    }

    /// Tells every subscription it may have missed events, once each.
    pub(crate) fn resync_all(&self, reason: &ResyncReason, origin: Option<NodeId>) {
        let index = self.lock();
        let raised = index
            .all()
            .filter(|slot| slot.offer_resync(reason, origin, self.capacity))
            .count();
        DeliveryCounters::add(&self.counters.resyncs, raised as u64);
    }

    /// Ends every subscription and refuses new ones.
    pub(crate) fn close(&self) {
        let mut index = self.lock();
        index.closed = true;
        for slot in index.all() {
            slot.close();
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().all().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalidate(key: &str) -> Event {
        Event::new(EventKind::Invalidate, key)
    }

    #[test]
    fn events_reach_exact_and_prefix_subscribers_only() {
        let registry = Registry::new(8);
        let mut exact = registry.subscribe(Topic::Key("user:1".into())).unwrap();
        let mut prefix = registry.subscribe(Topic::Prefix("user:".into())).unwrap();
        let mut other = registry.subscribe(Topic::Key("user:2".into())).unwrap();
        let mut lease = registry.subscribe(Topic::Lease("user:1".into())).unwrap();
        assert_eq!(registry.dispatch(invalidate("user:1")), 2);
        assert_eq!(exact.try_recv().unwrap().key, "user:1");
        assert_eq!(prefix.try_recv().unwrap().key, "user:1");
        assert_eq!(other.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(lease.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn dispatching_a_batch_is_dispatching_each_event_in_turn() {
        // Keys reaching none, one or several subscriptions; queues small enough to
        // overflow part way through the batch.
        let keys = [
            "a:1", "b:1", "a:2", "a:1", "c", "a:3", "b:2", "a:1", "a:4", "b:1",
        ];
        let topics = [
            Topic::Key("a:1".into()),
            Topic::Prefix("a:".into()),
            Topic::Prefix("".into()),
            Topic::Key("b:1".into()),
            Topic::Lease("a:1".into()),
        ];
        let run = |batch: bool| {
            let registry = Registry::new(3);
            let mut subscriptions: Vec<Subscription> = topics
                .iter()
                .map(|topic| registry.subscribe(topic.clone()).unwrap())
                .collect();
            let events: Vec<Event> = keys.iter().map(|key| invalidate(key)).collect();
            let queued = if batch {
                registry.dispatch_all(events)
            } else {
                events.into_iter().map(|e| registry.dispatch(e)).sum()
            };
            let received: Vec<Vec<(EventKind, String)>> = subscriptions
                .iter_mut()
                .map(|sub| {
                    std::iter::from_fn(|| sub.try_recv().ok())
                        .map(|event| (event.kind, event.key))
                        .collect()
                })
                .collect();
            let mut metrics = crate::Metrics::default();
            registry.counters().fill(&mut metrics);
            let counts = (metrics.delivered, metrics.overflowed, metrics.resyncs);
            (queued, received, counts)
        };
        let batched = run(true);
        assert_eq!(batched, run(false));
        let (_, received, counts) = batched;
        assert_eq!(
            counts,
            (11, 10, 2),
            "two queues overflowed, one resync each"
        );
        assert!(received[4].is_empty(), "a key never reaches a lease");
    }

    #[test]
    fn a_full_queue_drops_then_owes_one_resync() {
        let registry = Registry::new(2);
        let mut slow = registry.subscribe(Topic::Key("k".into())).unwrap();
        for _ in 0..5 {
            registry.dispatch(invalidate("k"));
        }
        assert_eq!(slow.try_recv().unwrap().kind, EventKind::Invalidate);
        assert_eq!(slow.try_recv().unwrap().kind, EventKind::Invalidate);
        let resync = slow.try_recv().unwrap();
        assert_eq!(resync.kind, EventKind::Resync(ResyncReason::Overflow));
        assert_eq!(resync.key, "k");
        assert_eq!(slow.try_recv(), Err(TryRecvError::Empty));
        let mut metrics = crate::Metrics::default();
        registry.counters().fill(&mut metrics);
        assert_eq!(
            (metrics.delivered, metrics.overflowed, metrics.resyncs),
            (2, 3, 1)
        );
        // Caught up: events flow again.
        registry.dispatch(invalidate("k"));
        assert_eq!(slow.try_recv().unwrap().kind, EventKind::Invalidate);
    }

    #[test]
    fn a_network_resync_reaches_each_subscription_once() {
        let registry = Registry::new(4);
        let mut a = registry.subscribe(Topic::Key("a".into())).unwrap();
        let mut b = registry.subscribe(Topic::Lease("b".into())).unwrap();
        let reason = ResyncReason::Lost { missed: 3 };
        registry.resync_all(&reason, Some(NodeId(7)));
        registry.resync_all(&reason, Some(NodeId(7)));
        assert_eq!(a.try_recv().unwrap().origin, Some(NodeId(7)));
        assert_eq!(b.try_recv().unwrap().key, "b");
        // The second loss came while the first resync was still unread: it covers both.
        assert_eq!(a.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn dropping_or_unsubscribing_removes_and_ends() {
        let registry = Registry::new(4);
        let dropped = registry.subscribe(Topic::Key("a".into())).unwrap();
        let mut kept = registry.subscribe(Topic::Key("a".into())).unwrap();
        drop(dropped);
        assert_eq!(registry.len(), 1);
        registry.dispatch(invalidate("a"));
        assert!(registry.unsubscribe(&kept));
        assert!(!registry.unsubscribe(&kept));
        assert_eq!(kept.try_recv().unwrap().key, "a");
        assert_eq!(kept.try_recv(), Err(TryRecvError::Closed));
        assert_eq!(registry.len(), 0);
    }
}
