//! Sealed clusters: who gets in, replays, key rotation and the move from plaintext.

use super::*;

fn key(byte: u8) -> ClusterKey {
    ClusterKey::from_bytes([byte; 32])
}

fn sealed_config(index: usize, seeds: &[usize], key: ClusterKey, mode: SealMode) -> NodeConfig {
    let mut config = config(index, seeds);
    config.encryption = Some(Encryption {
        keys: vec![key],
        mode,
    });
    config
}

fn sealed_cluster(size: usize, seed: u64) -> Net {
    let mut net = Net::new(seed);
    for index in 0..size {
        let seeds: &[usize] = if index == 0 { &[] } else { &[0] };
        net.start(
            index,
            sealed_config(index, seeds, key(1), SealMode::Require),
        );
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(size)));
    net
}

/// Datagrams node `from` would send now, taken instead of sent.
fn capture(node: &mut Node) -> Vec<Transmit> {
    std::iter::from_fn(|| node.poll_transmit()).collect()
}

fn is_sealed(payload: &[u8]) -> bool {
    payload.get(3) == Some(&9)
}

#[test]
fn a_sealed_cluster_forms_delivers_and_sends_nothing_in_plaintext() {
    let mut net = Net::new(21);
    let plaintext = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = plaintext.clone();
    net.filter = Some(Box::new(move |_, _, payload| {
        if !is_sealed(payload) {
            seen.set(seen.get() + 1);
        }
        false
    }));
    for index in 0..3 {
        let seeds: &[usize] = if index == 0 { &[] } else { &[0] };
        net.start(
            index,
            sealed_config(index, seeds, key(1), SealMode::Require),
        );
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(3)));
    net.publish(0, "user:1");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.keys_at(1), ["user:1"]);
    assert_eq!(net.keys_at(2), ["user:1"]);
    assert_eq!(plaintext.get(), 0);
    for index in 0..3 {
        assert_eq!(net.nodes[&index].stats().dropped.total(), 0, "node {index}");
    }
    // Datagrams stay within the size limit with the seal on.
    let config = config(0, &[]);
    assert!(net.nodes[&0].limits().max_entry_len < Limits::new(&config).max_entry_len);
}

#[test]
fn a_node_with_another_key_stays_out_and_is_counted() {
    let mut net = sealed_cluster(2, 22);
    net.start(2, sealed_config(2, &[0], key(2), SealMode::Require));
    net.run_for(Duration::from_secs(5));
    assert_eq!(net.nodes[&2].members().len(), 0);
    assert_eq!(net.nodes[&0].members().len(), 1);
    assert!(net.nodes[&0].stats().dropped.unauthenticated > 0);
    // Nor does a node without keys: the cluster refuses its plaintext.
    net.start(3, config(3, &[0]));
    net.run_for(Duration::from_secs(5));
    assert_eq!(net.nodes[&3].members().len(), 0);
    assert!(net.nodes[&0].stats().dropped.plaintext > 0);
}

/// The datagrams node 2 of a plaintext cluster sends when it leaves: a perfect forgery
/// of node 2's goodbye in any cluster whose node 2 has the same identity.
fn forged_leave(seed: u64) -> Vec<Transmit> {
    let mut twin = cluster(3, seed);
    let now = twin.now;
    twin.node(2).leave(now);
    capture(twin.node(2))
}

#[test]
fn a_forged_leave_works_on_plaintext_and_is_refused_when_sealed() {
    let forged = forged_leave(23);
    assert!(!forged.is_empty());
    let gone = |net: &Net| net.nodes[&0].members().all(|m| m.addr != addr(2));

    // Without sealing, anyone can make node 0 drop node 2.
    let mut open = cluster(3, 23);
    for transmit in forged.iter().filter(|t| t.destination == addr(0)) {
        let now = open.now;
        open.node(0).handle_packet(now, addr(2), &transmit.payload);
    }
    assert!(
        gone(&open),
        "the forgery should work on a plaintext cluster"
    );

    // Sealed, the same bytes are refused and counted; node 2 stays.
    let mut sealed = sealed_cluster(3, 23);
    for transmit in &forged {
        let now = sealed.now;
        sealed
            .node(0)
            .handle_packet(now, addr(2), &transmit.payload);
    }
    sealed.run_for(Duration::from_secs(2));
    assert!(!gone(&sealed));
    assert_eq!(
        sealed.nodes[&0].stats().dropped.plaintext,
        forged.len() as u64
    );
}

