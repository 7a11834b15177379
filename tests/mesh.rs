//! MeshBus nodes in one process, talking over real UDP sockets on loopback.

mod support;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use support::{eventually, free_port, local_config, wait_for_peers, within};
use syncbus::{Bus, Error, EventKind, MeshBus, MeshConfig, MulticastDiscovery, PublishOptions};
use syncbus_mesh::wire;

async fn cluster(zones: &[&str]) -> Vec<MeshBus> {
    let seed = MeshBus::bind(local_config(zones[0], &[])).await.unwrap();
    let seed_addr = seed.local_addr();
    let mut nodes = vec![seed];
    for zone in &zones[1..] {
        nodes.push(
            MeshBus::bind(local_config(zone, &[seed_addr]))
                .await
                .unwrap(),
        );
    }
    let others = zones.len() - 1;
    for node in &nodes {
        wait_for_peers(node, |peers| peers.len() == others).await;
    }
    nodes
}

#[tokio::test]
async fn five_nodes_converge_and_deliver_to_everyone() {
    let nodes = cluster(&["a", "a", "b", "b", "c"]).await;
    let zones: BTreeSet<String> = nodes[0]
        .peers()
        .iter()
        .filter_map(|p| p.zone.as_ref().map(ToString::to_string))
        .collect();
    assert_eq!(zones, BTreeSet::from(["a".into(), "b".into(), "c".into()]));
    assert!(nodes.iter().all(|n| n.is_healthy()));

    let mut subs = Vec::new();
    for node in &nodes {
        subs.push(node.subscribe_prefix("item:").await.unwrap());
    }
    let keys: Vec<String> = (0..500).map(|i| format!("item:{i}")).collect();
    for key in &keys {
        nodes[2]
            .publish(key, PublishOptions::default())
            .await
            .unwrap();
    }
    for (index, sub) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < keys.len() {
            let event = within("delivery", sub.recv()).await.unwrap();
            assert_eq!(event.kind, EventKind::Invalidate, "node {index}: {event:?}");
            assert_eq!(event.origin, Some(nodes[2].node_id()));
            assert_eq!(
                event.zone.as_ref().map(ToString::to_string).as_deref(),
                Some("b")
            );
            got.push(event.key);
        }
        assert_eq!(
            got.iter().collect::<BTreeSet<_>>(),
            keys.iter().collect(),
            "node {index}"
        );
    }
    let metrics = nodes[0].metrics();
    assert_eq!(metrics.delivered, 500);
    assert_eq!(metrics.resyncs, 0);
    assert_eq!(nodes[2].metrics().published, 500);
}

#[tokio::test]
async fn a_node_started_before_its_seed_joins_when_the_seed_starts() {
    let seed_addr = free_port();
    let early = MeshBus::bind(local_config("a", &[seed_addr]))
        .await
        .unwrap();
    assert!(!early.is_healthy(), "alone with seeds is not healthy");

    let mut seed_config = local_config("b", &[]);
    seed_config.bind = seed_addr;
    let seed = MeshBus::bind(seed_config).await.unwrap();
    wait_for_peers(&early, |peers| peers.len() == 1).await;
    wait_for_peers(&seed, |peers| peers.len() == 1).await;
    assert!(early.is_healthy());
}

#[tokio::test]
async fn a_node_that_shuts_down_is_seen_gone() {
    let nodes = cluster(&["a", "b", "c"]).await;
    let leaving = nodes[2].node_id();
    let mut sub = nodes[2].subscribe("k").await.unwrap();
    nodes[2].shutdown().await.unwrap();
    for node in &nodes[..2] {
        wait_for_peers(node, |peers| peers.iter().all(|p| p.id != leaving)).await;
    }
    assert_eq!(within("end of stream", sub.recv()).await, None);
    assert!(!nodes[2].is_healthy());
    assert!(matches!(
        nodes[2].publish("k", PublishOptions::default()).await,
        Err(Error::Closed)
    ));
    nodes[2].shutdown().await.unwrap();
}

/// Binds `config`, expecting a configuration error about `field`; returns its message.
async fn config_error(config: MeshConfig, field: &str) -> String {
    let error = MeshBus::bind(config).await.err().expect("a config error");
    assert!(
        matches!(&error, Error::InvalidConfig(e) if e.field == field),
        "{error}"
    );
    error.to_string()
}

