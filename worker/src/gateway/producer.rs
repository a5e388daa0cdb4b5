//! The gateway's Kafka producer, and what it tells readiness: a gateway whose brokers refuse
//! its credentials or certificate can queue nothing, so it must leave the Service's endpoints
//! (unready) instead of answering every submit with a 503 while looking healthy. librdkafka
//! keeps retrying; when the Secret is fixed, a broker accepts it and the gateway is ready again.

use std::time::Duration;

use qp_protocol::kafka::Refusal;
use qp_protocol::observability::Readiness;
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Error, Result};
use qp_protocol::settings::KafkaArgs;

/// How often readiness follows the producer's refusal state (and statistics arrive).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// librdkafka callbacks of the gateway's producer.
#[derive(Default)]
pub struct Context {
    refusal: Refusal,
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        self.refusal.stats(&stats);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if self.refusal.error(&error, reason) {
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
pub fn producer(kafka: &KafkaArgs, max_body: usize) -> Result<(Producer, Refusal)> {
    let context = Context::default();
    let refusal = context.refusal.clone();
    let producer = kafka
        .client_config("qp-gateway")?
        .set("enable.idempotence", "true")
        .set("message.max.bytes", (max_body + 64 * 1024).to_string())
        .set("linger.ms", "5")
        .set("message.timeout.ms", "5000")
        .set("statistics.interval.ms", "1000")
        .create_with_context(context)
        .map_err(|e| Error::Kafka(format!("creating producer: {e}")))?;
    Ok((producer, refusal))
}

/// Keep `ready` false while the brokers refuse the producer, true otherwise, until `stop`.
pub async fn follow_refusal(refusal: Refusal, ready: Readiness, stop: CancellationToken) {
    let mut refused = false;
    loop {
        let now = refusal.reason().is_some();
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
