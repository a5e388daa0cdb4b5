//! The status subresource: observed replicas, backlog, tokens and rates, the `kubectl get`
//! summary, and the `Ready`, `SourceReachable` and `Scaling` conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::QueueProcessorSpec;
use super::schema::tidy_docs;

/// Condition type: the workload is processing (or idle with nothing to process) as specified.
/// `False` when measuring fails or the pods cannot run ([`crate::health`]).
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the operator could measure the backlog at the source (Kafka or Redis).
pub const CONDITION_SOURCE_REACHABLE: &str = "SourceReachable";
/// Condition type: `True` while a scaling change is in progress or being held back.
pub const CONDITION_SCALING: &str = "Scaling";

/// QueueProcessorStatus is the observed state, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct QueueProcessorStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Worker replicas that exist (running or starting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// Worker replicas the operator currently wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,

    /// Worker replicas that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// Messages waiting at the last measurement: Kafka consumer-group lag summed over the
    /// partitions (a partition without a committed offset counts from its start offset), or the
    /// Redis list length. Absent while unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,

    /// Partitions of the Kafka topic, which cap the useful replica count. Absent for a Redis
    /// list source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,

    /// Each scaling signal's last value and the replicas it wants (`spec.scaling.signals`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<SignalStatus>,

    /// Token pool usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenStatus>,

    /// Measured rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<ThroughputStatus>,

    /// When the operator last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,

    /// Why the operator last changed the replica count, for example
    /// `backlog 5400 at 900/s per replica: 3 -> 6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,

    /// What the scaling policy remembers between polls, kept here so that another operator
    /// replica (after a failover or during an upgrade) goes on with the same windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_memory: Option<ScalingMemory>,

    /// Short strings for the `kubectl get` columns, derived from the fields above. Programs
    /// should read the structured fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<StatusSummary>,

    /// Conditions `Ready`, `SourceReachable` and `Scaling`, following Kubernetes conventions
    /// (status `True`, `False` or `Unknown`, a CamelCase reason, a message, and the time the
    /// status last changed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Usage of the token pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct TokenStatus {
    /// The current limit written to Redis (perReplicaTokens x ready replicas, capped at
    /// globalMaxTokens).
    pub limit: i32,
    /// Leases currently held by workers.
    pub in_use: i32,
}

/// Rates measured over the last poll intervals, in messages per second.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct ThroughputStatus {
    /// Messages arriving at the source per second.
    #[serde(default)]
    pub arrival_per_second: f64,
    /// Messages completed successfully per second, all replicas together.
    #[serde(default)]
    pub processed_per_second: f64,
    /// Messages failing per second (each failed attempt counts).
    #[serde(default)]
    pub failed_per_second: f64,
    /// Completed messages per second of one busy replica; absent until measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_replica_per_second: Option<f64>,
}

/// The scaling policy's memory. Without it a new leader started fresh windows: it scaled down
/// at once what the stabilization window was holding, and restarted the cooldown. The capacity
/// estimate is `throughput.perReplicaPerSecond`. Times of the latest recommendation and of
/// re-made ones are refreshed with the other live numbers, so they may be up to that refresh
/// (30 s) old when another replica takes over.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct ScalingMemory {
    /// Replica counts recommended within the scale-down stabilization window, highest first,
    /// each with when it was last recommended. The last is the latest recommendation and has no
    /// time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<Recommendation>,
    /// Since when the workload has been idle (the cooldown before the last replica goes; kept
    /// only with `minReplicas` 0). Absent while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Time>,
    /// Since when the Kafka consumer group has been rebalancing (decisions hold for a while).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalancing_since: Option<Time>,
}

/// One remembered recommendation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct Recommendation {
    /// Replicas recommended.
    pub replicas: i32,
    /// When it was last recommended; absent for the latest recommendation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

impl ScalingMemory {
    /// What must be written at once: the highest recommendation (it holds scale-downs) and the
    /// idle and rebalance clocks, which change only on transitions. The times of re-made
    /// recommendations move at every poll and wait for the live-number refresh.
    fn settled(&self) -> Self {
        ScalingMemory {
            recommendations: self
                .recommendations
                .iter()
                .map(|r| r.replicas)
                .max()
                .map(|replicas| Recommendation {
                    replicas,
                    time: None,
                })
                .into_iter()
                .collect(),
            idle_since: self.idle_since.clone(),
            rebalancing_since: self.rebalancing_since.clone(),
        }
    }
}

