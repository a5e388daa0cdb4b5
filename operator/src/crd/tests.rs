//! Unit tests of the QueueProcessor types: defaults, round trips, the generated schema and CRD,
//! and `from_yaml` / `validate` against the repository's manifests.

use super::schema::{
    BUILTIN_RULES, CONCURRENCY_RULES, DEAD_LETTER_RULES, GATEWAY_RULES, HANDLER_RULES,
    HTTP_HANDLER_RULES, HTTP_HEADER_RULES, KAFKA_TLS_RULES, MAX_REPLICAS, MIN_LEASE_SECONDS,
    REDIS_RULES, SCALING_RULES, SIGNAL_RULES, SOURCE_RULES, SPEC_RULES,
};
use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

const MINIMAL: &str = r#"
apiVersion: queueprocessing.dev/v1alpha1
kind: QueueProcessor
metadata:
  name: orders
  namespace: shop
spec:
  source:
    kafka:
      bootstrapServers: kafka:9092
      topic: orders
      consumerGroup: orders-workers
  redis:
    url: redis://redis:6379
  worker:
    handler:
      builtin:
        name: echo
"#;

fn schema() -> Value {
    serde_json::to_value(
        crd().spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn spec_props() -> Value {
    at(&schema(), &["properties", "spec", "properties"]).clone()
}

#[test]
fn minimal_spec_gets_every_default() {
    let qp = QueueProcessor::from_yaml(MINIMAL).unwrap();
    let s = &qp.spec;
    assert!(!s.paused);
    let k = s.source.kafka.as_ref().unwrap();
    assert_eq!(k.auto_offset_reset, OffsetReset::Earliest);
    assert_eq!(k.max_in_flight_per_partition, 1000);
    assert!(k.sasl.is_none() && k.tls.is_none());
    assert!(!s.redis.tls);
    assert_eq!(
        s.concurrency,
        ConcurrencySpec {
            per_replica_tokens: 8,
            global_max_tokens: 64,
            lease_seconds: 30
        }
    );
    assert_eq!(
        s.scaling,
        ScalingSpec {
            min_replicas: 1,
            max_replicas: 10,
            activation_backlog: 0,
            target_backlog_per_replica: 100,
            target_drain_seconds: 30,
            poll_interval_seconds: 2,
            cooldown_seconds: 300,
            scale_down_stabilization_seconds: 60,
            max_step: 1000,
            signals: Vec::new(),
        }
    );
    assert_eq!(s.worker.shutdown_timeout_seconds, 30);
    assert!(s.worker.image.is_none());
    assert_eq!(
        s.results,
        ResultsSpec {
            ttl_seconds: 3600,
            max_retries: 3,
            retry_backoff_millis: 200,
            max_deliveries: 5,
            dead_letter: None
        }
    );
    assert_eq!(
        s.gateway,
        GatewaySpec {
            enabled: false,
            replicas: 1,
            auth: GatewayAuthSpec {
                tokens_secret_ref: None,
                disabled: false,
                mtls: None
            },
            rate_limit_per_client: 0
        }
    );
}

#[test]
fn schema_defaults_match_serde_defaults() {
    // What the API server fills in must equal what serde fills in.
    let props = spec_props();
    assert_eq!(props["paused"]["default"], json!(false));
    assert_eq!(
        props["concurrency"]["default"],
        serde_json::to_value(ConcurrencySpec::default()).unwrap()
    );
    assert_eq!(
        props["scaling"]["default"],
        serde_json::to_value(ScalingSpec::default()).unwrap()
    );
    assert_eq!(
        props["results"]["default"],
        serde_json::to_value(ResultsSpec::default()).unwrap()
    );
    assert_eq!(
        props["gateway"]["default"],
        serde_json::to_value(GatewaySpec::default()).unwrap()
    );
    // Field-level defaults inside the sections, used when a section is partly given.
    assert_eq!(
        props["scaling"]["properties"]["maxReplicas"]["default"],
        json!(10)
    );
    assert_eq!(
        props["concurrency"]["properties"]["leaseSeconds"]["default"],
        json!(30)
    );
    let kafka = at(&props, &["source", "properties", "kafka", "properties"]);
    assert_eq!(kafka["autoOffsetReset"]["default"], json!("earliest"));
    assert_eq!(kafka["maxInFlightPerPartition"]["default"], json!(1000));
    assert_eq!(kafka["sessionTimeoutMillis"]["default"], json!(6000));
    let handler = at(&props, &["worker", "properties", "handler", "properties"]);
    assert_eq!(
        handler["http"]["properties"]["timeoutSeconds"]["default"],
        json!(30)
    );
    assert_eq!(
        at(
            &props,
            &["worker", "properties", "shutdownTimeoutSeconds", "default"]
        ),
        &json!(30)
    );
    assert_eq!(
        at(
            &props,
            &[
                "source",
                "properties",
                "redisList",
                "properties",
                "reclaimAfterSeconds",
                "default"
            ]
        ),
        &json!(30)
    );
    assert_eq!(props["redis"]["properties"]["tls"]["default"], json!(false));
    // No noisy defaults for empty lists and maps.
    assert!(
        props["worker"]["properties"]["env"]
            .get("default")
            .is_none()
    );
    assert!(
        props["worker"]["properties"]["nodeSelector"]
            .get("default")
            .is_none()
    );
}

#[test]
fn partial_section_is_completed_with_field_defaults() {
    let yaml = MINIMAL.replace("  worker:\n", "  scaling:\n    maxReplicas: 4\n  worker:\n");
    let qp = QueueProcessor::from_yaml(&yaml).unwrap();
    assert_eq!(qp.spec.scaling.max_replicas, 4);
    assert_eq!(qp.spec.scaling.min_replicas, 1);
    assert_eq!(qp.spec.scaling.poll_interval_seconds, 2);
}

#[test]
fn yaml_round_trip_is_lossless() {
    let full = r#"
apiVersion: queueprocessing.dev/v1alpha1
kind: QueueProcessor
metadata:
  name: orders
  namespace: shop
  annotations:
    queueprocessing.dev/paused: "true"
spec:
  paused: false
  source:
    kafka:
      bootstrapServers: kafka-0:9092,kafka-1:9092
      topic: orders
      consumerGroup: orders-workers
      autoOffsetReset: latest
      maxInFlightPerPartition: 500
      sessionTimeoutMillis: 3000
      sasl:
        mechanism: SCRAM-SHA-512
        usernameSecretRef: {name: kafka-user, key: username}
        passwordSecretRef: {name: kafka-user, key: password}
      tls:
        caSecretRef: {name: kafka-ca, key: ca.crt}
  redis:
    clusterNodes: ["redis-0:6379", "redis-1:6379"]
    tls: true
    passwordSecretRef: {name: redis, key: password}
  concurrency:
    perReplicaTokens: 6
    globalMaxTokens: 10
    leaseSeconds: 15
  scaling:
    minReplicas: 0
    maxReplicas: 12
    activationBacklog: 5
    targetBacklogPerReplica: 1000
    targetDrainSeconds: 60
    pollIntervalSeconds: 1
    cooldownSeconds: 120
    scaleDownStabilizationSeconds: 30
    maxStep: 4
  worker:
    image: example.com/qp-worker:1.2.3
    imagePullPolicy: IfNotPresent
    handler:
      http:
        url: http://127.0.0.1:8080/handle
        timeoutSeconds: 5
    shutdownTimeoutSeconds: 20
    resources:
      requests: {cpu: 250m, memory: 128Mi}
      limits: {memory: 256Mi}
    env:
    - name: RUST_LOG
      value: info
    extraContainers:
    - name: handler
      image: example.com/handler:2
      ports:
      - containerPort: 8080
    nodeSelector:
      pool: workers
    tolerations:
    - key: dedicated
      operator: Equal
      value: queue
      effect: NoSchedule
    serviceAccountName: orders-worker
    imagePullSecrets:
    - name: registry
    podLabels:
      team: shop
    podAnnotations:
      example.com/owner: shop
  results:
    ttlSeconds: 600
    maxRetries: 5
    retryBackoffMillis: 100
    maxDeliveries: 3
    deadLetter:
      kafkaTopic: orders-dead
  gateway:
    enabled: true
    replicas: 2
    auth:
      tokensSecretRef: {name: orders-gateway, key: tokens}
      disabled: false
    rateLimitPerClient: 50
"#;
    let qp = QueueProcessor::from_yaml(full).unwrap();
    assert!(qp.is_paused(), "the annotation pauses");
    let out = serde_yaml::to_string(&qp).unwrap();
    let a: Value = serde_yaml::from_str(full).unwrap();
    let b: Value = serde_yaml::from_str(&out).unwrap();
    assert_eq!(a, b, "YAML -> struct -> YAML changed the object:\n{out}");
    let again: QueueProcessor = serde_yaml::from_str(&out).unwrap();
    assert_eq!(again, qp);
}

#[test]
fn status_round_trip_and_conditions() {
    let mut st = QueueProcessorStatus {
        observed_generation: Some(3),
        replicas: Some(3),
        desired_replicas: Some(4),
        ready_replicas: Some(2),
        backlog: Some(1234),
        partitions: Some(6),
        tokens: Some(TokenStatus {
            limit: 16,
            in_use: 5,
        }),
        throughput: Some(ThroughputStatus {
            arrival_per_second: 10.5,
            processed_per_second: 9.0,
            failed_per_second: 0.0,
            per_replica_per_second: Some(4.5),
        }),
        last_scale_reason: Some("backlog".into()),
        ..Default::default()
    };
    let t0 = Time("2025-01-01T00:00:00Z".parse().unwrap());
    let t1 = Time("2025-01-01T00:01:00Z".parse().unwrap());
    assert!(st.set_condition(
        CONDITION_READY,
        ConditionStatus::False,
        "Scaling",
        "starting",
        Some(3),
        t0.clone()
    ));
    // Same status: message changes, transition time stays.
    assert!(st.set_condition(
        CONDITION_READY,
        false.into(),
        "Scaling",
        "still starting",
        Some(3),
        t1.clone()
    ));
    assert_eq!(
        st.condition(CONDITION_READY).unwrap().last_transition_time,
        t0
    );
    assert!(!st.set_condition(
        CONDITION_READY,
        false.into(),
        "Scaling",
        "still starting",
        Some(3),
        t1.clone()
    ));
    // Status flips: transition time moves.
    assert!(st.set_condition(
        CONDITION_READY,
        ConditionStatus::True,
        "Processing",
        "ok",
        Some(3),
        t1.clone()
    ));
    let ready = st.condition(CONDITION_READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.last_transition_time.clone()),
        ("True", t1)
    );
    assert!(st.is_condition_true(CONDITION_READY));
    assert!(!st.is_condition_true(CONDITION_SCALING));

    let spec = QueueProcessor::from_yaml(MINIMAL).unwrap().spec;
    st.refresh_summary(&spec);
    assert_eq!(
        st.summary,
        Some(StatusSummary {
            source: "kafka:orders".into(),
            replicas: "2/4".into(),
            tokens: "5/16".into(),
            dominant: String::new()
        })
    );
    let yaml = serde_yaml::to_string(&st).unwrap();
    let back: QueueProcessorStatus = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(back, st);
    assert!(
        yaml.contains("lastTransitionTime: 2025-01-01T00:01:00Z"),
        "{yaml}"
    );
}

#[test]
fn schema_contains_every_cel_rule_where_it_belongs() {
    let s = schema();
    let spec = at(&s, &["properties", "spec"]);
    // `[]` steps into an array's items.
    let p = |path: &[&str]| {
        let mut v = spec;
        for k in path {
            v = if *k == "[]" {
                &v["items"]
            } else {
                &v["properties"][*k]
            };
        }
        v.clone()
    };
    let places: &[(&[&str], &[CelRule])] = &[
        (&[], SPEC_RULES),
        (&["source"], SOURCE_RULES),
        (&["source", "kafka", "tls"], KAFKA_TLS_RULES),
        (&["redis"], REDIS_RULES),
        (&["concurrency"], CONCURRENCY_RULES),
        (&["scaling"], SCALING_RULES),
        (&["worker", "handler"], HANDLER_RULES),
        (&["worker", "handler", "builtin"], BUILTIN_RULES),
        (&["results", "deadLetter"], DEAD_LETTER_RULES),
        (&["gateway"], GATEWAY_RULES),
        (&["scaling", "signals", "[]"], SIGNAL_RULES),
        (&["worker", "handler", "http"], HTTP_HANDLER_RULES),
        (
            &["worker", "handler", "http", "headers", "[]"],
            HTTP_HEADER_RULES,
        ),
    ];
    let mut count = 0;
    for (path, rules) in places {
        let node = p(path);
        let got = node["x-kubernetes-validations"]
            .as_array()
            .unwrap_or_else(|| panic!("no x-kubernetes-validations at spec.{}", path.join(".")));
        assert_eq!(got.len(), rules.len(), "at spec.{}", path.join("."));
        for (g, r) in got.iter().zip(rules.iter()) {
            assert_eq!(g["rule"], json!(r.rule));
            assert_eq!(g["message"], json!(r.message));
            assert!(r.message.starts_with("spec."), "messages name the field");
            match r.field_path {
                Some(fp) => assert_eq!(g["fieldPath"], json!(fp)),
                None => assert!(g.get("fieldPath").is_none()),
            }
            count += 1;
        }
    }
    assert_eq!(count, ALL_CEL_RULES.iter().map(|r| r.len()).sum::<usize>());
}

#[test]
fn schema_has_ranges_enums_and_no_open_objects() {
    let props = spec_props();
    let scaling = &props["scaling"]["properties"];
    assert_eq!(scaling["minReplicas"]["minimum"].as_f64(), Some(0.0));
    assert_eq!(
        scaling["maxReplicas"]["maximum"].as_f64(),
        Some(f64::from(MAX_REPLICAS))
    );
    assert_eq!(
        props["concurrency"]["properties"]["leaseSeconds"]["minimum"].as_f64(),
        Some(f64::from(MIN_LEASE_SECONDS))
    );
    let sasl = at(
        &props,
        &[
            "source",
            "properties",
            "kafka",
            "properties",
            "sasl",
            "properties",
        ],
    );
    assert_eq!(
        sasl["mechanism"]["enum"],
        json!(["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    );
    let builtin = at(
        &props,
        &[
            "worker",
            "properties",
            "handler",
            "properties",
            "builtin",
            "properties",
        ],
    );
    assert_eq!(builtin["name"]["enum"], json!(["echo", "sleep", "fail"]));
    assert_eq!(
        props["redis"]["properties"]["clusterNodes"]["items"]["minLength"],
        json!(1)
    );
    // Unknown fields are pruned/rejected everywhere our own types are concerned.
    let text = serde_json::to_string(&spec_props()).unwrap();
    assert!(!text.contains("x-kubernetes-preserve-unknown-fields"));
    // Conditions merge by type under server-side apply.
    let conds = at(
        &schema(),
        &["properties", "status", "properties", "conditions"],
    )
    .clone();
    assert_eq!(conds["x-kubernetes-list-type"], json!("map"));
    assert_eq!(conds["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn crd_metadata() {
    let crd = crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("queueprocessors.queueprocessing.dev")
    );
    assert_eq!(crd.spec.group, GROUP);
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, KIND);
    assert_eq!(crd.spec.names.plural, "queueprocessors");
    assert_eq!(crd.spec.names.short_names, Some(vec!["qp".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, VERSION);
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let cols: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        ["Source", "Replicas", "Backlog", "Tokens", "Status", "Age"]
    );
    assert!(crd_yaml().starts_with("# Generated by"));
}

#[test]
fn every_field_has_a_description() {
    fn walk(v: &Value, path: &str, missing: &mut Vec<String>, ragged: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, p) in props {
                let here = format!("{path}.{k}");
                match p.get("description").and_then(|d| d.as_str()) {
                    None => missing.push(here.clone()),
                    Some(d) if d.replace("\n\n", "").contains('\n') => ragged.push(here.clone()),
                    Some(_) => {}
                }
                walk(p, &here, missing, ragged);
            }
        }
        if let Some(items) = v.get("items") {
            walk(items, &format!("{path}[]"), missing, ragged);
        }
    }
    let (mut missing, mut ragged) = (Vec::new(), Vec::new());
    let s = schema();
    walk(&s["properties"]["spec"], "spec", &mut missing, &mut ragged);
    walk(
        &s["properties"]["status"],
        "status",
        &mut missing,
        &mut ragged,
    );
    // k8s-openapi types (containers, env, tolerations) carry upstream descriptions, with a
    // few upstream gaps we do not control.
    let ours = |m: &String| {
        !(m.starts_with("spec.worker.extraContainers[].")
            || m.starts_with("spec.worker.env[].")
            || m.starts_with("spec.worker.resources.")
            || m.starts_with("spec.worker.tolerations[].")
            || m.starts_with("spec.worker.imagePullSecrets[].")
            || m.starts_with("status.conditions[]."))
    };
    missing.retain(ours);
    ragged.retain(ours);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
    // Paragraphs are single lines, so `kubectl explain` can wrap them.
    assert!(
        ragged.is_empty(),
        "descriptions with hard line breaks: {ragged:?}"
    );
}

#[test]
fn helpers() {
    let mut qp = QueueProcessor::from_yaml(MINIMAL).unwrap();
    assert_eq!(qp.keys().prefix(), "qp:{shop/orders}:");
    assert_eq!(qp.keys().limit(), "qp:{shop/orders}:limit");
    assert!(!qp.is_paused());
    qp.metadata
        .annotations
        .get_or_insert_default()
        .insert(PAUSED_ANNOTATION.into(), "true".into());
    assert!(qp.is_paused());
    qp.metadata.annotations = None;
    qp.spec.paused = true;
    assert!(qp.is_paused());
    qp.metadata.namespace = None;
    assert_eq!(qp.keys().prefix(), "qp:{default/orders}:");

    assert!(matches!(qp.spec.source.get(), Some(Source::Kafka(k)) if k.topic == "orders"));
    assert_eq!(
        qp.spec.redis.endpoint(),
        Some(RedisEndpoint::Url("redis://redis:6379"))
    );
    assert!(matches!(
        qp.spec.worker.handler.get(),
        Some(Handler::Builtin(b)) if b.name == BuiltinName::Echo && b.sleep_millis() == 100
    ));
    assert!(qp.spec.secret_refs().is_empty());

    let c = ConcurrencySpec::default();
    assert_eq!(c.token_limit(0), 0);
    assert_eq!(c.token_limit(3), 24);
    assert_eq!(c.token_limit(100), 64);
}

#[test]
fn from_yaml_rejects_what_the_api_server_rejects() {
    let bad = |from: &str, to: &str| {
        let y = MINIMAL.replace(from, to);
        assert_ne!(y, MINIMAL, "replacement {from:?} did not apply");
        QueueProcessor::from_yaml(&y).unwrap_err().to_string()
    };
    let e = bad(
        "    url: redis://redis:6379\n",
        "    url: redis://redis:6379\n    password: hunter2\n",
    );
    assert!(e.contains("spec.redis.password"), "{e}");
    let e = bad(
        "  worker:\n",
        "  scaling:\n    minReplicas: 5\n    maxReplicas: 2\n  worker:\n",
    );
    assert!(e.contains(SCALING_RULES[0].message), "{e}");
    let e = bad("      topic: orders\n", "");
    assert!(e.contains("topic"), "{e}");
    let e = bad("kind: QueueProcessor", "kind: Deployment");
    assert!(e.contains("expected apiVersion"), "{e}");
}

/// The repository's example manifests pass, and every invalid manifest under
/// `tests/manifests/invalid` is rejected without an API server too (keeps `validate` in step
/// with the schema; the API server test checks the real messages).
#[test]
fn repository_manifests() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut examples = 0;
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in text.split("\n---") {
                let v: Value = serde_yaml::from_str(doc).unwrap_or(Value::Null);
                if v["kind"] == json!(KIND) {
                    QueueProcessor::from_yaml(doc)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    examples += 1;
                }
            }
        }
    }
    assert!(
        examples >= 2,
        "examples/ should hold at least two QueueProcessors"
    );

    let mut invalid = 0;
    for entry in std::fs::read_dir(root.join("tests/manifests/invalid")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("# expect: "),
                "{} must start with `# expect: <message>`",
                path.display()
            );
            if QueueProcessor::from_yaml(&text).is_ok() {
                panic!("{} is accepted by from_yaml", path.display());
            }
            invalid += 1;
        }
    }
    assert!(invalid >= 14, "only {invalid} invalid manifests");
}

