//! The operator at a thousand QueueProcessors (issue 12's figures), against the real API server
//! and Kafka:
//!
//! - 1000 QueueProcessors with 1000 consumer groups over 10 topics of 100 partitions: 990 that
//!   only measure (`minReplicas` 0 and an activation threshold no backlog reaches, so they never
//!   start pods) and one latency probe per topic (`minReplicas` 1, default scaling). All poll
//!   at the default interval.
//! - `operator.decision_latency_p99_s_1000_qps`: 250 messages produced to one probe's topic
//!   (its group at 1 replica wants 3) until its Deployment's `spec.replicas` changes; ten
//!   samples, one per probe, the other 999 QueueProcessors polling meanwhile.
//! - Then traffic to every topic for a measured window:
//!   `operator.api_requests_per_qp_per_poll` is the API server's own `apiserver_request_total`
//!   for the resources the operator uses (QueueProcessors and their status; Deployments, Pods,
//!   Services, Events and Secrets apart from status subresources) over the window, per QueueProcessor and poll interval;
//!   `operator.kafka_requests_per_poll_1000_qps` is the operator's count of requests sent to
//!   Kafka over the window per poll interval (every QueueProcessor measured once per interval);
//!   `operator.rss_mb_1000_qps` is the operator's resident memory at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use qp_operator::crd::QueueProcessor;
use rdkafka::producer::FutureRecord;
use serde_json::json;

use super::operator::{apply, operator, percentile, rss_mb, wait_measured, wait_replicas};
use super::{Figure, setting};
use crate::cluster;
use crate::env::Env;
use crate::kafka;

const TOPICS: usize = 10;
const PARTITIONS: i32 = 100;
/// The default `pollIntervalSeconds`.
const POLL_SECONDS: f64 = 2.0;
/// Resources whose API traffic is the operator's (others are the controller manager's and the
/// kubelet's).
const OPERATOR_RESOURCES: &[&str] = &[
    "queueprocessors",
    "pods",
    "deployments",
    "services",
    "events",
    "secrets",
];

fn fleet_qp(env: &Env, ns: &str, name: &str, topic: &str, probe: bool) -> serde_json::Value {
    let scaling = if probe {
        json!({"maxReplicas": 3})
    } else {
        json!({"minReplicas": 0, "maxReplicas": 1, "activationBacklog": 1_000_000_000})
    };
    json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "source": {"kafka": {"bootstrapServers": env.get("QP_KAFKA_BOOTSTRAP"),
                                 "topic": topic, "consumerGroup": format!("{name}-group")}},
            "redis": {"url": env.get("QP_REDIS_URL")},
            "scaling": scaling,
            "worker": {"handler": {"builtin": {"name": "echo"}}}
        }
    })
}

