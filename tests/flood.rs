//! A node on loopback under a flood of hostile datagrams: it keeps serving its cluster,
//! its memory stays bounded, and every kind of junk is counted as what it is.

mod support;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use support::{eventually, local_config, wait_for_peers, within};
use syncbus::{Bus, ClusterKey, Encryption, MeshBus, MeshConfig, PublishOptions};
use syncbus_mesh::wire::{self, ClusterId, MessageKind};

/// Datagrams of each kind the flood sends.
const PER_KIND: usize = 20_000;

fn sealed(zone: &str, seeds: &[SocketAddr]) -> MeshConfig {
    let mut config = local_config(zone, seeds);
    config.encryption = Some(Encryption::new(ClusterKey::from_bytes([3; 32])));
    // Slower failure detection than `local`: the flood shares two cores with the
    // cluster, and a late probe is not what this test is about.
    config.membership = syncbus::MembershipConfig::lan();
    config
}

/// The junk, one kind at a time, each datagram different: random bytes, truncated
/// headers, well-formed plaintext (refused by a sealed node), sealed-looking datagrams
/// of another cluster, sealed-looking datagrams no key opens, and oversized ones.
fn junk(kind: usize, i: usize) -> Vec<u8> {
    let noise = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|j| (i.wrapping_mul(31).wrapping_add(j * 7) % 251) as u8)
            .collect()
    };
    let cluster = ClusterId::from_name("syncbus");
    match kind {
        0 => {
            let mut random = noise(1 + i % 1200);
            random[0] = b'X';
            random
        }
        1 => [b'S', b'B', wire::VERSION, 2][..i % 4].to_vec(),
        2 => {
            let mut plain = Vec::new();
            wire::write_header(&mut plain, MessageKind::Data, cluster);
            plain.extend_from_slice(&noise(40));
            wire::checksummed(plain).to_vec()
        }
        3 => sealed_looking(ClusterId::from_name("elsewhere"), &noise(200)),
        4 => sealed_looking(cluster, &noise(200 + i % 900)),
        _ => {
            let mut huge = vec![b'S', b'B', wire::VERSION, 2];
            huge.extend_from_slice(&noise(1_500 + i % 2_000));
            huge
        }
    }
}

/// A datagram with a sealed header and a tag that no key produced.
fn sealed_looking(cluster: ClusterId, body: &[u8]) -> Vec<u8> {
    let mut out = vec![b'S', b'B', wire::VERSION, 9, 0];
    out.extend_from_slice(&cluster.0.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Resident memory of this process, in KiB.
fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_node_keeps_serving_counts_every_kind_and_stays_bounded() {
    let a = MeshBus::bind(sealed("a", &[])).await.unwrap();
    let b = MeshBus::bind(sealed("b", &[a.local_addr()])).await.unwrap();
    for node in [&a, &b] {
        wait_for_peers(node, |peers| peers.len() == 1).await;
    }
    let mut sub = b.subscribe_prefix("live:").await.unwrap();
    let target = b.local_addr();
    let before = resident_kib();

    // The flood runs on a thread of its own, as fast as the socket takes it.
    let flood = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut sent = [0u64; 6];
        for i in 0..PER_KIND {
            for (kind, count) in sent.iter_mut().enumerate() {
                if socket.send_to(&junk(kind, i), target).is_ok() {
                    *count += 1;
                }
            }
        }
        sent
    });
    // Meanwhile the cluster goes on publishing.
    let mut published = BTreeSet::new();
    for i in 0..200 {
        let key = format!("live:{i}");
        a.publish(&key, PublishOptions::default()).await.unwrap();
        published.insert(key);
        if i % 20 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let sent = within(
        "the flood",
        tokio::task::spawn_blocking(move || flood.join()),
    )
    .await
    .unwrap()
    .unwrap();

    // Every invalidation arrives, or a resync says some may not have.
    let mut received = BTreeSet::new();
    let mut resynced = false;
    while received.len() < published.len() && !resynced {
        let event = within("an invalidation", sub.recv()).await.unwrap();
        resynced |= event.is_resync();
        received.insert(event.key);
    }
    assert!(resynced || received == published);

    // Each kind of junk is counted as what it is: not more than was sent (UDP may lose
    // some under the flood), and the kernel delivered most of it on loopback.
    eventually("the flood counted", || {
        let d = b.metrics().dropped;
        d.bad_magic + d.truncated + d.plaintext + d.wrong_cluster + d.unauthenticated + d.oversize
            >= PER_KIND as u64
    })
    .await;
    let d = b.metrics().dropped;
    let counted = [
        d.bad_magic,
        d.truncated,
        d.plaintext,
        d.wrong_cluster,
        d.unauthenticated,
        d.oversize,
    ];
    for (kind, (counted, sent)) in counted.iter().zip(sent).enumerate() {
        assert!(
            *counted > 0 && *counted <= sent,
            "kind {kind}: {counted} of {sent}: {d:?}"
        );
    }
    assert_eq!((d.malformed, d.membership, d.replayed), (0, 0, 0), "{d:?}");

    // Nothing of the flood is kept: 120,000 datagrams, about 80 MB, went through.
    let grown = resident_kib().saturating_sub(before);
    eprintln!("flood: sent {sent:?}, counted {counted:?}, resident memory grew {grown} KiB");
    assert!(grown < 32 * 1024, "resident memory grew by {grown} KiB");

    // The cluster is whole and serving.
    wait_for_peers(&b, |peers| peers.len() == 1).await;
    let acked = b
        .publish_and_await(
            "after",
            1,
            PublishOptions::default().timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert_eq!(acked.replicas, 1);
}
