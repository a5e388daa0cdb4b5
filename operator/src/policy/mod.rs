//! The scaling policy: from one observation of a queue to a replica count and a token limit.
//!
//! This module is pure. It knows nothing about Kubernetes, Kafka, Redis, tokio or the wall
//! clock: the caller measures the source, reads the current replica count from whatever runs the
//! workers (a Deployment, or the local process backend), passes the time in as milliseconds
//! from any monotonic origin, and applies the [`Decision`]. The same code therefore drives both
//! backends, and every rule is unit-tested with plain numbers.
//!
//! # The rules, and why each exists
//!
//! A decision runs the steps below in order. Each step that changes the number is recorded in
//! the [`Reason`], so events and status can say exactly why the workload has the replicas it has.
//!
//! 1. **Hold** (no decision at all) when the workload is paused, when the source could not be
//!    measured, or while the Kafka consumer group is rebalancing, in that order of precedence.
//!    Pausing is the user's explicit instruction and does not even need the source. A failed
//!    measurement is not a backlog of zero: KEDA is known to scale workloads to zero when the
//!    broker is unreachable, which turns an outage of the broker into an outage of the consumers
//!    and a slow recovery. We keep the current replicas (a workload at zero stays at zero) and
//!    the reason carries the error text. During a rebalance the lag and the member count are in
//!    flux, and changing the replica count would only start another rebalance; but only for
//!    [`REBALANCE_HOLD_MS`]: a group that never settles must not freeze scaling for good.
//! 2. **Sizing.** Once both the arrival rate and the throughput of one busy replica are known,
//!    the workload needs `ceil((arrival_rate + backlog / target_drain_seconds) /
//!    per_replica_rate)` replicas: enough to keep up with what arrives, plus enough to work off
//!    the current backlog in about `target_drain_seconds`. Until then (a fresh workload has
//!    never been measured busy) it is `ceil(backlog / target_backlog_per_replica)`. Either way
//!    the number goes straight to what is needed: no tolerance band (the HPA's 10 % tolerance
//!    makes KEDA stall one or two replicas below the partition count) and no staircase. A
//!    positive backlog always wants at least one replica.
//!    **Signals** (`spec.scaling.signals`): each wants `ceil(value / target_per_replica)`
//!    replicas (a rate: `ceil(rate / per_replica_rate)` once throughput is measured); the most
//!    any of them wants raises the sized count if it is higher. A signal that cannot be read
//!    holds like the source (step 1), and above its own activation a signal is activity
//!    (steps 6 and 8).
//! 3. **Busy floor.** Never fewer replicas than it takes to hold the work already in flight,
//!    `ceil(in_flight / per_replica_tokens)`. With a Redis list the messages a worker holds are
//!    no longer in the list, so a drained list with long-running handlers would otherwise look
//!    idle, and scaling down would interrupt work that then has to be redelivered.
//! 4. **Caps**: at most `max_replicas`, at most one replica per Kafka partition (a consumer
//!    without a partition sits idle but still joins every rebalance), and at most the replicas
//!    the token budget can feed, `ceil(global_max_tokens / per_replica_tokens)` (a replica
//!    beyond that would only share the same tokens). The lowest cap wins.
//! 5. **Minimum**: at least `min_replicas`. The minimum wins over every cap: a minimum above the
//!    partition count or the token budget is the user's explicit choice (spare consumers for
//!    fast failover, say), whereas the caps are the operator's own inferences.
//! 6. **Activation** (only with `min_replicas` = 0): a workload needs a replica only when the
//!    backlog exceeds `activation_backlog` (with the default 0, any message activates it) or
//!    work is in flight. This keeps a trickle of messages from waking the workload, and from
//!    keeping it awake: at or below the threshold the recommendation is zero, and the backlog
//!    does not count as activity for the cooldown.
//! 7. **Scale-down stabilization** (as the HPA does it): every recommendation from steps 2 to 6
//!    is remembered for `stabilization_ms`, and a scale-down goes only as far down as the
//!    highest recommendation in that window, so a momentary dip in the backlog does not remove
//!    replicas that the next spike needs. Scale-up is never delayed. Remembered values are
//!    capped again with today's caps, so lowering `max_replicas` takes effect at once.
//! 8. **Cooldown** (only with `min_replicas` = 0): the last replica is removed only once
//!    `cooldown_ms` have passed since the workload was last seen active (a backlog, work in
//!    flight, or a failed measurement, which might have hidden either). Until then the workload
//!    keeps one replica.
//! 9. **Maximum step**: one decision changes the replica count by at most `max_step`, up or
//!    down. The default is large enough to reach the computed count in one step, because every
//!    change of a Kafka consumer group costs a rebalance: KEDA's one-step-per-poll staircase
//!    pays one rebalance per step. A count outside `[min_replicas, caps]` (after the user
//!    changed the spec, say) moves straight into the range.
//!
//! The token limit is computed from the ready replicas in every case, holds included:
//! `min(per_replica_tokens * ready_replicas, global_max_tokens)`. The ceiling protects whatever
//! the handlers call, whatever the replica count.
//!
//! What this module does not do is measure. In particular the backlog must already count the
//! partitions a group never committed from their log-start offset (counting them from offset
//! zero, as KEDA does, overstates the lag of a topic whose old messages were deleted), and the
//! sources must be polled cheaply; see the measurement module.

