//! The gateway's mTLS mode for in-mesh callers: the API is served over TLS on a port of its
//! own and every caller presents a client certificate from the configured CA; the
//! certificate's common name is the client, so results are readable only by the same name.
//! No certificate, one from another CA, or plain HTTP get no answer from the API; the probes
//! and /metrics stay plain HTTP on the other port; a certificate rotated in place is served
//! without a restart. Certificates are made here with openssl.

use std::process::Command;

use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::pki::Pki;
use qp_tests::procs;
use reqwest::StatusCode;
use serde_json::Value;

/// The server's CA with a server certificate and two clients, and a rogue CA whose client
/// calls itself `orders`.
fn pki(name: &str) -> Pki {
    let pki = Pki::new(name);
    pki.ca("ca").ca("rogue-ca").issue(
        "server",
        "ca",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    );
    for (name, ca, cn) in [
        ("orders", "ca", "orders"),
        ("billing", "ca", "billing"),
        ("intruder", "rogue-ca", "orders"),
    ] {
        pki.issue(name, ca, cn, "extendedKeyUsage=clientAuth");
    }
    pki
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_name_the_client_and_nothing_else_gets_in() {
    let fx = Fixture::new("mtls", RedisKind::Single, 2).await;
    fx.pool().set_limit(4).await.unwrap();
    let pki = pki(&fx.name);
    let api_port = procs::free_port();
    let api_listen = format!("127.0.0.1:{api_port}");
    let (cert, key, ca) = (
        pki.path("server.crt"),
        pki.path("server.key"),
        pki.path("ca.crt"),
    );
    let (_gateway, probes) = fx
        .gateway(
            GatewayQueue::Kafka,
            &[
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--client-ca-file",
                &ca,
                "--api-listen",
                &api_listen,
            ],
        )
        .await;
    let _worker = fx.kafka_worker("w0", "echo", &[]);
    let api = format!("https://127.0.0.1:{api_port}");

    // orders submits and reads its result.
    let orders = pki.client("ca", Some("orders"));
    let r = orders
        .post(format!("{api}/v1/requests"))
        .header("content-type", "text/plain")
        .header("idempotency-key", "o-1")
        .body("by certificate")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(id, "orders:o-1", "the certificate's name scopes the id");
    let answer: Value = orders
        .get(format!("{api}/v1/requests/{id}?wait=10"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "done", "{answer}");

    // billing, another client of the same CA, cannot see it.
    let r = pki
        .client("ca", Some("billing"))
        .get(format!("{api}/v1/requests/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // No certificate, a certificate named "orders" from another CA, and plain HTTP: no answer.
    for (what, client, url) in [
        (
            "no certificate",
            pki.client("ca", None),
            format!("{api}/v1/requests/{id}"),
        ),
        (
            "another CA",
            pki.client("ca", Some("intruder")),
            format!("{api}/v1/requests/{id}"),
        ),
        (
            "plain HTTP",
            reqwest::Client::new(),
            format!("http://127.0.0.1:{api_port}/v1/requests/{id}"),
        ),
    ] {
        let r = client.get(&url).send().await;
        println!(
            "{what}: {:?}",
            r.as_ref().map(|r| r.status()).map_err(|e| e.to_string())
        );
        assert!(
            r.is_err(),
            "{what}: the API answered {:?}",
            r.map(|r| r.status())
        );
    }

    // The probes and /metrics stay plain HTTP, and the API is not there.
    let plain = reqwest::Client::new();
    let ready = plain.get(format!("{probes}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let metrics = plain.get(format!("{probes}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let api_on_probes = plain
        .get(format!("{probes}/v1/requests/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(api_on_probes.status(), StatusCode::NOT_FOUND);

    // The serving certificate rotated in place (as the kubelet updates a mounted Secret): new
    // connections get the new one without a restart.
    pki.ca("ca2").issue(
        "server",
        "ca2",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    );
    let rotated = std::time::Instant::now();
    let trusting_ca2 = pki.client("ca2", Some("orders"));
    eventually(
        std::time::Duration::from_secs(15),
        "the rotated certificate served",
        || async {
            let r = trusting_ca2
                .get(format!("{api}/v1/requests/{id}"))
                .send()
                .await
                .ok()?;
            (r.status() == StatusCode::OK).then_some(())
        },
    )
    .await;
    println!(
        "rotated certificate served {:.1?} after the files changed",
        rotated.elapsed()
    );
    // A new connection of a client that trusts only the old CA is refused (a kept-alive one
    // would still be on the old session).
    assert!(
        pki.client("ca", Some("orders"))
            .get(format!("{api}/v1/requests/{id}"))
            .send()
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_certificate_file_stops_the_gateway_naming_it() {
    let fx = Fixture::new("mtlsbad", RedisKind::Single, 1).await;
    let pki = pki(&fx.name);
    let out = Command::new(procs::binary("qp-worker"))
        .args(["gateway", "--namespace", &fx.namespace, "--name", &fx.name])
        .args(["--redis-url", &fx.env.get("QP_REDIS_URL")])
        .args(["--source", "kafka", "--kafka-bootstrap", &fx.bootstrap])
        .args(["--kafka-topic", &fx.topic])
        .args(["--tls-cert-file", "/nonexistent/tls.crt"])
        .args(["--tls-key-file", &pki.path("server.key")])
        .args(["--client-ca-file", &pki.path("ca.crt")])
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("/nonexistent/tls.crt"), "{stderr}");
    // Tokens and certificates at once is refused by the parser.
    let out = Command::new(procs::binary("qp-worker"))
        .args(["gateway", "--name", "x", "--source", "redis-list"])
        .args(["--tokens-file", "/tmp/t", "--client-ca-file", "/tmp/c"])
        .args(["--tls-cert-file", "/tmp/a", "--tls-key-file", "/tmp/b"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    fx.cleanup().await;
}
