//! One scaling step, shared by the Kubernetes controller and local mode: measure, turn the
//! readings into rates, ask the pure policy for a decision, and describe the result in status
//! terms. Nothing here knows whether replicas are pods or processes.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use qp_protocol::kafka::KafkaArgs;
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::RedisSettings;
use qp_protocol::tokens::{PoolOptions, TokenPool};

use crate::crd::{
    CONDITION_READY, CONDITION_SCALING, CONDITION_SOURCE_REACHABLE, ConditionStatus,
    QueueProcessor, QueueProcessorStatus, RedisEndpoint, RedisSpec, SignalKind, SignalStatus,
    Source, ThroughputStatus, TokenStatus,
};
use crate::error::{Error, Result};
use crate::health::Problem;
use crate::measure::{Probes, SourceReading, SourceTarget, WorkerReading};
use crate::policy::{self, Decision, Observation, Policy, PolicyState, Remembered, SignalValue};
use crate::rates::{PerReplicaCapacity, RateEstimator};
use crate::signals::SignalReading;

/// Resolved secret values, by (Secret name, key).
pub type SecretValues = HashMap<(String, String), String>;

fn secret(secrets: &SecretValues, r: &crate::crd::SecretKeyRef) -> Result<String> {
    secrets
        .get(&(r.name.clone(), r.key.clone()))
        .cloned()
        .ok_or_else(|| Error::SecretRef(format!("{}/{} was not resolved", r.name, r.key)))
}

/// How the operator itself reaches the QueueProcessor's Redis.
pub fn redis_settings(spec: &RedisSpec, secrets: &SecretValues) -> Result<RedisSettings> {
    let password = spec
        .password_secret_ref
        .as_ref()
        .map(|r| secret(secrets, r))
        .transpose()?;
    let (url, nodes) = match spec.endpoint() {
        Some(RedisEndpoint::Url(u)) => (Some(u.to_owned()), None),
        Some(RedisEndpoint::Cluster(n)) => (None, Some(n.join(","))),
        None => return Err(Error::InvalidSpec("redis needs url or clusterNodes".into())),
    };
    let username = spec
        .username_secret_ref
        .as_ref()
        .map(|r| secret(secrets, r))
        .transpose()?;
    let ca = spec
        .ca_secret_ref
        .as_ref()
        .map(|r| secret(secrets, r).map(String::into_bytes))
        .transpose()?;
    Ok(
        RedisSettings::from_parts(url.as_deref(), nodes.as_deref(), password, spec.uses_tls())
            .map_err(|e| Error::InvalidSpec(e.to_string()))?
            .with_username(username)
            .with_ca(ca),
    )
}

/// How the operator measures the source, credentials resolved. TLS material is passed to
/// librdkafka as PEM strings, so nothing secret is written to disk.
pub fn source_target(qp: &QueueProcessor, secrets: &SecretValues) -> Result<SourceTarget> {
    match qp.spec.source.get() {
        Some(Source::Kafka(k)) => {
            let mut args = KafkaArgs {
                kafka_bootstrap: Some(k.bootstrap_servers.clone()),
                kafka_topic: Some(k.topic.clone()),
                kafka_group: Some(k.consumer_group.clone()),
                kafka_sasl_mechanism: None,
                kafka_username: None,
                kafka_password: None,
                kafka_tls: k.tls.is_some(),
                kafka_ca_file: None,
                kafka_cert_file: None,
                kafka_key_file: None,
            };
            if let Some(sasl) = &k.sasl {
                args.kafka_sasl_mechanism = Some(sasl.mechanism.as_str().to_owned());
                args.kafka_username = Some(secret(secrets, &sasl.username_secret_ref)?);
                args.kafka_password = Some(secret(secrets, &sasl.password_secret_ref)?);
            }
            let mut properties = args.security_properties();
            if let Some(tls) = &k.tls {
                for (prop, r) in [
                    ("ssl.ca.pem", &tls.ca_secret_ref),
                    ("ssl.certificate.pem", &tls.client_cert_secret_ref),
                    ("ssl.key.pem", &tls.client_key_secret_ref),
                ] {
                    if let Some(r) = r {
                        properties.push((prop.to_owned(), secret(secrets, r)?));
                    }
                }
            }
            Ok(SourceTarget::Kafka {
                bootstrap: k.bootstrap_servers.clone(),
                topic: k.topic.clone(),
                group: k.consumer_group.clone(),
                properties,
            })
        }
        Some(Source::RedisList(r)) => Ok(SourceTarget::RedisList { key: r.key.clone() }),
        Some(Source::RedisStream(s)) => Ok(SourceTarget::RedisStream {
            key: s.key.clone(),
            group: s.group.clone(),
        }),
        None => Err(Error::InvalidSpec("exactly one source is required".into())),
    }
}

