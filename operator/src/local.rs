//! Local mode: `qp-operator local -f queueprocessor.yaml` runs the same decision loop as the
//! cluster controller, but its replicas are `qp-worker` processes on this machine.
//!
//! - Scale up: start processes (each with its own metrics port and worker id).
//! - Scale down: SIGTERM the newest; it drains (finishes running messages, commits, releases
//!   its tokens) while the loop goes on without it.
//! - A process that exits unexpectedly is restarted and counted in
//!   `qp_operator_local_restarts_total`; one that keeps crashing is restarted with a growing
//!   delay (see [`restart_delay`]), as the kubelet's CrashLoopBackOff does.
//! - The token limit and the status are kept exactly as in the cluster; the status is served as
//!   JSON on `/status.json` next to `/metrics`.
//! - Secrets come from a directory laid out like a mounted Secret: `<dir>/<name>/<key>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use qp_protocol::observability;
use serde_json::json;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::cli::LocalArgs;
use crate::crd::{QueueProcessor, QueueProcessorStatus};
use crate::error::{Error, Result};
use crate::health::Problem;
use crate::measure::Probes;
use crate::metrics::Metrics;
use crate::scaler::{self, Scaler, SecretValues};
use crate::tick::{self, Replicas, Resolved};
use crate::workload::{EnvValue, ProcessConfig};

/// Crash-loop backoff: the delay before restarting a process that exited `crashes` times in a
/// row. The first restart is immediate (a one-off crash, such as an OOM kill, comes back at
/// once); then 1 s, 2 s, 4 s ... up to [`BACKOFF_MAX`], so a worker that cannot start (bad
/// handler command, unreachable Redis) does not fork every poll and flood its log.
/// Stays hand-written (not `backon`): a pure, tested function of the crash count, not a retry.
pub fn restart_delay(crashes: u32) -> Duration {
    match crashes {
        0 | 1 => Duration::ZERO,
        n => BACKOFF_FIRST
            .saturating_mul(1 << (n - 2).min(16))
            .min(BACKOFF_MAX),
    }
}

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long before it exited starts the crash count afresh.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// One `qp-worker` process.
struct Replica {
    id: String,
    port: u16,
    child: Child,
    started: Instant,
    /// Unexpected exits in a row (carried over to the replacement process).
    crashes: u32,
    /// When the process was seen to have exited; `None` while it runs.
    exited: Option<Instant>,
}

impl Replica {
    /// Notes an unexpected exit (once) and says whether the replacement is due now.
    fn restart_due(&mut self, now: Instant) -> bool {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.crashes = if now.duration_since(self.started) >= BACKOFF_RESET_AFTER {
                1
            } else {
                self.crashes + 1
            };
            self.exited = Some(now);
            warn!(
                id = %self.id,
                %status,
                crashes_in_a_row = self.crashes,
                restart_in = ?restart_delay(self.crashes),
                "process exited unexpectedly"
            );
        }
        self.exited
            .is_some_and(|at| now >= at + restart_delay(self.crashes))
    }
}

/// The status and a few live figures, for `/status.json` (the demo's table reads it).
#[derive(Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalStatus {
    name: String,
    status: QueueProcessorStatus,
    replicas: u32,
    ready_replicas: u32,
    restarts: u64,
    worker_ports: Vec<u16>,
    /// Process ids of the workers, in the order of `worker_ports`.
    worker_pids: Vec<u32>,
    gateway_url: Option<String>,
}

fn read_secrets(qp: &QueueProcessor, dir: Option<&Path>) -> Result<SecretValues> {
    let mut out = SecretValues::new();
    for r in qp.spec.secret_refs() {
        let dir = dir.ok_or_else(|| {
            Error::SecretRef(format!(
                "the QueueProcessor references Secret {:?}; pass --secrets-dir with <dir>/{}/{}",
                r.name, r.name, r.key
            ))
        })?;
        let path = dir.join(&r.name).join(&r.key);
        let value = std::fs::read_to_string(&path)
            .map_err(|e| Error::SecretRef(format!("reading {}: {e}", path.display())))?;
        out.insert(
            (r.name.clone(), r.key.clone()),
            value.trim_end_matches('\n').to_owned(),
        );
    }
    Ok(out)
}

