//! The gateway's Kafka producer, and what it tells readiness: a gateway whose brokers refuse
//! its credentials or certificate can queue nothing, so it must leave the Service's endpoints
//! (unready) instead of answering every submit with a 503 while looking healthy. librdkafka
//! keeps retrying; when the Secret is fixed, a broker accepts it and the gateway is ready again.
//! The same follower gives the producer its bootstrap servers again when librdkafka has dropped
//! every broker ([`BrokerLoss`]), which would otherwise leave the gateway answering 503 for good.

use std::time::Duration;

use qp_protocol::kafka::{BrokerLoss, Refusal};
use qp_protocol::observability::Readiness;
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::statistics::Statistics;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::{Error, Result};
use qp_protocol::settings::KafkaArgs;

/// How often readiness follows the producer's refusal state, and lost brokers are given back
/// (statistics arrive as often).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the producer's statistics and errors say about its brokers (shared with [`follow`]).
#[derive(Clone, Default)]
pub struct Health {
    refusal: Refusal,
    brokers: BrokerLoss,
}

/// librdkafka callbacks of the gateway's producer.
pub struct Context {
    health: Health,
    metrics: Metrics,
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        self.health.refusal.stats(&stats);
        let usable = self.health.brokers.stats(&stats);
        self.metrics
            .kafka_brokers
            .with_label_values(&["producer"])
            .set(usable as i64);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if self.health.refusal.error(&error, reason) {
            warn!(%error, %reason, "Kafka refused the gateway (check the SASL credentials and the CA / certificates); not ready until it is accepted");
        } else {
            warn!(target: "librdkafka", %error, %reason, "Kafka producer error");
        }
    }
}

pub type Producer = FutureProducer<Context>;

/// The producer fails a send after 5 s without an acknowledgement, so a broker that is down
/// turns into a 503 within seconds instead of a request that hangs. Its `message.max.bytes`
/// (librdkafka's default is 1,000,000) leaves room for the largest body plus its headers.
/// Statistics every second are what clear a refusal ([`Refusal`]). `linger.ms` 5 (librdkafka's
/// default) rather than 1: under load a produce request then carries five times as many
/// submits, and the broker's cost is per request (at 2000 submits/s with 1 ms the broker's JVM
/// took a quarter of this machine's two cores); 5 ms is a tenth of the submit latency budget.
pub fn producer(
    kafka: &KafkaArgs,
    max_body: usize,
    metrics: &Metrics,
) -> Result<(Producer, Health)> {
    let health = Health::default();
    let context = Context {
        health: health.clone(),
        metrics: metrics.clone(),
    };
    let producer = kafka
        .client_config("qp-gateway")?
        .set("enable.idempotence", "true")
        .set("message.max.bytes", (max_body + 64 * 1024).to_string())
        .set("linger.ms", "5")
        .set("message.timeout.ms", "5000")
        .set("statistics.interval.ms", "1000")
        .create_with_context(context)
        .map_err(|e| Error::Kafka(format!("creating producer: {e}")))?;
    Ok((producer, health))
}

/// Until `stop`: keep `ready` false while the brokers refuse the producer, true otherwise, and
/// give the producer its bootstrap servers again when it has lost every broker.
pub async fn follow(
    producer: Producer,
    health: Health,
    bootstrap: String,
    metrics: Metrics,
    ready: Readiness,
    stop: CancellationToken,
) {
    let mut refused = false;
    loop {
        if health.brokers.recover(producer.client(), &bootstrap) {
            metrics
                .kafka_rebootstraps
                .with_label_values(&["producer"])
                .inc();
        }
        let now = health.refusal.reason().is_some();
        if now != refused {
            refused = now;
            if !now {
                info!("Kafka accepts the gateway again; ready");
            }
        }
        ready.set(!refused);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}
