//! The operator when what a QueueProcessor points at fails: real kube-apiserver, Kafka and
//! Redis, and endpoints that hang (a listener that never answers).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use qp_operator::crd::QueueProcessor;
use qp_protocol::keys::Keys;
use qp_tests::cluster;
use qp_tests::fixture::{Silent, eventually};
use qp_tests::kafka;
use qp_tests::operator::*;
use serde_json::json;

/// Deleting a QueueProcessor whose Redis does not answer: the finalizer used to retry removing
/// the keys forever, so `kubectl delete` hung as long as Redis was away. Now it gives up after
/// `--cleanup-timeout-seconds` (`QP_CLEANUP_TIMEOUT_SECONDS`) past the deletion and a Warning names the keys left behind.
#[tokio::test(flavor = "multi_thread")]
async fn deletion_finishes_when_redis_is_unreachable_and_names_the_keys_left() {
    let s = setup("op-del").await;
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    let silent = Silent::start().await;
    let (_op, _port) = cluster::start_operator_with(
        &s.env,
        &s.ns,
        "op-a",
        15,
        &[("QP_CLEANUP_TIMEOUT_SECONDS", "5")],
    );
    let mut qp = kafka_qp(&s, "orders", &topic, 1, json!({}));
    qp["spec"]["redis"]["url"] = json!(format!("redis://{}", silent.addr));
    apply_qp(&s, &qp).await;
    // Applied (replicas held at the minimum while Redis cannot be read), finalizer in place.
    eventually(Duration::from_secs(30), "the worker Deployment", || async {
        deployment(&s, "orders-worker").await
    })
    .await;

    let api: Api<QueueProcessor> = Api::namespaced(s.client.clone(), &s.ns);
    let deleted = Instant::now();
    api.delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(40),
        "the QueueProcessor gone",
        || async { api.get_opt("orders").await.unwrap().is_none().then_some(()) },
    )
    .await;
    println!(
        "deleted in {:?} with its Redis unreachable",
        deleted.elapsed()
    );

    let keys = Keys::new(&s.ns, "orders").lifetime_keys();
    let events: Vec<Event> = Api::<Event>::namespaced(s.client.clone(), &s.ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let warning = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("KeysLeftBehind"))
        .unwrap_or_else(|| panic!("no KeysLeftBehind event among {events:?}"));
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.clone().unwrap_or_default();
    for k in &keys {
        assert!(note.contains(k.as_str()), "{note:?} does not name {k}");
    }
}

/// A worker Deployment the API server refuses (here an admission policy) is reported where
/// users look: `Ready` False with reason `ApplyFailed` and a Warning event. The error used to
/// end the reconcile before the status was written, so `kubectl get qp` showed nothing wrong.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_apply_is_reported_in_status_and_an_event() {
    let s = setup("op-refused").await;
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    let policy_name = format!("deny-{}", s.ns);
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(s.client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(s.client.clone());
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": policy_name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["apps"], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["deployments"]
            }]},
            "validations": [{
                "expression": "object.metadata.name != 'orders-worker'",
                "message": "orders-worker is not allowed in this namespace"
            }]
        }
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": policy_name},
        "spec": {
            "policyName": policy_name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": s.ns
            }}}
        }
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    // Policies take effect a moment after they are created: wait until a dry run is denied.
    let probe: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "orders-worker"},
        "spec": {
            "selector": {"matchLabels": {"app": "probe"}},
            "template": {"metadata": {"labels": {"app": "probe"}},
                         "spec": {"containers": [{"name": "c", "image": "example.invalid/p:1"}]}}
        }
    }))
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(Duration::from_secs(30), "the policy in force", || async {
        deployments
            .create(&dry_run, &probe)
            .await
            .is_err()
            .then_some(())
    })
    .await;

    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(&s, &kafka_qp(&s, "orders", &topic, 1, json!({}))).await;
    let (_, reason, message) = eventually(
        Duration::from_secs(30),
        "Ready False because the apply failed",
        || async {
            let c = condition(&qp_status(&s, "orders").await, "Ready")?;
            (c.0 == "False").then_some(c)
        },
    )
    .await;
    assert_eq!(reason, "ApplyFailed", "{message}");
    assert!(
        message.contains("not allowed in this namespace"),
        "{message}"
    );
    eventually(
        Duration::from_secs(10),
        "an ApplyFailed Warning",
        || async {
            let warned = Api::<Event>::namespaced(s.client.clone(), &s.ns)
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("ApplyFailed")
                        && e.type_.as_deref() == Some("Warning")
                });
            warned.then_some(())
        },
    )
    .await;
    let _ = bindings
        .delete(&policy_name, &DeleteParams::default())
        .await;
    let _ = policies
        .delete(&policy_name, &DeleteParams::default())
        .await;
}

