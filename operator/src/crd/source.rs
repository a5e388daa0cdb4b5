//! `spec.source`: where messages come from, a Kafka topic (with SASL and TLS settings) or a
//! Redis list.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;
use super::schema::{
    MAX_IN_FLIGHT_PER_PARTITION, MAX_LEASE_SECONDS, kafka_tls_rules, source_rules, tidy_docs,
};
// Only named by a doc link.
#[cfg(doc)]
use super::QueueProcessorSpec;

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

    /// Consume a Redis stream through a consumer group (made at the stream's start if
    /// missing): entries are acknowledged (`XACK`) once their result is durable, and entries of
    /// a worker that died are taken over by another after `claimIdleSeconds` (`XAUTOCLAIM`).
    /// Scaled on the group's lag plus its pending entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_stream: Option<RedisStreamSource>,
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

    /// How long the group waits for a worker that stopped answering (killed, or its node gone)
    /// before its partitions go to the others: the stream of those partitions stalls this
    /// long. Lower means shorter stalls and more sensitivity to pauses; the broker only accepts
    /// values within its `group.min.session.timeout.ms` (6000 by default) and
    /// `group.max.session.timeout.ms`.
    #[serde(default = "default_session_timeout_millis")]
    #[schemars(range(min = 1000, max = 300_000))]
    pub session_timeout_millis: i32,

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

fn default_session_timeout_millis() -> i32 {
    qp_protocol::settings::defaults::KAFKA_SESSION_TIMEOUT_MS as i32
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

/// A Redis stream consumed by a consumer group, in the Redis given by `spec.redis`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct RedisStreamSource {
    /// Key of the stream. Producers add entries with fields `body` (required), `id` and
    /// `contentType` (`XADD key * id r-1 contentType application/json body '{...}'`).
    #[schemars(length(min = 1, max = 1024))]
    pub key: String,

    /// The consumer group the workers read as.
    #[schemars(length(min = 1, max = 256))]
    pub group: String,

    /// Seconds an entry delivered to a worker may go unacknowledged before another worker
    /// takes it over (the worker holding it keeps it fresh while it runs).
    #[serde(default = "default_reclaim_after_seconds")]
    #[schemars(range(min = 1, max = MAX_LEASE_SECONDS))]
    pub claim_idle_seconds: i32,

    /// Delete entries once the group has acknowledged them (`XTRIM MINID` up to the oldest
    /// entry still pending or not yet delivered), so the stream does not grow without end.
    /// Leave off when another consumer group reads the same stream.
    #[serde(default)]
    pub trim_acknowledged: bool,
}

/// The configured source, as an enum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Source<'a> {
    /// `spec.source.kafka`.
    Kafka(&'a KafkaSource),
    /// `spec.source.redisList`.
    RedisList(&'a RedisListSource),
    /// `spec.source.redisStream`.
    RedisStream(&'a RedisStreamSource),
}

impl SourceSpec {
    /// The one configured source; `None` when zero or two are set (which the API server and
    /// [`QueueProcessorSpec::validate`] reject).
    pub fn get(&self) -> Option<Source<'_>> {
        match (&self.kafka, &self.redis_list, &self.redis_stream) {
            (Some(k), None, None) => Some(Source::Kafka(k)),
            (None, Some(r), None) => Some(Source::RedisList(r)),
            (None, None, Some(s)) => Some(Source::RedisStream(s)),
            _ => None,
        }
    }

    /// `kafka:<topic>` or `redis:<key>` (the `Source` column of `kubectl get qp`).
    pub fn describe(&self) -> String {
        match self.get() {
            Some(Source::Kafka(k)) => format!("kafka:{}", k.topic),
            Some(Source::RedisList(r)) => format!("redis:{}", r.key),
            Some(Source::RedisStream(s)) => format!("stream:{}", s.key),
            None => "invalid".to_string(),
        }
    }
}
