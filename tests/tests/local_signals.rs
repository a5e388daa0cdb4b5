//! Local mode with what issue 15 added: scaling signals and the Redis Streams source.
//!
//! A counter's rate as the arrival rate, with the capacity measured from real workers: local
//! mode runs `qp-worker` processes on a Redis list while the test submits about 60 requests a
//! second through the gateway and counts each in the application's own `requests_total`. The
//! list's backlog alone asks for one replica (1000 per replica), and so would the counter at its
//! `targetPerReplica` (1000/s); only the counter's rate over what one worker really does
//! (2 tokens x 100 ms = 20/s) asks for three. And a stream QueueProcessor scaled from zero by
//! its group's lag, every request answered through the gateway, and back to zero.

use std::time::{Duration, Instant};

use qp_tests::fixture::{Fixture, RedisKind};
use qp_tests::local::LocalMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_rate_over_measured_capacity_sizes_the_workers() {
    let f = Fixture::new("localrate", RedisKind::Single, 0).await;
    let dir = qp_tests::env::workspace_root()
        .join("target/test-logs")
        .join(&f.name);
    std::fs::create_dir_all(&dir).unwrap();
    let counter = format!("{}requests_total", f.keys.prefix());
    let manifest = format!(
        r#"apiVersion: queueprocessing.dev/v1alpha1
kind: QueueProcessor
metadata:
  name: {name}
  namespace: {ns}
spec:
  source:
    redisList:
      key: "{prefix}jobs"
  redis:
    url: {redis}
  concurrency:
    perReplicaTokens: 2
    globalMaxTokens: 12
  scaling:
    minReplicas: 1
    maxReplicas: 6
    targetBacklogPerReplica: 1000
    pollIntervalSeconds: 1
    scaleDownStabilizationSeconds: 3
    signals:
      - name: requests
        type: counterRate
        key: "{counter}"
        targetPerReplica: 1000
  worker:
    handler:
      builtin:
        name: sleep
        sleepMillis: 100
    shutdownTimeoutSeconds: 5
  gateway:
    enabled: true
    auth:
      disabled: true
"#,
        name = f.name,
        ns = f.namespace,
        prefix = f.keys.prefix(),
        redis = f.env.get("QP_REDIS_URL"),
    );
    let file = dir.join("queueprocessor.yaml");
    std::fs::write(&file, manifest).unwrap();
    let mut lm = LocalMode::start(&f.name, &file, None);
    let st = lm.wait_ready(Duration::from_secs(120)).await;
    let gateway = st.gateway_url.expect("the gateway is enabled");
    let http = reqwest::Client::new();

    let t = Instant::now();
    let mut reached = None;
    let mut sent = 0u64;
    while t.elapsed() < Duration::from_secs(60) && reached.is_none() {
        // Six requests every 100 ms (60/s), each counted as the application would count it.
        for _ in 0..6 {
            let r = http
                .post(format!("{gateway}/v1/requests"))
                .header("content-type", "text/plain")
                .body("work")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
            let _: i64 = redis::cmd("INCR")
                .arg(&counter)
                .query_async(&mut f.conn.clone())
                .await
                .unwrap();
            sent += 1;
        }
        // Pacing of the load under test, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st = lm.status().await.unwrap_or_default();
        if st.desired() >= 3 {
            reached = Some((t.elapsed(), st));
        }
    }
    let (after, st) = reached.unwrap_or_else(|| panic!("never 3 replicas; {sent} sent"));
    let signal = st
        .status
        .signals
        .iter()
        .find(|s| s.name == "requests")
        .cloned();
    let capacity = st
        .status
        .throughput
        .as_ref()
        .and_then(|t| t.per_replica_per_second);
    let reason = st.status.last_scale_reason.clone().unwrap_or_default();
    println!(
        "rate {:?}/s, capacity {capacity:?}/s per replica: {} replicas after {after:.1?} ({sent} sent); {reason}",
        signal.as_ref().and_then(|s| s.value),
        st.desired()
    );
    assert!(capacity.is_some(), "capacity measured from the workers");
    assert!(reason.contains("signal requests"), "{reason}");
    assert!(
        lm.stop(Duration::from_secs(30)).await,
        "local mode stops cleanly"
    );
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_queue_processor_scales_from_zero_in_local_mode() {
    let f = Fixture::new("localstream", RedisKind::Single, 0).await;
    let dir = qp_tests::env::workspace_root()
        .join("target/test-logs")
        .join(&f.name);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = format!(
        r#"apiVersion: queueprocessing.dev/v1alpha1
kind: QueueProcessor
metadata:
  name: {name}
  namespace: {ns}
spec:
  source:
    redisStream:
      key: "{prefix}stream"
      group: workers
      claimIdleSeconds: 5
  redis:
    url: {redis}
  concurrency:
    perReplicaTokens: 4
    globalMaxTokens: 16
  scaling:
    minReplicas: 0
    maxReplicas: 4
    targetBacklogPerReplica: 50
    pollIntervalSeconds: 1
    scaleDownStabilizationSeconds: 2
    cooldownSeconds: 3
  worker:
    handler:
      builtin:
        name: sleep
        sleepMillis: 20
    shutdownTimeoutSeconds: 5
  gateway:
    enabled: true
    auth:
      disabled: true
"#,
        name = f.name,
        ns = f.namespace,
        prefix = f.keys.prefix(),
        redis = f.env.get("QP_REDIS_URL"),
    );
    let file = dir.join("queueprocessor.yaml");
    std::fs::write(&file, manifest).unwrap();
    let mut lm = LocalMode::start(&f.name, &file, None);
    // At zero replicas there is no worker to be ready: wait for the gateway instead.
    let gateway =
        qp_tests::fixture::eventually(Duration::from_secs(120), "the gateway", || async {
            let st = lm.status().await?;
            let g = st.gateway_url?;
            let ok = reqwest::get(format!("{g}/readyz"))
                .await
                .ok()?
                .status()
                .is_success();
            ok.then_some(g)
        })
        .await;
    assert_eq!(
        lm.status().await.unwrap_or_default().replicas,
        0,
        "starts at zero"
    );
    let http = reqwest::Client::new();
    let t = Instant::now();
    let mut ids = Vec::new();
    for i in 0..300 {
        let r = http
            .post(format!("{gateway}/v1/requests"))
            .header("content-type", "text/plain")
            .body(format!("entry {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
        let v: serde_json::Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    f.wait_finished(&ids, Duration::from_secs(120)).await;
    let done = t.elapsed();
    let back =
        qp_tests::fixture::eventually(Duration::from_secs(60), "back to zero replicas", || async {
            let st = lm.status().await?;
            (st.replicas == 0 && st.desired() == 0).then_some(t.elapsed())
        })
        .await;
    println!(
        "stream in local mode: 300 requests done {done:.1?} after the first, back to 0 at {back:.1?}"
    );
    assert!(
        lm.stop(Duration::from_secs(30)).await,
        "local mode stops cleanly"
    );
    f.cleanup().await;
}
