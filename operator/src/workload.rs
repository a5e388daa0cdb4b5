//! What a worker or gateway process is told: the `qp-worker` arguments and environment that a
//! QueueProcessor translates to. Pure, and shared by both backends: the Kubernetes builder turns
//! it into a pod spec (secrets as `secretKeyRef`, files as Secret volumes), local mode into a
//! process environment (secrets read from a local directory).

use crate::crd::{DeadLetter, Handler, QueueProcessor, RedisEndpoint, SecretKeyRef, Source};

/// Which `qp-worker` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Worker,
    Gateway,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Worker => "worker",
            Component::Gateway => "gateway",
        }
    }

    /// The `qp-worker` subcommand.
    pub fn subcommand(self) -> &'static str {
        match self {
            Component::Worker => "run",
            Component::Gateway => "gateway",
        }
    }
}

/// One environment value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    /// A literal.
    Value(String),
    /// The value of a Secret key (never copied into the pod spec).
    Secret(SecretKeyRef),
    /// The path where a Secret key is mounted as a file (TLS material).
    SecretFile(SecretKeyRef),
    /// The pod's own name (downward API); the process id in local mode.
    PodName,
}

/// Arguments and environment of one `qp-worker` process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    pub component: Component,
    pub args: Vec<String>,
    pub env: Vec<(String, EnvValue)>,
}

/// Port of `/metrics`, the probes and (gateway) the API, inside the pod.
pub const PORT: u16 = 9090;

fn v(s: impl Into<String>) -> EnvValue {
    EnvValue::Value(s.into())
}

/// The `--handler` value for a handler spec.
pub fn handler_flag(qp: &QueueProcessor) -> Option<(String, u64)> {
    Some(match qp.spec.worker.handler.get()? {
        Handler::Http(h) => (h.url.clone(), h.timeout_seconds as u64 * 1000),
        Handler::Exec(e) => (
            format!("exec:{}", e.command.join(" ")),
            e.timeout_seconds as u64 * 1000,
        ),
        Handler::Builtin(b) => {
            let spec = match b.name.as_str() {
                "sleep" => format!("sleep:{}", b.sleep_millis()),
                "fail" => format!("fail:{}", b.fail_pattern.as_deref().unwrap_or("fail")),
                other => other.to_owned(),
            };
            (spec, 30_000)
        }
    })
}

