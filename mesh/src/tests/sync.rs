//! The member-table exchange: what a peer's table teaches a node, and when a node
//! answers with its own.

use super::*;

/// A member no node of the test cluster has heard of.
fn stranger() -> Member {
    Member {
        id: NodeId(999),
        addr: addr(99),
        zone: Zone::new("zone-0").unwrap(),
        generation: 1,
    }
}

/// A sync datagram listing the members of `table`.
fn table(answer: bool, table: &[foca::Member<Member>]) -> Bytes {
    let items: Vec<wire::SyncItem> = table.iter().cloned().map(wire::SyncItem::Member).collect();
    let cluster = wire::ClusterId::from_name("syncbus");
    let datagrams = wire::encode_sync(cluster, answer, &items, 1400);
    assert_eq!(datagrams.len(), 1);
    datagrams[0].clone()
}

/// Feeds `datagram` to node `index` as if from `from`; returns how many sync
/// datagrams the node sent back, dropping everything it sent.
fn feed(net: &mut Net, index: usize, from: SocketAddr, datagram: &[u8]) -> usize {
    let now = net.now;
    let node = net.node(index);
    node.handle_packet(now, from, datagram);
    while node.poll_event().is_some() {}
    let mut answers = 0;
    while let Some(transmit) = node.poll_transmit() {
        let (header, _) = wire::read_header(&transmit.payload).unwrap();
        if header.kind == wire::MessageKind::Sync {
            assert_eq!(transmit.destination, from);
            answers += 1;
        }
    }
    answers
}

fn knows(net: &Net, index: usize, id: NodeId) -> bool {
    net.nodes[&index].members().any(|m| m.id == id)
}

#[test]
fn a_peer_table_brings_a_member_gossip_missed() {
    let mut net = cluster(3, 61);
    let datagram = table(false, &[foca::Member::alive(stranger())]);
    assert_eq!(feed(&mut net, 0, addr(1), &datagram), 0);
    assert!(knows(&net, 0, NodeId(999)));
    assert_eq!(net.nodes[&0].stats().member_updates_synced, 1);
}

#[test]
fn a_death_in_a_peer_table_reaches_a_node_that_missed_it() {
    let mut net = cluster(3, 62);
    let victim = net.nodes[&0]
        .members()
        .find(|m| m.addr == addr(2))
        .cloned()
        .unwrap();
    let datagram = table(false, &[foca::Member::down(victim.clone())]);
    feed(&mut net, 0, addr(1), &datagram);
    assert!(!knows(&net, 0, victim.id));
    assert_eq!(net.nodes[&0].stats().member_updates_synced, 1);
}

#[test]
fn what_a_node_already_knows_changes_nothing() {
    let mut net = cluster(3, 63);
    let mut entries: Vec<foca::Member<Member>> = net.nodes[&0]
        .members()
        .cloned()
        .map(foca::Member::alive)
        .collect();
    // A death of a member this node never knew: nothing to take back.
    entries.push(foca::Member::down(stranger()));
    // This node itself, alive: old news.
    entries.push(foca::Member::alive(net.nodes[&0].local().clone()));
    let before: Vec<Member> = net.nodes[&0].members().cloned().collect();
    feed(&mut net, 0, addr(1), &table(false, &entries));
    let after: Vec<Member> = net.nodes[&0].members().cloned().collect();
    assert_eq!(before, after);
    assert_eq!(net.nodes[&0].stats().member_updates_synced, 0);
}

#[test]
fn a_node_answers_members_only_and_only_a_few_times_per_interval() {
    let mut net = cluster(3, 64);
    // A request from an address that is not a member, listing that address as a live
    // member, is dropped whole: no answer is aimed at it and nothing is learned.
    let victim = addr(50);
    let lure = Member {
        addr: victim,
        ..stranger()
    };
    let ask = table(true, &[foca::Member::alive(lure)]);
    assert_eq!(feed(&mut net, 0, victim, &ask), 0);
    assert_eq!(feed(&mut net, 0, victim, &ask), 0, "still not a member");
    assert!(!knows(&net, 0, NodeId(999)));
    assert_eq!(net.nodes[&0].stats().dropped.unknown_peer, 2);
    let answers: usize = (0..10).map(|_| feed(&mut net, 0, addr(1), &ask)).sum();
    assert_eq!(
        answers, 4,
        "one datagram per answer in a three-node cluster"
    );
    // Without the flag, no answer.
    let mut net = cluster(3, 64);
    assert_eq!(feed(&mut net, 0, addr(1), &table(false, &[])), 0);
}

#[test]
fn an_older_identity_in_one_table_does_not_hide_a_death_in_the_next() {
    let mut net = cluster(3, 63);
    let victim = net.nodes[&0]
        .members()
        .find(|m| m.addr == addr(2))
        .cloned()
        .unwrap();
    // An identity at the victim's address that loses to the victim: foca keeps the
    // victim, and so must the node's view of foca's table.
    let older = Member {
        id: NodeId(0),
        generation: 0,
        ..victim.clone()
    };
    feed(
        &mut net,
        0,
        addr(1),
        &table(false, &[foca::Member::alive(older)]),
    );
    assert!(knows(&net, 0, victim.id));
    let death = table(false, &[foca::Member::down(victim.clone())]);
    feed(&mut net, 0, addr(1), &death);
    assert!(
        !knows(&net, 0, victim.id),
        "the death was taken for news of nobody"
    );
}

