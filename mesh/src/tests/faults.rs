//! Fault combinations found by adversarial review, kept as regression tests: each
//! names what once went wrong.
use super::*;

fn cluster_with(size: usize, seed: u64, tweak: impl Fn(usize, &mut NodeConfig)) -> Net {
    let mut net = Net::new(seed);
    for index in 0..size {
        let mut c = config(index, if index == 0 { &[] } else { &[0] });
        tweak(index, &mut c);
        net.start(index, c);
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(size)));
    net
}

/// Fails the test listing every failure, when there is any.
fn assert_none(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn kind_of(p: &[u8]) -> u8 {
    p.get(3).copied().unwrap_or(0)
}

// `recent` grows on every flush and is only trimmed when a member joins.
#[test]
fn recent_grows_without_joins() {
    let mut net = cluster(3, 100);
    let before = net.nodes[&0].debug_sizes();
    for i in 0..5000 {
        net.publish(0, &format!("k{i}"));
        net.run_for(Duration::from_millis(2));
    }
    let after = net.nodes[&0].debug_sizes();
    eprintln!("before {before:?} after {after:?}");
    assert!(after.1 < 1000, "recent holds {} entries", after.1);
}

// deadline timers of completed awaits stay queued until their deadline.
#[test]
fn completed_await_timers_stay_queued() {
    let mut net = cluster(3, 101);
    let before = net.nodes[&0].debug_sizes().0;
    for i in 0..3000 {
        net.awaited(
            0,
            &format!("k{i}"),
            Goal::Replicas(2),
            Duration::from_secs(3600),
        );
        net.run_for(Duration::from_millis(3));
    }
    let done = net.awaits[&0].iter().filter(|(_, o)| o.is_ok()).count();
    let after = net.nodes[&0].debug_sizes().0;
    eprintln!(
        "done {done}, in flight {}, timers {before} -> {after}",
        net.nodes[&0].awaits_in_flight()
    );
    assert!(after < 100, "{after} timers queued with 0 awaits in flight");
}

// how many cross-zone datagrams one publish costs, by kind, over 2 s.
#[test]
fn cross_zone_cost_of_one_publish() {
    let mut net = zoned_cluster(5, 3, 102);
    // New members get digests of their own after the first publishes; measure the
    // steady state after that.
    net.publish(0, "warm-up");
    net.run_for(Duration::from_secs(2));
    let zone_of = |i: usize| i % 3;
    let counts = std::rc::Rc::new(std::cell::RefCell::new(BTreeMap::<u8, u64>::new()));
    let c2 = counts.clone();
    net.filter = Some(Box::new(move |from, to, p| {
        if zone_of(from) != zone_of(to) && kind_of(p) != 1 {
            *c2.borrow_mut().entry(kind_of(p)).or_default() += 1;
        }
        false
    }));
    net.publish(0, "k");
    net.run_for(Duration::from_secs(2));
    eprintln!(
        "cross-zone non-membership datagrams by kind: {:?}",
        counts.borrow()
    );
    let data = counts.borrow().get(&2).copied().unwrap_or(0);
    let digests = counts.borrow().get(&6).copied().unwrap_or(0);
    // Two relays in each of two other zones for the data; one relay per zone for each
    // of the five digest rounds.
    assert_eq!(data, 4, "{:?}", counts.borrow());
    assert!(digests <= 2 * 5, "{:?}", counts.borrow());
}

// evicting an origin's stream while it has an open hole forgets the hole silently.
#[test]
fn eviction_forgets_open_hole() {
    let mut net = cluster_with(3, 103, |i, c| {
        if i == 2 {
            c.max_origins = 1;
        }
    });
    net.publish(0, "a");
    net.run_for(Duration::from_millis(10));
    net.drop_data_to = Some(2);
    net.publish(0, "b");
    net.run_for(Duration::from_millis(5));
    // Node 2's repair requests do not get through (e.g. a flaky link).
    net.filter = Some(Box::new(|from, to, p| {
        from == 2 && to == 0 && kind_of(p) == 5
    }));
    net.publish(0, "c");
    net.run_for(Duration::from_millis(1500));
    net.filter = None;
    net.publish(1, "x");
    net.run_for(Duration::from_secs(10));
    let got = net.keys_at(2);
    let resyncs = net.resyncs.get(&2).cloned().unwrap_or_default();
    eprintln!(
        "node 2 got {got:?}, resyncs {resyncs:?}, evicted {}",
        net.nodes[&2].stats().origins_evicted
    );
    assert!(
        got.contains(&"b".to_owned()) || resyncs.iter().any(|(o, _)| *o == NodeId(100)),
        "b lost silently"
    );
}

// a digest whose `first` lies before a stream's start, on a stream that received more
// than reorder_window entries, raises a Resync on every digest, forever.
#[test]
fn refused_start_extension_resyncs_on_every_digest() {
    let mut net = cluster_with(3, 104, |i, c| {
        if i == 2 {
            c.reorder_window = 8;
        }
    });
    // The very first entry of origin 0 is lost to node 2.
    net.drop_data_to = Some(2);
    net.publish(0, "first");
    let node = net.node(0);
    for i in 0..20 {
        node.publish(Instant::ZERO, Invalidation::key(format!("burst{i}")))
            .unwrap();
    }
    net.drain(0);
    net.run_for(Duration::from_secs(3));
    let after_burst = net.resyncs.get(&2).cloned().unwrap_or_default();
    for round in 0..3 {
        net.publish(0, &format!("later{round}"));
        net.run_for(Duration::from_secs(3));
    }
    let resyncs = net.resyncs.get(&2).cloned().unwrap_or_default();
    eprintln!(
        "after burst {after_burst:?}\nfinally {} resyncs: {resyncs:?}",
        resyncs.len()
    );
    eprintln!(
        "node 2 got {} keys, first? {}",
        net.keys_at(2).len(),
        net.keys_at(2).contains(&"first".to_owned())
    );
    assert!(
        resyncs.len() <= 1,
        "{} resyncs for one lost entry",
        resyncs.len()
    );
}

// two origins, a receiver with max_origins=1, no loss at all.
#[test]
fn two_origins_max_origins_one() {
    let mut net = cluster_with(3, 105, |i, c| {
        if i == 2 {
            c.max_origins = 1;
        }
    });
    for i in 0..20 {
        net.publish(i % 2, &format!("k{i}"));
        net.run_for(Duration::from_millis(50));
    }
    net.run_for(Duration::from_secs(5));
    let got = net.keys_at(2);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for k in &got {
        *counts.entry(k.clone()).or_default() += 1;
    }
    let dups: usize = counts.values().map(|c| c - 1).sum();
    let s = net.nodes[&2].stats().clone();
    eprintln!(
        "node 2: {} deliveries of {} keys, {} duplicate deliveries, resyncs {:?}, evicted {}, repairs {}",
        got.len(),
        counts.len(),
        dups,
        net.resyncs.get(&2),
        s.origins_evicted,
        s.repairs_requested
    );
    eprintln!(
        "retransmitted by 0: {}, by 1: {}",
        net.nodes[&0].stats().retransmitted,
        net.nodes[&1].stats().retransmitted
    );
    assert_eq!(counts.len(), 20);
    assert_eq!(dups, 0, "duplicate deliveries");
}

// after a healed partition, what the origin published during it reaches the other
// half only through one digest per member, sent once; losing that one datagram loses
// those entries silently if the origin publishes nothing afterwards.
#[test]
fn healed_partition_single_digest_loss() {
    let mut net = halves_that_forgot_each_other(106);
    net.partition = None;
    let dropped = std::rc::Rc::new(std::cell::Cell::new(false));
    let d2 = dropped.clone();
    net.filter = Some(Box::new(move |from, to, p| {
        if from == 0 && to == 3 && kind_of(p) == 6 && !d2.get() {
            d2.set(true);
            return true;
        }
        false
    }));
    assert!(net.run_until(Duration::from_secs(30), |n| n.converged(6)));
    net.run_for(Duration::from_secs(10));
    eprintln!("digest dropped: {}", dropped.get());
    for index in 3..6 {
        let got = net.keys_at(index);
        let resynced = net.resyncs.contains_key(&index);
        eprintln!("node {index}: {got:?} resynced {resynced}");
    }
    let got = net.keys_at(3);
    assert!(
        got.contains(&"during".to_owned()) || net.resyncs.contains_key(&3),
        "node 3 lost it silently"
    );
}

// the origin dies right after a batch whose copy to one member was lost: the other
// members hold the entry, but nobody tells the one that missed it.
#[test]
fn origin_dies_after_lost_tail() {
    let mut net = cluster(4, 107);
    net.publish(0, "a");
    net.run_for(Duration::from_millis(20));
    net.drop_data_to = Some(3);
    net.publish(0, "last");
    net.run_for(Duration::from_millis(5));
    net.crash(0);
    net.run_for(Duration::from_secs(10));
    for i in 1..4 {
        eprintln!(
            "node {i}: {:?} resyncs {:?}",
            net.keys_at(i),
            net.resyncs.get(&i)
        );
    }
    assert!(
        net.keys_at(3).contains(&"last".to_owned()) || net.resyncs.contains_key(&3),
        "silent loss at 3"
    );
}

// forged digests claiming huge sequence numbers overflow Stats::missed (debug panic).
#[test]
fn forged_digests_overflow_missed_counter() {
    let mut net = cluster(2, 109);
    let cluster_id = wire::ClusterId::from_name("syncbus");
    for origin in 0..3u64 {
        let digest = wire::Digest {
            origin: NodeId(0xdead + origin),
            last: wire::MAX_SEQ - 1,
            first: 1,
        };
        let bytes = wire::encode_digest(cluster_id, digest);
        let now = net.now;
        net.node(1).handle_packet(now, addr(9), &bytes);
        net.drain(1);
    }
    net.run_for(Duration::from_secs(5));
    eprintln!(
        "missed {} resyncs {:?}",
        net.nodes[&1].stats().missed,
        net.resyncs.get(&1)
    );
}

// one forged batch for a real origin with a sequence number near MAX_SEQ makes every
// later real entry of that origin a "duplicate".
#[test]
fn forged_high_seq_batch_silences_an_origin() {
    let mut net = cluster(2, 110);
    net.publish(0, "before");
    net.run_for(Duration::from_millis(20));
    let cluster_id = wire::ClusterId::from_name("syncbus");
    let mut entry = Vec::new();
    wire::encode_entry(&Invalidation::key("forged"), false, &mut entry);
    let info = wire::BatchInfo {
        origin: NodeId(100),
        first_seq: wire::MAX_SEQ - 1,
        count: 1,
    };
    let bytes = wire::encode_batch(cluster_id, info, &entry);
    let now = net.now;
    net.node(1).handle_packet(now, addr(9), &bytes);
    net.drain(1);
    net.run_for(Duration::from_secs(5));
    for i in 0..5 {
        net.publish(0, &format!("after{i}"));
        net.run_for(Duration::from_millis(50));
    }
    net.run_for(Duration::from_secs(5));
    eprintln!(
        "node 1: {:?} resyncs {:?} dup {}",
        net.keys_at(1),
        net.resyncs.get(&1),
        net.nodes[&1].stats().duplicates
    );
}

// a Local publish of a key coalesces over a pending Global one: the Global scope
// (and region) of the first publish are gone.
#[test]
fn coalescing_downgrades_scope() {
    let mut net = cluster(2, 111);
    let node = net.node(0);
    let mut global = Invalidation::key("k");
    global.scope = Scope::Global;
    global.region = Some("eu".into());
    node.publish(Instant::ZERO, global).unwrap();
    node.publish(Instant::ZERO, Invalidation::key("k")).unwrap();
    net.drain(0);
    net.run_for(Duration::from_millis(20));
    let seen: Vec<_> = net.deliveries[&1]
        .iter()
        .map(|d| (d.invalidation.scope, d.invalidation.region.clone()))
        .collect();
    eprintln!("peer saw {seen:?}");
    assert!(
        seen.iter().any(|(s, _)| *s == Scope::Global),
        "the Global invalidation never left"
    );
}

// awaited publishes coalescing with a plain pending one and with each other.
#[test]
fn awaits_coalesce() {
    let mut net = cluster(4, 112);
    let now = net.now;
    let deadline = now + Duration::from_secs(5);
    let node = net.node(0);
    node.publish(Instant::ZERO, Invalidation::key("k")).unwrap();
    let mut awaited = |goal| {
        node.publish_awaited(now, Invalidation::key("k"), goal, deadline)
            .unwrap()
    };
    let a = awaited(Goal::Replicas(3));
    let b = awaited(Goal::Zones(3));
    let c = awaited(Goal::Replicas(1));
    node.cancel_await(c);
    net.drain(0);
    net.run_for(Duration::from_millis(50));
    eprintln!("{:?}", net.awaits.get(&0));
    assert!(matches!(net.outcome(0, a), Some(Ok(acks)) if acks.nodes.len() >= 3));
    assert!(matches!(net.outcome(0, b), Some(Ok(acks)) if acks.zones.len() >= 3));
    assert!(net.outcome(0, c).is_none());
    assert_eq!(net.nodes[&0].awaits_in_flight(), 0);
    for i in 1..4 {
        assert_eq!(net.keys_at(i), ["k"]);
    }
}

// a goal of zero (or an await cancelled before the flush) still marks the entry
// for acknowledgement: every receiver sends an ack nobody waits for.
#[test]
fn goal_zero_still_asks_for_acks() {
    let mut net = cluster(4, 113);
    net.awaited(0, "k", Goal::Replicas(0), Duration::from_secs(5));
    net.run_for(Duration::from_millis(50));
    let acks: u64 = (1..4).map(|i| net.nodes[&i].stats().acks_sent).sum();
    eprintln!(
        "acks sent for a goal of zero: {acks}; done {:?}",
        net.awaits.get(&0)
    );
    assert_eq!(acks, 0);
}

// 1000 awaited publishes needing every member while one member is dead.
#[test]
fn thousand_awaits_one_dead_member() {
    let mut net = cluster(4, 114);
    net.crash(3);
    let now = net.now;
    let node = net.node(0);
    let ids: Vec<AwaitId> = (0..1000)
        .map(|i| {
            node.publish_awaited(
                now,
                Invalidation::key(format!("k{i}")),
                Goal::Replicas(3),
                now + Duration::from_secs(30),
            )
            .unwrap()
        })
        .collect();
    net.drain(0);
    let sent_before = net.nodes[&0].stats().datagrams_sent;
    assert!(net.run_until(Duration::from_secs(10), |n| {
        ids.iter().all(|id| n.outcome(0, *id).is_some())
    }));
    let took = net.now;
    let unreachable = ids.iter().filter(|id| matches!(net.outcome(0, **id), Some(Err(AwaitFailure::Unreachable { acked, available: 2 })) if acked.nodes.len() == 2)).count();
    let s = net.nodes[&0].stats().clone();
    eprintln!(
        "all done at {took:?}: unreachable {unreachable}; retransmitted {}, datagrams {}, in flight {}, sizes {:?}",
        s.retransmitted,
        s.datagrams_sent - sent_before,
        net.nodes[&0].awaits_in_flight(),
        net.nodes[&0].debug_sizes()
    );
    assert_eq!(unreachable, 1000);
    assert_eq!(net.nodes[&0].awaits_in_flight(), 0);
}

// a long idle run after activity: nothing keeps retransmitting, acking or digesting.
#[test]
fn idle_counters_stay_flat() {
    let mut net = cluster(5, 115);
    net.loss = 0.1;
    for i in 0..100 {
        net.awaited(
            i % 5,
            &format!("k{i}"),
            Goal::Replicas(4),
            Duration::from_secs(3),
        );
        net.publish((i + 1) % 5, &format!("p{i}"));
        net.run_for(Duration::from_millis(10));
    }
    net.run_for(Duration::from_secs(10));
    let snap = |net: &Net| -> Vec<(u64, u64, u64, u64, u64)> {
        (0..5)
            .map(|i| {
                let s = net.nodes[&i].stats();
                (
                    s.acks_sent,
                    s.retransmitted,
                    s.repairs_requested,
                    s.datagrams_sent - s.datagrams_sent_in_zone - s.datagrams_sent_across_zones,
                    s.resyncs,
                )
            })
            .collect()
    };
    let kinds_before: BTreeMap<(usize, u8), u64> = net.sent_by_kind.clone();
    let before = snap(&net);
    net.run_for(Duration::from_secs(300));
    let after = snap(&net);
    let mut grew = BTreeMap::new();
    for (k, v) in &net.sent_by_kind {
        let d = v - kinds_before.get(k).copied().unwrap_or(0);
        let maintenance = [wire::MessageKind::Membership, wire::MessageKind::Sync];
        if !maintenance.iter().any(|kind| *kind as u8 == k.1) && d > 0 {
            grew.insert(*k, d);
        }
    }
    eprintln!(
        "before {before:?}\nafter  {after:?}\nnon-membership datagrams in 300 s idle: {grew:?}"
    );
    eprintln!(
        "sizes {:?}",
        (0..5)
            .map(|i| net.nodes[&i].debug_sizes())
            .collect::<Vec<_>>()
    );
    assert_eq!(before, after);
    // Membership flaps under loss send a few digests to returning members; nothing else
    // is sent while idle.
    let digest = wire::MessageKind::Digest as u8;
    assert!(grew.keys().all(|(_, kind)| *kind == digest), "{grew:?}");
    assert!(grew.values().all(|n| *n <= 60), "{grew:?}");
}

// T5 with default settings: a burst of 5000 after a lost first datagram.
#[test]
fn refused_extension_with_defaults() {
    let mut net = cluster(3, 116);
    net.drop_data_to = Some(2);
    net.publish(0, "first");
    let node = net.node(0);
    for i in 0..5000 {
        node.publish(Instant::ZERO, Invalidation::key(format!("burst{i}")))
            .unwrap();
    }
    net.drain(0);
    net.run_for(Duration::from_secs(3));
    for round in 0..2 {
        net.publish(0, &format!("later{round}"));
        net.run_for(Duration::from_secs(3));
    }
    let resyncs = net.resyncs.get(&2).cloned().unwrap_or_default();
    eprintln!(
        "{} resyncs at node 2 for 1 lost entry: {:?}",
        resyncs.len(),
        &resyncs[..resyncs.len().min(3)]
    );
    assert!(resyncs.len() <= 1);
}

// random loss, many seeds, many keys: no silent loss, and Resync's `missed` adds up
// to exactly the entries not delivered (never a resync when nothing was lost).
#[test]
fn loss_accounting_many_seeds() {
    let mut failures = Vec::new();
    for seed in 200..240 {
        let mut net = cluster(5, seed);
        net.loss = 0.2;
        let mut published: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for i in 0..400 {
            let key = format!("key-{seed}-{i}");
            let origin = (i * 7 + seed as usize) % 5;
            net.publish(origin, &key);
            published.entry(origin).or_default().push(key);
            net.run_for(Duration::from_millis(3));
        }
        net.run_for(Duration::from_secs(8));
        for receiver in 0..5 {
            let got: Vec<String> = net.keys_at(receiver);
            let set: BTreeSet<&String> = got.iter().collect();
            if set.len() != got.len() {
                failures.push(format!(
                    "seed {seed} node {receiver}: {} duplicate deliveries",
                    got.len() - set.len()
                ));
            }
            for (origin, keys) in &published {
                if *origin == receiver {
                    continue;
                }
                let missing = keys.iter().filter(|k| !set.contains(k)).count() as u64;
                let reported: u64 = net
                    .resyncs
                    .get(&receiver)
                    .into_iter()
                    .flatten()
                    .filter(|(o, _)| *o == NodeId(100 + *origin as u64))
                    .map(|(_, m)| *m)
                    .sum();
                if missing != reported {
                    failures.push(format!("seed {seed} node {receiver} origin {origin}: missing {missing}, resync reported {reported}"));
                }
            }
        }
    }
    assert_none(&failures);
}

fn check_accounting(
    net: &Net,
    published: &BTreeMap<usize, Vec<String>>,
    receivers: &[usize],
    tag: &str,
) -> Vec<String> {
    let mut failures = Vec::new();
    for &receiver in receivers {
        let got: Vec<String> = net.keys_at(receiver);
        let set: BTreeSet<&String> = got.iter().collect();
        if set.len() != got.len() {
            failures.push(format!(
                "{tag} node {receiver}: {} duplicate deliveries",
                got.len() - set.len()
            ));
        }
        for (origin, keys) in published {
            if *origin == receiver {
                continue;
            }
            let missing = keys.iter().filter(|k| !set.contains(k)).count() as u64;
            let reported: u64 = net
                .resyncs
                .get(&receiver)
                .into_iter()
                .flatten()
                .filter(|(o, _)| *o == NodeId(100 + *origin as u64))
                .map(|(_, m)| *m)
                .sum();
            if missing > 0 && reported == 0 {
                failures.push(format!(
                    "{tag} node {receiver} origin {origin}: SILENT missing {missing}"
                ));
            } else if missing != reported {
                failures.push(format!("{tag} node {receiver} origin {origin}: missing {missing}, resync reported {reported}"));
            }
        }
    }
    failures
}

// zones with relays under 20% loss, bursts of varying sizes.
#[test]
fn zoned_loss_bursts() {
    let mut failures = Vec::new();
    for seed in 300..320 {
        let mut net = zoned_cluster(3, 3, seed);
        net.loss = 0.2;
        let mut published: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for round in 0..60 {
            let origin = rng.random_range(0..9);
            let burst = rng.random_range(1..40);
            let node = net.node(origin);
            for j in 0..burst {
                let key = format!("s{seed}-r{round}-{j}");
                node.publish(Instant::ZERO, Invalidation::key(key.clone()))
                    .unwrap();
                published.entry(origin).or_default().push(key);
            }
            net.drain(origin);
            net.run_for(Duration::from_millis(rng.random_range(1..30)));
        }
        net.run_for(Duration::from_secs(8));
        failures.extend(check_accounting(
            &net,
            &published,
            &(0..9).collect::<Vec<_>>(),
            &format!("seed {seed}"),
        ));
    }
    assert_none(&failures);
}

// loss + partition (long enough to forget) + a restart of a member with a new id
// at the same address while publishing continues; then heal.
#[test]
fn loss_partition_restart() {
    let mut failures = Vec::new();
    for seed in 400..410 {
        let mut net = cluster(6, seed);
        net.loss = 0.1;
        let mut published: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let mut n = 0;
        let mut pub_some =
            |net: &mut Net,
             origins: &[usize],
             count: usize,
             published: &mut BTreeMap<usize, Vec<String>>| {
                for _ in 0..count {
                    let origin = origins[n % origins.len()];
                    let key = format!("s{seed}-{n}");
                    n += 1;
                    net.publish(origin, &key);
                    published.entry(origin).or_default().push(key);
                    net.run_for(Duration::from_millis(20));
                }
            };
        pub_some(&mut net, &[0, 3], 20, &mut published);
        net.partition = Some(([0, 1, 2].into(), [3, 4, 5].into()));
        pub_some(&mut net, &[0, 3], 20, &mut published);
        net.run_for(Duration::from_secs(20));
        pub_some(&mut net, &[0, 3], 20, &mut published);
        net.partition = None;
        pub_some(&mut net, &[0, 3], 20, &mut published);
        net.run_for(Duration::from_secs(30));
        pub_some(&mut net, &[0, 3], 10, &mut published);
        net.run_for(Duration::from_secs(10));
        let conv = net.converged(6);
        failures.extend(check_accounting(
            &net,
            &published,
            &[1, 2, 4, 5],
            &format!("seed {seed} (converged {conv})"),
        ));
    }
    assert_none(&failures);
}

// a node joins while origins publish, under loss: everything published after the
// origin saw it join must arrive or be resynced.
#[test]
fn join_while_publishing() {
    let mut failures = Vec::new();
    for seed in 500..520 {
        let mut net = cluster(4, seed);
        net.loss = 0.15;
        let mut published: BTreeMap<usize, Vec<(bool, String)>> = BTreeMap::new();
        for i in 0..300 {
            if i == 50 {
                net.start(4, config(4, &[1]));
            }
            let origin = i % 4;
            let key = format!("s{seed}-{i}");
            let knows = net.nodes[&origin].members().any(|m| m.addr == addr(4));
            net.publish(origin, &key);
            published.entry(origin).or_default().push((knows, key));
            net.run_for(Duration::from_millis(5));
        }
        net.run_for(Duration::from_secs(8));
        let got: BTreeSet<String> = net.keys_at(4).into_iter().collect();
        for (origin, keys) in &published {
            let missing = keys
                .iter()
                .filter(|(knows, k)| *knows && !got.contains(k))
                .count();
            let resynced = net
                .resyncs
                .get(&4)
                .into_iter()
                .flatten()
                .any(|(o, _)| *o == NodeId(100 + *origin as u64));
            if missing > 0 && !resynced {
                failures.push(format!(
                    "seed {seed} origin {origin}: joiner silently missing {missing}"
                ));
            }
        }
    }
    assert_none(&failures);
}

// repair requests are served to any source address: amplification.
#[test]
fn repair_amplification() {
    let mut net = cluster(2, 119);
    let node = net.node(0);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..4096 {
        let key: String = (0..40)
            .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
            .collect();
        node.publish(Instant::ZERO, Invalidation::key(format!("user:{key}")))
            .unwrap();
    }
    net.drain(0);
    net.run_for(Duration::from_secs(3));
    let request = wire::encode_repair(
        wire::ClusterId::from_name("syncbus"),
        NodeId(100),
        &[(1, wire::MAX_SEQ)],
    );
    let now = net.now;
    let node = net.node(0);
    node.handle_packet(now, addr(50), &request);
    let replies: Vec<Transmit> = std::iter::from_fn(|| node.poll_transmit()).collect();
    let bytes: usize = replies
        .iter()
        .filter(|t| t.destination == addr(50))
        .map(|t| t.payload.len())
        .sum();
    eprintln!(
        "request {} bytes from a non-member -> {} datagrams, {} bytes to it",
        request.len(),
        replies.len(),
        bytes
    );
}

// structured garbage: valid headers, random fields, for every kind, interleaved with
// real traffic. No panic; sizes stay bounded.
#[test]
fn structured_fuzz() {
    let cid = wire::ClusterId::from_name("syncbus");
    for seed in 600..606 {
        let mut net = cluster(4, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let pick_seq = |rng: &mut ChaCha8Rng| -> u64 {
            match rng.random_range(0..4) {
                0 => rng.random_range(1..50),
                1 => wire::MAX_SEQ - rng.random_range(1..5),
                2 => rng.random_range(1..wire::MAX_SEQ),
                _ => 1,
            }
        };
        for round in 0..3000 {
            if round % 10 == 0 {
                net.publish(rng.random_range(0..4), &format!("real{round}"));
            }
            let origin = NodeId(if rng.random_bool(0.5) {
                100 + rng.random_range(0..4)
            } else {
                rng.random_range(0..1_000_000)
            });
            let bytes = match rng.random_range(0..6) {
                0 => {
                    let a = pick_seq(&mut rng);
                    let b = pick_seq(&mut rng);
                    let (first, last) = if a <= b + 1 { (a, b) } else { (b.max(1), a) };
                    wire::encode_digest(
                        cid,
                        wire::Digest {
                            origin,
                            last,
                            first: first.min(last + 1).max(1),
                        },
                    )
                }
                1 => {
                    let ranges: Vec<(u64, u64)> = (0..rng.random_range(1..60))
                        .map(|_| {
                            let a = pick_seq(&mut rng);
                            let b = pick_seq(&mut rng);
                            (a.min(b), a.max(b))
                        })
                        .collect();
                    wire::encode_repair(cid, origin, &ranges)
                }
                2 => wire::encode_gone(cid, origin, pick_seq(&mut rng)),
                3 => {
                    let seqs: Vec<u64> = (0..rng.random_range(1..100))
                        .map(|_| pick_seq(&mut rng))
                        .collect();
                    wire::encode_ack(cid, origin, &seqs)
                }
                _ => {
                    let count = rng.random_range(1..20u32);
                    let first_seq = pick_seq(&mut rng).min(wire::MAX_SEQ - 30);
                    let mut body = Vec::new();
                    for j in 0..count {
                        wire::encode_entry(
                            &Invalidation::key(format!("f{j}")),
                            rng.random_bool(0.5),
                            &mut body,
                        );
                    }
                    let mut d = wire::encode_batch(
                        cid,
                        wire::BatchInfo {
                            origin,
                            first_seq,
                            count,
                        },
                        &body,
                    )
                    .to_vec();
                    if rng.random_bool(0.3) {
                        d[4] |= wire::FLAG_FORWARD;
                    }
                    if rng.random_bool(0.2) {
                        let i = rng.random_range(13..d.len());
                        d[i] = rng.random();
                    }
                    Bytes::from(d)
                }
            };
            let target = rng.random_range(0..4);
            let from = addr(rng.random_range(0..6));
            let now = net.now;
            net.node(target).handle_packet(now, from, &bytes);
            net.drain(target);
            net.run_for(Duration::from_millis(rng.random_range(0..20)));
        }
        net.run_for(Duration::from_secs(10));
        for i in 0..4 {
            eprintln!(
                "seed {seed} node {i}: sizes {:?} dropped {}",
                net.nodes[&i].debug_sizes(),
                net.nodes[&i].stats().dropped.total()
            );
        }
    }
}

// mutated copies of real in-flight datagrams (all kinds, membership included).
#[test]
fn mutation_fuzz() {
    for seed in 700..704 {
        let mut net = cluster(4, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for round in 0..4000 {
            if round % 7 == 0 {
                let o = rng.random_range(0..4);
                if rng.random_bool(0.3) {
                    let now = net.now;
                    let _ = net.node(o).publish_awaited(
                        now,
                        Invalidation::key(format!("a{round}")),
                        Goal::Replicas(2),
                        now + Duration::from_millis(500),
                    );
                    net.drain(o);
                } else {
                    net.publish(o, &format!("r{round}"));
                }
            }
            let sample: Vec<(SocketAddr, SocketAddr, Bytes)> =
                net.in_flight.values().take(3).cloned().collect();
            for (from, to, payload) in sample {
                let mut d = payload.to_vec();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..d.len());
                    if i == 3 || i < 2 || (5..13).contains(&i) {
                        continue;
                    }
                    d[i] = rng.random();
                }
                if rng.random_bool(0.1) {
                    d.truncate(rng.random_range(0..d.len()));
                }
                if let Some(index) = net.index_of(to) {
                    let now = net.now;
                    net.node(index).handle_packet(now, from, &d);
                    net.drain(index);
                }
            }
            net.run_for(Duration::from_millis(rng.random_range(0..5)));
        }
        net.run_for(Duration::from_secs(5));
        eprintln!(
            "seed {seed}: converged {} sizes {:?}",
            net.converged(4),
            (0..4)
                .map(|i| net.nodes[&i].debug_sizes())
                .collect::<Vec<_>>()
        );
    }
}

// determinism under loss + partition + crash + restart + awaits.
#[test]
fn determinism_complex() {
    let run = |seed: u64| {
        let mut net = zoned_cluster(3, 3, seed);
        net.loss = 0.15;
        let mut refusals = Vec::new();
        for i in 0..60 {
            if !net.nodes.contains_key(&(i % 9)) {
                net.run_for(Duration::from_millis(11));
                continue;
            }
            net.publish(i % 9, &format!("k{i}"));
            if i % 5 == 0 {
                // A node restarted moments ago may know no zone yet: refusals are
                // outcomes to compare too.
                let now = net.now;
                let key = Invalidation::key(format!("a{i}"));
                let deadline = now + Duration::from_secs(2);
                let node = net.node(i % 9);
                let outcome = node.publish_awaited(now, key, Goal::Zones(2), deadline);
                refusals.push(format!("{outcome:?}"));
                net.drain(i % 9);
            }
            net.run_for(Duration::from_millis(11));
            if i == 20 {
                net.partition = Some(([0, 1, 2, 3].into(), [4, 5, 6, 7, 8].into()));
            }
            if i == 30 {
                net.crash(5);
            }
            if i == 40 {
                net.partition = None;
                let mut c = config(5, &[0]);
                c.node_id = NodeId(555);
                c.generation = 9;
                c.zone = Zone::new("zone-2").unwrap();
                net.start(5, c);
            }
        }
        net.run_for(Duration::from_secs(20));
        let stats: Vec<Stats> = (0..9).map(|i| net.nodes[&i].stats().clone()).collect();
        (
            net.trace.finish(),
            net.sent,
            stats,
            net.awaits
                .clone()
                .into_iter()
                .map(|(k, v)| (k, format!("{v:?}")))
                .collect::<Vec<_>>(),
            refusals,
        )
    };
    let a = run(42);
    let b = run(42);
    assert_eq!(a.0, b.0);
    assert_eq!(a.1, b.1);
    assert_eq!(a.2, b.2);
    assert_eq!(a.3, b.3);
    assert_eq!(a.4, b.4);
}

// an awaited publish when the relay path's ack round trip exceeds retransmit_after
// (scaled down: 1 ms hops, retransmit_after 2 ms ~ 25 ms hops with the default 50 ms).
#[test]
fn awaited_cross_zone_copies_when_rtt_exceeds_retransmit_after() {
    let mut net = zoned_cluster_with(5, 3, 123, |_, c| {
        c.retransmit_after = Duration::from_millis(2)
    });
    net.run_for(Duration::from_secs(1));
    let zone_of = |i: usize| i % 3;
    let counts = std::rc::Rc::new(std::cell::RefCell::new(BTreeMap::<u8, u64>::new()));
    let c2 = counts.clone();
    net.filter = Some(Box::new(move |from, to, p| {
        if from == 0 && zone_of(from) != zone_of(to) && kind_of(p) == 2 {
            *c2.borrow_mut().entry(kind_of(p)).or_default() += 1;
        }
        false
    }));
    let id = net.awaited(0, "k", Goal::Replicas(14), Duration::from_secs(5));
    net.run_for(Duration::from_millis(100));
    eprintln!(
        "outcome {:?}; cross-zone data datagrams from the origin: {:?} (10 remote-zone nodes, 4 relays)",
        net.outcome(0, id).map(|o| o.is_ok()),
        counts.borrow()
    );
}

// zones of relays_per_zone + 1 members: data copies received per node for one publish.
#[test]
fn relay_zone_of_three() {
    let mut net = zoned_cluster(3, 3, 124);
    net.run_for(Duration::from_secs(1));
    let counts = std::rc::Rc::new(std::cell::RefCell::new(BTreeMap::<usize, u64>::new()));
    let c2 = counts.clone();
    net.filter = Some(Box::new(move |_, to, p| {
        if kind_of(p) == 2 {
            *c2.borrow_mut().entry(to).or_default() += 1;
        }
        false
    }));
    net.publish(0, "k");
    net.run_for(Duration::from_millis(50));
    let dups: u64 = (0..9).map(|i| net.nodes[&i].stats().duplicates).sum();
    eprintln!(
        "data datagrams received per node: {:?}; duplicates {dups}",
        counts.borrow()
    );
    for i in 0..9 {
        assert_eq!(net.keys_at(i), ["k"]);
    }
}

// after a Gone, the retained part of the hole has no repair planned: if the data that
// followed the Gone is lost, retained entries are given up too (and in a second Resync).
#[test]
fn after_gone_no_repair_replanned() {
    let mut net = cluster_with(3, 125, |_, c| c.retention = 4);
    let state = std::rc::Rc::new(std::cell::Cell::new((0u32, false)));
    let s2 = state.clone();
    net.filter = Some(Box::new(move |from, to, p| {
        if from != 0 || to != 2 {
            return false;
        }
        let (digests, dropped_answer) = s2.get();
        match kind_of(p) {
            6 => {
                s2.set((digests + 1, dropped_answer));
                digests + 1 < 5
            } // only the 5th digest gets through
            2 if digests < 5 => true, // the burst itself
            2 if !dropped_answer => {
                s2.set((digests, true));
                true
            } // the repair answer
            _ => false,
        }
    }));
    for i in 0..10 {
        net.publish(0, &format!("k{i}"));
    }
    net.run_for(Duration::from_secs(6));
    eprintln!(
        "node 2 got {:?}, resyncs {:?}, state {:?}",
        net.keys_at(2),
        net.resyncs.get(&2),
        state.get()
    );
    assert_eq!(
        net.resyncs.get(&2).map(Vec::len),
        Some(1),
        "retained k6..k9 given up as well"
    );
}

// a member replaced by a restart at the same address (new id, other zone): does an
// await that became unreachable fail at once?
#[test]
fn replacement_reevaluates_awaits() {
    let mut net = cluster(3, 126);
    net.cut_data.insert((0, 1));
    net.cut_data.insert((0, 2));
    let id = net.awaited(0, "k", Goal::Zones(2), Duration::from_secs(20));
    net.nodes.remove(&2);
    let mut restarted = config(2, &[0]);
    restarted.node_id = NodeId(999);
    restarted.generation = 2;
    restarted.zone = Zone::new("zone-1").unwrap();
    net.start(2, restarted);
    let replaced = |n: &Net| n.nodes[&0].members().any(|m| m.id == NodeId(999));
    assert!(net.run_until(Duration::from_secs(5), replaced));
    let at = net.now;
    net.run_for(Duration::from_millis(100));
    eprintln!(
        "replaced at {at:?}; outcome {:?}; member events at 0: {:?}",
        net.outcome(0, id),
        net.member_events.get(&0).map(|v| v.len())
    );
    assert!(
        net.outcome(0, id).is_some(),
        "zones left: only zone-1, goal 2"
    );
}

// digests that move a stream's start back put every entry received since into
// `ahead` without the MAX_ENTRIES_PAST_GAPS (16,384) check receive_batch applies.
#[test]
fn digest_extension_bypasses_past_gap_cap() {
    let mut net = cluster(2, 127);
    let cid = wire::ClusterId::from_name("syncbus");
    let mut entry = Vec::new();
    wire::encode_entry(&Invalidation::key(""), false, &mut entry);
    for o in 0..20u64 {
        let origin = NodeId(0x1000 + o);
        // 4,000 entries (seq 1001..=5000) in a few datagrams each.
        let mut seq = 1001;
        while seq <= 5000 {
            let count = 200u32.min((5001 - seq) as u32);
            let body = entry.repeat(count as usize);
            let d = wire::encode_batch(
                cid,
                wire::BatchInfo {
                    origin,
                    first_seq: seq,
                    count,
                },
                &body,
            );
            let now = net.now;
            net.node(1).handle_packet(now, addr(9), &d);
            seq += u64::from(count);
        }
        let d = wire::encode_digest(
            cid,
            wire::Digest {
                origin,
                last: 5000,
                first: 1,
            },
        );
        let now = net.now;
        net.node(1).handle_packet(now, addr(9), &d);
        net.drain(1);
    }
    let held = net.nodes[&1].debug_past_gaps();
    eprintln!(
        "entries held past gaps: {held} (cap 16384); datagram size {}",
        wire::encode_batch(
            cid,
            wire::BatchInfo {
                origin: NodeId(1),
                first_seq: 1,
                count: 200
            },
            &entry.repeat(200)
        )
        .len()
    );
    assert!(held <= 16_384);
}