/// The process configuration of a component. `None` when the spec is invalid (validation
/// reports why before anything is built).
pub fn process(qp: &QueueProcessor, component: Component) -> Option<ProcessConfig> {
    let spec = &qp.spec;
    let name = qp.metadata.name.clone()?;
    let namespace = qp.namespace_or_default();
    let mut env: Vec<(String, EnvValue)> = vec![
        ("QP_NAMESPACE".into(), v(namespace)),
        ("QP_NAME".into(), v(name)),
        ("QP_LISTEN".into(), v(format!("0.0.0.0:{PORT}"))),
        ("QP_LOG_FORMAT".into(), v("json")),
        (
            "QP_RESULT_TTL_SECONDS".into(),
            v(spec.results.ttl_seconds.to_string()),
        ),
    ];
    match spec.redis.endpoint()? {
        RedisEndpoint::Url(u) => env.push(("QP_REDIS_URL".into(), v(u))),
        RedisEndpoint::Cluster(nodes) => {
            env.push(("QP_REDIS_CLUSTER_NODES".into(), v(nodes.join(","))))
        }
    }
    if spec.redis.uses_tls() {
        env.push(("QP_REDIS_TLS".into(), v("true")));
    }
    if let Some(p) = &spec.redis.password_secret_ref {
        env.push(("QP_REDIS_PASSWORD".into(), EnvValue::Secret(p.clone())));
    }
    if let Some(u) = &spec.redis.username_secret_ref {
        env.push(("QP_REDIS_USERNAME".into(), EnvValue::Secret(u.clone())));
    }
    match spec.source.get()? {
        Source::Kafka(k) => {
            env.push(("QP_SOURCE".into(), v("kafka")));
            env.push(("QP_KAFKA_BOOTSTRAP".into(), v(&k.bootstrap_servers)));
            env.push(("QP_KAFKA_TOPIC".into(), v(&k.topic)));
            env.push(("QP_KAFKA_GROUP".into(), v(&k.consumer_group)));
            if let Some(sasl) = &k.sasl {
                env.push(("QP_KAFKA_SASL_MECHANISM".into(), v(sasl.mechanism.as_str())));
                env.push((
                    "QP_KAFKA_USERNAME".into(),
                    EnvValue::Secret(sasl.username_secret_ref.clone()),
                ));
                env.push((
                    "QP_KAFKA_PASSWORD".into(),
                    EnvValue::Secret(sasl.password_secret_ref.clone()),
                ));
            }
            if let Some(tls) = &k.tls {
                env.push(("QP_KAFKA_TLS".into(), v("true")));
                if let Some(ca) = &tls.ca_secret_ref {
                    env.push(("QP_KAFKA_CA_FILE".into(), EnvValue::SecretFile(ca.clone())));
                }
                if let Some(c) = &tls.client_cert_secret_ref {
                    env.push(("QP_KAFKA_CERT_FILE".into(), EnvValue::SecretFile(c.clone())));
                }
                if let Some(c) = &tls.client_key_secret_ref {
                    env.push(("QP_KAFKA_KEY_FILE".into(), EnvValue::SecretFile(c.clone())));
                }
            }
            if component == Component::Worker {
                env.push((
                    "QP_MAX_PENDING_PER_PARTITION".into(),
                    v(k.max_in_flight_per_partition.to_string()),
                ));
            }
        }
        Source::RedisList(r) => {
            env.push(("QP_SOURCE".into(), v("redis-list")));
            env.push(("QP_LIST_KEY".into(), v(&r.key)));
            if component == Component::Worker {
                env.push((
                    "QP_DEAD_AFTER_MS".into(),
                    v((i64::from(r.reclaim_after_seconds) * 1000).to_string()),
                ));
            }
        }
    }
    if component == Component::Worker {
        let (handler, timeout_ms) = handler_flag(qp)?;
        let c = &spec.concurrency;
        env.extend([
            ("QP_WORKER_ID".into(), EnvValue::PodName),
            ("QP_HANDLER".into(), v(handler)),
            ("QP_HANDLER_TIMEOUT_MS".into(), v(timeout_ms.to_string())),
            (
                "QP_MAX_CONCURRENCY".into(),
                v(c.per_replica_tokens.to_string()),
            ),
            (
                "QP_LEASE_TTL_MS".into(),
                v((i64::from(c.lease_seconds) * 1000).to_string()),
            ),
            ("QP_RETRIES".into(), v(spec.results.max_retries.to_string())),
            (
                "QP_RETRY_BACKOFF_MS".into(),
                v(spec.results.retry_backoff_millis.to_string()),
            ),
            (
                "QP_DRAIN_TIMEOUT_SECONDS".into(),
                v(spec.worker.shutdown_timeout_seconds.to_string()),
            ),
        ]);
        if let Some(dl) = spec.results.dead_letter.as_ref().and_then(|d| d.get()) {
            let target = match dl {
                DeadLetter::KafkaTopic(t) => format!("kafka:{t}"),
                DeadLetter::RedisList(l) => format!("redis:{l}"),
            };
            env.push(("QP_DEAD_LETTER".into(), v(target)));
        }
    }
    Some(ProcessConfig {
        component,
        args: vec![component.subcommand().to_owned()],
        env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp(yaml: &str) -> QueueProcessor {
        serde_yaml::from_str(yaml).unwrap()
    }

    const KAFKA: &str = r#"
apiVersion: queueprocessing.dev/v1alpha1
kind: QueueProcessor
metadata: {name: orders, namespace: shop}
spec:
  source:
    kafka:
      bootstrapServers: kafka:9092
      topic: orders
      consumerGroup: orders-workers
      sasl:
        mechanism: SCRAM-SHA-512
        usernameSecretRef: {name: kafka-creds, key: user}
        passwordSecretRef: {name: kafka-creds, key: password}
  redis:
    url: redis://redis:6379
    passwordSecretRef: {name: redis, key: password}
  worker:
    handler:
      http: {url: "http://127.0.0.1:8080/work"}
  results:
    deadLetter: {kafkaTopic: orders-dlq}
"#;

    fn get<'a>(c: &'a ProcessConfig, k: &str) -> Option<&'a EnvValue> {
        c.env.iter().find(|(n, _)| n == k).map(|(_, v)| v)
    }

    #[test]
    fn kafka_worker_env() {
        let q = qp(KAFKA);
        let c = process(&q, Component::Worker).unwrap();
        assert_eq!(c.args, vec!["run"]);
        assert_eq!(get(&c, "QP_KAFKA_TOPIC"), Some(&v("orders")));
        assert_eq!(
            get(&c, "QP_HANDLER"),
            Some(&v("http://127.0.0.1:8080/work"))
        );
        assert_eq!(get(&c, "QP_DEAD_LETTER"), Some(&v("kafka:orders-dlq")));
        assert_eq!(get(&c, "QP_WORKER_ID"), Some(&EnvValue::PodName));
        // Secrets stay references.
        assert!(matches!(
            get(&c, "QP_REDIS_PASSWORD"),
            Some(EnvValue::Secret(r)) if r.name == "redis" && r.key == "password"
        ));
        assert!(matches!(
            get(&c, "QP_KAFKA_PASSWORD"),
            Some(EnvValue::Secret(_))
        ));
        assert_eq!(get(&c, "QP_MAX_CONCURRENCY"), Some(&v("8")));
    }

    #[test]
    fn gateway_env_has_no_worker_settings() {
        let c = process(&qp(KAFKA), Component::Gateway).unwrap();
        assert_eq!(c.args, vec!["gateway"]);
        assert!(get(&c, "QP_HANDLER").is_none());
        assert!(get(&c, "QP_KAFKA_TOPIC").is_some());
    }

    #[test]
    fn builtin_handlers() {
        let mut q = qp(KAFKA);
        q.spec.worker.handler =
            serde_yaml::from_str("builtin: {name: sleep, sleepMillis: 25}").unwrap();
        assert_eq!(handler_flag(&q).unwrap().0, "sleep:25");
        q.spec.worker.handler = serde_yaml::from_str("exec: {command: [tr, a-z, A-Z]}").unwrap();
        assert_eq!(handler_flag(&q).unwrap().0, "exec:tr a-z A-Z");
    }
}