#[test]
fn a_forged_death_of_another_identity_at_a_member_address_is_not_news() {
    let mut net = cluster(4, 81);
    let victim = net.nodes[&2].local().clone();
    // Another identity at the victim's address, with a generation nothing beats.
    let ghost = Member {
        id: NodeId(424_242),
        generation: u64::MAX,
        ..victim.clone()
    };
    feed(
        &mut net,
        1,
        addr(3),
        &table(false, &[foca::Member::down(ghost)]),
    );
    assert_eq!(net.nodes[&1].stats().member_updates_synced, 0);
    net.run_for(Duration::from_secs(20));
    for i in [0, 1, 3] {
        assert!(knows(&net, i, victim.id), "node {i} lost the victim");
    }
}

#[test]
fn a_false_claim_past_an_origin_end_costs_one_request_and_loses_nothing() {
    let mut net = cluster(4, 71);
    net.publish(0, "before");
    // Past the origin's digests, which would settle the claim without a request.
    net.run_for(Duration::from_secs(2));
    let origin = net.nodes[&0].local().id;
    let claim = wire::SyncItem::Progress {
        origin,
        last: 1 << 62,
    };
    let cluster = wire::ClusterId::from_name("syncbus");
    let datagram = wire::encode_sync(cluster, false, &[claim], 1400).remove(0);
    // From someone that is not a member: dropped.
    feed(&mut net, 1, addr(50), &datagram);
    assert_eq!(net.nodes[&1].stats().repairs_requested, 0);
    // From a member: the origin is asked, and its digest refutes the claim.
    feed(&mut net, 1, addr(2), &datagram);
    net.run_for(Duration::from_secs(30));
    assert_eq!(net.nodes[&1].stats().repairs_requested, 1);
    net.publish(0, "after");
    net.run_for(Duration::from_secs(2));
    for i in 1..4 {
        assert_eq!(net.keys_at(i), ["before", "after"], "node {i}");
        assert!(!net.resyncs.contains_key(&i), "node {i}");
    }
}

#[test]
fn malformed_tables_are_counted_drops() {
    let mut net = cluster(3, 65);
    let good = table(false, &[foca::Member::alive(stranger())]);
    // Cut the last member short, then reseal so the checksum holds.
    let mut cut = good[..good.len() - 3].to_vec();
    cut[13..wire::HEADER_LEN].fill(0);
    let cut = wire::checksummed(cut);
    feed(&mut net, 0, addr(1), &cut);
    assert!(!knows(&net, 0, NodeId(999)));
    assert_eq!(net.nodes[&0].stats().dropped.malformed, 1);
}

#[test]
fn idle_members_swap_tables_every_interval() {
    let mut net = cluster(4, 66);
    let before: Vec<u64> = (0..4)
        .map(|i| net.sent_of(i, wire::MessageKind::Sync))
        .collect();
    // The local preset exchanges every 2 s, jittered between 1 and 3 s.
    net.run_for(Duration::from_secs(12));
    for (i, before) in before.into_iter().enumerate() {
        let sent = net.sent_of(i, wire::MessageKind::Sync) - before;
        // At least four exchanges started; at most twelve started plus four answers
        // per interval.
        assert!((4..=12 + 4 * 12).contains(&sent), "node {i} sent {sent}");
    }
    assert!(net.converged(4));
}

#[test]
fn tail_loss_with_every_digest_lost_is_found_through_a_peer_and_repaired() {
    let mut net = cluster(3, 67);
    net.publish(0, "a");
    net.run_for(Duration::from_millis(10));
    // Node 2 loses the newest entry and every digest: only a peer's table can tell it
    // the stream goes further.
    let digest = wire::MessageKind::Digest as u8;
    net.filter = Some(Box::new(move |_, to, payload| {
        to == 2 && payload.get(3) == Some(&digest)
    }));
    net.drop_data_to = Some(2);
    net.publish(0, "last");
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.keys_at(2), ["a"], "the digests were all lost");
    assert!(net.run_until(Duration::from_secs(10), |n| n.keys_at(2).len() == 2));
    assert_eq!(net.keys_at(2), ["a", "last"]);
    assert!(!net.resyncs.contains_key(&2));
}

#[test]
fn a_false_claim_about_an_origin_this_node_never_heard_costs_one_ask() {
    let mut net = cluster(3, 68);
    let origin = net.nodes[&1].local().id;
    let claim = wire::SyncItem::Progress { origin, last: 5 };
    let cluster = wire::ClusterId::from_name("syncbus");
    let datagram = wire::encode_sync(cluster, false, &[claim], 1400).remove(0);
    feed(&mut net, 0, addr(2), &datagram);
    net.run_for(Duration::from_secs(5));
    // Only the origin can say where this node starts, so it is asked; it never
    // published, so it has nothing to tell: no repair, no resync.
    assert_eq!(net.nodes[&0].stats().repairs_requested, 1);
    assert!(!net.resyncs.contains_key(&0));
    assert!(net.keys_at(0).is_empty());
}

/// Drops every datagram of `kinds` on the directed `link` (sender, receiver).
fn lose(net: &mut Net, link: (usize, usize), kinds: &[wire::MessageKind]) {
    let kinds: Vec<u8> = kinds.iter().map(|&kind| kind as u8).collect();
    net.filter = Some(Box::new(move |from, to, payload| {
        (from, to) == link && payload.get(3).is_some_and(|kind| kinds.contains(kind))
    }));
}

