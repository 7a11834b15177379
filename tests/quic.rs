//! The mesh over QUIC with mutual TLS, on loopback: three nodes in three zones join,
//! deliver and acknowledge across zones; a node whose certificate another authority
//! signed stays out; bad certificate files are configuration errors.
#![cfg(feature = "quic")]

mod support;

use std::path::Path;
use std::time::Duration;

use support::tls::Authority;
use support::{eventually, local_config, wait_for_peers, within};
use syncbus::{Bus, Error, MeshBus, MeshConfig, PublishOptions, QuicConfig};

fn over_quic(zone: &str, seeds: &[std::net::SocketAddr], quic: QuicConfig) -> MeshConfig {
    let mut config = local_config(zone, seeds);
    config.quic = Some(quic);
    config
}

#[tokio::test]
async fn three_nodes_over_quic_deliver_and_acknowledge_across_zones() {
    let authority = Authority::new("ok");
    let a = MeshBus::bind(over_quic("a", &[], authority.node("a")))
        .await
        .unwrap();
    let seed = [a.local_addr()];
    let b = MeshBus::bind(over_quic("b", &seed, authority.node("b")))
        .await
        .unwrap();
    let c = MeshBus::bind(over_quic("c", &seed, authority.node("c")))
        .await
        .unwrap();
    for node in [&a, &b, &c] {
        wait_for_peers(node, |peers| peers.len() == 2).await;
    }
    let mut subs = vec![
        b.subscribe("order:1").await.unwrap(),
        c.subscribe("order:1").await.unwrap(),
    ];
    let options = || PublishOptions::default().timeout(Duration::from_secs(5));
    let acked = a
        .publish_and_await_topology("order:1", 2, options())
        .await
        .unwrap();
    assert_eq!(acked.zones.len(), 2, "{acked:?}");
    for sub in &mut subs {
        let event = within("delivery", sub.recv()).await.unwrap();
        assert_eq!(event.key, "order:1");
    }
    let acked = c.publish_and_await("order:2", 2, options()).await.unwrap();
    assert_eq!(acked.replicas, 2);
    // Datagrams stay within the MTU floor, and nothing was refused.
    assert!(a.limits().max_entry_len < 1200 - 64, "{:?}", a.limits());
    for node in [&a, &b, &c] {
        assert_eq!(
            node.metrics().dropped.total(),
            0,
            "{:?}",
            node.metrics().dropped
        );
    }
    for node in [&a, &b, &c] {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_node_with_a_certificate_from_another_authority_stays_out() {
    let (ours, theirs) = (Authority::new("ours"), Authority::new("theirs"));
    let a = MeshBus::bind(over_quic("a", &[], ours.node("a")))
        .await
        .unwrap();
    // A certificate the cluster does not trust, though it trusts the cluster's.
    let mut stranger = theirs.node("stranger");
    stranger.trust = ours.ca_file.clone();
    let outsider = MeshBus::bind(over_quic("x", &[a.local_addr()], stranger))
        .await
        .unwrap();
    // It keeps trying to join; the handshakes fail, and nobody counts it a member.
    eventually("a few announcements", || {
        outsider.metrics().datagrams_sent >= 3
    })
    .await;
    assert!(a.peers().is_empty());
    assert!(outsider.peers().is_empty());
    assert!(!outsider.is_healthy());
}

#[tokio::test]
async fn a_certificate_of_the_right_authority_for_another_name_stays_out() {
    let authority = Authority::new("names");
    let a = MeshBus::bind(over_quic("a", &[], authority.node("a")))
        .await
        .unwrap();
    // Signed by the trusted authority, but for another service: it dials, so its
    // name is the one TLS itself does not check.
    let other = authority.node_named("other", "billing.example");
    let outsider = MeshBus::bind(over_quic("x", &[a.local_addr()], other))
        .await
        .unwrap();
    eventually("a few announcements", || {
        outsider.metrics().datagrams_sent >= 3
    })
    .await;
    assert!(a.peers().is_empty(), "{:?}", a.peers());
    assert!(outsider.peers().is_empty());
    let published = outsider
        .publish_and_await(
            "victim",
            1,
            PublishOptions::default().timeout(Duration::from_millis(300)),
        )
        .await;
    assert!(published.is_err(), "{published:?}");
}

#[tokio::test]
async fn a_dual_stack_node_and_ipv4_peers_form_a_cluster() {
    let authority = Authority::new("dual");
    let mut config = over_quic("a", &[], authority.node("a"));
    config.bind = "[::]:0".parse().unwrap();
    config.advertise = Some("127.0.0.1:0".parse().unwrap());
    let a = MeshBus::bind(config).await.unwrap();
    let seed = std::net::SocketAddr::new([127, 0, 0, 1].into(), a.local_addr().port());
    let b = MeshBus::bind(over_quic("b", &[seed], authority.node("b")))
        .await
        .unwrap();
    for node in [&a, &b] {
        wait_for_peers(node, |peers| peers.len() == 1).await;
    }
    let acked = b
        .publish_and_await(
            "k",
            1,
            PublishOptions::default().timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert_eq!(acked.replicas, 1);
}

async fn config_error(config: MeshConfig) -> String {
    match MeshBus::bind(config).await {
        Err(Error::InvalidConfig(error)) => error.to_string(),
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("expected a config error"),
    }
}

#[tokio::test]
async fn bad_certificate_files_are_config_errors_naming_the_field() {
    let authority = Authority::new("bad");
    let good = authority.node("good");
    let missing = Path::new("/nonexistent/syncbus/cert.pem");
    let mut config = good.clone();
    config.cert_chain = missing.to_owned();
    let error = config_error(over_quic("a", &[], config)).await;
    assert!(error.contains("quic.cert_chain"), "{error}");

    let garbage = authority.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a PEM file").unwrap();
    let mut config = good.clone();
    config.trust = garbage.clone();
    let error = config_error(over_quic("a", &[], config)).await;
    assert!(error.contains("quic.trust"), "{error}");

    let mut config = good.clone();
    config.private_key = garbage;
    let error = config_error(over_quic("a", &[], config)).await;
    assert!(error.contains("quic.private_key"), "{error}");

    for floor in [1000, 1199, 9001, 65535] {
        let mut config = good.clone();
        config.mtu_floor = floor;
        let error = config_error(over_quic("a", &[], config)).await;
        assert!(error.contains("quic.mtu_floor"), "{floor}: {error}");
    }
    let mut config = good.clone();
    config.server_name = "not a name!".into();
    let error = config_error(over_quic("a", &[], config)).await;
    assert!(error.contains("quic.server_name"), "{error}");

    let mut with_multicast = over_quic("a", &[], good);
    with_multicast.multicast = Some(syncbus::MulticastDiscovery::new(
        "239.255.0.1:7947".parse().unwrap(),
        std::net::Ipv4Addr::LOCALHOST,
    ));
    let error = config_error(with_multicast).await;
    assert!(error.contains("multicast"), "{error}");
}
