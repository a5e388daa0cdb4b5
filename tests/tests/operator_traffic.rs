//! What the operator asks of the API server while a workload is busy, and what it leaves alone.
//! `qp-operator run` against the real kube-apiserver, Kafka and Redis; pods never start (the
//! node is tainted against them), which is all these tests need.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::watcher;
use qp_operator::crd::QueueProcessor;
use qp_tests::fixture::eventually;
use qp_tests::kafka;
use qp_tests::operator::*;
use qp_tests::{cluster, procs};
use serde_json::json;

async fn reconciles(port: u16) -> f64 {
    cluster::metric_sum(port, "qp_operator_reconciles_total")
        .await
        .unwrap_or(0.0)
}

/// An idle workload that may scale to zero has nothing new to say, so its status is not
/// written. The policy's memory in the status (`scalingMemory.idleSince`) used to be converted
/// to wall-clock time with each poll's clock, which moved it by milliseconds: the status
/// differed at every poll and was written at every poll (320 writes a second at a thousand
/// QueueProcessors), each one an API request although the API server stored nothing new.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_workload_writes_no_status() {
    let s = setup("op-idle").await;
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    let (_op, port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(&s, &kafka_qp(&s, "orders", &topic, 0, json!({}))).await;
    eventually(
        Duration::from_secs(30),
        "idleSince in the status",
        || async {
            qp_status(&s, "orders")
                .await
                .status?
                .scaling_memory?
                .idle_since
        },
    )
    .await;
    let writes = || async {
        cluster::metric(port, "qp_operator_status_writes_total")
            .await
            .unwrap_or(0.0)
    };
    let (w0, r0) = (writes().await, reconciles(port).await);
    // Five more polls (pollIntervalSeconds is 1).
    eventually(Duration::from_secs(20), "five more polls", || async {
        (reconciles(port).await >= r0 + 5.0).then_some(())
    })
    .await;
    let (w1, r1) = (writes().await, reconciles(port).await);
    println!("{} status writes in {} idle polls", w1 - w0, r1 - r0);
    assert_eq!(w1, w0, "status written while nothing changed");
    cluster::delete_namespace(&s.client, &s.ns).await;
}