#[test]
fn status_writes_wait_for_live_numbers_but_not_for_changes() {
    use std::time::Duration;
    let refresh = Duration::from_secs(30);
    let t0 = Time("2025-01-01T00:00:00Z".parse().unwrap());
    let mut old = QueueProcessorStatus {
        replicas: Some(3),
        backlog: Some(100),
        tokens: Some(TokenStatus {
            limit: 12,
            in_use: 4,
        }),
        ..Default::default()
    };
    old.set_condition(
        CONDITION_READY,
        true.into(),
        "Processing",
        "backlog 100",
        Some(1),
        t0.clone(),
    );
    let soon = Some(Duration::from_secs(2));
    let later = Some(Duration::from_secs(31));

    // Never written by this process, or nothing on the object yet: write.
    assert!(old.write_due(None, soon, refresh));
    assert!(!old.write_due(Some(&old.clone()), None, refresh));
    let mut numbers = old.clone();
    numbers.backlog = Some(250);
    numbers.tokens.as_mut().unwrap().in_use = 12;
    numbers.set_condition(
        CONDITION_READY,
        true.into(),
        "Processing",
        "backlog 250",
        Some(1),
        t0.clone(),
    );
    assert!(numbers.write_due(Some(&old), None, refresh));
    // Only live numbers moved: wait for the refresh period.
    assert!(!numbers.write_due(Some(&old), soon, refresh));
    assert!(numbers.write_due(Some(&old), later, refresh));
    // Anything else is written at once: replicas, a condition's status or reason, the
    // observed generation, the token limit.
    let mut scaled = numbers.clone();
    scaled.replicas = Some(5);
    assert!(scaled.write_due(Some(&old), soon, refresh));
    let mut failing = numbers.clone();
    failing.set_condition(
        CONDITION_READY,
        false.into(),
        "SourceUnreachable",
        "down",
        Some(1),
        t0.clone(),
    );
    assert!(failing.write_due(Some(&old), soon, refresh));
    let mut edited = numbers.clone();
    edited.observed_generation = Some(2);
    assert!(edited.write_due(Some(&old), soon, refresh));
    let mut limit = numbers.clone();
    limit.tokens.as_mut().unwrap().limit = 20;
    assert!(limit.write_due(Some(&old), soon, refresh));
    // Unchanged: never written, however long ago.
    assert!(!old.write_due(Some(&old.clone()), later, refresh));
}

