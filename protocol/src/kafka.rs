//! Kafka connection settings and the one place a librdkafka `ClientConfig` is built: every
//! client of the project (worker consumer, producers, the gateway's producer, the lag probe)
//! starts from [`KafkaArgs::client_config`], so brokers and security settings are applied alike.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clap::Args;
use rdkafka::client::Client;
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

use crate::{Error, Result};

/// Kafka connection settings (worker and gateway).
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
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

    /// A client configuration with the bootstrap servers, a client id and every security
    /// property; callers add what is specific to their client.
    pub fn client_config(&self, client_id: &str) -> Result<ClientConfig> {
        Ok(client_config(
            self.bootstrap()?,
            client_id,
            &self.security_properties(),
        ))
    }
}

/// A client configuration from parts: bootstrap servers, client id and librdkafka properties
/// (security settings first, so a caller's own `.set` calls come after them).
pub fn client_config(
    bootstrap: &str,
    client_id: &str,
    properties: &[(String, String)],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("client.id", client_id)
        // librdkafka backs off exponentially between reconnects, up to 10 s by default: after a
        // broker outage a client could sit out up to 10 s more with the broker already back. A
        // try per second at most is cheap for a broker that is down and bounds that wait (the
        // broker-restart test reconnected 0.12 s after the broker had started).
        .set("reconnect.backoff.max.ms", "1000");
    for (k, v) in properties {
        config.set(k, v);
    }
    config
}

/// The last refusal a client met ([`is_refusal`]), until a broker accepts it again.
///
/// librdkafka reports an identical connection error at most every 30 s, so "refused recently"
/// would be a guess; instead the refusal stands until the client's statistics show a broker
/// in state `UP` (connected and authenticated), which they do every statistics interval.
#[derive(Debug, Clone, Default)]
pub struct Refusal(Arc<Mutex<Option<String>>>);

impl Refusal {
    /// Record `error` if it is a refusal; says whether it was.
    pub fn error(&self, error: &KafkaError, reason: &str) -> bool {
        let refused = is_refusal(error);
        if refused {
            *self.0.lock().expect("refusal lock") = Some(format!("{error} ({reason})"));
        }
        refused
    }

    /// A broker this client reaches is up: whatever refused it before has been fixed.
    pub fn stats(&self, stats: &Statistics) {
        let accepted = stats
            .brokers
            .values()
            .any(|b| b.state == "UP" && matches!(b.source.as_str(), "configured" | "learned"));
        if accepted {
            *self.0.lock().expect("refusal lock") = None;
        }
    }

    /// Why the brokers refuse this client, if they do.
    pub fn reason(&self) -> Option<String> {
        self.0.lock().expect("refusal lock").clone()
    }
}

/// Whether a client still knows a broker to ask for metadata, and the way back when it knows
/// none.
///
/// librdkafka (since 2.10) drops every broker that a Metadata response leaves out. A KRaft
/// broker that is fenced (starting up, in a controlled shutdown, or unregistered) answers
/// Metadata listing no broker at all, and a client that asks it then is left with none. It
/// does not re-bootstrap from there either, so it never finds the cluster again, however long
/// the broker has been back (librdkafka issue 5301; the fix proposed in pull request 5303 is in
/// no release as of 2.12.1, which rdkafka 0.39 bundles). A consumer in that state holds no
/// partitions and logs nothing above debug level: CI saw every worker of a group consume
/// nothing for four minutes after a broker restart, and a gateway would answer 503 forever.
///
/// The client's statistics callback calls [`BrokerLoss::stats`]; the code that owns the client
/// calls [`BrokerLoss::recover`] regularly, which hands the client its bootstrap servers again,
/// as librdkafka's own re-bootstrap would. Remove once a librdkafka release has the fix.
#[derive(Debug, Clone, Default)]
pub struct BrokerLoss(Arc<AtomicBool>);

impl BrokerLoss {
    /// Record a statistics report; returns how many brokers the client can ask for metadata
    /// (learned from the cluster or given as bootstrap servers), for a gauge.
    pub fn stats(&self, stats: &Statistics) -> usize {
        let usable = usable_brokers(stats);
        self.0.store(usable == 0, Ordering::Relaxed);
        usable
    }

    /// If the last report found no broker, give the client `bootstrap` again; says whether it
    /// did. Cheap when nothing was lost (one atomic load): call it from a client's poll loop.
    pub fn recover<C: ClientContext>(&self, client: &Client<C>, bootstrap: &str) -> bool {
        if !self.0.swap(false, Ordering::Relaxed) {
            return false;
        }
        let Ok(servers) = CString::new(bootstrap) else {
            return false;
        };
        // rdkafka has no wrapper for `rd_kafka_brokers_add`. SAFETY: `native_ptr` is the live
        // client borrowed for this call; the function copies the string and may be called
        // from any thread.
        let added = unsafe {
            rdkafka::bindings::rd_kafka_brokers_add(client.native_ptr(), servers.as_ptr())
        };
        tracing::warn!(
            added,
            bootstrap,
            "the Kafka client had lost every broker (a fenced broker answered its metadata \
             request with none); bootstrapping again"
        );
        true
    }
}

/// The librdkafka callbacks of a client that needs nothing but [`BrokerLoss`] tracking.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    brokers: BrokerLoss,
}

impl ClientContext for Watched {
    fn stats(&self, stats: Statistics) {
        self.brokers.stats(&stats);
    }
}

/// A producer that finds its brokers again after losing them all ([`BrokerLoss`]): the
/// recovery runs on [`KafkaProducer::get`], before each use.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: rdkafka::producer::FutureProducer<Watched>,
    brokers: BrokerLoss,
    bootstrap: String,
}

impl KafkaProducer {
    /// `config` is a client configuration from [`KafkaArgs::client_config`]; statistics are
    /// turned on (every 5 s) for the broker tracking.
    pub fn new(config: &mut ClientConfig, bootstrap: &str) -> Result<Self> {
        let watched = Watched::default();
        let brokers = watched.brokers.clone();
        let producer = config
            .set("statistics.interval.ms", "5000")
            .create_with_context(watched)
            .map_err(|e| Error::Kafka(format!("creating producer: {e}")))?;
        Ok(KafkaProducer {
            producer,
            brokers,
            bootstrap: bootstrap.to_owned(),
        })
    }

    /// The producer, given its bootstrap servers again first if it had lost every broker.
    pub fn get(&self) -> &rdkafka::producer::FutureProducer<Watched> {
        use rdkafka::producer::Producer as _;
        self.brokers
            .recover(self.producer.client(), &self.bootstrap);
        &self.producer
    }
}

/// Brokers of a statistics report that a client can send a metadata request to.
pub fn usable_brokers(stats: &Statistics) -> usize {
    stats
        .brokers
        .values()
        .filter(|b| matches!(b.source.as_str(), "learned" | "configured"))
        .count()
}

/// Whether a librdkafka error means the brokers refused this client (SASL credentials, or the
/// TLS handshake: an untrusted or expired certificate). Retrying will not fix these; a
/// changed Secret will, so callers report them plainly (an unready worker, a condition) and
/// keep their client, which librdkafka keeps retrying.
pub fn is_refusal(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