/// Under steady traffic the backlog and rates change at every poll. Writing them into the
/// status used to start the next reconcile at once (the watch saw our own write), so the
/// operator reconciled as fast as it could instead of once per poll, and wrote the status as
/// often. Now a reconcile starts on spec, annotation and owned-object changes and on the poll
/// timer, and live numbers are written at most every 30 s.
#[tokio::test(flavor = "multi_thread")]
async fn reconciles_once_per_poll_and_writes_status_only_on_change_under_traffic() {
    let s = setup("op-poll").await;
    let bootstrap = s.env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&bootstrap, &topic, 4).await;
    let (_op, port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    // A fixed replica count: nothing but the numbers changes while traffic flows.
    let mut qp = kafka_qp(&s, "orders", &topic, 2, json!({}));
    qp["spec"]["scaling"]["maxReplicas"] = json!(2);
    apply_qp(&s, &qp).await;
    eventually(Duration::from_secs(30), "a first status", || async {
        qp_status(&s, "orders").await.status?.backlog
    })
    .await;

    // Traffic: a few messages every 100 ms for the whole window (bounded: 12 s at most).
    let stop = Arc::new(AtomicBool::new(false));
    let producing = tokio::spawn({
        let (stop, bootstrap, topic) = (stop.clone(), bootstrap.clone(), topic.clone());
        async move {
            let producer = kafka::producer(&bootstrap);
            let started = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(12) {
                let ids: Vec<String> = (0..5).map(|i| format!("m{n}-{i}")).collect();
                kafka::send_many(&producer, &topic, &ids).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n * 5
        }
    });
    // Count the QueueProcessor's modifications (status writes) through a watch.
    let api: Api<QueueProcessor> = Api::namespaced(s.client.clone(), &s.ns);
    let modified = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watching = tokio::spawn({
        let modified = modified.clone();
        let cfg = watcher::Config::default().fields("metadata.name=orders");
        async move {
            let mut events = std::pin::pin!(watcher(api, cfg));
            while let Some(Ok(ev)) = events.next().await {
                if let watcher::Event::Apply(_) = ev {
                    modified.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    // The backlog grows: the operator sees traffic.
    let seen = qp_status(&s, "orders")
        .await
        .status
        .unwrap()
        .backlog
        .unwrap();
    eventually(Duration::from_secs(10), "a growing backlog", || async {
        let b = qp_status(&s, "orders").await.status?.backlog?;
        (b > seen).then_some(())
    })
    .await;

    let window = Duration::from_secs(8);
    let (r0, m0, t0) = (
        reconciles(port).await,
        modified.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(window).await; // the measurement window itself, not a wait for a state
    let (r1, m1, took) = (
        reconciles(port).await,
        modified.load(Ordering::Relaxed),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    let sent = producing.await.unwrap();
    watching.abort();

    let polls = took.as_secs_f64(); // pollIntervalSeconds is 1
    let reconciled = r1 - r0;
    let writes = m1 - m0;
    println!(
        "{sent} messages sent; in {took:?}: {reconciled} reconciles ({polls:.1} polls), \
         {writes} modifications of the QueueProcessor"
    );
    assert!(
        reconciled <= polls + 3.0,
        "{reconciled} reconciles in {took:?} at a 1 s poll interval: the operator triggers itself"
    );
    assert!(
        writes <= 2,
        "{writes} status writes in {took:?} while only live numbers changed"
    );
}

/// With the gateway disabled, the operator removes the gateway objects it made, and only
/// those: a Deployment or Service named `<name>-gateway` that the QueueProcessor does not
/// control belongs to someone else.
#[tokio::test(flavor = "multi_thread")]
async fn leaves_gateway_objects_it_does_not_own_alone() {
    let s = setup("op-own").await;
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    // The user's own objects. The Deployment even carries our managed-by label (copied from
    // an example, say): only the owner reference makes an object ours.
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    let services: Api<Service> = Api::namespaced(s.client.clone(), &s.ns);
    let user_deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "orders-gateway",
                     "labels": {"app": "mine", "app.kubernetes.io/managed-by": "qp-operator"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "mine"}},
            "template": {"metadata": {"labels": {"app": "mine"}},
                         "spec": {"containers": [{"name": "c", "image": "example.invalid/mine:1"}]}}
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &user_deployment)
        .await
        .unwrap();
    let user_service: Service = serde_json::from_value(json!({
        "metadata": {"name": "orders-gateway"},
        "spec": {"selector": {"app": "mine"}, "ports": [{"port": 80}]}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &user_service)
        .await
        .unwrap();

    let (_op, port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(&s, &kafka_qp(&s, "orders", &topic, 1, json!({}))).await;
    eventually(Duration::from_secs(30), "the worker Deployment", || async {
        deployment(&s, "orders-worker").await
    })
    .await;
    // Several ticks, each of which would have deleted them.
    let start = reconciles(port).await;
    eventually(Duration::from_secs(20), "three more reconciles", || async {
        (reconciles(port).await >= start + 3.0).then_some(())
    })
    .await;
    assert!(
        deployments
            .get_opt("orders-gateway")
            .await
            .unwrap()
            .is_some(),
        "the user's Deployment orders-gateway was deleted"
    );
    assert!(
        services.get_opt("orders-gateway").await.unwrap().is_some(),
        "the user's Service orders-gateway was deleted"
    );
}

/// Many QueueProcessors on one Kafka cluster share one connection per broker and one round of
/// requests: it used to be a librdkafka client per consumer group (several connections each),
/// each sending its own metadata, ListOffsets, OffsetFetch and group listing every poll, and
/// never closed. Now a round serves every group, and the connections go when the last
/// QueueProcessor using the cluster does.
#[tokio::test(flavor = "multi_thread")]
async fn groups_on_one_cluster_share_connections_and_requests_and_release_them() {
    const QPS: usize = 20;
    let s = setup("op-fleet").await;
    let bootstrap = s.env.get("QP_KAFKA_BOOTSTRAP");
    let kafka_port: u16 = bootstrap.rsplit(':').next().unwrap().parse().unwrap();
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&bootstrap, &topic, 4).await;
    let (op, port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    for i in 0..QPS {
        let mut qp = kafka_qp(&s, &format!("qp{i:02}"), &topic, 1, json!({}));
        qp["spec"]["source"]["kafka"]["consumerGroup"] = json!(format!("{topic}-g{i:02}"));
        apply_qp(&s, &qp).await;
    }
    let api: Api<QueueProcessor> = Api::namespaced(s.client.clone(), &s.ns);
    eventually(
        Duration::from_secs(60),
        "every QueueProcessor measured",
        || async {
            let list = api.list(&Default::default()).await.ok()?;
            let measured = list
                .items
                .iter()
                .filter(|q| q.status.as_ref().and_then(|s| s.backlog).is_some())
                .count();
            (measured == QPS).then_some(())
        },
    )
    .await;

    let requests = || async {
        cluster::metric_sum(port, "qp_operator_kafka_requests_total")
            .await
            .unwrap_or(0.0)
    };
    let (r0, t0) = (requests().await, Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await; // the measurement window
    let (r1, took) = (requests().await, t0.elapsed());
    let per_poll = (r1 - r0) / took.as_secs_f64(); // pollIntervalSeconds is 1
    let connections = procs::tcp_connections_to(op.pid(), kafka_port);
    println!(
        "{QPS} QueueProcessors, 20 groups: {per_poll:.1} Kafka requests per poll, \
         {connections} connections to the broker"
    );
    assert!(
        per_poll <= 12.0,
        "{per_poll:.1} Kafka requests per poll for {QPS} groups on one broker"
    );
    assert!(
        (1..=2).contains(&connections),
        "{connections} connections to one broker"
    );

    // Every QueueProcessor deleted: nothing measures the cluster, its connections close.
    api.delete_collection(&Default::default(), &Default::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "no connection to the broker",
        || async { (procs::tcp_connections_to(op.pid(), kafka_port) == 0).then_some(()) },
    )
    .await;
}

/// `spec.source.kafka.autoOffsetReset` reaches the workers' environment (it used to be
/// accepted and ignored: the worker always started new groups at the earliest offset). What
/// the worker does with it is `tests/tests/worker.rs`'s
/// `a_new_group_with_latest_reset_skips_what_came_before`.
#[tokio::test(flavor = "multi_thread")]
async fn auto_offset_reset_reaches_the_worker_deployment() {
    let s = setup("op-reset").await;
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    let mut qp = kafka_qp(&s, "orders", &topic, 1, json!({}));
    qp["spec"]["source"]["kafka"]["autoOffsetReset"] = json!("latest");
    apply_qp(&s, &qp).await;
    let dep = eventually(Duration::from_secs(30), "the worker Deployment", || async {
        deployment(&s, "orders-worker").await
    })
    .await;
    let env = dep.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let reset = env
        .iter()
        .find(|e| e.name == "QP_KAFKA_AUTO_OFFSET_RESET")
        .and_then(|e| e.value.clone());
    assert_eq!(reset.as_deref(), Some("latest"), "{env:?}");
}
