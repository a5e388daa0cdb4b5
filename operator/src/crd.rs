//! The `QueueProcessor` custom resource (`queueprocessing.dev/v1alpha1`).
//!
//! One `QueueProcessor` describes one queue-processing workload: where messages come from
//! (a Kafka topic consumed by a consumer group, or a Redis list), the Redis that holds the shared
//! token pool and the results, how many tokens (concurrent handler calls) the whole workload may
//! use, how the operator scales the workers, what a worker runs for each message, and how long
//! results are kept.
//!
//! The Rust types here are the single source of truth:
//!
//! * their doc comments become the schema descriptions that `kubectl explain` prints;
//! * `#[serde(default ...)]` values become schema defaults, so the API server fills them in and
//!   `kubectl get -o yaml` shows every effective setting;
//! * ranges, patterns and enums become OpenAPI validation, and cross-field rules become CEL
//!   `x-kubernetes-validations` whose messages name the offending field;
//! * [`crd_yaml`] renders the CustomResourceDefinition (the `crdgen` binary prints it into
//!   `crds/queueprocessor.yaml`, and a test fails when that file is stale).
//!
//! Objects that never pass through an API server (local mode reads a YAML file) get the same
//! checks from [`QueueProcessor::from_yaml`]: strict parsing (unknown fields are errors), the
//! schema defaults, and [`QueueProcessorSpec::validate`], which mirrors the ranges and CEL rules.
//!
//! Secrets are never written into a `QueueProcessor`: passwords, SASL credentials and TLS keys
//! are referenced with a [`SecretKeyRef`] (`{name, key}` of a Secret in the same namespace).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Rule;
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every resource this project defines.
pub const GROUP: &str = "queueprocessing.dev";
/// API version of [`QueueProcessor`].
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of a [`QueueProcessor`] manifest.
pub const API_VERSION: &str = "queueprocessing.dev/v1alpha1";
/// `kind` of a [`QueueProcessor`] manifest.
pub const KIND: &str = "QueueProcessor";

/// Annotation that pauses a QueueProcessor without editing its spec: set it to `"true"`
/// (for example `kubectl annotate qp orders queueprocessing.dev/paused=true`). It has the same
/// effect as `spec.paused: true`; remove the annotation (or set any other value) to resume.
pub const PAUSED_ANNOTATION: &str = "queueprocessing.dev/paused";

/// Condition type: the workload is processing (or idle with nothing to process) as specified.
/// `False` when measuring fails or the pods cannot run ([`crate::health`]).
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the operator could measure the backlog at the source (Kafka or Redis).
pub const CONDITION_SOURCE_REACHABLE: &str = "SourceReachable";
/// Condition type: `True` while a scaling change is in progress or being held back.
pub const CONDITION_SCALING: &str = "Scaling";

// ------------------------------------------------------------------------------------------------
// Limits shared by the schema (`#[schemars(range(...))]`) and `QueueProcessorSpec::validate`.

const MAX_REPLICAS: i32 = 1000;
const MAX_TOKENS_PER_REPLICA: i32 = 10_000;
const MAX_GLOBAL_TOKENS: i32 = 1_000_000;
const MIN_LEASE_SECONDS: i32 = 2;
const MAX_LEASE_SECONDS: i32 = 3600;
const MAX_TIMEOUT_SECONDS: i32 = 3600;
const MAX_RESULT_TTL_SECONDS: i64 = 30 * 24 * 3600;
const MAX_RETRIES: i32 = 100;
const MAX_BACKOFF_MILLIS: i64 = 600_000;
const MAX_SLEEP_MILLIS: i64 = 3_600_000;
const MAX_IN_FLIGHT_PER_PARTITION: i32 = 100_000;
const MAX_GATEWAY_REPLICAS: i32 = 100;
const MAX_CLUSTER_NODES: usize = 100;
const MAX_POLL_INTERVAL_SECONDS: i32 = 300;
const MAX_WINDOW_SECONDS: i32 = 86_400;

// ------------------------------------------------------------------------------------------------
// CEL rules. Each is attached to the schema of the struct named in its `on` comment, and
// mirrored in Rust by `QueueProcessorSpec::validate` with the same message.

/// A CEL validation rule (`x-kubernetes-validations` entry) as written into the schema.
#[derive(Clone, Copy, Debug)]
pub struct CelRule {
    /// The CEL expression; `self` is the object the rule is attached to.
    pub rule: &'static str,
    /// The error message; it names the field and the rule.
    pub message: &'static str,
    /// Relative path of the field to blame, when it is a single field.
    pub field_path: Option<&'static str>,
}

const SPEC_RULES: &[CelRule] = &[
    CelRule {
        rule: "!has(self.results) || !has(self.results.deadLetter) || !has(self.results.deadLetter.kafkaTopic) || has(self.source.kafka)",
        message: "spec.results.deadLetter.kafkaTopic requires a Kafka source (spec.source.kafka); use deadLetter.redisList with a Redis list source",
        field_path: Some(".results.deadLetter.kafkaTopic"),
    },
    CelRule {
        rule: "!has(self.source.kafka) || !has(self.results) || !has(self.results.deadLetter) || !has(self.results.deadLetter.kafkaTopic) || self.results.deadLetter.kafkaTopic != self.source.kafka.topic",
        message: "spec.results.deadLetter.kafkaTopic must differ from spec.source.kafka.topic",
        field_path: Some(".results.deadLetter.kafkaTopic"),
    },
    CelRule {
        rule: "!has(self.source.redisList) || !has(self.results) || !has(self.results.deadLetter) || !has(self.results.deadLetter.redisList) || self.results.deadLetter.redisList != self.source.redisList.key",
        message: "spec.results.deadLetter.redisList must differ from spec.source.redisList.key",
        field_path: Some(".results.deadLetter.redisList"),
    },
];

const SOURCE_RULES: &[CelRule] = &[CelRule {
    rule: "has(self.kafka) != has(self.redisList)",
    message: "spec.source: exactly one of kafka or redisList must be set",
    field_path: None,
}];

const KAFKA_TLS_RULES: &[CelRule] = &[CelRule {
    rule: "has(self.clientCertSecretRef) == has(self.clientKeySecretRef)",
    message: "spec.source.kafka.tls: clientCertSecretRef and clientKeySecretRef must be set together",
    field_path: None,
}];

const REDIS_RULES: &[CelRule] = &[
    CelRule {
        rule: "has(self.url) != has(self.clusterNodes)",
        message: "spec.redis: exactly one of url or clusterNodes must be set",
        field_path: None,
    },
    CelRule {
        rule: "!has(self.url) || !self.url.contains('@')",
        message: "spec.redis.url must not contain credentials: reference a Secret with spec.redis.passwordSecretRef",
        field_path: Some(".url"),
    },
    CelRule {
        rule: "!has(self.clusterNodes) || self.clusterNodes.all(n, !n.contains('@'))",
        message: "spec.redis.clusterNodes must not contain credentials: reference a Secret with spec.redis.passwordSecretRef",
        field_path: Some(".clusterNodes"),
    },
];

const CONCURRENCY_RULES: &[CelRule] = &[CelRule {
    rule: "self.perReplicaTokens <= self.globalMaxTokens",
    message: "spec.concurrency.perReplicaTokens must be less than or equal to spec.concurrency.globalMaxTokens",
    field_path: Some(".perReplicaTokens"),
}];

const SCALING_RULES: &[CelRule] = &[CelRule {
    rule: "self.minReplicas <= self.maxReplicas",
    message: "spec.scaling.minReplicas must be less than or equal to spec.scaling.maxReplicas",
    field_path: Some(".minReplicas"),
}];

const HANDLER_RULES: &[CelRule] = &[CelRule {
    rule: "(has(self.http) ? 1 : 0) + (has(self.exec) ? 1 : 0) + (has(self.builtin) ? 1 : 0) == 1",
    message: "spec.worker.handler: exactly one of http, exec or builtin must be set",
    field_path: None,
}];