#[test]
fn an_origin_whose_first_entries_and_digests_were_all_lost_is_found_through_a_peer() {
    let mut net = cluster(3, 76);
    // Node 2 loses everything node 0 publishes and every digest saying so: it never
    // hears a word of node 0's stream.
    lose(
        &mut net,
        (0, 2),
        &[wire::MessageKind::Data, wire::MessageKind::Digest],
    );
    net.publish(0, "a");
    net.publish(0, "b");
    net.run_for(Duration::from_secs(2));
    assert!(net.keys_at(2).is_empty());
    // A peer's progress names the stream; node 2 asks node 0 where it starts and
    // repairs from there.
    net.filter = None;
    assert!(net.run_until(Duration::from_secs(30), |n| n.keys_at(2).len() == 2));
    assert_eq!(net.keys_at(2), ["a", "b"]);
    assert!(!net.resyncs.contains_key(&2));
}

#[test]
fn a_stream_whose_start_was_never_told_asks_the_origin() {
    let mut net = cluster(3, 77);
    // Node 2 loses node 0's first entry and every digest: it hears of the stream
    // first from the second entry and cannot tell the first is owed.
    lose(
        &mut net,
        (0, 2),
        &[wire::MessageKind::Data, wire::MessageKind::Digest],
    );
    net.publish(0, "a");
    net.run_for(Duration::from_secs(2));
    lose(&mut net, (0, 2), &[wire::MessageKind::Digest]);
    net.publish(0, "b");
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.keys_at(2), ["b"]);
    // Once the stream is older than the gap timeout, node 2's next exchange asks
    // node 0 where it starts, and the first entry is repaired.
    net.filter = None;
    assert!(net.run_until(Duration::from_secs(30), |n| n.keys_at(2).len() == 2));
    assert_eq!(net.keys_at(2), ["b", "a"]);
    assert!(!net.resyncs.contains_key(&2));
}

#[test]
fn a_node_joining_after_an_origin_published_is_told_where_it_starts() {
    let mut net = cluster(3, 80);
    for key in ["a", "b", "c"] {
        net.publish(0, key);
    }
    net.run_for(Duration::from_secs(5));
    net.start(3, config(3, &[1]));
    joiner_gets_only_what_follows(&mut net, Duration::from_secs(3));
}

/// Well past joiner 3's grace, node 0 publishes "d" again: the joiner gets that entry
/// within `within`, and no resync, since it learned where it starts in time.
fn joiner_gets_only_what_follows(net: &mut Net, within: Duration) {
    net.run_for(Duration::from_secs(5));
    net.publish(0, "d");
    net.run_for(within);
    assert_eq!(net.keys_at(3), ["d"]);
    assert!(!net.resyncs.contains_key(&3), "{:?}", net.resyncs.get(&3));
}

#[test]
fn a_claim_the_origin_never_settles_becomes_a_resync_and_keeps_the_stream() {
    let mut net = cluster(3, 69);
    net.publish(0, "a");
    net.run_for(Duration::from_millis(10));
    // Node 2 hears nothing more from the origin: neither entries nor digests.
    net.filter = Some(Box::new(|from, to, _| from == 0 && to == 2));
    let origin = net.nodes[&0].local().id;
    let claim = wire::SyncItem::Progress { origin, last: 5 };
    let cluster = wire::ClusterId::from_name("syncbus");
    let datagram = wire::encode_sync(cluster, false, &[claim], 1400).remove(0);
    feed(&mut net, 2, addr(1), &datagram);
    let timeout = NodeConfig::new(NodeId(0), addr(0), Zone::default()).gap_timeout;
    net.run_for(timeout + Duration::from_millis(100));
    assert_eq!(
        net.resyncs.get(&2).map(Vec::as_slice),
        Some(&[(origin, 0)][..])
    );
    // The stream did not move: what the origin sends next is still delivered.
    net.filter = None;
    net.publish(0, "b");
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.keys_at(2), ["a", "b"]);
}

/// Feeds `datagram` to node `index` as if from `from`; returns the sync datagrams the
/// node sent back, as (flags, items), dropping everything else it sent.
fn syncs_answered(
    net: &mut Net,
    index: usize,
    from: SocketAddr,
    datagram: &[u8],
) -> Vec<(u8, Vec<wire::SyncItem>)> {
    let now = net.now;
    let node = net.node(index);
    node.handle_packet(now, from, datagram);
    while node.poll_event().is_some() {}
    let mut syncs = Vec::new();
    while let Some(transmit) = node.poll_transmit() {
        let (header, body) = wire::read_header(&transmit.payload).unwrap();
        if header.kind == wire::MessageKind::Sync {
            syncs.push((header.flags, wire::decode_sync(body).unwrap()));
        }
    }
    syncs
}

/// The members the sync datagrams list, with their states, in order.
fn members_listed(syncs: &[(u8, Vec<wire::SyncItem>)]) -> Vec<(Member, foca::State)> {
    let items = syncs.iter().flat_map(|(_, items)| items);
    items
        .filter_map(|item| match item {
            wire::SyncItem::Member(member) => Some((member.id().clone(), member.state())),
            _ => None,
        })
        .collect()
}

