//! The operator against the real kube-apiserver (with kube-controller-manager for ReplicaSets
//! and garbage collection), Kafka and Redis. `qp-operator run` is a separate process; the test
//! stands in for the kubelet by marking pods ready (the local node is tainted against them).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use qp_operator::crd::QueueProcessor;
use qp_protocol::keys::Keys;
use qp_tests::cluster::{self, MANAGER};
use qp_tests::fixture::{Silent, eventually};
use qp_tests::kafka;
use qp_tests::operator::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn scales_with_backlog_and_cleans_up_on_delete() {
    let s = setup("op-scale").await;
    let bootstrap = s.env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&bootstrap, &topic, 8).await;
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    // A neighbour whose broker does not answer must not slow this one down.
    let silent = Silent::start().await;
    let mut broken = kafka_qp(&s, "broken", "nowhere", 1, json!({}));
    broken["spec"]["source"]["kafka"]["bootstrapServers"] = json!(silent.addr.to_string());
    apply_qp(&s, &broken).await;
    // Nor one whose Redis hangs: its connects must not hold up this one's Redis calls.
    let silent_redis = Silent::start().await;
    let mut hung = kafka_qp(&s, "hung-redis", &topic, 1, json!({}));
    hung["spec"]["redis"]["url"] = json!(format!("redis://{}", silent_redis.addr));
    hung["spec"]["source"]["kafka"]["consumerGroup"] = json!(format!("{topic}-hung"));
    apply_qp(&s, &hung).await;
    apply_qp(&s, &kafka_qp(&s, "orders", &topic, 1, json!({}))).await;

    // The worker Deployment appears with the expected spec and owner reference.
    let dep = eventually(Duration::from_secs(30), "the worker Deployment", || async {
        deployment(&s, "orders-worker").await
    })
    .await;
    let owner = &dep.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("QueueProcessor", "orders")
    );
    assert_eq!(owner.controller, Some(true));
    let pod = dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.args.as_deref(), Some(&["run".to_owned()][..]));
    let env: Vec<(String, String)> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert!(env.contains(&("QP_KAFKA_TOPIC".into(), topic.clone())));
    assert!(env.contains(&("QP_HANDLER".into(), "echo".into())));
    assert_eq!(
        dep.spec.as_ref().unwrap().replicas,
        Some(1),
        "starts at minReplicas"
    );

    // A backlog of 45 at 10 per replica wants 5 replicas, within two poll intervals.
    let ids: Vec<String> = (0..45).map(|i| format!("m{i}")).collect();
    kafka::send_many(&kafka::producer(&bootstrap), &topic, &ids).await;
    let produced = Instant::now();
    // Two poll intervals (1 s each) plus 2 s of slack for a loaded CI machine.
    eventually(Duration::from_secs(4), "5 replicas", || async {
        (replicas(&s, "orders-worker").await == Some(5)).then_some(())
    })
    .await;
    let reaction = produced.elapsed();

    // Pods become ready (we play the kubelet): the token limit follows ready replicas x 4.
    let selector = "app.kubernetes.io/instance=orders,app.kubernetes.io/component=worker";
    let limit = eventually(Duration::from_secs(30), "token limit 20", || async {
        cluster::mark_pods_ready(&s.client, &s.ns, selector).await;
        token_limit(&s, "orders").await.filter(|l| *l == 20)
    })
    .await;
    assert_eq!(limit, 20);

    // Status and events say why; kubectl get qp shows live columns.
    let qp = eventually(Duration::from_secs(10), "status with backlog", || async {
        let qp = qp_status(&s, "orders").await;
        (qp.status.as_ref()?.backlog == Some(45)).then_some(qp)
    })
    .await;
    let st = qp.status.as_ref().unwrap();
    assert_eq!(st.replicas, Some(5));
    assert!(
        st.last_scale_reason.as_deref().unwrap_or("").contains("45"),
        "{st:?}"
    );
    assert_eq!(condition(&qp, "SourceReachable").unwrap().0, "True");
    // The event is published right after the status patch: wait for it.
    eventually(
        Duration::from_secs(10),
        "a ScaledUp event naming the change",
        || async {
            events(&s, "ScaledUp")
                .await
                .iter()
                .any(|e| e.note.as_deref().unwrap_or("").contains("-> 5"))
                .then_some(())
        },
    )
    .await;
    let out = Command::new(s.env.get("QP_KUBECTL"))
        .args([
            "--kubeconfig",
            &s.env.get("KUBECONFIG"),
            "get",
            "qp",
            "-n",
            &s.ns,
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(
        table.contains(&format!("kafka:{topic}")) && table.contains("45"),
        "{table}"
    );

    // Pause freezes scaling: the backlog is gone, yet replicas hold past the window.
    let api: Api<QueueProcessor> = Api::namespaced(s.client.clone(), &s.ns);
    let annotate = |value: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch(
                "orders",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"queueprocessing.dev/paused": value}}}),
                ),
            )
            .await
            .unwrap();
        }
    };
    annotate(json!("true")).await;
    eventually(Duration::from_secs(10), "Scaling reason Paused", || async {
        let (_, reason, _) = condition(&qp_status(&s, "orders").await, "Scaling")?;
        (reason == "Paused").then_some(())
    })
    .await;
    commit_all(&bootstrap, &topic, &format!("{topic}-group"), 8);
    let hold_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < hold_until {
        assert_eq!(
            replicas(&s, "orders-worker").await,
            Some(5),
            "paused: replicas hold"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    annotate(serde_json::Value::Null).await;

    // Work done: the backlog drops to 0, replicas return to the minimum after the window.
    let t = Instant::now();
    eventually(Duration::from_secs(15), "back to 1 replica", || async {
        (replicas(&s, "orders-worker").await == Some(1)).then_some(())
    })
    .await;
    let down = t.elapsed();
    // A spec change rolls the workers: the pod template follows the new handler.
    let before = deployment(&s, "orders-worker").await.unwrap();
    let mut changed = kafka_qp(&s, "orders", &topic, 1, json!({}));
    changed["spec"]["worker"]["handler"] = json!({"builtin": {"name": "sleep", "sleepMillis": 5}});
    apply_qp(&s, &changed).await;
    eventually(
        Duration::from_secs(10),
        "the template to change",
        || async {
            let d = deployment(&s, "orders-worker").await?;
            let c = &d.spec.as_ref()?.template.spec.as_ref()?.containers[0];
            let rolled = c
                .env
                .as_ref()?
                .iter()
                .any(|e| e.name == "QP_HANDLER" && e.value.as_deref() == Some("sleep:5"));
            (rolled && d.metadata.generation > before.metadata.generation).then_some(())
        },
    )
    .await;

    // With minReplicas 0, to zero after the cooldown.
    api.patch(
        "orders",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(kafka_qp(&s, "orders", &topic, 0, json!({}))),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(15), "scaled to zero", || async {
        (replicas(&s, "orders-worker").await == Some(0)).then_some(())
    })
    .await;
    println!(
        "backlog 45 -> 5 replicas in {reaction:?}; back to 1 in {down:?} (window 3 s); then to 0"
    );

    // Delete: Redis keys go (finalizer), the Deployment is garbage-collected.
    let keys = Keys::new(&s.ns, "orders");
    api.delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the QueueProcessor to go",
        || async { api.get_opt("orders").await.unwrap().is_none().then_some(()) },
    )
    .await;
    let left: i64 = redis::cmd("EXISTS")
        .arg(keys.limit())
        .arg(keys.heartbeats())
        .arg(keys.leases())
        .query_async(&mut s.redis.clone())
        .await
        .unwrap();
    assert_eq!(left, 0, "token and counter keys removed");
    eventually(
        Duration::from_secs(60),
        "the Deployment garbage-collected",
        || async {
            deployment(&s, "orders-worker")
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    kafka::delete_topic(&bootstrap, &topic).await;
    cluster::delete_namespace(&s.client, &s.ns).await;
}

use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_secret_is_reported_and_nothing_is_applied() {
    let s = setup("op-secret").await;
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    let qp = kafka_qp(
        &s,
        "locked",
        "never-created",
        1,
        json!({"passwordSecretRef": {"name": "redis-auth", "key": "password"}}),
    );
    apply_qp(&s, &qp).await;
    let (status, reason, message) = eventually(Duration::from_secs(30), "Ready=False", || async {
        condition(&qp_status(&s, "locked").await, "Ready")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidSecretRef")
    );
    assert!(message.contains("redis-auth"), "{message}");
    assert!(
        deployment(&s, "locked-worker").await.is_none(),
        "nothing applied"
    );
    eventually(
        Duration::from_secs(10),
        "an InvalidSecretRef event",
        || async { (!events(&s, "InvalidSecretRef").await.is_empty()).then_some(()) },
    )
    .await;

    // A Secret without the key is just as clear.
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "redis-auth"}, "stringData": {"other": "x"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    // Touch the spec so the operator looks again now rather than at its next retry.
    let mut touched = qp.clone();
    touched["spec"]["scaling"]["maxReplicas"] = json!(7);
    apply_qp(&s, &touched).await;
    eventually(Duration::from_secs(40), "the missing key named", || async {
        let (_, _, m) = condition(&qp_status(&s, "locked").await, "Ready")?;
        m.contains("has no key \"password\"").then_some(())
    })
    .await;
    assert!(deployment(&s, "locked-worker").await.is_none());
    cluster::delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_writes_and_a_follower_takes_over() {
    let s = setup("op-leader").await;
    let lease_secs = 4;
    let (mut a, port_a) = cluster::start_operator(&s.env, &s.ns, "op-a", lease_secs);
    let leases: Api<Lease> = Api::namespaced(s.client.clone(), &s.ns);
    let holder = || async {
        leases
            .get_opt("qp-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    eventually(Duration::from_secs(20), "op-a leading", || async {
        (holder().await.as_deref() == Some("op-a")).then_some(())
    })
    .await;
    let (_b, port_b) = cluster::start_operator(&s.env, &s.ns, "op-b", lease_secs);
    eventually(Duration::from_secs(20), "op-b serving metrics", || async {
        cluster::metric(port_b, "qp_operator_leader").await
    })
    .await;

    apply_qp(&s, &kafka_qp(&s, "led", "led-topic", 1, json!({}))).await;
    eventually(Duration::from_secs(30), "the leader reconciles", || async {
        deployment(&s, "led-worker").await
    })
    .await;
    // The follower has not reconciled anything.
    assert_eq!(
        cluster::metric(port_b, "qp_operator_leader").await,
        Some(0.0)
    );
    assert!(
        cluster::metric(port_b, "qp_operator_reconciles_total")
            .await
            .is_none()
    );
    assert_eq!(
        cluster::metric(port_a, "qp_operator_leader").await,
        Some(1.0)
    );

    a.kill9();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(lease_secs + 5),
        "op-b takes over",
        || async { (holder().await.as_deref() == Some("op-b")).then_some(()) },
    )
    .await;
    let takeover = killed.elapsed();
    eventually(Duration::from_secs(10), "op-b reconciling", || async {
        cluster::metric(port_b, "qp_operator_reconciles_total").await
    })
    .await;
    println!("leader killed; follower took over after {takeover:?} (lease {lease_secs} s)");
    assert!(
        takeover <= Duration::from_secs(lease_secs) + Duration::from_millis(1500),
        "takeover took {takeover:?}"
    );
    let api: Api<QueueProcessor> = Api::namespaced(s.client.clone(), &s.ns);
    let _ = api.delete("led", &DeleteParams::default()).await;
    eventually(
        Duration::from_secs(30),
        "the QueueProcessor to go",
        || async { api.get_opt("led").await.unwrap().is_none().then_some(()) },
    )
    .await;
    cluster::delete_namespace(&s.client, &s.ns).await;
}