mod memory;

/// Everything measured for one decision.
pub struct Observed {
    pub source: Result<SourceReading>,
    pub workers: Result<WorkerReading>,
    /// `spec.scaling.signals`, as read.
    pub signals: Vec<SignalReading>,
    /// The first signal that could not be read, as an error for conditions and events.
    pub signal_error: Option<Error>,
}

impl Observed {
    /// What went wrong, if anything: the source first, then Redis, then a signal.
    pub fn error(&self) -> Option<&Error> {
        self.source
            .as_ref()
            .err()
            .or(self.workers.as_ref().err())
            .or(self.signal_error.as_ref())
    }
}

/// How fresh a worker heartbeat must be for the replica to count as live.
pub const HEARTBEAT_FRESH: Duration = Duration::from_secs(5);

/// Measure the source, the workers and the signals concurrently: a slow one does not delay
/// the others.
pub async fn observe(probes: &Probes, r: &crate::tick::Resolved) -> Observed {
    // Each signal from its own Redis when it names one, else from the QueueProcessor's
    // (connections are shared per endpoint).
    let read_signals = crate::signals::read(
        &r.signals,
        |i| {
            let settings = r
                .signal_redis
                .get(i)
                .and_then(Option::as_ref)
                .unwrap_or(&r.redis);
            probes.redis(settings)
        },
        unix_seconds(),
    );
    let key = r.key();
    let (source, workers, signals) = tokio::join!(
        probes.source(&key, &r.target, &r.redis),
        probes.workers(&r.redis, &r.keys, HEARTBEAT_FRESH),
        read_signals
    );
    let signal_error = signals.iter().find_map(|s| {
        let e = s.value.as_ref().err()?;
        Some(Error::Signal(format!("signal {}: {e}", s.spec.name)))
    });
    Observed {
        source,
        workers,
        signals,
        signal_error,
    }
}

impl Scaler {
    /// The signals as the policy sees them: a `counterRate` becomes the rate of its counter
    /// (left out until two polls have measured it); the others are their values.
    fn signal_values(&mut self, readings: &[SignalReading], now_ms: u64) -> Vec<SignalValue> {
        self.signal_rates.retain(|(name, key), _| {
            readings
                .iter()
                .any(|r| r.spec.name == *name && r.spec.key == *key)
        });
        readings
            .iter()
            .filter_map(|r| {
                let rate = r.spec.kind == SignalKind::CounterRate;
                let value = match (&r.value, rate) {
                    (Ok(total), true) => Ok(self
                        .signal_rates
                        .entry((r.spec.name.clone(), r.spec.key.clone()))
                        .or_insert_with(|| {
                            RateEstimator::new(RATE_TIME_CONSTANT_MS, RATE_MAX_GAP_MS)
                        })
                        .observe(now_ms, total.max(0.0) as u64)?),
                    (Ok(v), false) => Ok(*v),
                    (Err(e), _) => Err(e.clone()),
                };
                Some(SignalValue {
                    name: r.spec.name.clone(),
                    value,
                    target_per_replica: r.spec.target_per_replica as f64,
                    activation: r.spec.activation as f64,
                    rate,
                })
            })
            .collect()
    }
}

/// Now in Unix seconds, for sorted sets scored by due time.
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Memory of one QueueProcessor between steps.
pub struct Scaler {
    policy: PolicyState,
    arrival: RateEstimator,
    processed: RateEstimator,
    failed: RateEstimator,
    capacity: PerReplicaCapacity,
    /// What the arrival rate was measured on ([`SourceTarget::identity`]).
    source: Option<String>,
    /// Rates of `counterRate` signals, by signal name and key.
    signal_rates: HashMap<(String, String), RateEstimator>,
}

/// The result of one step.
#[derive(Debug, Clone)]
pub struct Step {
    pub decision: Decision,
    /// The signals the decision saw.
    pub signals: Vec<SignalValue>,
    pub arrival_rate: Option<f64>,
    pub processed_rate: Option<f64>,
    pub failed_rate: Option<f64>,
    pub per_replica_rate: Option<f64>,
    /// What the policy remembers after this step, to store in the status.
    pub memory: Remembered,
}

/// Smoothing of measured rates: a few polls, so one odd poll does not swing the decision.
const RATE_TIME_CONSTANT_MS: u64 = 3_000;
/// A gap this long between polls makes a rate estimate stale.
const RATE_MAX_GAP_MS: u64 = 30_000;