fn members_in(syncs: &[(u8, Vec<wire::SyncItem>)]) -> usize {
    let items = syncs.iter().flat_map(|(_, items)| items);
    items
        .filter(|item| matches!(item, wire::SyncItem::Member(_)))
        .count()
}

#[test]
fn a_settled_cluster_exchanges_fingerprints_not_tables() {
    let mut net = cluster(5, 69);
    net.run_for(Duration::from_secs(10));
    let counts = std::rc::Rc::new(std::cell::Cell::new((0usize, 0usize)));
    let seen = std::rc::Rc::clone(&counts);
    on_syncs(&mut net, move |items| {
        let (summaries, most_members) = seen.get();
        let members = count(&items, |item| matches!(item, wire::SyncItem::Member(_)));
        let opens = count(&items, |item| {
            matches!(item, wire::SyncItem::Summary { .. })
        });
        seen.set((summaries + opens, most_members.max(members)));
    });
    net.publish(0, "k");
    net.run_for(Duration::from_secs(12));
    let (summaries, most_members) = counts.get();
    // Five nodes, one exchange each every 1 to 3 s.
    assert!(summaries >= 15, "{summaries} exchanges opened");
    // A table would list all five; an exchange of agreeing tables carries only the
    // entries for its two ends.
    assert_eq!(most_members, 2, "agreeing tables were sent");
    assert!(net.converged(5));
}

#[test]
fn differing_fingerprints_bring_both_tables_and_end_there() {
    let mut net = cluster(3, 70);
    let cluster_id = wire::ClusterId::from_name("syncbus");
    let wrong = wire::SyncItem::Summary { fingerprint: 1 };
    let ask = wire::encode_sync(cluster_id, true, &[wrong], 1400).remove(0);
    // Node 0 answers node 1 with its table, itself and its two members, and asks for
    // node 1's in return.
    let answer = syncs_answered(&mut net, 0, addr(1), &ask);
    assert_eq!(members_in(&answer), 3);
    assert_eq!(answer[0].0 & wire::FLAG_ANSWER, wire::FLAG_ANSWER);
    let datagrams = wire::encode_sync(cluster_id, true, &answer[0].1, 1400);
    // Node 1 sends its table without asking again: the exchange ends.
    let last = syncs_answered(&mut net, 1, addr(0), &datagrams[0]);
    assert_eq!(members_in(&last), 3);
    assert!(last.iter().all(|(flags, _)| flags & wire::FLAG_ANSWER == 0));
    assert!(
        syncs_answered(
            &mut net,
            0,
            addr(1),
            &wire::encode_sync(cluster_id, false, &last[0].1, 1400)[0]
        )
        .is_empty()
    );
}

#[test]
fn a_fingerprint_matches_an_agreeing_table_and_not_one_that_learned_a_member() {
    let mut net = cluster(3, 72);
    // Node 1's next opening request to node 0, taken off the network.
    let request = std::rc::Rc::new(std::cell::RefCell::new(None));
    let taken = std::rc::Rc::clone(&request);
    net.filter = Some(Box::new(move |from, to, payload| {
        let (header, body) = wire::read_header(payload).unwrap();
        let opening = header.kind == wire::MessageKind::Sync
            && header.flags & wire::FLAG_ANSWER != 0
            && matches!(
                wire::decode_sync(body).unwrap()[..],
                [wire::SyncItem::Summary { .. }, ..]
            );
        let take = (from, to) == (1, 0) && opening && taken.borrow().is_none();
        if take {
            *taken.borrow_mut() = Some(payload.to_vec());
        }
        take
    }));
    assert!(net.run_until(Duration::from_secs(30), |_| request.borrow().is_some()));
    let request = request.borrow_mut().take().unwrap();
    let answer = syncs_answered(&mut net, 0, addr(1), &request);
    assert_eq!(answer.len(), 1);
    assert_eq!(answer[0].0 & wire::FLAG_ANSWER, 0);
    // The tables agree: only the entries for the two ends come back.
    let node_0 = net.nodes[&0].local().clone();
    let node_1 = net.nodes[&1].local().clone();
    assert_eq!(
        members_listed(&answer),
        [(node_0, foca::State::Alive), (node_1, foca::State::Alive)]
    );
    // Node 0 learns a member node 1 has not heard of: the same request now brings
    // node 0's whole table, asking for node 1's.
    feed(
        &mut net,
        0,
        addr(2),
        &table(false, &[foca::Member::alive(stranger())]),
    );
    let answer = syncs_answered(&mut net, 0, addr(1), &request);
    assert_eq!(members_in(&answer), 4);
    assert_eq!(answer[0].0 & wire::FLAG_ANSWER, wire::FLAG_ANSWER);
}

/// The (origin, newest) pairs the sync datagrams list, in order.
fn progress_in(syncs: &[(u8, Vec<wire::SyncItem>)]) -> Vec<(NodeId, u64)> {
    syncs
        .iter()
        .flat_map(|(_, items)| progress_of(items))
        .collect()
}

fn progress_of(items: &[wire::SyncItem]) -> Vec<(NodeId, u64)> {
    items
        .iter()
        .filter_map(|item| match item {
            wire::SyncItem::Progress { origin, last } => Some((*origin, *last)),
            _ => None,
        })
        .collect()
}

