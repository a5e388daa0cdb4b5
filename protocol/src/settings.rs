//! The worker's settings: one typed struct per `qp-worker` mode ([`RunArgs`], [`GatewayArgs`]),
//! parsed by the worker from flags or their environment variables, and rendered by the operator
//! into a pod's (or a local process's) environment with [`RunArgs::render`] and
//! [`GatewayArgs::render`]. Each environment variable is named once, in its field's `env`
//! attribute; rendering looks the name up by field, and a round-trip test over every field
//! proves that what the operator renders is what the worker parses.
//!
//! Secrets never become literals here: the operator renders them as [`Setting::Secret`] (a
//! `secretKeyRef`) or [`Setting::SecretFile`] (a mounted file), given by [`Refs`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

pub use crate::kafka::KafkaArgs;
use crate::keys::Keys;
use crate::redis_conn::RedisSettings;
use crate::{Error, Result};

/// The handler specification as given on the command line (`--handler`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerSpec {
    /// POST to this URL.
    Http {
        url: String,
    },
    /// Run this program with these arguments.
    Exec {
        command: Vec<String>,
    },
    Echo,
    Sleep {
        millis: u64,
    },
    Fail {
        pattern: String,
    },
    /// Panics on messages containing the pattern: a stand-in for a bug in a handler, to prove
    /// that one panicking message fails alone.
    Panic {
        pattern: String,
    },
    Probe {
        millis: u64,
    },
}

/// The environment variable that holds the value of the n-th handler header.
pub fn handler_header_env(n: usize) -> String {
    format!("QP_HANDLER_HEADER_{n}")
}

/// Whether an `http(s)://` URL has userinfo (`user[:password]@` before the host).
pub fn url_has_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

impl HandlerSpec {
    /// An error (that does not repeat the URL) when an HTTP handler's URL carries credentials.
    pub fn refuse_credentials(&self) -> Result<(), String> {
        match self {
            HandlerSpec::Http { url } if url_has_credentials(url) => Err(
                "the handler URL carries credentials (user:password@); pass them as headers \
                 from a Secret instead (--handler-header-names and QP_HANDLER_HEADER_<n>; \
                 spec.worker.handler.http.headers)"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

impl FromStr for HandlerSpec {
    type Err = String;

    /// `http://...` / `https://...`, `exec:["program", "arg", ...]` (a JSON array: arguments
    /// keep their spaces) or `exec:<program> [args...]` (split on whitespace, for typing by
    /// hand), `echo`, `sleep:<ms>`, `fail:<pattern>`, `panic:<pattern>`, `probe:<ms>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.starts_with("http://") || s.starts_with("https://") {
            // Credentials in the URL are refused by `refuse_credentials`, not here: clap prints
            // a parse error with the value, credential and all.
            return Ok(HandlerSpec::Http { url: s.to_owned() });
        }
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        let millis = |what: &str| {
            arg.parse::<u64>()
                .map_err(|_| format!("handler '{what}:<milliseconds>' needs a number, got '{arg}'"))
        };
        match kind {
            "echo" if arg.is_empty() => Ok(HandlerSpec::Echo),
            "sleep" => Ok(HandlerSpec::Sleep {
                millis: millis("sleep")?,
            }),
            "probe" => Ok(HandlerSpec::Probe {
                millis: millis("probe")?,
            }),
            "fail" if !arg.is_empty() => Ok(HandlerSpec::Fail {
                pattern: arg.to_owned(),
            }),
            "panic" if !arg.is_empty() => Ok(HandlerSpec::Panic {
                pattern: arg.to_owned(),
            }),
            "exec" => {
                let command: Vec<String> = if arg.trim_start().starts_with('[') {
                    serde_json::from_str(arg).map_err(|e| {
                        format!("handler 'exec:[...]' needs a JSON array of strings: {e}")
                    })?
                } else {
                    arg.split_whitespace().map(str::to_owned).collect()
                };
                if command.is_empty() {
                    return Err("handler 'exec:<command> [args]' needs a command".into());
                }
                Ok(HandlerSpec::Exec { command })
            }
            _ => Err(format!(
                "unknown handler '{s}': expected an http(s):// URL, exec:<command>, echo, \
                 sleep:<ms>, fail:<pattern>, panic:<pattern> or probe:<ms>"
            )),
        }
    }
}

/// The `--handler` form of a spec; exec commands as a JSON array, so that an argument with
/// spaces stays one argument (`["sh", "-c", "echo a b"]` runs `echo a b` in a shell).
impl fmt::Display for HandlerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerSpec::Http { url } => f.write_str(url),
            HandlerSpec::Exec { command } => write!(
                f,
                "exec:{}",
                serde_json::to_string(command).map_err(|_| fmt::Error)?
            ),
            HandlerSpec::Echo => f.write_str("echo"),
            HandlerSpec::Sleep { millis } => write!(f, "sleep:{millis}"),
            HandlerSpec::Fail { pattern } => write!(f, "fail:{pattern}"),
            HandlerSpec::Panic { pattern } => write!(f, "panic:{pattern}"),
            HandlerSpec::Probe { millis } => write!(f, "probe:{millis}"),
        }
    }
}

