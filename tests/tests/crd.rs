//! The QueueProcessor API against the real kube-apiserver: the generated CRD installs, every
//! example applies (and comes back with the schema defaults filled in), every manifest under
//! `tests/manifests/invalid/` is rejected with the message its first line promises, and
//! `kubectl get qp` / `kubectl explain` give the user what the API promises.
//!
//! The CRD stays installed afterwards (other tests need it; applying it again is idempotent);
//! everything else lives in a fresh namespace that is deleted at the end, also when the test
//! fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::core::TypeMeta;
use kube::{Client, CustomResourceExt, ResourceExt};
use qp_operator::crd::{
    self, CONDITION_READY, ConditionStatus, QueueProcessor, QueueProcessorStatus, TokenStatus,
};
use qp_tests::cluster::{create_namespace, delete_namespace, install_crd};
use qp_tests::env;
use serde_json::json;

/// Field manager of everything this test applies.
const MANAGER: &str = "qp-tests-crd";

fn repo(path: &str) -> PathBuf {
    env::workspace_root().join(path)
}

/// The `*.yaml` files of a repository directory, sorted.
fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The documents of a (possibly multi-document) YAML file.
fn documents(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

/// Server-side apply of one object given as JSON into `ns`, resolving its kind by discovery.
async fn apply(
    client: &Client,
    ns: &str,
    obj: &serde_json::Value,
) -> Result<DynamicObject, kube::Error> {
    let tm: TypeMeta = serde_json::from_value(obj.clone()).expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&tm).expect("a valid apiVersion");
    let (ar, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discovery of {gvk:?}: {e}"));
    let name = obj["metadata"]["name"].as_str().expect("metadata.name");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force().validation_strict(),
        &Patch::Apply(obj),
    )
    .await
}

/// Run a kubectl command against the test cluster; returns stdout, panics with stderr on failure.
async fn kubectl(args: &[&str]) -> String {
    let env = env::load();
    let out = tokio::process::Command::new(env.get("QP_KUBECTL"))
        .env("KUBECONFIG", env.get("KUBECONFIG"))
        .args(args)
        .output()
        .await
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The committed CRD is what the Rust types generate. Fix with `make crds`.
#[test]
fn committed_crd_is_up_to_date() {
    let path = repo("crds/queueprocessor.yaml");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let generated = crd::crd_yaml();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map(|n| n + 1)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()) + 1);
        panic!(
            "crds/queueprocessor.yaml is out of date (first difference at line {line}); regenerate it \
             with `make crds` (cargo run -p qp-operator --bin crdgen > crds/queueprocessor.yaml)"
        );
    }
}

#[tokio::test]
async fn queueprocessor_api_on_a_real_apiserver() {
    let client = env::kube_client().await;
    install_crd(&client).await;
    let ns = create_namespace(&client, "qp-crd").await;

    // Catch a failing assertion so that it still reaches the cleanup below.
    let outcome = std::panic::AssertUnwindSafe(checks(client.clone(), ns.clone()))
        .catch_unwind()
        .await;
    delete_namespace(&client, &ns).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn checks(client: Client, ns: String) {
    // The generated file installs through kubectl too, both ways (the client-side way keeps a
    // last-applied annotation, which must stay under its 256 KiB limit).
    let crd_file = repo("crds/queueprocessor.yaml");
    let crd_file = crd_file.to_str().unwrap();
    kubectl(&[
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager",
        MANAGER,
        "-f",
        crd_file,
    ])
    .await;
    kubectl(&["apply", "--dry-run=server", "-f", crd_file]).await;

    examples_apply_with_defaults(&client, &ns).await;
    invalid_manifests_are_rejected(&client, &ns).await;
    status_and_printer_columns(&client, &ns).await;
    explain_teaches().await;
}

async fn examples_apply_with_defaults(client: &Client, ns: &str) {
    let mut applied = Vec::new();
    for path in yaml_files("examples") {
        for doc in documents(&path) {
            let obj = apply(client, ns, &doc)
                .await
                .unwrap_or_else(|e| panic!("{} does not apply: {e}", path.display()));
            if doc["kind"] == json!("QueueProcessor") {
                applied.push(obj.name_any());
            }
        }
    }
    assert!(
        applied.len() >= 2,
        "examples/ holds a Kafka and a Redis-list QueueProcessor"
    );

    let qps: Api<QueueProcessor> = Api::namespaced(client.clone(), ns);
    let raw: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &QueueProcessor::api_resource());
    for name in &applied {
        // The stored object parses into the Rust types and passes the local validation.
        let qp = qps.get(name).await.expect("get the applied QueueProcessor");
        qp.spec.validate().expect("stored object validates");
        // The API server filled in the schema defaults (not just our deserializer).
        let stored = raw.get(name).await.unwrap().data;
        let spec = &stored["spec"];
        for (section, field) in [
            ("scaling", "pollIntervalSeconds"),
            ("scaling", "scaleDownStabilizationSeconds"),
            ("concurrency", "leaseSeconds"),
            ("results", "retryBackoffMillis"),
            ("gateway", "replicas"),
            ("worker", "shutdownTimeoutSeconds"),
        ] {
            assert!(
                spec[section][field].is_i64(),
                "{name}: spec.{section}.{field} was not defaulted by the API server: {spec}"
            );
        }
        assert_eq!(
            spec["paused"],
            json!(false),
            "{name}: spec.paused defaulted"
        );
    }
}

