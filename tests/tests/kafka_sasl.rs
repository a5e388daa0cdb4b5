//! Workers and the gateway against a broker that demands SASL (SCRAM-SHA-512) over TLS: the
//! environment's second Kafka listener, with a user made by Kafka's own tool and a certificate
//! from the environment's CA. Credentials reach the processes as the operator passes them from
//! Secrets (environment variables); a wrong password and an untrusted certificate are refused
//! with a clear reason in the log, and the worker stays up (unready) instead of crash-looping.

use std::time::Duration;

use qp_tests::fixture::{Fixture, RedisKind, eventually};
use qp_tests::kafka;
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
        .args(["--kafka-ca-file", &s.ca])
        .env("QP_KAFKA_USERNAME", &s.user)
        .env("QP_KAFKA_PASSWORD", &s.password);
    let _gateway = Proc::spawn(&format!("{}-gateway", fx.name), cmd);
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
    // An unrelated CA: the broker's certificate does not verify against it.
    let other_ca = std::env::temp_dir().join(format!("qp-other-ca-{}.crt", fx.name));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=someone-else", "-keyout", "/dev/null", "-out"])
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(made.status.success());
    let other_ca = other_ca.display().to_string();

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
    }
    let _ = std::fs::remove_file(&other_ca);
    fx.cleanup().await;
}