fn worker_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("qp-worker")));
    match sibling {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("qp-worker"),
    }
}

/// Translate a process configuration into a command line and environment.
fn command(
    bin: &Path,
    cfg: &ProcessConfig,
    id: &str,
    port: u16,
    secrets: &SecretValues,
    secrets_dir: Option<&Path>,
    log: &Path,
) -> Result<Command> {
    let mut cmd = Command::new(bin);
    cmd.args(&cfg.args);
    // A process gets the QueueProcessor's configuration and nothing else: `QP_*` variables of
    // local mode's own environment (an exported env file, say) would be read as worker
    // settings and could contradict the spec.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("QP_") {
            cmd.env_remove(name);
        }
    }
    for (name, value) in &cfg.env {
        let v = match value {
            EnvValue::Value(v) => v.clone(),
            EnvValue::Secret(r) => secrets
                .get(&(r.name.clone(), r.key.clone()))
                .cloned()
                .ok_or_else(|| Error::SecretRef(format!("{}/{} unresolved", r.name, r.key)))?,
            EnvValue::SecretFile(r) => secrets_dir
                .map(|d| d.join(&r.name).join(&r.key).display().to_string())
                .ok_or_else(|| Error::SecretRef("--secrets-dir is required".into()))?,
            EnvValue::PodName => id.to_owned(),
        };
        cmd.env(name, v);
    }
    cmd.env("QP_LISTEN", format!("127.0.0.1:{port}"))
        .env("QP_LOG_FORMAT", "text")
        .env("QP_WORKER_ID", id);
    // Append: a restarted process must not wipe the log that says why its predecessor died.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::Local(format!("opening {}: {e}", log.display())))?;
    let err = file.try_clone().map_err(|e| Error::Local(e.to_string()))?;
    cmd.stdout(file)
        .stderr(err)
        .stdin(std::process::Stdio::null());
    cmd.kill_on_drop(true);
    die_with_parent(&mut cmd);
    Ok(cmd)
}

/// The process gets SIGTERM when local mode dies, however it dies. `kill_on_drop` covers every
/// exit that runs destructors; after a SIGKILL or an OOM kill none run, and orphaned workers
/// would go on consuming with a token limit that nobody maintains any more (after a Redis
/// restart they wait for it forever). The kernel's parent-death signal is the only mechanism
/// that survives that, and no crate wraps it for a child about to be spawned, hence the
/// `pre_exec`. It fires when the spawning *thread* exits: processes are spawned from the
/// runtime's worker threads, which live as long as local mode.
fn die_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes two system
    // calls (prctl, getppid); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            // Local mode died between fork and prctl: the signal will never come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("qp-operator local exited"));
            }
            Ok(())
        });
    }
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
}

struct Local {
    qp: QueueProcessor,
    bin: PathBuf,
    secrets: SecretValues,
    secrets_dir: Option<PathBuf>,
    log_dir: PathBuf,
    base_port: u16,
    worker_cfg: ProcessConfig,
    replicas: Vec<Replica>,
    /// Processes draining after a scale-down; reaped when they exit.
    draining: Vec<Replica>,
    next_index: u32,
    http: reqwest::Client,
}

impl Local {
    fn free_port(&self) -> u16 {
        let used: Vec<u16> = self
            .replicas
            .iter()
            .chain(&self.draining)
            .map(|r| r.port)
            .collect();
        (self.base_port..)
            .find(|p| !used.contains(p))
            .expect("a free port")
    }

    fn spawn(&self, id: String, port: u16) -> Result<Replica> {
        self.spawn_process(&self.worker_cfg, id, port)
    }

