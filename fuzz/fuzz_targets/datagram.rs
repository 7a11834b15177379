//! Any bytes, as a datagram from the network, into a plaintext node: as they come, and
//! framed as a well-formed header (first byte the kind, second the flags) with a correct
//! checksum, so that every decoder behind the header checks is reached.
#![no_main]

mod framing;

use framing::frame;
use libfuzzer_sys::fuzz_target;
use syncbus_mesh::wire::ClusterId;
use syncbus_mesh::{Instant, Node, NodeConfig, NodeId, Zone};

fuzz_target!(|data: &[u8]| {
    let addr = "127.0.0.1:7000".parse().unwrap();
    let config = NodeConfig::new(NodeId(1), addr, Zone::default());
    let cluster = ClusterId::from_name(&config.cluster);
    let mut node = Node::new(config, Instant::ZERO).unwrap();
    let from = "127.0.0.1:7001".parse().unwrap();
    let now = Instant::from_nanos(1_000_000);
    node.handle_packet(now, from, data);
    node.handle_discovery(now, from, data);
    if let [kind, flags, body @ ..] = data {
        let framed = frame(cluster, *kind, *flags, body);
        node.handle_packet(now, from, &framed);
        node.handle_discovery(now, from, &framed);
    }
    while node.poll_transmit().is_some() || node.poll_event().is_some() {}
});