/// `apiserver_request_total` summed over the operator's resources.
async fn operator_api_requests(client: &Client) -> f64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.expect("API server metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            let label = |k: &str| {
                l.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_owned()
            };
            let resource = label("resource");
            // Status subresources are written by the controller manager, the scheduler and
            // the kubelet; the operator's own status writes go to queueprocessors/status.
            OPERATOR_RESOURCES.contains(&resource.as_str())
                && (resource == "queueprocessors" || label("subresource").is_empty())
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn run(env: &Env, client: &Client) -> Vec<Figure> {
    let total: usize = setting("QP_BENCH_FLEET_QPS", 1000);
    let ns = cluster::create_namespace(client, "bench-fleet").await;
    let bootstrap = env.get("QP_KAFKA_BOOTSTRAP");
    let topics: Vec<String> = (0..TOPICS).map(|t| format!("{ns}-t{t}")).collect();
    for t in &topics {
        kafka::create_topic(&bootstrap, t, PARTITIONS).await;
    }
    let (op, port) = operator(env, &ns);
    let started = Instant::now();
    let bodies: Vec<serde_json::Value> = (0..total)
        .map(|i| {
            let topic = &topics[i % TOPICS];
            if i < TOPICS {
                fleet_qp(env, &ns, &format!("probe{i}"), topic, true)
            } else {
                fleet_qp(env, &ns, &format!("f{i:04}"), topic, false)
            }
        })
        .collect();
    futures::stream::iter(bodies.iter())
        .for_each_concurrent(16, |b| apply(client, &ns, b))
        .await;
    eprintln!(
        "[bench] {total} QueueProcessors applied in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    // Every one reconciled and measured once.
    wait_measured(client, &ns, total, Duration::from_secs(300)).await;
    let api: Api<QueueProcessor> = Api::namespaced(client.clone(), &ns);
    eprintln!(
        "[bench] all measured {:.0}s after the first apply; rss {:.1} MB",
        started.elapsed().as_secs_f64(),
        rss_mb(op.pid())
    );

    let latencies = latency(client, &ns, &bootstrap, &topics).await;
    let mut out = vec![(
        "operator.decision_latency_p99_s_1000_qps".into(),
        percentile(&latencies, 0.99),
        "s".into(),
    )];
    out.extend(steady_traffic(client, port, &bootstrap, &topics, total).await);
    out.push((
        "operator.rss_mb_1000_qps".into(),
        rss_mb(op.pid()),
        "MB".into(),
    ));

    // The operator cleans up the QueueProcessors' Redis keys; what is left after a minute is
    // removed with the namespace.
    let _ = api
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && !api
            .list(&ListParams::default().limit(1))
            .await
            .map(|l| l.items.is_empty())
            .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(op);
    cluster::delete_namespace(client, &ns).await;
    for t in &topics {
        kafka::delete_topic(&bootstrap, t).await;
    }
    out
}

/// Backlog change to `spec.replicas` change, once per probe.
async fn latency(client: &Client, ns: &str, bootstrap: &str, topics: &[String]) -> Vec<f64> {
    let producer = kafka::producer(bootstrap);
    let mut latencies = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        let name = format!("probe{i}");
        wait_replicas(client, ns, &name, 1, Duration::from_secs(60)).await;
        // Land at a random phase of the 2 s poll, as a real burst would.
        let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * 2000 / 255;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        let ids: Vec<String> = (0..250).map(|j| format!("{name}-{j}")).collect();
        kafka::send_many(&producer, topic, &ids).await;
        let crossed = Instant::now();
        wait_replicas(client, ns, &name, 3, Duration::from_secs(60)).await;
        latencies.push(crossed.elapsed().as_secs_f64());
        eprintln!(
            "[bench] 1000-QP decision latency sample {}/{}: {:.3}s",
            i + 1,
            topics.len(),
            latencies[latencies.len() - 1]
        );
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// Traffic to every topic for a window; API and Kafka requests over it.
async fn steady_traffic(
    client: &Client,
    port: u16,
    bootstrap: &str,
    topics: &[String],
    total: usize,
) -> Vec<Figure> {
    let window = Duration::from_secs(setting("QP_BENCH_FLEET_WINDOW_SECONDS", 60));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (producer, topics, stop) = (kafka::producer(bootstrap), topics.to_vec(), stop.clone());
        tokio::spawn(async move {
            // 100 messages a second over all topics: every group's backlog moves every poll.
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..10 {
                    let topic = &topics[(n as usize) % topics.len()];
                    let key = n.to_string();
                    let _ = producer.send_result(FutureRecord::to(topic).key(&key).payload("x"));
                    n += 1;
                }
            }
            n
        })
    };
    // One window of traffic first, so every QueueProcessor's numbers are moving.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let metric =
        |name: &'static str| async move { cluster::metric_sum(port, name).await.unwrap_or(0.0) };
    let (api0, kafka0, rec0) = (
        operator_api_requests(client).await,
        metric("qp_operator_kafka_requests_total").await,
        metric("qp_operator_reconciles_total").await,
    );
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let (api1, kafka1, rec1) = (
        operator_api_requests(client).await,
        metric("qp_operator_kafka_requests_total").await,
        metric("qp_operator_reconciles_total").await,
    );
    let polls = t0.elapsed().as_secs_f64() / POLL_SECONDS;
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.unwrap_or(0);
    let per_qp_poll = |d: f64| d / (total as f64 * polls);
    eprintln!(
        "[bench] {:.0}s of traffic ({sent} messages): {} API requests, {} Kafka requests, \
         {} reconciles ({:.2} per QueueProcessor per poll)",
        t0.elapsed().as_secs_f64(),
        api1 - api0,
        kafka1 - kafka0,
        rec1 - rec0,
        per_qp_poll(rec1 - rec0),
    );
    vec![
        (
            "operator.api_requests_per_qp_per_poll".into(),
            per_qp_poll(api1 - api0),
            "requests".into(),
        ),
        (
            "operator.kafka_requests_per_poll_1000_qps".into(),
            (kafka1 - kafka0) / polls,
            "requests".into(),
        ),
    ]
}