    fn spawn_process(&self, cfg: &ProcessConfig, id: String, port: u16) -> Result<Replica> {
        let log = self.log_dir.join(format!("{id}.log"));
        let mut cmd = command(
            &self.bin,
            cfg,
            &id,
            port,
            &self.secrets,
            self.secrets_dir.as_deref(),
            &log,
        )?;
        let child = cmd
            .spawn()
            .map_err(|e| Error::Local(format!("starting {}: {e}", self.bin.display())))?;
        info!(%id, port, component = cfg.component.as_str(), "started process");
        Ok(Replica {
            id,
            port,
            child,
            started: Instant::now(),
            crashes: 0,
            exited: None,
        })
    }

    /// A new process in place of an exited one, keeping its identity and crash count.
    fn respawn(&self, cfg: &ProcessConfig, old: &Replica) -> Result<Replica> {
        let mut r = self.spawn_process(cfg, old.id.clone(), old.port)?;
        r.crashes = old.crashes;
        Ok(r)
    }

    fn scale_to(&mut self, n: u32) -> Result<()> {
        while (self.replicas.len() as u32) < n {
            let id = format!(
                "{}-worker-{}",
                self.qp.metadata.name.as_deref().unwrap_or("qp"),
                self.next_index
            );
            self.next_index += 1;
            let port = self.free_port();
            let r = self.spawn(id, port)?;
            self.replicas.push(r);
        }
        while (self.replicas.len() as u32) > n {
            let r = self.replicas.pop().expect("non-empty");
            info!(id = %r.id, "draining worker (SIGTERM)");
            terminate(&r.child);
            self.draining.push(r);
        }
        Ok(())
    }

    /// Restart crashed workers whose backoff has passed; forget drained ones. Returns how many
    /// were restarted.
    fn supervise(&mut self) -> Result<u64> {
        self.draining
            .retain_mut(|r| matches!(r.child.try_wait(), Ok(None)));
        let now = Instant::now();
        let mut restarted = 0;
        for i in 0..self.replicas.len() {
            if self.replicas[i].restart_due(now) {
                self.replicas[i] = self.respawn(&self.worker_cfg, &self.replicas[i])?;
                restarted += 1;
            }
        }
        Ok(restarted)
    }

    async fn ready(&self) -> u32 {
        let mut n = 0;
        for r in &self.replicas {
            let url = format!("http://127.0.0.1:{}/readyz", r.port);
            if let Ok(resp) = self.http.get(url).send().await
                && resp.status().is_success()
            {
                n += 1;
            }
        }
        n
    }
}

/// Local processes as the place replicas run.
impl Replicas for Local {
    async fn current(&mut self) -> Result<Option<u32>> {
        Ok(Some(self.replicas.len() as u32))
    }

    async fn ready(&mut self) -> Result<u32> {
        Ok(Local::ready(self).await)
    }

    async fn apply(&mut self, replicas: u32) -> Result<()> {
        self.scale_to(replicas)
    }

    /// Crashed processes restart with a backoff ([`Local::supervise`]); there is no pod status
    /// to diagnose.
    async fn health(&mut self) -> Option<Problem> {
        None
    }
}

