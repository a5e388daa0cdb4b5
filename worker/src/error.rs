//! The crate's error type.
//!
//! One enum for the whole worker library, so callers can match on what went wrong (a Redis
//! failure, a configuration mistake, a protocol surprise) without juggling per-module types.
//! Modules add variants here as they need them; keep each variant's message short and free of
//! secrets (no passwords, no URLs with credentials).

/// Errors returned by the worker library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Redis command failed: connection refused or lost, timeout, server error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// A setting is missing, contradictory or malformed.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A shared-protocol failure that has no meaning of its own here (an unexpected script
    /// reply); Redis, configuration, Kafka and closed-pool errors keep their own variants.
    #[error(transparent)]
    Shared(qp_protocol::Error),

    /// A Kafka client operation failed (creating the consumer, producing, committing).
    #[error("kafka: {0}")]
    Kafka(String),

    /// The worker is draining and takes no new work.
    #[error("shutting down")]
    ShuttingDown,

    /// An HTTP server could not start or failed.
    #[error("http server: {0}")]
    Http(String),

    /// The token pool or lease keeper was shut down.
    #[error("token pool is closed")]
    Closed,

    /// The queue refused a message as too large (Kafka's `MSG_SIZE_TOO_LARGE`).
    #[error("message too large: {0}")]
    MessageTooLarge(String),

    /// A step of the shutdown ran out of its share of the pod's grace period.
    #[error("{0} did not finish in time")]
    TooSlow(&'static str),
}

/// `Result` with the crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
}

/// The protocol crate's errors keep their meaning here (a Redis failure stays a Redis failure).
impl From<qp_protocol::Error> for Error {
    fn from(e: qp_protocol::Error) -> Self {
        match e {
            qp_protocol::Error::Redis(e) => Error::Redis(e),
            qp_protocol::Error::Config(m) => Error::Config(m),
            qp_protocol::Error::Kafka(m) => Error::Kafka(m),
            e @ qp_protocol::Error::KafkaRefused(_) => Error::Kafka(e.to_string()),
            qp_protocol::Error::Closed => Error::Closed,
            other @ qp_protocol::Error::Protocol { .. } => Error::Shared(other),
        }
    }
}
