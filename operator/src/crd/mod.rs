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

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod redis;
mod results;
mod scaling;
mod schema;
mod signals;
mod source;
mod status;
mod validate;
mod worker;

#[cfg(test)]
mod tests;

pub use redis::{RedisEndpoint, RedisSpec};
pub use results::{
    DeadLetter, DeadLetterSpec, GatewayAuthSpec, GatewayMtlsSpec, GatewaySpec, ResultsSpec,
};
pub use scaling::{ConcurrencySpec, ScalingSpec};
pub use schema::{ALL_CEL_RULES, CelRule};
pub use signals::{MAX_SIGNALS, SignalKind, SignalSpec};
pub use source::{
    KafkaSasl, KafkaSource, KafkaTls, OffsetReset, RedisListSource, RedisStreamSource,
    SaslMechanism, Source, SourceSpec,
};
pub use status::{
    CONDITION_READY, CONDITION_SCALING, CONDITION_SOURCE_REACHABLE, ConditionStatus,
    QueueProcessorStatus, Recommendation, ScalingMemory, SignalStatus, StatusSummary,
    ThroughputStatus, TokenStatus,
};
pub use validate::SpecError;
pub use worker::{
    BuiltinHandler, BuiltinName, ExecHandler, Handler, HandlerSpec, HttpHandler, HttpHeader,
    PullPolicy, WorkerSpec,
};

use schema::{spec_rules, tidy_docs};

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
        name = "Signal",
        type_ = "string",
        json_path = ".status.summary.dominant",
        description = "What wants the most replicas: backlog, or a scaling signal and its value",
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

impl QueueProcessorSpec {
    /// Every Secret key this QueueProcessor references (Redis and Kafka credentials and TLS
    /// material), for mounting into workers and for watching.
    pub fn secret_refs(&self) -> Vec<&SecretKeyRef> {
        let mut refs: Vec<&SecretKeyRef> = Vec::new();
        refs.extend(self.redis.username_secret_ref.iter());
        refs.extend(self.redis.password_secret_ref.iter());
        refs.extend(self.redis.ca_secret_ref.iter());
        for r in self.scaling.signals.iter().filter_map(|s| s.redis.as_ref()) {
            refs.extend(r.username_secret_ref.iter());
            refs.extend(r.password_secret_ref.iter());
            refs.extend(r.ca_secret_ref.iter());
        }
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
        if self.gateway.enabled {
            refs.extend(self.gateway.auth.tokens_secret_ref.iter());
            if let Some(m) = &self.gateway.auth.mtls {
                refs.extend([
                    &m.cert_secret_ref,
                    &m.key_secret_ref,
                    &m.client_ca_secret_ref,
                ]);
            }
        }
        if let Some(http) = &self.worker.handler.http {
            refs.extend(
                http.headers
                    .iter()
                    .filter_map(|h| h.secret_key_ref.as_ref()),
            );
        }
        refs
    }
}

impl QueueProcessor {
    /// The namespace, `default` when unset (a YAML file read by local mode).
    pub fn namespace_or_default(&self) -> String {
        self.namespace().unwrap_or_else(|| "default".to_string())
    }

    /// The names of this QueueProcessor's Redis keys (`qp:{<namespace>/<name>}:...`, one hash
    /// tag), as the workers use them.
    pub fn keys(&self) -> qp_protocol::keys::Keys {
        qp_protocol::keys::Keys::new(&self.namespace_or_default(), &self.name_any())
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
        "# Generated by `cargo run -p qp-operator --bin crdgen` from operator/src/crd/; do not edit.\n{body}"
    )
}
