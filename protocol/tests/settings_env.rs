//! What the operator renders is what the worker parses: every setting of both modes goes through
//! `render` and back through clap's environment parsing, as in a pod. Its own test binary with
//! one test, because it sets the process environment (nothing else runs meanwhile).

use clap::{Args, FromArgMatches};
use qp_protocol::settings::{
    CommonArgs, Env, GatewayArgs, HandlerSpec, KafkaArgs, LogFormat, Refs, RunArgs, Setting,
    SourceKind,
};

/// Parse settings from the process environment only, like `qp-worker` in a pod.
fn parse_env<T: Args + FromArgMatches>(env: &Env<String>) -> T {
    for (name, _) in std::env::vars() {
        if name.starts_with("QP_") {
            // SAFETY: this binary's only test runs on one thread; nothing reads the environment
            // concurrently.
            unsafe { std::env::remove_var(name) };
        }
    }
    for (name, value) in env {
        let Setting::Value(v) = value else {
            panic!("{name}: only literals can be parsed here")
        };
        // SAFETY: as above.
        unsafe { std::env::set_var(name, v) };
    }
    let command = T::augment_args(clap::Command::new("qp-worker"));
    T::from_arg_matches(&command.try_get_matches_from(["qp-worker"]).unwrap()).unwrap()
}

fn every_common_field() -> CommonArgs {
    CommonArgs {
        namespace: "shop".into(),
        name: "orders".into(),
        redis_url: Some("rediss://redis:6380".into()),
        redis_cluster_nodes: Some("redis://a:1,redis://b:2".into()),
        redis_password: Some("pw with spaces".into()),
        redis_username: Some("user".into()),
        redis_tls: true,
        redis_ca_file: Some("/secrets/redis/ca.crt".into()),
        listen: "127.0.0.1:9191".parse().unwrap(),
        log_format: LogFormat::Json,
    }
}

fn every_kafka_field() -> KafkaArgs {
    KafkaArgs {
        kafka_bootstrap: Some("k1:9092,k2:9092".into()),
        kafka_topic: Some("orders".into()),
        kafka_group: Some("orders-workers".into()),
        kafka_sasl_mechanism: Some("SCRAM-SHA-512".into()),
        kafka_username: Some("u".into()),
        kafka_password: Some("p w".into()),
        kafka_tls: true,
        kafka_ca_file: Some("/etc/ca.pem".into()),
        kafka_cert_file: Some("/etc/cert.pem".into()),
        kafka_key_file: Some("/etc/key.pem".into()),
    }
}

fn every_run_setting_survives_render_and_parse() {
    let handler = HandlerSpec::Exec {
        command: vec!["sh".into(), "-c".into(), "echo a b".into()],
    };
    let mut run = RunArgs::new(
        every_common_field(),
        every_kafka_field(),
        SourceKind::RedisList,
        handler,
    );
    // Every field differs from its default, so a field rendered under the wrong name or
    // not at all would come back as the default.
    run.list_key = Some("{jobs}:queue".into());
    run.handler_timeout_ms += 1;
    run.max_concurrency += 1;
    run.lease_ttl_ms += 1;
    run.ungated = true;
    run.retries += 1;
    run.retry_backoff_ms += 1;
    run.result_ttl_seconds += 1;
    run.dead_letter = Some("kafka:orders-dlq".into());
    run.max_message_bytes += 1;
    run.max_result_bytes += 1;
    run.ordered_by_key = true;
    run.drain_timeout_seconds += 1;
    run.worker_id = Some("w-1".into());
    run.max_pending_per_partition += 1;
    run.kafka_auto_offset_reset = qp_protocol::settings::OffsetReset::Latest;
    run.commit_interval_ms += 1;
    run.heartbeat_ms += 1;
    run.dead_after_ms += 1;
    let env = run.render::<String>(&Refs::default());
    let parsed: RunArgs = parse_env(&env);
    assert_eq!(parsed, run);
    // Each variable once.
    let mut names: Vec<_> = env.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), env.len());
}
fn every_gateway_setting_survives_render_and_parse() {
    let mut gw = GatewayArgs::new(every_common_field(), every_kafka_field(), SourceKind::Kafka);
    gw.list_key = Some("q".into());
    gw.max_request_bytes += 1;
    gw.max_backlog += 1;
    gw.result_ttl_seconds += 1;
    gw.max_wait_seconds += 1;
    gw.tls_cert_file = Some("/secrets/gw/tls.crt".into());
    gw.tls_key_file = Some("/secrets/gw/tls.key".into());
    gw.client_ca_file = Some("/secrets/gw/ca.crt".into());
    gw.api_listen = "127.0.0.1:9443".parse().unwrap();
    let parsed: GatewayArgs = parse_env(&gw.render::<String>(&Refs::default()));
    assert_eq!(parsed, gw);
}

#[test]
fn every_setting_survives_render_and_parse_through_the_environment() {
    every_run_setting_survives_render_and_parse();
    every_gateway_setting_survives_render_and_parse();
}
