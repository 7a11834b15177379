//! The Redis bus against a real Redis server: the shared one on 127.0.0.1:6379 (the test
//! command starts it when it is down), and private servers on other ports for the
//! tests that kill one. The tests themselves are the broker suite in
//! `support/broker.rs`.
#![cfg(feature = "redis")]

#[macro_use]
mod support;

use support::broker::{Broker, PrivateServer};

fn shared() -> Broker {
    Broker::Redis("redis://127.0.0.1:6379/".into())
}

fn private() -> (Broker, PrivateServer) {
    let args = [
        "--bind",
        "127.0.0.1",
        "--port",
        "{port}",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let server = PrivateServer::start("redis-server", &args);
    (
        Broker::Redis(format!("redis://127.0.0.1:{}/", server.port)),
        server,
    )
}

broker_suite!(shared(), private(), &["", "a*", "a b"]);