/// Default values of the settings (what a flag left unset means).
pub mod defaults {
    pub const HANDLER_TIMEOUT_MS: u64 = 30_000;
    pub const MAX_CONCURRENCY: usize = 16;
    pub const LEASE_TTL_MS: u64 = 10_000;
    pub const RETRIES: u32 = 3;
    pub const RETRY_BACKOFF_MS: u64 = 200;
    pub const MAX_DELIVERIES: u64 = 5;
    pub const RESULT_TTL_SECONDS: u64 = 3600;
    /// The one size limit of a message body: the gateway refuses larger requests (413), the
    /// worker dead-letters larger messages that reach it another way. 1,000,000 bytes, so that
    /// a body with its headers and record overhead fits Kafka's default `max.message.bytes`
    /// (1,048,588); a Redis-list envelope may be larger (base64, JSON escapes), the body inside
    /// it is what counts.
    pub const MAX_MESSAGE_BYTES: usize = 1_000_000;
    pub const MAX_RESULT_BYTES: usize = 1 << 20;
    pub const DRAIN_TIMEOUT_SECONDS: u64 = 30;
    pub const MAX_PENDING_PER_PARTITION: usize = 256;
    pub const COMMIT_INTERVAL_MS: u64 = 1000;
    /// The lowest session timeout a broker accepts by default.
    pub const KAFKA_SESSION_TIMEOUT_MS: u64 = 6000;
    pub const HEARTBEAT_MS: u64 = 1000;
    pub const DEAD_AFTER_MS: u64 = 15_000;
    pub const STREAM_CLAIM_IDLE_MS: u64 = 30_000;
    pub const MAX_BACKLOG: u64 = 0;
    pub const MAX_WAIT_SECONDS: u64 = 30;
    /// Each parked long poll holds a connection: 10,000 waiters need more than the 4096 a
    /// metrics server is allowed (they cost about 12 KB each in the gateway; see BENCHMARKS.md).
    pub const GATEWAY_MAX_CONNECTIONS: usize = 16_384;
}

/// Settings shared by every mode: which QueueProcessor, which Redis, where to serve metrics.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
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
    /// CA bundle (PEM file) that the Redis server's certificate must chain to, instead of the
    /// system's trust store; implies --redis-tls.
    #[arg(long, env = "QP_REDIS_CA_FILE")]
    pub redis_ca_file: Option<String>,
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
    RedisStream,
}

