//! Command line of `qp-worker`. Every flag has an environment fallback, because in Kubernetes the
//! operator configures workers through the Deployment's env (secrets via `secretKeyRef`, so they
//! never appear in the pod spec or in `ps`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::handler::HandlerSpec;
use crate::keys::Keys;
use crate::redis_conn::RedisSettings;
use crate::{Error, Result};

#[derive(Debug, Parser)]
#[command(
    name = "qp-worker",
    version,
    about = "Token-gated, at-least-once queue consumer for QueueProcessor workloads",
    long_about = "Consumes a Kafka topic (consumer group) or a Redis list, takes a token from the \
                  QueueProcessor's global pool in Redis before each message, runs the handler, \
                  and stores the result in Redis for clients to poll. `gateway` serves the HTTP \
                  intake and poll API instead."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume messages and run the handler (the worker Deployment runs this).
    Run(Box<RunArgs>),
    /// Accept requests over HTTP, queue them, and answer polls for their results.
    Gateway(Box<GatewayArgs>),
}

/// Settings shared by every mode: which QueueProcessor, which Redis, where to serve metrics.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Namespace of the QueueProcessor (part of every Redis key).
    #[arg(long, env = "QP_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Name of the QueueProcessor (part of every Redis key).
    #[arg(long, env = "QP_NAME")]
    pub name: String,
    /// Redis URL, e.g. redis://redis:6379 (rediss:// for TLS). Mutually exclusive with
    /// --redis-cluster-nodes.
    #[arg(long, env = "QP_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma separated URLs.
    #[arg(long, env = "QP_REDIS_CLUSTER_NODES")]
    pub redis_cluster_nodes: Option<String>,
    /// Redis password. Prefer the environment variable (from a Secret): flags show up in `ps`.
    #[arg(long, env = "QP_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Redis ACL user name (from a Secret); default user when unset.
    #[arg(long, env = "QP_REDIS_USERNAME", hide_env_values = true)]
    pub redis_username: Option<String>,
    /// Connect to Redis over TLS.
    #[arg(long, env = "QP_REDIS_TLS")]
    pub redis_tls: bool,
    /// Address for /metrics, /healthz and /readyz (the gateway serves its API here too).
    #[arg(long, env = "QP_LISTEN", default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,
    /// Log format.
    #[arg(long, env = "QP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    Kafka,
    RedisList,
}

/// Kafka connection settings (worker and gateway).
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma separated host:port.
    #[arg(long, env = "QP_KAFKA_BOOTSTRAP")]
    pub kafka_bootstrap: Option<String>,
    /// Topic to consume (worker) or produce to (gateway).
    #[arg(long, env = "QP_KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Consumer group.
    #[arg(long, env = "QP_KAFKA_GROUP")]
    pub kafka_group: Option<String>,
    /// SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512); enables SASL.
    #[arg(long, env = "QP_KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,
    /// SASL username (from a Secret).
    #[arg(long, env = "QP_KAFKA_USERNAME", hide_env_values = true)]
    pub kafka_username: Option<String>,
    /// SASL password (from a Secret).
    #[arg(long, env = "QP_KAFKA_PASSWORD", hide_env_values = true)]
    pub kafka_password: Option<String>,
    /// Use TLS to talk to the brokers.
    #[arg(long, env = "QP_KAFKA_TLS")]
    pub kafka_tls: bool,
    /// CA bundle (PEM file) for broker certificates.
    #[arg(long, env = "QP_KAFKA_CA_FILE")]
    pub kafka_ca_file: Option<String>,
    /// Client certificate (PEM file) for mutual TLS.
    #[arg(long, env = "QP_KAFKA_CERT_FILE")]
    pub kafka_cert_file: Option<String>,
    /// Client private key (PEM file) for mutual TLS.
    #[arg(long, env = "QP_KAFKA_KEY_FILE")]
    pub kafka_key_file: Option<String>,
}