/// A variable in `spec.worker.env` that the operator sets itself is an invalid spec, said
/// before anything is applied. It used to be applied next to the operator's own value (two
/// values for one name in the pod) and Ready said nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_env_var_the_operator_sets_is_rejected() {
    let s = setup("op-env").await;
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    let (op, port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    let mut qp = kafka_qp(&s, "orders", &topic, 1, json!({}));
    qp["spec"]["worker"]["env"] = json!([
        {"name": "GREETING", "value": "hello"},
        {"name": "QP_HANDLER", "value": "fail:*"}
    ]);
    apply_qp(&s, &qp).await;
    let (_, reason, message) = eventually(Duration::from_secs(30), "Ready False", || async {
        let c = condition(&qp_status(&s, "orders").await, "Ready")?;
        (c.0 == "False").then_some(c)
    })
    .await;
    assert_eq!(reason, "InvalidSpec", "{message}");
    assert!(
        message.contains("spec.worker.env[1]: QP_HANDLER"),
        "{message}"
    );
    // Nothing applied, even after more reconciles.
    let start = cluster::metric_sum(port, "qp_operator_reconciles_total")
        .await
        .unwrap_or(0.0);
    eventually(Duration::from_secs(60), "another reconcile", || async {
        (cluster::metric_sum(port, "qp_operator_reconciles_total").await? > start).then_some(())
    })
    .await;
    assert!(deployment(&s, "orders-worker").await.is_none());
    drop(op);
}

