//! Support of the end-to-end test (`tests/tests/e2e.rs`): what its phases share (the test's
//! namespace, Redis and Kafka, the API server), the operator's pods and Lease, and a Prometheus
//! discovering the pods through the API server. The phases themselves stay in the test.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use qp_operator::crd::QueueProcessor;
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::Conn;
use serde_json::{Value as Json, json};

use crate::cluster::MANAGER;
use crate::env::Env;
use crate::fixture;
use crate::kafka;
use crate::procs::{self, Proc};
use crate::tools::unique;

/// The chart's release, installed once for every phase.
pub const RELEASE: &str = "qp";
/// The release's fullname: its operator's Deployment, ServiceAccount and Lease.
pub const FULLNAME: &str = "qp-queue-processor";

/// What every phase works with: the environment, the API server, the test's namespace, Redis and
/// the Kafka topic of its QueueProcessor, and when the test started.
pub struct E2e {
    pub env: Env,
    pub client: Client,
    pub ns: String,
    pub redis: Conn,
    pub keys: Keys,
    pub topic: String,
    pub redis_user: String,
    pub started: Instant,
}

impl E2e {
    /// Print and record how long a phase took.
    pub fn time(&self, what: &str, took: Duration) {
        self.record(&format!("e2e {what}: {:.1} s", took.as_secs_f64()));
    }

    /// Print `line` and append it to the record that `make test` shows.
    pub fn record(&self, line: &str) {
        eprintln!("{line}");
        let path = std::path::Path::new(&self.env.get("QP_RUN")).join("e2e-times.txt");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn deployment(&self, name: &str) -> Option<Deployment> {
        self.api::<Deployment>().get_opt(name).await.unwrap()
    }

    /// The address of Service `name` (its cluster IP and first port), once kube-proxy routes it
    /// to a ready pod. A pod counts as ready in its Deployment's status before kube-proxy on the
    /// node has heard of it from the EndpointSlice; until then the Service's rule rejects
    /// connections (seen on a busy CI machine: "connection refused" a few seconds after the
    /// gateway's pod was Ready). A TCP connect is the exact condition a client needs.
    pub async fn service_routed(&self, name: &str) -> std::net::SocketAddr {
        use k8s_openapi::api::core::v1::Service;
        let spec = self.api::<Service>().get(name).await.unwrap().spec.unwrap();
        let ip = spec.cluster_ip.expect("a cluster IP");
        let port = spec.ports.expect("service ports")[0].port;
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let what = format!("Service {name} ({addr}) accepting connections");
        fixture::eventually(Duration::from_secs(30), &what, || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(drop)
        })
        .await;
        addr
    }

    /// (desired, ready) replicas of a Deployment.
    pub async fn replicas(&self, name: &str) -> (i32, i32) {
        let d = self.deployment(name).await;
        let desired = d
            .as_ref()
            .and_then(|d| d.spec.as_ref()?.replicas)
            .unwrap_or(0);
        let ready = d
            .as_ref()
            .and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0);
        (desired, ready)
    }

    pub async fn qp(&self, name: &str) -> QueueProcessor {
        self.api::<QueueProcessor>().get(name).await.unwrap()
    }

    pub async fn condition(&self, name: &str, type_: &str) -> Option<(String, String, String)> {
        let qp = self.qp(name).await;
        let c = qp.status.as_ref()?.condition(type_)?;
        Some((c.status.clone(), c.reason.clone(), c.message.clone()))
    }

    pub async fn pods(&self, selector: &str) -> Vec<Pod> {
        self.api::<Pod>()
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap()
            .items
    }

    pub async fn token_limit(&self) -> Option<u64> {
        redis::cmd("GET")
            .arg(self.keys.limit())
            .query_async(&mut self.redis.clone())
            .await
            .unwrap()
    }

    /// How many of `ids` have a result in state `state`.
    pub async fn count_state(&self, ids: &[String], state: &str) -> usize {
        let states = fixture::states(&self.redis, &self.keys, ids).await;
        states.values().filter(|s| *s == state).count()
    }

    pub async fn wait_done(&self, ids: &[String], timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.count_state(ids, "done").await;
            if done == ids.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {done} of {} messages done after {timeout:?}, {} failed",
                ids.len(),
                self.count_state(ids, "failed").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A GET through the API server (pod and service proxies included).
    pub async fn raw_get(&self, path: &str) -> Result<String, kube::Error> {
        let req = http::Request::get(path).body(Vec::new()).unwrap();
        self.client.request_text(req).await
    }

    pub fn worker_spec(&self) -> Json {
        json!({
            "handler": {"builtin": {"name": "sleep", "sleepMillis": 20}},
            "tolerations": [{"key": "queueprocessing.dev/node", "operator": "Exists", "effect": "NoSchedule"}]
        })
    }

    pub async fn apply_qp(&self, qp: &Json) {
        let name = qp["metadata"]["name"].as_str().unwrap();
        self.api::<QueueProcessor>()
            .patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(qp),
            )
            .await
            .expect("apply the QueueProcessor");
    }

    /// Delete QueueProcessor `name` and wait until it is gone (its finalizer done), leaving
    /// the node to the phases after.
    pub async fn delete_qp(&self, name: &str) {
        self.api::<QueueProcessor>()
            .delete(name, &kube::api::DeleteParams::default())
            .await
            .unwrap();
        crate::fixture::eventually(
            Duration::from_secs(60),
            &format!("QueueProcessor {name} gone"),
            || async {
                self.api::<QueueProcessor>()
                    .get_opt(name)
                    .await
                    .unwrap()
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    }

    pub async fn produce(&self, prefix: &str, n: usize) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        let producer = kafka::producer(&self.env.get("QP_KAFKA_BOOTSTRAP"));
        kafka::send_many(&producer, &self.topic, &ids).await;
        ids
    }
}

