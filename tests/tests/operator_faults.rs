//! The operator when what a QueueProcessor points at fails: real kube-apiserver, Kafka and
//! Redis, and endpoints that hang (a listener that never answers).

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
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
