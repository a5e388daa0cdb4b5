//! The gateway while Kafka is down: `503`, and no pending state a client could wait on forever.
//!
//! This stops the shared Kafka broker, so it is a test binary of its own: `cargo test` runs test
//! binaries one after another, so no other file's test sees the broker go away. The broker is
//! restarted when the test ends, whether it passed or not.

use std::time::{Duration, Instant};

use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::kafka;
use reqwest::StatusCode;
use serde_json::Value;

async fn submit(http: &reqwest::Client, base: &str, key: &str) -> (StatusCode, Value) {
    let resp = http
        .post(format!("{base}/v1/requests"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(r#"{"pay": 10}"#)
        .send()
        .await
        .expect("POST /v1/requests");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn exists(fx: &Fixture, id: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(fx.keys.result(id))
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    n == 1
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_down_answers_503_and_leaves_no_pending_state() {
    let fx = Fixture::new("gw-down", RedisKind::Single, 2).await;
    fx.pool().set_limit(4).await.unwrap();
    let (_gw, base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    let _worker = fx.kafka_worker("w0", "echo", &[]);
    let http = reqwest::Client::new();
    let (status, _) = submit(&http, &base, "before").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    fx.wait_finished(&["before".to_owned()], Duration::from_secs(30))
        .await;

    let mut kafka = kafka::Outage::begin();
    let t = Instant::now();
    let (status, body) = submit(&http, &base, "during").await;
    let took = t.elapsed();
    println!("with Kafka stopped: {status} after {took:?}: {body}");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("Kafka"),
        "the 503 says what is down: {body}"
    );
    // The producer gives up after message.timeout.ms (5 s); librdkafka checks timeouts about
    // once a second and a loaded machine adds more, so allow 20 s for the bounded answer.
    assert!(
        took < Duration::from_secs(20),
        "503 within seconds, took {took:?}"
    );
    assert!(
        !exists(&fx, "during").await,
        "no pending state was left behind"
    );
    let poll = http
        .get(format!("{base}/v1/requests/during"))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status(), StatusCode::NOT_FOUND);

    // Back up: the same gateway and key work again, as a new request (nothing half-done
    // remembered it), and the worker processes it.
    let t = Instant::now();
    kafka.end();
    let body = eventually(Duration::from_secs(60), "a 202 after restart", || async {
        let (status, body) = submit(&http, &base, "during").await;
        (status == StatusCode::ACCEPTED).then_some(body)
    })
    .await;
    println!("accepting again {:?} after the restart began", t.elapsed());
    assert_eq!(body["duplicate"], false, "{body}");
    fx.wait_finished(&["during".to_owned()], Duration::from_secs(60))
        .await;
    assert_eq!(fx.states(&["during".to_owned()]).await["during"], "done");
    fx.cleanup().await;
}