impl KafkaArgs {
    /// librdkafka security properties derived from the flags.
    pub fn security_properties(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let protocol = match (self.kafka_sasl_mechanism.is_some(), self.kafka_tls) {
            (true, true) => "SASL_SSL",
            (true, false) => "SASL_PLAINTEXT",
            (false, true) => "SSL",
            (false, false) => "PLAINTEXT",
        };
        p.push(("security.protocol".into(), protocol.into()));
        if let Some(m) = &self.kafka_sasl_mechanism {
            p.push(("sasl.mechanism".into(), m.clone()));
            if let Some(u) = &self.kafka_username {
                p.push(("sasl.username".into(), u.clone()));
            }
            if let Some(pw) = &self.kafka_password {
                p.push(("sasl.password".into(), pw.clone()));
            }
        }
        if let Some(ca) = &self.kafka_ca_file {
            p.push(("ssl.ca.location".into(), ca.clone()));
        }
        if let Some(cert) = &self.kafka_cert_file {
            p.push(("ssl.certificate.location".into(), cert.clone()));
        }
        if let Some(key) = &self.kafka_key_file {
            p.push(("ssl.key.location".into(), key.clone()));
        }
        p
    }

    pub fn bootstrap(&self) -> Result<&str> {
        self.kafka_bootstrap
            .as_deref()
            .ok_or_else(|| Error::config("--kafka-bootstrap (QP_KAFKA_BOOTSTRAP) is required"))
    }

