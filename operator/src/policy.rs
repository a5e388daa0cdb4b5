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
//!    flux, and changing the replica count would only start another rebalance.
//! 2. **Sizing.** Once both the arrival rate and the throughput of one busy replica are known,
//!    the workload needs `ceil((arrival_rate + backlog / target_drain_seconds) /
//!    per_replica_rate)` replicas: enough to keep up with what arrives, plus enough to work off
//!    the current backlog in about `target_drain_seconds`. Until then (a fresh workload has
//!    never been measured busy) it is `ceil(backlog / target_backlog_per_replica)`. Either way
//!    the number goes straight to what is needed: no tolerance band (the HPA's 10 % tolerance
//!    makes KEDA stall one or two replicas below the partition count) and no staircase. A
//!    positive backlog always wants at least one replica.
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
//! 6. **Activation** (only with `min_replicas` = 0): a workload at zero replicas gets its first
//!    replica only when the backlog exceeds `activation_backlog` (with the default 0, any
//!    message activates it). This keeps a trickle of messages from waking the workload.
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
use std::fmt;

use crate::crd::{ConcurrencySpec, ScalingSpec};

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
}

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

/// Why a decision came out as it did.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// The workload is paused; replicas held.
    Paused { replicas: u32 },
    /// The source could not be measured; replicas held.
    SourceError { error: String, replicas: u32 },
    /// The consumer group is rebalancing; replicas held.
    Rebalancing { replicas: u32 },
    /// Replicas computed by `basis`, then adjusted by each of `bounds` in turn (only the rules
    /// that changed the number are listed).
    Computed { basis: Basis, bounds: Vec<Bound> },
}

/// How the demand was sized.
#[derive(Clone, Debug, PartialEq)]
pub enum Basis {
    /// `ceil(backlog / target_per_replica)`, while throughput is unknown.
    Backlog {
        backlog: u64,
        target_per_replica: u64,
        replicas: u32,
    },
    /// `ceil((arrival_rate + backlog / drain_seconds) / per_replica_rate)`.
    Rate {
        arrival_rate: f64,
        backlog: u64,
        drain_seconds: f64,
        per_replica_rate: f64,
        replicas: u32,
    },
}

/// A rule that changed the sized replica count, with the value it set.
#[derive(Clone, Debug, PartialEq)]
pub enum Bound {
    /// Raised to hold the work in flight.
    InFlight {
        in_flight: u64,
        per_replica_tokens: u32,
        replicas: u32,
    },
    /// Capped at `max_replicas`.
    MaxReplicas(u32),
    /// Capped at the partition count.
    Partitions(u32),
    /// Capped at what the token budget can feed.
    TokenBudget {
        global_max_tokens: u32,
        per_replica_tokens: u32,
        replicas: u32,
    },
    /// Raised to `min_replicas`.
    MinReplicas(u32),
    /// Kept at zero: the backlog does not exceed the activation threshold.
    BelowActivation {
        backlog: u64,
        activation_backlog: u64,
    },
    /// Held up by the highest recommendation in the scale-down window.
    Stabilization { window_ms: u64, replicas: u32 },
    /// Kept at one replica until the cooldown has passed.
    Cooldown { remaining_ms: u64 },
    /// Limited by the maximum step.
    MaxStep { max_step: u32, replicas: u32 },
}

/// The rule that determined a decision, as a `CamelCase` word fit for a condition reason, an
/// event reason or a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    Paused,
    SourceError,
    Rebalancing,
    Backlog,
    Rate,
    InFlight,
    MaxReplicas,
    PartitionCap,
    TokenBudget,
    MinReplicas,
    BelowActivation,
    Stabilization,
    Cooldown,
    MaxStep,
}

