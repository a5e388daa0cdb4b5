//! Kubernetes helpers for black-box tests: the CRD, throwaway namespaces, the operator as a
//! process, and standing in for the kubelet by marking pods ready (the local node is tainted so
//! that these pods never really start; tests/tests/e2e.rs runs real ones).

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, CustomResourceExt};
use qp_operator::crd::QueueProcessor;
use serde_json::json;

use crate::procs::{self, Proc};

pub const MANAGER: &str = "qp-tests";

/// Server-side apply the generated CRD and wait until it is Established.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        QueueProcessor::crd_name(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(QueueProcessor::crd()),
    )
    .await
    .expect("the CRD is accepted by the API server");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds,
            QueueProcessor::crd_name(),
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("the CRD becomes Established within 30 s")
    .expect("watching the CRD");
}

/// A fresh namespace named `<prefix>-<random>`.
pub async fn create_namespace(client: &Client, prefix: &str) -> String {
    let name = format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &name,
            &PatchParams::apply(MANAGER),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            ),
        )
        .await
        .expect("create the test namespace");
    name
}

/// Delete a namespace and its QueueProcessors. QueueProcessors whose operator is gone would
/// block on their finalizer, so it is removed, after the deletion: a running operator adds
/// the finalizer back to a QueueProcessor that is not being deleted (QueueProcessors of a
/// benchmark namespace were left behind that way, and the namespace with them).
pub async fn delete_namespace(client: &Client, ns: &str) {
    let qps: Api<QueueProcessor> = Api::namespaced(client.clone(), ns);
    let _ = qps
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    if let Ok(list) = qps.list(&ListParams::default()).await {
        for qp in list {
            let name = qp.metadata.name.unwrap_or_default();
            let _ = qps
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
}

/// Start `qp-operator run` watching one namespace, with its own Lease there.
pub fn start_operator(
    env: &crate::env::Env,
    ns: &str,
    identity: &str,
    lease_seconds: u64,
) -> (Proc, u16) {
    start_operator_with(env, ns, identity, lease_seconds, &[])
}

/// [`start_operator`] with more environment variables (settings the operator reads from its
/// environment, as in the chart).
pub fn start_operator_with(
    env: &crate::env::Env,
    ns: &str,
    identity: &str,
    lease_seconds: u64,
    vars: &[(&str, &str)],
) -> (Proc, u16) {
    let port = procs::free_port();
    let mut cmd = Command::new(procs::binary("qp-operator"));
    cmd.arg("run")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--watch-namespace", ns, "--lease-namespace", ns])
        .args(["--lease-name", "qp-operator", "--identity", identity])
        .args(["--lease-duration-seconds", &lease_seconds.to_string()])
        .args(["--lease-renew-seconds", "1"])
        .envs(vars.iter().copied())
        .env("KUBECONFIG", env.get("KUBECONFIG"))
        // QP_TEST_OPERATOR_LOG overrides the filter when a test needs to be looked into.
        .env(
            "RUST_LOG",
            std::env::var("QP_TEST_OPERATOR_LOG")
                .unwrap_or_else(|_| "info,kube=warn,librdkafka=warn".into()),
        );
    (Proc::spawn(&format!("operator-{ns}-{identity}"), cmd), port)
}

/// Act as the kubelet: mark every pod of a component Running and Ready, so the ReplicaSet and
/// Deployment controllers report ready replicas as in a real cluster.
pub async fn mark_pods_ready(client: &Client, ns: &str, selector: &str) -> usize {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list pods");
    let now = jiff::Timestamp::now().to_string();
    let mut n = 0;
    for p in list {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready {
            let name = p.metadata.name.unwrap_or_default();
            let status = json!({"status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}
            ]}});
            if pods
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

/// Every sample value of metric `name` (all label sets) on `127.0.0.1:<port>/metrics`;
/// `None` when the endpoint does not answer.
async fn samples(port: u16, name: &str) -> Option<Vec<f64>> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect(),
    )
}

/// The first sample of metric `name`.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    samples(port, name).await?.first().copied()
}

/// Waits (at most `within`) until the gateway on `port` reports at least `n` long polls parked.
pub async fn until_longpolls_parked(port: u16, n: usize, within: Duration) {
    crate::fixture::eventually(within, "every long poll parked", || async move {
        let parked = metric(port, "qp_gateway_longpoll_waiters").await?;
        (parked >= n as f64).then_some(())
    })
    .await;
}

/// Sum of every sample of metric `name` (all label sets), or `None` if it is absent.
pub async fn metric_sum(port: u16, name: &str) -> Option<f64> {
    let values = samples(port, name).await?;
    (!values.is_empty()).then(|| values.iter().sum())
}