const BUILTIN_RULES: &[CelRule] = &[
    CelRule {
        rule: "!has(self.sleepMillis) || self.name == 'sleep'",
        message: "spec.worker.handler.builtin.sleepMillis is only valid with name: sleep",
        field_path: Some(".sleepMillis"),
    },
    CelRule {
        rule: "!has(self.failPattern) || self.name == 'fail'",
        message: "spec.worker.handler.builtin.failPattern is only valid with name: fail",
        field_path: Some(".failPattern"),
    },
];

const DEAD_LETTER_RULES: &[CelRule] = &[CelRule {
    rule: "has(self.kafkaTopic) != has(self.redisList)",
    message: "spec.results.deadLetter: exactly one of kafkaTopic or redisList must be set",
    field_path: None,
}];

/// Every CEL rule of the schema, for tests and documentation.
pub const ALL_CEL_RULES: &[&[CelRule]] = &[
    SPEC_RULES,
    SOURCE_RULES,
    KAFKA_TLS_RULES,
    REDIS_RULES,
    CONCURRENCY_RULES,
    SCALING_RULES,
    HANDLER_RULES,
    BUILTIN_RULES,
    DEAD_LETTER_RULES,
];

fn add_rules(schema: &mut schemars::Schema, rules: &[CelRule]) {
    for r in rules {
        let mut rule = Rule::new(r.rule).message(r.message);
        if let Some(path) = r.field_path {
            rule = rule.field_path(path);
        }
        kube::core::validate(schema, rule).expect("a CEL rule serializes to JSON");
    }
}

fn spec_rules(s: &mut schemars::Schema) {
    add_rules(s, SPEC_RULES)
}
fn source_rules(s: &mut schemars::Schema) {
    add_rules(s, SOURCE_RULES)
}
fn kafka_tls_rules(s: &mut schemars::Schema) {
    add_rules(s, KAFKA_TLS_RULES)
}
fn redis_rules(s: &mut schemars::Schema) {
    add_rules(s, REDIS_RULES)
}
fn concurrency_rules(s: &mut schemars::Schema) {
    add_rules(s, CONCURRENCY_RULES)
}
fn scaling_rules(s: &mut schemars::Schema) {
    add_rules(s, SCALING_RULES)
}
fn handler_rules(s: &mut schemars::Schema) {
    add_rules(s, HANDLER_RULES)
}
fn builtin_rules(s: &mut schemars::Schema) {
    add_rules(s, BUILTIN_RULES)
}
fn dead_letter_rules(s: &mut schemars::Schema) {
    add_rules(s, DEAD_LETTER_RULES)
}

/// Doc comments are wrapped at 100 columns; `kubectl explain` re-wraps descriptions itself, so
/// join the lines of each paragraph (of this schema and its direct properties) into one.
fn tidy_docs(s: &mut schemars::Schema) {
    fn unwrap(d: &mut serde_json::Value) {
        if let Some(text) = d.as_str() {
            let joined: Vec<String> = text
                .split("\n\n")
                .map(|para| {
                    para.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            *d = serde_json::Value::String(joined.join("\n\n"));
        }
    }
    if let Some(d) = s.get_mut("description") {
        unwrap(d);
    }
    if let Some(props) = s.get_mut("properties").and_then(|p| p.as_object_mut()) {
        for prop in props.values_mut() {
            if let Some(d) = prop.get_mut("description") {
                unwrap(d);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Spec

/// QueueProcessorSpec is the desired state of a queue-processing workload: a source of messages,
/// the Redis holding the shared token pool and the results, the concurrency budget, the scaling
/// policy, the worker that handles each message, and result retention.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
// The printcolumn(...) entries below repeat `type_ = "string"`, which this lint mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "queueprocessing.dev",
    version = "v1alpha1",
    kind = "QueueProcessor",
    plural = "queueprocessors",
    shortname = "qp",
    category = "queueprocessing",
    namespaced,
    status = "QueueProcessorStatus",
    derive = "PartialEq",
    doc = "QueueProcessor runs token-gated workers that consume a Kafka topic or a Redis list, scales them on the backlog, and keeps every handler call under a cluster-wide concurrency budget. Freeze its scaling with spec.paused or the annotation queueprocessing.dev/paused: \"true\".",
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.summary.source",
        description = "Where messages come from: kafka:<topic> or redis:<list key>"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.summary.replicas",
        description = "Ready / desired worker replicas"
    ),
    printcolumn(
        name = "Backlog",
        type_ = "integer",
        json_path = ".status.backlog",
        description = "Messages waiting: Kafka consumer-group lag or Redis list length"
    ),
    printcolumn(
        name = "Tokens",
        type_ = "string",
        json_path = ".status.summary.tokens",
        description = "Tokens (concurrent handler calls) in use / current limit"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Reason of the Ready condition"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Status of the Ready condition",
        priority = 1
    ),
    printcolumn(
        name = "Rate",
        type_ = "number",
        json_path = ".status.throughput.processedPerSecond",
        description = "Messages processed per second",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        description = "Message of the Ready condition",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = spec_rules)]
#[schemars(transform = tidy_docs)]
pub struct QueueProcessorSpec {
    /// Freeze scaling: when true the operator keeps the worker replicas where they are (no
    /// scale-up, no scale-down, no scale to zero), while the workers keep processing and the
    /// backlog and conditions keep being reported. Use it to take manual control (e.g. `kubectl
    /// scale`) during an incident. The annotation `queueprocessing.dev/paused: "true"` has the
    /// same effect without editing the spec.
    #[serde(default)]
    pub paused: bool,

    /// Where messages come from: set exactly one of `kafka` or `redisList`.
    pub source: SourceSpec,

    /// The Redis (standalone or Redis Cluster) that holds the token pool, the results, the
    /// request states and the counters of this QueueProcessor. Every key shares the hash tag
    /// `{<namespace>/<name>}`, so scripts work on Redis Cluster. A `redisList` source is read
    /// from this Redis too.
    pub redis: RedisSpec,

    /// The concurrency budget: how many messages may be in a handler at the same time, per
    /// worker replica and across the whole workload, enforced with expiring leases in Redis.
    #[serde(default)]
    pub concurrency: ConcurrencySpec,

    /// How the operator picks the number of worker replicas from the backlog and the measured
    /// throughput.
    #[serde(default)]
    pub scaling: ScalingSpec,

    /// The worker pods: image, the handler called for every message, and pod template
    /// overrides.
    pub worker: WorkerSpec,

    /// What happens to results and to messages that keep failing.
    #[serde(default)]
    pub results: ResultsSpec,

    /// The optional HTTP gateway that accepts requests (queues them and answers with an id) and
    /// serves their results to polling clients.
    #[serde(default)]
    pub gateway: GatewaySpec,
}

/// A reference to one key of a Secret in the QueueProcessor's namespace. Credentials are only
/// ever referenced this way, never written into the QueueProcessor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct SecretKeyRef {
    /// Name of the Secret (in the same namespace as the QueueProcessor).
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key within the Secret's data whose value is used.
    #[schemars(length(min = 1, max = 253), pattern(r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Where messages come from. Exactly one of `kafka` or `redisList` must be set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = source_rules)]
#[schemars(transform = tidy_docs)]
pub struct SourceSpec {
    /// Consume a Kafka topic as a consumer group, with at-least-once delivery: offsets are
    /// committed only up to the lowest message that is not finished yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSource>,

    /// Consume a Redis list: each message is moved atomically into a per-worker processing
    /// list and removed when done; messages of a worker that stopped heartbeating are returned
    /// to the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_list: Option<RedisListSource>,
}

/// A Kafka topic consumed by a consumer group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct KafkaSource {
    /// Comma-separated `host:port` list of brokers used to bootstrap the connection, as in
    /// Kafka's `bootstrap.servers`, for example `kafka-0.kafka:9092,kafka-1.kafka:9092`.
    #[schemars(
        length(min = 1, max = 4096),
        pattern(r"^[^\s,]+:[0-9]+(,[^\s,]+:[0-9]+)*$")
    )]
    pub bootstrap_servers: String,

    /// The topic to consume. Replicas beyond its partition count would sit idle, so the
    /// operator never runs more workers than the topic has partitions.
    #[schemars(length(min = 1, max = 249), pattern(r"^[a-zA-Z0-9._-]+$"))]
    pub topic: String,

    /// The consumer group the workers join. Its committed offsets define the lag (backlog) the
    /// operator scales on.
    #[schemars(length(min = 1, max = 255))]
    pub consumer_group: String,

    /// Where a consumer group without committed offsets starts: `earliest` (process what is
    /// already in the topic) or `latest` (only new messages).
    #[serde(default)]
    pub auto_offset_reset: OffsetReset,

    /// Most messages of one partition that a worker processes at once. Above it the worker
    /// pauses fetching from that partition until work completes, which bounds memory and the
    /// amount redelivered after a crash.
    #[serde(default = "default_max_in_flight_per_partition")]
    #[schemars(range(min = 1, max = MAX_IN_FLIGHT_PER_PARTITION))]
    pub max_in_flight_per_partition: i32,

    /// SASL authentication. Omit for brokers without authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSasl>,

    /// TLS to the brokers. Present (even as `{}`) means TLS is on, verified against the system
    /// CAs unless `caSecretRef` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<KafkaTls>,
}

fn default_max_in_flight_per_partition() -> i32 {
    1000
}

/// Where a consumer group without committed offsets starts reading.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// Start at the oldest message still in the topic.
    #[default]
    Earliest,
    /// Start at the end of the topic: only messages produced from now on.
    Latest,
}

