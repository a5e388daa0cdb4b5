//! `spec.scaling.signals`: demand that the user's system already counts in Redis (a counter, a
//! hash field, a sorted set of scheduled jobs, a stream's consumer group), as more inputs to
//! the scaling policy next to the source's own backlog.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::RedisSpec;
use super::schema::{signal_rules, tidy_docs};

/// Most signals one QueueProcessor may have (each is a Redis read per poll).
pub const MAX_SIGNALS: usize = 8;

/// One scaling signal: a number read from the QueueProcessor's Redis at every poll. The
/// workload wants `ceil(value / targetPerReplica)` replicas for it; the replicas are the most
/// that the source's backlog or any signal wants, through the same caps, windows and cooldown.
/// A signal that cannot be read holds the replicas, as the source does. Keys with a hash tag
/// (`{orders}:pending`) work on Redis Cluster like any other key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = signal_rules)]
#[schemars(transform = tidy_docs)]
pub struct SignalSpec {
    /// A name for status, events and `kubectl get -o wide` ([a-z0-9-], unique).
    #[schemars(length(min = 1, max = 40), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,

    /// What to read: `counter` (GET of an integer), `hashField` (HGET), `listLength` (LLEN),
    /// `sortedSetSize` (ZCARD, or with `dueOnly` the members scored up to now in Unix
    /// seconds: delayed jobs that are due), `setSize` (SCARD), `streamLength` (XLEN),
    /// `streamLag` and `streamPending` (a consumer group's lag and pending entries, XINFO
    /// GROUPS), or `counterRate` (the per-second rate of a monotonic counter, such as the
    /// user's requests_total: sized as arrival rate over the measured throughput of a replica,
    /// and over `targetPerReplica` per second until that is measured).
    #[serde(rename = "type")]
    pub kind: SignalKind,

    /// The Redis key.
    #[schemars(length(min = 1, max = 1024))]
    pub key: String,

    /// The hash field (`hashField` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub field: Option<String>,

    /// The stream's consumer group (`streamLag` and `streamPending` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub group: Option<String>,

    /// `sortedSetSize` only: count members whose score (Unix seconds) is not in the future.
    #[serde(default)]
    pub due_only: bool,

    /// How much of the value one replica handles (for `counterRate`: messages per second).
    #[schemars(range(min = 1))]
    pub target_per_replica: i64,

    /// With `minReplicas: 0`, a value above this wakes the workload (and keeps it awake).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub activation: i64,

    /// Another Redis to read the key from (the application's own, say), with its credentials
    /// by reference like `spec.redis`; the QueueProcessor's Redis when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
}

/// The kinds of signal.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SignalKind {
    Counter,
    HashField,
    ListLength,
    SortedSetSize,
    SetSize,
    StreamLength,
    StreamLag,
    StreamPending,
    CounterRate,
}

impl SignalKind {
    /// The Redis type the key must have (as `TYPE` names it).
    pub fn redis_type(self) -> &'static str {
        match self {
            SignalKind::Counter | SignalKind::CounterRate => "string",
            SignalKind::HashField => "hash",
            SignalKind::ListLength => "list",
            SignalKind::SortedSetSize => "zset",
            SignalKind::SetSize => "set",
            SignalKind::StreamLength | SignalKind::StreamLag | SignalKind::StreamPending => {
                "stream"
            }
        }
    }
}