use std::collections::VecDeque;

use crate::crd::{ConcurrencySpec, ScalingSpec};

mod memory;
mod reason;

#[cfg(test)]
mod tests;

pub use memory::Remembered;
pub use reason::{Basis, Bound, Reason, Rule};

/// The numbers that drive decisions, taken from a QueueProcessor's `spec.scaling` and
/// `spec.concurrency` with [`Policy::from_spec`] (or written out directly in tests).
///
/// Durations are in milliseconds. Out-of-range values that the API server would reject are
/// tolerated: a zero `target_backlog_per_replica`, `per_replica_tokens` or `max_step` counts as
/// one, and a `min_replicas` above `max_replicas` wins.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Fewest replicas; 0 allows scaling to zero.
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// Backlog above which a workload at zero replicas gets its first replica.
    pub activation_backlog: u64,
    /// Backlog one replica absorbs, used while throughput is unknown.
    pub target_backlog_per_replica: u64,
    /// Time in which the backlog should be worked off once throughput is known.
    pub target_drain_seconds: f64,
    /// Time without activity before the last replica goes (with `min_replicas` = 0).
    pub cooldown_ms: u64,
    /// Scale-down stabilization window.
    pub stabilization_ms: u64,
    /// Largest change of the replica count in one decision.
    pub max_step: u32,
    /// Tokens (concurrent messages) of one replica.
    pub per_replica_tokens: u32,
    /// Tokens of all replicas together.
    pub global_max_tokens: u32,
}

impl Policy {
    /// The policy a QueueProcessor's spec asks for. Negative numbers (which the schema rejects)
    /// count as zero.
    pub fn from_spec(scaling: &ScalingSpec, concurrency: &ConcurrencySpec) -> Policy {
        let u32_of = |v: i32| u32::try_from(v).unwrap_or(0);
        let u64_of = |v: i64| u64::try_from(v).unwrap_or(0);
        let ms_of = |secs: i32| u64::from(u32_of(secs)).saturating_mul(1000);
        Policy {
            min_replicas: u32_of(scaling.min_replicas),
            max_replicas: u32_of(scaling.max_replicas),
            activation_backlog: u64_of(scaling.activation_backlog),
            target_backlog_per_replica: u64_of(scaling.target_backlog_per_replica),
            target_drain_seconds: f64::from(scaling.target_drain_seconds.max(0)),
            cooldown_ms: ms_of(scaling.cooldown_seconds),
            stabilization_ms: ms_of(scaling.scale_down_stabilization_seconds),
            max_step: u32_of(scaling.max_step),
            per_replica_tokens: u32_of(concurrency.per_replica_tokens),
            global_max_tokens: u32_of(concurrency.global_max_tokens),
        }
    }

    /// The most replicas the token budget can feed: `ceil(global_max_tokens /
    /// per_replica_tokens)`.
    pub fn token_cap(&self) -> u32 {
        self.global_max_tokens
            .div_ceil(self.per_replica_tokens.max(1))
    }

    /// The token limit for `ready_replicas` ready replicas: `per_replica_tokens *
    /// ready_replicas`, at most `global_max_tokens`.
    pub fn token_limit(&self, ready_replicas: u32) -> u32 {
        self.per_replica_tokens
            .saturating_mul(ready_replicas)
            .min(self.global_max_tokens)
    }