impl OffsetReset {
    /// The value of librdkafka's `auto.offset.reset`.
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// SASL authentication to Kafka. Both credentials come from Secrets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct KafkaSasl {
    /// The SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`. Use `PLAIN` only
    /// together with `tls`, since it sends the password as is.
    pub mechanism: SaslMechanism,
    /// Secret key holding the SASL username.
    pub username_secret_ref: SecretKeyRef,
    /// Secret key holding the SASL password.
    pub password_secret_ref: SecretKeyRef,
}

/// A SASL mechanism supported by the workers and the operator.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SaslMechanism {
    /// Username and password sent as is (use with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// Salted challenge-response with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// Salted challenge-response with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The value of librdkafka's `sasl.mechanism`.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// TLS settings for the Kafka connection. Certificates and keys are PEM, stored in Secrets.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kafka_tls_rules)]
#[schemars(transform = tidy_docs)]
pub struct KafkaTls {
    /// Secret key holding the PEM CA bundle that signed the brokers' certificates. Omit to use
    /// the system CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the PEM client certificate, for mutual TLS. Set together with
    /// `clientKeySecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the PEM private key of the client certificate. Set together with
    /// `clientCertSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_secret_ref: Option<SecretKeyRef>,
}

/// A Redis list used as a work queue, in the Redis given by `spec.redis`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct RedisListSource {
    /// Key of the list. Producers push messages on the left (`LPUSH`); workers take them from
    /// the right, oldest first.
    #[schemars(length(min = 1, max = 1024))]
    pub key: String,

    /// Seconds without a heartbeat after which a worker counts as gone and the messages it
    /// was processing are put back on the list for another worker.
    #[serde(default = "default_reclaim_after_seconds")]
    #[schemars(range(min = 1, max = MAX_LEASE_SECONDS))]
    pub reclaim_after_seconds: i32,
}

fn default_reclaim_after_seconds() -> i32 {
    30
}

/// Connection to Redis. Set exactly one of `url` (standalone Redis) or `clusterNodes`
/// (Redis Cluster).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = redis_rules)]
#[schemars(transform = tidy_docs)]
pub struct RedisSpec {
    /// URL of a standalone Redis: `redis://host:port[/db]`, or `rediss://` for TLS. Must not
    /// contain credentials; use `passwordSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), pattern(r"^rediss?://"))]
    pub url: Option<String>,

    /// Seed nodes of a Redis Cluster, each `host:port` (the rest of the cluster is discovered
    /// from them). Must not contain credentials; use `passwordSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = MAX_CLUSTER_NODES),
        inner(length(min = 1, max = 512))
    )]
    pub cluster_nodes: Option<Vec<String>>,

    /// Use TLS for every Redis connection (implied by a `rediss://` url).
    #[serde(default)]
    pub tls: bool,

    /// Secret key holding the Redis ACL username. Omit for the `default` user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeyRef>,

    /// Secret key holding the Redis password (`requirepass`, or the ACL user's password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

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
    /// consumer group causes a rebalance, so the default lets the operator go straight to the
    /// computed count rather than climbing one step per poll.
    #[schemars(range(min = 1, max = MAX_REPLICAS))]
    pub max_step: i32,
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
            max_step: 10,
        }
    }
}

/// The worker pods. The operator builds a Deployment from these settings (or, in local mode,
/// runs worker processes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct WorkerSpec {
    /// Container image of the worker. Omit to use the worker image the operator was installed
    /// with (Helm value `worker.image`), which matches the operator's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,

    /// Image pull policy of the worker container: `Always`, `IfNotPresent` or `Never`. Omit for
    /// the Kubernetes default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// What the worker does with each message: exactly one of `http`, `exec` or `builtin`.
    pub handler: HandlerSpec,

    /// Seconds a worker gets on shutdown (SIGTERM) to finish the messages it holds before it
    /// commits, releases its tokens and exits; unfinished messages are redelivered.
    #[serde(default = "default_shutdown_timeout_seconds")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub shutdown_timeout_seconds: i32,

    /// CPU and memory requests and limits of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra environment variables of the worker container (use `valueFrom.secretKeyRef` for
    /// anything secret).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Additional containers in each worker pod, for example a handler sidecar that the `http`
    /// handler calls on `http://127.0.0.1:<port>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_containers: Vec<Container>,

    /// Node labels a worker pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Service account of the worker pods. Omit for the namespace's `default` account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,

    /// Secrets used to pull the worker and extra container images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Extra labels on the worker pods (the operator's own labels take precedence).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,

    /// Extra annotations on the worker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
}

fn default_shutdown_timeout_seconds() -> i32 {
    30
}

/// When the kubelet pulls a container image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the image is not on the node.
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// What a worker does with each message. Set exactly one of `http`, `exec` or `builtin`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = handler_rules)]
#[schemars(transform = tidy_docs)]
pub struct HandlerSpec {
    /// POST each message body to a URL; a 2xx response body is the result, anything else (or a
    /// timeout) is a failure that is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHandler>,

    /// Run a command per message with the body on stdin; exit status 0 means success and
    /// stdout is the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecHandler>,

    /// A handler built into the worker, for tests, demos and benchmarks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinHandler>,
}

/// Call an HTTP endpoint for each message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct HttpHandler {
    /// The `http://` or `https://` URL that receives each message as a POST body.
    #[schemars(length(min = 1, max = 2048), pattern(r"^https?://"))]
    pub url: String,

    /// Seconds to wait for the response before the attempt counts as failed.
    #[serde(default = "default_handler_timeout_seconds")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub timeout_seconds: i32,
}

fn default_handler_timeout_seconds() -> i32 {
    30
}

/// Run a command for each message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct ExecHandler {
    /// The program and its arguments (no shell), for example `["/app/handle", "--json"]`.
    #[schemars(length(min = 1, max = 256), inner(length(min = 1)))]
    pub command: Vec<String>,

    /// Seconds the command may run before it is killed and the attempt counts as failed.
    #[serde(default = "default_handler_timeout_seconds")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub timeout_seconds: i32,
}

/// A handler built into the worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = builtin_rules)]
#[schemars(transform = tidy_docs)]
pub struct BuiltinHandler {
    /// Which built-in handler: `echo` returns the message as the result; `sleep` waits
    /// `sleepMillis` and then echoes (a stand-in for a slow downstream); `fail` fails every
    /// message, or only those containing `failPattern`.
    pub name: BuiltinName,