#[tokio::test]
async fn unreachable_and_clashing_addresses_are_config_errors() {
    let unspecified = MeshConfig::new("0.0.0.0:0".parse().unwrap());
    config_error(unspecified, "advertise").await;

    let mut zero_advertise = local_config("a", &[]);
    zero_advertise.advertise = Some("0.0.0.0:7000".parse().unwrap());
    config_error(zero_advertise, "advertise").await;

    // The scope id of a link-local address does not travel to peers.
    let mut scoped = local_config("a", &[]);
    scoped.advertise = Some("[fe80::1%2]:7000".parse().unwrap());
    let error = config_error(scoped, "advertise").await;
    assert!(error.contains("scope id"), "{error}");

    let first = MeshBus::bind(local_config("a", &[])).await.unwrap();
    let mut clash = local_config("a", &[]);
    clash.bind = first.local_addr();
    let error = config_error(clash, "bind").await;
    assert!(error.contains("already in use"), "{error}");

    let mut not_multicast = local_config("a", &[]);
    let group = "127.0.0.1:7947".parse().unwrap();
    not_multicast.multicast = Some(MulticastDiscovery::new(group, Ipv4Addr::LOCALHOST));
    config_error(not_multicast, "multicast.group").await;

    let mut bad_datagram = local_config("a", &[]);
    bad_datagram.max_datagram_size = 100;
    config_error(bad_datagram, "max_datagram_size").await;
}

#[tokio::test]
async fn oversized_keys_are_refused_before_sending() {
    let node = MeshBus::bind(local_config("a", &[])).await.unwrap();
    let key = "k".repeat(node.limits().max_key_len + 1);
    let error = node
        .publish(&key, PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::KeyTooLarge { max: 512, .. }),
        "{error}"
    );
    assert_eq!(node.metrics().published, 0);
}

#[tokio::test]
async fn garbage_is_counted_and_the_node_keeps_serving() {
    let nodes = cluster(&["a", "b"]).await;
    let target: SocketAddr = nodes[1].local_addr();
    let attacker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // A well-formed datagram of another cluster, and a copy damaged on the way.
    let mut foreign = Vec::new();
    wire::write_header(&mut foreign, wire::MessageKind::Data, wire::ClusterId(42));
    foreign.extend_from_slice(&[1, 2, 3]);
    let foreign = wire::checksummed(foreign).to_vec();
    let mut damaged = wire::checksummed({
        let mut ours = Vec::new();
        wire::write_header(
            &mut ours,
            wire::MessageKind::Data,
            wire::ClusterId::from_name("syncbus"),
        );
        ours.extend_from_slice(&[1, 2, 3]);
        ours
    })
    .to_vec();
    damaged[wire::HEADER_LEN] ^= 0x40;
    let garbage: [&[u8]; 5] = [
        b"not syncbus at all",
        b"SB",
        &foreign,
        &damaged,
        &[0u8; 3000],
    ];
    for datagram in garbage {
        attacker.send_to(datagram, target).unwrap();
    }
    let mut sub = nodes[1].subscribe("after").await.unwrap();
    nodes[0]
        .publish("after", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(within("delivery", sub.recv()).await.unwrap().key, "after");
    let dropped = nodes[1].metrics().dropped;
    assert_eq!(dropped.bad_magic, 1);
    assert_eq!(dropped.truncated, 1);
    assert_eq!(dropped.wrong_cluster, 1);
    assert_eq!(dropped.corrupt, 1);
    assert_eq!(dropped.oversize, 1);
}

#[tokio::test]
async fn nodes_of_other_clusters_never_join() {
    let prod = MeshBus::bind(local_config("a", &[])).await.unwrap();
    let mut staging_config = local_config("a", &[prod.local_addr()]);
    staging_config.cluster = "staging".into();
    let staging = MeshBus::bind(staging_config).await.unwrap();
    // Staging keeps announcing to prod; prod drops every announcement.
    eventually("three foreign announcements dropped", || {
        prod.metrics().dropped.wrong_cluster >= 3
    })
    .await;
    assert!(prod.peers().is_empty() && staging.peers().is_empty());
    assert!(!staging.is_healthy());
}

#[tokio::test]
async fn nodes_find_each_other_by_multicast() {
    // A group and port of this test's own, so parallel runs do not meet.
    let port = free_port().port();
    let group =
        std::net::SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, (port % 250) as u8 + 1), port);
    let mut configs = Vec::new();
    for zone in ["a", "b"] {
        let mut config = local_config(zone, &[]);
        let mut discovery = MulticastDiscovery::new(group, Ipv4Addr::LOCALHOST);
        discovery.interval = std::time::Duration::from_millis(100);
        config.multicast = Some(discovery);
        configs.push(config);
    }
    let a = MeshBus::bind(configs.remove(0)).await.unwrap();
    let b = MeshBus::bind(configs.remove(0)).await.unwrap();
    wait_for_peers(&a, |peers| peers.iter().any(|p| p.id == b.node_id())).await;
    wait_for_peers(&b, |peers| peers.iter().any(|p| p.id == a.node_id())).await;
}