/// Where a consumer group without committed offsets starts reading (librdkafka's
/// `auto.offset.reset`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OffsetReset {
    /// The oldest message still in the topic.
    #[default]
    Earliest,
    /// The end of the topic: only messages produced from now on.
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
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
    /// Redis stream to consume (with --source redis-stream), through consumer group
    /// --stream-group (made at the stream's start if missing).
    #[arg(long, env = "QP_STREAM_KEY")]
    pub stream_key: Option<String>,
    /// The stream's consumer group (with --source redis-stream).
    #[arg(long, env = "QP_STREAM_GROUP")]
    pub stream_group: Option<String>,
    /// A stream entry delivered to a consumer that has not acknowledged it for this long (a
    /// crashed worker's) is claimed by another worker (XAUTOCLAIM).
    #[arg(long, env = "QP_STREAM_CLAIM_IDLE_MS", default_value_t = defaults::STREAM_CLAIM_IDLE_MS)]
    pub stream_claim_idle_ms: u64,
    /// Delete entries the group has acknowledged (`XTRIM MINID` up to the oldest entry still
    /// pending or not yet delivered), so the stream does not grow without end. Only for a
    /// stream that no other consumer group reads.
    #[arg(long, env = "QP_STREAM_TRIM_ACKNOWLEDGED")]
    pub stream_trim_acknowledged: bool,
    /// Handler: an http(s):// URL; exec:["<program>", "<arg>", ...] (a JSON list: arguments keep
    /// their spaces) or exec:<program> [args] (split on whitespace); echo, sleep:<ms>,
    /// fail:<pattern>, probe:<ms>.
    #[arg(long, env = "QP_HANDLER")]
    pub handler: HandlerSpec,
    /// Timeout of one handler call.
    #[arg(long, env = "QP_HANDLER_TIMEOUT_MS", default_value_t = defaults::HANDLER_TIMEOUT_MS)]
    pub handler_timeout_ms: u64,
    /// Environment variables an exec handler's process sees besides PATH, HOME, LANG, LC_ALL,
    /// TZ, TMPDIR and QP_MESSAGE_ID (names, comma-separated). Nothing else of the worker's
    /// environment reaches it: not the Redis or Kafka passwords. The operator lists the names
    /// of the QueueProcessor's `spec.worker.env`.
    #[arg(long, env = "QP_EXEC_PASS_ENV", value_delimiter = ',')]
    pub exec_pass_env: Vec<String>,
    /// Headers an HTTP handler sends with every message (names, comma-separated); the value of
    /// the n-th is read from the environment variable `QP_HANDLER_HEADER_<n>` (counting from
    /// 0), which the operator fills from a Secret: credentials never sit in the URL or on the
    /// command line.
    #[arg(long, env = "QP_HANDLER_HEADER_NAMES", value_delimiter = ',')]
    pub handler_header_names: Vec<String>,
    /// Messages this worker handles at once, at most. The global token pool decides how many
    /// it actually may.
    #[arg(long, env = "QP_MAX_CONCURRENCY", default_value_t = defaults::MAX_CONCURRENCY)]
    pub max_concurrency: usize,
    /// Lease time of a token: a crashed worker's tokens come back after this long.
    #[arg(long, env = "QP_LEASE_TTL_MS", default_value_t = defaults::LEASE_TTL_MS)]
    pub lease_ttl_ms: u64,
    /// Do not take tokens (no global concurrency limit). For benchmarks and trusted handlers.
    #[arg(long, env = "QP_UNGATED")]
    pub ungated: bool,
    /// Retries after a retryable handler failure before the message is dead-lettered.
    #[arg(long, env = "QP_RETRIES", default_value_t = defaults::RETRIES)]
    pub retries: u32,
    /// First retry delay; doubles per retry (with jitter), capped at 30 s.
    #[arg(long, env = "QP_RETRY_BACKOFF_MS", default_value_t = defaults::RETRY_BACKOFF_MS)]
    pub retry_backoff_ms: u64,
    /// Dead-letter a message that was started this many times without an outcome (each time
    /// the worker crashed, was killed or stopped while processing it); 0 never does.
    #[arg(long, env = "QP_MAX_DELIVERIES", default_value_t = defaults::MAX_DELIVERIES)]
    pub max_deliveries: u64,
    /// How long results and request states stay in Redis.
    #[arg(long, env = "QP_RESULT_TTL_SECONDS", default_value_t = defaults::RESULT_TTL_SECONDS)]
    pub result_ttl_seconds: u64,
    /// Dead-letter target: kafka:<topic> or redis:<list key>. Default: the QueueProcessor's
    /// dead-letter list in Redis.
    #[arg(long, env = "QP_DEAD_LETTER")]
    pub dead_letter: Option<String>,
    /// Largest accepted message body; bigger ones are dead-lettered as oversized. Keep it equal
    /// to the gateway's --max-request-bytes.
    #[arg(long, env = "QP_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Largest accepted handler result; bigger ones fail the message.
    #[arg(long, env = "QP_MAX_RESULT_BYTES", default_value_t = defaults::MAX_RESULT_BYTES)]
    pub max_result_bytes: usize,
    /// Process messages with the same Kafka key one at a time, in offset order.
    #[arg(long, env = "QP_ORDERED_BY_KEY")]
    pub ordered_by_key: bool,
    /// On SIGTERM, how long running messages may take before the worker exits anyway.
    #[arg(long, env = "QP_DRAIN_TIMEOUT_SECONDS", default_value_t = defaults::DRAIN_TIMEOUT_SECONDS)]
    pub drain_timeout_seconds: u64,
    /// This worker's identity (the pod name in Kubernetes).
    #[arg(long, env = "QP_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Pause a Kafka partition with this many fetched but unfinished messages.
    #[arg(long, env = "QP_MAX_PENDING_PER_PARTITION", default_value_t = defaults::MAX_PENDING_PER_PARTITION)]
    pub max_pending_per_partition: usize,
    /// Where a consumer group without committed offsets starts: at the oldest message still in
    /// the topic, or only at messages produced from now on.
    #[arg(long, env = "QP_KAFKA_AUTO_OFFSET_RESET", value_enum, default_value_t = OffsetReset::Earliest)]
    pub kafka_auto_offset_reset: OffsetReset,
    /// How often stored Kafka offsets are committed.
    #[arg(long, env = "QP_COMMIT_INTERVAL_MS", default_value_t = defaults::COMMIT_INTERVAL_MS)]
    pub commit_interval_ms: u64,
    /// How long the group waits for a silent worker (killed, frozen) before its partitions go
    /// to the others: their stall after a crash. The broker refuses values below its
    /// `group.min.session.timeout.ms` (6000 by default); lower that to go below.
    #[arg(long, env = "QP_KAFKA_SESSION_TIMEOUT_MS", default_value_t = defaults::KAFKA_SESSION_TIMEOUT_MS)]
    pub kafka_session_timeout_ms: u64,
    /// Heartbeat period (token renewal, counters for the operator).
    #[arg(long, env = "QP_HEARTBEAT_MS", default_value_t = defaults::HEARTBEAT_MS)]
    pub heartbeat_ms: u64,
    /// A Redis-list worker silent this long is considered dead; its messages are requeued.
    #[arg(long, env = "QP_DEAD_AFTER_MS", default_value_t = defaults::DEAD_AFTER_MS)]
    pub dead_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
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
    /// Redis stream to add to (with --source redis-stream).
    #[arg(long, env = "QP_STREAM_KEY")]
    pub stream_key: Option<String>,
    /// Largest accepted request body (413 above it). The same limit as the worker's
    /// --max-message-bytes: a body the gateway accepts is one the worker processes.
    #[arg(long, env = "QP_MAX_REQUEST_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_request_bytes: usize,
    /// Answer 429 when the backlog is above this many messages (0: never).
    #[arg(long, env = "QP_MAX_BACKLOG", default_value_t = defaults::MAX_BACKLOG)]
    pub max_backlog: u64,
    /// How long results and request states stay in Redis.
    #[arg(long, env = "QP_RESULT_TTL_SECONDS", default_value_t = defaults::RESULT_TTL_SECONDS)]
    pub result_ttl_seconds: u64,
    /// Longest accepted ?wait= for long polls.
    #[arg(long, env = "QP_MAX_WAIT_SECONDS", default_value_t = defaults::MAX_WAIT_SECONDS)]
    pub max_wait_seconds: u64,
    /// Client connections the API serves at once (more wait in the kernel's backlog). Every
    /// parked long poll holds one; the process's open-file limit must allow as many.
    #[arg(
        long,
        env = "QP_GATEWAY_MAX_CONNECTIONS",
        default_value_t = defaults::GATEWAY_MAX_CONNECTIONS
    )]
    pub max_connections: usize,
    /// Clients and their bearer tokens, one `<client>:<token>` per line (`#` comments; a
    /// mounted Secret key). Re-read when it changes, so tokens rotate without a restart. Every
    /// API request must carry `Authorization: Bearer <token>`, and a result is readable only by
    /// the client that submitted it. Required unless --no-auth.
    #[arg(
        long,
        env = "QP_GATEWAY_TOKENS_FILE",
        conflicts_with_all = ["no_auth", "client_ca_file"]
    )]
    pub tokens_file: Option<PathBuf>,
    /// Serve the API without authentication: anyone who reaches the gateway may submit and read
    /// any result. Only where the network alone decides who that is.
    #[arg(long, env = "QP_GATEWAY_NO_AUTH", conflicts_with = "client_ca_file")]
    pub no_auth: bool,
    /// Serve the API over TLS with this certificate (PEM, a mounted Secret key), on
    /// --api-listen; /metrics and the probes stay plain HTTP on --listen for the kubelet and
    /// Prometheus.
    #[arg(long, env = "QP_GATEWAY_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "QP_GATEWAY_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Mutual TLS: every API connection must present a client certificate that chains to this
    /// CA (PEM); its subject common name is the client's name (as a token's client would be:
    /// [a-z0-9-], results readable only by the same name). Needs --tls-cert-file; replaces
    /// --tokens-file.
    #[arg(long, env = "QP_GATEWAY_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub client_ca_file: Option<PathBuf>,
    /// Address of the API when it is served over TLS.
    #[arg(long, env = "QP_GATEWAY_API_LISTEN", default_value = "0.0.0.0:8443")]
    pub api_listen: SocketAddr,
    /// Requests per second each client may make to the API, per gateway replica, with bursts of
    /// as many; above it: 429 with Retry-After (0: no limit).
    #[arg(long, env = "QP_GATEWAY_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit_per_client: u32,
}

