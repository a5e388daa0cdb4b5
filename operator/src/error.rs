//! The operator's one error type. Each variant has a stable `kind()` that names it in events
//! (as the reason) and metrics (as a label), so an alert can tell "Kafka is down" from "a
//! Secret is missing" without parsing messages.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// The spec breaks a rule the API server cannot check (or was applied without validation).
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// A referenced Secret or key does not exist.
    #[error("secret reference: {0}")]
    SecretRef(String),
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The API server refused an object the operator applies (a quota, an admission webhook,
    /// a field another manager owns).
    #[error("{0}")]
    Apply(String),
    /// Measuring the source (Kafka lag, Redis list length) failed.
    #[error("source unreachable: {0}")]
    Source(String),
    /// The source refused the operator's credentials or certificate: a Secret to fix, not an
    /// outage to wait out.
    #[error("{0}")]
    SourceRefused(String),
    /// Redis (token pool, counters) failed.
    #[error("redis: {0}")]
    Redis(String),
    /// A scaling signal could not be read: a key of the wrong type, a missing stream group.
    #[error("{0}")]
    Signal(String),
    /// Redis refused the operator's user, password or certificate check: a Secret to fix.
    #[error("Redis refused the connection (check the user, the password and the CA): {0}")]
    RedisRefused(String),
    /// Serializing an object failed (a bug).
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
    /// Local mode: a process could not be started or a file not read.
    #[error("local mode: {0}")]
    Local(String),
    /// The finalizer helper reported an error.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Whether a source or Redis refused the credentials or certificate the Secrets give.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::SourceRefused(_) | Error::RedisRefused(_))
    }

    /// Short, stable name: event reason suffix and metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::SecretRef(_) => "InvalidSecretRef",
            Error::Kube(_) => "KubeApi",
            Error::Apply(_) => "ApplyFailed",
            Error::Source(_) => "SourceUnreachable",
            Error::SourceRefused(_) => "SourceRefused",
            Error::Redis(_) => "RedisUnavailable",
            Error::RedisRefused(_) => "RedisRefused",
            Error::Signal(_) => "SignalUnreadable",
            Error::Serialization(_) => "Serialization",
            Error::Local(_) => "LocalMode",
            Error::Finalizer(_) => "Finalizer",
        }
    }
}

impl From<qp_protocol::Error> for Error {
    fn from(e: qp_protocol::Error) -> Self {
        match e {
            qp_protocol::Error::Kafka(m) => Error::Source(m),
            e @ qp_protocol::Error::KafkaRefused(_) => Error::SourceRefused(e.to_string()),
            e if qp_protocol::redis_conn::is_refusal(&e) => Error::RedisRefused(e.to_string()),
            other => Error::Redis(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