#[tokio::test]
async fn awaited_publishes_count_remote_replicas_and_zones() {
    let nodes = cluster(&["a", "a", "b", "b", "c"]).await;
    let options = PublishOptions::default;
    let acked = nodes[0]
        .publish_and_await("k1", 4, options())
        .await
        .unwrap();
    assert_eq!(acked.replicas, 4);
    assert_eq!(acked.zones.len(), 3);
    assert!(
        !acked.nodes.contains(&nodes[0].node_id()),
        "the publisher never counts itself"
    );

    let acked = nodes[0]
        .publish_and_await_topology("k2", 3, options())
        .await
        .unwrap();
    assert!(acked.zones.len() >= 3, "{acked:?}");

    let error = nodes[0]
        .publish_and_await("k3", 5, options())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::QuorumNotSatisfied {
                acked: 0,
                required: 5,
                available: 4,
                ..
            }
        ),
        "{error}"
    );
    let error = nodes[0]
        .publish_and_await_topology("k4", 4, options())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::QuorumNotSatisfied {
                required: 4,
                available: 3,
                ..
            }
        ),
        "{error}"
    );

    let past = std::time::Instant::now() - std::time::Duration::from_millis(1);
    let error = nodes[0]
        .publish_and_await("k5", 1, options().deadline(past))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout), "{error}");
    let metrics = nodes[0].metrics();
    assert_eq!(metrics.published, 2, "refused goals published nothing");
    assert!(metrics.acknowledged >= 7);
}

#[tokio::test]
async fn under_twenty_percent_loss_nothing_is_lost_silently() {
    let zones = ["a", "a", "b", "b", "c"];
    let seed = MeshBus::bind(lossy(local_config(zones[0], &[])))
        .await
        .unwrap();
    let seed_addr = seed.local_addr();
    let mut nodes = vec![seed];
    for zone in &zones[1..] {
        nodes.push(
            MeshBus::bind(lossy(local_config(zone, &[seed_addr])))
                .await
                .unwrap(),
        );
    }
    for node in &nodes {
        wait_for_peers(node, |peers| peers.len() == 4).await;
    }
    let mut subs = Vec::new();
    for node in &nodes {
        subs.push(node.subscribe_prefix("lossy:").await.unwrap());
    }
    let mut published = BTreeSet::new();
    for i in 0..300 {
        let key = format!("lossy:{i}");
        nodes[i % 5]
            .publish(&key, PublishOptions::default())
            .await
            .unwrap();
        published.insert(key);
    }
    for (index, sub) in subs.iter_mut().enumerate() {
        let mut got = BTreeSet::new();
        let mut resynced = BTreeSet::new();
        // Everything arrives, or every origin whose entries are missing said so.
        let settled = |got: &BTreeSet<String>, resynced: &BTreeSet<_>| {
            got.len() == published.len() || !resynced.is_empty()
        };
        while !settled(&got, &resynced) {
            let event = within("delivery or resync", sub.recv()).await.unwrap();
            match event.kind {
                EventKind::Invalidate => drop(got.insert(event.key)),
                _ => drop(resynced.insert(event.origin)),
            }
        }
        if resynced.is_empty() {
            assert_eq!(got, published, "node {index}");
        }
    }
    let repaired: u64 = nodes.iter().map(|n| n.metrics().retransmitted).sum();
    let dropped: u64 = nodes.iter().map(|n| n.metrics().injected_drops).sum();
    assert!(
        dropped > 0 && repaired > 0,
        "dropped {dropped}, repaired {repaired}"
    );
}

fn lossy(mut config: MeshConfig) -> MeshConfig {
    config.inbound_loss = 0.2;
    config
}