    /// The lowest cap and which rule sets it (ties go to the first of max, partitions, tokens).
    fn cap(&self, partitions: Option<u32>) -> (u32, Bound) {
        let mut cap = (self.max_replicas, Bound::MaxReplicas(self.max_replicas));
        if let Some(p) = partitions
            && p < cap.0
        {
            cap = (p, Bound::Partitions(p));
        }
        let tokens = self.token_cap();
        if tokens < cap.0 {
            cap = (
                tokens,
                Bound::TokenBudget {
                    global_max_tokens: self.global_max_tokens,
                    per_replica_tokens: self.per_replica_tokens,
                    replicas: tokens,
                },
            );
        }
        cap
    }
}

impl Default for Policy {
    /// The policy of a QueueProcessor that leaves `scaling` and `concurrency` at their defaults.
    fn default() -> Self {
        Policy::from_spec(&ScalingSpec::default(), &ConcurrencySpec::default())
    }
}

/// One measurement of the workload, as the caller saw it at the time of the decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Messages waiting: Kafka consumer-group lag summed over partitions, or the Redis list
    /// length. `Err` carries the reason the source could not be measured.
    pub backlog: Result<u64, String>,
    /// Partition count of a Kafka topic; `None` for a Redis list.
    pub partitions: Option<u32>,
    /// Messages per second entering the queue, once measured.
    pub arrival_rate: Option<f64>,
    /// Messages per second one busy replica processes, once measured.
    pub per_replica_rate: Option<f64>,
    /// Messages being processed right now, over all replicas.
    pub in_flight: u64,
    /// The consumer group is not stable (a rebalance is in progress).
    pub rebalancing: bool,
    /// Replicas the workload is set to now (the Deployment's `spec.replicas`).
    pub current_replicas: u32,
    /// Replicas ready now.
    pub ready_replicas: u32,
    /// The QueueProcessor is paused.
    pub paused: bool,
    /// The scaling signals (`spec.scaling.signals`), as measured.
    pub signals: Vec<SignalValue>,
}

/// One scaling signal at the time of the decision.
#[derive(Clone, Debug, PartialEq)]
pub struct SignalValue {
    pub name: String,
    /// The value, or why it could not be read (which holds the decision, like the source).
    pub value: Result<f64, String>,
    /// How much of the value one replica handles.
    pub target_per_replica: f64,
    /// With `min_replicas` = 0, a value above this is activity.
    pub activation: f64,
    /// A rate of arrivals: one replica handles the measured per-replica throughput once it is
    /// known, `target_per_replica` until then.
    pub rate: bool,
}

impl SignalValue {
    /// The replicas this signal wants, and the per-replica figure used.
    pub fn wants(&self, per_replica_rate: Option<f64>) -> Option<(u32, f64)> {
        let value = *self.value.as_ref().ok()?;
        let per_replica = match per_replica_rate {
            Some(r) if self.rate && r.is_finite() && r > 0.0 => r,
            _ => self.target_per_replica.max(1.0),
        };
        Some((ceil_replicas(value / per_replica), per_replica))
    }
}

/// What a decision remembers for the next ones. Start from `PolicyState::default()`, keep one
/// per workload, and pass it to every [`decide`] call for that workload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyState {
    /// Recent recommendations `(time, replicas)` for the scale-down window, kept as a
    /// monotonic queue: times increase and replica counts strictly decrease from front to
    /// back, so the front is the highest recommendation in the window and the queue never
    /// holds more entries than there are distinct replica counts.
    recent: VecDeque<(u64, u32)>,
    /// When the workload was last seen active.
    last_active_ms: Option<u64>,
    /// Since when the consumer group has been rebalancing without a pause.
    rebalancing_since: Option<u64>,
    /// When the latest decision was made.
    last_decision_ms: Option<u64>,
}

/// The longest decisions hold for a rebalance. A rebalance takes seconds; a group that never
/// becomes stable (a member that crash-loops, or stops polling and is waited for until its
/// rebalance timeout) must not block scaling for good, so after this long the policy decides
/// on the lag it sees.
pub const REBALANCE_HOLD_MS: u64 = 30_000;

impl PolicyState {
    /// When the workload was last seen active (a backlog, work in flight or an unmeasurable
    /// source), or when decisions started, whichever is later.
    pub fn last_active_ms(&self) -> Option<u64> {
        self.last_active_ms
    }

    fn remember(&mut self, now_ms: u64, replicas: u32) {
        while self.recent.back().is_some_and(|&(_, r)| r <= replicas) {
            self.recent.pop_back();
        }
        self.recent.push_back((now_ms, replicas));
    }