fn write_targets(
    path: &Path,
    qp: &QueueProcessor,
    ports: &[u16],
    gateway: Option<u16>,
    operator: SocketAddr,
) {
    let ns = qp.namespace_or_default();
    let name = qp.metadata.name.clone().unwrap_or_default();
    let labels =
        |component: &str| json!({"namespace": ns, "queueprocessor": name, "component": component});
    let mut groups = vec![
        json!({"targets": ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>(),
               "labels": labels("worker")}),
        json!({"targets": [operator.to_string()], "labels": labels("operator")}),
    ];
    if let Some(g) = gateway {
        groups.push(json!({"targets": [format!("127.0.0.1:{g}")], "labels": labels("gateway")}));
    }
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, serde_json::to_vec_pretty(&groups).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

pub async fn run(args: LocalArgs) -> Result<()> {
    // Handle SIGTERM and Ctrl-C from the very start: a signal that arrived before the handlers
    // existed would kill this process with the default action and orphan the workers.
    let mut stop = Box::pin(shutdown_signal()?);
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| Error::Local(format!("reading {}: {e}", args.file.display())))?;
    let mut qp = QueueProcessor::from_yaml(&text).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    if qp.metadata.namespace.is_none() {
        qp.metadata.namespace = Some("default".into());
    }
    let secrets = read_secrets(&qp, args.secrets_dir.as_deref())?;
    let resolved = Resolved::new(&qp, &secrets)?;
    let (ns, name) = (resolved.namespace.clone(), resolved.name.clone());
    std::fs::create_dir_all(&args.log_dir)
        .map_err(|e| Error::Local(format!("creating {}: {e}", args.log_dir.display())))?;

    let metrics = Metrics::new();
    let status = Arc::new(Mutex::new(LocalStatus {
        name: format!("{ns}/{name}"),
        ..Default::default()
    }));
    serve(args.listen, metrics.clone(), status.clone()).await?;

    let mut local = Local {
        bin: worker_binary(args.worker_bin.as_deref()),
        secrets,
        secrets_dir: args.secrets_dir.clone(),
        log_dir: args.log_dir.clone(),
        base_port: args.base_port,
        worker_cfg: resolved.worker.clone(),
        replicas: Vec::new(),
        draining: Vec::new(),
        next_index: 0,
        http: reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
            .map_err(|e| Error::Local(e.to_string()))?,
        qp: qp.clone(),
    };

    // The gateway, when enabled, is one process on the port below the workers'.
    let mut gateway: Option<(Replica, ProcessConfig)> = None;
    if let Some(cfg) = resolved.gateway.clone() {
        let port = args.base_port.checked_sub(1).ok_or_else(|| {
            Error::Local("--base-port must leave room for the gateway below it".into())
        })?;
        let g = local.spawn_process(&cfg, format!("{name}-gateway"), port)?;
        gateway = Some((g, cfg));
        status.lock().expect("status lock").gateway_url = Some(format!("http://127.0.0.1:{port}"));
    }

    let probes = Probes::default();
    let mut scaler = Scaler::default();
    let mut restarts = 0u64;
    let labels = [ns.as_str(), name.as_str()];
    let started = Instant::now();
    info!(file = %args.file.display(), qp = %format!("{ns}/{name}"), "local mode running");
    loop {
        let mut restarted = local.supervise()?;
        if let Some((g, cfg)) = &mut gateway
            && g.restart_due(Instant::now())
        {
            *g = local.respawn(cfg, g)?;
            restarted += 1;
        }
        if restarted > 0 {
            restarts += restarted;
            metrics
                .local_restarts
                .with_label_values(&labels)
                .inc_by(restarted);
        }
        let tick = tick::run(&resolved, &probes, &mut scaler, &mut local, &metrics).await?;
        if tick.step.decision.changed {
            info!(from = tick.current, to = tick.step.decision.replicas,
                reason = %tick.step.decision.reason, "scaling");
        }
        {
            let mut st = status.lock().expect("status lock");
            scaler::fill_status_with_health(
                &mut st.status,
                &tick.observed,
                &tick.step,
                tick.ready,
                tick.problem.as_ref(),
                Some(1),
                Time(Timestamp::now()),
            );
            st.status.refresh_summary(&qp.spec);
            st.replicas = local.replicas.len() as u32;
            st.ready_replicas = tick.ready;
            st.restarts = restarts;
            st.worker_ports = local.replicas.iter().map(|r| r.port).collect();
            st.worker_pids = local
                .replicas
                .iter()
                .map(|r| r.child.id().unwrap_or(0))
                .collect();
        }
        if let Some(path) = &args.prometheus_targets {
            let ports: Vec<u16> = local.replicas.iter().map(|r| r.port).collect();
            write_targets(
                path,
                &qp,
                &ports,
                gateway.as_ref().map(|g| g.0.port),
                args.listen,
            );
        }
        let poll = resolved.poll;
        let young =
            local.replicas.iter().any(|r| r.started.elapsed() < poll) || started.elapsed() < poll;
        // Poll faster while processes are starting, so readiness shows up promptly.
        let wait = if young {
            poll.min(Duration::from_millis(500))
        } else {
            poll
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => break,
        }
    }

    info!(
        replicas = local.replicas.len(),
        "stopping: draining workers"
    );
    for r in local.replicas.iter().chain(&local.draining) {
        terminate(&r.child);
    }
    if let Some((g, _)) = &gateway {
        terminate(&g.child);
    }
    // They all drain at the same time: one deadline for all of them, not one per process.
    let drain = Duration::from_secs(qp.spec.worker.shutdown_timeout_seconds.max(1) as u64 + 5);
    let deadline = tokio::time::Instant::now() + drain;
    for r in local.replicas.iter_mut().chain(local.draining.iter_mut()) {
        if tokio::time::timeout_at(deadline, r.child.wait())
            .await
            .is_err()
        {
            warn!(id = %r.id, "worker did not drain in time; killing it");
            let _ = r.child.kill().await;
        }
    }
    if let Some((mut g, _)) = gateway
        && tokio::time::timeout(Duration::from_secs(5), g.child.wait())
            .await
            .is_err()
    {
        let _ = g.child.kill().await;
    }
    if let Some(path) = &args.prometheus_targets {
        let _ = std::fs::remove_file(path);
    }
    info!("local mode stopped");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT. Both handlers are installed when this is called,
/// not when the future is first polled.
pub(crate) fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind| {
        signal(kind).map_err(|e| Error::Local(format!("installing a signal handler: {e}")))
    };
    let mut term = install(SignalKind::terminate())?;
    let mut int = install(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// `/metrics` and `/healthz` (local mode has no `/readyz`), and the status as `/status.json`.
async fn serve(addr: SocketAddr, metrics: Metrics, status: Arc<Mutex<LocalStatus>>) -> Result<()> {
    let status_json = get(move || {
        let st = status.lock().expect("status lock").clone();
        async move { axum::Json(st) }
    });
    let app = observability::router(move || metrics.render(), None)
        .merge(Router::new().route("/status.json", status_json));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Local(format!("binding {addr}: {e}")))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_loops_back_off_up_to_a_cap() {
        let delays: Vec<u64> = (0..=9).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(delays, [0, 0, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(restart_delay(u32::MAX), BACKOFF_MAX);
    }

    /// A real process that exits at once: noted once, restarted per the backoff, and a
    /// process that ran long enough starts the count afresh.
    #[tokio::test]
    async fn an_exited_process_is_due_for_restart_after_its_backoff() {
        let spawn = || {
            let mut cmd = Command::new("false");
            cmd.kill_on_drop(true);
            cmd.spawn().expect("spawn false")
        };
        let t0 = Instant::now();
        let mut r = Replica {
            id: "w".into(),
            port: 1,
            child: spawn(),
            started: t0,
            crashes: 1,
            exited: None,
        };
        r.child.wait().await.unwrap();
        // Second crash in a row: due after 1 s, not before.
        assert!(!r.restart_due(t0));
        assert_eq!((r.crashes, r.exited), (2, Some(t0)));
        assert!(!r.restart_due(t0 + Duration::from_millis(999)));
        assert_eq!(r.crashes, 2, "an exit is counted once");
        assert!(r.restart_due(t0 + Duration::from_secs(1)));

        // It had run for a minute before exiting: the count starts again, restart at once.
        let mut long = Replica {
            child: spawn(),
            crashes: 5,
            exited: None,
            ..r
        };
        long.child.wait().await.unwrap();
        assert!(long.restart_due(t0 + BACKOFF_RESET_AFTER));
        assert_eq!(long.crashes, 1);
    }
}