pub fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn chart_values() -> String {
    // The only values a user would not give: the node's test taint.
    "tolerations:\n- {key: queueprocessing.dev/node, operator: Exists, effect: NoSchedule}\n".into()
}

/// The operator pod: Ready, the chart's ServiceAccount, the leader.
pub async fn operator_pods(e: &E2e) -> Vec<Pod> {
    e.pods("app.kubernetes.io/component=operator,app.kubernetes.io/name=queue-processor")
        .await
}

pub async fn lease_holder(e: &E2e) -> Option<String> {
    let lease = e.api::<Lease>().get_opt(FULLNAME).await.ok()??;
    lease.spec?.holder_identity
}

/// A Prometheus configured as the chart's monitors configure a Prometheus Operator's: pods
/// found through this API server with `kubernetes_sd_configs` (role pod), workers and gateways
/// labelled like the PodMonitor does, the operator like the ServiceMonitor (honor_labels).
/// Debian's Prometheus is built without Kubernetes discovery, so this one comes from
/// hack/build-prometheus.sh.
fn prometheus_config(e: &E2e) -> String {
    let sd = format!(
        "kubernetes_sd_configs:
      - role: pod
        api_server: {}
        namespaces: {{names: [{}]}}
        tls_config: {{ca_file: {}}}
        bearer_token_file: {}",
        e.env.get("QP_KUBE_APISERVER"),
        e.ns,
        e.env.get("QP_KUBE_CA"),
        e.env.get("QP_PROMETHEUS_SD_TOKEN_FILE"),
    );
    format!(
        "global: {{scrape_interval: 2s, evaluation_interval: 2s}}
scrape_configs:
  - job_name: queue-processor-pods
    {sd}
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name, __meta_kubernetes_pod_container_port_name, __meta_kubernetes_pod_phase]
        regex: (qp-worker|qp-gateway);metrics;Running
        action: keep
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance]
        target_label: queueprocessor
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
        target_label: component
  - job_name: queue-processor-operator
    honor_labels: true
    {sd}
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component, __meta_kubernetes_pod_label_app_kubernetes_io_part_of, __meta_kubernetes_pod_container_port_name, __meta_kubernetes_pod_phase]
        regex: operator;queue-processor;metrics;Running
        action: keep
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
"
    )
}

/// Start the discovery Prometheus; it is killed when the returned process is dropped.
pub fn start_prometheus(e: &E2e) -> (Proc, String) {
    let dir = std::env::temp_dir().join(unique("qp-e2e-prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, prometheus_config(e)).unwrap();
    let port = procs::free_port();
    let mut cmd = std::process::Command::new(e.env.get("QP_PROMETHEUS_SD_BIN"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn");
    (
        Proc::spawn("e2e-prometheus", cmd),
        format!("http://127.0.0.1:{port}"),
    )
}

/// The result vector of an instant query, or None when Prometheus does not answer.
pub async fn prometheus_query(prom: &str, q: &str) -> Option<Vec<Json>> {
    let r: Json = reqwest::Client::new()
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    r["data"]["result"].as_array().cloned()
}

/// The value of one sample of an instant-query result (NaN when it is not a number).
pub fn sample(s: &Json) -> f64 {
    s["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

pub fn collect_queries(v: &Json, out: &mut BTreeMap<String, Vec<String>>) {
    if let Some(panels) = v["panels"].as_array() {
        for p in panels {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.entry(title.clone()).or_default().push(expr.to_owned());
                }
            }
            collect_queries(p, out);
        }
    }
}