    /// The highest recommendation made within `window_ms` before `now_ms` (the latest one
    /// included), forgetting older ones.
    fn highest_within(&mut self, now_ms: u64, window_ms: u64) -> Option<u32> {
        while self.recent.len() > 1
            && self
                .recent
                .front()
                .is_some_and(|&(t, _)| now_ms.saturating_sub(t) >= window_ms)
        {
            self.recent.pop_front();
        }
        self.recent.front().map(|&(_, r)| r)
    }
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Replicas to set now.
    pub replicas: u32,
    /// Where the policy is heading: `replicas` before the maximum step limited it.
    pub target: u32,
    /// Token limit for the pool, from the ready replicas.
    pub token_limit: u32,
    /// Why.
    pub reason: Reason,
    /// `replicas` differs from the observation's `current_replicas`.
    pub changed: bool,
}

/// `ceil(x)` as a replica count, saturating; a tiny relative slack keeps float noise
/// (`3.0000000000000004`) from adding a replica.
fn ceil_replicas(x: f64) -> u32 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    let c = (x * (1.0 - 1e-12)).ceil();
    if c >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        c as u32
    }
}

/// `ceil(a / b)` as a replica count, saturating; `b` = 0 counts as 1.
fn ceil_div_replicas(a: u64, b: u64) -> u32 {
    u32::try_from(a.div_ceil(b.max(1))).unwrap_or(u32::MAX)
}

/// The sizing of step 2: rate-based when both rates are usable, backlog-based otherwise.
fn size(policy: &Policy, obs: &Observation, backlog: u64) -> Basis {
    let usable = |r: Option<f64>| r.filter(|r| r.is_finite() && *r >= 0.0);
    match (
        usable(obs.arrival_rate),
        usable(obs.per_replica_rate).filter(|r| *r > 0.0),
    ) {
        (Some(arrival_rate), Some(per_replica_rate)) => {
            let drain_seconds = policy.target_drain_seconds;
            let draining = if backlog == 0 {
                0.0
            } else if drain_seconds > 0.0 {
                backlog as f64 / drain_seconds
            } else {
                f64::INFINITY
            };
            let mut replicas = ceil_replicas((arrival_rate + draining) / per_replica_rate);
            if backlog > 0 {
                replicas = replicas.max(1);
            }
            Basis::Rate {
                arrival_rate,
                backlog,
                drain_seconds,
                per_replica_rate,
                replicas,
            }
        }
        _ => {
            let target_per_replica = policy.target_backlog_per_replica.max(1);
            Basis::Backlog {
                backlog,
                target_per_replica,
                replicas: ceil_div_replicas(backlog, target_per_replica),
            }
        }
    }
}

