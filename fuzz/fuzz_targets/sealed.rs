//! Any bytes into a node that requires sealed datagrams: as they come, and sealed with
//! the node's own key around a well-formed datagram (first 24 bytes the nonce, then the
//! kind, the flags and the body), so everything behind the seal is reached too; each
//! sealed datagram is sent twice, the second time as a replay.
#![no_main]

mod framing;

use framing::frame;
use libfuzzer_sys::fuzz_target;
use syncbus_mesh::wire::ClusterId;
use syncbus_mesh::{ClusterKey, Encryption, Instant, Node, NodeConfig, NodeId, Zone};

fuzz_target!(|data: &[u8]| {
    let key = ClusterKey::from_bytes([7; 32]);
    let addr = "127.0.0.1:7000".parse().unwrap();
    let mut config = NodeConfig::new(NodeId(1), addr, Zone::default());
    config.encryption = Some(Encryption::new(key.clone()));
    let cluster = ClusterId::from_name(&config.cluster);
    let mut node = Node::new(config, Instant::ZERO).unwrap();
    let from = "127.0.0.1:7001".parse().unwrap();
    let now = Instant::from_nanos(1_000_000);
    node.handle_packet(now, from, data);
    if let Some((nonce, rest)) = data.split_first_chunk::<24>()
        && let [kind, flags, body @ ..] = rest
    {
        let mut prefix = [0; 16];
        prefix.copy_from_slice(&nonce[..16]);
        let counter = u64::from_be_bytes(nonce[16..].try_into().unwrap());
        let inner = frame(cluster, *kind, *flags, body);
        let sealed = syncbus_mesh::seal_datagram(&key, cluster, prefix, counter, &inner);
        node.handle_packet(now, from, &sealed);
        node.handle_packet(now, from, &sealed);
        node.handle_discovery(now, from, &sealed);
    }
    while node.poll_transmit().is_some() || node.poll_event().is_some() {}
});