#[test]
fn forged_invalidations_from_outside_are_refused() {
    // A data datagram made by a plaintext twin, and one sealed with another key.
    let mut twin = cluster(2, 24);
    let now = twin.now;
    twin.node(1)
        .publish(now, Invalidation::key("forged:plain"))
        .unwrap();
    let plain = capture(twin.node(1));
    let mut outsider = sealed_cluster(2, 24);
    for index in 0..2 {
        let other = key(7);
        outsider.node(index).install_key(other.clone()).unwrap();
        outsider.node(index).use_key(&other).unwrap();
    }
    let now = outsider.now;
    outsider
        .node(1)
        .publish(now, Invalidation::key("forged:sealed"))
        .unwrap();
    let wrong_key = capture(outsider.node(1));

    let mut net = sealed_cluster(2, 24);
    let now = net.now;
    for transmit in plain.iter().chain(&wrong_key) {
        net.node(0).handle_packet(now, addr(1), &transmit.payload);
    }
    net.drain(0);
    assert!(net.keys_at(0).is_empty(), "{:?}", net.keys_at(0));
    let dropped = &net.nodes[&0].stats().dropped;
    assert_eq!(dropped.plaintext, plain.len() as u64);
    assert_eq!(dropped.unauthenticated, wrong_key.len() as u64);
}

#[test]
fn a_replayed_datagram_is_refused_and_counted() {
    let mut net = sealed_cluster(2, 25);
    let now = net.now;
    net.node(0).publish(now, Invalidation::key("once")).unwrap();
    let sent = capture(net.node(0));
    let data: Vec<_> = sent.iter().filter(|t| t.destination == addr(1)).collect();
    assert!(!data.is_empty());
    for _ in 0..3 {
        for transmit in &data {
            let now = net.now;
            net.node(1).handle_packet(now, addr(0), &transmit.payload);
            net.drain(1);
        }
    }
    assert_eq!(net.keys_at(1), ["once"]);
    assert_eq!(
        net.nodes[&1].stats().dropped.replayed,
        2 * data.len() as u64
    );
}

#[test]
fn keys_rotate_during_a_publish_stream_without_losing_an_invalidation() {
    let mut net = sealed_cluster(3, 26);
    let (old, new) = (key(1), key(2));
    let mut published = Vec::new();
    let mut publish_for = |net: &mut Net, rounds: usize| {
        for _ in 0..rounds {
            let key = format!("k{}", published.len());
            net.publish(0, &key);
            published.push(key);
            net.run_for(Duration::from_millis(10));
        }
    };
    publish_for(&mut net, 20);
    for index in 0..3 {
        net.node(index).install_key(new.clone()).unwrap();
        publish_for(&mut net, 5);
    }
    for index in [2, 0, 1] {
        net.node(index).use_key(&new).unwrap();
        publish_for(&mut net, 5);
    }
    for index in 0..3 {
        net.node(index).remove_key(&old).unwrap();
        publish_for(&mut net, 5);
    }
    net.run_for(Duration::from_secs(2));
    for index in 1..3 {
        assert_eq!(net.keys_at(index), published, "node {index}");
        assert!(!net.resyncs.contains_key(&index), "node {index} resynced");
        assert_eq!(net.nodes[&index].stats().dropped.total(), 0);
        assert_eq!(net.nodes[&index].key_fingerprints(), [new.fingerprint()]);
    }
    assert!(net.converged(3));
}