/// Decides the replicas and the token limit for one observation at time `now_ms` (milliseconds
/// from any monotonic origin; it should not go backwards), updating `state`.
///
/// See the [module documentation](self) for the rules and their order.
pub fn decide(
    policy: &Policy,
    obs: &Observation,
    state: &mut PolicyState,
    now_ms: u64,
) -> Decision {
    let current = obs.current_replicas;
    let token_limit = policy.token_limit(obs.ready_replicas);
    state.last_decision_ms = Some(now_ms);

    // Activity for the cooldown. A failed measurement counts as activity: the backlog it could
    // not see may be there, and the cooldown restarts once the source is back.
    // With `min_replicas` = 0, a backlog at or below the activation threshold is no activity
    // either: it does not wake the workload, so it must not keep it awake.
    let threshold = if policy.min_replicas == 0 {
        policy.activation_backlog
    } else {
        0
    };
    let signal_active = |s: &SignalValue| {
        let threshold = if policy.min_replicas == 0 {
            s.activation
        } else {
            0.0
        };
        s.value.as_ref().map_or(true, |v| *v > threshold)
    };
    let active = match &obs.backlog {
        Ok(backlog) => {
            *backlog > threshold || obs.in_flight > 0 || obs.signals.iter().any(signal_active)
        }
        Err(_) => true,
    };
    if active || state.last_active_ms.is_none() {
        state.last_active_ms = Some(now_ms);
    }

    // 1. Holds. The held count is remembered as a recommendation, so that a scale-down after
    //    the hold still waits for a full window of fresh measurements.
    if !obs.rebalancing {
        state.rebalancing_since = None;
    }
    let measured = match (&obs.backlog, obs.paused, obs.rebalancing) {
        (_, true, _) => Err(Reason::Paused { replicas: current }),
        (Err(error), _, _) => Err(Reason::SourceError {
            error: error.clone(),
            replicas: current,
        }),
        (Ok(_), _, true)
            if now_ms.saturating_sub(*state.rebalancing_since.get_or_insert(now_ms))
                < REBALANCE_HOLD_MS =>
        {
            Err(Reason::Rebalancing { replicas: current })
        }
        (Ok(backlog), _, _) => match obs.signals.iter().find(|s| s.value.is_err()) {
            // A signal that cannot be read hides demand, exactly like the source.
            Some(SignalValue {
                name,
                value: Err(error),
                ..
            }) => Err(Reason::SourceError {
                error: format!("signal {name}: {error}"),
                replicas: current,
            }),
            _ => Ok(*backlog),
        },
    };
    let backlog = match measured {
        Ok(backlog) => backlog,
        Err(reason) => {
            state.remember(now_ms, current);
            return Decision {
                replicas: current,
                target: current,
                token_limit,
                reason,
                changed: false,
            };
        }
    };

    // 2. Sizing.
    let basis = size(policy, obs, backlog);
    let mut replicas = match basis {
        Basis::Backlog { replicas, .. } | Basis::Rate { replicas, .. } => replicas,
    };
    let mut bounds = Vec::new();

    // 2b. Signals: the most any of them wants, if that is more than the backlog wants.
    let strongest = obs
        .signals
        .iter()
        .filter_map(|s| Some((s, s.wants(obs.per_replica_rate)?)))
        .max_by_key(|(_, (wanted, _))| *wanted);
    if let Some((s, (wanted, per_replica))) = strongest
        && wanted > replicas
    {
        replicas = wanted;
        bounds.push(Bound::Signal {
            name: s.name.clone(),
            value: s.value.clone().unwrap_or(0.0),
            per_replica,
            replicas,
        });
    }

    // 3. Busy floor.
    let per_replica_tokens = policy.per_replica_tokens.max(1);
    let busy = ceil_div_replicas(obs.in_flight, u64::from(per_replica_tokens));
    if busy > replicas {
        replicas = busy;
        bounds.push(Bound::InFlight {
            in_flight: obs.in_flight,
            per_replica_tokens,
            replicas,
        });
    }

    // 4. Caps.
    let (cap, cap_bound) = policy.cap(obs.partitions);
    if replicas > cap {
        replicas = cap;
        bounds.push(cap_bound);
    }

    // 5. Minimum, over the caps.
    let min = policy.min_replicas;
    let upper = cap.max(min);
    if replicas < min {
        replicas = min;
        bounds.push(Bound::MinReplicas(min));
    }

    // 6. Activation: at or below the threshold, nothing needs a replica (the cooldown decides
    //    when a running one goes).
    //    At zero replicas, in-flight counters are stale (nothing runs) and do not count.
    if min == 0
        && replicas > 0
        && backlog <= policy.activation_backlog
        && !obs.signals.iter().any(signal_active)
        && (current == 0 || obs.in_flight == 0)
    {
        replicas = 0;
        bounds.push(Bound::BelowActivation {
            backlog,
            activation_backlog: policy.activation_backlog,
        });
    }

    // 7. Scale-down stabilization.
    state.remember(now_ms, replicas);
    if replicas < current {
        let highest = state
            .highest_within(now_ms, policy.stabilization_ms)
            .unwrap_or(replicas)
            .min(upper);
        let held = highest.min(current);
        if held > replicas {
            replicas = held;
            bounds.push(Bound::Stabilization {
                window_ms: policy.stabilization_ms,
                replicas,
            });
        }
    }

    // 8. Cooldown before the last replica goes.
    if replicas == 0 && current > 0 && upper > 0 {
        let idle_ms = now_ms.saturating_sub(state.last_active_ms.unwrap_or(now_ms));
        if idle_ms < policy.cooldown_ms {
            replicas = 1;
            bounds.push(Bound::Cooldown {
                remaining_ms: policy.cooldown_ms - idle_ms,
            });
        }
    }

    // 9. Maximum step, within [min, caps]; a count outside that range moves straight in.
    let target = replicas;
    let max_step = policy.max_step.max(1);
    let stepped = if target > current {
        target.min(current.saturating_add(max_step).max(min))
    } else {
        target.max(current.saturating_sub(max_step).min(upper))
    };
    if stepped != target {
        replicas = stepped;
        bounds.push(Bound::MaxStep { max_step, replicas });
    }

    Decision {
        replicas,
        target,
        token_limit,
        reason: Reason::Computed { basis, bounds },
        changed: replicas != current,
    }
}