impl CommonArgs {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.namespace, &self.name)
    }

    pub fn redis(&self) -> Result<RedisSettings> {
        let ca = match &self.redis_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| Error::config(format!("--redis-ca-file {path}: {e}")))?,
            ),
            None => None,
        };
        Ok(RedisSettings::from_parts(
            self.redis_url.as_deref(),
            self.redis_cluster_nodes.as_deref(),
            self.redis_password.clone(),
            self.redis_tls,
        )?
        .with_username(self.redis_username.clone())
        .with_ca(ca))
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

/// How one setting reaches the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting<R> {
    /// A literal value.
    Value(String),
    /// The value of a Secret key (a `secretKeyRef`: never copied into the pod spec).
    Secret(R),
    /// The path where a Secret key is mounted as a file (TLS material).
    SecretFile(R),
    /// The pod's own name (downward API); a generated id in local mode.
    PodName,
}

/// The settings that are not literals: secrets by reference, the worker id from the pod. A
/// field given here replaces the literal field of the same name when rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refs<R> {
    pub redis_password: Option<R>,
    pub redis_username: Option<R>,
    pub redis_ca_file: Option<R>,
    pub kafka_username: Option<R>,
    pub kafka_password: Option<R>,
    pub kafka_ca_file: Option<R>,
    pub kafka_cert_file: Option<R>,
    pub kafka_key_file: Option<R>,
    /// The gateway's client tokens (a file).
    pub gateway_tokens_file: Option<R>,
    /// The gateway's serving certificate, its key, and the CA of client certificates (files).
    pub gateway_tls_cert_file: Option<R>,
    pub gateway_tls_key_file: Option<R>,
    pub gateway_client_ca_file: Option<R>,
    /// Render `worker_id` as the pod's name.
    pub worker_id_is_pod_name: bool,
}