/// Properties of admission without an API server (local mode reads any file it is given).
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any text is parsed or refused with an error, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = QueueProcessor::from_yaml(&text);
        }

        /// Numbers anywhere in range or out of it: accepted only when valid, and every
        /// complaint names the field it is about.
        #[test]
        fn numbers_are_checked_and_complaints_name_fields(
            min in -5i64..20, max in -5i64..60, tokens in -5i64..300, global in -5i64..5000,
            lease in -5i64..4000, ttl in -5i64..100_000, replicas in -2i64..20, rate in -2i64..2_000_000,
        ) {
            let yaml = MINIMAL.replace("  worker:\n", &format!(
                "  scaling:\n    minReplicas: {min}\n    maxReplicas: {max}\n\
                 \x20 concurrency:\n    perReplicaTokens: {tokens}\n    globalMaxTokens: {global}\n    leaseSeconds: {lease}\n\
                 \x20 results:\n    ttlSeconds: {ttl}\n\
                 \x20 gateway:\n    enabled: true\n    replicas: {replicas}\n    rateLimitPerClient: {rate}\n    auth: {{disabled: true}}\n\
                 \x20 worker:\n"));
            match QueueProcessor::from_yaml(&yaml) {
                Ok(qp) => {
                    prop_assert!(qp.spec.validate().is_ok());
                    prop_assert!(min >= 0 && max >= 1 && min <= max && tokens >= 1 && replicas >= 1);
                    prop_assert!(rate >= 0);
                }
                Err(SpecError::Invalid(problems)) => {
                    prop_assert!(!problems.is_empty());
                    for p in &problems {
                        prop_assert!(p.starts_with("spec."), "{}", p);
                    }
                }
                Err(other) => prop_assert!(false, "unexpected {}", other),
            }
        }
    }
}
