//! Operator figures:
//!
//! - `operator.decision_latency_p50_s` / `_p99_s`: a backlog crosses a scaling threshold (a
//!   burst is produced to an idle QueueProcessor's topic with default scaling settings, 2 s
//!   polls) until the worker Deployment's `spec.replicas` changes, watched on the API server.
//!   The anchor, KEDA, polls every 30 s and then waits for an HPA sync (15 s).
//! - `operator.rss_mb_100_qps`: resident memory of `qp-operator run` reconciling 100
//!   QueueProcessors (Kafka sources, each with its own consumer group).
//! - `operator.kafka_requests_per_poll`: requests sent to Kafka by one lag measurement of a
//!   100-partition topic (committed offsets + end offsets + group state), counted by librdkafka.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use qp_operator::crd::QueueProcessor;
use qp_operator::measure::{Probes, SourceTarget};
use qp_protocol::redis_conn::RedisSettings;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;

use super::Figure;
use crate::cluster::{self, MANAGER};
use crate::env::{self, Env};
use crate::kafka;
use crate::procs::{self, Proc};

fn bin(name: &str) -> std::path::PathBuf {
    match std::env::var_os("QP_BIN_DIR") {
        Some(dir) => std::path::PathBuf::from(dir).join(name),
        None => procs::binary(name),
    }
}

pub(super) fn operator(env: &Env, ns: &str) -> (Proc, u16) {
    let port = procs::free_port();
    let mut cmd = Command::new(bin("qp-operator"));
    cmd.arg("run")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--watch-namespace", ns, "--lease-namespace", ns])
        .args(["--leader-election", "false"])
        .env("KUBECONFIG", env.get("KUBECONFIG"))
        // QP_TEST_OPERATOR_LOG raises the level when a figure needs looking into.
        .env(
            "RUST_LOG",
            std::env::var("QP_TEST_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
        );
    (Proc::spawn(&format!("bench-operator-{ns}"), cmd), port)
}

fn qp(env: &Env, ns: &str, name: &str, topic: &str) -> serde_json::Value {
    json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "source": {"kafka": {"bootstrapServers": env.get("QP_KAFKA_BOOTSTRAP"),
                                 "topic": topic, "consumerGroup": format!("{name}-group")}},
            "redis": {"url": env.get("QP_REDIS_URL")},
            "worker": {"handler": {"builtin": {"name": "echo"}}}
        }
    })
}