fn count(items: &[wire::SyncItem], wanted: fn(&wire::SyncItem) -> bool) -> usize {
    items.iter().filter(|item| wanted(item)).count()
}

/// Hands `seen` the items of every sync datagram on the network from now on.
fn on_syncs(net: &mut Net, mut seen: impl FnMut(Vec<wire::SyncItem>) + 'static) {
    net.filter = Some(Box::new(move |_, _, payload| {
        let (header, body) = wire::read_header(payload).unwrap();
        if header.kind == wire::MessageKind::Sync {
            seen(wire::decode_sync(body).unwrap());
        }
        false
    }));
}

#[test]
fn progress_travels_only_when_the_progress_fingerprints_differ() {
    let mut net = cluster(3, 88);
    net.publish(0, "a");
    net.publish(2, "b");
    net.run_for(Duration::from_secs(2));
    let request = next_request(&mut net, 1, 0);
    let (_, body) = wire::read_header(&request).unwrap();
    let items = wire::decode_sync(body).unwrap();
    assert!(progress_of(&items).is_empty(), "{items:?}");
    // Both know the same ends of both streams: the answer names none.
    let answer = syncs_answered(&mut net, 0, addr(1), &request);
    assert_eq!(members_in(&answer), 2);
    assert!(progress_in(&answer).is_empty(), "{answer:?}");
    assert_eq!(
        answer[0].0 & wire::FLAG_ANSWER,
        0,
        "nothing more to ask for"
    );
    // Node 0 publishes again: its progress differs from what node 1's request stands
    // for, so its answer lists it whole (its own stream and node 2's) and asks for
    // node 1's in return.
    net.publish(0, "c");
    let answer = syncs_answered(&mut net, 0, addr(1), &request);
    let (origin_0, origin_2) = (net.nodes[&0].local().id, net.nodes[&2].local().id);
    assert_eq!(progress_in(&answer), [(origin_0, 2), (origin_2, 1)]);
    assert_eq!(answer.len(), 1);
    assert_eq!(answer[0].0 & wire::FLAG_ANSWER, wire::FLAG_ANSWER);
    // Node 1 answers with its progress alone: no table, nothing asked.
    let cluster = wire::ClusterId::from_name("syncbus");
    let asking = wire::encode_sync(cluster, true, &answer[0].1, 1400).remove(0);
    let back = syncs_answered(&mut net, 1, addr(0), &asking);
    assert_eq!(members_in(&back), 0);
    assert_eq!(back[0].0 & wire::FLAG_ANSWER, 0);
    assert_eq!(progress_in(&back), [(origin_0, 1), (origin_2, 1)]);
}

#[test]
fn a_node_that_saw_loss_opens_exchanges_with_its_progress_listed() {
    let mut net = cluster(3, 90);
    net.publish(1, "a");
    net.run_for(Duration::from_secs(2));
    let summaries = |request: &[u8]| {
        let (_, body) = wire::read_header(request).unwrap();
        let items = wire::decode_sync(body).unwrap();
        let fingerprints = count(&items, |item| {
            matches!(item, wire::SyncItem::ProgressSummary { .. })
        });
        (fingerprints, progress_of(&items))
    };
    assert_eq!(summaries(&next_request(&mut net, 1, 0)), (1, vec![]));
    // Node 0 asks node 1 for a repair: node 1 has seen loss, and lists its progress
    // in the requests it opens from now on.
    let origin = net.nodes[&1].local().id;
    let cluster_id = wire::ClusterId::from_name("syncbus");
    feed(
        &mut net,
        1,
        addr(0),
        &wire::encode_repair(cluster_id, origin, &[(1, 1)]),
    );
    let lossy = next_request(&mut net, 1, 0);
    assert_eq!(summaries(&lossy), (0, vec![(origin, 1)]));
}

#[test]
fn a_settled_cluster_exchanges_no_progress() {
    let mut net = cluster(5, 89);
    for origin in 0..5 {
        net.publish(origin, "k");
    }
    net.run_for(Duration::from_secs(3));
    let counts = std::rc::Rc::new(std::cell::Cell::new((0usize, 0usize)));
    let seen = std::rc::Rc::clone(&counts);
    on_syncs(&mut net, move |items| {
        let (opened, progress) = seen.get();
        let opens = count(&items, |item| {
            matches!(item, wire::SyncItem::ProgressSummary { .. })
        });
        seen.set((opened + opens, progress + progress_of(&items).len()));
    });
    net.run_for(Duration::from_secs(12));
    let (opened, progress) = counts.get();
    assert!(opened >= 15, "{opened} exchanges opened");
    assert_eq!(progress, 0, "every node knows every stream's end");
}

/// Takes the next opening request from node `from` to node `to` off the network.
fn next_request(net: &mut Net, from: usize, to: usize) -> Vec<u8> {
    let request = std::rc::Rc::new(std::cell::RefCell::new(None));
    let taken = std::rc::Rc::clone(&request);
    net.filter = Some(Box::new(move |sender, receiver, payload| {
        let (header, _) = wire::read_header(payload).unwrap();
        let opening =
            header.kind == wire::MessageKind::Sync && header.flags & wire::FLAG_ANSWER != 0;
        let take = (sender, receiver) == (from, to) && opening && taken.borrow().is_none();
        if take {
            *taken.borrow_mut() = Some(payload.to_vec());
        }
        take
    }));
    assert!(net.run_until(Duration::from_secs(30), |_| request.borrow().is_some()));
    net.filter = None;
    request.borrow_mut().take().unwrap()
}

