//! What the Rust types add to the generated OpenAPI schema: the limits shared with
//! [`QueueProcessorSpec::validate`](super::QueueProcessorSpec::validate), the CEL rules, and the
//! transforms that attach them and tidy the descriptions.

use kube::core::Rule;

// ------------------------------------------------------------------------------------------------
// Limits shared by the schema (`#[schemars(range(...))]`) and `QueueProcessorSpec::validate`.

pub(super) const MAX_REPLICAS: i32 = 1000;
pub(super) const MAX_TOKENS_PER_REPLICA: i32 = 10_000;
pub(super) const MAX_GLOBAL_TOKENS: i32 = 1_000_000;
pub(super) const MIN_LEASE_SECONDS: i32 = 2;
pub(super) const MAX_LEASE_SECONDS: i32 = 3600;
pub(super) const MAX_TIMEOUT_SECONDS: i32 = 3600;
pub(super) const MAX_RESULT_TTL_SECONDS: i64 = 30 * 24 * 3600;
pub(super) const MAX_RETRIES: i32 = 100;
pub(super) const MAX_BACKOFF_MILLIS: i64 = 600_000;
pub(super) const MAX_SLEEP_MILLIS: i64 = 3_600_000;
pub(super) const MAX_IN_FLIGHT_PER_PARTITION: i32 = 100_000;
pub(super) const MAX_GATEWAY_REPLICAS: i32 = 100;
pub(super) const MAX_CLUSTER_NODES: usize = 100;
pub(super) const MAX_POLL_INTERVAL_SECONDS: i32 = 300;
pub(super) const MAX_WINDOW_SECONDS: i32 = 86_400;

// ------------------------------------------------------------------------------------------------
// CEL rules. Each is attached to the schema of the struct named in its `on` comment, and
// mirrored in Rust by `QueueProcessorSpec::validate` with the same message.

/// A CEL validation rule (`x-kubernetes-validations` entry) as written into the schema.
#[derive(Clone, Copy, Debug)]
pub struct CelRule {
    /// The CEL expression; `self` is the object the rule is attached to.
    pub rule: &'static str,
    /// The error message; it names the field and the rule.
    pub message: &'static str,
    /// Relative path of the field to blame, when it is a single field.
    pub field_path: Option<&'static str>,
}

pub(super) const SPEC_RULES: &[CelRule] = &[
    CelRule {
        rule: "!has(self.results) || !has(self.results.deadLetter) || !has(self.results.deadLetter.kafkaTopic) || has(self.source.kafka)",
        message: "spec.results.deadLetter.kafkaTopic requires a Kafka source (spec.source.kafka); use deadLetter.redisList with a Redis list source",
        field_path: Some(".results.deadLetter.kafkaTopic"),
    },
    CelRule {
        rule: "!has(self.source.kafka) || !has(self.results) || !has(self.results.deadLetter) || !has(self.results.deadLetter.kafkaTopic) || self.results.deadLetter.kafkaTopic != self.source.kafka.topic",
        message: "spec.results.deadLetter.kafkaTopic must differ from spec.source.kafka.topic",
        field_path: Some(".results.deadLetter.kafkaTopic"),
    },
    CelRule {
        rule: "!has(self.source.redisList) || !has(self.results) || !has(self.results.deadLetter) || !has(self.results.deadLetter.redisList) || self.results.deadLetter.redisList != self.source.redisList.key",
        message: "spec.results.deadLetter.redisList must differ from spec.source.redisList.key",
        field_path: Some(".results.deadLetter.redisList"),
    },
];

pub(super) const SOURCE_RULES: &[CelRule] = &[CelRule {
    rule: "(has(self.kafka) ? 1 : 0) + (has(self.redisList) ? 1 : 0) + (has(self.redisStream) ? 1 : 0) == 1",
    message: "spec.source: exactly one of kafka, redisList or redisStream must be set",
    field_path: None,
}];

pub(super) const KAFKA_TLS_RULES: &[CelRule] = &[CelRule {
    rule: "has(self.clientCertSecretRef) == has(self.clientKeySecretRef)",
    message: "spec.source.kafka.tls: clientCertSecretRef and clientKeySecretRef must be set together",
    field_path: None,
}];

