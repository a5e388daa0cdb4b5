//! The crate's error type: what can go wrong talking to Redis and Kafka or reading settings.
//! Messages are short and free of secrets (no passwords, no URLs with credentials).

/// Errors returned by the protocol crate.
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

    /// A Kafka client operation failed.
    #[error("kafka: {0}")]
    Kafka(String),

    /// The brokers refused the client: SASL credentials or a TLS certificate. The text is
    /// librdkafka's reason, which names the mechanism or the certificate check, never a secret.
    #[error(
        "Kafka refused the connection (check the SASL credentials and the CA or certificates): {0}"
    )]
    KafkaRefused(String),

    /// The token pool was shut down.
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