#[test]
fn a_node_that_missed_gossip_of_its_own_suspicion_hears_it_in_an_exchange() {
    let mut net = cluster(3, 73);
    let request = next_request(&mut net, 2, 0);
    let node_2 = net.nodes[&2].local().clone();
    // Nodes 0 and 1 suspect node 2, and every gossip about it to node 2 is lost.
    let suspicion = table(
        false,
        &[foca::Member::new(node_2.clone(), 0, foca::State::Suspect)],
    );
    feed(&mut net, 0, addr(1), &suspicion);
    feed(&mut net, 1, addr(0), &suspicion);
    net.filter = Some(Box::new(|_, to, _| to == 2));
    // Apart from the entries for the two ends the tables still agree, so node 0
    // answers without its table; its entry for node 2 goes along all the same.
    let answer = syncs_answered(&mut net, 0, addr(2), &request);
    assert_eq!(answer[0].0 & wire::FLAG_ANSWER, 0, "the tables agree");
    assert!(members_listed(&answer).contains(&(node_2, foca::State::Suspect)));
    let cluster_id = wire::ClusterId::from_name("syncbus");
    let synced = net.nodes[&2].stats().member_updates_synced;
    feed(
        &mut net,
        2,
        addr(0),
        &wire::encode_sync(cluster_id, false, &answer[0].1, 1400)[0],
    );
    assert_eq!(net.nodes[&2].stats().member_updates_synced, synced + 1);
    // Node 2 refutes in its next probes, well before the suspicion (about a second
    // in the local preset) turns into a death.
    net.run_for(Duration::from_millis(500));
    for index in [0, 1] {
        assert_eq!(
            net.nodes[&index].debug_entry(addr(2)),
            Some((1, foca::State::Alive)),
            "node {index} did not hear node 2 refute"
        );
    }
}

#[test]
fn an_opening_request_lists_its_sender_and_the_sender_entry_for_the_partner() {
    let mut net = cluster(3, 74);
    let request = next_request(&mut net, 1, 2);
    let (_, body) = wire::read_header(&request).unwrap();
    let items = wire::decode_sync(body).unwrap();
    assert!(matches!(items[0], wire::SyncItem::Summary { .. }));
    let node_1 = net.nodes[&1].local().clone();
    let node_2 = net.nodes[&2].local().clone();
    assert_eq!(
        members_listed(&[(0, items)]),
        [(node_1, foca::State::Alive), (node_2, foca::State::Alive)]
    );
}

#[test]
fn a_death_the_partner_has_no_entry_for_leaves_the_fingerprints_equal() {
    let mut net = cluster(3, 75);
    let request = next_request(&mut net, 1, 0);
    // Node 0 learns of a member and of its death; node 1 never heard of either, so
    // there is nothing in node 0's table for it to take back.
    for update in [
        foca::Member::alive(stranger()),
        foca::Member::down(stranger()),
    ] {
        feed(&mut net, 0, addr(2), &table(false, &[update]));
    }
    let answer = syncs_answered(&mut net, 0, addr(1), &request);
    assert_eq!(answer[0].0 & wire::FLAG_ANSWER, 0, "the tables differ");
    assert_eq!(members_in(&answer), 2);
}

#[test]
fn a_member_whose_probe_failed_is_told_it_is_suspected_and_refutes() {
    let mut net = cluster(3, 81);
    net.run_for(Duration::from_secs(2));
    // Node 2 hears no membership traffic at all, so probes of it fail and no gossip
    // of its suspicion reaches it; only the suspecting prober's notice can.
    let notices = std::rc::Rc::new(std::cell::RefCell::new(0));
    let seen = std::rc::Rc::clone(&notices);
    let membership = wire::MessageKind::Membership as u8;
    net.filter = Some(Box::new(move |_, to, payload| {
        let (header, body) = wire::read_header(payload).unwrap();
        if to == 2 && header.kind == wire::MessageKind::Sync {
            let items = wire::decode_sync(body).unwrap();
            if let [wire::SyncItem::Member(entry)] = &items[..]
                && entry.id().addr == addr(2)
                && entry.state() == foca::State::Suspect
            {
                *seen.borrow_mut() += 1;
            }
        }
        to == 2 && payload.get(3) == Some(&membership)
    }));
    assert!(net.run_until(Duration::from_secs(5), |_| *notices.borrow() > 0));
    // Node 2 refutes with a higher incarnation, which its own probes carry out.
    let refuted = |net: &Net, index: usize| matches!(net.nodes[&index].debug_entry(addr(2)), Some((incarnation, foca::State::Alive)) if incarnation >= 1);
    assert!(net.run_until(Duration::from_secs(1), |n| refuted(n, 0) && refuted(n, 1)));
}

/// Whether `payload`, sent to node 2, is a notice that node 2 is suspected.
fn notice_to_node_2(payload: &[u8]) -> bool {
    let (header, body) = wire::read_header(payload).unwrap();
    if header.kind != wire::MessageKind::Sync {
        return false;
    }
    let items = wire::decode_sync(body).unwrap();
    matches!(&items[..], [wire::SyncItem::Member(entry)]
        if entry.id().addr == addr(2) && entry.state() == foca::State::Suspect)
}