#[tokio::test]
async fn try_publish_says_when_the_queue_is_full() {
    let mut config = local_config("a", &[]);
    config.publish_queue = 1;
    let node = MeshBus::bind(config).await.unwrap();
    // A current-thread runtime: the node's task cannot drain the queue in between.
    // A publish that finds the node idle skips the queue; the first queued one makes
    // the rest queue behind it, so the queue of one is full at the second at most.
    let mut refused = None;
    for i in 0..1_000 {
        if let Err(error) = node.try_publish(&format!("k{i}"), PublishOptions::default()) {
            refused = Some(error);
            break;
        }
    }
    let error = refused.expect("the queue never filled");
    assert!(matches!(error, Error::QueueFull), "{error}");
    node.publish("last", PublishOptions::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_returns_everything_is_refused() {
    for _ in 0..50 {
        let node = MeshBus::bind(local_config("a", &[])).await.unwrap();
        node.publish("queued", PublishOptions::default())
            .await
            .unwrap();
        node.shutdown().await.unwrap();
        assert!(!node.is_healthy());
        assert!(matches!(node.subscribe("k").await, Err(Error::Closed)));
        assert!(matches!(
            node.publish("k", PublishOptions::default()).await,
            Err(Error::Closed)
        ));
        assert_eq!(
            node.metrics().published,
            1,
            "the queued publish went out first"
        );
    }
}

#[tokio::test]
async fn subscriptions_beyond_the_key_limit_are_refused() {
    let node = MeshBus::bind(local_config("a", &[])).await.unwrap();
    let error = node.subscribe(&"k".repeat(513)).await.unwrap_err();
    assert!(
        matches!(error, Error::KeyTooLarge { len: 513, max: 512 }),
        "{error}"
    );
}

#[tokio::test]
async fn seeds_of_another_address_family_are_config_errors() {
    let mut config = MeshConfig::new("[::1]:0".parse().unwrap());
    config.seeds = vec!["127.0.0.1:7946".parse().unwrap()];
    config_error(config, "seeds").await;
}

#[tokio::test]
async fn a_slow_subscriber_gets_a_resync_and_delays_nobody() {
    let nodes = cluster(&["a", "b"]).await;
    let mut slow_config = local_config("b", &[nodes[0].local_addr()]);
    slow_config.subscriber_capacity = 8;
    let receiver = MeshBus::bind(slow_config).await.unwrap();
    wait_for_peers(&receiver, |peers| peers.len() == 2).await;
    wait_for_peers(&nodes[0], |peers| peers.len() == 2).await;
    let mut slow = receiver.subscribe_prefix("burst:").await.unwrap();
    let mut fast = receiver.subscribe_prefix("burst:").await.unwrap();
    let mut elsewhere = nodes[1].subscribe_prefix("burst:").await.unwrap();
    for i in 0..100 {
        nodes[0]
            .publish(&format!("burst:{i}"), PublishOptions::default())
            .await
            .unwrap();
        // The fast subscriber keeps up; the slow one reads nothing yet.
        assert_eq!(
            within("fast delivery", fast.recv()).await.unwrap().key,
            format!("burst:{i}")
        );
        assert_eq!(
            within("other node", elsewhere.recv()).await.unwrap().key,
            format!("burst:{i}")
        );
    }
    for i in 0..8 {
        assert_eq!(slow.recv().await.unwrap().key, format!("burst:{i}"));
    }
    let resync = slow.recv().await.unwrap();
    assert_eq!(
        resync.kind,
        EventKind::Resync(syncbus::ResyncReason::Overflow)
    );
    assert_eq!(receiver.metrics().overflowed, 92);
}

#[tokio::test]
async fn dropping_an_awaited_publish_frees_its_tracking_and_still_publishes() {
    let mut configs = Vec::new();
    for zone in ["a", "b"] {
        // Slow failure detection: the silent node stays a member during the test.
        let mut config = local_config(zone, &[]);
        config.membership = syncbus::MembershipConfig::lan();
        configs.push(config);
    }
    let publisher = MeshBus::bind(configs.remove(0)).await.unwrap();
    let mut silent_config = configs.remove(0);
    silent_config.seeds = vec![publisher.local_addr()];
    let silent = MeshBus::bind(silent_config).await.unwrap();
    wait_for_peers(&publisher, |peers| peers.len() == 1).await;
    wait_for_peers(&silent, |peers| peers.len() == 1).await;
    silent.set_inbound_loss(1.0).await.unwrap();
    // The loss setting is applied by the node's task; wait until it drops datagrams.
    publisher
        .publish("probe", PublishOptions::default())
        .await
        .unwrap();
    eventually("the silent node drops", || {
        silent.metrics().injected_drops > 0
    })
    .await;

    let waiting = publisher.publish_and_await("k", 1, PublishOptions::default());
    let mut waiting = Box::pin(waiting);
    // Poll once so the request reaches the node, then wait until it is tracked.
    let first_poll = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(waiting.as_mut(), cx).is_pending())
    });
    assert!(first_poll.await, "nothing can acknowledge yet");
    eventually("the await is tracked", || {
        publisher.metrics().awaits_in_flight == 1
    })
    .await;
    drop(waiting);
    eventually("the await is forgotten", || {
        publisher.metrics().awaits_in_flight == 0
    })
    .await;
    assert_eq!(
        publisher.metrics().published,
        2,
        "the invalidation itself went out"
    );
}

