//! `qp-worker gateway` against real Kafka, Redis and running workers: submit, poll, long-poll,
//! idempotency, validation, back-pressure and metrics. Kafka being down is in
//! `gateway_kafka_down.rs`, a test binary of its own because it stops the shared broker.

use std::time::{Duration, Instant};

use qp_tests::fixture::{AclUser, Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::kafka;
use qp_worker::source::redis_list::Envelope;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// POST a request; returns the status, the `Retry-After` header and the JSON body.
async fn submit(
    http: &reqwest::Client,
    base: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
    key: Option<&str>,
) -> (StatusCode, Option<String>, Value) {
    let mut req = http
        .post(format!("{base}/v1/requests"))
        .header("content-type", content_type)
        .body(body);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let resp = req.send().await.expect("POST /v1/requests");
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, retry_after, body)
}

/// Submit JSON and expect a fresh `202`; returns the id.
async fn submit_json(http: &reqwest::Client, base: &str, body: &Value) -> String {
    let (status, _, answer) = submit(http, base, "application/json", body.to_string(), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["status"], "pending");
    assert_eq!(answer["duplicate"], false);
    let id = answer["id"].as_str().expect("an id").to_owned();
    assert_eq!(answer["statusUrl"], format!("/v1/requests/{id}"));
    id
}