#[test]
fn a_suspect_notice_goes_again_until_the_member_refutes() {
    let mut net = cluster(3, 81);
    net.run_for(Duration::from_secs(2));
    // Node 2 hears no membership traffic, and the first suspect notice each prober
    // sends it is lost: only a repeat can tell it.
    let notices: std::rc::Rc<std::cell::RefCell<BTreeMap<usize, u32>>> = Default::default();
    let seen = std::rc::Rc::clone(&notices);
    let membership = wire::MessageKind::Membership as u8;
    net.filter = Some(Box::new(move |from, to, payload| {
        if to == 2 && notice_to_node_2(payload) {
            let mut seen = seen.borrow_mut();
            let count = seen.entry(from).or_default();
            *count += 1;
            return *count == 1;
        }
        to == 2 && payload.get(3) == Some(&membership)
    }));
    let refuted = |net: &Net, index: usize| matches!(net.nodes[&index].debug_entry(addr(2)), Some((incarnation, foca::State::Alive)) if incarnation >= 1);
    // `local` declares a suspect down after 600 ms; repeats come every 150 ms.
    assert!(net.run_until(Duration::from_secs(5), |n| refuted(n, 0) && refuted(n, 1)));
    assert!(notices.borrow().values().any(|&count| count >= 2));
    // Once node 2 is heard again and its refutation known, no more notices go.
    let seen = std::rc::Rc::clone(&notices);
    net.filter = Some(Box::new(move |from, to, payload| {
        if to == 2 && notice_to_node_2(payload) {
            *seen.borrow_mut().entry(from).or_default() += 1;
        }
        false
    }));
    net.run_for(Duration::from_millis(500));
    let sent = notices.borrow().values().sum::<u32>();
    net.run_for(Duration::from_secs(3));
    assert_eq!(notices.borrow().values().sum::<u32>(), sent);
}

#[test]
fn a_suspected_node_answers_the_member_that_told_it() {
    let mut net = cluster(12, 82);
    let node_2 = net.nodes[&2].local().clone();
    let notice = table(false, &[foca::Member::new(node_2, 0, foca::State::Suspect)]);
    let now = net.now;
    net.node(2).handle_packet(now, addr(0), &notice);
    // Node 2 refutes, and sends node 0 a membership message of its own, which
    // carries the new incarnation whatever becomes of the gossip (in a cluster this
    // size, foca's own gossip of the refutation goes to other members).
    let mut answers = Vec::new();
    while let Some(transmit) = net.node(2).poll_transmit() {
        let (header, _) = wire::read_header(&transmit.payload).unwrap();
        if transmit.destination == addr(0) && header.kind == wire::MessageKind::Membership {
            answers.push(transmit.payload);
        }
    }
    assert!(!answers.is_empty());
    for answer in answers {
        net.node(0).handle_packet(now, addr(2), &answer);
    }
    assert_eq!(
        net.nodes[&0].debug_entry(addr(2)),
        Some((1, foca::State::Alive))
    );
}

#[test]
fn an_answer_after_the_stream_youth_does_not_deliver_early_entries_again() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let mut net = cluster(3, 76);
    let data = wire::MessageKind::Data as u8;
    let digest = wire::MessageKind::Digest as u8;
    // Node 2 gets none of node 0's digests; its first two entries are held back.
    let held: Rc<RefCell<Vec<Vec<u8>>>> = Rc::default();
    let hold = Rc::clone(&held);
    net.filter = Some(Box::new(move |from, to, payload| {
        if (from, to) == (0, 2) && payload.get(3) == Some(&data) {
            hold.borrow_mut().push(payload.to_vec());
            return true;
        }
        (from, to) == (0, 2) && payload.get(3) == Some(&digest)
    }));
    net.publish(0, "a");
    net.run_for(Duration::from_millis(500));
    net.publish(0, "b");
    net.run_for(Duration::from_millis(500));
    lose(&mut net, (0, 2), &[wire::MessageKind::Digest]);
    net.publish(0, "c");
    net.run_for(Duration::from_millis(100));
    // The stream starts at "c"; "b" arrives late, while the stream is young, and is
    // delivered; "a" arrives after its youth.
    let held = held.borrow().clone();
    net.deliver(addr(0), addr(2), &held[1]);
    net.run_for(Duration::from_millis(2500));
    net.deliver(addr(0), addr(2), &held[0]);
    // Node 2 asks where it starts: "a" is repaired, "b" is not delivered twice.
    net.filter = None;
    net.run_for(Duration::from_secs(30));
    assert_eq!(net.keys_at(2), ["c", "b", "a"]);
    assert!(!net.resyncs.contains_key(&2));
}

#[test]
fn a_joiner_that_lost_the_first_digest_of_its_own_gets_the_next_without_a_resync() {
    let start = |net: &mut Net, index: usize, seeds: &[usize]| {
        let mut config = config(index, seeds);
        // Exchanges as on a LAN: too rare to tell the joiner in time.
        config.membership.sync_interval = Duration::from_secs(10);
        net.start(index, config);
    };
    let mut net = Net::new(80);
    for index in 0..3 {
        start(&mut net, index, if index == 0 { &[] } else { &[0] });
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.converged(3)));
    for key in ["a", "b", "c"] {
        net.publish(0, key);
    }
    net.run_for(Duration::from_secs(5));
    // The first digest node 0 sends the joiner is lost.
    let digest = wire::MessageKind::Digest as u8;
    let mut lost = false;
    net.filter = Some(Box::new(move |from, to, payload| {
        let lose = !lost && (from, to) == (0, 3) && payload.get(3) == Some(&digest);
        lost |= lose;
        lose
    }));
    start(&mut net, 3, &[1]);
    joiner_gets_only_what_follows(&mut net, Duration::from_secs(30));
}

