//! `spec.concurrency` and `spec.scaling`: the token budget and the scaling policy that the
//! operator turns into a [`crate::policy::Policy`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema::{
    MAX_GLOBAL_TOKENS, MAX_LEASE_SECONDS, MAX_POLL_INTERVAL_SECONDS, MAX_REPLICAS,
    MAX_TOKENS_PER_REPLICA, MAX_WINDOW_SECONDS, MIN_LEASE_SECONDS, concurrency_rules,
    scaling_rules, tidy_docs,
};
use super::signals::{MAX_SIGNALS, SignalSpec};

/// The concurrency budget. A worker takes a token (an expiring lease in Redis) before it starts
/// a message and gives it back when the message is done; a crashed worker's tokens come back
/// when their leases expire. The operator sets the limit to `perReplicaTokens` times the
/// number of ready replicas, never above `globalMaxTokens`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = concurrency_rules)]
#[schemars(transform = tidy_docs)]
pub struct ConcurrencySpec {
    /// Tokens one worker replica may hold, which is how many messages it processes at once.
    #[schemars(range(min = 1, max = MAX_TOKENS_PER_REPLICA))]
    pub per_replica_tokens: i32,

    /// Ceiling on the tokens of all replicas together: the most concurrent handler calls the
    /// downstream (what the handler calls) will ever see from this QueueProcessor. Must be at
    /// least `perReplicaTokens`.
    #[schemars(range(min = 1, max = MAX_GLOBAL_TOKENS))]
    pub global_max_tokens: i32,

    /// Lifetime of a token lease in seconds. Workers renew their leases well before they
    /// expire; a worker that dies loses its tokens after at most this long.
    #[schemars(range(min = MIN_LEASE_SECONDS, max = MAX_LEASE_SECONDS))]
    pub lease_seconds: i32,
}

impl Default for ConcurrencySpec {
    fn default() -> Self {
        Self {
            per_replica_tokens: 8,
            global_max_tokens: 64,
            lease_seconds: 30,
        }
    }
}

impl ConcurrencySpec {
    /// The token limit for `ready_replicas` ready workers: `perReplicaTokens * ready_replicas`,
    /// capped at `globalMaxTokens` (and at zero from below).
    pub fn token_limit(&self, ready_replicas: i32) -> i32 {
        let wanted = i64::from(self.per_replica_tokens) * i64::from(ready_replicas.max(0));
        wanted.min(i64::from(self.global_max_tokens)) as i32
    }
}

/// The scaling policy. Replicas follow
/// `ceil((arrival rate + backlog / targetDrainSeconds) / per-replica rate)` once rates are
/// measured, and `ceil(backlog / targetBacklogPerReplica)` until then, clamped to
/// [minReplicas, maxReplicas], to the partition count of a Kafka topic, and to what the token
/// budget can feed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = scaling_rules)]
#[schemars(transform = tidy_docs)]
pub struct ScalingSpec {
    /// Fewest worker replicas. Set 0 to scale to zero when there is nothing to do (after
    /// `cooldownSeconds`); a backlog above `activationBacklog` brings the first replica back.
    #[schemars(range(min = 0, max = MAX_REPLICAS))]
    pub min_replicas: i32,

    /// Most worker replicas. Must be at least `minReplicas`.
    #[schemars(range(min = 1, max = MAX_REPLICAS))]
    pub max_replicas: i32,

    /// Backlog (messages) above which a workload scaled to zero gets its first replica back.
    #[schemars(range(min = 0))]
    pub activation_backlog: i64,

    /// Backlog one replica is expected to absorb, used until throughput has been measured.
    #[schemars(range(min = 1))]
    pub target_backlog_per_replica: i64,

    /// How fast the backlog should be worked off, in seconds, once throughput is known: the
    /// operator adds enough replicas to drain the current backlog in about this time on top of
    /// keeping up with the arrival rate.
    #[schemars(range(min = 1, max = MAX_WINDOW_SECONDS))]
    pub target_drain_seconds: i32,

    /// Seconds between two measurements of the backlog (and scaling decisions).
    #[schemars(range(min = 1, max = MAX_POLL_INTERVAL_SECONDS))]
    pub poll_interval_seconds: i32,

    /// Seconds with no backlog and no work in flight before the workload goes from
    /// `minReplicas` = 0 down to zero replicas. Ignored when `minReplicas` > 0.
    #[schemars(range(min = 0, max = MAX_WINDOW_SECONDS))]
    pub cooldown_seconds: i32,

    /// Scale-down stabilization window in seconds: the operator scales down only to the highest
    /// replica count it wanted during this window, so short dips do not cause churn. Scaling up
    /// is never delayed.
    #[schemars(range(min = 0, max = MAX_WINDOW_SECONDS))]
    pub scale_down_stabilization_seconds: i32,

    /// Largest change in replicas one decision may make, up or down. Each change of a Kafka
    /// consumer group causes a rebalance, so the default (the most replicas a QueueProcessor
    /// may have) lets the operator go straight to the computed count rather than climbing one
    /// step per poll.
    #[schemars(range(min = 1, max = MAX_REPLICAS))]
    pub max_step: i32,

    /// More demand to scale on, read from Redis at every poll (see `SignalSpec`): the replicas
    /// are the most that the source's backlog or any signal wants.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SIGNALS), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub signals: Vec<SignalSpec>,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 10,
            activation_backlog: 0,
            target_backlog_per_replica: 100,
            target_drain_seconds: 30,
            poll_interval_seconds: 2,
            cooldown_seconds: 300,
            scale_down_stabilization_seconds: 60,
            max_step: MAX_REPLICAS,
            signals: Vec::new(),
        }
    }
}