    pub fn topic(&self) -> Result<&str> {
        self.kafka_topic
            .as_deref()
            .ok_or_else(|| Error::config("--kafka-topic (QP_KAFKA_TOPIC) is required"))
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Where messages come from.
    #[arg(long, env = "QP_SOURCE", value_enum)]
    pub source: SourceKind,
    /// Redis list to consume (with --source redis-list). On Redis Cluster give it a hash tag,
    /// e.g. {orders}:queue.
    #[arg(long, env = "QP_LIST_KEY")]
    pub list_key: Option<String>,
    /// Handler: an http(s):// URL, exec:<command> [args], echo, sleep:<ms>, fail:<pattern>,
    /// probe:<ms>.
    #[arg(long, env = "QP_HANDLER")]
    pub handler: HandlerSpec,
    /// Timeout of one handler call.
    #[arg(long, env = "QP_HANDLER_TIMEOUT_MS", default_value_t = 30_000)]
    pub handler_timeout_ms: u64,
    /// Messages this worker handles at once, at most. The global token pool decides how many
    /// it actually may.
    #[arg(long, env = "QP_MAX_CONCURRENCY", default_value_t = 16)]
    pub max_concurrency: usize,
    /// Lease time of a token: a crashed worker's tokens come back after this long.
    #[arg(long, env = "QP_LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// Do not take tokens (no global concurrency limit). For benchmarks and trusted handlers.
    #[arg(long, env = "QP_UNGATED")]
    pub ungated: bool,
    /// Retries after a retryable handler failure before the message is dead-lettered.
    #[arg(long, env = "QP_RETRIES", default_value_t = 3)]
    pub retries: u32,
    /// First retry delay; doubles per retry (with jitter), capped at 30 s.
    #[arg(long, env = "QP_RETRY_BACKOFF_MS", default_value_t = 200)]
    pub retry_backoff_ms: u64,
    /// How long results and request states stay in Redis.
    #[arg(long, env = "QP_RESULT_TTL_SECONDS", default_value_t = 3600)]
    pub result_ttl_seconds: u64,
    /// Dead-letter target: kafka:<topic> or redis:<list key>. Default: the QueueProcessor's
    /// dead-letter list in Redis.
    #[arg(long, env = "QP_DEAD_LETTER")]
    pub dead_letter: Option<String>,
    /// Largest accepted message; bigger ones are dead-lettered as oversized.
    #[arg(long, env = "QP_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
    /// Largest accepted handler result; bigger ones fail the message.
    #[arg(long, env = "QP_MAX_RESULT_BYTES", default_value_t = 1 << 20)]
    pub max_result_bytes: usize,
    /// Process messages with the same Kafka key one at a time, in offset order.
    #[arg(long, env = "QP_ORDERED_BY_KEY")]
    pub ordered_by_key: bool,
    /// On SIGTERM, how long running messages may take before the worker exits anyway.
    #[arg(long, env = "QP_DRAIN_TIMEOUT_SECONDS", default_value_t = 30)]
    pub drain_timeout_seconds: u64,
    /// This worker's identity (the pod name in Kubernetes).
    #[arg(long, env = "QP_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Pause a Kafka partition with this many fetched but unfinished messages.
    #[arg(long, env = "QP_MAX_PENDING_PER_PARTITION", default_value_t = 256)]
    pub max_pending_per_partition: usize,
    /// How often stored Kafka offsets are committed.
    #[arg(long, env = "QP_COMMIT_INTERVAL_MS", default_value_t = 1000)]
    pub commit_interval_ms: u64,
    /// Heartbeat period (token renewal, counters for the operator).
    #[arg(long, env = "QP_HEARTBEAT_MS", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// A Redis-list worker silent this long is considered dead; its messages are requeued.
    #[arg(long, env = "QP_DEAD_AFTER_MS", default_value_t = 15_000)]
    pub dead_after_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Where requests are queued.
    #[arg(long, env = "QP_SOURCE", value_enum)]
    pub source: SourceKind,
    /// Redis list to push to (with --source redis-list).
    #[arg(long, env = "QP_LIST_KEY")]
    pub list_key: Option<String>,
    /// Largest accepted request body.
    #[arg(long, env = "QP_MAX_REQUEST_BYTES", default_value_t = 1 << 20)]
    pub max_request_bytes: usize,
    /// Answer 429 when the backlog is above this many messages (0: never).
    #[arg(long, env = "QP_MAX_BACKLOG", default_value_t = 0)]
    pub max_backlog: u64,
    /// How long results and request states stay in Redis.
    #[arg(long, env = "QP_RESULT_TTL_SECONDS", default_value_t = 3600)]
    pub result_ttl_seconds: u64,
    /// Longest accepted ?wait= for long polls.
    #[arg(long, env = "QP_MAX_WAIT_SECONDS", default_value_t = 30)]
    pub max_wait_seconds: u64,
}

impl CommonArgs {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.namespace, &self.name)
    }

    pub fn redis(&self) -> Result<RedisSettings> {
        Ok(RedisSettings::from_parts(
            self.redis_url.as_deref(),
            self.redis_cluster_nodes.as_deref(),
            self.redis_password.clone(),
            self.redis_tls,
        )?
        .with_username(self.redis_username.clone()))
    }
}

impl RunArgs {
    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        })
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_seconds)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_minimal_run() {
        let cli = Cli::try_parse_from([
            "qp-worker",
            "run",
            "--name",
            "orders",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--source",
            "kafka",
            "--kafka-bootstrap",
            "127.0.0.1:9092",
            "--kafka-topic",
            "orders",
            "--handler",
            "echo",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("run expected")
        };
        assert_eq!(run.common.keys().prefix(), "qp:{default/orders}:");
        assert_eq!(run.handler, HandlerSpec::Echo);
        assert_eq!(run.max_concurrency, 16);
    }

    #[test]
    fn security_properties_follow_flags() {
        let k = KafkaArgs {
            kafka_bootstrap: None,
            kafka_topic: None,
            kafka_group: None,
            kafka_sasl_mechanism: Some("SCRAM-SHA-512".into()),
            kafka_username: Some("u".into()),
            kafka_password: Some("p".into()),
            kafka_tls: true,
            kafka_ca_file: None,
            kafka_cert_file: None,
            kafka_key_file: None,
        };
        let p = k.security_properties();
        assert!(p.contains(&("security.protocol".into(), "SASL_SSL".into())));
        assert!(p.contains(&("sasl.mechanism".into(), "SCRAM-SHA-512".into())));
    }
}