    /// For `sleep`: milliseconds each message takes. Defaults to 100 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_SLEEP_MILLIS))]
    pub sleep_millis: Option<i64>,

    /// For `fail`: only messages whose body contains this text fail (the others are echoed).
    /// Omit to fail every message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub fail_pattern: Option<String>,
}

impl BuiltinHandler {
    /// Milliseconds a `sleep` handler takes per message when `sleepMillis` is omitted.
    pub const DEFAULT_SLEEP_MILLIS: i64 = 100;

    /// The effective sleep of a `sleep` handler.
    pub fn sleep_millis(&self) -> i64 {
        self.sleep_millis.unwrap_or(Self::DEFAULT_SLEEP_MILLIS)
    }
}

/// The built-in handlers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinName {
    /// Return the message body as the result.
    Echo,
    /// Wait, then echo.
    Sleep,
    /// Fail (all messages, or those matching `failPattern`).
    Fail,
}

impl BuiltinName {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltinName::Echo => "echo",
            BuiltinName::Sleep => "sleep",
            BuiltinName::Fail => "fail",
        }
    }
}

/// Results, retries and dead letters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = tidy_docs)]
pub struct ResultsSpec {
    /// Seconds a result (and the request's state: pending, processing, done or failed) stays
    /// in Redis after it was written. Clients must poll for it within this time.
    #[schemars(range(min = 1, max = MAX_RESULT_TTL_SECONDS))]
    pub ttl_seconds: i64,

    /// How often a failed message is retried before it is marked failed (and sent to
    /// `deadLetter`, if set). 0 means no retries.
    #[schemars(range(min = 0, max = MAX_RETRIES))]
    pub max_retries: i32,

    /// Delay before the first retry in milliseconds; it doubles with every further retry.
    #[schemars(range(min = 0, max = MAX_BACKOFF_MILLIS))]
    pub retry_backoff_millis: i64,

    /// Where messages go, with the reason, once their retries are used up. Omit to only mark
    /// them failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterSpec>,
}

impl Default for ResultsSpec {
    fn default() -> Self {
        Self {
            ttl_seconds: 3600,
            max_retries: 3,
            retry_backoff_millis: 200,
            dead_letter: None,
        }
    }
}

/// A dead-letter target: exactly one of `kafkaTopic` or `redisList`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = dead_letter_rules)]
#[schemars(transform = tidy_docs)]
pub struct DeadLetterSpec {
    /// A Kafka topic on the source's brokers (only with a Kafka source). Must not be the source
    /// topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), pattern(r"^[a-zA-Z0-9._-]+$"))]
    pub kafka_topic: Option<String>,

    /// A list key in `spec.redis`. Must not be the source list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub redis_list: Option<String>,
}

/// The request gateway: an HTTP service that validates a request, queues it, marks it pending,
/// answers at once with an id, and serves the result to clients polling with that id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = tidy_docs)]
pub struct GatewaySpec {
    /// Run the gateway (a Deployment and a Service named `<name>-gateway`).
    pub enabled: bool,

    /// Gateway replicas (when enabled). The gateway is stateless.
    #[schemars(range(min = 1, max = MAX_GATEWAY_REPLICAS))]
    pub replicas: i32,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            enabled: false,
            replicas: 1,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Status

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
        });
    }
}

// ------------------------------------------------------------------------------------------------
// Accessors

/// The configured source, as an enum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Source<'a> {
    /// `spec.source.kafka`.
    Kafka(&'a KafkaSource),
    /// `spec.source.redisList`.
    RedisList(&'a RedisListSource),
}

impl SourceSpec {
    /// The one configured source; `None` when zero or two are set (which the API server and
    /// [`QueueProcessorSpec::validate`] reject).
    pub fn get(&self) -> Option<Source<'_>> {
        match (&self.kafka, &self.redis_list) {
            (Some(k), None) => Some(Source::Kafka(k)),
            (None, Some(r)) => Some(Source::RedisList(r)),
            _ => None,
        }
    }

    /// `kafka:<topic>` or `redis:<key>` (the `Source` column of `kubectl get qp`).
    pub fn describe(&self) -> String {
        match self.get() {
            Some(Source::Kafka(k)) => format!("kafka:{}", k.topic),
            Some(Source::RedisList(r)) => format!("redis:{}", r.key),
            None => "invalid".to_string(),
        }
    }
}

/// Where Redis is, as an enum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RedisEndpoint<'a> {
    /// A standalone Redis at this URL.
    Url(&'a str),
    /// A Redis Cluster reachable through these seed nodes.
    Cluster(&'a [String]),
}

impl RedisSpec {
    /// The one configured endpoint; `None` when zero or both are set.
    pub fn endpoint(&self) -> Option<RedisEndpoint<'_>> {
        match (&self.url, &self.cluster_nodes) {
            (Some(u), None) => Some(RedisEndpoint::Url(u)),
            (None, Some(n)) => Some(RedisEndpoint::Cluster(n)),
            _ => None,
        }
    }

    /// True for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster_nodes.is_some()
    }

    /// True if connections must use TLS (`tls: true` or a `rediss://` url).
    pub fn uses_tls(&self) -> bool {
        self.tls
            || self
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
    }
}

/// The configured handler, as an enum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Handler<'a> {
    /// `http`.
    Http(&'a HttpHandler),
    /// `exec`.
    Exec(&'a ExecHandler),
    /// `builtin`.
    Builtin(&'a BuiltinHandler),
}

impl HandlerSpec {
    /// The one configured handler; `None` when zero or several are set.
    pub fn get(&self) -> Option<Handler<'_>> {
        match (&self.http, &self.exec, &self.builtin) {
            (Some(h), None, None) => Some(Handler::Http(h)),
            (None, Some(e), None) => Some(Handler::Exec(e)),
            (None, None, Some(b)) => Some(Handler::Builtin(b)),
            _ => None,
        }
    }
}

/// The configured dead-letter target, as an enum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeadLetter<'a> {
    /// A Kafka topic on the source brokers.
    KafkaTopic(&'a str),
    /// A Redis list key.
    RedisList(&'a str),
}

impl DeadLetterSpec {
    /// The one configured target; `None` when zero or both are set.
    pub fn get(&self) -> Option<DeadLetter<'_>> {
        match (&self.kafka_topic, &self.redis_list) {
            (Some(t), None) => Some(DeadLetter::KafkaTopic(t)),
            (None, Some(l)) => Some(DeadLetter::RedisList(l)),
            _ => None,
        }
    }
}

impl QueueProcessorSpec {
    /// Every Secret key this QueueProcessor references (Redis and Kafka credentials and TLS
    /// material), for mounting into workers and for watching.
    pub fn secret_refs(&self) -> Vec<&SecretKeyRef> {
        let mut refs: Vec<&SecretKeyRef> = Vec::new();
        refs.extend(self.redis.username_secret_ref.iter());
        refs.extend(self.redis.password_secret_ref.iter());
        if let Some(kafka) = &self.source.kafka {
            if let Some(sasl) = &kafka.sasl {
                refs.push(&sasl.username_secret_ref);
                refs.push(&sasl.password_secret_ref);
            }
            if let Some(tls) = &kafka.tls {
                refs.extend(tls.ca_secret_ref.iter());
                refs.extend(tls.client_cert_secret_ref.iter());
                refs.extend(tls.client_key_secret_ref.iter());
            }
        }
        refs
    }
}

/// The Redis key prefix of a QueueProcessor, `qp:{<namespace>/<name>}`. The braces are a Redis
/// Cluster hash tag: every key of one QueueProcessor lands in the same slot, so one Lua script
/// can touch all of them.
pub fn redis_key_prefix(namespace: &str, name: &str) -> String {
    format!("qp:{{{namespace}/{name}}}")
}

impl QueueProcessor {
    /// The namespace, `default` when unset (a YAML file read by local mode).
    pub fn namespace_or_default(&self) -> String {
        self.namespace().unwrap_or_else(|| "default".to_string())
    }

    /// `qp:{<namespace>/<name>}`: the prefix (and hash tag) of every Redis key of this
    /// QueueProcessor. See [`redis_key_prefix`].
    pub fn redis_key_prefix(&self) -> String {
        redis_key_prefix(&self.namespace_or_default(), &self.name_any())
    }

    /// `qp:{<namespace>/<name>}:<suffix>`, for example `redis_key("limit")`.
    pub fn redis_key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.redis_key_prefix())
    }

    /// True when processing is paused, by `spec.paused` or by the annotation
    /// `queueprocessing.dev/paused: "true"` ([`PAUSED_ANNOTATION`]).
    pub fn is_paused(&self) -> bool {
        self.spec.paused
            || self
                .annotations()
                .get(PAUSED_ANNOTATION)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    /// Parse a QueueProcessor manifest the way the API server would admit it: unknown fields are
    /// errors, omitted fields get the schema defaults, and [`QueueProcessorSpec::validate`]
    /// applies the ranges and cross-field rules. For objects that never pass through an API
    /// server (local mode).
    pub fn from_yaml(text: &str) -> Result<QueueProcessor, SpecError> {
        let input: serde_json::Value = serde_yaml::from_str(text).map_err(SpecError::Parse)?;
        let api_version = input.get("apiVersion").and_then(|v| v.as_str());
        let kind = input.get("kind").and_then(|v| v.as_str());
        if api_version != Some(API_VERSION) || kind != Some(KIND) {
            return Err(SpecError::WrongKind {
                api_version: api_version.unwrap_or_default().to_string(),
                kind: kind.unwrap_or_default().to_string(),
            });
        }
        let qp: QueueProcessor = serde_yaml::from_str(text).map_err(SpecError::Parse)?;
        let round_trip = serde_json::to_value(&qp).expect("a QueueProcessor serializes to JSON");
        let mut unknown = Vec::new();
        unknown_fields(&input, &round_trip, "", &mut unknown);
        if !unknown.is_empty() {
            return Err(SpecError::UnknownFields(unknown));
        }
        qp.spec.validate()?;
        Ok(qp)
    }
}

