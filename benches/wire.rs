//! Criterion benches; run with `cargo bench`.
//! Micro-benchmarks of the hot paths: encoding and decoding a full batch, packing a
//! burst of publishes into datagrams, and dispatching one event to many subscriptions.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use syncbus::{Bus, InMemoryBus, PublishOptions};
use syncbus_mesh::wire::{self, BatchInfo, ClusterId};
use syncbus_mesh::{Instant, Invalidation, MembershipConfig, Node, NodeConfig, NodeId, Zone};

/// Entries of `key_len`-byte keys that fill one 1,400-byte datagram.
fn full_batch(key_len: usize) -> (Vec<u8>, u32) {
    let budget = wire::max_entry_len(1400);
    let mut body = Vec::new();
    let mut count = 0;
    loop {
        let key = format!("{count:0key_len$}");
        let mut entry = Vec::new();
        wire::encode_entry(&Invalidation::key(key), false, &mut entry);
        if body.len() + entry.len() > budget {
            return (body, count);
        }
        body.extend_from_slice(&entry);
        count += 1;
    }
}

fn batch_info(count: u32) -> BatchInfo {
    BatchInfo {
        origin: NodeId(2),
        first_seq: 1,
        count,
    }
}

fn batch_codec(c: &mut Criterion) {
    for key_len in [16, 64] {
        let (body, count) = full_batch(key_len);
        let keys: Vec<Invalidation> = (0..count)
            .map(|i| Invalidation::key(format!("{i:0key_len$}")))
            .collect();
        c.bench_function(
            &format!("encode full batch ({count} keys of {key_len} B)"),
            |b| {
                b.iter(|| {
                    let mut encoded = Vec::with_capacity(1400);
                    for key in &keys {
                        wire::encode_entry(key, false, &mut encoded);
                    }
                    wire::encode_batch(ClusterId(1), batch_info(count), black_box(&encoded))
                });
            },
        );
        let datagram = wire::encode_batch(ClusterId(1), batch_info(count), &body);
        c.bench_function(
            &format!("decode full batch ({count} keys of {key_len} B)"),
            |b| {
                b.iter(|| {
                    let (_, body) = wire::read_header(black_box(&datagram)).unwrap();
                    wire::decode_batch(body).unwrap()
                });
            },
        );
    }
}

/// A node that believes it has `peers` live members, without a network.
fn node_with_peers(peers: usize) -> Node {
    let addr = "127.0.0.1:7000".parse().unwrap();
    let mut config = NodeConfig::new(NodeId(1), addr, Zone::default());
    config.membership = MembershipConfig::local();
    let mut node = Node::new(config, Instant::ZERO).unwrap();
    for peer in 0..peers {
        let mut peer_config = NodeConfig::new(
            NodeId(10 + peer as u64),
            format!("127.0.0.1:{}", 7001 + peer).parse().unwrap(),
            Zone::default(),
        );
        peer_config.seeds = vec![addr];
        let mut other = Node::new(peer_config, Instant::ZERO).unwrap();
        other.handle_timeout(Instant::ZERO);
        while let Some(announce) = other.poll_transmit() {
            node.handle_packet(Instant::ZERO, other.local().addr, &announce.payload);
        }
    }
    while node.poll_transmit().is_some() {}
    while node.poll_event().is_some() {}
    assert_eq!(
        node.members().len(),
        peers,
        "the announcements made the peers members"
    );
    node
}

fn packing(c: &mut Criterion) {
    let keys: Vec<String> = (0..1000).map(|i| format!("user:{i:011}")).collect();
    c.bench_function("publish 1000 keys and pack for 3 peers", |b| {
        b.iter_batched(
            || node_with_peers(3),
            |mut node| {
                for key in &keys {
                    node.publish(Instant::ZERO, Invalidation::key(key.clone()))
                        .unwrap();
                }
                let mut datagrams = 0;
                while node.poll_transmit().is_some() {
                    datagrams += 1;
                }
                while node.poll_event().is_some() {}
                datagrams
            },
            BatchSize::LargeInput,
        );
    });
}

fn dispatch(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for subscribers in [1, 10, 1000] {
        let bus = InMemoryBus::new();
        let mut subscriptions = Vec::new();
        runtime.block_on(async {
            for _ in 0..subscribers {
                subscriptions.push(bus.subscribe("hot").await.unwrap());
            }
        });
        c.bench_function(
            &format!("dispatch one event to {subscribers} subscriptions"),
            |b| {
                b.iter(|| {
                    runtime
                        .block_on(bus.publish("hot", PublishOptions::default()))
                        .unwrap();
                    for subscription in &mut subscriptions {
                        black_box(subscription.try_recv().unwrap());
                    }
                });
            },
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = batch_codec, packing, dispatch
}
criterion_main!(benches);