impl Rule {
    /// The rule's name, e.g. `"PartitionCap"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Paused => "Paused",
            Rule::SourceError => "SourceError",
            Rule::Rebalancing => "Rebalancing",
            Rule::Backlog => "Backlog",
            Rule::Rate => "Rate",
            Rule::InFlight => "InFlight",
            Rule::MaxReplicas => "MaxReplicas",
            Rule::PartitionCap => "PartitionCap",
            Rule::TokenBudget => "TokenBudget",
            Rule::MinReplicas => "MinReplicas",
            Rule::BelowActivation => "BelowActivation",
            Rule::Stabilization => "Stabilization",
            Rule::Cooldown => "Cooldown",
            Rule::MaxStep => "MaxStep",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Reason {
    /// The rule that had the last word: the hold, or else the last bound that changed the
    /// number, or else the sizing.
    pub fn rule(&self) -> Rule {
        match self {
            Reason::Paused { .. } => Rule::Paused,
            Reason::SourceError { .. } => Rule::SourceError,
            Reason::Rebalancing { .. } => Rule::Rebalancing,
            Reason::Computed { basis, bounds } => match bounds.last() {
                Some(bound) => bound.rule(),
                None => basis.rule(),
            },
        }
    }

    /// The reason is a hold: no decision was taken.
    pub fn is_hold(&self) -> bool {
        !matches!(self, Reason::Computed { .. })
    }
}

impl Basis {
    fn rule(&self) -> Rule {
        match self {
            Basis::Backlog { .. } => Rule::Backlog,
            Basis::Rate { .. } => Rule::Rate,
        }
    }
}

impl Bound {
    fn rule(&self) -> Rule {
        match self {
            Bound::InFlight { .. } => Rule::InFlight,
            Bound::MaxReplicas(_) => Rule::MaxReplicas,
            Bound::Partitions(_) => Rule::PartitionCap,
            Bound::TokenBudget { .. } => Rule::TokenBudget,
            Bound::MinReplicas(_) => Rule::MinReplicas,
            Bound::BelowActivation { .. } => Rule::BelowActivation,
            Bound::Stabilization { .. } => Rule::Stabilization,
            Bound::Cooldown { .. } => Rule::Cooldown,
            Bound::MaxStep { .. } => Rule::MaxStep,
        }
    }
}

/// A rate with as many decimals as it deserves.
struct PerSecond(f64);

impl fmt::Display for PerSecond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        if r >= 100.0 {
            write!(f, "{r:.0}/s")
        } else if r >= 1.0 {
            write!(f, "{r:.1}/s")
        } else {
            write!(f, "{r:.2}/s")
        }
    }
}

