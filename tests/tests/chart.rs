//! The Helm chart, its Grafana dashboard, its alerts and its Prometheus console page, checked with
//! the real tools rather than by eye:
//!
//! * `helm lint --strict` and the values schema;
//! * the rendered manifests: secure pod defaults, the operator's environment, the CRD being the
//!   generated one, the monitoring objects being built from the same files the tests check;
//! * the real kube-apiserver: a server-side dry run of `helm template`, then `helm install`,
//!   `kubectl auth can-i` for everything the operator does (allowed) and a list of things it must
//!   not do (denied), and `helm uninstall` keeping the CRD;
//! * `promtool check rules` / `promtool test rules`, the rules loaded into the running Prometheus,
//!   and every PromQL query of the dashboard, the alerts and the console page evaluated by it;
//! * the console page rendered by a Prometheus of our own.
//!
//! The tools and addresses come from the env file written by `hack/env.sh` ([`env`]).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use qp_tests::env;
use qp_tests::tools::{
    Release, TestNamespace, can_i, env_get, helm, kubectl, promtool, run, run_ok, test_env, unique,
};

const CRD_NAME: &str = "queueprocessors.queueprocessing.dev";

// ------------------------------------------------------------------------------------------------
// Environment and tools

fn root() -> PathBuf {
    env::workspace_root()
}

fn chart_dir() -> PathBuf {
    root().join("charts/queue-processor")
}

