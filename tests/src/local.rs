//! Local mode (`qp-operator local`) the way the demo and the tests drive it: start it on free
//! ports, read its `/status.json`, submit requests through its gateway, follow their results in
//! Redis, and read counters from the workers' `/metrics`.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use qp_operator::crd::QueueProcessorStatus;
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::Conn;
use serde::Deserialize;

/// What local mode serves on `/status.json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LocalStatus {
    /// `<namespace>/<name>`.
    pub name: String,
    /// The QueueProcessor status, exactly as the cluster controller would write it.
    pub status: QueueProcessorStatus,
    /// Worker processes running (draining ones not counted).
    pub replicas: u32,
    pub ready_replicas: u32,
    /// Crashed processes restarted so far.
    pub restarts: u64,
    pub worker_ports: Vec<u16>,
    pub worker_pids: Vec<u32>,
    pub gateway_url: Option<String>,
}

impl LocalStatus {
    /// Messages waiting at the last measurement (0 while unknown).
    pub fn backlog(&self) -> i64 {
        self.status.backlog.unwrap_or(0)
    }

    /// Replicas the operator wants.
    pub fn desired(&self) -> u32 {
        self.status.desired_replicas.unwrap_or(0).max(0) as u32
    }

    /// Tokens `(in use, limit)`.
    pub fn tokens(&self) -> (i32, i32) {
        self.status
            .tokens
            .as_ref()
            .map_or((0, 0), |t| (t.in_use, t.limit))
    }
}