impl Default for Scaler {
    fn default() -> Self {
        let rate = || RateEstimator::new(RATE_TIME_CONSTANT_MS, RATE_MAX_GAP_MS);
        Scaler {
            policy: PolicyState::default(),
            arrival: rate(),
            processed: rate(),
            failed: rate(),
            // Three time constants, as the capacity estimator asks.
            capacity: PerReplicaCapacity::new(3 * RATE_TIME_CONSTANT_MS, RATE_TIME_CONSTANT_MS),
            source: None,
            signal_rates: HashMap::new(),
        }
    }
}

impl Scaler {
    /// Say what the source is before a step. Another topic, group or cluster has other log
    /// ends: their difference to the old ones is no arrival rate, so the history is dropped
    /// (it once read as a million messages a second).
    pub fn measure_on(&mut self, target: &SourceTarget) {
        let id = target.identity();
        if self.source.as_deref() != Some(id.as_str()) {
            self.arrival.reset();
            self.source = Some(id);
        }
    }

    pub fn step(
        &mut self,
        policy: &Policy,
        observed: &Observed,
        current: u32,
        ready: u32,
        paused: bool,
        now_ms: u64,
    ) -> Step {
        let source = observed.source.as_ref();
        let workers = observed.workers.as_ref().ok();
        let arrival_rate = source
            .ok()
            .and_then(|s| s.produced_total)
            .and_then(|t| self.arrival.observe(now_ms, t));
        let processed_rate =
            workers.and_then(|w| self.processed.observe(now_ms, w.processed_total));
        let failed_rate = workers.and_then(|w| self.failed.observe(now_ms, w.failed_total));
        // Replicas that actually process: ready pods, or live heartbeats where readiness is
        // not reported (it always is in the cluster; local mode reports both).
        let busy_replicas = workers.map_or(ready, |w| w.live_replicas.max(ready));
        let per_replica_rate = self.capacity.observe(
            now_ms,
            processed_rate,
            workers.map_or(0, |w| w.in_flight),
            busy_replicas,
            policy.per_replica_tokens,
        );
        // A Redis error means counters and token state are unknown: hold, like a source error.
        let backlog = match (&observed.source, &observed.workers) {
            (Ok(s), Ok(_)) => Ok(s.backlog),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        };
        let signals = self.signal_values(&observed.signals, now_ms);
        let obs = Observation {
            backlog,
            partitions: source.ok().and_then(|s| s.partitions),
            arrival_rate,
            per_replica_rate,
            in_flight: workers.map_or(0, |w| w.in_flight),
            rebalancing: source.is_ok_and(|s| s.rebalancing()),
            current_replicas: current,
            ready_replicas: ready,
            paused,
            signals,
        };
        let decision = policy::decide(policy, &obs, &mut self.policy, now_ms);
        Step {
            decision,
            signals: obs.signals,
            arrival_rate,
            processed_rate,
            failed_rate,
            per_replica_rate,
            memory: self.policy.remembered(policy),
        }
    }
}

/// Write the token limit (the worker's SETLIMIT script).
pub async fn set_token_limit(
    probes: &Probes,
    redis: &RedisSettings,
    keys: &Keys,
    limit: u32,
) -> Result<()> {
    let conn = probes.redis(redis).await?;
    let pool = TokenPool::new(conn, redis.clone(), keys.clone(), PoolOptions::default());
    if pool.limit().await? != u64::from(limit) {
        pool.set_limit(u64::from(limit)).await?;
    }
    Ok(())
}

/// Remove the token and counter keys of a QueueProcessor (not its results: they expire).
pub async fn delete_keys(probes: &Probes, redis: &RedisSettings, keys: &Keys) -> Result<()> {
    let mut conn = probes.redis(redis).await?;
    let names = keys.lifetime_keys();
    // One slot (the hash tag), so one DEL works on Redis Cluster too.
    let _: i64 = redis::cmd("DEL")
        .arg(&names)
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::Redis(e.to_string()))?;
    Ok(())
}

/// Fill the status fields and conditions from a step.
pub fn fill_status(
    status: &mut QueueProcessorStatus,
    observed: &Observed,
    step: &Step,
    ready: u32,
    generation: Option<i64>,
    now: Time,
) {
    fill_status_with_health(status, observed, step, ready, None, generation, now);
}

