//! Admission without an API server: [`QueueProcessor::from_yaml`] parses strictly, and
//! [`QueueProcessorSpec::validate`] mirrors the schema's ranges and CEL rules.

use std::fmt;

use super::schema::{
    BUILTIN_RULES, CONCURRENCY_RULES, CelRule, DEAD_LETTER_RULES, GATEWAY_RULES, HANDLER_RULES,
    HTTP_HANDLER_RULES, HTTP_HEADER_RULES, KAFKA_TLS_RULES, MAX_BACKOFF_MILLIS, MAX_CLUSTER_NODES,
    MAX_GATEWAY_REPLICAS, MAX_GLOBAL_TOKENS, MAX_HANDLER_HEADERS, MAX_IN_FLIGHT_PER_PARTITION,
    MAX_LEASE_SECONDS, MAX_POLL_INTERVAL_SECONDS, MAX_REPLICAS, MAX_RESULT_TTL_SECONDS,
    MAX_RETRIES, MAX_SLEEP_MILLIS, MAX_TIMEOUT_SECONDS, MAX_TOKENS_PER_REPLICA, MAX_WINDOW_SECONDS,
    MIN_LEASE_SECONDS, REDIS_RULES, SCALING_RULES, SIGNAL_RULES, SOURCE_RULES, SPEC_RULES,
};
use super::signals::{MAX_SIGNALS, SignalKind};
use super::{API_VERSION, BuiltinName, KIND, QueueProcessor, QueueProcessorSpec};

impl QueueProcessor {
    /// Parse a QueueProcessor manifest the way the API server would admit it: unknown fields are
    /// errors, omitted fields get the schema defaults, and [`QueueProcessorSpec::validate`]
    /// applies the ranges and cross-field rules. For objects that never pass through an API
    /// server (local mode).
    pub fn from_yaml(text: &str) -> Result<QueueProcessor, SpecError> {
        let input: serde_json::Value = serde_yaml::from_str(text).map_err(SpecError::Parse)?;
        let api_version = input.get("apiVersion").and_then(|v| v.as_str());
        let kind = input.get("kind").and_then(|v| v.as_str());
        if api_version != Some(API_VERSION) || kind != Some(KIND) {
            return Err(SpecError::WrongKind {
                api_version: api_version.unwrap_or_default().to_string(),
                kind: kind.unwrap_or_default().to_string(),
            });
        }
        let qp: QueueProcessor = serde_yaml::from_str(text).map_err(SpecError::Parse)?;
        let round_trip = serde_json::to_value(&qp).expect("a QueueProcessor serializes to JSON");
        let mut unknown = Vec::new();
        unknown_fields(&input, &round_trip, "", &mut unknown);
        if !unknown.is_empty() {
            return Err(SpecError::UnknownFields(unknown));
        }
        qp.spec.validate()?;
        Ok(qp)
    }
}

/// Collect the paths of object keys that are in `input` but did not survive a round trip
/// through the Rust types (`output`): those are fields the schema does not know.
fn unknown_fields(
    input: &serde_json::Value,
    output: &serde_json::Value,
    path: &str,
    unknown: &mut Vec<String>,
) {
    use serde_json::Value;
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    Some(ov) => unknown_fields(v, ov, &p, unknown),
                    None if v.is_null() => {}
                    None => unknown.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (iv, ov)) in i.iter().zip(o).enumerate() {
                unknown_fields(iv, ov, &format!("{path}[{n}]"), unknown);
            }
        }
        _ => {}
    }
}

