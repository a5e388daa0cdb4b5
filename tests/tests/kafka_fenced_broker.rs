//! Clients that met a fenced broker. KRaft answers Metadata listing no broker at all while a
//! broker is fenced (starting, in a controlled shutdown, unregistered), and librdkafka 2.12
//! then drops every broker it knew and never looks for the cluster again
//! (`qp_protocol::kafka::BrokerLoss`): CI saw a worker group consume nothing for minutes
//! after a broker restart. Here the broker is fenced on purpose while a worker and a gateway
//! run; once it is back, both must work again.
//!
//! A test binary of its own with one test: it fences and restarts the broker every other test
//! uses.

use std::time::Duration;

use qp_tests::cluster::metric;
use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::kafka::Fence;
use qp_tests::procs::free_port;
use reqwest::StatusCode;

async fn submit(http: &reqwest::Client, base: &str, key: &str) -> StatusCode {
    http.post(format!("{base}/v1/requests"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(r#"{"pay": 1}"#)
        .send()
        .await
        .expect("POST /v1/requests")
        .status()
}

/// Whether a process's Kafka client (`client`) met a Metadata answer without brokers, from
/// its `/metrics`: it has no broker left, or it was given its bootstrap servers again since.
async fn lost_its_brokers(port: u16, client: &str) -> bool {
    let label = format!("{{client=\"{client}\"}}");
    let brokers = metric(port, &format!("qp_worker_kafka_brokers{label}")).await;
    let rebootstraps = metric(port, &format!("qp_worker_kafka_rebootstraps_total{label}")).await;
    brokers == Some(0.0) || rebootstraps.unwrap_or(0.0) >= 1.0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_and_a_gateway_find_the_broker_again_after_it_was_fenced() {
    let fx = Fixture::new("fenced", RedisKind::Single, 2).await;
    fx.pool().set_limit(4).await.unwrap();
    let (_gw, base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    let gw_port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let worker_port = free_port();
    let _worker = fx.kafka_worker_on("w0", worker_port, "echo", &[]);
    let http = reqwest::Client::new();
    assert_eq!(submit(&http, &base, "before").await, StatusCode::ACCEPTED);
    fx.wait_finished(&["before".to_owned()], Duration::from_secs(30))
        .await;

    let mut fence = Fence::broker();
    // The consumer refreshes its metadata when its partitions lose their leader; the producer
    // when a send finds none: this submit cannot be queued while the broker is fenced.
    assert_eq!(
        submit(&http, &base, "fenced").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for (port, client) in [(worker_port, "consumer"), (gw_port, "producer")] {
        eventually(
            Duration::from_secs(60),
            &format!("the {client} was left without brokers"),
            || async move { lost_its_brokers(port, client).await.then_some(()) },
        )
        .await;
    }

    fence.lift();
    eventually(
        Duration::from_secs(60),
        "the gateway queueing again",
        || {
            let http = http.clone();
            let base = base.clone();
            async move { (submit(&http, &base, "after").await == StatusCode::ACCEPTED).then_some(()) }
        },
    )
    .await;
    fx.wait_finished(&["after".to_owned()], Duration::from_secs(60))
        .await;
    fx.cleanup().await;
}