/// Collect the paths of object keys that are in `input` but did not survive a round trip
/// through the Rust types (`output`): those are fields the schema does not know.
fn unknown_fields(
    input: &serde_json::Value,
    output: &serde_json::Value,
    path: &str,
    unknown: &mut Vec<String>,
) {
    use serde_json::Value;
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    Some(ov) => unknown_fields(v, ov, &p, unknown),
                    None if v.is_null() => {}
                    None => unknown.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (iv, ov)) in i.iter().zip(o).enumerate() {
                unknown_fields(iv, ov, &format!("{path}[{n}]"), unknown);
            }
        }
        _ => {}
    }
}

/// Why a QueueProcessor manifest was rejected by [`QueueProcessor::from_yaml`] or
/// [`QueueProcessorSpec::validate`].
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not YAML, or a field has the wrong type.
    #[error("invalid QueueProcessor manifest: {0}")]
    Parse(#[source] serde_yaml::Error),
    /// Not a `queueprocessing.dev/v1alpha1` `QueueProcessor`.
    #[error(
        "expected apiVersion {API_VERSION} and kind {KIND}, got apiVersion {api_version:?} and kind {kind:?}"
    )]
    WrongKind {
        /// The manifest's apiVersion.
        api_version: String,
        /// The manifest's kind.
        kind: String,
    },
    /// Fields the schema does not define (for example an inline `password`).
    #[error("unknown fields: {}", .0.join(", "))]
    UnknownFields(Vec<String>),
    /// Values out of range, or cross-field rules broken; one message per problem.
    #[error("invalid QueueProcessor: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// Accumulates validation failures with messages in the API server's style.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn rule(&mut self, ok: bool, rule: &CelRule) {
        if !ok {
            self.0.push(rule.message.to_string());
        }
    }
    fn range<T: PartialOrd + fmt::Display>(&mut self, path: &str, v: T, min: T, max: Option<T>) {
        if v < min {
            self.0.push(format!(
                "{path}: Invalid value: {v}: should be greater than or equal to {min}"
            ));
        }
        if let Some(max) = max
            && v > max
        {
            self.0.push(format!(
                "{path}: Invalid value: {v}: should be less than or equal to {max}"
            ));
        }
    }
    fn non_empty(&mut self, path: &str, s: &str) {
        if s.is_empty() {
            self.0.push(format!(
                "{path}: Invalid value: \"\": should be at least 1 chars long"
            ));
        }
    }
    fn prefix(&mut self, path: &str, s: &str, prefixes: &[&str]) {
        if !prefixes.iter().any(|p| s.starts_with(p)) {
            self.0.push(format!(
                "{path}: Invalid value: {s:?}: should start with {}",
                prefixes.join(" or ")
            ));
        }
    }
}

impl QueueProcessorSpec {
    /// Check the ranges and cross-field rules the API server enforces through the schema and
    /// its CEL rules, with the same messages. (The API server additionally checks string
    /// patterns such as Secret names and topic characters.)
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut p = Problems::default();

        // spec.source
        p.rule(self.source.get().is_some(), &SOURCE_RULES[0]);
        if let Some(k) = &self.source.kafka {
            p.non_empty("spec.source.kafka.bootstrapServers", &k.bootstrap_servers);
            p.non_empty("spec.source.kafka.topic", &k.topic);
            p.non_empty("spec.source.kafka.consumerGroup", &k.consumer_group);
            p.range(
                "spec.source.kafka.maxInFlightPerPartition",
                k.max_in_flight_per_partition,
                1,
                Some(MAX_IN_FLIGHT_PER_PARTITION),
            );
            if let Some(tls) = &k.tls {
                p.rule(
                    tls.client_cert_secret_ref.is_some() == tls.client_key_secret_ref.is_some(),
                    &KAFKA_TLS_RULES[0],
                );
            }
        }
        if let Some(r) = &self.source.redis_list {
            p.non_empty("spec.source.redisList.key", &r.key);
            p.range(
                "spec.source.redisList.reclaimAfterSeconds",
                r.reclaim_after_seconds,
                1,
                Some(MAX_LEASE_SECONDS),
            );
        }

        // spec.redis
        let redis = &self.redis;
        p.rule(redis.endpoint().is_some(), &REDIS_RULES[0]);
        if let Some(url) = &redis.url {
            p.prefix("spec.redis.url", url, &["redis://", "rediss://"]);
            p.rule(!url.contains('@'), &REDIS_RULES[1]);
        }
        if let Some(nodes) = &redis.cluster_nodes {
            if nodes.is_empty() || nodes.len() > MAX_CLUSTER_NODES {
                p.0.push(format!(
                    "spec.redis.clusterNodes: must have between 1 and {MAX_CLUSTER_NODES} items"
                ));
            }
            for (i, n) in nodes.iter().enumerate() {
                p.non_empty(&format!("spec.redis.clusterNodes[{i}]"), n);
            }
            p.rule(nodes.iter().all(|n| !n.contains('@')), &REDIS_RULES[2]);
        }

        // spec.concurrency
        let c = &self.concurrency;
        p.range(
            "spec.concurrency.perReplicaTokens",
            c.per_replica_tokens,
            1,
            Some(MAX_TOKENS_PER_REPLICA),
        );
        p.range(
            "spec.concurrency.globalMaxTokens",
            c.global_max_tokens,
            1,
            Some(MAX_GLOBAL_TOKENS),
        );
        p.range(
            "spec.concurrency.leaseSeconds",
            c.lease_seconds,
            MIN_LEASE_SECONDS,
            Some(MAX_LEASE_SECONDS),
        );
        p.rule(
            c.per_replica_tokens <= c.global_max_tokens,
            &CONCURRENCY_RULES[0],
        );

