//! Why a decision came out as it did: the [`Reason`], its sizing [`Basis`] and [`Bound`]s, the
//! [`Rule`] that had the last word, and their human-readable text.

use std::fmt;

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
    /// Raised for a scaling signal (`spec.scaling.signals`) that wants more than the backlog.
    Signal {
        name: String,
        value: f64,
        per_replica: f64,
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
    Signal,
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
            Rule::Signal => "Signal",
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
            Bound::Signal { .. } => Rule::Signal,
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

/// A signal's value: whole numbers as such, others with two decimals.
struct Number(f64);

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.fract() == 0.0 && self.0.abs() < 1e15 {
            write!(f, "{}", self.0 as i64)
        } else {
            write!(f, "{:.2}", self.0)
        }
    }
}

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
            Bound::Signal {
                name,
                value,
                per_replica,
                replicas,
            } => write!(
                f,
                "raised to {replicas} for signal {name}: {} / {} per replica",
                Number(*value),
                Number(*per_replica)
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
