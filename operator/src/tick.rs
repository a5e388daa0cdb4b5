//! One reconcile tick, shared by both backends: measure -> decide -> apply -> tokens ->
//! metrics. The Kubernetes controller and local mode differ only in where replicas run
//! ([`Replicas`]: a Deployment, or local processes) and in how they report the outcome (the
//! status subresource and events, or `/status.json`); both fill the same status fields with
//! [`crate::scaler::fill_status`].
//!
//! The input is a [`Resolved`] QueueProcessor: validated, its Secrets read and its endpoints and
//! process configurations built, so nothing downstream re-checks an `Option`.

use std::time::{Duration, Instant};

use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::RedisSettings;
use tracing::warn;

use crate::crd::{QueueProcessor, SignalSpec};
use crate::error::{Error, Result};
use crate::health::Problem;
use crate::measure::{Probes, SourceTarget};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::scaler::{self, Observed, Scaler, SecretValues, Step};
use crate::workload::{self, Component, ProcessConfig};

/// Where a QueueProcessor's worker replicas run.
pub(crate) trait Replicas {
    /// The replica count the backend runs now (asked for, not ready); `None` before the first
    /// apply.
    async fn current(&mut self) -> Result<Option<u32>>;
    /// Replicas ready to take work.
    async fn ready(&mut self) -> Result<u32>;
    /// Run this many replicas.
    async fn apply(&mut self, replicas: u32) -> Result<()>;
    /// Why replicas cannot run, if they cannot (after [`Replicas::apply`]).
    async fn health(&mut self) -> Option<Problem>;
}

/// A QueueProcessor ready for the build and decide stages: validated, Secrets resolved.
/// Not `Debug`: it holds credentials.
#[derive(Clone)]
pub struct Resolved {
    pub namespace: String,
    pub name: String,
    pub keys: Keys,
    pub redis: RedisSettings,
    pub target: SourceTarget,
    pub policy: Policy,
    pub worker: ProcessConfig,
    /// The gateway's process, when enabled.
    pub gateway: Option<ProcessConfig>,
    pub poll: Duration,
    pub paused: bool,
    /// `spec.scaling.signals`.
    pub signals: Vec<SignalSpec>,
    /// Per signal: the other Redis it reads, credentials resolved (`None`: ours).
    pub signal_redis: Vec<Option<RedisSettings>>,
}