/// Why a QueueProcessor manifest was rejected by [`QueueProcessor::from_yaml`] or
/// [`QueueProcessorSpec::validate`].
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not YAML, or a field has the wrong type.
    #[error("invalid QueueProcessor manifest: {0}")]
    Parse(#[source] serde_yaml::Error),
    /// Not a `queueprocessing.dev/v1alpha1` `QueueProcessor`.
    #[error(
        "expected apiVersion {API_VERSION} and kind {KIND}, got apiVersion {api_version:?} and kind {kind:?}"
    )]
    WrongKind {
        /// The manifest's apiVersion.
        api_version: String,
        /// The manifest's kind.
        kind: String,
    },
    /// Fields the schema does not define (for example an inline `password`).
    #[error("unknown fields: {}", .0.join(", "))]
    UnknownFields(Vec<String>),
    /// Values out of range, or cross-field rules broken; one message per problem.
    #[error("invalid QueueProcessor: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// Accumulates validation failures with messages in the API server's style.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn rule(&mut self, ok: bool, rule: &CelRule) {
        if !ok {
            self.0.push(rule.message.to_string());
        }
    }
    fn range<T: PartialOrd + fmt::Display>(&mut self, path: &str, v: T, min: T, max: Option<T>) {
        if v < min {
            self.0.push(format!(
                "{path}: Invalid value: {v}: should be greater than or equal to {min}"
            ));
        }
        if let Some(max) = max
            && v > max
        {
            self.0.push(format!(
                "{path}: Invalid value: {v}: should be less than or equal to {max}"
            ));
        }
    }
    fn non_empty(&mut self, path: &str, s: &str) {
        if s.is_empty() {
            self.0.push(format!(
                "{path}: Invalid value: \"\": should be at least 1 chars long"
            ));
        }
    }
    fn prefix(&mut self, path: &str, s: &str, prefixes: &[&str]) {
        if !prefixes.iter().any(|p| s.starts_with(p)) {
            self.0.push(format!(
                "{path}: Invalid value: {s:?}: should start with {}",
                prefixes.join(" or ")
            ));
        }
    }
}

impl QueueProcessorSpec {
    /// Check the ranges and cross-field rules the API server enforces through the schema and
    /// its CEL rules, with the same messages. (The API server additionally checks string
    /// patterns such as Secret names and topic characters.)
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut p = Problems::default();

        // spec.source
        p.rule(self.source.get().is_some(), &SOURCE_RULES[0]);
        if let Some(k) = &self.source.kafka {
            p.non_empty("spec.source.kafka.bootstrapServers", &k.bootstrap_servers);
            p.non_empty("spec.source.kafka.topic", &k.topic);
            p.non_empty("spec.source.kafka.consumerGroup", &k.consumer_group);
            p.range(
                "spec.source.kafka.maxInFlightPerPartition",
                k.max_in_flight_per_partition,
                1,
                Some(MAX_IN_FLIGHT_PER_PARTITION),
            );
            p.range(
                "spec.source.kafka.sessionTimeoutMillis",
                k.session_timeout_millis,
                1000,
                Some(300_000),
            );
            if let Some(tls) = &k.tls {
                p.rule(
                    tls.client_cert_secret_ref.is_some() == tls.client_key_secret_ref.is_some(),
                    &KAFKA_TLS_RULES[0],
                );
            }
        }
        if let Some(r) = &self.source.redis_list {
            p.non_empty("spec.source.redisList.key", &r.key);
            p.range(
                "spec.source.redisList.reclaimAfterSeconds",
                r.reclaim_after_seconds,
                1,
                Some(MAX_LEASE_SECONDS),
            );
        }
        if let Some(st) = &self.source.redis_stream {
            p.non_empty("spec.source.redisStream.key", &st.key);
            p.non_empty("spec.source.redisStream.group", &st.group);
            p.range(
                "spec.source.redisStream.claimIdleSeconds",
                st.claim_idle_seconds,
                1,
                Some(MAX_LEASE_SECONDS),
            );
        }

        // spec.redis
        let redis = &self.redis;
        p.rule(redis.endpoint().is_some(), &REDIS_RULES[0]);
        if let Some(url) = &redis.url {
            p.prefix("spec.redis.url", url, &["redis://", "rediss://"]);
            p.rule(!url.contains('@'), &REDIS_RULES[1]);
        }
        if let Some(nodes) = &redis.cluster_nodes {
            if nodes.is_empty() || nodes.len() > MAX_CLUSTER_NODES {
                p.0.push(format!(
                    "spec.redis.clusterNodes: must have between 1 and {MAX_CLUSTER_NODES} items"
                ));
            }
            for (i, n) in nodes.iter().enumerate() {
                p.non_empty(&format!("spec.redis.clusterNodes[{i}]"), n);
            }
            p.rule(nodes.iter().all(|n| !n.contains('@')), &REDIS_RULES[2]);
        }