#[test]
fn a_plaintext_cluster_moves_to_sealed_in_steps_without_a_split() {
    // Step 0: the cluster runs plaintext; node 2 still does.
    let mut net = Net::new(27);
    net.start(0, sealed_config(0, &[], key(1), SealMode::Open));
    net.start(1, sealed_config(1, &[0], key(1), SealMode::Open));
    net.start(2, config(2, &[0]));
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(3)));
    // Node 2 restarts with the key, in `Open` like the others.
    net.crash(2);
    let mut restarted = sealed_config(2, &[0], key(1), SealMode::Open);
    restarted.node_id = NodeId(202);
    restarted.generation = 2;
    net.start(2, restarted);
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(3)));
    // The others see the old identity go (the restart), then nothing more goes down.
    net.run_for(Duration::from_secs(3));
    let downs_before = net
        .member_events
        .values()
        .flatten()
        .filter(|e| matches!(e, Event::MemberDown(_)))
        .count();

    let mut published = Vec::new();
    for mode in [SealMode::Seal, SealMode::Require] {
        for index in 0..3 {
            net.node(index).set_seal_mode(mode).unwrap();
            let key = format!("after-{index}-{mode:?}");
            net.publish(1, &key);
            published.push(key);
            net.run_for(Duration::from_millis(300));
        }
    }
    net.run_for(Duration::from_secs(2));
    assert!(net.converged(3));
    let downs_after = net
        .member_events
        .values()
        .flatten()
        .filter(|e| matches!(e, Event::MemberDown(_)))
        .count();
    assert_eq!(
        downs_before, downs_after,
        "a member was declared down: {:?}",
        net.member_events
    );
    for index in [0, 2] {
        let keys = net.keys_at(index);
        let tail = &keys[keys.len() - published.len()..];
        assert_eq!(tail, published.as_slice(), "node {index}");
    }
    assert_eq!(net.nodes[&0].stats().dropped.plaintext, 0);
}

#[test]
fn keyring_operations_refuse_what_cannot_be_done() {
    let mut plain = Node::new(config(0, &[]), Instant::ZERO).unwrap();
    assert_eq!(plain.install_key(key(1)), Err(KeyError::NoEncryption));
    assert_eq!(plain.seal_mode(), None);
    let mut node = Node::new(
        sealed_config(0, &[], key(1), SealMode::Require),
        Instant::ZERO,
    )
    .unwrap();
    assert!(matches!(
        node.remove_key(&key(1)),
        Err(KeyError::Primary(_))
    ));
    assert!(matches!(
        node.use_key(&key(2)),
        Err(KeyError::NotInstalled(_))
    ));
    for byte in 2..=16 {
        node.install_key(key(byte)).unwrap();
    }
    assert_eq!(node.install_key(key(17)), Err(KeyError::Full));
    let mut no_keys = config(0, &[]);
    no_keys.encryption = Some(Encryption {
        keys: Vec::new(),
        mode: SealMode::Require,
    });
    let error = Node::new(no_keys, Instant::ZERO).err().unwrap();
    assert!(error.to_string().contains("encryption.keys"), "{error}");
}

#[test]
fn datagrams_of_a_dead_node_replayed_to_a_newcomer_change_nothing() {
    let mut net = sealed_cluster(3, 28);
    let now = net.now;
    net.node(0).publish(now, Invalidation::key("old")).unwrap();
    let captured: Vec<_> = capture(net.node(0))
        .into_iter()
        .filter(|t| t.destination == addr(1))
        .collect();
    net.crash(0);
    net.run_for(Duration::from_secs(30));
    net.start(3, sealed_config(3, &[1], key(1), SealMode::Require));
    assert!(
        net.run_until(Duration::from_secs(10), |n| n.nodes[&3].members().len()
            == 2)
    );
    // Replayed from the dead node's address and from anyone else's.
    for from in [addr(0), addr(9)] {
        for transmit in &captured {
            let now = net.now;
            net.node(3).handle_packet(now, from, &transmit.payload);
            net.drain(3);
        }
    }
    net.run_for(Duration::from_secs(3));
    assert!(net.keys_at(3).is_empty(), "{:?}", net.keys_at(3));
    assert!(!net.resyncs.contains_key(&3), "{:?}", net.resyncs);
    assert!(net.nodes[&3].stats().dropped.unknown_peer >= 2 * captured.len() as u64);
}

