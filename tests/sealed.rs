//! Sealed mesh clusters over real UDP on loopback: key rotation in the middle of a
//! publish stream, nodes with the wrong key or none, replayed and forged datagrams.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use support::{eventually, local_config, wait_for_peers, within};
use syncbus::{
    Bus, ClusterKey, Encryption, Error, KeyError, MeshBus, MeshConfig, PublishOptions, SealMode,
};

fn key(byte: u8) -> ClusterKey {
    ClusterKey::from_bytes([byte; 32])
}

fn sealed(zone: &str, seeds: &[SocketAddr], key: ClusterKey) -> MeshConfig {
    let mut config = local_config(zone, seeds);
    config.encryption = Some(Encryption::new(key));
    config
}

async fn sealed_cluster(size: usize, key: &ClusterKey) -> Vec<MeshBus> {
    let first = MeshBus::bind(sealed("z0", &[], key.clone())).await.unwrap();
    let seed = first.local_addr();
    let mut nodes = vec![first];
    for i in 1..size {
        let config = sealed(&format!("z{i}"), &[seed], key.clone());
        nodes.push(MeshBus::bind(config).await.unwrap());
    }
    for node in &nodes {
        wait_for_peers(node, |peers| peers.len() == size - 1).await;
    }
    nodes
}

#[tokio::test]
async fn a_key_rotation_in_the_middle_of_a_publish_stream_loses_nothing() {
    let (old, new) = (key(1), key(2));
    let nodes = sealed_cluster(3, &old).await;
    let mut subs = Vec::new();
    for node in &nodes[1..] {
        subs.push(node.subscribe_prefix("k").await.unwrap());
    }
    let mut published = 0;
    let mut publish_some = async |count: usize| {
        for _ in 0..count {
            let key = format!("k{published}");
            nodes[0]
                .publish(&key, PublishOptions::default())
                .await
                .unwrap();
            published += 1;
        }
    };
    // Each step of the rotation, node by node, between runs of publishes.
    publish_some(100).await;
    for node in &nodes {
        node.install_key(new.clone()).await.unwrap();
        publish_some(50).await;
    }
    for node in nodes.iter().rev() {
        node.use_key(&new).await.unwrap();
        publish_some(50).await;
    }
    for node in &nodes {
        let left = node.remove_key(&old).await.unwrap();
        assert_eq!(left, [new.fingerprint()]);
        publish_some(50).await;
    }
    let total = published;
    for sub in &mut subs {
        let mut keys = BTreeSet::new();
        while keys.len() < total {
            let event = within("an invalidation", sub.recv()).await.unwrap();
            assert!(!event.is_resync(), "{event:?}");
            keys.insert(event.key);
        }
    }
    for node in &nodes {
        let dropped = node.metrics().dropped;
        assert_eq!(
            (dropped.unauthenticated, dropped.replayed, dropped.plaintext),
            (0, 0, 0),
            "{dropped:?}"
        );
        assert_eq!(node.peers().len(), 2);
    }
}

#[tokio::test]
async fn a_node_without_the_key_stays_out_counted_and_never_healthy() {
    let nodes = sealed_cluster(2, &key(1)).await;
    let seed = nodes[0].local_addr();
    let wrong = MeshBus::bind(sealed("z9", &[seed], key(9))).await.unwrap();
    let plain = MeshBus::bind(local_config("z9", &[seed])).await.unwrap();
    eventually("refusals counted", || {
        let dropped = nodes[0].metrics().dropped;
        dropped.unauthenticated >= 2 && dropped.plaintext >= 2
    })
    .await;
    // They announced again and again; nobody let them in, and they know it.
    for outsider in [&wrong, &plain] {
        assert!(outsider.peers().is_empty());
        assert!(!outsider.is_healthy());
    }
    assert_eq!(nodes[0].peers().len(), 1);
    assert!(nodes.iter().all(Bus::is_healthy));
}

#[tokio::test]
async fn replayed_and_forged_datagrams_are_refused_over_udp() {
    let nodes = sealed_cluster(2, &key(1)).await;
    let target = nodes[1].local_addr();
    let mut sub = nodes[1].subscribe_prefix("").await.unwrap();
    // A listener that sees what node 0 sends it would forward to node 1: record the
    // sealed datagrams node 0 sends by making a third sealed node a spy.
    let spy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let wrong_key = MeshBus::bind(sealed("z9", &[spy.local_addr().unwrap()], key(9)))
        .await
        .unwrap();
    // The outsider's announcements, sealed with its own key, land on the spy.
    let mut buffer = vec![0; 2048];
    let (len, _) = within("a datagram", spy.recv_from(&mut buffer))
        .await
        .unwrap();
    let forged = buffer[..len].to_vec();
    spy.send_to(&forged, target).await.unwrap();
    eventually("forgery refused", || {
        nodes[1].metrics().dropped.unauthenticated >= 1
    })
    .await;

    // A datagram of the cluster itself, sent again by someone else: captured by
    // having node 0 talk to the spy as its seed would.
    let insider = MeshBus::bind(sealed("z8", &[spy.local_addr().unwrap()], key(1)))
        .await
        .unwrap();
    let (len, _) = loop {
        let received = within("a datagram", spy.recv_from(&mut buffer))
            .await
            .unwrap();
        if received.1 == insider.local_addr() {
            break received;
        }
    };
    let genuine = buffer[..len].to_vec();
    for _ in 0..2 {
        spy.send_to(&genuine, target).await.unwrap();
    }
    eventually("first copy opened, replay refused", || {
        nodes[1].metrics().dropped.replayed >= 1
    })
    .await;
    nodes[0]
        .publish("still:works", PublishOptions::default())
        .await
        .unwrap();
    let event = within("delivery", sub.recv()).await.unwrap();
    assert_eq!(event.key, "still:works");
    drop((wrong_key, insider));
}

#[tokio::test]
async fn keyring_errors_are_clear() {
    let plain = MeshBus::bind(local_config("z0", &[])).await.unwrap();
    let refused = plain.install_key(key(1)).await;
    assert!(
        matches!(refused, Err(Error::Keyring(KeyError::NoEncryption))),
        "{refused:?}"
    );
    assert_eq!(
        plain.key_fingerprints().await.unwrap(),
        Vec::<String>::new()
    );
    let node = MeshBus::bind(sealed("z0", &[], key(1))).await.unwrap();
    let refused = node.remove_key(&key(1)).await.unwrap_err();
    assert!(refused.to_string().contains("primary"), "{refused}");
    node.set_seal_mode(SealMode::Seal).await.unwrap();
    node.shutdown().await.unwrap();
    assert!(matches!(node.install_key(key(2)).await, Err(Error::Closed)));
}
