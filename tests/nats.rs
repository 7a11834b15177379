//! The NATS bus against a real NATS server: the shared one on 127.0.0.1:4222 (the test
//! command starts it when it is down), and private servers on other ports for the
//! tests that kill one. The tests themselves are the broker suite in
//! `support/broker.rs`.
#![cfg(feature = "nats")]

#[macro_use]
mod support;

use support::broker::{Broker, PrivateServer};

fn shared() -> Broker {
    Broker::Nats("nats://127.0.0.1:4222".into())
}

fn private() -> (Broker, PrivateServer) {
    let server = PrivateServer::start("nats-server", &["-a", "127.0.0.1", "-p", "{port}"]);
    (
        Broker::Nats(format!("nats://127.0.0.1:{}", server.port)),
        server,
    )
}

broker_suite!(shared(), private(), &["", "a.*", "a b", "a.>"]);
