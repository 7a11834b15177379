//! The NATS bus against a real NATS server: the shared one on 127.0.0.1:4222 (the test
//! command starts it when it is down), and private servers on other ports for the
//! tests that kill one. The tests themselves are the broker suite in
//! `support/broker.rs`.
#![cfg(feature = "nats")]

mod support;

use support::broker::{self, Broker, PrivateServer};

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

#[tokio::test]
async fn instances_deliver_to_each_other_filtering_keys_locally() {
    broker::instances_deliver_to_each_other_filtering_keys_locally(shared()).await;
}

#[tokio::test]
async fn awaited_publishes_count_distinct_remote_instances_and_zones() {
    broker::awaited_publishes_count_distinct_remote_instances_and_zones(shared()).await;
}

#[tokio::test]
async fn malformed_payloads_are_counted_and_change_nothing() {
    broker::malformed_payloads_are_counted_and_change_nothing(shared()).await;
}

#[tokio::test]
async fn bad_settings_are_refused_with_the_field_named() {
    broker::bad_settings_are_refused_with_the_field_named(shared(), &["", "a.*", "a b", "a.>"])
        .await;
}

#[tokio::test]
async fn a_restarted_server_means_a_resync_and_publishing_resumes() {
    let (broker, mut server) = private();
    broker::a_restarted_server_means_a_resync_and_publishing_resumes(broker, &mut server).await;
}

#[tokio::test]
async fn two_drops_leave_every_subscription_working() {
    let (broker, mut server) = private();
    broker::two_drops_leave_every_subscription_working(broker, &mut server).await;
}

#[tokio::test]
async fn a_burst_is_batched_and_repeated_keys_coalesce() {
    broker::a_burst_is_batched_and_repeated_keys_coalesce(shared()).await;
}

#[tokio::test]
async fn a_breaker_stops_trying_a_dead_broker_and_closes_when_it_is_back() {
    let (broker, mut server) = private();
    broker::a_breaker_stops_trying_a_dead_broker_and_closes_when_it_is_back(broker, &mut server)
        .await;
}

#[tokio::test]
async fn background_publishes_wait_out_a_dead_broker_and_coalesce() {
    let (broker, mut server) = private();
    broker::background_publishes_wait_out_a_dead_broker_and_coalesce(broker, &mut server).await;
}
