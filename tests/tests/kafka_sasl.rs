//! Workers, the gateway and the operator's lag measurement against a broker that demands SASL
//! (SCRAM-SHA-512) over TLS: the environment's second Kafka listener, with a user made by
//! Kafka's own tool and a certificate from the environment's CA. Credentials reach the workers
//! and the gateway as the operator passes them from Secrets (environment variables), and the
//! operator reads them from Kubernetes Secrets. A wrong password and an untrusted certificate
//! are refused with a clear reason (log, readiness, condition and event), and nothing
//! crash-loops.

use std::time::Duration;

use qp_tests::fixture::{Fixture, RedisKind, eventually};
use qp_tests::kafka;
use qp_tests::pki::Pki;
use qp_tests::procs::{self, Proc};

struct Sasl {
    bootstrap: String,
    user: String,
    password: String,
    ca: String,
}

fn sasl(fx: &Fixture) -> Sasl {
    Sasl {
        bootstrap: fx.env.get("QP_ENV_KAFKA_SASL_BOOTSTRAP"),
        user: fx.env.get("QP_ENV_KAFKA_SASL_USER"),
        password: fx.env.get("QP_ENV_KAFKA_SASL_PASSWORD"),
        ca: fx.env.get("QP_ENV_KAFKA_CA"),
    }
}

/// A worker of `fx` that reads through the SASL_SSL listener with these credentials.
fn sasl_worker(fx: &Fixture, id: &str, s: &Sasl, password: &str, ca: &str, port: u16) -> Proc {
    let mut cmd = fx.worker_command_on(id, port);
    cmd.args(["--source", "kafka", "--kafka-bootstrap", &s.bootstrap])
        .args(["--kafka-topic", &fx.topic, "--kafka-group", &fx.group])
        .args(["--kafka-sasl-mechanism", "SCRAM-SHA-512", "--kafka-tls"])
        .args(["--kafka-ca-file", ca, "--handler", "echo"])
        .env("QP_KAFKA_USERNAME", &s.user)
        .env("QP_KAFKA_PASSWORD", password);
    Proc::spawn(&format!("{}-{id}", fx.name), cmd)
}

