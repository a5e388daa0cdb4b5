//! The end-to-end test's secured phase: a QueueProcessor whose every connection is
//! authenticated and encrypted, running in pods on the node with credentials only from
//! Kubernetes Secrets. Kafka through SASL (SCRAM-SHA-512) over TLS, Redis as an ACL user over
//! TLS with the environment's private CA, and the gateway serving mTLS through its Service. The
//! operator's pod measures lag through the same SASL_SSL listener, and scales on a Redis
//! counter (a scaling signal) that it reads through TLS.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use qp_protocol::keys::Keys;
use serde_json::{Value as Json, json};

use crate::e2e::E2e;
use crate::fixture::{self, eventually};
use crate::kafka;
use crate::pki::Pki;

const QP: &str = "secured";

pub async fn secured_queue_processor_in_pods(e: &E2e) {
    let t = Instant::now();
    let env = &e.env;
    let topic = crate::tools::unique("e2e-secured");
    kafka::create_topic(&env.get("QP_KAFKA_BOOTSTRAP"), &topic, 2).await;

    // The gateway's certificate for its Service's DNS name, and the client's, from a CA made
    // here; the services' CA (Kafka and Redis) is the environment's.
    let service_dns = format!("{QP}-gateway.{}.svc", e.ns);
    let pki = Pki::new(&format!("e2e-{}", e.ns));
    pki.ca("gateway-ca")
        .issue(
            "gateway",
            "gateway-ca",
            &service_dns,
            &format!("subjectAltName=DNS:{service_dns}\nextendedKeyUsage=serverAuth"),
        )
        .issue("e2e", "gateway-ca", "e2e", "extendedKeyUsage=clientAuth");
    let services_ca = std::fs::read_to_string(env.get("QP_ENV_SERVICES_CA")).unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "secured-credentials"},
        "stringData": {
            "kafka-username": env.get("QP_ENV_KAFKA_SASL_USER"),
            "kafka-password": env.get("QP_ENV_KAFKA_SASL_PASSWORD"),
            "redis-username": env.get("QP_ENV_REDIS_USER"),
            "redis-password": env.get("QP_ENV_REDIS_PASSWORD"),
            "services-ca": services_ca,
            "gateway-cert": pki.read("gateway.crt"),
            "gateway-key": pki.read("gateway.key"),
            "gateway-client-ca": pki.read("gateway-ca.crt"),
        }
    }))
    .unwrap();
    e.api::<Secret>()
        .create(&Default::default(), &secret)
        .await
        .unwrap();
    let key = |k: &str| json!({"name": "secured-credentials", "key": k});
    // A scaling signal the operator's pod reads through TLS as the ACL user.
    let pending = format!("{{{}}}:pending", e.ns);
    let _: () = redis::cmd("SET")
        .arg(&pending)
        .arg(15)
        .query_async(&mut e.redis.clone())
        .await
        .unwrap();
    let qp = json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": QP, "namespace": e.ns},
        "spec": {
            "source": {"kafka": {
                "bootstrapServers": env.get("QP_POD_KAFKA_SASL_BOOTSTRAP"),
                "topic": topic,
                "consumerGroup": format!("{topic}-workers"),
                "autoOffsetReset": "earliest",
                "sasl": {"mechanism": "SCRAM-SHA-512",
                         "usernameSecretRef": key("kafka-username"),
                         "passwordSecretRef": key("kafka-password")},
                "tls": {"caSecretRef": key("services-ca")}
            }},
            "redis": {
                "url": env.get("QP_POD_REDIS_TLS_URL"),
                "usernameSecretRef": key("redis-username"),
                "passwordSecretRef": key("redis-password"),
                "caSecretRef": key("services-ca")
            },
            "concurrency": {"perReplicaTokens": 4, "globalMaxTokens": 16},
            "scaling": {
                "minReplicas": 1, "maxReplicas": 2, "pollIntervalSeconds": 1,
                "scaleDownStabilizationSeconds": 1,
                "signals": [{"name": "pending", "type": "counter", "key": pending,
                             "targetPerReplica": 10}]
            },
            "worker": e.worker_spec(),
            "gateway": {
                "enabled": true, "replicas": 1,
                "auth": {"mtls": {"certSecretRef": key("gateway-cert"),
                                  "keySecretRef": key("gateway-key"),
                                  "clientCaSecretRef": key("gateway-client-ca")}}
            }
        }
    });
    e.apply_qp(&qp).await;
    eventually(
        Duration::from_secs(90),
        "the secured worker and gateway pods Ready",
        || async {
            let worker = e.replicas(&format!("{QP}-worker")).await.1;
            let gateway = e.replicas(&format!("{QP}-gateway")).await.1;
            (worker >= 1 && gateway >= 1).then_some(())
        },
    )
    .await;
    // Ready=True: the operator's pod measured the lag through SASL_SSL and read the workers'
    // counters through TLS as the ACL user.
    let ready = eventually(Duration::from_secs(60), "secured Ready=True", || async {
        e.condition(QP, "Ready").await.filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(ready.0, "True");
    e.time(
        "secured QueueProcessor (SASL_SSL, Redis TLS, mTLS) applied to Ready",
        t.elapsed(),
    );
    // The counter of 15 at 10 per replica: 2 workers (one per partition), the signal in the
    // status.
    eventually(
        Duration::from_secs(30),
        "2 replicas for the signal",
        || async {
            let signals = e.qp(QP).await.status?.signals;
            let read = signals
                .iter()
                .any(|s| s.name == "pending" && s.value == Some(15.0));
            (read && e.replicas(&format!("{QP}-worker")).await.0 == 2).then_some(())
        },
    )
    .await;
    let _: () = redis::cmd("DEL")
        .arg(&pending)
        .query_async(&mut e.redis.clone())
        .await
        .unwrap();

    // Messages from Kafka, through SASL_SSL in the pods, with results in Redis over TLS.
    let t = Instant::now();
    let ids: Vec<String> = (0..200).map(|i| format!("s-{i}")).collect();
    kafka::send_many(
        &kafka::producer(&env.get("QP_KAFKA_BOOTSTRAP")),
        &topic,
        &ids,
    )
    .await;
    let keys = Keys::new(&e.ns, QP);
    eventually(
        Duration::from_secs(90),
        "secured: 200 messages done",
        || async {
            let states = fixture::states(&e.redis, &keys, &ids).await;
            (states.values().filter(|s| *s == "done").count() == ids.len()).then_some(())
        },
    )
    .await;
    e.time(
        "200 messages through SASL_SSL and Redis TLS in pods",
        t.elapsed(),
    );

    // The gateway's Service on 443 with a client certificate; without one, nothing (the TLS
    // handshake fails: the Service accepts TCP connections by then).
    let addr = e.service_routed(&format!("{QP}-gateway")).await;
    assert_eq!(addr.port(), 443);
    let client = |identity: Option<&str>| {
        pki.client_builder("gateway-ca", identity)
            .resolve(&service_dns, addr)
            .build()
            .unwrap()
    };
    let base = format!("https://{service_dns}/v1/requests");
    assert!(
        client(None).post(&base).body("x").send().await.is_err(),
        "no certificate, no answer"
    );
    let http = client(Some("e2e"));
    let accepted: Json = http
        .post(&base)
        .header("content-type", "text/plain")
        .header("idempotency-key", "mtls-1")
        .body("through mTLS")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(accepted["id"], "e2e:mtls-1", "{accepted}");
    let answer: Json = http
        .get(format!("{base}/e2e:mtls-1?wait=20"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "done", "{answer}");

    // Leave the node to the phases after this one.
    e.delete_qp(QP).await;
    kafka::delete_topic(&env.get("QP_KAFKA_BOOTSTRAP"), &topic).await;
}