async fn invalid_manifests_are_rejected(client: &Client, ns: &str) {
    let files = yaml_files("tests/manifests/invalid");
    assert!(
        files.len() >= 14,
        "at least 14 invalid manifests, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: first line must be `# expect: <message>`",
                    path.display()
                )
            })
            .trim()
            .to_string();
        let doc = documents(path).pop().expect("one document");
        let name = doc["metadata"]["name"].as_str().unwrap().to_string();
        // A CRD update takes a moment to reach every handler of the API server: a manifest that
        // is accepted is removed and tried again for a few seconds before it counts as a failure.
        let mut outcome = String::new();
        for _ in 0..20 {
            match apply(client, ns, &doc).await {
                Err(kube::Error::Api(status)) => {
                    outcome = status.message.clone();
                    break;
                }
                Err(other) => panic!("{}: unexpected error {other}", path.display()),
                Ok(_) => {
                    outcome = "accepted".to_string();
                    let qps: Api<QueueProcessor> = Api::namespaced(client.clone(), ns);
                    let _ = qps.delete(&name, &DeleteParams::default()).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        if outcome.contains(&expect) {
            println!("rejected {file}: {outcome}");
        } else {
            failures.push(format!("{file}: expected {expect:?}, got {outcome:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "invalid manifests not rejected as expected:\n{}",
        failures.join("\n")
    );
    println!("{} invalid manifests rejected", files.len());
}

async fn status_and_printer_columns(client: &Client, ns: &str) {
    let qps: Api<QueueProcessor> = Api::namespaced(client.clone(), ns);
    let qp = qps.get("orders").await.expect("the Kafka example exists");
    let mut status = QueueProcessorStatus {
        observed_generation: qp.metadata.generation,
        replicas: Some(3),
        desired_replicas: Some(3),
        ready_replicas: Some(2),
        backlog: Some(4200),
        partitions: Some(12),
        tokens: Some(TokenStatus {
            limit: 16,
            in_use: 5,
        }),
        ..Default::default()
    };
    status.set_condition(
        CONDITION_READY,
        ConditionStatus::True,
        "Processing",
        "2 of 3 replicas ready, draining a backlog of 4200",
        qp.metadata.generation,
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    status.refresh_summary(&qp.spec);
    let patch = json!({
        "apiVersion": crd::API_VERSION,
        "kind": crd::KIND,
        "status": status,
    });
    qps.patch_status(
        "orders",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .expect("the status subresource accepts the operator's status");
    let back = qps.get_status("orders").await.unwrap();
    assert_eq!(back.status.as_ref().unwrap().summary, status.summary);

    let table = kubectl(&["get", "qp", "-n", ns]).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "SOURCE", "REPLICAS", "BACKLOG", "TOKENS", "STATUS", "AGE"
        ],
        "kubectl get qp:\n{table}"
    );
    let row: Vec<&str> = lines
        .find(|l| l.starts_with("orders "))
        .unwrap_or_else(|| panic!("no row for orders:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..6],
        [
            "orders",
            "kafka:orders",
            "2/3",
            "4200",
            "5/16",
            "Processing"
        ],
        "kubectl get qp:\n{table}"
    );
    let wide = kubectl(&[
        "get",
        "queueprocessors.queueprocessing.dev",
        "-n",
        ns,
        "-o",
        "wide",
    ])
    .await;
    let header = wide.lines().next().unwrap();
    for column in ["READY", "RATE", "MESSAGE"] {
        assert!(header.contains(column), "-o wide lacks {column}:\n{wide}");
    }
    println!("{table}");
}

async fn explain_teaches() {
    // The OpenAPI document is republished asynchronously after a CRD change: retry briefly.
    let mut last = String::new();
    for _ in 0..30 {
        let env = env::load();
        let out = tokio::process::Command::new(env.get("QP_KUBECTL"))
            .env("KUBECONFIG", env.get("KUBECONFIG"))
            .args(["explain", "queueprocessor.spec.scaling"])
            .output()
            .await
            .expect("run kubectl");
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success()
            && last.contains("Fewest worker replicas")
            && last.contains("scaleDownStabilizationSeconds")
            && last.contains("Scale-down stabilization window")
        {
            let fields = kubectl(&["explain", "qp.spec.source.kafka.sasl.mechanism"]).await;
            assert!(fields.contains("SCRAM-SHA-512"), "{fields}");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("kubectl explain queueprocessor.spec.scaling does not teach:\n{last}");
}