/// `GET <operator>/status.json`; `None` while local mode does not answer.
pub async fn status(http: &reqwest::Client, operator: &str) -> Option<LocalStatus> {
    let resp = http
        .get(format!("{operator}/status.json"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// Milliseconds since the Unix epoch (the clock Redis' `TIME` uses, on the same machine).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A submitted request.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub id: String,
    /// Wall-clock time (ms) just before the POST was sent.
    pub at_ms: i64,
}

/// Submit `count` JSON requests to the gateway at `gateway`, `concurrency` at a time. Requests
/// the gateway cannot take right now (429, 503 or no connection, e.g. while Kafka restarts) are
/// retried until `deadline`; each success bumps `progress` and goes to `sink` as it happens.
/// Returns the number accepted.
pub async fn submit_burst(
    http: &reqwest::Client,
    gateway: &str,
    count: usize,
    concurrency: usize,
    deadline: Instant,
    progress: Arc<AtomicUsize>,
    sink: tokio::sync::mpsc::UnboundedSender<Submitted>,
) -> anyhow::Result<usize> {
    let url = format!("{gateway}/v1/requests");
    let results = futures::stream::iter(0..count)
        .map(|n| {
            let (http, url, progress, sink) = (http.clone(), url.clone(), &progress, &sink);
            async move {
                let body = serde_json::json!({ "n": n, "demo": "burst" }).to_string();
                loop {
                    let at_ms = now_ms();
                    let sent = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    match sent {
                        Ok(resp) if resp.status() == reqwest::StatusCode::ACCEPTED => {
                            let v: serde_json::Value = resp.json().await?;
                            let id = v["id"]
                                .as_str()
                                .ok_or_else(|| anyhow::anyhow!("202 without an id: {v}"))?
                                .to_owned();
                            progress.fetch_add(1, Ordering::Relaxed);
                            let _ = sink.send(Submitted { id, at_ms });
                            return Ok(());
                        }
                        Ok(resp)
                            if resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS
                                && resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE =>
                        {
                            let code = resp.status();
                            let text = resp.text().await.unwrap_or_default();
                            anyhow::bail!("the gateway answered {code}: {text}");
                        }
                        // Busy or a dependency is briefly down: retry shortly.
                        _ => {}
                    }
                    if Instant::now() >= deadline {
                        anyhow::bail!("the gateway did not accept request {n} in time");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<anyhow::Result<()>>>()
        .await;
    let mut accepted = 0;
    for r in results {
        r?;
        accepted += 1;
    }
    Ok(accepted)
}

/// Follows submitted requests to their results by reading their state hashes in Redis (one
/// pipelined `HMGET state at` per request still open, per refresh).
pub struct ResultTracker {
    keys: Keys,
    conn: Conn,
    open: Vec<Submitted>,
    /// Latency (ms) of every request that finished `done`: result time minus submit time.
    pub done_ms: Vec<i64>,
    /// Ids that finished `failed`.
    pub failed: Vec<String>,
    /// When the last result arrived (wall clock, ms).
    pub last_result_ms: Option<i64>,
}

impl ResultTracker {
    pub fn new(keys: Keys, conn: Conn) -> Self {
        ResultTracker {
            keys,
            conn,
            open: Vec::new(),
            done_ms: Vec::new(),
            failed: Vec::new(),
            last_result_ms: None,
        }
    }

    pub fn add(&mut self, s: Submitted) {
        self.open.push(s);
    }

    /// Requests without a result yet.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Requests with a result (done or failed).
    pub fn finished(&self) -> usize {
        self.done_ms.len() + self.failed.len()
    }

    /// Read the state of every open request; returns the latencies (ms) of those that finished
    /// `done` since the last refresh.
    pub async fn refresh(&mut self) -> redis::RedisResult<Vec<i64>> {
        let mut newly = Vec::new();
        let mut still_open = Vec::with_capacity(self.open.len());
        for chunk in self.open.chunks(1000) {
            let mut pipe = redis::pipe();
            for s in chunk {
                pipe.cmd("HMGET")
                    .arg(self.keys.result(&s.id))
                    .arg("state")
                    .arg("at");
            }
            let rows: Vec<(Option<String>, Option<i64>)> =
                pipe.query_async(&mut self.conn.clone()).await?;
            for (s, (state, at)) in chunk.iter().zip(rows) {
                match state.as_deref() {
                    Some("done") => {
                        let at = at.unwrap_or_else(now_ms);
                        let latency = (at - s.at_ms).max(0);
                        self.done_ms.push(latency);
                        newly.push(latency);
                        self.last_result_ms = self.last_result_ms.max(Some(at));
                    }
                    Some("failed") => {
                        self.failed.push(s.id.clone());
                        self.last_result_ms =
                            self.last_result_ms.max(Some(at.unwrap_or_else(now_ms)));
                    }
                    _ => still_open.push(s.clone()),
                }
            }
        }
        self.open = still_open;
        Ok(newly)
    }
}

/// The `q` quantile (0..=1) of `values` by nearest rank; `None` when empty.
pub fn quantile(values: &[i64], q: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// The value of one sample (`name{labels}` exactly as exposed, or a bare name) in a Prometheus
/// text exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Sums a counter over worker processes that come and go: the last value seen per port is kept
/// when a worker stops, and a value going down on a port (a new process) starts a new count.
#[derive(Debug, Default)]
pub struct WorkerCounter {
    last: HashMap<u16, f64>,
    retired: f64,
}

impl WorkerCounter {
    /// Scrape `series` from the workers on `ports`.
    pub async fn scrape(&mut self, http: &reqwest::Client, ports: &[u16], series: &str) {
        for &port in ports {
            let Ok(resp) = http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .timeout(Duration::from_millis(500))
                .send()
                .await
            else {
                continue;
            };
            let Ok(text) = resp.text().await else {
                continue;
            };
            let v = sample(&text, series).unwrap_or(0.0);
            let last = self.last.entry(port).or_insert(0.0);
            if v < *last {
                self.retired += *last;
            }
            *last = v;
        }
    }

    /// The total over every worker seen.
    pub fn total(&self) -> f64 {
        self.retired + self.last.values().sum::<f64>()
    }
}

/// A run of `n` consecutive loopback ports that are free right now, below the ephemeral range
/// (so outgoing connections do not take them in the meantime).
pub fn free_port_run(n: u16) -> u16 {
    for _ in 0..200 {
        let r = uuid::Uuid::new_v4().as_u128();
        let base = 20_000 + (r % 12_000) as u16;
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no run of {n} free loopback ports found");
}

/// `qp-operator local` as a child process in a process group of its own, so that dropping it
/// (a failing test) kills the workers it started too.
pub struct LocalMode {
    child: Child,
    /// Base URL of its `/metrics`, `/healthz` and `/status.json`.
    pub url: String,
    /// Where its log goes.
    pub log: PathBuf,
    pub log_dir: PathBuf,
    /// The Prometheus file_sd file it writes, removed on drop if it is left behind.
    targets: Option<PathBuf>,
    http: reqwest::Client,
}

impl LocalMode {
    /// Start `qp-operator local -f file` with this workspace's binaries (`procs::binary`), on
    /// free ports, logging under `target/test-logs/<name>/`. `targets`: a Prometheus file_sd
    /// file to write.
    pub fn start(name: &str, file: &Path, targets: Option<&Path>) -> LocalMode {
        let logs = crate::env::workspace_root()
            .join("target/test-logs")
            .join(name);
        std::fs::create_dir_all(&logs).expect("create log dir");
        // operator, gateway, then up to 14 workers.
        let base = free_port_run(16);
        let listen = format!("127.0.0.1:{base}");
        let mut cmd = Command::new(crate::procs::binary("qp-operator"));
        cmd.arg("local")
            .arg("-f")
            .arg(file)
            .arg("--worker-bin")
            .arg(crate::procs::binary("qp-worker"))
            .args(["--listen", &listen])
            .args(["--base-port", &(base + 2).to_string()])
            .arg("--log-dir")
            .arg(&logs)
            .env("RUST_LOG", "info,librdkafka=warn");
        if let Some(t) = targets {
            cmd.arg("--prometheus-targets").arg(t);
        }
        let log = logs.join("qp-operator.log");
        let out = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .process_group(0);
        let child = cmd.spawn().expect("spawning qp-operator local");
        LocalMode {
            child,
            url: format!("http://{listen}"),
            log,
            log_dir: logs,
            targets: targets.map(Path::to_path_buf),
            http: reqwest::Client::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn status(&self) -> Option<LocalStatus> {
        status(&self.http, &self.url).await
    }

    /// Wait until at least one worker is ready and the gateway (when enabled) answers
    /// `/readyz`; returns that status.
    pub async fn wait_ready(&mut self, timeout: Duration) -> LocalStatus {
        let deadline = Instant::now() + timeout;
        loop {
            assert!(
                self.alive(),
                "qp-operator local exited; see {}",
                self.log.display()
            );
            if let Some(st) = self.status().await
                && st.ready_replicas >= 1
            {
                let gateway_ready = match &st.gateway_url {
                    None => true,
                    Some(g) => self
                        .http
                        .get(format!("{g}/readyz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                };
                if gateway_ready {
                    return st;
                }
            }
            assert!(
                Instant::now() < deadline,
                "local mode not ready after {timeout:?}; see {}",
                self.log_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM and wait up to `timeout` for it to drain its workers and exit; returns whether it
    /// exited successfully in time.
    pub async fn stop(&mut self, timeout: Duration) -> bool {
        signal(self.child.id() as i32, "-TERM");
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => return false,
            }
        }
    }
}

/// `kill <sig> <pid>` (negative pid: a process group).
pub fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, "--", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Drop for LocalMode {
    fn drop(&mut self) {
        // The whole group: local mode and every worker and gateway it started (after a clean
        // stop the group is empty and this does nothing; a process id is not reused while a
        // group carries it).
        signal(-(self.child.id() as i32), "-KILL");
        let _ = self.child.wait();
        // Killed, it could not remove its scrape targets: Prometheus would scrape dead ports.
        if let Some(t) = &self.targets {
            let _ = std::fs::remove_file(t);
        }
    }
}

/// Settings of a test QueueProcessor for local mode (see [`manifest`]).
#[derive(Debug, Clone)]
pub struct TestQp {
    pub sleep_millis: u32,
    pub per_replica_tokens: u32,
    pub max_replicas: u32,
}

/// A Kafka-source QueueProcessor manifest for `fixture`'s topic, group, names and Redis, with
/// the gateway on, fast polling and short scale-down windows, written to
/// `target/test-logs/<name>/queueprocessor.yaml`; returns the path.
pub fn manifest(fixture: &crate::fixture::Fixture, qp: &TestQp) -> PathBuf {
    let handler = format!(
        "builtin:\n        name: sleep\n        sleepMillis: {}",
        qp.sleep_millis
    );
    manifest_with_handler(fixture, qp, &handler)
}

/// [`manifest`] with another handler: `handler` is the YAML under `spec.worker.handler`,
/// indented for that place (8 spaces on continuation lines).
pub fn manifest_with_handler(
    fixture: &crate::fixture::Fixture,
    qp: &TestQp,
    handler: &str,
) -> PathBuf {
    let dir = crate::env::workspace_root()
        .join("target/test-logs")
        .join(&fixture.name);
    std::fs::create_dir_all(&dir).expect("create log dir");
    let text = format!(
        r#"apiVersion: queueprocessing.dev/v1alpha1
kind: QueueProcessor
metadata:
  name: {name}
  namespace: {ns}
spec:
  source:
    kafka:
      bootstrapServers: {bootstrap}
      topic: {topic}
      consumerGroup: {group}
  redis:
    url: {redis}
  concurrency:
    perReplicaTokens: {tokens}
    globalMaxTokens: {global}
    leaseSeconds: 5
  scaling:
    minReplicas: 1
    maxReplicas: {max}
    targetBacklogPerReplica: 50
    targetDrainSeconds: 5
    pollIntervalSeconds: 1
    scaleDownStabilizationSeconds: 3
    cooldownSeconds: 3
  worker:
    handler:
      {handler}
    shutdownTimeoutSeconds: 5
  results:
    ttlSeconds: 600
  gateway:
    enabled: true
    auth:
      disabled: true
"#,
        name = fixture.name,
        ns = fixture.namespace,
        bootstrap = fixture.bootstrap,
        topic = fixture.topic,
        group = fixture.group,
        redis = fixture.env.get("QP_REDIS_URL"),
        tokens = qp.per_replica_tokens,
        global = qp.per_replica_tokens * qp.max_replicas,
        max = qp.max_replicas,
    );
    let path = dir.join("queueprocessor.yaml");
    std::fs::write(&path, text).expect("write the manifest");
    path
}