impl<R> Default for Refs<R> {
    fn default() -> Self {
        Refs {
            redis_password: None,
            redis_username: None,
            redis_ca_file: None,
            kafka_username: None,
            kafka_password: None,
            kafka_ca_file: None,
            kafka_cert_file: None,
            kafka_key_file: None,
            gateway_tokens_file: None,
            gateway_tls_cert_file: None,
            gateway_tls_key_file: None,
            gateway_client_ca_file: None,
            worker_id_is_pod_name: false,
        }
    }
}

/// Rendered settings: environment variable name and value, in field order.
pub type Env<R> = Vec<(String, Setting<R>)>;

/// Collects rendered settings, naming each by its field's `env` attribute.
struct Renderer<R> {
    command: clap::Command,
    out: Env<R>,
}

impl<R: Clone> Renderer<R> {
    fn new(command: clap::Command) -> Self {
        Renderer {
            command,
            out: Vec::new(),
        }
    }

    /// The environment variable of field `id`. Every field has one (the round-trip test
    /// renders every field), so a miss is a programming error.
    fn name(&self, id: &str) -> String {
        self.command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get_env())
            .unwrap_or_else(|| panic!("setting {id} has no environment variable"))
            .to_string_lossy()
            .into_owned()
    }

    fn put(&mut self, id: &str, value: Setting<R>) {
        let name = self.name(id);
        self.out.push((name, value));
    }

    fn value(&mut self, id: &str, value: impl ToString) {
        self.put(id, Setting::Value(value.to_string()));
    }

    /// A tuning setting: rendered only when it differs from the worker's default, so a pod's
    /// environment shows what was chosen (and a user's own variable of that name in
    /// `spec.worker.env` does not collide with a default we would otherwise write).
    fn tuned<T: PartialEq + ToString>(&mut self, id: &str, value: T, default: T) {
        if value != default {
            self.value(id, value);
        }
    }

    fn opt(&mut self, id: &str, value: &Option<impl ToString>) {
        if let Some(v) = value {
            self.value(id, v.to_string());
        }
    }

    fn flag(&mut self, id: &str, on: bool) {
        if on {
            self.value(id, "true");
        }
    }

    fn enumerated(&mut self, id: &str, value: impl ValueEnum) {
        let v = value
            .to_possible_value()
            .expect("settings enums have no skipped variants");
        self.value(id, v.get_name());
    }

    /// A secret: the reference when given, else the literal (tools and tests).
    fn secret(&mut self, id: &str, literal: &Option<String>, reference: &Option<R>, file: bool) {
        match reference {
            Some(r) if file => self.put(id, Setting::SecretFile(r.clone())),
            Some(r) => self.put(id, Setting::Secret(r.clone())),
            None => self.opt(id, literal),
        }
    }

    /// The settings both modes have: which QueueProcessor, Redis, Kafka, the source.
    fn shared(
        &mut self,
        common: &CommonArgs,
        kafka: &KafkaArgs,
        source: SourceKind,
        queue_keys: (&Option<String>, &Option<String>),
        refs: &Refs<R>,
    ) {
        self.common(common, refs);
        self.kafka(kafka, refs);
        self.enumerated("source", source);
        self.opt("list_key", queue_keys.0);
        self.opt("stream_key", queue_keys.1);
    }

    fn common(&mut self, c: &CommonArgs, refs: &Refs<R>) {
        self.value("namespace", &c.namespace);
        self.value("name", &c.name);
        self.opt("redis_url", &c.redis_url);
        self.opt("redis_cluster_nodes", &c.redis_cluster_nodes);
        self.secret(
            "redis_password",
            &c.redis_password,
            &refs.redis_password,
            false,
        );
        self.secret(
            "redis_username",
            &c.redis_username,
            &refs.redis_username,
            false,
        );
        self.flag("redis_tls", c.redis_tls);
        self.secret("redis_ca_file", &c.redis_ca_file, &refs.redis_ca_file, true);
        self.value("listen", c.listen);
        self.enumerated("log_format", c.log_format);
    }

    fn kafka(&mut self, k: &KafkaArgs, refs: &Refs<R>) {
        self.opt("kafka_bootstrap", &k.kafka_bootstrap);
        self.opt("kafka_topic", &k.kafka_topic);
        self.opt("kafka_group", &k.kafka_group);
        self.opt("kafka_sasl_mechanism", &k.kafka_sasl_mechanism);
        self.secret(
            "kafka_username",
            &k.kafka_username,
            &refs.kafka_username,
            false,
        );
        self.secret(
            "kafka_password",
            &k.kafka_password,
            &refs.kafka_password,
            false,
        );
        self.flag("kafka_tls", k.kafka_tls);
        self.secret("kafka_ca_file", &k.kafka_ca_file, &refs.kafka_ca_file, true);
        self.secret(
            "kafka_cert_file",
            &k.kafka_cert_file,
            &refs.kafka_cert_file,
            true,
        );
        self.secret(
            "kafka_key_file",
            &k.kafka_key_file,
            &refs.kafka_key_file,
            true,
        );
    }
}