/// A gateway of `fx` that produces through the SASL_SSL listener with these credentials.
fn sasl_gateway(fx: &Fixture, id: &str, s: &Sasl, password: &str, ca: &str, port: u16) -> Proc {
    let mut cmd = std::process::Command::new(procs::binary("qp-worker"));
    cmd.arg("gateway")
        .args([
            "--namespace",
            &fx.namespace,
            "--name",
            &fx.name,
            "--no-auth",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", &fx.env.get("QP_REDIS_URL")])
        .args(["--source", "kafka", "--kafka-bootstrap", &s.bootstrap])
        .args(["--kafka-topic", &fx.topic, "--kafka-group", &fx.group])
        .args(["--kafka-sasl-mechanism", "SCRAM-SHA-512", "--kafka-tls"])
        .args(["--kafka-ca-file", ca])
        .env("QP_KAFKA_USERNAME", &s.user)
        .env("QP_KAFKA_PASSWORD", password);
    Proc::spawn(&format!("{}-{id}", fx.name), cmd)
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_and_the_gateway_work_through_sasl_over_tls() {
    let fx = Fixture::new("sasl", RedisKind::Single, 2).await;
    fx.pool().set_limit(4).await.unwrap();
    let s = sasl(&fx);
    let ids: Vec<String> = (0..20).map(|i| format!("s-{i}")).collect();
    kafka::send_many(&kafka::producer(&fx.bootstrap), &fx.topic, &ids).await;
    let _worker = sasl_worker(&fx, "w0", &s, &s.password, &s.ca, procs::free_port());
    fx.wait_finished(&ids, Duration::from_secs(60)).await;

    // The gateway produces through the same listener.
    let port = procs::free_port();
    let _gateway = sasl_gateway(&fx, "gateway", &s, &s.password, &s.ca, port);
    let base = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "the gateway ready", || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/requests"))
        .header("content-type", "text/plain")
        .body("through SASL")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let answer: serde_json::Value = http
        .get(format!("{base}/v1/requests/{id}?wait=20"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "done", "{answer}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_or_an_untrusted_certificate_is_refused_clearly() {
    let fx = Fixture::new("saslbad", RedisKind::Single, 1).await;
    fx.pool().set_limit(4).await.unwrap();
    let s = sasl(&fx);
    let pki = Pki::new(&fx.name);
    pki.ca("someone-else");
    let other_ca = pki.path("someone-else.crt");

    let cases = [
        (
            "wrong-password",
            "not-the-password",
            s.ca.as_str(),
            "Authentication failed",
        ),
        (
            "untrusted-ca",
            s.password.as_str(),
            other_ca.as_str(),
            "certificate verify failed",
        ),
    ];
    for (name, password, ca, expect) in cases {
        let port = procs::free_port();
        let mut w = sasl_worker(&fx, name, &s, password, ca, port);
        let log = eventually(Duration::from_secs(30), expect, || {
            let log = w.log_text();
            async move { log.contains(expect).then_some(log) }
        })
        .await;
        assert!(
            !log.contains(&s.password) && !log.contains("not-the-password"),
            "a password in the log"
        );
        // Still running, and not ready: a probe says so instead of a crash loop.
        let readyz = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await;
        let ready = readyz.is_ok_and(|r| r.status().is_success());
        println!(
            "{name}: refused ({expect}), worker alive {}, ready {ready}",
            w.alive()
        );
        assert!(w.alive(), "{name}: the worker stays up");

        // The gateway leaves the Service (unready) instead of answering 503 while ready.
        let port = procs::free_port();
        let mut g = sasl_gateway(&fx, &format!("gw-{name}"), &s, password, ca, port);
        // A starting gateway is unready anyway: first the refusal, then readiness after it.
        let log = eventually(Duration::from_secs(30), "the gateway refused", || {
            let log = g.log_text();
            async move { log.contains(expect).then_some(log) }
        })
        .await;
        let readyz = format!("http://127.0.0.1:{port}/readyz");
        eventually(Duration::from_secs(10), "the gateway unready", || async {
            let r = reqwest::get(&readyz).await.ok()?;
            (r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
        })
        .await;
        assert!(!log.contains(&s.password) && !log.contains("not-the-password"));
        assert!(g.alive(), "{name}: the gateway stays up");
        println!("{name}: gateway unready and alive");
    }
    fx.cleanup().await;
}

/// The operator measures lag through SASL over TLS with credentials from Kubernetes Secrets,
/// and a refused password or certificate is a condition and an event that name the refusal
/// (not a timeout), with replicas held and the operator running; fixing the Secret heals it
/// within a few polls (a refusal makes the operator read its Secrets again at once).
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_measures_through_sasl_and_names_a_refusal() {
    use qp_tests::cluster;
    use qp_tests::operator::{
        Refusal, apply_qp, put_secret, qp_status, replicas, setup, wait_reachable, wait_refusal,
    };
    use qp_tests::pki::untrusted_ca;
    use serde_json::json;

    let s = setup("op-sasl").await;
    let sasl_bootstrap = s.env.get("QP_ENV_KAFKA_SASL_BOOTSTRAP");
    let password = s.env.get("QP_ENV_KAFKA_SASL_PASSWORD");
    let ca = std::fs::read_to_string(s.env.get("QP_ENV_KAFKA_CA")).unwrap();
    let other_ca = untrusted_ca(&s.ns);

    let topic = format!("sasl-{}", s.ns);
    let plain = s.env.get("QP_KAFKA_BOOTSTRAP");
    kafka::create_topic(&plain, &topic, 4).await;
    let ids: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    kafka::send_many(&kafka::producer(&plain), &topic, &ids).await;

    let user = s.env.get("QP_ENV_KAFKA_SASL_USER");
    let secret_with = |name: &str, password: &str, ca: &str| {
        let (s, name) = (&s, name.to_owned());
        let values = json!({"username": user, "password": password, "ca.crt": ca});
        async move { put_secret(s, &name, values).await }
    };
    // The QueueProcessor, its credentials from Secret `secret`.
    let qp = |secret: &str| {
        let reference = |key: &str| json!({"name": secret, "key": key});
        json!({
            "apiVersion": "queueprocessing.dev/v1alpha1",
            "kind": "QueueProcessor",
            "metadata": {"name": "secured", "namespace": s.ns},
            "spec": {
                "source": {"kafka": {
                    "bootstrapServers": sasl_bootstrap, "topic": topic,
                    "consumerGroup": format!("{topic}-group"),
                    "sasl": {"mechanism": "SCRAM-SHA-512",
                             "usernameSecretRef": reference("username"),
                             "passwordSecretRef": reference("password")},
                    "tls": {"caSecretRef": reference("ca.crt")}
                }},
                "redis": {"url": s.env.get("QP_REDIS_URL")},
                "scaling": {"minReplicas": 0, "maxReplicas": 4, "targetBacklogPerReplica": 10,
                            "pollIntervalSeconds": 1, "cooldownSeconds": 2,
                            "scaleDownStabilizationSeconds": 2},
                "worker": {"handler": {"builtin": {"name": "echo"}}}
            }
        })
    };
    secret_with("kafka-client", &password, &ca).await;
    let (mut op, _) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(&s, &qp("kafka-client")).await;
    // 30 messages measured through SASL_SSL: 3 replicas.
    eventually(
        Duration::from_secs(40),
        "3 replicas for a backlog of 30",
        || async {
            let st = qp_status(&s, "secured").await.status?;
            (replicas(&s, "secured-worker").await == Some(3) && st.backlog == Some(30))
                .then_some(())
        },
    )
    .await;

    let cases = [
        (
            "wrong-password",
            "not-the-password".to_owned(),
            ca.clone(),
            "Authentication failed",
        ),
        (
            "untrusted-ca",
            password.clone(),
            other_ca,
            "certificate verify failed",
        ),
    ];
    for (case, bad_password, bad_ca, expect) in cases {
        let since = jiff::Timestamp::now();
        let secret = format!("kafka-client-{case}");
        secret_with(&secret, &bad_password, &bad_ca).await;
        apply_qp(&s, &qp(&secret)).await;
        let Refusal {
            reason,
            message,
            note,
        } = wait_refusal(&s, "secured", expect, since).await;
        println!("{case}: SourceReachable False, {reason}: {message}");
        assert_eq!(reason, "SourceRefused", "{case}");
        assert!(!message.contains("not-the-password") && !message.contains(&password));
        println!("{case}: event {note}");
        println!("{case}: event {note}");
        assert!(
            note.contains(expect) && note.contains("holding 3 replicas"),
            "{note}"
        );
        assert_eq!(
            replicas(&s, "secured-worker").await,
            Some(3),
            "{case}: replicas held"
        );
        assert!(op.alive(), "{case}: the operator keeps running");

        // The Secret fixed: measured again without a restart or an edit, within a few polls.
        secret_with(&secret, &password, &ca).await;
        let healed = wait_reachable(&s, "secured").await;
        println!("{case}: measured again {healed:.1?} after the Secret was fixed");
    }
    let log = op.log_text();
    assert!(
        !log.contains(&password) && !log.contains("not-the-password"),
        "a password in the operator's log"
    );
}