pub(super) async fn apply(client: &Client, ns: &str, body: &serde_json::Value) {
    let api: Api<QueueProcessor> = Api::namespaced(client.clone(), ns);
    api.patch(
        body["metadata"]["name"].as_str().unwrap(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .expect("apply QueueProcessor");
}

async fn replicas(client: &Client, ns: &str, name: &str) -> Option<i32> {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(&format!("{name}-worker"))
        .await
        .ok()
        .flatten()
        .and_then(|d| d.spec?.replicas)
}

/// Wait until `name`'s worker Deployment asks for `want` replicas (polled every 20 ms, the
/// resolution of the latency figures).
pub(super) async fn wait_replicas(
    client: &Client,
    ns: &str,
    name: &str,
    want: i32,
    limit: Duration,
) {
    let what = format!("{name} at {want} replicas");
    crate::fixture::eventually(limit, &what, || async {
        (replicas(client, ns, name).await == Some(want)).then_some(())
    })
    .await;
}

/// Wait until `total` QueueProcessors in `ns` have a measured backlog in their status, saying
/// how many every few seconds.
pub(super) async fn wait_measured(client: &Client, ns: &str, total: usize, limit: Duration) {
    let api: Api<QueueProcessor> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + limit;
    loop {
        let list = api.list(&Default::default()).await.expect("list");
        let done = list
            .items
            .iter()
            .filter(|q| q.status.as_ref().and_then(|s| s.backlog).is_some())
            .count();
        if done == total {
            return;
        }
        eprintln!("[bench] {done}/{total} QueueProcessors measured");
        assert!(Instant::now() < deadline, "only {done}/{total} measured");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub async fn run(env: &Env) -> Vec<Figure> {
    let client = env::kube_client().await;
    cluster::install_crd(&client).await;
    // QP_BENCH_OPERATOR_PARTS=small or =fleet runs one half (the fleet takes minutes).
    let parts: String = super::setting("QP_BENCH_OPERATOR_PARTS", "all".to_owned());
    let mut out = Vec::new();
    if parts != "fleet" {
        out.extend(decision_latency(env, &client).await);
        out.extend(rss_with_100(env, &client).await);
        out.push(kafka_requests_per_poll(env).await);
    }
    if parts != "small" {
        out.extend(super::fleet::run(env, &client).await);
    }
    out
}

async fn decision_latency(env: &Env, client: &Client) -> Vec<Figure> {
    let ns = cluster::create_namespace(client, "bench-latency").await;
    let bootstrap = env.get("QP_KAFKA_BOOTSTRAP");
    let (_op, _) = operator(env, &ns);
    let samples = 12;
    let mut latencies = Vec::new();
    let producer = kafka::producer(&bootstrap);
    for i in 0..samples {
        let name = format!("lat{i}");
        let topic = format!("{ns}-{name}");
        kafka::create_topic(&bootstrap, &topic, 6).await;
        apply(client, &ns, &qp(env, &ns, &name, &topic)).await;
        // Idle at the minimum (1) first.
        wait_replicas(client, &ns, &name, 1, Duration::from_secs(30)).await;
        // Let the start-up churn (Deployment status updates also trigger reconciles) pass, and
        // land at a random phase of the 2 s poll, as a real burst would.
        let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * 2000 / 255;
        tokio::time::sleep(Duration::from_millis(3000 + jitter)).await;
        // 250 messages at the default 100 per replica: 3 replicas wanted.
        let ids: Vec<String> = (0..250).map(|j| format!("{name}-{j}")).collect();
        kafka::send_many(&producer, &topic, &ids).await;
        let crossed = Instant::now();
        wait_replicas(client, &ns, &name, 3, Duration::from_secs(30)).await;
        latencies.push(crossed.elapsed().as_secs_f64());
        eprintln!(
            "[bench] decision latency sample {}/{samples}: {:.3}s",
            i + 1,
            latencies[latencies.len() - 1]
        );
        kafka::delete_topic(&bootstrap, &topic).await;
    }
    cluster::delete_namespace(client, &ns).await;
    latencies.sort_by(f64::total_cmp);
    vec![
        (
            "operator.decision_latency_p50_s".into(),
            percentile(&latencies, 0.5),
            "s".into(),
        ),
        (
            "operator.decision_latency_p99_s".into(),
            percentile(&latencies, 0.99),
            "s".into(),
        ),
    ]
}

async fn rss_with_100(env: &Env, client: &Client) -> Vec<Figure> {
    let ns = cluster::create_namespace(client, "bench-rss").await;
    let bootstrap = env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("{ns}-shared");
    kafka::create_topic(&bootstrap, &topic, 6).await;
    let (op, port) = operator(env, &ns);
    for i in 0..100 {
        apply(client, &ns, &qp(env, &ns, &format!("qp{i:03}"), &topic)).await;
    }
    // Wait until every QueueProcessor was reconciled, then a few more polls.
    wait_measured(client, &ns, 100, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss = rss_mb(op.pid());
    let reconciles = cluster::metric(port, "qp_operator_reconciles_total")
        .await
        .unwrap_or(0.0);
    eprintln!("[bench] 100 QueueProcessors: rss {rss:.1} MB after {reconciles} reconciles");
    drop(op);
    cluster::delete_namespace(client, &ns).await;
    kafka::delete_topic(&bootstrap, &topic).await;
    vec![("operator.rss_mb_100_qps".into(), rss, "MB".into())]
}

async fn kafka_requests_per_poll(env: &Env) -> Figure {
    let bootstrap = env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!(
        "bench-partitions-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let group = format!("{topic}-group");
    kafka::create_topic(&bootstrap, &topic, 100).await;
    // A group that committed every partition (the steady state of a running workload).
    {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..100 {
            tpl.add_partition_offset(&topic, p, Offset::Offset(0))
                .unwrap();
        }
        consumer.commit(&tpl, CommitMode::Sync).expect("commit");
    }
    let probes = Probes::default();
    let target = SourceTarget::Kafka {
        bootstrap: bootstrap.clone(),
        topic: topic.clone(),
        group,
        properties: Vec::new(),
    };
    let redis = RedisSettings::single(env.get("QP_REDIS_URL"));
    // Warm up: connections, API versions, metadata; a new topic's leaders take a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = probes.source("bench/lag", &target, &redis).await {
        assert!(Instant::now() < deadline, "measuring the new topic: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settle = || async {
        // librdkafka reports statistics every second.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        probes.kafka_requests()
    };
    let before = settle().await;
    let polls = 20;
    for _ in 0..polls {
        let r = probes
            .source("bench/lag", &target, &redis)
            .await
            .expect("measure");
        assert_eq!(r.partitions, Some(100));
    }
    let after = settle().await;
    kafka::delete_topic(&bootstrap, &topic).await;
    let per_poll = (after - before) as f64 / f64::from(polls);
    eprintln!(
        "[bench] {polls} lag polls of a 100-partition topic: {} requests",
        after - before
    );
    (
        "operator.kafka_requests_per_poll".into(),
        per_poll,
        "requests".into(),
    )
}