        // spec.concurrency
        let c = &self.concurrency;
        p.range(
            "spec.concurrency.perReplicaTokens",
            c.per_replica_tokens,
            1,
            Some(MAX_TOKENS_PER_REPLICA),
        );
        p.range(
            "spec.concurrency.globalMaxTokens",
            c.global_max_tokens,
            1,
            Some(MAX_GLOBAL_TOKENS),
        );
        p.range(
            "spec.concurrency.leaseSeconds",
            c.lease_seconds,
            MIN_LEASE_SECONDS,
            Some(MAX_LEASE_SECONDS),
        );
        p.rule(
            c.per_replica_tokens <= c.global_max_tokens,
            &CONCURRENCY_RULES[0],
        );

        // spec.scaling
        let s = &self.scaling;
        p.range(
            "spec.scaling.minReplicas",
            s.min_replicas,
            0,
            Some(MAX_REPLICAS),
        );
        p.range(
            "spec.scaling.maxReplicas",
            s.max_replicas,
            1,
            Some(MAX_REPLICAS),
        );
        p.range(
            "spec.scaling.activationBacklog",
            s.activation_backlog,
            0,
            None,
        );
        p.range(
            "spec.scaling.targetBacklogPerReplica",
            s.target_backlog_per_replica,
            1,
            None,
        );
        p.range(
            "spec.scaling.targetDrainSeconds",
            s.target_drain_seconds,
            1,
            Some(MAX_WINDOW_SECONDS),
        );
        p.range(
            "spec.scaling.pollIntervalSeconds",
            s.poll_interval_seconds,
            1,
            Some(MAX_POLL_INTERVAL_SECONDS),
        );
        p.range(
            "spec.scaling.cooldownSeconds",
            s.cooldown_seconds,
            0,
            Some(MAX_WINDOW_SECONDS),
        );
        p.range(
            "spec.scaling.scaleDownStabilizationSeconds",
            s.scale_down_stabilization_seconds,
            0,
            Some(MAX_WINDOW_SECONDS),
        );
        p.range("spec.scaling.maxStep", s.max_step, 1, Some(MAX_REPLICAS));
        p.rule(s.min_replicas <= s.max_replicas, &SCALING_RULES[0]);
        if s.signals.len() > MAX_SIGNALS {
            p.0.push(format!(
                "spec.scaling.signals: Too many: {}: must have at most {MAX_SIGNALS} items",
                s.signals.len()
            ));
        }
        for (i, sig) in s.signals.iter().enumerate() {
            let at = |f: &str| format!("spec.scaling.signals[{i}].{f}");
            p.non_empty(&at("name"), &sig.name);
            p.non_empty(&at("key"), &sig.key);
            p.range(&at("targetPerReplica"), sig.target_per_replica, 1, None);
            p.range(&at("activation"), sig.activation, 0, None);
            let stream_group =
                matches!(sig.kind, SignalKind::StreamLag | SignalKind::StreamPending);
            p.rule(
                (sig.kind == SignalKind::HashField) == sig.field.is_some(),
                &SIGNAL_RULES[0],
            );
            p.rule(stream_group == sig.group.is_some(), &SIGNAL_RULES[1]);
            p.rule(
                !sig.due_only || sig.kind == SignalKind::SortedSetSize,
                &SIGNAL_RULES[2],
            );
            if let Some(r) = &sig.redis {
                p.rule(r.endpoint().is_some(), &REDIS_RULES[0]);
                p.rule(
                    !r.url.as_deref().unwrap_or_default().contains('@'),
                    &REDIS_RULES[1],
                );
            }
            if s.signals[..i].iter().any(|o| o.name == sig.name) {
                p.0.push(format!("{}: Duplicate value: {:?}", at("name"), sig.name));
            }
        }

