//! The Helm chart checked with `helm` itself, no cluster needed:
//!
//! * `helm lint --strict` and the values schema;
//! * the rendered manifests: secure pod defaults, the operator's environment, the CRD being the
//!   generated one, the monitoring objects being built from the same files the tests check.
//!
//! The chart against the real kube-apiserver is in `chart_install.rs`; its alerts, dashboard and
//! console page against promtool and Prometheus in `chart_monitoring.rs`. The tools and addresses
//! come from the env file written by `hack/env.sh` ([`qp_tests::env`]).

use std::collections::BTreeMap;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use qp_tests::chart::{
    CRD_NAME, chart_app_version, chart_dir, chart_file, documents, read, render, render_result,
};
use qp_tests::env;
use qp_tests::tools::{helm, promtool, run, run_ok, unique};

// ------------------------------------------------------------------------------------------------
// Reading rendered manifests

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
    assert_eq!(value("QP_CLEANUP_TIMEOUT_SECONDS"), "300");
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
    let generated = read(&env::workspace_root().join("crds/queueprocessor.yaml"));
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
async fn network_policies_are_a_toggle_that_admits_only_the_served_port() {
    let off = documents(&render("qp", "qp-system", &[]));
    assert!(
        !kinds(&off).contains(&"NetworkPolicy".to_string()),
        "off by default"
    );
    let docs = documents(&render(
        "qp",
        "qp-system",
        &["networkPolicy.enabled=true", "operator.watchNamespace=apps"],
    ));
    let policies: Vec<&Yaml> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    let placed: Vec<(String, String)> = policies
        .iter()
        .map(|p| {
            (
                p["metadata"]["namespace"].as_str().unwrap().to_owned(),
                p["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        placed,
        [
            ("qp-system".into(), "qp-queue-processor".into()),
            ("apps".into(), "qp-queue-processor-workers".into()),
            ("apps".into(), "qp-queue-processor-gateways".into()),
        ]
    );
    let operator = find(&docs, "Deployment");
    let pod_labels = &operator["spec"]["template"]["metadata"]["labels"];
    for (k, v) in policies[0]["spec"]["podSelector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "the operator's policy selects its pods"
        );
    }
    for (p, port) in policies.iter().zip([8080, 9090, 9090]) {
        assert_eq!(
            p["spec"]["policyTypes"],
            serde_yaml::from_str::<Yaml>("[Ingress, Egress]").unwrap()
        );
        assert_eq!(
            p["spec"]["ingress"][0]["ports"][0]["port"], port,
            "only the served port"
        );
    }
    assert_eq!(
        policies[1]["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "qp-worker"
    );
    assert_eq!(
        policies[2]["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "qp-gateway"
    );
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