impl CommonArgs {
    /// The settings of QueueProcessor `namespace/name` with every other field at its default.
    pub fn new(namespace: &str, name: &str) -> Self {
        CommonArgs {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            redis_url: None,
            redis_cluster_nodes: None,
            redis_password: None,
            redis_username: None,
            redis_tls: false,
            redis_ca_file: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            log_format: LogFormat::Text,
        }
    }
}

impl RunArgs {
    /// Worker settings with every optional field at its default.
    pub fn new(
        common: CommonArgs,
        kafka: KafkaArgs,
        source: SourceKind,
        handler: HandlerSpec,
    ) -> Self {
        RunArgs {
            common,
            kafka,
            source,
            list_key: None,
            stream_key: None,
            stream_group: None,
            stream_claim_idle_ms: defaults::STREAM_CLAIM_IDLE_MS,
            stream_trim_acknowledged: false,
            handler,
            handler_timeout_ms: defaults::HANDLER_TIMEOUT_MS,
            exec_pass_env: Vec::new(),
            handler_header_names: Vec::new(),
            max_concurrency: defaults::MAX_CONCURRENCY,
            lease_ttl_ms: defaults::LEASE_TTL_MS,
            ungated: false,
            retries: defaults::RETRIES,
            retry_backoff_ms: defaults::RETRY_BACKOFF_MS,
            max_deliveries: defaults::MAX_DELIVERIES,
            result_ttl_seconds: defaults::RESULT_TTL_SECONDS,
            dead_letter: None,
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            max_result_bytes: defaults::MAX_RESULT_BYTES,
            ordered_by_key: false,
            drain_timeout_seconds: defaults::DRAIN_TIMEOUT_SECONDS,
            worker_id: None,
            max_pending_per_partition: defaults::MAX_PENDING_PER_PARTITION,
            kafka_auto_offset_reset: OffsetReset::Earliest,
            commit_interval_ms: defaults::COMMIT_INTERVAL_MS,
            kafka_session_timeout_ms: defaults::KAFKA_SESSION_TIMEOUT_MS,
            heartbeat_ms: defaults::HEARTBEAT_MS,
            dead_after_ms: defaults::DEAD_AFTER_MS,
        }
    }

    /// The process environment that makes `qp-worker run` parse exactly these settings. Tuning
    /// settings at their defaults are left out (see `Renderer::tuned`).
    pub fn render<R: Clone>(&self, refs: &Refs<R>) -> Env<R> {
        let mut r = Renderer::<R>::new(<Self as Args>::augment_args(clap::Command::new("run")));
        r.shared(
            &self.common,
            &self.kafka,
            self.source,
            (&self.list_key, &self.stream_key),
            refs,
        );
        r.opt("stream_group", &self.stream_group);
        r.tuned(
            "stream_claim_idle_ms",
            self.stream_claim_idle_ms,
            defaults::STREAM_CLAIM_IDLE_MS,
        );
        r.flag("stream_trim_acknowledged", self.stream_trim_acknowledged);
        r.value("handler", &self.handler);
        r.value("handler_timeout_ms", self.handler_timeout_ms);
        if !self.handler_header_names.is_empty() {
            r.value("handler_header_names", self.handler_header_names.join(","));
        }
        if !self.exec_pass_env.is_empty() {
            r.value("exec_pass_env", self.exec_pass_env.join(","));
        }
        r.value("max_concurrency", self.max_concurrency);
        r.value("lease_ttl_ms", self.lease_ttl_ms);
        r.flag("ungated", self.ungated);
        r.value("retries", self.retries);
        r.value("retry_backoff_ms", self.retry_backoff_ms);
        r.tuned(
            "max_deliveries",
            self.max_deliveries,
            defaults::MAX_DELIVERIES,
        );
        r.value("result_ttl_seconds", self.result_ttl_seconds);
        r.opt("dead_letter", &self.dead_letter);
        r.tuned(
            "max_message_bytes",
            self.max_message_bytes,
            defaults::MAX_MESSAGE_BYTES,
        );
        r.tuned(
            "max_result_bytes",
            self.max_result_bytes,
            defaults::MAX_RESULT_BYTES,
        );
        r.flag("ordered_by_key", self.ordered_by_key);
        if self.kafka_auto_offset_reset != OffsetReset::default() {
            r.enumerated("kafka_auto_offset_reset", self.kafka_auto_offset_reset);
        }
        r.value("drain_timeout_seconds", self.drain_timeout_seconds);
        if refs.worker_id_is_pod_name {
            r.put("worker_id", Setting::PodName);
        } else {
            r.opt("worker_id", &self.worker_id);
        }
        r.tuned(
            "max_pending_per_partition",
            self.max_pending_per_partition,
            defaults::MAX_PENDING_PER_PARTITION,
        );
        r.tuned(
            "commit_interval_ms",
            self.commit_interval_ms,
            defaults::COMMIT_INTERVAL_MS,
        );
        r.tuned(
            "kafka_session_timeout_ms",
            self.kafka_session_timeout_ms,
            defaults::KAFKA_SESSION_TIMEOUT_MS,
        );
        r.tuned("heartbeat_ms", self.heartbeat_ms, defaults::HEARTBEAT_MS);
        r.tuned("dead_after_ms", self.dead_after_ms, defaults::DEAD_AFTER_MS);
        r.out
    }
}