/// Display strings for `kubectl get qp`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct StatusSummary {
    /// `kafka:<topic>` or `redis:<list key>`.
    #[serde(default)]
    pub source: String,
    /// `<ready>/<desired>` worker replicas.
    #[serde(default)]
    pub replicas: String,
    /// `<in use>/<limit>` tokens.
    #[serde(default)]
    pub tokens: String,
    /// What wants the most replicas: `backlog`, or a signal as `<name>=<value>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dominant: String,
}

/// One scaling signal in the status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignalStatus {
    /// The signal's name, as in `spec.scaling.signals`.
    pub name: String,
    /// The last value read (for `counterRate`, per second); absent when it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The replicas this signal alone wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// Status of a condition, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known (yet).
    Unknown,
}

impl ConditionStatus {
    /// `"True"`, `"False"` or `"Unknown"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(b: bool) -> Self {
        if b {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

impl QueueProcessorStatus {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// True when the condition of the given type is present with status `True`.
    pub fn is_condition_true(&self, type_: &str) -> bool {
        self.condition(type_).is_some_and(|c| c.status == "True")
    }

    /// Set a condition following Kubernetes conventions: `lastTransitionTime` changes only when
    /// the status changes; reason, message and observedGeneration are always updated. Returns
    /// true if anything changed.
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        observed_generation: Option<i64>,
        now: Time,
    ) -> bool {
        let message = message.into();
        let status = status.as_str();
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                let before = c.clone();
                if c.status != status {
                    c.status = status.to_string();
                    c.last_transition_time = now;
                }
                c.reason = reason.to_string();
                c.message = message;
                c.observed_generation = observed_generation;
                *c != before
            }
            None => {
                self.conditions.push(Condition {
                    type_: type_.to_string(),
                    status: status.to_string(),
                    reason: reason.to_string(),
                    message,
                    observed_generation,
                    last_transition_time: now,
                });
                true
            }
        }
    }

    /// Whether this newly computed status is worth a write, given the status on the object
    /// (`old`) and how long ago this process last wrote it (`since_written`, `None` if never).
    /// A change to anything but the live numbers is written at once; a change only to those
    /// (backlog, rates, tokens in use, the messages that quote them, the summary) waits until
    /// `refresh` has passed since the last write, so a busy workload costs at most one write per
    /// `refresh` rather than one per poll.
    pub fn write_due(
        &self,
        old: Option<&Self>,
        since_written: Option<std::time::Duration>,
        refresh: std::time::Duration,
    ) -> bool {
        match old {
            None => true,
            Some(old) if old == self => false,
            Some(old) if old.settled() != self.settled() => true,
            Some(_) => since_written.is_none_or(|d| d >= refresh),
        }
    }

    /// This status without the numbers that move every poll under traffic.
    fn settled(&self) -> Self {
        let mut s = self.clone();
        s.backlog = None;
        s.throughput = None;
        s.summary = None;
        for sig in &mut s.signals {
            sig.value = None;
        }
        s.scaling_memory = s.scaling_memory.as_ref().map(ScalingMemory::settled);
        if let Some(t) = &mut s.tokens {
            t.in_use = 0;
        }
        for c in &mut s.conditions {
            c.message.clear();
        }
        s
    }

    /// The signal that wants the most replicas, if it wants more than one and at least as
    /// many as the backlog alone would; else `backlog`.
    fn dominant(&self) -> String {
        let top = self
            .signals
            .iter()
            .filter(|s| s.replicas.unwrap_or(0) > 0)
            .max_by_key(|s| s.replicas.unwrap_or(0));
        match top {
            Some(s) if s.replicas >= self.desired_replicas => format!(
                "{}={}",
                s.name,
                s.value.map_or_else(|| "?".into(), |v| v.to_string())
            ),
            _ if self.signals.is_empty() => String::new(),
            _ => "backlog".into(),
        }
    }

    /// Recompute [`StatusSummary`] (the `kubectl get` columns) from the structured fields and
    /// the spec.
    pub fn refresh_summary(&mut self, spec: &QueueProcessorSpec) {
        let tokens = self.tokens.clone().unwrap_or_default();
        self.summary = Some(StatusSummary {
            source: spec.source.describe(),
            replicas: format!(
                "{}/{}",
                self.ready_replicas.unwrap_or(0),
                self.desired_replicas.unwrap_or(0)
            ),
            tokens: format!("{}/{}", tokens.in_use, tokens.limit),
            dominant: self.dominant(),
        });
    }
}
