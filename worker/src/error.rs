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

    /// A Lua script answered with something this version of the code does not understand,
    /// for example because another version of the scripts wrote the keys.
    #[error("unexpected reply from the {script} script: {detail}")]
    Protocol {
        /// Name of the script (`ACQUIRE`, `RENEW`, ...).
        script: &'static str,
        /// What was wrong with the reply.
        detail: String,
    },

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
}

/// `Result` with the crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
}