/// [`fill_status`], with what the controller found wrong with the pods ([`crate::health`]).
/// A pod problem makes `Ready` False with its reason and message, whatever the measurement
/// says: a backlog measured fine is no comfort when no worker can start. `SourceReachable` and
/// `Scaling` still describe the measurement and the decision. `Ready` is set once per call, so
/// its `lastTransitionTime` moves only when its status really changes.
pub fn fill_status_with_health(
    status: &mut QueueProcessorStatus,
    observed: &Observed,
    step: &Step,
    ready: u32,
    problem: Option<&Problem>,
    generation: Option<i64>,
    now: Time,
) {
    let d = &step.decision;
    status.observed_generation = generation;
    status.replicas = Some(d.replicas as i32);
    status.desired_replicas = Some(d.target as i32);
    status.ready_replicas = Some(ready as i32);
    if let Ok(s) = &observed.source {
        status.backlog = Some(s.backlog as i64);
        status.partitions = s.partitions.map(|p| p as i32);
    }
    status.tokens = Some(TokenStatus {
        limit: d.token_limit as i32,
        in_use: observed
            .workers
            .as_ref()
            .map(|w| w.tokens_in_use as i32)
            .unwrap_or(0),
    });
    status.throughput = Some(ThroughputStatus {
        arrival_per_second: round2(step.arrival_rate.unwrap_or(0.0)),
        processed_per_second: round2(step.processed_rate.unwrap_or(0.0)),
        failed_per_second: round2(step.failed_rate.unwrap_or(0.0)),
        per_replica_per_second: step.per_replica_rate.map(round2),
    });
    let (at, at_ms) = crate::tick::clock_pair();
    status.scaling_memory = Some(memory::scaling_memory(&step.memory, at, at_ms));
    if d.changed {
        status.last_scale_time = Some(now.clone());
        status.last_scale_reason = Some(d.reason.to_string());
    }
    status.signals = step
        .signals
        .iter()
        .map(|s| SignalStatus {
            name: s.name.clone(),
            value: s.value.as_ref().ok().map(|v| round2(*v)),
            replicas: s
                .wants(step.per_replica_rate)
                .map(|(r, _)| i32::try_from(r).unwrap_or(i32::MAX)),
        })
        .collect();
    let error = observed.error();
    match error {
        Some(e) => {
            status.set_condition(
                CONDITION_SOURCE_REACHABLE,
                ConditionStatus::False,
                e.kind(),
                e.to_string(),
                generation,
                now.clone(),
            );
        }
        None => {
            status.set_condition(
                CONDITION_SOURCE_REACHABLE,
                ConditionStatus::True,
                "Measured",
                "source and Redis answered",
                generation,
                now.clone(),
            );
        }
    }
    match (problem, error) {
        (Some(p), _) => {
            status.set_condition(
                CONDITION_READY,
                ConditionStatus::False,
                p.reason.as_str(),
                p.message.clone(),
                generation,
                now.clone(),
            );
        }
        (None, Some(e)) => {
            status.set_condition(
                CONDITION_READY,
                ConditionStatus::False,
                e.kind(),
                format!("holding {} replicas: {e}", d.replicas),
                generation,
                now.clone(),
            );
        }
        (None, None) => {
            status.set_condition(
                CONDITION_READY,
                ConditionStatus::True,
                if d.reason.is_hold() {
                    d.reason.rule().as_str()
                } else {
                    "Processing"
                },
                d.reason.to_string(),
                generation,
                now.clone(),
            );
        }
    }
    let scaling = if d.changed {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    status.set_condition(
        CONDITION_SCALING,
        scaling,
        d.reason.rule().as_str(),
        d.reason.to_string(),
        generation,
        now,
    );
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{self, Problem};
    use crate::measure::{SourceReading, WorkerReading};
    use crate::policy::{Basis, Reason};
    use crate::workload::Component;

    pub(super) fn observed(source_ok: bool) -> Observed {
        Observed {
            source: if source_ok {
                Ok(SourceReading {
                    backlog: 900,
                    partitions: Some(6),
                    produced_total: Some(10_000),
                    lags: Vec::new(),
                    group_state: Some("Stable".into()),
                })
            } else {
                Err(Error::Source("broker down".into()))
            },
            workers: Ok(WorkerReading {
                processed_total: 0,
                failed_total: 0,
                live_replicas: 0,
                rate: 0.0,
                in_flight: 0,
                tokens_in_use: 0,
                tokens_limit: 0,
            }),
            signals: Vec::new(),
            signal_error: None,
        }
    }

    fn step() -> Step {
        Step {
            signals: Vec::new(),
            decision: Decision {
                replicas: 3,
                target: 3,
                token_limit: 0,
                reason: Reason::Computed {
                    basis: Basis::Backlog {
                        backlog: 900,
                        target_per_replica: 300,
                        replicas: 3,
                    },
                    bounds: Vec::new(),
                },
                changed: false,
            },
            arrival_rate: None,
            processed_rate: None,
            failed_rate: None,
            per_replica_rate: None,
            memory: Remembered::default(),
        }
    }

    fn problem() -> Problem {
        Problem {
            component: Component::Worker,
            reason: health::Reason::ImagePullFailed,
            message: "worker: 0/3 pods ready; pod orders-worker-x: container qp-worker cannot \
                      pull image \"ghcr.io/acme/qp:9\" (ImagePullBackOff)"
                .into(),
        }
    }

    pub(super) fn at(minute: u32) -> Time {
        Time(format!("2025-06-01T10:{minute:02}:00Z").parse().unwrap())
    }

    fn ready(st: &QueueProcessorStatus) -> (String, String, Time) {
        let c = st.condition(CONDITION_READY).unwrap();
        (
            c.status.clone(),
            c.reason.clone(),
            c.last_transition_time.clone(),
        )
    }

    #[test]
    fn a_pod_problem_makes_ready_false_and_recovery_restores_the_measured_ready() {
        let mut st = QueueProcessorStatus::default();
        let (obs, step) = (observed(true), step());
        fill_status(&mut st, &obs, &step, 0, Some(1), at(0));
        assert_eq!(ready(&st), ("True".into(), "Processing".into(), at(0)));

        let p = problem();
        fill_status_with_health(&mut st, &obs, &step, 0, Some(&p), Some(1), at(1));
        assert_eq!(
            ready(&st),
            ("False".into(), "ImagePullFailed".into(), at(1))
        );
        assert_eq!(st.condition(CONDITION_READY).unwrap().message, p.message);
        // Measurement and decision are reported as before.
        assert!(st.is_condition_true(CONDITION_SOURCE_REACHABLE));
        assert_eq!(
            st.condition(CONDITION_SCALING).unwrap().reason,
            step.decision.reason.rule().as_str()
        );
        // Still broken a poll later: the transition time stays.
        fill_status_with_health(&mut st, &obs, &step, 0, Some(&p), Some(1), at(2));
        assert_eq!(
            ready(&st),
            ("False".into(), "ImagePullFailed".into(), at(1))
        );

        // The pod problem wins over a measurement error; SourceReachable still says why.
        let down = observed(false);
        fill_status_with_health(&mut st, &down, &step, 0, Some(&p), Some(1), at(3));
        assert_eq!(ready(&st).1, "ImagePullFailed");
        assert_eq!(
            st.condition(CONDITION_SOURCE_REACHABLE).unwrap().reason,
            "SourceUnreachable"
        );

        // Pods recovered: Ready is what measurement says again.
        fill_status_with_health(&mut st, &obs, &step, 3, None, Some(1), at(4));
        assert_eq!(ready(&st), ("True".into(), "Processing".into(), at(4)));
    }

    #[test]
    fn a_new_source_starts_a_new_arrival_history() {
        use crate::crd::{ConcurrencySpec, ScalingSpec};
        let policy = Policy::from_spec(&ScalingSpec::default(), &ConcurrencySpec::default());
        let kafka = |topic: &str| SourceTarget::Kafka {
            bootstrap: "k:9092".into(),
            topic: topic.into(),
            group: "g".into(),
            properties: Vec::new(),
        };
        let at = |total: u64| {
            let mut o = observed(true);
            if let Ok(s) = &mut o.source {
                s.produced_total = Some(total);
            }
            o
        };
        let mut scaler = Scaler::default();
        scaler.measure_on(&kafka("orders"));
        scaler.step(&policy, &at(10_000), 1, 1, false, 0);
        let rate = scaler
            .step(&policy, &at(11_000), 1, 1, false, 1_000)
            .arrival_rate;
        assert!(rate.is_some_and(|r| r > 0.0 && r <= 1_000.0), "{rate:?}");
        // Same source: the history goes on.
        scaler.measure_on(&kafka("orders"));
        assert!(
            scaler
                .step(&policy, &at(12_000), 1, 1, false, 2_000)
                .arrival_rate
                .is_some()
        );
        // Edited to another topic whose log ends sum to far more: no rate from the jump.
        scaler.measure_on(&kafka("payments"));
        let jump = scaler
            .step(&policy, &at(5_000_000), 1, 1, false, 3_000)
            .arrival_rate;
        assert_eq!(jump, None);
    }
}
