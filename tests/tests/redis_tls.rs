//! Workers, the gateway and the operator against a Redis that speaks TLS (a certificate from the
//! environment's CA, trusted through `--redis-ca-file` / `spec.redis.caSecretRef`, not the
//! system's store) as an ACL user with a password. A wrong password and an untrusted CA are
//! refused with a clear reason: workers and gateways stay up and unready (not a crash loop),
//! the operator reports a `RedisRefused` condition and event and heals when the Secret is fixed.

use std::process::Command;
use std::time::Duration;

use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::pki::Pki;
use qp_tests::procs::{self, Proc};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn workers_and_the_gateway_work_through_tls_as_an_acl_user() {
    let fx = Fixture::new("rtls", RedisKind::Tls, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let list = format!("{}list", fx.keys.prefix());
    let (_gateway, base) = fx.gateway(GatewayQueue::RedisList(&list), &[]).await;
    let _worker = fx.list_worker("w0", &list, "echo", &[]);
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = http
            .post(format!("{base}/v1/requests"))
            .header("content-type", "text/plain")
            .body(format!("through TLS {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let v: Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    fx.wait_finished(&ids, Duration::from_secs(60)).await;
    let answer: Value = http
        .get(format!("{base}/v1/requests/{}?wait=10", ids[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "done", "{answer}");
    // Every connection of this test's processes is the ACL user's, on the TLS port.
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    let ours = clients
        .lines()
        .filter(|l| l.contains("user=qp-app"))
        .count();
    println!("{ours} connections of user qp-app");
    assert!(
        ours >= 3,
        "worker and gateway connect as qp-app:\n{clients}"
    );
    fx.cleanup().await;
}

/// A worker or gateway of `fx` whose Redis settings are `url`, `password` and `ca`.
fn process(fx: &Fixture, kind: &str, id: &str, password: &str, ca: &str, port: u16) -> Proc {
    let list = format!("{}list", fx.keys.prefix());
    let mut cmd = Command::new(procs::binary("qp-worker"));
    cmd.arg(kind)
        .args(["--namespace", &fx.namespace, "--name", &fx.name])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", &fx.env.get("QP_ENV_REDIS_TLS_URL")])
        .args(["--redis-ca-file", ca])
        .args(["--source", "redis-list", "--list-key", &list])
        .env("QP_REDIS_USERNAME", fx.env.get("QP_ENV_REDIS_USER"))
        .env("QP_REDIS_PASSWORD", password)
        .env("RUST_LOG", "info");
    if kind == "run" {
        cmd.args(["--handler", "echo", "--worker-id", id]);
    } else {
        cmd.arg("--no-auth");
    }
    Proc::spawn(&format!("{}-{id}", fx.name), cmd)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_or_an_untrusted_ca_leaves_processes_up_and_unready() {
    let fx = Fixture::new("rtlsbad", RedisKind::Tls, 0).await;
    let password = fx.env.get("QP_ENV_REDIS_PASSWORD");
    let good_ca = fx.env.get("QP_ENV_SERVICES_CA");
    let pki = Pki::new(&fx.name);
    pki.ca("someone-else");
    let other_ca = pki.path("someone-else.crt");
    let cases = [
        (
            "wrong-password",
            "not-the-password",
            good_ca.as_str(),
            "AuthenticationFailed",
        ),
        (
            "untrusted-ca",
            password.as_str(),
            other_ca.as_str(),
            "invalid peer certificate",
        ),
    ];
    let http = reqwest::Client::new();
    for (case, password, ca, expect) in cases {
        for kind in ["run", "gateway"] {
            let port = procs::free_port();
            let mut p = process(&fx, kind, &format!("{kind}-{case}"), password, ca, port);
            let log = eventually(Duration::from_secs(30), expect, || {
                let log = p.log_text();
                async move { log.contains(expect).then_some(log) }
            })
            .await;
            assert!(
                log.contains("Redis refused this process"),
                "{kind} {case}: {log}"
            );
            assert!(!log.contains(&fx.env.get("QP_ENV_REDIS_PASSWORD")));
            assert!(!log.contains("not-the-password"));
            let base = format!("http://127.0.0.1:{port}");
            let live = http.get(format!("{base}/healthz")).send().await.unwrap();
            let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
            println!(
                "{kind} {case}: refused ({expect}), alive {}, healthz {}, readyz {}",
                p.alive(),
                live.status(),
                ready.status()
            );
            assert_eq!(live.status(), StatusCode::OK, "{kind} {case}");
            assert_eq!(
                ready.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{kind} {case}"
            );
            if kind == "gateway" {
                let r = http
                    .post(format!("{base}/v1/requests"))
                    .header("content-type", "text/plain")
                    .body("x")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                assert!(r.headers().contains_key("retry-after"));
            }
            assert!(p.alive(), "{kind} {case}: still running");
        }
    }
    fx.cleanup().await;
}

/// The operator reaches the QueueProcessor's Redis through TLS with the user, password and CA
/// from Kubernetes Secrets; a wrong password and an untrusted CA are a `RedisRefused` condition
/// and event, the operator keeps running, and fixing the Secret heals it within a few polls.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_reaches_redis_through_tls_and_names_a_refusal() {
    use qp_protocol::keys::Keys;
    use qp_tests::cluster;
    use qp_tests::operator::{
        Refusal, apply_qp, condition, put_secret, qp_status, setup, wait_reachable, wait_refusal,
    };
    use qp_tests::pki::untrusted_ca;

    let s = setup("op-rtls").await;
    let password = s.env.get("QP_ENV_REDIS_PASSWORD");
    let ca = std::fs::read_to_string(s.env.get("QP_ENV_SERVICES_CA")).unwrap();
    let other_ca = untrusted_ca(&s.ns);

    let user = s.env.get("QP_ENV_REDIS_USER");
    let secret_with = |name: &str, password: &str, ca: &str| {
        let (s, name) = (&s, name.to_owned());
        let values = json!({"username": user, "password": password, "ca.crt": ca});
        async move { put_secret(s, &name, values).await }
    };
    // The backlog is measured through TLS too: a Redis-list source in the same Redis.
    let keys = Keys::new(&s.ns, "secured");
    let list = format!("{}list", keys.prefix());
    let mut plain = s.redis.clone();
    for i in 0..25 {
        let _: i64 = redis::cmd("LPUSH")
            .arg(&list)
            .arg(format!("m{i}"))
            .query_async(&mut plain)
            .await
            .unwrap();
    }
    let qp = |secret: &str| {
        let reference = |key: &str| json!({"name": secret, "key": key});
        json!({
            "apiVersion": "queueprocessing.dev/v1alpha1",
            "kind": "QueueProcessor",
            "metadata": {"name": "secured", "namespace": s.ns},
            "spec": {
                "source": {"redisList": {"key": list}},
                "redis": {"url": s.env.get("QP_ENV_REDIS_TLS_URL"),
                          "usernameSecretRef": reference("username"),
                          "passwordSecretRef": reference("password"),
                          "caSecretRef": reference("ca.crt")},
                "concurrency": {"perReplicaTokens": 4, "globalMaxTokens": 100},
                "scaling": {"minReplicas": 0, "maxReplicas": 4, "targetBacklogPerReplica": 10,
                            "pollIntervalSeconds": 1, "cooldownSeconds": 2,
                            "scaleDownStabilizationSeconds": 2},
                "worker": {"handler": {"builtin": {"name": "echo"}}}
            }
        })
    };

    secret_with("redis-client", &password, &ca).await;
    let (mut op, _) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(&s, &qp("redis-client")).await;
    // SourceReachable True: the list's length and the workers' counters were both read
    // through TLS as the ACL user.
    eventually(
        Duration::from_secs(40),
        "the backlog of 25 measured through TLS",
        || async {
            let qp = qp_status(&s, "secured").await;
            let (status, ..) = condition(&qp, "SourceReachable")?;
            let backlog = qp.status.as_ref().and_then(|st| st.backlog);
            (status == "True" && backlog == Some(25)).then_some(())
        },
    )
    .await;
    let cases = [
        (
            "wrong-password",
            "not-the-password".to_owned(),
            ca.clone(),
            "AuthenticationFailed",
        ),
        (
            "untrusted-ca",
            password.clone(),
            other_ca,
            "invalid peer certificate",
        ),
    ];
    for (case, bad_password, bad_ca, expect) in cases {
        let since = jiff::Timestamp::now();
        let secret = format!("redis-client-{case}");
        secret_with(&secret, &bad_password, &bad_ca).await;
        apply_qp(&s, &qp(&secret)).await;
        let Refusal {
            reason,
            message,
            note,
        } = wait_refusal(&s, "secured", expect, since).await;
        println!("{case}: SourceReachable False, {reason}: {message}");
        assert_eq!(reason, "RedisRefused", "{case}");
        assert!(!message.contains("not-the-password") && !message.contains(&password));
        println!("{case}: event {note}");
        println!("{case}: event {note}");
        assert!(note.contains(expect), "{note}");
        assert!(op.alive(), "{case}: the operator keeps running");

        secret_with(&secret, &password, &ca).await;
        let healed = wait_reachable(&s, "secured").await;
        println!("{case}: measured again {healed:.1?} after the Secret was fixed");
    }
    let log = op.log_text();
    assert!(!log.contains(&password) && !log.contains("not-the-password"));
}