#[test]
fn origins_that_never_answer_cannot_keep_every_ask() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let size = 20;
    let mut net = cluster(size, 81);
    let origins = by_id(&net, 1..size);
    // Twice as many silent origins, all first in id order, as node 0 asks per interval
    // about unanchored streams.
    let asks = crate::node::UNANCHORED_ASKS_PER_INTERVAL as usize * 2;
    let silent: BTreeSet<usize> = origins[..asks].iter().map(|&(_, i)| i).collect();
    let answering: BTreeSet<usize> = origins[asks..].iter().map(|&(_, i)| i).collect();
    assert!(!answering.is_empty());
    // Node 0 loses every origin's first entry, then gets the second and no digest
    // saying where its part starts.
    let digest = wire::MessageKind::Digest as u8;
    let data = wire::MessageKind::Data as u8;
    net.filter = Some(Box::new(move |_, to, payload| {
        to == 0 && [Some(&digest), Some(&data)].contains(&payload.get(3))
    }));
    for origin in 1..size {
        net.publish(origin, &format!("first{origin}"));
    }
    net.run_for(Duration::from_millis(50));
    net.filter = Some(Box::new(move |_, to, payload| {
        to == 0 && payload.get(3) == Some(&digest)
    }));
    for origin in 1..size {
        net.publish(origin, &format!("k{origin}"));
    }
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.keys_at(0).len(), size - 1);
    // The silent ones never answer; note whom node 0 asks among the others.
    let asked = Rc::new(RefCell::new(BTreeSet::new()));
    let noted = Rc::clone(&asked);
    let repair = wire::MessageKind::Repair as u8;
    let others = answering.clone();
    net.filter = Some(Box::new(move |from, to, payload| {
        let kind = payload.get(3).copied();
        if from == 0 && others.contains(&to) && kind == Some(repair) {
            noted.borrow_mut().insert(to);
        }
        to == 0 && silent.contains(&from) && kind == Some(digest)
    }));
    let every_one_asked = net.run_until(Duration::from_secs(60), |_| *asked.borrow() == answering);
    assert!(
        every_one_asked,
        "asked only {:?} of {answering:?}",
        asked.borrow()
    );
    assert!(!net.resyncs.contains_key(&0));
}

#[test]
fn an_origin_never_heard_is_asked_while_unanchored_streams_wait() {
    let size = 20;
    let mut net = cluster(size, 82);
    let origins = by_id(&net, 1..size);
    // Enough silent origins, first in id order, to spend every ask of an interval on
    // streams that never learn where they start.
    let asks = crate::node::START_ASKS_PER_INTERVAL as usize;
    let silent: BTreeSet<usize> = origins[..asks].iter().map(|&(_, i)| i).collect();
    let (hidden_id, hidden) = origins[asks];
    let digest = wire::MessageKind::Digest as u8;
    // Node 0 never hears a word of the hidden origin's stream, directly or through a
    // relay, nor a digest from the silent ones.
    let quiet = silent.clone();
    net.filter = Some(Box::new(move |from, to, payload| {
        let silenced = payload.get(3) == Some(&digest) && quiet.contains(&from);
        to == 0 && (silenced || stream_of(payload) == Some(hidden_id))
    }));
    for &origin in &silent {
        net.publish(origin, &format!("k{origin}"));
    }
    net.publish(hidden, "hidden");
    net.run_for(Duration::from_secs(30));
    assert!(!net.keys_at(0).contains(&"hidden".to_owned()));
    // From now on only an ask of node 0's own, prompted by a peer's progress naming the
    // hidden origin, can tell it the stream exists.
    net.filter = Some(Box::new(move |from, to, payload| {
        to == 0 && payload.get(3) == Some(&digest) && silent.contains(&from)
    }));
    let repaired = net.run_until(Duration::from_secs(60), |n| {
        n.keys_at(0).contains(&"hidden".to_owned())
    });
    assert!(repaired, "node 0 never asked the origin it never heard");
}

/// The origin whose stream a data or digest datagram carries.
fn stream_of(datagram: &[u8]) -> Option<NodeId> {
    let (header, body) = wire::read_header(datagram).ok()?;
    match header.kind {
        wire::MessageKind::Data => {
            let body = wire::data_body(&header, body).ok()?;
            wire::decode_batch(&body).ok().map(|batch| batch.origin)
        }
        wire::MessageKind::Digest => wire::decode_digest(body).ok().map(|d| d.origin),
        _ => None,
    }
}

/// The nodes of `indices` by node id: (id, index), lowest id first.
fn by_id(net: &Net, indices: std::ops::Range<usize>) -> Vec<(NodeId, usize)> {
    let mut nodes: Vec<(NodeId, usize)> = indices
        .map(|index| (net.nodes[&index].local().id, index))
        .collect();
    nodes.sort();
    nodes
}
