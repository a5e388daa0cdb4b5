//! Nothing secret leaves through failure reasons: a handler URL with a password is refused
//! without echoing it; a downstream's answer body and an exec handler's stderr (both carrying a
//! token) stay out of what clients poll and of the dead letter; a handler header from the
//! environment (a Secret in a pod) reaches the downstream and nothing else.

use std::time::Duration;

use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::procs::Proc;

const URL_PASSWORD: &str = "S3CRETPASS";
const BODY_TOKEN: &str = "BODY-TOKEN-4f1c9a";
const STDERR_TOKEN: &str = "STDERR-TOKEN-77ab20";
const HEADER_SECRET: &str = "Bearer HEADER-SECRET-91d3";

/// A downstream that refuses every message with 400 and a body carrying [`BODY_TOKEN`] (what a
/// careless service does); it records the Authorization header it got.
async fn careless_downstream() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/x",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let s = s.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                s.lock().unwrap().push(auth);
                (
                    axum::http::StatusCode::BAD_REQUEST,
                    format!("rejected; internal token {BODY_TOKEN}"),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/x", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

/// Everything a client or operator can read about `ids`: poll answers through the gateway and
/// the dead-letter entries in Redis.
async fn visible(fx: &Fixture, base: &str, ids: &[String]) -> String {
    let http = reqwest::Client::new();
    let mut all = String::new();
    for id in ids {
        let r = http
            .get(format!("{base}/v1/requests/{id}?wait=20"))
            .send()
            .await
            .unwrap();
        all.push_str(&r.text().await.unwrap());
        all.push('\n');
    }
    let dead: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(fx.keys.dead_letter())
        .arg(0)
        .arg(-1)
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    for d in dead {
        all.push_str(&String::from_utf8_lossy(&d));
        all.push('\n');
    }
    all
}

async fn submit(base: &str, n: usize) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let r = http
            .post(format!("{base}/v1/requests"))
            .header("content-type", "text/plain")
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
        let v: serde_json::Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_url_with_a_password_is_refused_without_echoing_it() {
    let fx = Fixture::new("leakurl", RedisKind::Single, 0).await;
    let url = format!("http://user:{URL_PASSWORD}@127.0.0.1:1/x");
    let mut worker = fx.list_worker("w0", "q", &url, &[]);
    eventually(Duration::from_secs(10), "the worker to exit", || {
        let exited = !worker.alive();
        async move { exited.then_some(()) }
    })
    .await;
    let log = worker.log_text();
    assert!(log.contains("carries credentials"), "{log}");
    assert!(
        !log.contains(URL_PASSWORD),
        "the password in the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn downstream_bodies_stderr_and_header_secrets_stay_out_of_reasons() {
    let fx = Fixture::new("leaks", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let (url, seen) = careless_downstream().await;

    // HTTP: the header comes from the environment; the downstream refuses with a telling body.
    let http_list = format!("{}http", fx.keys.prefix());
    let (_gw_http, base_http) = fx.gateway(GatewayQueue::RedisList(&http_list), &[]).await;
    let mut cmd = fx.worker_command("http");
    cmd.args(["--source", "redis-list", "--list-key", &http_list])
        .args(["--handler", &url, "--handler-header-names", "Authorization"])
        .env("QP_HANDLER_HEADER_0", HEADER_SECRET);
    let http_worker = Proc::spawn(&format!("{}-http", fx.name), cmd);
    let http_ids = submit(&base_http, 3).await;

    // exec: the program prints a token to stderr and fails (retried, then dead-lettered).
    let exec_list = format!("{}exec", fx.keys.prefix());
    let (_gw_exec, base_exec) = fx.gateway(GatewayQueue::RedisList(&exec_list), &[]).await;
    let exec = format!(
        "exec:{}",
        serde_json::json!(["sh", "-c", format!("echo {STDERR_TOKEN} >&2; exit 3")])
    );
    let exec_worker = fx.list_worker(
        "exec",
        &exec_list,
        &exec,
        &["--retries", "1", "--retry-backoff-ms", "10"],
    );
    let exec_ids = submit(&base_exec, 3).await;

    fx.wait_finished(&http_ids, Duration::from_secs(30)).await;
    fx.wait_finished(&exec_ids, Duration::from_secs(30)).await;
    let http_seen = visible(&fx, &base_http, &http_ids).await;
    let exec_seen = visible(&fx, &base_exec, &exec_ids).await;
    let all = format!("{http_seen}{exec_seen}");
    println!("what clients and the dead letter show:\n{all}");
    assert!(
        all.contains("http handler answered 400 Bad Request"),
        "{all}"
    );
    assert!(all.contains("exec handler exit status: 3"), "{all}");
    for secret in [BODY_TOKEN, STDERR_TOKEN, "HEADER-SECRET", URL_PASSWORD] {
        assert!(
            !all.contains(secret),
            "{secret} reached a client or dead letter"
        );
    }
    // The header did reach the downstream.
    assert!(seen.lock().unwrap().iter().all(|a| a == HEADER_SECRET));
    assert!(!seen.lock().unwrap().is_empty());
    // The worker logs keep the detail for the operator, never the header's value.
    let logs = format!("{}{}", http_worker.log_text(), exec_worker.log_text());
    assert!(
        logs.contains(BODY_TOKEN) && logs.contains(STDERR_TOKEN),
        "detail in the logs"
    );
    assert!(
        !logs.contains("HEADER-SECRET"),
        "the header's value in a log"
    );
    fx.cleanup().await;
}