impl GatewayArgs {
    /// Gateway settings with every optional field at its default.
    pub fn new(common: CommonArgs, kafka: KafkaArgs, source: SourceKind) -> Self {
        GatewayArgs {
            common,
            kafka,
            source,
            list_key: None,
            stream_key: None,
            max_request_bytes: defaults::MAX_MESSAGE_BYTES,
            max_backlog: defaults::MAX_BACKLOG,
            result_ttl_seconds: defaults::RESULT_TTL_SECONDS,
            max_wait_seconds: defaults::MAX_WAIT_SECONDS,
            max_connections: defaults::GATEWAY_MAX_CONNECTIONS,
            tokens_file: None,
            no_auth: false,
            rate_limit_per_client: 0,
            tls_cert_file: None,
            tls_key_file: None,
            client_ca_file: None,
            api_listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
        }
    }

    /// The process environment that makes `qp-worker gateway` parse exactly these settings.
    /// Tuning settings at their defaults are left out.
    pub fn render<R: Clone>(&self, refs: &Refs<R>) -> Env<R> {
        let mut r = Renderer::<R>::new(<Self as Args>::augment_args(clap::Command::new("gateway")));
        r.shared(
            &self.common,
            &self.kafka,
            self.source,
            (&self.list_key, &self.stream_key),
            refs,
        );
        r.tuned(
            "max_request_bytes",
            self.max_request_bytes,
            defaults::MAX_MESSAGE_BYTES,
        );
        r.tuned("max_backlog", self.max_backlog, defaults::MAX_BACKLOG);
        r.value("result_ttl_seconds", self.result_ttl_seconds);
        r.tuned(
            "max_wait_seconds",
            self.max_wait_seconds,
            defaults::MAX_WAIT_SECONDS,
        );
        r.tuned(
            "max_connections",
            self.max_connections,
            defaults::GATEWAY_MAX_CONNECTIONS,
        );
        let tokens_file = self.tokens_file.as_ref().map(|p| p.display().to_string());
        r.secret("tokens_file", &tokens_file, &refs.gateway_tokens_file, true);
        r.flag("no_auth", self.no_auth);
        for (field, path, reference) in [
            (
                "tls_cert_file",
                &self.tls_cert_file,
                &refs.gateway_tls_cert_file,
            ),
            (
                "tls_key_file",
                &self.tls_key_file,
                &refs.gateway_tls_key_file,
            ),
            (
                "client_ca_file",
                &self.client_ca_file,
                &refs.gateway_client_ca_file,
            ),
        ] {
            let path = path.as_ref().map(|p| p.display().to_string());
            r.secret(field, &path, reference, true);
        }
        if self.tls_cert_file.is_some() || refs.gateway_tls_cert_file.is_some() {
            r.value("api_listen", self.api_listen);
        }
        r.tuned("rate_limit_per_client", self.rate_limit_per_client, 0);
        r.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_render_to_what_clap_defaults_to() {
        let run = RunArgs::new(
            CommonArgs::new("default", "orders"),
            KafkaArgs::default(),
            SourceKind::Kafka,
            HandlerSpec::Echo,
        );
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            run: RunArgs,
        }
        let parsed =
            Only::try_parse_from(["run", "--name=orders", "--source=kafka", "--handler=echo"])
                .unwrap();
        assert_eq!(parsed.run, run);
    }

