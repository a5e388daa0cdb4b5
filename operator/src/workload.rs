//! What a worker or gateway process is told: the `qp-worker` arguments and environment that a
//! QueueProcessor translates to. Pure, and shared by both backends: the Kubernetes builder turns
//! it into a pod spec (secrets as `secretKeyRef`, files as Secret volumes), local mode into a
//! process environment (secrets read from a local directory).

use std::net::SocketAddr;

pub use qp_protocol::settings::Refs;
use qp_protocol::settings::{
    CommonArgs, GatewayArgs, HandlerSpec, KafkaArgs, LogFormat, OffsetReset, RunArgs, Setting,
    SourceKind, handler_header_env,
};

use crate::crd::{
    BuiltinName, DeadLetter, Handler, QueueProcessor, RedisEndpoint, SecretKeyRef, Source,
};

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

/// One environment value: a literal, a Secret key by reference, a mounted Secret file, or the
/// pod's name.
pub type EnvValue = Setting<SecretKeyRef>;

/// Arguments and environment of one `qp-worker` process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    pub component: Component,
    pub args: Vec<String>,
    pub env: Vec<(String, EnvValue)>,
}

/// Port of `/metrics`, the probes and (gateway) the API, inside the pod.
pub const PORT: u16 = 9090;

/// Port of the gateway's API when it is served over TLS (`spec.gateway.auth.mtls`).
pub const API_TLS_PORT: u16 = 8443;

/// The worker's handler and its timeout in milliseconds.
pub fn handler(qp: &QueueProcessor) -> Option<(HandlerSpec, u64)> {
    let ms = |seconds: i32| u64::from(seconds.max(0).unsigned_abs()) * 1000;
    Some(match qp.spec.worker.handler.get()? {
        Handler::Http(h) => (
            HandlerSpec::Http { url: h.url.clone() },
            ms(h.timeout_seconds),
        ),
        Handler::Exec(e) => (
            HandlerSpec::Exec {
                command: e.command.clone(),
            },
            ms(e.timeout_seconds),
        ),
        Handler::Builtin(b) => {
            let spec = match b.name {
                BuiltinName::Sleep => HandlerSpec::Sleep {
                    millis: b.sleep_millis().max(0) as u64,
                },
                BuiltinName::Fail => HandlerSpec::Fail {
                    pattern: b.fail_pattern.clone().unwrap_or_else(|| "fail".into()),
                },
                BuiltinName::Echo => HandlerSpec::Echo,
            };
            (spec, 30_000)
        }
    })
}

fn non_negative(n: i64) -> u64 {
    n.max(0) as u64
}

