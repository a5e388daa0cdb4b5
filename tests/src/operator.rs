//! Helpers of the operator's black-box tests: a namespace with the CRD installed, Kafka
//! QueueProcessors with fast polling, and reading back what the operator did.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use qp_operator::crd::QueueProcessor;
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::{Conn, RedisSettings};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;

use crate::cluster::{self, MANAGER};
use crate::env::{self, Env};

pub struct Setup {
    pub env: Env,
    pub client: Client,
    pub ns: String,
    pub redis: Conn,
}

pub async fn setup(prefix: &str) -> Setup {
    let env = env::load();
    let client = env::kube_client().await;
    cluster::install_crd(&client).await;
    let ns = cluster::create_namespace(&client, prefix).await;
    let redis = RedisSettings::single(env.get("QP_REDIS_URL"))
        .connect()
        .await
        .unwrap();
    Setup {
        env,
        client,
        ns,
        redis,
    }
}

/// The namespace goes when the test ends, passed or failed: tests that left theirs behind
/// left Pending pods (64 each for the maxStep test) that slowed every later test on the node.
impl Drop for Setup {
    fn drop(&mut self) {
        let ns = self.ns.clone();
        // A destructor cannot await: a thread with its own runtime and client does the work
        // (the test's runtime may be single-threaded, or unwinding).
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup");
            rt.block_on(async {
                let client = env::kube_client().await;
                cluster::delete_namespace(&client, &ns).await;
            });
        })
        .join();
    }
}

/// A Kafka QueueProcessor with fast polling and short windows, for tests.
pub fn kafka_qp(
    s: &Setup,
    name: &str,
    topic: &str,
    min: i32,
    extra_redis: serde_json::Value,
) -> serde_json::Value {
    let mut redis = json!({"url": s.env.get("QP_REDIS_URL")});
    if let (Some(r), Some(e)) = (redis.as_object_mut(), extra_redis.as_object()) {
        r.extend(e.clone());
    }
    json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": name, "namespace": s.ns},
        "spec": {
            "source": {"kafka": {
                "bootstrapServers": s.env.get("QP_KAFKA_BOOTSTRAP"),
                "topic": topic,
                "consumerGroup": format!("{topic}-group"),
            }},
            "redis": redis,
            "concurrency": {"perReplicaTokens": 4, "globalMaxTokens": 100},
            "scaling": {
                "minReplicas": min, "maxReplicas": 8, "targetBacklogPerReplica": 10,
                "pollIntervalSeconds": 1, "scaleDownStabilizationSeconds": 3,
                "cooldownSeconds": 3, "activationBacklog": 0
            },
            "worker": {"handler": {"builtin": {"name": "echo"}}}
        }
    })
}

pub async fn apply_qp(s: &Setup, qp: &serde_json::Value) {
    let api: Api<QueueProcessor> = Api::namespaced(s.client.clone(), &s.ns);
    let name = qp["metadata"]["name"].as_str().unwrap();
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(qp),
    )
    .await
    .expect("apply the QueueProcessor");
}

/// Make or replace Secret `name` of the test's namespace with these string values.
pub async fn put_secret(s: &Setup, name: &str, values: serde_json::Value) {
    let body = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": s.ns},
        "stringData": values
    });
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(s.client.clone(), &s.ns)
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .expect("apply the Secret");
}

/// What a refused measurement showed: the `SourceReachable` condition's reason and message,
/// and the note of the event it raised.
pub struct Refusal {
    pub reason: String,
    pub message: String,
    pub note: String,
}

/// Wait until QueueProcessor `name` reports `SourceReachable=False` with a message containing
/// `expect`, and for an event of the condition's reason made at or after `since`.
pub async fn wait_refusal(s: &Setup, name: &str, expect: &str, since: jiff::Timestamp) -> Refusal {
    let (reason, message) = crate::fixture::eventually(
        Duration::from_secs(60),
        "SourceReachable False, naming the refusal",
        || async {
            let qp = qp_status(s, name).await;
            let (status, reason, message) = condition(&qp, "SourceReachable")?;
            (status == "False" && message.contains(expect)).then_some((reason, message))
        },
    )
    .await;
    let event = crate::fixture::eventually(
        Duration::from_secs(20),
        &format!("a {reason} event"),
        || async {
            events(s, &reason)
                .await
                .into_iter()
                .find(|e| e.event_time.as_ref().is_some_and(|t| t.0 >= since))
        },
    )
    .await;
    Refusal {
        reason,
        message,
        note: event.note.unwrap_or_default(),
    }
}

/// Wait until QueueProcessor `name` reports `SourceReachable=True`; returns how long it took.
pub async fn wait_reachable(s: &Setup, name: &str) -> Duration {
    let t = std::time::Instant::now();
    crate::fixture::eventually(
        Duration::from_secs(30),
        "SourceReachable True again",
        || async {
            let qp = qp_status(s, name).await;
            let (status, ..) = condition(&qp, "SourceReachable")?;
            (status == "True").then_some(())
        },
    )
    .await;
    t.elapsed()
}

pub async fn deployment(s: &Setup, name: &str) -> Option<Deployment> {
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .get_opt(name)
        .await
        .unwrap()
}

pub async fn replicas(s: &Setup, name: &str) -> Option<i32> {
    deployment(s, name).await.and_then(|d| d.spec?.replicas)
}

pub async fn qp_status(s: &Setup, name: &str) -> QueueProcessor {
    Api::<QueueProcessor>::namespaced(s.client.clone(), &s.ns)
        .get(name)
        .await
        .unwrap()
}

pub fn condition(qp: &QueueProcessor, type_: &str) -> Option<(String, String, String)> {
    qp.status
        .as_ref()?
        .condition(type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub async fn events(s: &Setup, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(s.client.clone(), &s.ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

pub async fn token_limit(s: &Setup, name: &str) -> Option<u64> {
    redis::cmd("GET")
        .arg(Keys::new(&s.ns, name).limit())
        .query_async(&mut s.redis.clone())
        .await
        .unwrap()
}

/// A consumer of `group` that never joins it, for committing offsets by hand.
pub fn committer(bootstrap: &str, group: &str) -> BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Commit the group's offsets at the log end, as if workers had processed everything.
pub fn commit_all(bootstrap: &str, topic: &str, group: &str, partitions: i32) {
    let consumer = committer(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(5))
            .unwrap();
        tpl.add_partition_offset(topic, p, Offset::Offset(high))
            .unwrap();
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("commit offsets");
}