/// Someone else scaling the worker Deployment (`kubectl scale`, an HPA) is a fight the
/// operator wins at the next tick; it used to win silently, so the other side kept trying and
/// nobody knew why replicas jumped. Now a `ReplicasContested` Warning names the other field
/// manager (and the `Scaling` condition says so until the next tick).
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_replica_count_is_named_in_a_warning_and_taken_back() {
    let s = setup("op-fight").await;
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(&s, &kafka_qp(&s, "orders", &topic, 1, json!({}))).await;
    eventually(Duration::from_secs(30), "the worker Deployment", || async {
        deployment(&s, "orders-worker").await
    })
    .await;
    // `kubectl scale`, as a user would.
    let out = std::process::Command::new(s.env.get("QP_KUBECTL"))
        .args([
            "--kubeconfig",
            &s.env.get("KUBECONFIG"),
            "scale",
            "deployment/orders-worker",
        ])
        .args(["--replicas", "3", "-n", &s.ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let note = eventually(
        Duration::from_secs(20),
        "a ReplicasContested Warning",
        || async {
            Api::<Event>::namespaced(s.client.clone(), &s.ns)
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("ReplicasContested"))?
                .note
        },
    )
    .await;
    assert!(
        note.contains("set to 3") && note.contains("kubectl"),
        "{note}"
    );
    // Taken back.
    eventually(Duration::from_secs(20), "1 replica again", || async {
        (replicas(&s, "orders-worker").await == Some(1)).then_some(())
    })
    .await;
}

/// A leader whose clock runs a minute behind, renewing every half second: the follower used
/// to compare that `renewTime` with its own clock, find the Lease long expired and take it,
/// so two replicas led at once. It now judges expiry by when it saw the Lease change, and takes
/// over only once the renewals stop.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_leaves_a_renewed_lease_alone_whatever_the_clocks_say() {
    let s = setup("op-skew").await;
    let leases: Api<Lease> = Api::namespaced(s.client.clone(), &s.ns);
    let skewed = || MicroTime(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60));
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "qp-operator"},
        "spec": {"holderIdentity": "slow-clock", "leaseDurationSeconds": 4}
    }))
    .unwrap();
    let mut lease = leases.create(&PostParams::default(), &lease).await.unwrap();
    lease.spec.as_mut().unwrap().renew_time = Some(skewed());
    leases
        .replace("qp-operator", &PostParams::default(), &lease)
        .await
        .unwrap();
    let renewing = Arc::new(AtomicBool::new(true));
    let renewer = tokio::spawn({
        let (leases, renewing) = (leases.clone(), renewing.clone());
        async move {
            while renewing.load(Ordering::Relaxed) {
                if let Ok(mut l) = leases.get("qp-operator").await
                    && l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                        == Some("slow-clock")
                {
                    l.spec.as_mut().unwrap().renew_time = Some(skewed());
                    let _ = leases
                        .replace("qp-operator", &PostParams::default(), &l)
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let holder = || async {
        leases
            .get("qp-operator")
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity)
    };
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-b", 4);
    // Three lease durations of renewals: the follower must not take it.
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        assert_eq!(
            holder().await.as_deref(),
            Some("slow-clock"),
            "taken while renewed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The renewals stop: after one lease duration of silence it is taken.
    renewing.store(false, Ordering::Relaxed);
    renewer.await.unwrap();
    let stopped = Instant::now();
    eventually(Duration::from_secs(20), "the follower leading", || async {
        (holder().await.as_deref() == Some("op-b")).then_some(())
    })
    .await;
    println!(
        "taken over {:?} after the renewals stopped",
        stopped.elapsed()
    );
}

/// A token limit the operator cannot write (the QueueProcessor's Redis user loses the SET
/// command, which only the limit write uses) makes `Ready` False with a `SetTokenLimit` Warning. The failure
/// used to end the reconcile before the status: `kubectl get qp` kept saying Ready while the
/// workers ran on a limit that no longer matched the replicas.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_limit_that_cannot_be_written_makes_ready_false() {
    let s = setup("op-tokens").await;
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    let keys = Keys::new(&s.ns, "orders");
    let user = format!("qp-{}", s.ns);
    let password = uuid::Uuid::new_v4().simple().to_string();
    let acl = |rules: Vec<String>| {
        let mut conn = s.redis.clone();
        let (user, password) = (user.clone(), password.clone());
        async move {
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(&user)
                .arg("on")
                .arg(format!(">{password}"))
                .arg("resetkeys")
                .arg("+@all")
                .arg(&rules)
                .query_async(&mut conn)
                .await
                .expect("ACL SETUSER");
        }
    };
    // Every key of this QueueProcessor first.
    acl(vec![format!("~{}*", keys.prefix())]).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(s.client.clone(), &s.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "redis-user"},
                "stringData": {"username": user, "password": password}
            }))
            .unwrap(),
        )
        .await
        .expect("create the Secret");
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(
        &s,
        &kafka_qp(
            &s,
            "orders",
            &topic,
            1,
            json!({
                "usernameSecretRef": {"name": "redis-user", "key": "username"},
                "passwordSecretRef": {"name": "redis-user", "key": "password"}
            }),
        ),
    )
    .await;
    // Measured (the pods stay unscheduled: the node is tainted, so the limit is 0).
    eventually(Duration::from_secs(30), "SourceReachable True", || async {
        let c = condition(&qp_status(&s, "orders").await, "SourceReachable")?;
        (c.0 == "True").then_some(())
    })
    .await;

    // The user may no longer SET, and someone sets a wrong limit:
    // the operator must write it back, and cannot.
    // (Key permissions cannot do it: every token script names the limit key, and Redis checks
    // a script's keys for writing when it is called. The token scripts that only read the
    // pool never call SET.)
    acl(vec![format!("~{}*", keys.prefix()), "-set".into()]).await;
    let _: () = redis::cmd("SET")
        .arg(keys.limit())
        .arg(999)
        .query_async(&mut s.redis.clone())
        .await
        .unwrap();
    let (_, _, message) = eventually(Duration::from_secs(30), "Ready False for Redis", || async {
        let c = condition(&qp_status(&s, "orders").await, "Ready")?;
        (c.0 == "False" && c.1 == "RedisUnavailable").then_some(c)
    })
    .await;
    println!("Ready False: {message}");
    assert!(message.contains("can't run this command"), "{message}");
    let warning = eventually(
        Duration::from_secs(10),
        "a SetTokenLimit Warning",
        || async {
            events(&s, "RedisUnavailable")
                .await
                .into_iter()
                .find(|e| e.action.as_deref() == Some("SetTokenLimit"))
        },
    )
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    // The measurement itself still works: this is the token path, not an unreachable Redis.
    let status = qp_status(&s, "orders").await;
    assert_eq!(
        condition(&status, "SourceReachable").map(|c| c.0),
        Some("True".into()),
        "{:?}",
        condition(&status, "SourceReachable")
    );
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut s.redis.clone())
        .await
        .unwrap();
    cluster::delete_namespace(&s.client, &s.ns).await;
}