        // spec.scaling
        let s = &self.scaling;
        p.range(
            "spec.scaling.minReplicas",
            s.min_replicas,
            0,
            Some(MAX_REPLICAS),
        );
        p.range(
            "spec.scaling.maxReplicas",
            s.max_replicas,
            1,
            Some(MAX_REPLICAS),
        );
        p.range(
            "spec.scaling.activationBacklog",
            s.activation_backlog,
            0,
            None,
        );
        p.range(
            "spec.scaling.targetBacklogPerReplica",
            s.target_backlog_per_replica,
            1,
            None,
        );
        p.range(
            "spec.scaling.targetDrainSeconds",
            s.target_drain_seconds,
            1,
            Some(MAX_WINDOW_SECONDS),
        );
        p.range(
            "spec.scaling.pollIntervalSeconds",
            s.poll_interval_seconds,
            1,
            Some(MAX_POLL_INTERVAL_SECONDS),
        );
        p.range(
            "spec.scaling.cooldownSeconds",
            s.cooldown_seconds,
            0,
            Some(MAX_WINDOW_SECONDS),
        );
        p.range(
            "spec.scaling.scaleDownStabilizationSeconds",
            s.scale_down_stabilization_seconds,
            0,
            Some(MAX_WINDOW_SECONDS),
        );
        p.range("spec.scaling.maxStep", s.max_step, 1, Some(MAX_REPLICAS));
        p.rule(s.min_replicas <= s.max_replicas, &SCALING_RULES[0]);

        // spec.worker
        let w = &self.worker;
        p.range(
            "spec.worker.shutdownTimeoutSeconds",
            w.shutdown_timeout_seconds,
            1,
            Some(MAX_TIMEOUT_SECONDS),
        );
        p.rule(w.handler.get().is_some(), &HANDLER_RULES[0]);
        if let Some(h) = &w.handler.http {
            p.prefix(
                "spec.worker.handler.http.url",
                &h.url,
                &["http://", "https://"],
            );
            p.range(
                "spec.worker.handler.http.timeoutSeconds",
                h.timeout_seconds,
                1,
                Some(MAX_TIMEOUT_SECONDS),
            );
        }
        if let Some(e) = &w.handler.exec {
            if e.command.is_empty() {
                p.0.push("spec.worker.handler.exec.command: should have at least 1 items".into());
            }
            p.range(
                "spec.worker.handler.exec.timeoutSeconds",
                e.timeout_seconds,
                1,
                Some(MAX_TIMEOUT_SECONDS),
            );
        }
        if let Some(b) = &w.handler.builtin {
            if let Some(ms) = b.sleep_millis {
                p.range(
                    "spec.worker.handler.builtin.sleepMillis",
                    ms,
                    0,
                    Some(MAX_SLEEP_MILLIS),
                );
            }
            p.rule(
                b.sleep_millis.is_none() || b.name == BuiltinName::Sleep,
                &BUILTIN_RULES[0],
            );
            p.rule(
                b.fail_pattern.is_none() || b.name == BuiltinName::Fail,
                &BUILTIN_RULES[1],
            );
        }

        // spec.results
        let r = &self.results;
        p.range(
            "spec.results.ttlSeconds",
            r.ttl_seconds,
            1,
            Some(MAX_RESULT_TTL_SECONDS),
        );
        p.range(
            "spec.results.maxRetries",
            r.max_retries,
            0,
            Some(MAX_RETRIES),
        );
        p.range(
            "spec.results.retryBackoffMillis",
            r.retry_backoff_millis,
            0,
            Some(MAX_BACKOFF_MILLIS),
        );
        if let Some(dl) = &r.dead_letter {
            p.rule(dl.get().is_some(), &DEAD_LETTER_RULES[0]);
            if let Some(topic) = &dl.kafka_topic {
                p.rule(self.source.kafka.is_some(), &SPEC_RULES[0]);
                if let Some(k) = &self.source.kafka {
                    p.rule(*topic != k.topic, &SPEC_RULES[1]);
                }
            }
            if let (Some(list), Some(src)) = (&dl.redis_list, &self.source.redis_list) {
                p.rule(*list != src.key, &SPEC_RULES[2]);
            }
        }

        // spec.gateway
        p.range(
            "spec.gateway.replicas",
            self.gateway.replicas,
            1,
            Some(MAX_GATEWAY_REPLICAS),
        );

        if p.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError::Invalid(p.0))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The CustomResourceDefinition

/// The CustomResourceDefinition of [`QueueProcessor`].
pub fn crd() -> CustomResourceDefinition {
    QueueProcessor::crd()
}