#[test]
fn two_starts_with_the_same_configuration_never_share_nonces() {
    let config = sealed_config(0, &[], key(1), SealMode::Require);
    let mut first = Node::new(config.clone(), Instant::ZERO).unwrap();
    let mut second = Node::new(config, Instant::ZERO).unwrap();
    let (a, b) = (first.discovery_beacon(), second.discovery_beacon());
    // The nonce sits after the 13-byte header.
    assert_ne!(a[13..37], b[13..37]);
}

#[test]
fn a_copy_sent_to_the_discovery_path_does_not_use_up_the_genuine_datagram() {
    let mut net = sealed_cluster(2, 29);
    let now = net.now;
    net.node(0).publish(now, Invalidation::key("kept")).unwrap();
    let sent: Vec<_> = capture(net.node(0))
        .into_iter()
        .filter(|t| t.destination == addr(1))
        .collect();
    for transmit in &sent {
        let now = net.now;
        net.node(1)
            .handle_discovery(now, addr(0), &transmit.payload);
        net.node(1).handle_packet(now, addr(0), &transmit.payload);
        net.drain(1);
    }
    assert_eq!(net.keys_at(1), ["kept"]);
    let dropped = &net.nodes[&1].stats().dropped;
    assert_eq!(dropped.replayed, 0);
    assert_eq!(dropped.unsupported_kind, sent.len() as u64, "{dropped:?}");
}

/// What node 0 of a plaintext cluster tells node 1 once node 2 crashed and node 0
/// declared it down: a perfect forgery of "node 2 is down" in any cluster whose nodes
/// have the same identities.
fn forged_down(seed: u64) -> Vec<Bytes> {
    let mut twin = cluster(3, seed);
    twin.crash(2);
    let gone = |n: &Net| n.nodes[&0].members().all(|m| m.addr != addr(2));
    assert!(twin.run_until(Duration::from_secs(20), gone));
    let told = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let record = told.clone();
    twin.filter = Some(Box::new(move |from, to, payload| {
        if from == 0 && to == 1 && payload.get(3) == Some(&(wire::MessageKind::Membership as u8)) {
            record.borrow_mut().push(Bytes::copy_from_slice(payload));
        }
        false
    }));
    twin.run_for(Duration::from_secs(2));
    told.take()
}

#[test]
fn a_forged_death_of_a_live_node_works_on_plaintext_and_is_refused_when_sealed() {
    let forged = forged_down(30);
    assert!(!forged.is_empty());
    let lost = |net: &Net| net.nodes[&1].members().all(|m| m.addr != addr(2));

    // Without sealing, node 1 takes node 2 (alive and well) for dead.
    let mut open = cluster(3, 30);
    for payload in &forged {
        let now = open.now;
        open.node(1).handle_packet(now, addr(0), payload);
        open.drain(1);
    }
    assert!(
        lost(&open),
        "the forgery should work on a plaintext cluster"
    );

    // Sealed, the same bytes are refused; node 2 stays a member everywhere.
    let mut sealed = sealed_cluster(3, 30);
    for payload in &forged {
        let now = sealed.now;
        sealed.node(1).handle_packet(now, addr(0), payload);
        sealed.drain(1);
    }
    sealed.run_for(Duration::from_secs(5));
    assert!(!lost(&sealed));
    assert!(sealed.converged(3));
    assert_eq!(
        sealed.nodes[&1].stats().dropped.plaintext,
        forged.len() as u64
    );
}