/// GET the status of `id`, long-polling up to `wait` seconds when given.
async fn poll(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    wait: Option<f64>,
) -> (StatusCode, Value) {
    let url = match wait {
        Some(w) => format!("{base}/v1/requests/{id}?wait={w}"),
        None => format!("{base}/v1/requests/{id}"),
    };
    let resp = http.get(url).send().await.expect("GET /v1/requests/{id}");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Long-poll until the request is finished (each poll waits up to 10 s).
async fn result_of(http: &reqwest::Client, base: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = poll(http, base, id, Some(10.0)).await;
        match status {
            StatusCode::OK => return body,
            StatusCode::ACCEPTED => {}
            other => panic!("polling {id}: {other} {body}"),
        }
        assert!(Instant::now() < deadline, "{id} unfinished after 60 s");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_submit_then_long_poll_returns_the_handler_result() {
    kafka_submit_then_long_poll(RedisKind::Single).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_submit_then_long_poll_returns_the_handler_result_on_redis_cluster() {
    kafka_submit_then_long_poll(RedisKind::Cluster).await;
}

async fn kafka_submit_then_long_poll(kind: RedisKind) {
    let fx = Fixture::new("gw-kafka", kind, 2).await;
    fx.pool().set_limit(4).await.unwrap();
    let (_gw, base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    let _worker = fx.kafka_worker("w0", "echo", &[]);
    let http = reqwest::Client::new();

    let mut ids = Vec::new();
    for n in 0..5 {
        let body = json!({ "order": n, "items": ["a", "b"] });
        ids.push((submit_json(&http, &base, &body).await, body));
    }
    for (id, body) in &ids {
        let answer = result_of(&http, &base, id).await;
        assert_eq!(answer["status"], "done", "{answer}");
        assert_eq!(
            &answer["result"], body,
            "the echo handler returns the request"
        );
        assert_eq!(answer["id"], id.as_str());
    }
    // A plain poll (no wait) of a finished request answers at once with the same result.
    let (status, answer) = poll(&http, &base, &ids[0].0, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["result"], ids[0].1);
    // Text bodies come back as text.
    let (status, _, answer) = submit(&http, &base, "text/plain", "hello", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let answer = result_of(&http, &base, answer["id"].as_str().unwrap()).await;
    assert_eq!(answer["result"], "hello");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_list_submit_then_poll_returns_the_handler_result() {
    let fx = Fixture::new("gw-list", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let (_gw, base) = fx.gateway(GatewayQueue::RedisList(&list), &[]).await;
    let http = reqwest::Client::new();

    // Submitted before any worker runs: the request waits in the list, pending.
    let body = json!({ "hello": "list" });
    let id = submit_json(&http, &base, &body).await;
    assert_eq!(fx.llen(&list).await, 1);
    let (status, answer) = poll(&http, &base, &id, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(answer["status"], "pending");

    let _worker = fx.list_worker("w0", &list, "fail:poison", &["--retries", "0"]);
    // Plain polling (the article's client, faster) until the result is there.
    let answer = eventually(Duration::from_secs(30), "the result", || async {
        let (status, answer) = poll(&http, &base, &id, None).await;
        (status == StatusCode::OK).then_some(answer)
    })
    .await;
    assert_eq!(answer["status"], "done");
    assert_eq!(answer["result"], body);

    // A request the handler rejects shows its failure and the reason.
    let (status, _, answer) = submit(&http, &base, "text/plain", "a poison pill", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let answer = result_of(&http, &base, answer["id"].as_str().unwrap()).await;
    assert_eq!(answer["status"], "failed", "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("poison"),
        "{answer}"
    );
    fx.cleanup().await;
}

/// Defect: the gateway accepted bodies up to 1 MiB while its Kafka producer refused messages
/// over 1,000,000 bytes with their headers (a 503 with Kafka up, which clients retry forever),
/// and a binary body in a Redis-list envelope (base64) grew past the worker's limit and was
/// dead-lettered. One limit now: a body at it is queued and processed through either queue, a
/// byte more gets 413 naming the limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_at_the_size_limit_is_processed_and_one_byte_more_gets_413() {
    let fx = Fixture::new("gw-size", RedisKind::Single, 1).await;
    fx.pool().set_limit(2).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let (_kgw, kafka_base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    let (_lgw, list_base) = fx.gateway(GatewayQueue::RedisList(&list), &[]).await;
    let _kw = fx.kafka_worker("kw", "echo", &[]);
    let _lw = fx.list_worker("lw", &list, "echo", &[]);
    let http = reqwest::Client::new();
    let limit = 1_000_000;

    for (base, content_type, byte) in [
        (&kafka_base, "text/plain", b'x'),
        (&kafka_base, "application/octet-stream", 0xff),
        (&list_base, "application/octet-stream", 0xff),
    ] {
        let (status, retry, answer) =
            submit(&http, base, content_type, vec![byte; limit], None).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{base} {content_type}: {answer} {retry:?}"
        );
        let id = answer["id"].as_str().unwrap().to_owned();
        let done = result_of(&http, base, &id).await;
        assert_eq!(
            done["status"], "done",
            "{base} {content_type}: {}",
            done["error"]
        );

        let (status, _, answer) =
            submit(&http, base, content_type, vec![byte; limit + 1], None).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("1000000"),
            "the 413 names the limit: {error}"
        );
    }
    fx.cleanup().await;
}

/// Defect: the gateway was ready only while its subscription to result notifications was up, so
/// a pub/sub failure (here: a Redis user without channel permissions, for good) took it out of
/// service although submitting and polling work without notifications. Now it is ready, says in
/// `qp_gateway_notifications_up` that it is deaf, and long polls read their state periodically.
#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_without_notifications_stays_ready_and_long_polls_still_answer() {
    let fx = Fixture::new("gw-deaf", RedisKind::Single, 0).await;
    fx.pool().set_limit(2).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let user = AclUser::create(&fx, &["allkeys", "resetchannels", "+@all"]).await;
    let (_gw, base) = fx
        .gateway(
            GatewayQueue::RedisList(&list),
            &[
                "--redis-username",
                &user.name,
                "--redis-password",
                &user.password,
            ],
        )
        .await;
    let _w = fx.list_worker("w0", &list, "sleep:300", &[]);
    let http = reqwest::Client::new();
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("qp_gateway_notifications_up 0"),
        "{metrics}"
    );
    let id = submit_json(&http, &base, &json!({ "deaf": true })).await;
    let (status, answer) = poll(&http, &base, &id, Some(10.0)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "done");
    drop(user);
    fx.cleanup().await;
}

/// Defect: on a Redis Cluster every finish was `PUBLISH`ed, which the cluster copies to every
/// node, whether anyone waited or not. Now a finish is announced with sharded pub/sub in the
/// QueueProcessor's slot, and only when a long poll watches the request. A subscriber of the
/// test's own hears exactly the one watched request, although five others finished before it.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_cluster_only_watched_finishes_are_announced_in_their_shard() {
    let fx = Fixture::new("gw-shard", RedisKind::Cluster, 1).await;
    fx.pool().set_limit(4).await.unwrap();
    let (_gw, base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    // Slow enough that the long poll below is parked before its request finishes.
    let _worker = fx.kafka_worker("w0", "sleep:500", &[]);
    let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let mut listener = fx.redis.cluster_push_connection(tx).await.unwrap();
    listener.ssubscribe(fx.keys.done_channel()).await.unwrap();
    let http = reqwest::Client::new();

    let mut quiet = Vec::new();
    for n in 0..5 {
        quiet.push(submit_json(&http, &base, &json!({ "quiet": n })).await);
    }
    fx.wait_finished(&quiet, Duration::from_secs(30)).await;
    let watched = submit_json(&http, &base, &json!({ "watched": true })).await;
    let (status, answer) = poll(&http, &base, &watched, Some(10.0)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // Messages of one shard arrive in order: anything announced for the quiet ones comes first.
    let mut announced = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !announced.contains(&watched) {
        let left = deadline.saturating_duration_since(Instant::now());
        let push = tokio::time::timeout(left, heard.recv())
            .await
            .expect("the watched finish was not announced in its shard")
            .expect("push channel open");
        if push.kind == redis::PushKind::SMessage
            && let Some(redis::Value::BulkString(id)) = push.data.get(1)
        {
            announced.push(String::from_utf8_lossy(id).into_owned());
        }
    }
    assert_eq!(
        announced,
        vec![watched],
        "only the watched finish is announced"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn long_poll_answers_within_50ms_of_the_result_being_written() {
    long_poll_latency(RedisKind::Single).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn long_poll_answers_within_50ms_of_the_result_being_written_on_redis_cluster() {
    long_poll_latency(RedisKind::Cluster).await;
}

async fn long_poll_latency(kind: RedisKind) {
    let fx = Fixture::new("gw-latency", kind, 1).await;
    fx.pool().set_limit(4).await.unwrap();
    let (_gw, base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    let _worker = fx.kafka_worker("w0", "sleep:300", &[]);
    let http = reqwest::Client::new();
    // Warm up: the consumer joins its group and gets its partition.
    let id = submit_json(&http, &base, &json!({ "warm": "up" })).await;
    result_of(&http, &base, &id).await;

    let mut lags = Vec::new();
    for n in 0..5 {
        let id = submit_json(&http, &base, &json!({ "n": n })).await;
        // Start waiting at once: the handler takes 300 ms, so the poll is parked when the
        // result is written.
        let started = Instant::now();
        let (status, answer) = poll(&http, &base, &id, Some(5.0)).await;
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut fx.conn.clone())
            .await
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["result"], json!({ "n": n }));
        assert!(
            waited >= Duration::from_millis(250),
            "the poll waited for the handler ({waited:?})"
        );
        // `at` is Redis server time (ms) of the result write; TIME is the same clock.
        let at: u64 = redis::cmd("HGET")
            .arg(fx.keys.result(&id))
            .arg("at")
            .query_async(&mut fx.conn.clone())
            .await
            .unwrap();
        let now = secs * 1000 + micros / 1000;
        lags.push(now.saturating_sub(at));
    }
    println!(
        "{kind:?}: long-poll answered {lags:?} ms after the result was written (Redis server time)"
    );
    // The median must be within 50 ms. One sample of five may be stretched by scheduling on a
    // loaded 2-core machine (62 ms was seen once while two test suites ran at the same time);
    // a long poll that waited for its timeout instead of the notification would show seconds.
    let mut sorted = lags.clone();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    let worst = sorted[sorted.len() - 1];
    assert!(
        median < 50,
        "long polls answered a median {median} ms after the write"
    );
    assert!(
        worst < 1000,
        "a long poll answered {worst} ms after the write: it missed the notification"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_idempotency_key_queues_one_message_and_runs_once() {
    let fx = Fixture::new("gw-idem", RedisKind::Single, 2).await;
    fx.pool().set_limit(4).await.unwrap();
    let (_gw, base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    let _worker = fx.kafka_worker("w0", "probe:20", &[]);
    let http = reqwest::Client::new();

    let (status, _, first) = submit(&http, &base, "text/plain", "once", Some("order-42")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(first["id"], "order-42");
    assert_eq!(first["duplicate"], false);
    let (status, _, second) = submit(&http, &base, "text/plain", "once", Some("order-42")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(second["id"], "order-42");
    assert_eq!(second["duplicate"], true, "{second}");

    // Ten clients racing with one key: exactly one of them queues it.
    let racing = (0..10).map(|_| submit(&http, &base, "text/plain", "race", Some("order-43")));
    let answers = futures::future::join_all(racing).await;
    assert!(answers.iter().all(|(s, _, _)| *s == StatusCode::ACCEPTED));
    let fresh = answers
        .iter()
        .filter(|(_, _, a)| a["duplicate"] == false)
        .count();
    assert_eq!(
        fresh, 1,
        "one submission of order-43 is new, nine are duplicates"
    );

    let answer = result_of(&http, &base, "order-42").await;
    assert_eq!(answer["status"], "done");
    result_of(&http, &base, "order-43").await;
    // After the result exists, the key still answers with it instead of queueing again.
    let (_, _, third) = submit(&http, &base, "text/plain", "once", Some("order-42")).await;
    assert_eq!(third["duplicate"], true);
    assert_eq!(third["status"], "done");

    let messages = kafka::message_count(&fx.bootstrap, &fx.topic).await;
    let runs: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{}probe:runs", fx.keys.prefix()))
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    println!("12 submissions of 2 keys: {messages} Kafka messages, handler runs {runs:?}");
    assert_eq!(messages, 2, "one message per idempotency key");
    assert_eq!(runs.get("order-42"), Some(&1));
    assert_eq!(runs.get("order-43"), Some(&1));
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_are_rejected_and_nothing_is_queued() {
    let fx = Fixture::new("gw-invalid", RedisKind::Single, 0).await;
    let list = format!("{}queue", fx.keys.prefix());
    let (_gw, base) = fx
        .gateway(
            GatewayQueue::RedisList(&list),
            &["--max-request-bytes", "1024"],
        )
        .await;
    let http = reqwest::Client::new();

    let (status, _, body) = submit(&http, &base, "text/plain", vec![b'x'; 4096], None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"].is_string(),
        "the 413 has the API's JSON shape"
    );
    let (status, _, body) = submit(&http, &base, "application/xml", "<a/>", None).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    let (status, _, body) = submit(&http, &base, "application/json", "{nope", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains("JSON"), "{body}");
    let (status, _, _) = submit(&http, &base, "text/plain", "x", Some("has space")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a bad idempotency key");
    assert_eq!(fx.llen(&list).await, 0, "no rejected request was queued");

    let (status, body) = poll(&http, &base, "no-such-request", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = poll(&http, &base, "no-such-request", Some(2.0)).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a long poll of an unknown id ends at once"
    );
    let (status, _) = poll(&http, &base, "bad%7Bid%7D", None).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "ids with braces are refused"
    );
    let (status, _) = poll(&http, &base, &"x".repeat(200), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "overlong ids are refused");
    let resp = http
        .get(format!("{base}/v1/requests/abc?wait=soon"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // A long poll of a request nobody processes ends at its timeout, still pending.
    let id = submit_json(&http, &base, &json!({ "nobody": "home" })).await;
    let t = Instant::now();
    let (status, body) = poll(&http, &base, &id, Some(1.0)).await;
    let waited = t.elapsed();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "pending");
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_millis(1500),
        "?wait=1 waited {waited:?}"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_above_the_bound_answers_429_with_retry_after() {
    let fx = Fixture::new("gw-backlog", RedisKind::Single, 0).await;
    fx.pool().set_limit(8).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let (_gw, base) = fx
        .gateway(GatewayQueue::RedisList(&list), &["--max-backlog", "20"])
        .await;
    let http = reqwest::Client::new();
    // 30 messages and no worker: the backlog is above the bound.
    let mut pipe = redis::pipe();
    for n in 0..30 {
        let id = format!("m-{n}");
        pipe.cmd("LPUSH")
            .arg(&list)
            .arg(Envelope::new(&id, Some("text/plain"), id.as_bytes()).to_bytes())
            .ignore();
    }
    let _: () = pipe.query_async(&mut fx.conn.clone()).await.unwrap();

    let (retry_after, body) = eventually(Duration::from_secs(5), "a 429", || async {
        let (status, retry_after, body) = submit(&http, &base, "text/plain", "more", None).await;
        (status == StatusCode::TOO_MANY_REQUESTS).then_some((retry_after, body))
    })
    .await;
    assert_eq!(retry_after.as_deref(), Some("1"), "429 carries Retry-After");
    assert!(
        body["error"].as_str().unwrap().contains("backlog"),
        "{body}"
    );

    // Workers drain the list: the gateway accepts again.
    let _worker = fx.list_worker("w0", &list, "echo", &[]);
    eventually(Duration::from_secs(30), "a 202 after the drain", || async {
        let (status, _, _) = submit(&http, &base, "text/plain", "more", None).await;
        (status == StatusCode::ACCEPTED).then_some(())
    })
    .await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_by_route_and_code_and_long_poll_waits() {
    let fx = Fixture::new("gw-metrics", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let (_gw, base) = fx
        .gateway(
            GatewayQueue::RedisList(&list),
            &["--max-request-bytes", "64"],
        )
        .await;
    let _worker = fx.list_worker("w0", &list, "sleep:100", &[]);
    let http = reqwest::Client::new();

    let id = submit_json(&http, &base, &json!({ "m": 1 })).await;
    let (status, _) = poll(&http, &base, &id, Some(5.0)).await;
    assert_eq!(status, StatusCode::OK);
    submit(&http, &base, "text/plain", vec![b'x'; 100], None).await;
    submit(&http, &base, "image/png", "x", None).await;
    poll(&http, &base, "unknown", None).await;

    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"qp_gateway_requests_total{code="202",route="submit"} 1"#,
        r#"qp_gateway_requests_total{code="413",route="submit"} 1"#,
        r#"qp_gateway_requests_total{code="415",route="submit"} 1"#,
        r#"qp_gateway_requests_total{code="200",route="status"} 1"#,
        r#"qp_gateway_requests_total{code="404",route="status"} 1"#,
        r#"qp_gateway_longpoll_wait_seconds_count{ended="result"} 1"#,
        r#"qp_gateway_request_seconds_bucket{route="submit",le="+Inf"} 3"#,
    ] {
        assert!(text.contains(line), "{line} missing from /metrics:\n{text}");
    }
    fx.cleanup().await;
}

/// The `qp_gateway_longpoll_waiters` gauge.
async fn parked(http: &reqwest::Client, base: &str) -> Option<i64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("qp_gateway_longpoll_waiters "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn abandoned_long_polls_are_released_and_shutdown_answers_parked_ones() {
    let fx = Fixture::new("gw-abandon", RedisKind::Single, 0).await;
    let list = format!("{}queue", fx.keys.prefix());
    let (mut gw, base) = fx.gateway(GatewayQueue::RedisList(&list), &[]).await;
    let http = reqwest::Client::new();
    let id = submit_json(&http, &base, &json!({ "nobody": "processes this" })).await;

    // Clients that hang up mid-poll leave nothing parked behind.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let polls = (0..5).map(|_| {
        impatient
            .get(format!("{base}/v1/requests/{id}?wait=30"))
            .send()
    });
    for r in futures::future::join_all(polls).await {
        assert!(r.unwrap_err().is_timeout());
    }
    eventually(Duration::from_secs(5), "no parked long polls", || async {
        (parked(&http, &base).await == Some(0)).then_some(())
    })
    .await;

    // SIGTERM answers a parked poll with the current state instead of holding the exit.
    let poll = tokio::spawn({
        let (http, base, id) = (http.clone(), base.clone(), id.clone());
        async move { poll(&http, &base, &id, Some(30.0)).await }
    });
    eventually(Duration::from_secs(5), "one parked long poll", || async {
        (parked(&http, &base).await == Some(1)).then_some(())
    })
    .await;
    let t = Instant::now();
    let clean = tokio::task::block_in_place(|| gw.terminate());
    let (status, body) = poll.await.unwrap();
    println!(
        "SIGTERM with a parked long poll: exited in {:?}",
        t.elapsed()
    );
    assert!(clean, "the gateway exits 0 on SIGTERM");
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["status"], "pending");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A stop is not an outage: no warning that notifications went down.
    let log = gw.log_text();
    assert!(
        !log.contains("notifications down"),
        "the shutdown warned of an outage:\n{log}"
    );
    fx.cleanup().await;
}
