//! Gateway authentication against a real gateway, Redis and worker: bearer tokens per client
//! from a file, results readable only by their submitter, rotation without a restart, the
//! per-client rate limit, and no way to start without choosing authentication.

use std::time::{Duration, Instant};

use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::procs::{self, Proc};
use reqwest::StatusCode;
use serde_json::Value;

const ORDERS: &str = "0123456789abcdef0123456789abcdef-orders";
const BILLING: &str = "fedcba9876543210fedcba9876543210-billing";
const ORDERS_ROTATED: &str = "aaaabbbbccccddddeeeeffff00001111-orders2";

/// A tokens file of the test's own, removed on drop.
struct TokensFile(std::path::PathBuf);

impl TokensFile {
    fn new(text: &str) -> TokensFile {
        let path = std::env::temp_dir().join(format!("qp-tokens-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        TokensFile(path)
    }

    fn write(&self, text: &str) {
        // Replaced in one step, as the kubelet swaps a mounted Secret.
        let tmp = self.0.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for TokensFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn submit(
    http: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    key: &str,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = http
        .post(format!("{base}/v1/requests"))
        .header("content-type", "text/plain")
        .header("idempotency-key", key)
        .body(format!("body of {key}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

async fn poll(http: &reqwest::Client, base: &str, token: &str, id: &str) -> (StatusCode, Value) {
    let resp = http
        .get(format!("{base}/v1/requests/{id}?wait=10"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_need_a_token_and_read_only_their_own_results() {
    let fx = Fixture::new("gwauth", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let tokens = TokensFile::new(&format!(
        "# test clients\norders:{ORDERS}\nbilling:{BILLING}\n"
    ));
    let path = tokens.0.display().to_string();
    let (gateway, base) = fx
        .gateway(GatewayQueue::RedisList(&list), &["--tokens-file", &path])
        .await;
    let _worker = fx.list_worker("w0", &list, "echo", &[]);
    let http = reqwest::Client::new();

    // Without a token, or with a wrong one: 401, the same answer either way.
    let (status, headers, body) = submit(&http, &base, None, "k1").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status2, _, body2) = submit(
        &http,
        &base,
        Some("0123456789abcdef0123456789abcdef-orderX"),
        "k1",
    )
    .await;
    assert_eq!((status2, &body2), (StatusCode::UNAUTHORIZED, &body));
    assert_eq!(body, serde_json::json!({"error": "unauthorized"}));
    // Probes stay open (the kubelet and Prometheus carry no token).
    for probe in ["readyz", "healthz", "metrics"] {
        let r = http.get(format!("{base}/{probe}")).send().await.unwrap();
        assert!(r.status().is_success(), "/{probe}: {}", r.status());
    }

    // Ids are scoped to the client; a result is readable only by its submitter.
    let (status, _, answer) = submit(&http, &base, Some(ORDERS), "k1").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["id"], "orders:k1");
    let (status, answer) = poll(&http, &base, ORDERS, "orders:k1").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["result"], "body of k1");
    let (status, theirs) = poll(&http, &base, BILLING, "orders:k1").await;
    let (_, unknown) = poll(&http, &base, BILLING, "billing:never-submitted").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        theirs, unknown,
        "another client's id looks like an unknown one"
    );
    // The same idempotency key from another client is another request.
    let (status, _, answer) = submit(&http, &base, Some(BILLING), "k1").await;
    assert_eq!(
        (status, &answer["id"], &answer["duplicate"]),
        (
            StatusCode::ACCEPTED,
            &Value::from("billing:k1"),
            &Value::from(false)
        )
    );

    // Rotation without a restart: the file changes, the old token stops working.
    tokens.write(&format!("orders:{ORDERS_ROTATED}\nbilling:{BILLING}\n"));
    let rotated = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the rotated token accepted",
        || async {
            (submit(&http, &base, Some(ORDERS_ROTATED), "k2").await.0 == StatusCode::ACCEPTED)
                .then_some(())
        },
    )
    .await;
    let took = rotated.elapsed();
    assert_eq!(
        submit(&http, &base, Some(ORDERS), "k3").await.0,
        StatusCode::UNAUTHORIZED
    );
    // A broken file keeps the tokens in force (once the gateway has read and refused it).
    tokens.write("orders:short\n");
    eventually(Duration::from_secs(10), "the broken file refused", || {
        let said = gateway
            .log_text()
            .contains("keeping the previous gateway tokens");
        async move { said.then_some(()) }
    })
    .await;
    assert!(!gateway.log_text().contains("short"), "a token in the log");
    let (status, _, _) = submit(&http, &base, Some(ORDERS_ROTATED), "k4").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    println!("gateway auth: rotated token accepted {took:?} after the file changed");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_its_rate_gets_429_and_others_are_not_slowed() {
    let fx = Fixture::new("gwrate", RedisKind::Single, 0).await;
    let list = format!("{}queue", fx.keys.prefix());
    let tokens = TokensFile::new(&format!("orders:{ORDERS}\nbilling:{BILLING}\n"));
    let path = tokens.0.display().to_string();
    let (_gateway, base) = fx
        .gateway(
            GatewayQueue::RedisList(&list),
            &["--tokens-file", &path, "--rate-limit-per-client", "5"],
        )
        .await;
    let http = reqwest::Client::new();
    let mut limited = Vec::new();
    for i in 0..20 {
        let (status, headers, _) = submit(&http, &base, Some(ORDERS), &format!("r{i}")).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited.push(
                headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        } else {
            assert_eq!(status, StatusCode::ACCEPTED);
        }
    }
    println!(
        "rate limit 5/s: {} of 20 back-to-back submits answered 429",
        limited.len()
    );
    assert!(limited.len() >= 10, "only {} of 20 limited", limited.len());
    assert!(
        limited.iter().all(|s| *s >= 1),
        "Retry-After in whole seconds: {limited:?}"
    );
    // Another client has its own budget.
    assert_eq!(
        submit(&http, &base, Some(BILLING), "b0").await.0,
        StatusCode::ACCEPTED
    );
    fx.cleanup().await;
}

#[tokio::test]
async fn a_gateway_without_an_auth_choice_refuses_to_start() {
    let fx = Fixture::new("gwnoauth", RedisKind::Single, 0).await;
    let mut cmd = std::process::Command::new(procs::binary("qp-worker"));
    cmd.arg("gateway")
        .args(["--namespace", &fx.namespace, "--name", &fx.name])
        .args(["--listen", &format!("127.0.0.1:{}", procs::free_port())])
        .args(["--redis-url", &fx.env.get("QP_REDIS_URL")])
        .args(["--source", "redis-list", "--list-key", "q"]);
    let mut proc = Proc::spawn(&format!("{}-gateway", fx.name), cmd);
    eventually(Duration::from_secs(10), "the gateway to exit", || {
        let exited = !proc.alive();
        async move { exited.then_some(()) }
    })
    .await;
    let log = proc.log_text();
    assert!(
        log.contains("--tokens-file") && log.contains("--no-auth"),
        "the error names both choices:\n{log}"
    );
}