impl Resolved {
    /// Validate `qp` and resolve everything the stages need; `secrets` holds every value
    /// `qp.spec.secret_refs()` names.
    pub fn new(qp: &QueueProcessor, secrets: &SecretValues) -> Result<Self> {
        qp.spec
            .validate()
            .map_err(|e| Error::InvalidSpec(e.to_string()))?;
        let name = qp
            .metadata
            .name
            .clone()
            .ok_or_else(|| Error::InvalidSpec("metadata.name is required".into()))?;
        let namespace = qp
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let worker = workload::process(qp, Component::Worker)
            .ok_or_else(|| Error::InvalidSpec("source, redis or handler is incomplete".into()))?;
        reject_env_collisions(qp, &worker)?;
        let gateway =
            if qp.spec.gateway.enabled {
                Some(workload::process(qp, Component::Gateway).ok_or_else(|| {
                    Error::InvalidSpec("gateway configuration is incomplete".into())
                })?)
            } else {
                None
            };
        Ok(Resolved {
            keys: Keys::new(&namespace, &name),
            redis: scaler::redis_settings(&qp.spec.redis, secrets)?,
            target: scaler::source_target(qp, secrets)?,
            policy: Policy::from_spec(&qp.spec.scaling, &qp.spec.concurrency),
            worker,
            gateway,
            poll: Duration::from_secs(qp.spec.scaling.poll_interval_seconds.max(1) as u64),
            paused: qp.is_paused(),
            signals: qp.spec.scaling.signals.clone(),
            signal_redis: qp
                .spec
                .scaling
                .signals
                .iter()
                .map(|s| {
                    s.redis
                        .as_ref()
                        .map(|r| scaler::redis_settings(r, secrets))
                        .transpose()
                })
                .collect::<Result<_>>()?,
            namespace,
            name,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A variable of `spec.worker.env` that the operator sets itself (from another field of the
/// spec) is an invalid spec: the pod would get two values for one name, and which one the
/// worker reads is not the user's to guess. Said before anything is applied, not discovered
/// as a failed apply. Variables the operator leaves at their defaults (tuning settings) stay
/// the user's to set.
fn reject_env_collisions(qp: &QueueProcessor, worker: &ProcessConfig) -> Result<()> {
    let ours: Vec<&str> = worker.env.iter().map(|(name, _)| name.as_str()).collect();
    let clashes: Vec<String> = qp
        .spec
        .worker
        .env
        .iter()
        .enumerate()
        .filter(|(_, e)| ours.contains(&e.name.as_str()))
        .map(|(i, e)| format!("spec.worker.env[{i}]: {} is set by the operator", e.name))
        .collect();
    if clashes.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidSpec(format!(
            "{}; set it through its field of the QueueProcessor instead",
            clashes.join(", ")
        )))
    }
}

/// What one tick measured, decided and found.
pub struct Tick {
    pub observed: Observed,
    pub step: Step,
    /// Replicas before the decision.
    pub current: u32,
    pub ready: u32,
    pub problem: Option<Problem>,
    /// Writing the token limit, when the workers' Redis was readable (else nothing was
    /// written: a limit must not be set blind).
    pub tokens: Result<()>,
}

/// Measure, decide with `scaler`'s memory, apply the replica count, write the token limit,
/// record metrics. Errors reading or applying replicas end the tick; a failed token write is
/// reported in [`Tick::tokens`] for the caller to weigh.
pub(crate) async fn run(
    r: &Resolved,
    probes: &Probes,
    scaler: &mut Scaler,
    replicas: &mut impl Replicas,
    metrics: &Metrics,
) -> Result<Tick> {
    let measured_at = Instant::now();
    scaler.measure_on(&r.target);
    let mut used = vec![r.redis.clone()];
    used.extend(r.signal_redis.iter().flatten().cloned());
    probes.use_redis(&r.key(), &used);
    tracing::debug!("measuring");
    let observed = scaler::observe(probes, r).await;
    tracing::debug!(
        source_ok = observed.source.is_ok(),
        workers_ok = observed.workers.is_ok(),
        "measured"
    );
    let current = replicas.current().await?.unwrap_or(r.policy.min_replicas);
    let ready = replicas.ready().await?;
    let now_ms = monotonic_ms();
    let step = scaler.step(&r.policy, &observed, current, ready, r.paused, now_ms);
    replicas.apply(step.decision.replicas).await?;
    tracing::debug!(replicas = step.decision.replicas, "applied");
    if step.decision.changed {
        metrics
            .decision_latency
            .observe(measured_at.elapsed().as_secs_f64());
    }
    let problem = replicas.health().await;
    let tokens = if observed.workers.is_ok() {
        scaler::set_token_limit(probes, &r.redis, &r.keys, step.decision.token_limit).await
    } else {
        Ok(())
    };
    if let Err(e) = &tokens {
        warn!(error = %e, "writing the token limit failed");
    }
    let tick = Tick {
        observed,
        step,
        current,
        ready,
        problem,
        tokens,
    };
    record(
        metrics,
        &r.namespace,
        &r.name,
        &tick,
        probes.kafka_requests(),
    );
    Ok(tick)
}

/// Milliseconds on a clock that starts at [`MONOTONIC_ORIGIN_MS`] when this process first asks:
/// the clock of the decision windows (cooldown, stabilization, rate intervals). Monotonic,
/// unlike the wall clock, which an NTP step can move back (a stabilization window that never
/// ends) or forward (a cooldown cut short).
pub fn monotonic_ms() -> u64 {
    MONOTONIC_ORIGIN_MS + clock_origin().0.elapsed().as_millis() as u64
}

/// When [`monotonic_ms`] started, on both clocks.
fn clock_origin() -> &'static (Instant, jiff::Timestamp) {
    static ORIGIN: std::sync::OnceLock<(Instant, jiff::Timestamp)> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(|| (Instant::now(), jiff::Timestamp::now()))
}

/// A wall-clock time and the [`monotonic_ms`] reading it corresponds to, fixed for the
/// process: converting monotonic times for the status with this pair gives the same wall time
/// for the same reading at every poll. Converting with the current time of each poll moved the
/// result by a few milliseconds each time, so the status differed at every poll and was
/// written at every poll (320 writes a second at a thousand QueueProcessors).
pub fn clock_pair() -> (jiff::Timestamp, u64) {
    (clock_origin().1, MONOTONIC_ORIGIN_MS)
}

/// Where [`monotonic_ms`] starts: far enough from zero that times restored from a previous
/// leader's status (minutes or hours before this process started) are still representable.
pub const MONOTONIC_ORIGIN_MS: u64 = 30 * 24 * 3600 * 1000;

/// Record what one tick measured and decided (both backends).
fn record(m: &Metrics, namespace: &str, name: &str, tick: &Tick, kafka_requests: u64) {
    let l = [namespace, name];
    let (observed, step) = (&tick.observed, &tick.step);
    m.source_up
        .with_label_values(&l)
        .set(i64::from(observed.source.is_ok()));
    if let Ok(s) = &observed.source {
        m.backlog.with_label_values(&l).set(s.backlog as i64);
        if let Some(max) = s.lags.iter().map(|p| p.lag).max() {
            m.partition_lag_max.with_label_values(&l).set(max as i64);
        }
    }
    m.desired_replicas
        .with_label_values(&l)
        .set(i64::from(step.decision.replicas));
    m.ready_replicas
        .with_label_values(&l)
        .set(i64::from(tick.ready));
    m.tokens_limit
        .with_label_values(&l)
        .set(i64::from(step.decision.token_limit));
    if let Ok(w) = &observed.workers {
        m.tokens_in_use
            .with_label_values(&l)
            .set(w.tokens_in_use as i64);
    }
    if let Some(r) = step.processed_rate {
        m.throughput.with_label_values(&l).set(r);
    }
    m.kafka_requests.reset();
    m.kafka_requests.inc_by(kafka_requests);
}
