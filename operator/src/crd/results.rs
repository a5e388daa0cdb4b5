//! `spec.results` (result retention, retries, dead letters) and `spec.gateway` (the HTTP
//! gateway that queues requests and serves their results).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;
use super::schema::{
    MAX_BACKOFF_MILLIS, MAX_GATEWAY_REPLICAS, MAX_RESULT_TTL_SECONDS, MAX_RETRIES,
    dead_letter_rules, gateway_rules, tidy_docs,
};

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

    /// A message started this many times without an outcome (each time its worker crashed,
    /// was OOM-killed or stopped while processing it) is marked failed and dead-lettered
    /// instead of being run again. 0 means never.
    #[schemars(range(min = 0, max = MAX_RETRIES))]
    pub max_deliveries: i32,

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
            max_deliveries: 5,
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
#[schemars(transform = gateway_rules)]
#[schemars(transform = tidy_docs)]
pub struct GatewaySpec {
    /// Run the gateway (a Deployment and a Service named `<name>-gateway`).
    pub enabled: bool,

    /// Gateway replicas (when enabled). The gateway is stateless.
    #[schemars(range(min = 1, max = MAX_GATEWAY_REPLICAS))]
    pub replicas: i32,

    /// Who may call the gateway. Required when it is enabled: a tokens Secret, or
    /// `disabled: true` to serve without authentication.
    pub auth: GatewayAuthSpec,

    /// Requests per second each client may make, per gateway replica, with bursts of as many;
    /// above it the gateway answers 429 with Retry-After. 0: no limit.
    #[schemars(range(min = 0, max = 1_000_000))]
    pub rate_limit_per_client: i32,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            enabled: false,
            replicas: 1,
            auth: GatewayAuthSpec::default(),
            rate_limit_per_client: 0,
        }
    }
}

/// Gateway authentication: bearer tokens per client. A client reads only the results of
/// requests it submitted; other ids answer 404 like unknown ones.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = tidy_docs)]
pub struct GatewayAuthSpec {
    /// A Secret key holding one `<client>:<token>` per line (client names of [a-z0-9-], tokens
    /// of at least 32 characters, e.g. `openssl rand -hex 32`). Mounted into the gateway pods
    /// and re-read when it changes, so tokens rotate without a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_secret_ref: Option<SecretKeyRef>,

    /// Serve without authentication: anyone who reaches the Service may submit and read any
    /// result. Only where a network policy or mesh alone decides who that is.
    pub disabled: bool,

    /// Mutual TLS for in-mesh callers, instead of tokens: the API is served over TLS (Service
    /// port 443) and every caller presents a certificate signed by the client CA; its subject
    /// common name is the client's name ([a-z0-9-]). The probes and /metrics stay plain HTTP
    /// on the metrics port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<GatewayMtlsSpec>,
}

/// The gateway's TLS material, from Secrets (mounted as files).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct GatewayMtlsSpec {
    /// Secret key holding the gateway's serving certificate (PEM, with its chain).
    pub cert_secret_ref: SecretKeyRef,
    /// Secret key holding the serving certificate's private key (PEM).
    pub key_secret_ref: SecretKeyRef,
    /// Secret key holding the CA (PEM) that client certificates must chain to.
    pub client_ca_secret_ref: SecretKeyRef,
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
