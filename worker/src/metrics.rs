//! Prometheus metrics of a worker (and of the gateway, which shares the process model).
//!
//! One registry per process, exposed on `/metrics`. Names follow Prometheus conventions:
//! `_total` counters, `_seconds` histograms, base units.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric a worker exports. Cheap to clone (the metrics are reference-counted).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Messages by final outcome: done, failed, duplicate, dead_letter.
    pub messages: IntCounterVec,
    /// Handler retries after a retryable failure.
    pub retries: IntCounter,
    /// Time in the handler, per message (all attempts).
    pub processing_seconds: Histogram,
    /// Time a message waited for a token.
    pub token_wait_seconds: Histogram,
    /// Leases this worker holds right now (in use or idle in its local pool).
    pub tokens_held: IntGauge,
    /// Messages being handled right now.
    pub in_flight: IntGauge,
    /// Leases the pool took back because they expired before renewal.
    pub leases_lost: IntCounter,
    /// Offset commits that failed.
    pub commit_errors: IntCounter,
    /// Kafka partitions paused because the handler fell behind (back-pressure), and how many
    /// are paused now. A fast worker should show none.
    pub kafka_pauses: IntCounter,
    pub kafka_paused_partitions: IntGauge,
    /// Consumer lag per partition as librdkafka sees it (from its statistics).
    pub partition_lag: IntGaugeVec,
    /// Brokers a Kafka client (`client`: consumer, producer) can ask for metadata, from its
    /// statistics. 0 means it has lost them all ([`qp_protocol::kafka::BrokerLoss`]).
    pub kafka_brokers: IntGaugeVec,
    /// Times a Kafka client was handed its bootstrap servers again after it lost every broker.
    pub kafka_rebootstraps: IntCounterVec,
    /// Dead letters written, by reason class (malformed, oversized, failed).
    pub dead_letters: IntCounterVec,
    /// Gateway: HTTP requests by route and status code.
    pub http_requests: IntCounterVec,
    /// Gateway: request latency by route.
    pub http_seconds: HistogramVec,
    /// Gateway: how long long-polls waited, by how they ended (result, timeout).
    pub longpoll_seconds: HistogramVec,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let messages = IntCounterVec::new(
            Opts::new("qp_worker_messages_total", "Messages by final outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let retries = IntCounter::new("qp_worker_handler_retries_total", "Handler retries")
            .expect("valid metric");
        let processing_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "qp_worker_processing_seconds",
                "Time spent in the handler per message, all attempts",
            )
            .buckets(latency_buckets()),
        )
        .expect("valid metric");
        let token_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "qp_worker_token_wait_seconds",
                "Time a message waited for a token from the global pool",
            )
            .buckets(latency_buckets()),
        )
        .expect("valid metric");
        let tokens_held = IntGauge::new("qp_worker_tokens_held", "Leases held by this worker")
            .expect("valid metric");
        let in_flight =
            IntGauge::new("qp_worker_in_flight", "Messages being handled").expect("valid metric");
        let leases_lost = IntCounter::new(
            "qp_worker_leases_lost_total",
            "Leases that expired unrenewed",
        )
        .expect("valid metric");
        let commit_errors =
            IntCounter::new("qp_worker_commit_errors_total", "Failed offset commits")
                .expect("valid metric");
        let kafka_pauses = IntCounter::new(
            "qp_worker_kafka_pauses_total",
            "Kafka partitions paused under back-pressure (too many fetched but unfinished messages)",
        )
        .expect("valid metric");
        let kafka_paused_partitions = IntGauge::new(
            "qp_worker_kafka_paused_partitions",
            "Kafka partitions paused under back-pressure now",
        )
        .expect("valid metric");
        let partition_lag = IntGaugeVec::new(
            Opts::new(
                "qp_worker_partition_lag",
                "Consumer lag per assigned partition, as seen by this worker",
            ),
            &["partition"],
        )
        .expect("valid metric");
        let kafka_brokers = IntGaugeVec::new(
            Opts::new(
                "qp_worker_kafka_brokers",
                "Brokers this process's Kafka client can ask for metadata (0: it lost them all)",
            ),
            &["client"],
        )
        .expect("valid metric");
        let kafka_rebootstraps = IntCounterVec::new(
            Opts::new(
                "qp_worker_kafka_rebootstraps_total",
                "Times a Kafka client was given its bootstrap servers again after losing every broker",
            ),
            &["client"],
        )
        .expect("valid metric");
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "qp_worker_dead_letters_total",
                "Messages sent to the dead letter",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new("qp_gateway_requests_total", "Gateway HTTP requests"),
            &["route", "code"],
        )
        .expect("valid metric");
        let http_seconds = HistogramVec::new(
            HistogramOpts::new("qp_gateway_request_seconds", "Gateway request latency")
                .buckets(latency_buckets()),
            &["route"],
        )
        .expect("valid metric");
        let longpoll_seconds = HistogramVec::new(
            HistogramOpts::new(
                "qp_gateway_longpoll_wait_seconds",
                "How long long-polls waited, by how they ended",
            )
            .buckets(latency_buckets()),
            &["ended"],
        )
        .expect("valid metric");
        for c in [
            Box::new(messages.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(retries.clone()),
            Box::new(processing_seconds.clone()),
            Box::new(token_wait_seconds.clone()),
            Box::new(tokens_held.clone()),
            Box::new(in_flight.clone()),
            Box::new(leases_lost.clone()),
            Box::new(commit_errors.clone()),
            Box::new(kafka_pauses.clone()),
            Box::new(kafka_paused_partitions.clone()),
            Box::new(partition_lag.clone()),
            Box::new(kafka_brokers.clone()),
            Box::new(kafka_rebootstraps.clone()),
            Box::new(dead_letters.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_seconds.clone()),
            Box::new(longpoll_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            messages,
            retries,
            processing_seconds,
            token_wait_seconds,
            tokens_held,
            in_flight,
            leases_lost,
            commit_errors,
            kafka_pauses,
            kafka_paused_partitions,
            partition_lag,
            kafka_brokers,
            kafka_rebootstraps,
            dead_letters,
            http_requests,
            http_seconds,
            longpoll_seconds,
        }
    }

    /// The text exposition format for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.messages.with_label_values(&["done"]).inc();
        m.partition_lag.with_label_values(&["0"]).set(3);
        m.dead_letters.with_label_values(&["malformed"]).inc();
        m.http_requests.with_label_values(&["submit", "202"]).inc();
        m.http_seconds.with_label_values(&["submit"]).observe(0.01);
        m.longpoll_seconds
            .with_label_values(&["result"])
            .observe(0.01);
        let text = m.render();
        for name in [
            "qp_worker_messages_total",
            "qp_worker_processing_seconds",
            "qp_worker_token_wait_seconds",
            "qp_worker_tokens_held",
            "qp_worker_in_flight",
            "qp_worker_commit_errors_total",
            "qp_worker_kafka_pauses_total",
            "qp_worker_kafka_paused_partitions",
            "qp_worker_partition_lag",
            "qp_worker_dead_letters_total",
            "qp_gateway_requests_total",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