    #[test]
    fn tuning_settings_at_their_defaults_are_not_rendered() {
        let run = RunArgs::new(
            CommonArgs::new("default", "orders"),
            KafkaArgs::default(),
            SourceKind::Kafka,
            HandlerSpec::Echo,
        );
        let names: Vec<String> = run
            .render::<String>(&Refs::default())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for tuning in [
            "QP_MAX_MESSAGE_BYTES",
            "QP_MAX_RESULT_BYTES",
            "QP_MAX_PENDING_PER_PARTITION",
            "QP_COMMIT_INTERVAL_MS",
            "QP_HEARTBEAT_MS",
            "QP_DEAD_AFTER_MS",
        ] {
            assert!(!names.iter().any(|n| n == tuning), "{tuning} in {names:?}");
        }
        assert!(names.iter().any(|n| n == "QP_HANDLER"));
    }

    #[test]
    fn secrets_render_as_references_and_the_worker_id_as_the_pod_name() {
        let mut common = CommonArgs::new("shop", "orders");
        common.redis_password = Some("never rendered".into());
        let run = RunArgs::new(
            common,
            KafkaArgs::default(),
            SourceKind::Kafka,
            HandlerSpec::Echo,
        );
        let refs = Refs {
            redis_password: Some("redis/password"),
            redis_username: Some("redis/user"),
            redis_ca_file: Some("redis/ca"),
            kafka_username: Some("kafka/user"),
            kafka_password: Some("kafka/password"),
            kafka_ca_file: Some("kafka/ca"),
            kafka_cert_file: Some("kafka/cert"),
            kafka_key_file: Some("kafka/key"),
            gateway_tokens_file: Some("gateway/tokens"),
            gateway_tls_cert_file: Some("gateway/tls.crt"),
            gateway_tls_key_file: Some("gateway/tls.key"),
            gateway_client_ca_file: Some("gateway/ca.crt"),
            worker_id_is_pod_name: true,
        };
        let mut gateway = GatewayArgs::new(
            CommonArgs::new("shop", "orders"),
            KafkaArgs::default(),
            SourceKind::Kafka,
        );
        gateway.tokens_file = Some("/never/rendered".into());
        let gw_env = gateway.render(&refs);
        assert!(gw_env.contains(&(
            "QP_GATEWAY_TOKENS_FILE".to_owned(),
            Setting::SecretFile("gateway/tokens")
        )));
        assert!(!format!("{gw_env:?}").contains("never"));
        let env = run.render(&refs);
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        for (name, expected) in [
            ("QP_REDIS_PASSWORD", Setting::Secret("redis/password")),
            ("QP_REDIS_USERNAME", Setting::Secret("redis/user")),
            ("QP_KAFKA_USERNAME", Setting::Secret("kafka/user")),
            ("QP_KAFKA_PASSWORD", Setting::Secret("kafka/password")),
            ("QP_KAFKA_CA_FILE", Setting::SecretFile("kafka/ca")),
            ("QP_KAFKA_CERT_FILE", Setting::SecretFile("kafka/cert")),
            ("QP_KAFKA_KEY_FILE", Setting::SecretFile("kafka/key")),
            ("QP_WORKER_ID", Setting::PodName),
        ] {
            assert_eq!(get(name), Some(expected), "{name}");
        }
        assert!(!format!("{env:?}").contains("never rendered"));
    }

    #[test]
    fn handler_urls_with_credentials_are_refused_without_echoing_them() {
        let e = "http://user:S3CRETPASS@127.0.0.1:1/x"
            .parse::<HandlerSpec>()
            .unwrap()
            .refuse_credentials()
            .unwrap_err();
        assert!(e.contains("credentials") && !e.contains("S3CRET"), "{e}");
        assert!(url_has_credentials("https://u@h/x"));
        assert!(!url_has_credentials("http://h:1/p?next=a@b"));
        assert!(!url_has_credentials("http://h/p@x"));
    }

    #[test]
    fn exec_commands_keep_arguments_with_spaces() {
        let spec: HandlerSpec = r#"exec:["sh","-c","echo a b"]"#.parse().unwrap();
        assert_eq!(
            spec,
            HandlerSpec::Exec {
                command: vec!["sh".into(), "-c".into(), "echo a b".into()]
            }
        );
        assert_eq!(spec.to_string().parse::<HandlerSpec>().unwrap(), spec);
        // Typed by hand: split on whitespace.
        assert_eq!(
            "exec:tr a-z A-Z".parse::<HandlerSpec>().unwrap(),
            HandlerSpec::Exec {
                command: vec!["tr".into(), "a-z".into(), "A-Z".into()]
            }
        );
        assert!("exec:[1]".parse::<HandlerSpec>().is_err());
        assert!("exec:".parse::<HandlerSpec>().is_err());
        for s in [
            "echo",
            "sleep:5",
            "fail:x y",
            "panic:p",
            "probe:3",
            "http://h:1/p?q=1",
        ] {
            assert_eq!(s.parse::<HandlerSpec>().unwrap().to_string(), s);
        }
    }
}