pub(super) const REDIS_RULES: &[CelRule] = &[
    CelRule {
        rule: "has(self.url) != has(self.clusterNodes)",
        message: "spec.redis: exactly one of url or clusterNodes must be set",
        field_path: None,
    },
    CelRule {
        rule: "!has(self.url) || !self.url.contains('@')",
        message: "spec.redis.url must not contain credentials: reference a Secret with spec.redis.passwordSecretRef",
        field_path: Some(".url"),
    },
    CelRule {
        rule: "!has(self.clusterNodes) || self.clusterNodes.all(n, !n.contains('@'))",
        message: "spec.redis.clusterNodes must not contain credentials: reference a Secret with spec.redis.passwordSecretRef",
        field_path: Some(".clusterNodes"),
    },
];

pub(super) const CONCURRENCY_RULES: &[CelRule] = &[CelRule {
    rule: "self.perReplicaTokens <= self.globalMaxTokens",
    message: "spec.concurrency.perReplicaTokens must be less than or equal to spec.concurrency.globalMaxTokens",
    field_path: Some(".perReplicaTokens"),
}];

pub(super) const SCALING_RULES: &[CelRule] = &[CelRule {
    rule: "self.minReplicas <= self.maxReplicas",
    message: "spec.scaling.minReplicas must be less than or equal to spec.scaling.maxReplicas",
    field_path: Some(".minReplicas"),
}];

pub(super) const SIGNAL_RULES: &[CelRule] = &[
    CelRule {
        rule: "(self.type == 'hashField') == has(self.field)",
        message: "spec.scaling.signals[].field: set for a hashField signal, and only for it",
        field_path: Some(".field"),
    },
    CelRule {
        rule: "(self.type == 'streamLag' || self.type == 'streamPending') == has(self.group)",
        message: "spec.scaling.signals[].group: set for a streamLag or streamPending signal, and only for them",
        field_path: Some(".group"),
    },
    CelRule {
        rule: "!self.dueOnly || self.type == 'sortedSetSize'",
        message: "spec.scaling.signals[].dueOnly: only for a sortedSetSize signal",
        field_path: Some(".dueOnly"),
    },
];

pub(super) const HANDLER_RULES: &[CelRule] = &[CelRule {
    rule: "(has(self.http) ? 1 : 0) + (has(self.exec) ? 1 : 0) + (has(self.builtin) ? 1 : 0) == 1",
    message: "spec.worker.handler: exactly one of http, exec or builtin must be set",
    field_path: None,
}];

pub(super) const BUILTIN_RULES: &[CelRule] = &[
    CelRule {
        rule: "!has(self.sleepMillis) || self.name == 'sleep'",
        message: "spec.worker.handler.builtin.sleepMillis is only valid with name: sleep",
        field_path: Some(".sleepMillis"),
    },
    CelRule {
        rule: "!has(self.failPattern) || self.name == 'fail'",
        message: "spec.worker.handler.builtin.failPattern is only valid with name: fail",
        field_path: Some(".failPattern"),
    },
];

pub(super) const DEAD_LETTER_RULES: &[CelRule] = &[CelRule {
    rule: "has(self.kafkaTopic) != has(self.redisList)",
    message: "spec.results.deadLetter: exactly one of kafkaTopic or redisList must be set",
    field_path: None,
}];

/// Most headers an HTTP handler sends.
pub const MAX_HANDLER_HEADERS: usize = 16;

pub(super) const HTTP_HANDLER_RULES: &[CelRule] = &[CelRule {
    rule: "!self.url.matches('^https?://[^/?#]*@')",
    message: "spec.worker.handler.http.url must not carry credentials (user:password@): send them as headers from a Secret (http.headers[].secretKeyRef)",
    field_path: Some(".url"),
}];

pub(super) const HTTP_HEADER_RULES: &[CelRule] = &[CelRule {
    rule: "has(self.value) != has(self.secretKeyRef)",
    message: "spec.worker.handler.http.headers[]: exactly one of value or secretKeyRef must be set",
    field_path: None,
}];

