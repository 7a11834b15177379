//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, unused_macros)]

#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
#[macro_use]
pub mod broker;
#[cfg(feature = "kafka")]
pub mod proxy;
#[cfg(feature = "quic")]
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use syncbus::{MembershipConfig, MeshBus, MeshConfig, Peer, Zone};

/// How long any condition may take before a test fails. Generous: CI machines are slow,
/// and a passing test never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A node on loopback with a free port and fast failure detection.
pub fn local_config(zone: &str, seeds: &[SocketAddr]) -> MeshConfig {
    let mut config = MeshConfig::new("127.0.0.1:0".parse().unwrap());
    config.zone = Zone::new(zone).unwrap();
    config.seeds = seeds.to_vec();
    config.membership = MembershipConfig::local();
    config
}

/// Waits for `condition` on the node's live peers.
pub async fn wait_for_peers(bus: &MeshBus, condition: impl Fn(&[Peer]) -> bool) {
    let mut peers = bus.watch_peers();
    let waited = tokio::time::timeout(DEADLINE, peers.wait_for(|p| condition(p))).await;
    let current = bus.watch_peers().borrow().clone();
    assert!(
        matches!(waited, Ok(Ok(_))),
        "peers of {} never matched: {current:?}",
        bus.local_addr()
    );
}

/// Runs `future`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not happen within {DEADLINE:?}"),
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// Checks `condition` every 10 ms until it holds, failing the test after [`DEADLINE`].
/// For state that offers no change notification (counters).
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    within(what, async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while !condition() {
            tick.tick().await;
        }
    })
    .await;
}
