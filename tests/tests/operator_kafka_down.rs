//! The operator when Kafka goes away: replicas hold (never scale to zero because the broker is
//! unreachable), the condition and an event name the problem, and scaling resumes when Kafka is
//! back. Its own test binary, because stopping Kafka would disturb every other Kafka test
//! (`cargo test` runs test binaries one at a time).

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use qp_operator::crd::QueueProcessor;
use qp_tests::cluster::{self, MANAGER};
use qp_tests::env;
use qp_tests::fixture::eventually;
use qp_tests::kafka;
use serde_json::json;

/// Restarts Kafka when dropped, so a failing assertion never leaves it down.
struct KafkaStopped;

fn env_script(action: &str) {
    let status = Command::new("bash")
        .arg(env::workspace_root().join("hack/env.sh"))
        .args([action, "kafka"])
        .status()
        .expect("run hack/env.sh");
    assert!(status.success(), "hack/env.sh {action} kafka failed");
}

impl KafkaStopped {
    fn stop() -> KafkaStopped {
        env_script("stop");
        KafkaStopped
    }
}

impl Drop for KafkaStopped {
    fn drop(&mut self) {
        env_script("start");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_hold_while_kafka_is_down_and_scaling_resumes() {
    let env = env::load();
    let client = env::kube_client().await;
    cluster::install_crd(&client).await;
    let ns = cluster::create_namespace(&client, "op-down").await;
    let bootstrap = env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("down-{ns}");
    kafka::create_topic(&bootstrap, &topic, 4).await;
    let ids: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    kafka::send_many(&kafka::producer(&bootstrap), &topic, &ids).await;

    let (_op, _) = cluster::start_operator(&env, &ns, "op-a", 15);
    let qp = json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": "resilient", "namespace": ns},
        "spec": {
            "source": {"kafka": {"bootstrapServers": bootstrap, "topic": topic,
                                 "consumerGroup": format!("{topic}-group")}},
            "redis": {"url": env.get("QP_REDIS_URL")},
            "scaling": {"minReplicas": 0, "maxReplicas": 4, "targetBacklogPerReplica": 10,
                        "pollIntervalSeconds": 1, "cooldownSeconds": 2,
                        "scaleDownStabilizationSeconds": 2},
            "worker": {"handler": {"builtin": {"name": "echo"}}}
        }
    });
    let qps: Api<QueueProcessor> = Api::namespaced(client.clone(), &ns);
    qps.patch(
        "resilient",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&qp),
    )
    .await
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let replicas = || async {
        deployments
            .get_opt("resilient-worker")
            .await
            .ok()
            .flatten()
            .and_then(|d| d.spec?.replicas)
    };
    eventually(
        Duration::from_secs(30),
        "3 replicas for 30 messages",
        || async { (replicas().await == Some(3)).then_some(()) },
    )
    .await;

    let condition = |type_: &'static str| {
        let qps = qps.clone();
        async move {
            let qp = qps.get("resilient").await.ok()?;
            let c = qp.status.as_ref()?.condition(type_)?.clone();
            Some((c.status, c.reason, c.message))
        }
    };

    {
        let _down = KafkaStopped::stop();
        let stopped = Instant::now();
        let (_, reason, message) =
            eventually(Duration::from_secs(40), "SourceReachable=False", || async {
                let c = condition("SourceReachable").await?;
                (c.0 == "False").then_some(c)
            })
            .await;
        println!(
            "Kafka down noticed after {:?}: {reason}: {message}",
            stopped.elapsed()
        );
        assert_eq!(reason, "SourceUnreachable");
        // Well past the cooldown: still 3, never 0.
        let hold_until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < hold_until {
            assert_eq!(
                replicas().await,
                Some(3),
                "replicas must hold while Kafka is down"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        let warned = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|e| e.reason.as_deref() == Some("SourceUnreachable"));
        assert!(warned, "a Warning event names the problem");
    } // Kafka starts again here.

    eventually(
        Duration::from_secs(60),
        "SourceReachable=True again",
        || async {
            let c = condition("SourceReachable").await?;
            (c.0 == "True").then_some(())
        },
    )
    .await;
    // Scaling resumes: more backlog, more replicas.
    let more: Vec<String> = (30..40).map(|i| format!("m{i}")).collect();
    kafka::send_many(&kafka::producer(&bootstrap), &topic, &more).await;
    eventually(
        Duration::from_secs(20),
        "4 replicas for 40 messages",
        || async { (replicas().await == Some(4)).then_some(()) },
    )
    .await;

    qps.delete("resilient", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the QueueProcessor to go",
        || async {
            qps.get_opt("resilient")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    kafka::delete_topic(&bootstrap, &topic).await;
    cluster::delete_namespace(&client, &ns).await;
}