/// The CustomResourceDefinition as YAML, exactly as committed in `crds/queueprocessor.yaml`
/// (the `crdgen` binary prints this).
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("the CRD serializes to YAML");
    format!(
        "# Generated by `cargo run -p qp-operator --bin crdgen` from operator/src/crd.rs; do not edit.\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const MINIMAL: &str = r#"
apiVersion: queueprocessing.dev/v1alpha1
kind: QueueProcessor
metadata:
  name: orders
  namespace: shop
spec:
  source:
    kafka:
      bootstrapServers: kafka:9092
      topic: orders
      consumerGroup: orders-workers
  redis:
    url: redis://redis:6379
  worker:
    handler:
      builtin:
        name: echo
"#;

    fn schema() -> Value {
        serde_json::to_value(
            crd().spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap()
    }

    fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
        path.iter().fold(v, |v, k| &v[*k])
    }

    fn spec_props() -> Value {
        at(&schema(), &["properties", "spec", "properties"]).clone()
    }

    #[test]
    fn minimal_spec_gets_every_default() {
        let qp = QueueProcessor::from_yaml(MINIMAL).unwrap();
        let s = &qp.spec;
        assert!(!s.paused);
        let k = s.source.kafka.as_ref().unwrap();
        assert_eq!(k.auto_offset_reset, OffsetReset::Earliest);
        assert_eq!(k.max_in_flight_per_partition, 1000);
        assert!(k.sasl.is_none() && k.tls.is_none());
        assert!(!s.redis.tls);
        assert_eq!(
            s.concurrency,
            ConcurrencySpec {
                per_replica_tokens: 8,
                global_max_tokens: 64,
                lease_seconds: 30
            }
        );
        assert_eq!(
            s.scaling,
            ScalingSpec {
                min_replicas: 1,
                max_replicas: 10,
                activation_backlog: 0,
                target_backlog_per_replica: 100,
                target_drain_seconds: 30,
                poll_interval_seconds: 2,
                cooldown_seconds: 300,
                scale_down_stabilization_seconds: 60,
                max_step: 10,
            }
        );
        assert_eq!(s.worker.shutdown_timeout_seconds, 30);
        assert!(s.worker.image.is_none());
        assert_eq!(
            s.results,
            ResultsSpec {
                ttl_seconds: 3600,
                max_retries: 3,
                retry_backoff_millis: 200,
                dead_letter: None
            }
        );
        assert_eq!(
            s.gateway,
            GatewaySpec {
                enabled: false,
                replicas: 1
            }
        );
    }

    #[test]
    fn schema_defaults_match_serde_defaults() {
        // What the API server fills in must equal what serde fills in.
        let props = spec_props();
        assert_eq!(props["paused"]["default"], json!(false));
        assert_eq!(
            props["concurrency"]["default"],
            serde_json::to_value(ConcurrencySpec::default()).unwrap()
        );
        assert_eq!(
            props["scaling"]["default"],
            serde_json::to_value(ScalingSpec::default()).unwrap()
        );
        assert_eq!(
            props["results"]["default"],
            serde_json::to_value(ResultsSpec::default()).unwrap()
        );
        assert_eq!(
            props["gateway"]["default"],
            serde_json::to_value(GatewaySpec::default()).unwrap()
        );
        // Field-level defaults inside the sections, used when a section is partly given.
        assert_eq!(
            props["scaling"]["properties"]["maxReplicas"]["default"],
            json!(10)
        );
        assert_eq!(
            props["concurrency"]["properties"]["leaseSeconds"]["default"],
            json!(30)
        );
        let kafka = at(&props, &["source", "properties", "kafka", "properties"]);
        assert_eq!(kafka["autoOffsetReset"]["default"], json!("earliest"));
        assert_eq!(kafka["maxInFlightPerPartition"]["default"], json!(1000));
        let handler = at(&props, &["worker", "properties", "handler", "properties"]);
        assert_eq!(
            handler["http"]["properties"]["timeoutSeconds"]["default"],
            json!(30)
        );
        assert_eq!(
            at(
                &props,
                &["worker", "properties", "shutdownTimeoutSeconds", "default"]
            ),
            &json!(30)
        );
        assert_eq!(
            at(
                &props,
                &[
                    "source",
                    "properties",
                    "redisList",
                    "properties",
                    "reclaimAfterSeconds",
                    "default"
                ]
            ),
            &json!(30)
        );
        assert_eq!(props["redis"]["properties"]["tls"]["default"], json!(false));
        // No noisy defaults for empty lists and maps.
        assert!(
            props["worker"]["properties"]["env"]
                .get("default")
                .is_none()
        );
        assert!(
            props["worker"]["properties"]["nodeSelector"]
                .get("default")
                .is_none()
        );
    }

    #[test]
    fn partial_section_is_completed_with_field_defaults() {
        let yaml = MINIMAL.replace("  worker:\n", "  scaling:\n    maxReplicas: 4\n  worker:\n");
        let qp = QueueProcessor::from_yaml(&yaml).unwrap();
        assert_eq!(qp.spec.scaling.max_replicas, 4);
        assert_eq!(qp.spec.scaling.min_replicas, 1);
        assert_eq!(qp.spec.scaling.poll_interval_seconds, 2);
    }

    #[test]
    fn yaml_round_trip_is_lossless() {
        let full = r#"
apiVersion: queueprocessing.dev/v1alpha1
kind: QueueProcessor
metadata:
  name: orders
  namespace: shop
  annotations:
    queueprocessing.dev/paused: "true"
spec:
  paused: false
  source:
    kafka:
      bootstrapServers: kafka-0:9092,kafka-1:9092
      topic: orders
      consumerGroup: orders-workers
      autoOffsetReset: latest
      maxInFlightPerPartition: 500
      sasl:
        mechanism: SCRAM-SHA-512
        usernameSecretRef: {name: kafka-user, key: username}
        passwordSecretRef: {name: kafka-user, key: password}
      tls:
        caSecretRef: {name: kafka-ca, key: ca.crt}
  redis:
    clusterNodes: ["redis-0:6379", "redis-1:6379"]
    tls: true
    passwordSecretRef: {name: redis, key: password}
  concurrency:
    perReplicaTokens: 6
    globalMaxTokens: 10
    leaseSeconds: 15
  scaling:
    minReplicas: 0
    maxReplicas: 12
    activationBacklog: 5
    targetBacklogPerReplica: 1000
    targetDrainSeconds: 60
    pollIntervalSeconds: 1
    cooldownSeconds: 120
    scaleDownStabilizationSeconds: 30
    maxStep: 4
  worker:
    image: example.com/qp-worker:1.2.3
    imagePullPolicy: IfNotPresent
    handler:
      http:
        url: http://127.0.0.1:8080/handle
        timeoutSeconds: 5
    shutdownTimeoutSeconds: 20
    resources:
      requests: {cpu: 250m, memory: 128Mi}
      limits: {memory: 256Mi}
    env:
    - name: RUST_LOG
      value: info
    extraContainers:
    - name: handler
      image: example.com/handler:2
      ports:
      - containerPort: 8080
    nodeSelector:
      pool: workers
    tolerations:
    - key: dedicated
      operator: Equal
      value: queue
      effect: NoSchedule
    serviceAccountName: orders-worker
    imagePullSecrets:
    - name: registry
    podLabels:
      team: shop
    podAnnotations:
      example.com/owner: shop
  results:
    ttlSeconds: 600
    maxRetries: 5
    retryBackoffMillis: 100
    deadLetter:
      kafkaTopic: orders-dead
  gateway:
    enabled: true
    replicas: 2
"#;
        let qp = QueueProcessor::from_yaml(full).unwrap();
        assert!(qp.is_paused(), "the annotation pauses");
        let out = serde_yaml::to_string(&qp).unwrap();
        let a: Value = serde_yaml::from_str(full).unwrap();
        let b: Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(a, b, "YAML -> struct -> YAML changed the object:\n{out}");
        let again: QueueProcessor = serde_yaml::from_str(&out).unwrap();
        assert_eq!(again, qp);
    }

    #[test]
    fn status_round_trip_and_conditions() {
        let mut st = QueueProcessorStatus {
            observed_generation: Some(3),
            replicas: Some(3),
            desired_replicas: Some(4),
            ready_replicas: Some(2),
            backlog: Some(1234),
            partitions: Some(6),
            tokens: Some(TokenStatus {
                limit: 16,
                in_use: 5,
            }),
            throughput: Some(ThroughputStatus {
                arrival_per_second: 10.5,
                processed_per_second: 9.0,
                failed_per_second: 0.0,
                per_replica_per_second: Some(4.5),
            }),
            last_scale_reason: Some("backlog".into()),
            ..Default::default()
        };
        let t0 = Time("2025-01-01T00:00:00Z".parse().unwrap());
        let t1 = Time("2025-01-01T00:01:00Z".parse().unwrap());
        assert!(st.set_condition(
            CONDITION_READY,
            ConditionStatus::False,
            "Scaling",
            "starting",
            Some(3),
            t0.clone()
        ));
        // Same status: message changes, transition time stays.
        assert!(st.set_condition(
            CONDITION_READY,
            false.into(),
            "Scaling",
            "still starting",
            Some(3),
            t1.clone()
        ));
        assert_eq!(
            st.condition(CONDITION_READY).unwrap().last_transition_time,
            t0
        );
        assert!(!st.set_condition(
            CONDITION_READY,
            false.into(),
            "Scaling",
            "still starting",
            Some(3),
            t1.clone()
        ));
        // Status flips: transition time moves.
        assert!(st.set_condition(
            CONDITION_READY,
            ConditionStatus::True,
            "Processing",
            "ok",
            Some(3),
            t1.clone()
        ));
        let ready = st.condition(CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time.clone()),
            ("True", t1)
        );
        assert!(st.is_condition_true(CONDITION_READY));
        assert!(!st.is_condition_true(CONDITION_SCALING));

        let spec = QueueProcessor::from_yaml(MINIMAL).unwrap().spec;
        st.refresh_summary(&spec);
        assert_eq!(
            st.summary,
            Some(StatusSummary {
                source: "kafka:orders".into(),
                replicas: "2/4".into(),
                tokens: "5/16".into()
            })
        );
        let yaml = serde_yaml::to_string(&st).unwrap();
        let back: QueueProcessorStatus = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(back, st);
        assert!(
            yaml.contains("lastTransitionTime: 2025-01-01T00:01:00Z"),
            "{yaml}"
        );
    }

    #[test]
    fn schema_contains_every_cel_rule_where_it_belongs() {
        let s = schema();
        let spec = at(&s, &["properties", "spec"]);
        let p = |path: &[&str]| {
            let mut v = spec;
            for k in path {
                v = &v["properties"][*k];
            }
            v.clone()
        };
        let places: &[(&[&str], &[CelRule])] = &[
            (&[], SPEC_RULES),
            (&["source"], SOURCE_RULES),
            (&["source", "kafka", "tls"], KAFKA_TLS_RULES),
            (&["redis"], REDIS_RULES),
            (&["concurrency"], CONCURRENCY_RULES),
            (&["scaling"], SCALING_RULES),
            (&["worker", "handler"], HANDLER_RULES),
            (&["worker", "handler", "builtin"], BUILTIN_RULES),
            (&["results", "deadLetter"], DEAD_LETTER_RULES),
        ];
        let mut count = 0;
        for (path, rules) in places {
            let node = p(path);
            let got = node["x-kubernetes-validations"]
                .as_array()
                .unwrap_or_else(|| {
                    panic!("no x-kubernetes-validations at spec.{}", path.join("."))
                });
            assert_eq!(got.len(), rules.len(), "at spec.{}", path.join("."));
            for (g, r) in got.iter().zip(rules.iter()) {
                assert_eq!(g["rule"], json!(r.rule));
                assert_eq!(g["message"], json!(r.message));
                assert!(r.message.starts_with("spec."), "messages name the field");
                match r.field_path {
                    Some(fp) => assert_eq!(g["fieldPath"], json!(fp)),
                    None => assert!(g.get("fieldPath").is_none()),
                }
                count += 1;
            }
        }
        assert_eq!(count, ALL_CEL_RULES.iter().map(|r| r.len()).sum::<usize>());
    }

    #[test]
    fn schema_has_ranges_enums_and_no_open_objects() {
        let props = spec_props();
        let scaling = &props["scaling"]["properties"];
        assert_eq!(scaling["minReplicas"]["minimum"].as_f64(), Some(0.0));
        assert_eq!(
            scaling["maxReplicas"]["maximum"].as_f64(),
            Some(f64::from(MAX_REPLICAS))
        );
        assert_eq!(
            props["concurrency"]["properties"]["leaseSeconds"]["minimum"].as_f64(),
            Some(f64::from(MIN_LEASE_SECONDS))
        );
        let sasl = at(
            &props,
            &[
                "source",
                "properties",
                "kafka",
                "properties",
                "sasl",
                "properties",
            ],
        );
        assert_eq!(
            sasl["mechanism"]["enum"],
            json!(["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
        );
        let builtin = at(
            &props,
            &[
                "worker",
                "properties",
                "handler",
                "properties",
                "builtin",
                "properties",
            ],
        );
        assert_eq!(builtin["name"]["enum"], json!(["echo", "sleep", "fail"]));
        assert_eq!(
            props["redis"]["properties"]["clusterNodes"]["items"]["minLength"],
            json!(1)
        );
        // Unknown fields are pruned/rejected everywhere our own types are concerned.
        let text = serde_json::to_string(&spec_props()).unwrap();
        assert!(!text.contains("x-kubernetes-preserve-unknown-fields"));
        // Conditions merge by type under server-side apply.
        let conds = at(
            &schema(),
            &["properties", "status", "properties", "conditions"],
        )
        .clone();
        assert_eq!(conds["x-kubernetes-list-type"], json!("map"));
        assert_eq!(conds["x-kubernetes-list-map-keys"], json!(["type"]));
    }

    #[test]
    fn crd_metadata() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("queueprocessors.queueprocessing.dev")
        );
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, KIND);
        assert_eq!(crd.spec.names.plural, "queueprocessors");
        assert_eq!(crd.spec.names.short_names, Some(vec!["qp".to_string()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, VERSION);
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<&str> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            cols,
            ["Source", "Replicas", "Backlog", "Tokens", "Status", "Age"]
        );
        assert!(crd_yaml().starts_with("# Generated by"));
    }

    #[test]
    fn every_field_has_a_description() {
        fn walk(v: &Value, path: &str, missing: &mut Vec<String>, ragged: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, p) in props {
                    let here = format!("{path}.{k}");
                    match p.get("description").and_then(|d| d.as_str()) {
                        None => missing.push(here.clone()),
                        Some(d) if d.replace("\n\n", "").contains('\n') => {
                            ragged.push(here.clone())
                        }
                        Some(_) => {}
                    }
                    walk(p, &here, missing, ragged);
                }
            }
            if let Some(items) = v.get("items") {
                walk(items, &format!("{path}[]"), missing, ragged);
            }
        }
        let (mut missing, mut ragged) = (Vec::new(), Vec::new());
        let s = schema();
        walk(&s["properties"]["spec"], "spec", &mut missing, &mut ragged);
        walk(
            &s["properties"]["status"],
            "status",
            &mut missing,
            &mut ragged,
        );
        // k8s-openapi types (containers, env, tolerations) carry upstream descriptions, with a
        // few upstream gaps we do not control.
        let ours = |m: &String| {
            !(m.starts_with("spec.worker.extraContainers[].")
                || m.starts_with("spec.worker.env[].")
                || m.starts_with("spec.worker.resources.")
                || m.starts_with("spec.worker.tolerations[].")
                || m.starts_with("spec.worker.imagePullSecrets[].")
                || m.starts_with("status.conditions[]."))
        };
        missing.retain(ours);
        ragged.retain(ours);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
        // Paragraphs are single lines, so `kubectl explain` can wrap them.
        assert!(
            ragged.is_empty(),
            "descriptions with hard line breaks: {ragged:?}"
        );
    }

    #[test]
    fn helpers() {
        let mut qp = QueueProcessor::from_yaml(MINIMAL).unwrap();
        assert_eq!(qp.redis_key_prefix(), "qp:{shop/orders}");
        assert_eq!(qp.redis_key("limit"), "qp:{shop/orders}:limit");
        assert!(!qp.is_paused());
        qp.metadata
            .annotations
            .get_or_insert_default()
            .insert(PAUSED_ANNOTATION.into(), "true".into());
        assert!(qp.is_paused());
        qp.metadata.annotations = None;
        qp.spec.paused = true;
        assert!(qp.is_paused());
        qp.metadata.namespace = None;
        assert_eq!(qp.redis_key_prefix(), "qp:{default/orders}");

        assert!(matches!(qp.spec.source.get(), Some(Source::Kafka(k)) if k.topic == "orders"));
        assert_eq!(
            qp.spec.redis.endpoint(),
            Some(RedisEndpoint::Url("redis://redis:6379"))
        );
        assert!(matches!(
            qp.spec.worker.handler.get(),
            Some(Handler::Builtin(b)) if b.name == BuiltinName::Echo && b.sleep_millis() == 100
        ));
        assert!(qp.spec.secret_refs().is_empty());

        let c = ConcurrencySpec::default();
        assert_eq!(c.token_limit(0), 0);
        assert_eq!(c.token_limit(3), 24);
        assert_eq!(c.token_limit(100), 64);
    }

    #[test]
    fn from_yaml_rejects_what_the_api_server_rejects() {
        let bad = |from: &str, to: &str| {
            let y = MINIMAL.replace(from, to);
            assert_ne!(y, MINIMAL, "replacement {from:?} did not apply");
            QueueProcessor::from_yaml(&y).unwrap_err().to_string()
        };
        let e = bad(
            "    url: redis://redis:6379\n",
            "    url: redis://redis:6379\n    password: hunter2\n",
        );
        assert!(e.contains("spec.redis.password"), "{e}");
        let e = bad(
            "  worker:\n",
            "  scaling:\n    minReplicas: 5\n    maxReplicas: 2\n  worker:\n",
        );
        assert!(e.contains(SCALING_RULES[0].message), "{e}");
        let e = bad("      topic: orders\n", "");
        assert!(e.contains("topic"), "{e}");
        let e = bad("kind: QueueProcessor", "kind: Deployment");
        assert!(e.contains("expected apiVersion"), "{e}");
    }

    /// The repository's example manifests pass, and every invalid manifest under
    /// `tests/manifests/invalid` is rejected without an API server too (keeps `validate` in step
    /// with the schema; the API server test checks the real messages).
    #[test]
    fn repository_manifests() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut examples = 0;
        for entry in std::fs::read_dir(root.join("examples")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                for doc in text.split("\n---") {
                    let v: Value = serde_yaml::from_str(doc).unwrap_or(Value::Null);
                    if v["kind"] == json!(KIND) {
                        QueueProcessor::from_yaml(doc)
                            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        examples += 1;
                    }
                }
            }
        }
        assert!(
            examples >= 2,
            "examples/ should hold at least two QueueProcessors"
        );

        let mut invalid = 0;
        for entry in std::fs::read_dir(root.join("tests/manifests/invalid")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    text.starts_with("# expect: "),
                    "{} must start with `# expect: <message>`",
                    path.display()
                );
                if QueueProcessor::from_yaml(&text).is_ok() {
                    panic!("{} is accepted by from_yaml", path.display());
                }
                invalid += 1;
            }
        }
        assert!(invalid >= 14, "only {invalid} invalid manifests");
    }
}
