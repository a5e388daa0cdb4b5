//! The pods the operator creates pass the `restricted` Pod Security Standard: in a namespace
//! that enforces it (the API server's PodSecurity admission), the worker and gateway
//! ReplicaSets create their pods; a pod that breaks the standard is refused there, so the
//! enforcement is real.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use qp_tests::cluster;
use qp_tests::fixture::eventually;
use qp_tests::kafka;
use qp_tests::operator::{apply_qp, kafka_qp, setup};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_restricted_namespace_admits_every_pod_the_operator_creates() {
    let s = setup("op-pss").await;
    let namespaces: Api<Namespace> = Api::all(s.client.clone());
    namespaces
        .patch(
            &s.ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await
        .unwrap();

    // The enforcement is on: a pod with no security context (root allowed, privilege
    // escalation allowed, no seccomp profile) is refused.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let plain: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "x"}]}
    }))
    .unwrap();
    let refused = pods.create(&PostParams::default(), &plain).await;
    let message = format!("{refused:?}");
    assert!(message.contains("violates PodSecurity"), "{message}");

    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let tokens: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pss-gateway"},
        "stringData": {"tokens": "pss:0123456789abcdef0123456789abcdef\n"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &tokens)
        .await
        .unwrap();
    let topic = format!("pss-{}", s.ns);
    kafka::create_topic(&s.env.get("QP_KAFKA_BOOTSTRAP"), &topic, 1).await;
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-pss", 15);
    let mut qp = kafka_qp(&s, "pss", &topic, 1, json!({}));
    qp["spec"]["gateway"] = json!({
        "enabled": true,
        "auth": {"tokensSecretRef": {"name": "pss-gateway", "key": "tokens"}}
    });
    apply_qp(&s, &qp).await;

    for component in ["worker", "gateway"] {
        let selector =
            format!("app.kubernetes.io/instance=pss,app.kubernetes.io/component={component}");
        let created = eventually(Duration::from_secs(60), "the pod created", || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            (!list.items.is_empty()).then_some(list.items.len())
        })
        .await;
        println!("restricted namespace: {created} {component} pod(s) admitted");
    }
    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.ns);
    let refusals: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .filter_map(|e| e.message)
        .collect();
    assert!(refusals.is_empty(), "pods refused: {refusals:?}");
}