fn chart_file(rel: &str) -> PathBuf {
    chart_dir().join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ------------------------------------------------------------------------------------------------
// Rendering

/// `helm template` of the chart as release `release` in `namespace`, with `--set` values.
fn render_result(release: &str, namespace: &str, sets: &[&str]) -> Output {
    let mut cmd = helm();
    cmd.arg("template")
        .arg(release)
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    if let Some(version) = test_env().try_get("QP_K8S_VERSION") {
        cmd.args(["--kube-version", &version]);
    }
    for set in sets {
        cmd.args(["--set", set]);
    }
    run(&mut cmd, None)
}

fn render(release: &str, namespace: &str, sets: &[&str]) -> String {
    let out = render_result(release, namespace, sets);
    assert!(
        out.status.success(),
        "helm template {sets:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The YAML documents of a multi-document stream, without empty ones.
fn documents(yaml: &str) -> Vec<Yaml> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Yaml::deserialize(doc).expect("valid YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind_of(doc: &Yaml) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs.iter().filter(|d| kind_of(d) == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind} rendered");
    found[0]
}

fn kinds(docs: &[Yaml]) -> Vec<String> {
    let mut kinds: Vec<String> = docs.iter().map(|d| kind_of(d).to_string()).collect();
    kinds.sort();
    kinds
}

/// YAML to JSON with every number as a float, so that `1000` and `1000.0` (which a `fromYaml |
/// toYaml` round trip in a template may produce) compare equal.
fn normalized(value: &Yaml) -> Json {
    fn norm(v: Json) -> Json {
        match v {
            Json::Number(n) => serde_json::json!(n.as_f64().expect("finite number")),
            Json::Array(items) => Json::Array(items.into_iter().map(norm).collect()),
            Json::Object(map) => Json::Object(map.into_iter().map(|(k, v)| (k, norm(v))).collect()),
            other => other,
        }
    }
    norm(serde_json::to_value(value).expect("YAML is JSON-compatible"))
}

fn env_of(container: &Yaml) -> BTreeMap<String, Yaml> {
    container["env"]
        .as_sequence()
        .expect("container env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

fn chart_app_version() -> String {
    let chart: Yaml = serde_yaml::from_str(&read(&chart_file("Chart.yaml"))).unwrap();
    chart["appVersion"].as_str().unwrap().to_string()
}

// ------------------------------------------------------------------------------------------------
// helm lint and the values schema

#[tokio::test]
async fn helm_lint_passes_strict_with_every_option() {
    let variants: &[&[&str]] = &[
        &[],
        &[
            "serviceMonitor.enabled=true",
            "podMonitor.enabled=true",
            "prometheusRule.enabled=true",
            "grafanaDashboard.enabled=true",
        ],
        &["operator.watchNamespace=apps", "operator.replicas=2"],
        &[
            "crds.install=false",
            "rbac.create=false",
            "serviceAccount.create=false",
            "metrics.service.enabled=false",
            "operator.leaderElection.enabled=false",
        ],
    ];
    for sets in variants {
        for strict in [false, true] {
            let mut cmd = helm();
            cmd.arg("lint").arg(chart_dir());
            if strict {
                cmd.arg("--strict");
            }
            for set in *sets {
                cmd.args(["--set", set]);
            }
            let out = run_ok(&mut cmd, None);
            assert!(
                out.contains("1 chart(s) linted, 0 chart(s) failed"),
                "helm lint {sets:?}: {out}"
            );
        }
    }
}

#[tokio::test]
async fn values_schema_and_checks_reject_mistakes() {
    let cases: &[(&[&str], &str)] = &[
        // A typo must not be ignored silently.
        (&["serviceMonitor.enable=true"], "enable"),
        (&["image.pullPolicy=Sometimes"], "pullPolicy"),
        (&["operator.logFormat=xml"], "logFormat"),
        (&["operator.port=0"], "port"),
        (&["image.digest=latest"], "digest"),
        // Two operators without leader election would fight over every QueueProcessor.
        (
            &[
                "operator.replicas=2",
                "operator.leaderElection.enabled=false",
            ],
            "leaderElection",
        ),
        (
            &[
                "serviceMonitor.enabled=true",
                "metrics.service.enabled=false",
            ],
            "metrics.service.enabled",
        ),
    ];
    for (sets, mentions) in cases {
        let out = render_result("t", "qp-system", sets);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sets:?} was accepted");
        assert!(
            stderr.contains(mentions),
            "the error for {sets:?} names {mentions}: {stderr}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// What the templates render

#[tokio::test]
async fn operator_deployment_is_locked_down_and_configured() {
    let docs = documents(&render("qp", "qp-system", &[]));
    let app_version = chart_app_version();
    let image = format!("ghcr.io/queue-processor/queue-processor:{app_version}");

    let deployment = find(&docs, "Deployment");
    assert_eq!(deployment["metadata"]["name"], "qp-queue-processor");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "qp-queue-processor");
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "the operator needs its token"
    );
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");

    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], image.as_str());
    assert_eq!(c["args"], serde_yaml::from_str::<Yaml>("[run]").unwrap());
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_yaml::from_str::<Yaml>("[ALL]").unwrap()
    );

    let env = env_of(c);
    let value = |k: &str| env[k]["value"].as_str().unwrap_or_default().to_string();
    assert_eq!(value("QP_OPERATOR_LISTEN"), "0.0.0.0:8080");
    assert_eq!(value("QP_LEADER_ELECTION"), "true");
    assert_eq!(value("QP_LEASE_NAME"), "qp-queue-processor");
    assert_eq!(value("QP_LOG_FORMAT"), "json");
    assert_eq!(value("QP_WORKER_IMAGE"), image);
    assert!(
        !env.contains_key("QP_WATCH_NAMESPACE"),
        "all namespaces by default"
    );
    for (name, field) in [
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_NAME", "metadata.name"),
    ] {
        assert_eq!(
            env[name]["valueFrom"]["fieldRef"]["fieldPath"], field,
            "{name}"
        );
    }

    let ports = c["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["name"], "metrics");
    assert_eq!(ports[0]["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");

    // The ServiceAccount does not hand its token to other pods.
    let sa = find(&docs, "ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false);

    // The metrics Service selects the operator pods.
    let service = find(&docs, "Service");
    let pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .unwrap();
    for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "pod label {k:?}");
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");

    // Image overrides: tag, then a separate worker image, then a digest.
    let docs = documents(&render(
        "qp",
        "qp-system",
        &["image.tag=1.2.3", "operator.watchNamespace=apps"],
    ));
    let c = &find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/queue-processor/queue-processor:1.2.3");
    let env = env_of(c);
    assert_eq!(
        env["QP_WORKER_IMAGE"]["value"],
        "ghcr.io/queue-processor/queue-processor:1.2.3"
    );
    assert_eq!(env["QP_WATCH_NAMESPACE"]["value"], "apps");
    // Watching one namespace: the operator's rules become a Role there.
    let role = docs
        .iter()
        .find(|d| kind_of(d) == "Role" && d["metadata"]["namespace"] == "apps")
        .expect("a Role in the watched namespace");
    assert!(
        !kinds(&docs).contains(&"ClusterRole".to_string()),
        "no ClusterRole"
    );
    assert!(role["rules"].as_sequence().unwrap().len() >= 7);

    let docs = documents(&render(
        "qp",
        "qp-system",
        &["operator.workerImage=registry.example/worker:9"],
    ));
    let c = &find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_of(c)["QP_WORKER_IMAGE"]["value"],
        "registry.example/worker:9"
    );
}

#[tokio::test]
async fn crd_template_is_the_generated_crd_and_is_kept() {
    let generated = read(&root().join("crds/queueprocessor.yaml"));
    let copy = read(&chart_file("files/queueprocessor.yaml"));
    assert!(
        generated == copy,
        "charts/queue-processor/files/queueprocessor.yaml differs from crds/queueprocessor.yaml: run make crds"
    );
    let generated: Yaml = serde_yaml::from_str(&generated).unwrap();

    let docs = documents(&render("qp", "qp-system", &[]));
    let crd = find(&docs, "CustomResourceDefinition");
    assert_eq!(crd["metadata"]["name"], CRD_NAME);
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "uninstalling the chart must not delete every QueueProcessor"
    );
    assert_eq!(
        normalized(&crd["spec"]),
        normalized(&generated["spec"]),
        "the chart's CRD spec is the generated one, unchanged"
    );
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "queueprocessing.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["plural"], "queueprocessors");
    assert!(
        spec["names"]["shortNames"]
            .as_sequence()
            .is_some_and(|s| s.iter().any(|n| n == "qp")),
        "short name qp"
    );
    let version = spec["versions"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .expect("v1alpha1 is served");
    assert!(
        version["subresources"]["status"].is_mapping(),
        "status subresource"
    );

    let docs = documents(&render("qp", "qp-system", &["crds.keep=false"]));
    let crd = find(&docs, "CustomResourceDefinition");
    assert!(crd["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());

    let docs = documents(&render("qp", "qp-system", &["crds.install=false"]));
    assert!(!kinds(&docs).contains(&"CustomResourceDefinition".to_string()));
}

#[tokio::test]
async fn monitoring_objects_are_built_from_the_tested_files() {
    let docs = documents(&render(
        "qp",
        "qp-system",
        &[
            "serviceMonitor.enabled=true",
            "serviceMonitor.labels.release=prom",
            "podMonitor.enabled=true",
            "prometheusRule.enabled=true",
            "grafanaDashboard.enabled=true",
        ],
    ));

    let sm = find(&docs, "ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    let service = find(&docs, "Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            service["metadata"]["labels"].get(k),
            Some(v),
            "Service label {k:?}"
        );
    }
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(
        endpoint["honorLabels"], true,
        "the per-QueueProcessor namespace label must win over the target's"
    );

    let pm = find(&docs, "PodMonitor");
    // Workers and gateways both: a selector on qp-worker alone never scraped a gateway.
    let expr = &pm["spec"]["selector"]["matchExpressions"][0];
    assert_eq!(expr["key"], "app.kubernetes.io/name");
    assert_eq!(expr["operator"], "In");
    let names: Vec<&str> = expr["values"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(names, ["qp-worker", "qp-gateway"]);
    let targets: Vec<&str> = pm["spec"]["podMetricsEndpoints"][0]["relabelings"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r["targetLabel"].as_str())
        .collect();
    assert!(targets.contains(&"queueprocessor") && targets.contains(&"component"));

    // The PrometheusRule carries exactly the groups of files/alerts.yaml, and promtool accepts
    // them as rendered.
    let rule = find(&docs, "PrometheusRule");
    let alerts: Yaml = serde_yaml::from_str(&read(&chart_file("files/alerts.yaml"))).unwrap();
    assert_eq!(normalized(&rule["spec"]), normalized(&alerts));
    let tmp = std::env::temp_dir().join(format!("{}.yaml", unique("qp-rendered-rules")));
    std::fs::write(&tmp, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    let checked = run(promtool().arg("check").arg("rules").arg(&tmp), None);
    let _ = std::fs::remove_file(&tmp);
    assert!(
        checked.status.success(),
        "promtool check rules on the rendered PrometheusRule: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The dashboard ConfigMap holds files/dashboard.json for Grafana's sidecar.
    let cm = find(&docs, "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let embedded: Json =
        serde_json::from_str(cm["data"]["queue-processor.json"].as_str().unwrap()).unwrap();
    let file: Json = serde_json::from_str(&read(&chart_file("files/dashboard.json"))).unwrap();
    assert_eq!(embedded, file);
}

// ------------------------------------------------------------------------------------------------
// The real API server

#[tokio::test]
async fn rendered_chart_passes_a_server_side_dry_run() {
    let ns = TestNamespace::create("qp-chart-dry");
    let watched = TestNamespace::create("qp-chart-watched");
    let watch_set = format!("operator.watchNamespace={}", watched.0);
    let variants: Vec<Vec<&str>> = vec![
        vec!["grafanaDashboard.enabled=true"],
        vec![watch_set.as_str(), "operator.replicas=2"],
        vec![
            "crds.install=false",
            "rbac.create=false",
            "serviceAccount.create=false",
            "metrics.service.enabled=false",
            "operator.leaderElection.enabled=false",
        ],
    ];
    for sets in &variants {
        let manifests = render("qp-dry", &ns.0, sets);
        let out = run_ok(
            kubectl().args(["apply", "--dry-run=server", "-f", "-"]),
            Some(manifests.as_bytes()),
        );
        let applied = out.lines().count();
        assert_eq!(
            applied,
            documents(&manifests).len(),
            "every rendered object is accepted ({sets:?}):\n{out}"
        );
    }
}

#[tokio::test]
async fn helm_install_creates_every_object_and_grants_only_what_the_operator_needs() {
    let ns = TestNamespace::create("qp-chart-install");
    let release = Release {
        name: unique("qpc"),
        namespace: ns.0.clone(),
        uninstalled: false,
    };
    let fullname = format!("{}-queue-processor", release.name);

    // --take-ownership: the CRD outlives releases (resource-policy keep), so it may already exist
    // from an earlier release or from `kubectl apply -f crds/`. --force-conflicts: another test
    // may have server-side-applied it from the Rust types, which the chart's copy must equal (see
    // crd_template_is_the_generated_crd_and_is_kept) but may lag while the types are edited.
    let mut cmd = helm();
    cmd.args(["install", &release.name])
        .arg(chart_dir())
        .args([
            "--namespace",
            &ns.0,
            "--take-ownership",
            "--force-conflicts",
        ])
        .args(["--set", "grafanaDashboard.enabled=true"]);
    let out = run_ok(&mut cmd, None);
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(
        out.contains("kubectl get qp"),
        "NOTES tell the user what to do next:\n{out}"
    );

    // Every object exists (the node is tainted and this release does not tolerate it, so the pod
    // never runs here; tests/tests/e2e.rs runs the chart on the node).
    for (kind, name, namespaced) in [
        ("deployment", fullname.clone(), true),
        ("serviceaccount", fullname.clone(), true),
        ("service", format!("{fullname}-metrics"), true),
        ("configmap", format!("{fullname}-dashboard"), true),
        ("role", format!("{fullname}-leader-election"), true),
        ("rolebinding", format!("{fullname}-leader-election"), true),
        ("clusterrole", fullname.clone(), false),
        ("clusterrolebinding", fullname.clone(), false),
        ("customresourcedefinition", CRD_NAME.to_string(), false),
    ] {
        let mut cmd = kubectl();
        cmd.args(["get", kind, &name, "-o", "name"]);
        if namespaced {
            cmd.args(["--namespace", &ns.0]);
        }
        run_ok(&mut cmd, None);
    }
    let established = run_ok(
        kubectl().args([
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            &format!("crd/{CRD_NAME}"),
        ]),
        None,
    );
    assert!(established.contains("condition met"), "{established}");

    // What the operator does: all allowed. Cluster-wide (`None`) or in some user namespace.
    let other = "some-team";
    let lease = format!("leases.coordination.k8s.io/{fullname}");
    let allowed: Vec<(&str, &str, Option<&str>)> = vec![
        ("get", "queueprocessors.queueprocessing.dev", Some(other)),
        ("list", "queueprocessors.queueprocessing.dev", None),
        ("watch", "queueprocessors.queueprocessing.dev", None),
        ("patch", "queueprocessors.queueprocessing.dev", Some(other)),
        ("update", "queueprocessors.queueprocessing.dev", Some(other)),
        (
            "get",
            "queueprocessors.queueprocessing.dev --subresource=status",
            Some(other),
        ),
        (
            "patch",
            "queueprocessors.queueprocessing.dev --subresource=status",
            Some(other),
        ),
        (
            "update",
            "queueprocessors.queueprocessing.dev --subresource=status",
            Some(other),
        ),
        (
            "update",
            "queueprocessors.queueprocessing.dev --subresource=finalizers",
            Some(other),
        ),
        ("list", "deployments.apps", None),
        ("watch", "deployments.apps", None),
        ("get", "deployments.apps", Some(other)),
        ("create", "deployments.apps", Some(other)),
        ("patch", "deployments.apps", Some(other)),
        ("update", "deployments.apps", Some(other)),
        ("delete", "deployments.apps", Some(other)),
        ("list", "services", None),
        ("watch", "services", None),
        ("get", "services", Some(other)),
        ("create", "services", Some(other)),
        ("patch", "services", Some(other)),
        ("update", "services", Some(other)),
        ("delete", "services", Some(other)),
        ("get", "secrets", Some(other)),
        ("list", "pods", Some(other)),
        ("list", "pods", None),
        ("create", "events.events.k8s.io", Some(other)),
        ("patch", "events.events.k8s.io", Some(other)),
        ("create", "leases.coordination.k8s.io", Some(&ns.0)),
        ("get", &lease, Some(&ns.0)),
        ("update", &lease, Some(&ns.0)),
    ];
    // What it must not do: all denied.
    let denied: Vec<(&str, &str, Option<&str>)> = vec![
        // Users create and delete QueueProcessors, never the operator.
        ("create", "queueprocessors.queueprocessing.dev", Some(other)),
        ("delete", "queueprocessors.queueprocessing.dev", Some(other)),
        (
            "deletecollection",
            "queueprocessors.queueprocessing.dev",
            Some(other),
        ),
        // Secrets: read a referenced one, never enumerate, watch or change them.
        ("list", "secrets", Some(other)),
        ("watch", "secrets", Some(other)),
        ("list", "secrets", None),
        ("create", "secrets", Some(other)),
        ("update", "secrets", Some(other)),
        ("delete", "secrets", Some(other)),
        // Pods: listed to explain unready workers, nothing more. No nodes.
        ("get", "pods", Some(other)),
        ("watch", "pods", Some(other)),
        ("create", "pods", Some(other)),
        ("update", "pods", Some(other)),
        ("delete", "pods", Some(other)),
        ("deletecollection", "pods", Some(other)),
        ("create", "pods --subresource=exec", Some(other)),
        ("get", "pods --subresource=log", Some(other)),
        ("get", "nodes", None),
        ("list", "nodes", None),
        // Other workload and config kinds.
        ("create", "statefulsets.apps", Some(other)),
        ("create", "daemonsets.apps", Some(other)),
        ("patch", "deployments.apps --subresource=scale", Some(other)),
        ("create", "configmaps", Some(other)),
        ("create", "serviceaccounts", Some(other)),
        ("create", "serviceaccounts --subresource=token", Some(other)),
        ("deletecollection", "deployments.apps", Some(other)),
        ("deletecollection", "services", Some(other)),
        // The legacy core events API, and reading events.
        ("create", "events", Some(other)),
        ("list", "events.events.k8s.io", Some(other)),
        // No way to escalate.
        ("patch", "clusterroles.rbac.authorization.k8s.io", None),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            None,
        ),
        (
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            Some(other),
        ),
        ("bind", "clusterroles.rbac.authorization.k8s.io", None),
        ("escalate", "roles.rbac.authorization.k8s.io", Some(other)),
        ("impersonate", "serviceaccounts", Some(other)),
        (
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
        ),
        (
            "delete",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
        ),
        // Leases: only its own, only in its namespace, never deleted or listed.
        (
            "get",
            "leases.coordination.k8s.io/kube-controller-manager",
            Some(&ns.0),
        ),
        (
            "update",
            "leases.coordination.k8s.io/someone-else",
            Some(&ns.0),
        ),
        ("delete", &lease, Some(&ns.0)),
        ("list", "leases.coordination.k8s.io", Some(&ns.0)),
        ("create", "leases.coordination.k8s.io", Some(other)),
        ("get", "leases.coordination.k8s.io", Some("kube-system")),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, scope) in &allowed {
        if !can_i(&fullname, &ns.0, verb, resource, *scope) {
            wrong.push(format!("denied but needed: {verb} {resource} in {scope:?}"));
        }
    }
    for (verb, resource, scope) in &denied {
        if can_i(&fullname, &ns.0, verb, resource, *scope) {
            wrong.push(format!(
                "allowed but not needed: {verb} {resource} in {scope:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "RBAC of the operator:\n  {}",
        wrong.join("\n  ")
    );

    // Uninstall removes the release's objects but keeps the CRD (and with it every
    // QueueProcessor in the cluster).
    let mut release = release;
    run_ok(
        helm().args(["uninstall", &release.name, "--namespace", &ns.0]),
        None,
    );
    release.uninstalled = true;
    run_ok(kubectl().args(["get", "crd", CRD_NAME, "-o", "name"]), None);
    for (kind, namespaced) in [("deployment", true), ("clusterrole", false)] {
        let mut cmd = kubectl();
        cmd.args(["get", kind, &fullname, "--ignore-not-found", "-o", "name"]);
        if namespaced {
            cmd.args(["--namespace", &ns.0]);
        }
        let left = run_ok(&mut cmd, None);
        assert!(
            left.trim().is_empty(),
            "{kind} {fullname} removed on uninstall: {left}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Alerts, dashboard and console queries against promtool and Prometheus

#[tokio::test]
async fn alerts_pass_promtool_check_and_unit_tests() {
    let out = run_ok(
        promtool()
            .args(["check", "rules"])
            .arg(chart_file("files/alerts.yaml")),
        None,
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(
        promtool()
            .args(["test", "rules"])
            .arg(chart_file("tests/alerts_test.yaml")),
        None,
    );
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert has a severity, a summary, a description, and at least one test case.
    let alerts: Yaml = serde_yaml::from_str(&read(&chart_file("files/alerts.yaml"))).unwrap();
    let tests = read(&chart_file("tests/alerts_test.yaml"));
    let mut names = Vec::new();
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().expect("alerting rule").to_string();
            assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            assert!(
                rule["annotations"]["description"].is_string(),
                "{name}: description"
            );
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has a promtool test"
            );
            names.push(name);
        }
    }
    for wanted in [
        "QueueProcessorBacklogGrowing",
        "QueueProcessorTokensSaturated",
        "QueueProcessorSourceUnreachable",
        "QueueProcessorDeadLetters",
        "QueueProcessorWorkerRestarting",
        "QueueProcessorLocalWorkerRestarting",
    ] {
        assert!(names.iter().any(|n| n == wanted), "alert {wanted} exists");
    }
}

/// Every `expr` string anywhere in a JSON document.
fn json_exprs(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Json::String(s)) => out.push(s.clone()),
                    _ => json_exprs(v, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

/// The dashboard's queries with Grafana's variables replaced by what Grafana would send:
/// `$__rate_interval` a duration, the template variables "All" (`.*`). The templating queries
/// `label_values(<selector>, <label>)` are checked as their selector.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Json = serde_json::from_str(&read(&chart_file("files/dashboard.json"))).unwrap();
    let mut exprs = Vec::new();
    json_exprs(&dashboard["panels"], &mut exprs);
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"].as_str().unwrap_or_default();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _)| selector.to_string())
            .unwrap_or_else(|| panic!("unexpected variable query {query}"));
        exprs.push(inner);
    }
    exprs
        .into_iter()
        .map(|e| {
            let mut e = e
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "15s")
                .replace("$__range", "1h");
            for var in &variables {
                e = e
                    .replace(&format!("${{{var}}}"), ".*")
                    .replace(&format!("${var}"), ".*");
            }
            assert!(!e.contains('$'), "unreplaced variable in {e}");
            e
        })
        .collect()
}

fn alert_queries() -> Vec<String> {
    let alerts: Yaml = serde_yaml::from_str(&read(&chart_file("files/alerts.yaml"))).unwrap();
    alerts["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect()
}

/// Reads a Go or JavaScript double-quoted string literal starting at `s[0] == '"'`; returns the
/// unescaped text and the rest after the closing quote.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    let mut text = String::new();
    let mut escaped = false;
    for (i, c) in chars {
        match (escaped, c) {
            (true, c) => {
                text.push(c);
                escaped = false;
            }
            (false, '\\') => escaped = true,
            (false, '"') => return Some((text, &s[i + 1..])),
            (false, c) => text.push(c),
        }
    }
    None
}

/// The console page's queries: string literals after the template functions `query`, `args`
/// and `printf` (whose `%s` placeholders are filled with a dummy value), and the strings of every
/// graph's `expr: [...]` list.
fn console_queries(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for keyword in ["query", "args", "printf"] {
        let mut rest = html;
        while let Some(i) = rest.find(keyword) {
            let before = rest[..i].chars().next_back();
            let after = &rest[i + keyword.len()..];
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
                continue;
            }
            let trimmed = after.trim_start_matches([' ', '\t']);
            if trimmed.len() == after.len() {
                continue; // not followed by whitespace: some other word
            }
            if let Some((text, _)) = quoted(trimmed) {
                out.push(text.replace("%s", "x"));
            }
        }
    }
    let mut rest = html;
    while let Some(i) = rest.find("expr:") {
        rest = rest[i + 5..].trim_start();
        let Some(list) = rest.strip_prefix('[') else {
            panic!("graph expr must be a list: {}", &rest[..rest.len().min(60)]);
        };
        rest = list;
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
            if let Some(after) = rest.strip_prefix(']') {
                rest = after;
                break;
            }
            let (text, after) = quoted(rest).expect("a quoted query in an expr list");
            out.push(text);
            rest = after;
        }
    }
    out
}

/// Evaluates `query` with the running Prometheus; returns the error, if any.
async fn prometheus_error(http: &reqwest::Client, url: &str, query: &str) -> Option<String> {
    let response = http
        .get(format!("{url}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .expect("Prometheus reachable");
    let body: Json = response.json().await.expect("JSON answer");
    (body["status"] != "success").then(|| format!("{query}\n    -> {}", body["error"]))
}

#[tokio::test]
async fn every_dashboard_alert_and_console_query_evaluates_in_prometheus() {
    let url = env_get("QP_PROMETHEUS_URL");
    let http = reqwest::Client::new();

    let dashboard = dashboard_queries();
    let alerts = alert_queries();
    let console = console_queries(&read(&chart_file("consoles/queue-processor.html")));
    // Guards against the extraction silently finding nothing.
    assert!(
        dashboard.len() >= 30,
        "dashboard queries found: {}",
        dashboard.len()
    );
    assert!(
        alerts.len() >= 6,
        "alert expressions found: {}",
        alerts.len()
    );
    assert!(
        console.len() >= 25,
        "console queries found: {}",
        console.len()
    );

    let mut errors = Vec::new();
    for (source, queries) in [
        ("dashboard.json", &dashboard),
        ("alerts.yaml", &alerts),
        ("queue-processor.html", &console),
    ] {
        for query in queries.iter() {
            if let Some(e) = prometheus_error(&http, &url, query).await {
                errors.push(format!("{source}: {e}"));
            }
        }
    }
    // A query that is wrong must be reported, or the check above proves nothing.
    assert!(
        prometheus_error(&http, &url, "sum by (le (rate(x[1m]))")
            .await
            .is_some(),
        "Prometheus rejects a malformed query"
    );
    assert!(
        errors.is_empty(),
        "queries Prometheus rejects:\n{}",
        errors.join("\n")
    );

    // The console page shows the same graphs as the dashboard: each metric the dashboard plots
    // also appears on the page.
    let html = read(&chart_file("consoles/queue-processor.html"));
    for metric in [
        "qp_operator_backlog",
        "qp_operator_partition_lag",
        "qp_operator_throughput",
        "qp_worker_messages_total",
        "qp_operator_desired_replicas",
        "qp_operator_ready_replicas",
        "qp_operator_tokens_in_use",
        "qp_operator_tokens_limit",
        "qp_worker_processing_seconds_bucket",
        "qp_worker_token_wait_seconds_bucket",
        "qp_worker_dead_letters_total",
    ] {
        assert!(
            dashboard.iter().any(|q| q.contains(metric)),
            "dashboard plots {metric}"
        );
        assert!(html.contains(metric), "console page plots {metric}");
    }
}

/// A rules file dropped into the running Prometheus' rule directory, removed (and Prometheus
/// reloaded) when the test ends.
struct LoadedRules {
    path: PathBuf,
    url: String,
}

impl Drop for LoadedRules {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = Command::new("curl")
            .args(["-fsS", "-X", "POST"])
            .arg(format!("{}/-/reload", self.url))
            .output();
    }
}

#[tokio::test]
async fn alerts_load_and_evaluate_cleanly_in_the_running_prometheus() {
    let url = env_get("QP_PROMETHEUS_URL");
    let dir = PathBuf::from(env_get("QP_PROMETHEUS_RULES"));
    let http = reqwest::Client::new();
    let rules = LoadedRules {
        path: dir.join(format!("{}.yml", unique("chart-test-alerts"))),
        url: url.clone(),
    };
    std::fs::copy(chart_file("files/alerts.yaml"), &rules.path).expect("copy the rules file");
    let reload = http
        .post(format!("{url}/-/reload"))
        .send()
        .await
        .expect("Prometheus reachable");
    assert!(reload.status().is_success(), "reload: {}", reload.status());

    let wanted = alert_queries().len();
    let path = rules.path.to_string_lossy().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let body: Json = http
            .get(format!("{url}/api/v1/rules"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let groups: Vec<&Json> = body["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["file"] == path.as_str())
            .collect();
        let rules: Vec<&Json> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        let evaluated = rules.len() == wanted
            && rules.iter().all(|r| {
                !r["lastEvaluation"]
                    .as_str()
                    .unwrap_or("0001")
                    .starts_with("0001")
            });
        if evaluated {
            let bad: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            assert!(bad.is_empty(), "rules failing in Prometheus: {bad:?}");
            break rules.len();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not load and evaluate {path} within 60 s: {groups:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(last, wanted);
}

/// A Prometheus of our own serving the chart's console directory, stopped when dropped.
struct ConsolePrometheus {
    child: Child,
    data: PathBuf,
    url: String,
}

impl Drop for ConsolePrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The console libraries (prom.lib, menu.lib) of the installed Prometheus.
fn console_libraries() -> PathBuf {
    let mut candidates: Vec<PathBuf> = test_env()
        .try_get("QP_PROMETHEUS_CONSOLE_LIBRARIES")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(
        [
            "/usr/share/prometheus/console_libraries",
            "/usr/share/doc/prometheus/examples/console_libraries",
            "/etc/prometheus/console_libraries",
        ]
        .map(PathBuf::from),
    );
    candidates
        .into_iter()
        .find(|d| d.join("prom.lib").is_file() || d.join("prom_console.lib").is_file())
        .expect("Prometheus console libraries (Debian: /usr/share/doc/prometheus/examples/console_libraries)")
}

#[tokio::test]
async fn console_page_renders_in_prometheus() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let data = std::env::temp_dir().join(unique("qp-console-prometheus"));
    std::fs::create_dir_all(&data).unwrap();
    let config = data.join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 15s\n").unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            data.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--web.console.templates={}",
            chart_dir().join("consoles").display()
        ))
        .arg(format!(
            "--web.console.libraries={}",
            console_libraries().display()
        ))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let prometheus = ConsolePrometheus {
        child,
        data,
        url: format!("http://127.0.0.1:{port}"),
    };

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http.get(format!("{}/-/ready", prometheus.url)).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "private Prometheus not ready in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let response = http
        .get(format!("{}/consoles/queue-processor.html", prometheus.url))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let page = response.text().await.unwrap();
    assert!(status.is_success(), "console page: {status}\n{page}");
    assert!(!page.contains("error executing template"), "{page}");
    assert!(page.contains("<h1>Queue Processor</h1>"));
    // No metrics in this Prometheus: the summary table says so instead of failing.
    assert!(page.contains("No QueueProcessor reports metrics yet"));
    for graph in [
        "backlogGraph",
        "partitionGraph",
        "throughputGraph",
        "replicasGraph",
        "tokensGraph",
        "processingGraph",
        "tokenWaitGraph",
        "errorsGraph",
    ] {
        assert!(page.contains(&format!("id=\"{graph}\"")), "graph {graph}");
    }
    drop(prometheus);
}