        // spec.worker
        let w = &self.worker;
        p.range(
            "spec.worker.shutdownTimeoutSeconds",
            w.shutdown_timeout_seconds,
            1,
            Some(MAX_TIMEOUT_SECONDS),
        );
        p.rule(w.handler.get().is_some(), &HANDLER_RULES[0]);
        if let Some(h) = &w.handler.http {
            p.prefix(
                "spec.worker.handler.http.url",
                &h.url,
                &["http://", "https://"],
            );
            p.range(
                "spec.worker.handler.http.timeoutSeconds",
                h.timeout_seconds,
                1,
                Some(MAX_TIMEOUT_SECONDS),
            );
            p.rule(
                !qp_protocol::settings::url_has_credentials(&h.url),
                &HTTP_HANDLER_RULES[0],
            );
            if h.headers.len() > MAX_HANDLER_HEADERS {
                p.0.push(format!(
                    "spec.worker.handler.http.headers: should have at most {MAX_HANDLER_HEADERS} items"
                ));
            }
            for header in &h.headers {
                p.rule(
                    header.value.is_some() != header.secret_key_ref.is_some(),
                    &HTTP_HEADER_RULES[0],
                );
            }
        }
        if let Some(e) = &w.handler.exec {
            if e.command.is_empty() {
                p.0.push("spec.worker.handler.exec.command: should have at least 1 items".into());
            }
            p.range(
                "spec.worker.handler.exec.timeoutSeconds",
                e.timeout_seconds,
                1,
                Some(MAX_TIMEOUT_SECONDS),
            );
        }
        if let Some(b) = &w.handler.builtin {
            if let Some(ms) = b.sleep_millis {
                p.range(
                    "spec.worker.handler.builtin.sleepMillis",
                    ms,
                    0,
                    Some(MAX_SLEEP_MILLIS),
                );
            }
            p.rule(
                b.sleep_millis.is_none() || b.name == BuiltinName::Sleep,
                &BUILTIN_RULES[0],
            );
            p.rule(
                b.fail_pattern.is_none() || b.name == BuiltinName::Fail,
                &BUILTIN_RULES[1],
            );
        }

        // spec.results
        let r = &self.results;
        p.range(
            "spec.results.ttlSeconds",
            r.ttl_seconds,
            1,
            Some(MAX_RESULT_TTL_SECONDS),
        );
        p.range(
            "spec.results.maxRetries",
            r.max_retries,
            0,
            Some(MAX_RETRIES),
        );
        p.range(
            "spec.results.retryBackoffMillis",
            r.retry_backoff_millis,
            0,
            Some(MAX_BACKOFF_MILLIS),
        );
        p.range(
            "spec.results.maxDeliveries",
            r.max_deliveries,
            0,
            Some(MAX_RETRIES),
        );
        if let Some(dl) = &r.dead_letter {
            p.rule(dl.get().is_some(), &DEAD_LETTER_RULES[0]);
            if let Some(topic) = &dl.kafka_topic {
                p.rule(self.source.kafka.is_some(), &SPEC_RULES[0]);
                if let Some(k) = &self.source.kafka {
                    p.rule(*topic != k.topic, &SPEC_RULES[1]);
                }
            }
            if let (Some(list), Some(src)) = (&dl.redis_list, &self.source.redis_list) {
                p.rule(*list != src.key, &SPEC_RULES[2]);
            }
        }

        // spec.gateway
        p.range(
            "spec.gateway.replicas",
            self.gateway.replicas,
            1,
            Some(MAX_GATEWAY_REPLICAS),
        );
        let auth = &self.gateway.auth;
        p.rule(
            !self.gateway.enabled
                || usize::from(auth.tokens_secret_ref.is_some())
                    + usize::from(auth.disabled)
                    + usize::from(auth.mtls.is_some())
                    == 1,
            &GATEWAY_RULES[0],
        );
        p.range(
            "spec.gateway.rateLimitPerClient",
            self.gateway.rate_limit_per_client,
            0,
            Some(1_000_000),
        );

        if p.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError::Invalid(p.0))
        }
    }
}
