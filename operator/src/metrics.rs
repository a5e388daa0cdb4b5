//! The operator's Prometheus metrics. Per-QueueProcessor gauges carry `namespace` and
//! `queueprocessor` labels, the same names the worker scrape targets carry, so dashboards join
//! them directly.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// Time from a measurement that changes the decision to the replicas being applied.
    pub decision_latency: Histogram,
    pub backlog: IntGaugeVec,
    pub partition_lag_max: IntGaugeVec,
    pub desired_replicas: IntGaugeVec,
    pub ready_replicas: IntGaugeVec,
    pub tokens_limit: IntGaugeVec,
    pub tokens_in_use: IntGaugeVec,
    pub throughput: GaugeVec,
    pub source_up: IntGaugeVec,
    pub local_restarts: IntCounterVec,
    pub leader: IntGauge,
    pub kafka_requests: IntCounter,
    /// Status writes sent to the API server (each is one request, changed or not).
    pub status_writes: IntCounter,
}

const QP: &[&str] = &["namespace", "queueprocessor"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), QP).expect("valid metric")
        };
        let m = Metrics {
            reconciles: IntCounterVec::new(
                Opts::new("qp_operator_reconciles_total", "Reconciles by result"),
                &["result"],
            )
            .expect("valid metric"),
            reconcile_errors: IntCounterVec::new(
                Opts::new(
                    "qp_operator_reconcile_errors_total",
                    "Reconcile errors by kind",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "qp_operator_reconcile_duration_seconds",
                    "Reconcile duration",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )
            .expect("valid metric"),
            decision_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "qp_operator_decision_latency_seconds",
                    "From measuring a backlog that changes the decision to the replicas applied",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )
            .expect("valid metric"),
            backlog: gauge(
                "qp_operator_backlog",
                "Messages waiting (lag or list length)",
            ),
            // The largest lag of one partition, not one series per partition: a thousand
            // QueueProcessors on 100-partition topics made 100 000 series (most of the
            // operator's memory, and a cardinality problem for Prometheus). Each worker exports
            // the lag of the partitions it owns (`qp_worker_partition_lag`).
            partition_lag_max: gauge(
                "qp_operator_partition_lag_max",
                "Largest consumer-group lag of one partition (skew: compare with backlog)",
            ),
            desired_replicas: gauge("qp_operator_desired_replicas", "Replicas the policy wants"),
            ready_replicas: gauge("qp_operator_ready_replicas", "Ready worker replicas"),
            tokens_limit: gauge(
                "qp_operator_tokens_limit",
                "Token pool limit written to Redis",
            ),
            tokens_in_use: gauge("qp_operator_tokens_in_use", "Leases held right now"),
            throughput: GaugeVec::new(
                Opts::new("qp_operator_throughput", "Messages processed per second"),
                QP,
            )
            .expect("valid metric"),
            source_up: gauge(
                "qp_operator_source_up",
                "1 when the source could be measured",
            ),
            local_restarts: IntCounterVec::new(
                Opts::new(
                    "qp_operator_local_restarts_total",
                    "Local mode: worker processes restarted after a crash",
                ),
                QP,
            )
            .expect("valid metric"),
            leader: IntGauge::new("qp_operator_leader", "1 while this replica leads")
                .expect("valid metric"),
            kafka_requests: IntCounter::new(
                "qp_operator_kafka_requests_total",
                "Requests sent to Kafka brokers by the lag probes",
            )
            .expect("valid metric"),
            status_writes: IntCounter::new(
                "qp_operator_status_writes_total",
                "QueueProcessor status writes sent to the API server",
            )
            .expect("valid metric"),
            registry,
        };
        for c in [
            Box::new(m.reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.reconcile_errors.clone()),
            Box::new(m.reconcile_duration.clone()),
            Box::new(m.decision_latency.clone()),
            Box::new(m.backlog.clone()),
            Box::new(m.partition_lag_max.clone()),
            Box::new(m.desired_replicas.clone()),
            Box::new(m.ready_replicas.clone()),
            Box::new(m.tokens_limit.clone()),
            Box::new(m.tokens_in_use.clone()),
            Box::new(m.throughput.clone()),
            Box::new(m.source_up.clone()),
            Box::new(m.local_restarts.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.kafka_requests.clone()),
            Box::new(m.status_writes.clone()),
        ] {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// Forget a deleted QueueProcessor's series.
    pub fn forget(&self, namespace: &str, name: &str) {
        let l = [namespace, name];
        for g in [
            &self.backlog,
            &self.partition_lag_max,
            &self.desired_replicas,
            &self.ready_replicas,
            &self.tokens_limit,
            &self.tokens_in_use,
            &self.source_up,
        ] {
            let _ = g.remove_label_values(&l);
        }
        let _ = self.throughput.remove_label_values(&l);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