#[tokio::test]
async fn a_multicast_group_that_cannot_be_joined_is_a_config_error() {
    let mut config = local_config("a", &[]);
    let group = "239.255.77.1:7947".parse().unwrap();
    // 192.0.2.1 (TEST-NET-1) is an address of no interface here: joining on it fails.
    // Nothing is sent; the join is a socket option.
    let not_ours = Ipv4Addr::new(192, 0, 2, 1);
    config.multicast = Some(MulticastDiscovery::new(group, not_ours));
    let error = config_error(config, "multicast").await;
    assert!(error.contains("cannot"), "{error}");
}

/// A current-thread runtime: the node's task cannot run while the test does not await,
/// so what happened before the next await was done by `publish` itself.
#[tokio::test]
async fn a_publish_on_an_idle_node_leaves_from_the_callers_task() {
    let nodes = cluster(&["a", "b"]).await;
    let mut local = nodes[0].subscribe("k").await.unwrap();
    let mut remote = nodes[1].subscribe("k").await.unwrap();
    let sent_before = nodes[0].metrics().datagrams_sent;
    nodes[0]
        .publish("k", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(local.try_recv().unwrap().key, "k");
    assert!(nodes[0].metrics().datagrams_sent > sent_before);
    let event = within("remote delivery", remote.recv()).await.unwrap();
    assert_eq!(event.key, "k");
}

/// Runs of publishes after a pause: the first of each run finds the node idle and goes
/// straight from the caller, the rest queue for the node's task behind it. Receivers
/// get every key once, in publish order, with nothing to repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_queued_publishes_arrive_in_order() {
    let nodes = cluster(&["a", "b"]).await;
    let mut remote = nodes[1].subscribe_prefix("k").await.unwrap();
    let keys: Vec<String> = (0..3_000).map(|i| format!("k{i:05}")).collect();
    let expected = keys.len();
    let receiving = tokio::spawn(async move {
        let mut got = Vec::with_capacity(expected);
        while got.len() < expected {
            let event = within("delivery", remote.recv()).await.unwrap();
            assert_eq!(event.kind, EventKind::Invalidate, "{event:?}");
            got.push(event.key);
        }
        got
    });
    for run in keys.chunks(100) {
        for key in run {
            nodes[0]
                .publish(key, PublishOptions::default())
                .await
                .unwrap();
        }
        // Pacing, not synchronisation: lets the node fall idle between runs.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(receiving.await.unwrap(), keys);
    let metrics = nodes[1].metrics();
    assert_eq!((metrics.resyncs, metrics.repairs_requested), (0, 0));
}

/// A thread that looks at the peer list while a member joins, and publishes before it
/// lets go: the node's task waits to replace the list, but must not hold anything the
/// publish needs meanwhile.
#[test]
fn a_publish_while_holding_the_peer_list_during_a_join_returns() {
    use std::sync::mpsc;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let a = runtime
        .block_on(MeshBus::bind(local_config("a", &[])))
        .unwrap();
    let (held, is_held) = mpsc::channel();
    let (go, wait_for_go) = mpsc::channel::<()>();
    let (done, is_done) = mpsc::channel();
    let looker = a.clone();
    std::thread::spawn(move || {
        let peers = looker.watch_peers();
        let list = peers.borrow();
        held.send(()).unwrap();
        wait_for_go.recv().unwrap();
        let published = looker.try_publish("k", PublishOptions::default());
        drop(list);
        done.send(published).unwrap();
    });
    is_held.recv().unwrap();
    let b = runtime
        .block_on(MeshBus::bind(local_config("b", &[a.local_addr()])))
        .unwrap();
    // a's task has taken b's announce once its counters show a datagram; it then
    // replaces the peer list, and waits for the borrow to end.
    let deadline = std::time::Instant::now() + support::DEADLINE;
    while a.metrics().datagrams_received == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a's task never got past b's announce"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    go.send(()).unwrap();
    let published = is_done.recv_timeout(support::DEADLINE);
    assert!(
        matches!(published, Ok(Ok(()))),
        "the publish did not return: {published:?}"
    );
    runtime.block_on(async {
        wait_for_peers(&b, |peers| peers.len() == 1).await;
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    });
}