/// The process configuration of a component: the typed settings of `qp_protocol::settings`
/// filled from the QueueProcessor and rendered to environment variables. `None` when the spec
/// is invalid (validation reports why before anything is built).
pub fn process(qp: &QueueProcessor, component: Component) -> Option<ProcessConfig> {
    let spec = &qp.spec;
    let mut common = CommonArgs::new(&qp.namespace_or_default(), qp.metadata.name.as_deref()?);
    common.listen = SocketAddr::from(([0, 0, 0, 0], PORT));
    common.log_format = LogFormat::Json;
    match spec.redis.endpoint()? {
        RedisEndpoint::Url(u) => common.redis_url = Some(u.to_owned()),
        RedisEndpoint::Cluster(nodes) => common.redis_cluster_nodes = Some(nodes.join(",")),
    }
    common.redis_tls = spec.redis.uses_tls();
    let mut refs = Refs {
        redis_password: spec.redis.password_secret_ref.clone(),
        redis_username: spec.redis.username_secret_ref.clone(),
        redis_ca_file: spec.redis.ca_secret_ref.clone(),
        ..Refs::default()
    };
    let mut kafka = KafkaArgs::default();
    let source = spec.source.get()?;
    let (kind, list_key) = match source {
        Source::Kafka(k) => {
            kafka.kafka_bootstrap = Some(k.bootstrap_servers.clone());
            kafka.kafka_topic = Some(k.topic.clone());
            kafka.kafka_group = Some(k.consumer_group.clone());
            if let Some(sasl) = &k.sasl {
                kafka.kafka_sasl_mechanism = Some(sasl.mechanism.as_str().to_owned());
                refs.kafka_username = Some(sasl.username_secret_ref.clone());
                refs.kafka_password = Some(sasl.password_secret_ref.clone());
            }
            if let Some(tls) = &k.tls {
                kafka.kafka_tls = true;
                refs.kafka_ca_file = tls.ca_secret_ref.clone();
                refs.kafka_cert_file = tls.client_cert_secret_ref.clone();
                refs.kafka_key_file = tls.client_key_secret_ref.clone();
            }
            (SourceKind::Kafka, None)
        }
        Source::RedisList(r) => (SourceKind::RedisList, Some(r.key.clone())),
        Source::RedisStream(_) => (SourceKind::RedisStream, None),
    };
    let stream_key = match source {
        Source::RedisStream(s) => Some(s.key.clone()),
        _ => None,
    };
    let result_ttl_seconds = non_negative(spec.results.ttl_seconds);
    let env = match component {
        Component::Worker => {
            let (handler, timeout_ms) = handler(qp)?;
            let c = &spec.concurrency;
            let mut run = RunArgs::new(common, kafka, kind, handler);
            run.list_key = list_key;
            run.stream_key = stream_key;
            run.handler_timeout_ms = timeout_ms;
            // An exec handler sees the user's variables, never the operator's (passwords).
            run.exec_pass_env = spec.worker.env.iter().map(|e| e.name.clone()).collect();
            run.max_concurrency = non_negative(c.per_replica_tokens.into()) as usize;
            run.lease_ttl_ms = non_negative(c.lease_seconds.into()) * 1000;
            run.retries = spec.results.max_retries.max(0).unsigned_abs();
            run.retry_backoff_ms = non_negative(spec.results.retry_backoff_millis);
            run.max_deliveries = u64::from(spec.results.max_deliveries.max(0).unsigned_abs());
            run.result_ttl_seconds = result_ttl_seconds;
            run.drain_timeout_seconds = non_negative(spec.worker.shutdown_timeout_seconds.into());
            run.dead_letter = spec
                .results
                .dead_letter
                .as_ref()
                .and_then(|d| d.get())
                .map(|dl| match dl {
                    DeadLetter::KafkaTopic(t) => format!("kafka:{t}"),
                    DeadLetter::RedisList(l) => format!("redis:{l}"),
                });
            match source {
                Source::Kafka(k) => {
                    run.max_pending_per_partition =
                        non_negative(k.max_in_flight_per_partition.into()) as usize;
                    run.kafka_session_timeout_ms = non_negative(k.session_timeout_millis.into());
                    run.kafka_auto_offset_reset = match k.auto_offset_reset {
                        crate::crd::OffsetReset::Earliest => OffsetReset::Earliest,
                        crate::crd::OffsetReset::Latest => OffsetReset::Latest,
                    };
                }
                Source::RedisList(r) => {
                    run.dead_after_ms = non_negative(r.reclaim_after_seconds.into()) * 1000
                }
                Source::RedisStream(s) => {
                    run.stream_group = Some(s.group.clone());
                    run.stream_claim_idle_ms = non_negative(s.claim_idle_seconds.into()) * 1000;
                    run.stream_trim_acknowledged = s.trim_acknowledged;
                }
            }
            refs.worker_id_is_pod_name = true;
            let headers = spec.worker.handler.http.iter().flat_map(|h| &h.headers);
            run.handler_header_names = headers.clone().map(|h| h.name.clone()).collect();
            let mut env = run.render(&refs);
            // Header values: from the Secret by reference, or the literal.
            for (n, h) in headers.enumerate() {
                let value = match (&h.secret_key_ref, &h.value) {
                    (Some(r), _) => Setting::Secret(r.clone()),
                    (None, v) => Setting::Value(v.clone().unwrap_or_default()),
                };
                env.push((handler_header_env(n), value));
            }
            env
        }
        Component::Gateway => {
            let mut gw = GatewayArgs::new(common, kafka, kind);
            gw.list_key = list_key;
            gw.stream_key = stream_key;
            gw.result_ttl_seconds = result_ttl_seconds;
            refs.gateway_tokens_file = spec.gateway.auth.tokens_secret_ref.clone();
            if let Some(m) = &spec.gateway.auth.mtls {
                refs.gateway_tls_cert_file = Some(m.cert_secret_ref.clone());
                refs.gateway_tls_key_file = Some(m.key_secret_ref.clone());
                refs.gateway_client_ca_file = Some(m.client_ca_secret_ref.clone());
                gw.api_listen = SocketAddr::from(([0, 0, 0, 0], API_TLS_PORT));
            }
            gw.no_auth = spec.gateway.auth.disabled;
            gw.rate_limit_per_client = spec.gateway.rate_limit_per_client.max(0).unsigned_abs();
            gw.render(&refs)
        }
    };
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

    fn v(s: &str) -> EnvValue {
        Setting::Value(s.to_owned())
    }

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
        // The session timeout is a tuning setting: absent at its default, rendered otherwise.
        assert_eq!(get(&c, "QP_KAFKA_SESSION_TIMEOUT_MS"), None);
        let mut q = qp(KAFKA);
        q.spec.source.kafka.as_mut().unwrap().session_timeout_millis = 2000;
        let c = process(&q, Component::Worker).unwrap();
        assert_eq!(get(&c, "QP_KAFKA_SESSION_TIMEOUT_MS"), Some(&v("2000")));
    }

    #[test]
    fn handler_headers_come_from_secrets_by_reference() {
        let mut q = qp(KAFKA);
        q.spec.worker.handler = serde_yaml::from_str(
            r#"http:
  url: "http://127.0.0.1:8080/work"
  headers:
  - {name: Authorization, secretKeyRef: {name: downstream, key: authorization}}
  - {name: X-Tenant, value: shop}"#,
        )
        .unwrap();
        let c = process(&q, Component::Worker).unwrap();
        assert_eq!(
            get(&c, "QP_HANDLER_HEADER_NAMES"),
            Some(&v("Authorization,X-Tenant"))
        );
        assert!(matches!(
            get(&c, "QP_HANDLER_HEADER_0"),
            Some(EnvValue::Secret(r)) if r.name == "downstream" && r.key == "authorization"
        ));
        assert_eq!(get(&c, "QP_HANDLER_HEADER_1"), Some(&v("shop")));
        let gw = process(&q, Component::Gateway).unwrap();
        assert!(
            get(&gw, "QP_HANDLER_HEADER_0").is_none(),
            "the gateway calls no handler"
        );
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
        assert_eq!(handler(&q).unwrap().0.to_string(), "sleep:25");
        q.spec.worker.handler = serde_yaml::from_str("exec: {command: [tr, a-z, A-Z]}").unwrap();
        assert_eq!(
            handler(&q).unwrap().0.to_string(),
            r#"exec:["tr","a-z","A-Z"]"#
        );
    }
}