pub(super) const GATEWAY_RULES: &[CelRule] = &[CelRule {
    rule: "!self.enabled || (has(self.auth.tokensSecretRef) ? 1 : 0) + (self.auth.disabled ? 1 : 0) + (has(self.auth.mtls) ? 1 : 0) == 1",
    message: "spec.gateway.auth: set tokensSecretRef (a Secret key of <client>:<token> lines), mtls (client certificates) or, to serve without authentication, disabled: true (exactly one)",
    field_path: Some(".auth"),
}];

/// Every CEL rule of the schema, for tests and documentation.
pub const ALL_CEL_RULES: &[&[CelRule]] = &[
    SPEC_RULES,
    SOURCE_RULES,
    KAFKA_TLS_RULES,
    REDIS_RULES,
    CONCURRENCY_RULES,
    SCALING_RULES,
    SIGNAL_RULES,
    HANDLER_RULES,
    BUILTIN_RULES,
    DEAD_LETTER_RULES,
    GATEWAY_RULES,
    HTTP_HANDLER_RULES,
    HTTP_HEADER_RULES,
];

fn add_rules(schema: &mut schemars::Schema, rules: &[CelRule]) {
    for r in rules {
        let mut rule = Rule::new(r.rule).message(r.message);
        if let Some(path) = r.field_path {
            rule = rule.field_path(path);
        }
        kube::core::validate(schema, rule).expect("a CEL rule serializes to JSON");
    }
}

pub(super) fn spec_rules(s: &mut schemars::Schema) {
    add_rules(s, SPEC_RULES)
}
pub(super) fn source_rules(s: &mut schemars::Schema) {
    add_rules(s, SOURCE_RULES)
}
pub(super) fn kafka_tls_rules(s: &mut schemars::Schema) {
    add_rules(s, KAFKA_TLS_RULES)
}
pub(super) fn redis_rules(s: &mut schemars::Schema) {
    add_rules(s, REDIS_RULES)
}
pub(super) fn concurrency_rules(s: &mut schemars::Schema) {
    add_rules(s, CONCURRENCY_RULES)
}
pub(super) fn scaling_rules(s: &mut schemars::Schema) {
    add_rules(s, SCALING_RULES)
}
pub(super) fn signal_rules(s: &mut schemars::Schema) {
    add_rules(s, SIGNAL_RULES)
}
pub(super) fn handler_rules(s: &mut schemars::Schema) {
    add_rules(s, HANDLER_RULES)
}
pub(super) fn builtin_rules(s: &mut schemars::Schema) {
    add_rules(s, BUILTIN_RULES)
}
pub(super) fn http_handler_rules(s: &mut schemars::Schema) {
    add_rules(s, HTTP_HANDLER_RULES)
}

pub(super) fn http_header_rules(s: &mut schemars::Schema) {
    add_rules(s, HTTP_HEADER_RULES)
}

pub(super) fn gateway_rules(s: &mut schemars::Schema) {
    add_rules(s, GATEWAY_RULES)
}

pub(super) fn dead_letter_rules(s: &mut schemars::Schema) {
    add_rules(s, DEAD_LETTER_RULES)
}

/// Doc comments are wrapped at 100 columns; `kubectl explain` re-wraps descriptions itself, so
/// join the lines of each paragraph (of this schema and its direct properties) into one.
pub(super) fn tidy_docs(s: &mut schemars::Schema) {
    fn unwrap(d: &mut serde_json::Value) {
        if let Some(text) = d.as_str() {
            let joined: Vec<String> = text
                .split("\n\n")
                .map(|para| {
                    para.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            *d = serde_json::Value::String(joined.join("\n\n"));
        }
    }
    if let Some(d) = s.get_mut("description") {
        unwrap(d);
    }
    if let Some(props) = s.get_mut("properties").and_then(|p| p.as_object_mut()) {
        for prop in props.values_mut() {
            if let Some(d) = prop.get_mut("description") {
                unwrap(d);
            }
        }
    }
}