/// Milliseconds as seconds.
struct Seconds(u64);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}s", self.0 / 1000)
        } else {
            write!(f, "{:.1}s", self.0 as f64 / 1000.0)
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Paused { replicas } => write!(f, "paused: holding {replicas} replicas"),
            Reason::SourceError { error, replicas } => {
                write!(
                    f,
                    "source unreachable ({error}): holding {replicas} replicas"
                )
            }
            Reason::Rebalancing { replicas } => {
                write!(f, "consumer group rebalancing: holding {replicas} replicas")
            }
            Reason::Computed { basis, bounds } => {
                write!(f, "{basis}")?;
                for bound in bounds {
                    write!(f, ", {bound}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Basis::Backlog {
                backlog,
                target_per_replica,
                replicas,
            } => write!(
                f,
                "backlog {backlog} / {target_per_replica} per replica -> {replicas}"
            ),
            Basis::Rate {
                arrival_rate,
                backlog,
                drain_seconds,
                per_replica_rate,
                replicas,
            } => write!(
                f,
                "(arrival {} + backlog {backlog} in {drain_seconds}s) / {} per replica -> {replicas}",
                PerSecond(*arrival_rate),
                PerSecond(*per_replica_rate),
            ),
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::InFlight {
                in_flight,
                per_replica_tokens,
                replicas,
            } => write!(
                f,
                "raised to {replicas} for {in_flight} in flight at {per_replica_tokens} tokens per replica"
            ),
            Bound::MaxReplicas(n) => write!(f, "capped at max {n}"),
            Bound::Partitions(n) => write!(f, "capped at {n} partitions"),
            Bound::TokenBudget {
                global_max_tokens,
                per_replica_tokens,
                replicas,
            } => write!(
                f,
                "capped at {replicas} by the token budget ({global_max_tokens} / {per_replica_tokens} per replica)"
            ),
            Bound::MinReplicas(n) => write!(f, "raised to min {n}"),
            Bound::BelowActivation {
                backlog,
                activation_backlog,
            } => write!(
                f,
                "kept at 0: backlog {backlog} <= activation {activation_backlog}"
            ),
            Bound::Stabilization {
                window_ms,
                replicas,
            } => write!(
                f,
                "held at {replicas} by the {} scale-down window",
                Seconds(*window_ms)
            ),
            Bound::Cooldown { remaining_ms } => {
                write!(
                    f,
                    "kept at 1 for the cooldown ({} left)",
                    Seconds(*remaining_ms)
                )
            }
            Bound::MaxStep { max_step, replicas } => {
                write!(f, "stepped to {replicas} (max step {max_step})")
            }
        }
    }
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

    // Activity for the cooldown. A failed measurement counts as activity: the backlog it could
    // not see may be there, and the cooldown restarts once the source is back.
    let active = match &obs.backlog {
        Ok(backlog) => *backlog > 0 || obs.in_flight > 0,
        Err(_) => true,
    };
    if active || state.last_active_ms.is_none() {
        state.last_active_ms = Some(now_ms);
    }

    // 1. Holds. The held count is remembered as a recommendation, so that a scale-down after
    //    the hold still waits for a full window of fresh measurements.
    let measured = match (&obs.backlog, obs.paused, obs.rebalancing) {
        (_, true, _) => Err(Reason::Paused { replicas: current }),
        (Err(error), _, _) => Err(Reason::SourceError {
            error: error.clone(),
            replicas: current,
        }),
        (Ok(_), _, true) => Err(Reason::Rebalancing { replicas: current }),
        (Ok(backlog), _, _) => Ok(*backlog),
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

    // 6. Activation from zero.
    if current == 0 && min == 0 && replicas > 0 && backlog <= policy.activation_backlog {
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

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1000;

    /// The policy of the tests: min 1, max 20, 100 messages per replica, 30 s drain, 300 s
    /// cooldown, 60 s window, max step 20, 10 tokens per replica under a budget of 1000.
    fn policy() -> Policy {
        Policy {
            min_replicas: 1,
            max_replicas: 20,
            activation_backlog: 0,
            target_backlog_per_replica: 100,
            target_drain_seconds: 30.0,
            cooldown_ms: 300 * SEC,
            stabilization_ms: 60 * SEC,
            max_step: 20,
            per_replica_tokens: 10,
            global_max_tokens: 1000,
        }
    }

    fn obs(backlog: u64, current: u32) -> Observation {
        Observation {
            backlog: Ok(backlog),
            partitions: None,
            arrival_rate: None,
            per_replica_rate: None,
            in_flight: 0,
            rebalancing: false,
            current_replicas: current,
            ready_replicas: current,
            paused: false,
        }
    }

    /// One decision from a fresh state.
    fn once(p: &Policy, o: &Observation) -> Decision {
        decide(p, o, &mut PolicyState::default(), 0)
    }

    #[test]
    fn single_decisions() {
        type Tweak = fn(&mut Policy, &mut Observation);
        let cases: &[(&str, u64, u32, Tweak, u32, Rule)] = &[
            // (name, backlog, current, tweak, expected replicas, rule)
            ("backlog sizing", 450, 1, |_, _| {}, 5, Rule::Backlog),
            ("exact multiple", 500, 1, |_, _| {}, 5, Rule::Backlog),
            ("one message", 1, 1, |_, _| {}, 1, Rule::Backlog),
            ("empty at min", 0, 1, |_, _| {}, 1, Rule::MinReplicas),
            (
                "capped at max",
                1_000_000,
                1,
                |_, _| {},
                20,
                Rule::MaxReplicas,
            ),
            (
                "capped at partitions",
                4200,
                1,
                |_, o| o.partitions = Some(12),
                12,
                Rule::PartitionCap,
            ),
            (
                "partitions above need",
                400,
                1,
                |_, o| o.partitions = Some(12),
                4,
                Rule::Backlog,
            ),
            (
                "capped at token budget",
                4200,
                1,
                |p, _| p.global_max_tokens = 64,
                7,
                Rule::TokenBudget,
            ),
            (
                "lowest cap wins",
                4200,
                1,
                |p, o| {
                    p.global_max_tokens = 64;
                    o.partitions = Some(3);
                },
                3,
                Rule::PartitionCap,
            ),
            (
                "min wins over partitions",
                4200,
                1,
                |p, o| {
                    p.min_replicas = 5;
                    o.partitions = Some(3);
                },
                5,
                Rule::MinReplicas,
            ),
            (
                "min wins over token budget",
                0,
                5,
                |p, _| {
                    p.min_replicas = 5;
                    p.global_max_tokens = 20;
                },
                5,
                Rule::MinReplicas,
            ),
            (
                "min equals max, idle",
                0,
                3,
                |p, _| {
                    p.min_replicas = 3;
                    p.max_replicas = 3;
                },
                3,
                Rule::MinReplicas,
            ),
            (
                "min equals max, busy",
                9000,
                3,
                |p, _| {
                    p.min_replicas = 3;
                    p.max_replicas = 3;
                },
                3,
                Rule::MaxReplicas,
            ),
            (
                "below min moves straight to min",
                0,
                0,
                |p, _| {
                    p.min_replicas = 5;
                    p.max_step = 2;
                },
                5,
                Rule::MinReplicas,
            ),
            (
                "above a lowered max moves straight to max",
                1000,
                15,
                |p, _| {
                    p.max_replicas = 4;
                    p.max_step = 2;
                },
                4,
                Rule::MaxReplicas,
            ),
            (
                "rates known",
                3000,
                1,
                |_, o| {
                    o.arrival_rate = Some(120.0);
                    o.per_replica_rate = Some(20.0);
                },
                // (120 + 3000 / 30) / 20 = 11
                11,
                Rule::Rate,
            ),
            (
                "rates known, empty queue still needs the arrival rate",
                0,
                1,
                |_, o| {
                    o.arrival_rate = Some(45.0);
                    o.per_replica_rate = Some(10.0);
                },
                5,
                Rule::Rate,
            ),
            (
                "rates known, float noise does not add a replica",
                0,
                1,
                |_, o| {
                    o.arrival_rate = Some(0.1 + 0.2);
                    o.per_replica_rate = Some(0.1);
                },
                3,
                Rule::Rate,
            ),
            (
                "only arrival known",
                3000,
                1,
                |_, o| o.arrival_rate = Some(120.0),
                20,
                Rule::MaxReplicas,
            ),
            (
                "only per-replica rate known",
                450,
                1,
                |_, o| o.per_replica_rate = Some(20.0),
                5,
                Rule::Backlog,
            ),
            (
                "per-replica rate zero falls back",
                450,
                1,
                |_, o| {
                    o.arrival_rate = Some(120.0);
                    o.per_replica_rate = Some(0.0);
                },
                5,
                Rule::Backlog,
            ),
            (
                "NaN rate falls back",
                450,
                1,
                |_, o| {
                    o.arrival_rate = Some(f64::NAN);
                    o.per_replica_rate = Some(20.0);
                },
                5,
                Rule::Backlog,
            ),
            (
                "huge capacity still gives a backlog one replica",
                1,
                0,
                |p, o| {
                    p.min_replicas = 0;
                    o.arrival_rate = Some(0.0);
                    o.per_replica_rate = Some(1e300);
                },
                1,
                Rule::Rate,
            ),
            (
                "zero drain time drains at once",
                1,
                1,
                |p, o| {
                    p.target_drain_seconds = 0.0;
                    o.arrival_rate = Some(0.0);
                    o.per_replica_rate = Some(1.0);
                },
                20,
                Rule::MaxReplicas,
            ),
            (
                "huge backlog saturates",
                u64::MAX,
                1,
                |p, _| {
                    p.max_replicas = u32::MAX;
                    p.global_max_tokens = u32::MAX;
                    p.per_replica_tokens = 1;
                    p.max_step = u32::MAX;
                },
                u32::MAX,
                Rule::Backlog,
            ),
            (
                "huge backlog, rates known, saturates then caps",
                u64::MAX,
                u32::MAX,
                |p, o| {
                    p.target_drain_seconds = 1e-300;
                    o.arrival_rate = Some(f64::MAX);
                    o.per_replica_rate = Some(f64::MIN_POSITIVE);
                    o.in_flight = u64::MAX;
                    o.ready_replicas = u32::MAX;
                },
                20,
                Rule::MaxReplicas,
            ),
            (
                "target per replica zero counts as one",
                7,
                1,
                |p, _| p.target_backlog_per_replica = 0,
                7,
                Rule::Backlog,
            ),
            (
                "work in flight keeps replicas",
                0,
                6,
                |_, o| o.in_flight = 41,
                5,
                Rule::InFlight,
            ),
            (
                "in-flight floor is capped too",
                0,
                6,
                |_, o| {
                    o.in_flight = 41;
                    o.partitions = Some(2);
                },
                2,
                Rule::PartitionCap,
            ),
            (
                "rebalancing holds",
                5000,
                3,
                |_, o| o.rebalancing = true,
                3,
                Rule::Rebalancing,
            ),
            (
                "paused holds",
                5000,
                3,
                |_, o| o.paused = true,
                3,
                Rule::Paused,
            ),
            (
                "paused wins over an error",
                0,
                3,
                |_, o| {
                    o.paused = true;
                    o.backlog = Err("x".into());
                },
                3,
                Rule::Paused,
            ),
            (
                "error wins over rebalancing",
                0,
                3,
                |_, o| {
                    o.rebalancing = true;
                    o.backlog = Err("x".into());
                },
                3,
                Rule::SourceError,
            ),
            (
                "source error holds",
                0,
                7,
                |_, o| o.backlog = Err("broker down".into()),
                7,
                Rule::SourceError,
            ),
            (
                "source error at zero stays at zero",
                0,
                0,
                |p, o| {
                    p.min_replicas = 0;
                    o.backlog = Err("broker down".into());
                },
                0,
                Rule::SourceError,
            ),
            (
                "source error does not enforce min",
                0,
                0,
                |p, o| {
                    p.min_replicas = 2;
                    o.backlog = Err("broker down".into());
                },
                0,
                Rule::SourceError,
            ),
            (
                "max step up",
                5000,
                2,
                |p, _| p.max_step = 3,
                5,
                Rule::MaxStep,
            ),
        ];
        for (name, backlog, current, tweak, want, rule) in cases {
            let mut p = policy();
            let mut o = obs(*backlog, *current);
            tweak(&mut p, &mut o);
            let d = once(&p, &o);
            assert_eq!(
                (d.replicas, d.reason.rule()),
                (*want, *rule),
                "{name}: {}",
                d.reason
            );
            assert_eq!(d.changed, d.replicas != *current, "{name}");
        }
    }

    #[test]
    fn activation_from_zero() {
        let p = Policy {
            min_replicas: 0,
            activation_backlog: 50,
            ..policy()
        };
        // (backlog, replicas, rule)
        let cases = [
            (0, 0, Rule::Backlog),
            (1, 0, Rule::BelowActivation),
            (50, 0, Rule::BelowActivation),
            (51, 1, Rule::Backlog),
            (250, 3, Rule::Backlog),
        ];
        for (backlog, want, rule) in cases {
            let d = once(&p, &obs(backlog, 0));
            assert_eq!(
                (d.replicas, d.reason.rule()),
                (want, rule),
                "backlog {backlog}"
            );
        }
        // The threshold only gates the first replica: once running, a small backlog is
        // worked off rather than left waiting.
        let d = once(&p, &obs(10, 1));
        assert_eq!((d.replicas, d.reason.rule()), (1, Rule::Backlog));

        // With activation 0, any message activates; stale in-flight counters at zero do not.
        let p = Policy {
            activation_backlog: 0,
            ..p
        };
        assert_eq!(once(&p, &obs(1, 0)).replicas, 1);
        let stale = Observation {
            in_flight: 30,
            ..obs(0, 0)
        };
        let d = once(&p, &stale);
        assert_eq!((d.replicas, d.reason.rule()), (0, Rule::BelowActivation));
        // Activation respects the maximum step only in that one step is at least one.
        let p = Policy { max_step: 2, ..p };
        let d = once(&p, &obs(1000, 0));
        assert_eq!(
            (d.replicas, d.target, d.reason.rule()),
            (2, 10, Rule::MaxStep)
        );
    }

    /// Runs a sequence of observations at given times against one state, the backend
    /// following every decision; checks replicas and rule at each step.
    fn run(p: &Policy, steps: &[(u64, Observation, u32, Rule)]) {
        let mut state = PolicyState::default();
        let mut current = None;
        for (i, (now, o, want, rule)) in steps.iter().enumerate() {
            let mut o = o.clone();
            if let Some(c) = current {
                o.current_replicas = c;
                o.ready_replicas = c;
            }
            let d = decide(p, &o, &mut state, *now);
            assert_eq!(
                (d.replicas, d.reason.rule()),
                (*want, *rule),
                "step {i} at {now} ms: {}",
                d.reason
            );
            current = Some(d.replicas);
        }
    }

    #[test]
    fn cooldown_before_zero() {
        let p = Policy {
            min_replicas: 0,
            cooldown_ms: 100 * SEC,
            stabilization_ms: 0,
            ..policy()
        };
        let busy = Observation {
            in_flight: 3,
            ..obs(0, 1)
        };
        run(
            &p,
            &[
                (0, obs(500, 0), 5, Rule::Backlog),
                (10 * SEC, obs(100, 5), 1, Rule::Backlog),
                // Queue empty but work in flight: still active.
                (20 * SEC, busy, 1, Rule::InFlight),
                (30 * SEC, obs(0, 1), 1, Rule::Cooldown),
                (119 * SEC, obs(0, 1), 1, Rule::Cooldown),
                (120 * SEC - 1, obs(0, 1), 1, Rule::Cooldown),
                // Exactly the cooldown since the last activity (20 s).
                (120 * SEC, obs(0, 1), 0, Rule::Backlog),
                (130 * SEC, obs(0, 1), 0, Rule::Backlog),
            ],
        );
        // The message of the cooldown says how long is left.
        let mut state = PolicyState::default();
        decide(&p, &obs(5, 1), &mut state, 0);
        let d = decide(&p, &obs(0, 1), &mut state, 40 * SEC);
        assert_eq!(
            d.reason.to_string(),
            "backlog 0 / 100 per replica -> 0, kept at 1 for the cooldown (60s left)"
        );

        // Activity restarts the cooldown; a source error counts as activity.
        run(
            &p,
            &[
                (0, obs(5, 1), 1, Rule::Backlog),
                (90 * SEC, obs(0, 1), 1, Rule::Cooldown),
                (
                    95 * SEC,
                    Observation {
                        backlog: Err("timeout".into()),
                        ..obs(0, 1)
                    },
                    1,
                    Rule::SourceError,
                ),
                (100 * SEC, obs(0, 1), 1, Rule::Cooldown),
                (195 * SEC, obs(0, 1), 0, Rule::Backlog),
            ],
        );

        // The cooldown clock starts with the first decision (an operator restart does not
        // drop a running workload to zero at once), and a zero cooldown drops at once.
        run(
            &p,
            &[
                (500 * SEC, obs(0, 1), 1, Rule::Cooldown),
                (600 * SEC, obs(0, 1), 0, Rule::Backlog),
            ],
        );
        let p = Policy {
            cooldown_ms: 0,
            ..p
        };
        run(&p, &[(0, obs(0, 1), 0, Rule::Backlog)]);
        // With min > 0 there is no cooldown; the minimum applies.
        let p = Policy {
            min_replicas: 2,
            ..p
        };
        run(&p, &[(0, obs(0, 3), 2, Rule::MinReplicas)]);
    }

    #[test]
    fn stabilization_window() {
        let p = Policy {
            stabilization_ms: 60 * SEC,
            ..policy()
        };
        run(
            &p,
            &[
                (0, obs(1000, 1), 10, Rule::Backlog),
                // A dip: held at the highest recommendation of the last 60 s.
                (10 * SEC, obs(200, 10), 10, Rule::Stabilization),
                (20 * SEC, obs(0, 10), 10, Rule::Stabilization),
                // A spike: up at once.
                (30 * SEC, obs(1500, 10), 15, Rule::Backlog),
                (40 * SEC, obs(300, 15), 15, Rule::Stabilization),
                (89 * SEC, obs(300, 15), 15, Rule::Stabilization),
                // 60 s after the spike, the highest left in the window is 3 (seen from 40 s to 89 s).
                (90 * SEC, obs(100, 15), 3, Rule::Stabilization),
                (100 * SEC, obs(100, 3), 3, Rule::Stabilization),
                (100 * SEC + 1, obs(100, 3), 3, Rule::Stabilization),
                (160 * SEC, obs(100, 3), 1, Rule::Backlog),
            ],
        );
        let d = {
            let mut s = PolicyState::default();
            decide(&p, &obs(1000, 1), &mut s, 0);
            decide(&p, &obs(0, 10), &mut s, 30 * SEC)
        };
        assert_eq!(
            d.reason.to_string(),
            "backlog 0 / 100 per replica -> 0, raised to min 1, held at 10 by the 60s scale-down window"
        );

        // No window: straight down.
        let p = Policy {
            stabilization_ms: 0,
            ..policy()
        };
        run(
            &p,
            &[
                (0, obs(1000, 1), 10, Rule::Backlog),
                (1, obs(200, 10), 2, Rule::Backlog),
            ],
        );

        // Remembered recommendations obey today's caps: a lowered max applies at once.
        let mut s = PolicyState::default();
        decide(&policy(), &obs(2000, 1), &mut s, 0);
        let lowered = Policy {
            max_replicas: 4,
            ..policy()
        };
        let d = decide(&lowered, &obs(2000, 20), &mut s, SEC);
        assert_eq!((d.replicas, d.reason.rule()), (4, Rule::MaxReplicas));
        let d = decide(&lowered, &obs(0, 4), &mut s, 2 * SEC);
        assert_eq!((d.replicas, d.reason.rule()), (4, Rule::Stabilization));
    }

    #[test]
    fn holds_are_remembered_by_the_window() {
        let p = policy();
        let rebalancing = Observation {
            rebalancing: true,
            ..obs(0, 8)
        };
        run(
            &p,
            &[
                (0, obs(800, 1), 8, Rule::Backlog),
                (100 * SEC, rebalancing, 8, Rule::Rebalancing),
                // The backlog is gone, but the hold 10 s ago is in the window.
                (110 * SEC, obs(0, 8), 8, Rule::Stabilization),
                (160 * SEC, obs(0, 8), 1, Rule::MinReplicas),
            ],
        );
    }

    #[test]
    fn max_step_climbs_and_descends() {
        let p = Policy {
            max_step: 4,
            stabilization_ms: 0,
            ..policy()
        };
        run(
            &p,
            &[
                (0, obs(1800, 1), 5, Rule::MaxStep),
                (1, obs(1800, 5), 9, Rule::MaxStep),
                (2, obs(1800, 9), 13, Rule::MaxStep),
                (3, obs(1800, 13), 17, Rule::MaxStep),
                (4, obs(1800, 17), 18, Rule::Backlog),
                (5, obs(0, 18), 14, Rule::MaxStep),
                (6, obs(0, 14), 10, Rule::MaxStep),
                (7, obs(0, 10), 6, Rule::MaxStep),
                (8, obs(0, 6), 2, Rule::MaxStep),
                (9, obs(0, 2), 1, Rule::MinReplicas),
            ],
        );
        let d = once(&p, &obs(1800, 1));
        assert_eq!(d.target, 18);
        assert_eq!(
            d.reason.to_string(),
            "backlog 1800 / 100 per replica -> 18, stepped to 5 (max step 4)"
        );
        // A zero step counts as one.
        let p = Policy { max_step: 0, ..p };
        assert_eq!(once(&p, &obs(1800, 1)).replicas, 2);
    }

    #[test]
    fn token_limit_follows_ready_replicas() {
        let p = Policy {
            per_replica_tokens: 8,
            global_max_tokens: 64,
            ..policy()
        };
        // (ready, paused, error, rebalancing, limit)
        let cases = [
            (0, false, false, false, 0),
            (3, false, false, false, 24),
            (8, false, false, false, 64),
            (100, false, false, false, 64),
            (3, true, false, false, 24),
            (3, false, true, false, 24),
            (3, false, false, true, 24),
            (u32::MAX, false, false, false, 64),
        ];
        for (ready, paused, error, rebalancing, limit) in cases {
            let mut o = obs(5000, 10);
            o.ready_replicas = ready;
            o.paused = paused;
            o.rebalancing = rebalancing;
            if error {
                o.backlog = Err("down".into());
            }
            assert_eq!(once(&p, &o).token_limit, limit, "ready {ready}");
        }
        assert_eq!(p.token_cap(), 8);
        assert_eq!(
            Policy {
                global_max_tokens: 65,
                ..p
            }
            .token_cap(),
            9
        );
    }

    #[test]
    fn from_spec_and_defaults() {
        let scaling = ScalingSpec {
            min_replicas: 0,
            max_replicas: 12,
            activation_backlog: 5,
            target_backlog_per_replica: 50,
            target_drain_seconds: 20,
            poll_interval_seconds: 2,
            cooldown_seconds: 90,
            scale_down_stabilization_seconds: 30,
            max_step: 4,
        };
        let concurrency = ConcurrencySpec {
            per_replica_tokens: 4,
            global_max_tokens: 32,
            lease_seconds: 30,
        };
        assert_eq!(
            Policy::from_spec(&scaling, &concurrency),
            Policy {
                min_replicas: 0,
                max_replicas: 12,
                activation_backlog: 5,
                target_backlog_per_replica: 50,
                target_drain_seconds: 20.0,
                cooldown_ms: 90_000,
                stabilization_ms: 30_000,
                max_step: 4,
                per_replica_tokens: 4,
                global_max_tokens: 32,
            }
        );
        let negative = ScalingSpec {
            min_replicas: -1,
            activation_backlog: -5,
            cooldown_seconds: -1,
            ..scaling
        };
        let p = Policy::from_spec(&negative, &concurrency);
        assert_eq!(
            (p.min_replicas, p.activation_backlog, p.cooldown_ms),
            (0, 0, 0)
        );

        // The defaults: 8 tokens per replica under 64 can feed 8 replicas, below max 10.
        let p = Policy::default();
        assert_eq!((p.min_replicas, p.max_replicas, p.token_cap()), (1, 10, 8));
        let d = once(&p, &obs(5000, 1));
        assert_eq!((d.replicas, d.reason.rule()), (8, Rule::TokenBudget));
    }

    #[test]
    fn reasons_read_well() {
        let p = policy();
        let cases: Vec<(Observation, &str)> = vec![
            (
                Observation {
                    partitions: Some(12),
                    ..obs(4200, 1)
                },
                "backlog 4200 / 100 per replica -> 42, capped at 12 partitions",
            ),
            (
                Observation {
                    arrival_rate: Some(120.0),
                    per_replica_rate: Some(20.0),
                    ..obs(3000, 1)
                },
                "(arrival 120/s + backlog 3000 in 30s) / 20.0/s per replica -> 11",
            ),
            (
                Observation {
                    arrival_rate: Some(0.5),
                    per_replica_rate: Some(2.5),
                    ..obs(0, 1)
                },
                "(arrival 0.50/s + backlog 0 in 30s) / 2.5/s per replica -> 1",
            ),
            (
                Observation {
                    in_flight: 41,
                    ..obs(0, 6)
                },
                "backlog 0 / 100 per replica -> 0, raised to 5 for 41 in flight at 10 tokens per replica",
            ),
            (
                Observation {
                    backlog: Err("kafka:9092: connection refused".into()),
                    ..obs(0, 4)
                },
                "source unreachable (kafka:9092: connection refused): holding 4 replicas",
            ),
            (
                Observation {
                    rebalancing: true,
                    ..obs(0, 4)
                },
                "consumer group rebalancing: holding 4 replicas",
            ),
            (
                Observation {
                    paused: true,
                    ..obs(0, 4)
                },
                "paused: holding 4 replicas",
            ),
        ];
        for (o, text) in cases {
            assert_eq!(once(&p, &o).reason.to_string(), text);
        }
        let p = Policy {
            min_replicas: 0,
            activation_backlog: 10,
            global_max_tokens: 35,
            ..p
        };
        assert_eq!(
            once(&p, &obs(10, 0)).reason.to_string(),
            "backlog 10 / 100 per replica -> 1, kept at 0: backlog 10 <= activation 10"
        );
        assert_eq!(
            once(&p, &obs(900, 1)).reason.to_string(),
            "backlog 900 / 100 per replica -> 9, capped at 4 by the token budget (35 / 10 per replica)"
        );
        assert_eq!(Rule::PartitionCap.to_string(), "PartitionCap");
        assert!(Reason::Paused { replicas: 1 }.is_hold());
    }

    #[test]
    fn window_memory_stays_small() {
        let p = Policy {
            stabilization_ms: 3_600 * SEC,
            max_replicas: 1000,
            ..policy()
        };
        let mut s = PolicyState::default();
        // A day of decisions every 2 s with recommendations going up and down.
        for i in 0..43_200u64 {
            let backlog = (i * 7919) % 100_000;
            decide(&p, &obs(backlog, 50), &mut s, i * 2 * SEC);
            assert!(s.recent.len() <= 1001);
        }
    }
}
