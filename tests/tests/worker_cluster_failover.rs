//! Fault test: a Redis Cluster master fails over mid-run. Three Kafka-source workers and a
//! gateway run against the cluster; once a sixth of the messages are done, the replica of the
//! master that serves the QueueProcessor's slot is promoted (`CLUSTER FAILOVER`, coordinated:
//! nothing acknowledged is lost) and the old master is killed, kept down, and started again (it
//! rejoins as a replica). Nothing is lost, the ceiling holds at the handler's downstream, the
//! gateway stays ready and keeps accepting work (a client that honours `Retry-After`). At the
//! end the old master is promoted back, so the environment's layout is as before. A test binary
//! of its own: it moves a slot every Redis Cluster test uses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use qp_tests::downstream::Downstream;
use qp_tests::faults::ClusterNode;
use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::kafka;
use reqwest::StatusCode;

/// `/readyz` every 100 ms until `stop`: how many answers, and how many were not 200.
fn watch_readiness(base: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, usize)> {
    let url = format!("{base}/readyz");
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let (mut seen, mut unready) = (0, 0);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            seen += 1;
            let ok = http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ok {
                unready += 1;
            }
        }
        (seen, unready)
    })
}

/// Submit one request every 50 ms until `stop`, retrying a 503 after its `Retry-After` as a
/// client should; returns the accepted ids. `refused` counts the 503s.
fn submit_steadily(
    base: &str,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let url = format!("{base}/v1/requests");
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut ids = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            loop {
                let resp = http
                    .post(&url)
                    .header("content-type", "text/plain")
                    .body(format!("gateway-{n}"))
                    .send()
                    .await
                    .expect("POST /v1/requests");
                if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
                    refused.fetch_add(1, Ordering::Relaxed);
                    let after: u64 = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .expect("a 503 carries Retry-After");
                    tokio::time::sleep(Duration::from_secs(after)).await;
                    continue;
                }
                assert_eq!(resp.status(), StatusCode::ACCEPTED, "submit {n}");
                let answer: serde_json::Value = resp.json().await.unwrap();
                ids.push(answer["id"].as_str().expect("an id").to_owned());
                break;
            }
            // The client's pace, not a wait for anything.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_failover_mid_run_loses_nothing_and_keeps_gateways_ready() {
    let limit = 6;
    let fx = Fixture::new("failover", RedisKind::Cluster, 4).await;
    fx.pool().set_limit(limit).await.unwrap();
    let ids: Vec<String> = (0..1200).map(|i| format!("f-{i}")).collect();
    kafka::send_many(&kafka::producer(&fx.bootstrap), &fx.topic, &ids).await;
    let downstream = Downstream::start(Duration::from_millis(40), false).await;
    let workers: Vec<_> = (0..3)
        .map(|i| {
            fx.kafka_worker(
                &format!("w{i}"),
                &downstream.url,
                &["--max-concurrency", "4"],
            )
        })
        .collect();
    let (mut gateway, base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let readiness = watch_readiness(&base, stop.clone());
    let submitter = submit_steadily(&base, stop.clone(), refused.clone());

    eventually(Duration::from_secs(60), "a sixth done", || async {
        let done = fx
            .states(&ids)
            .await
            .values()
            .filter(|s| *s == "done")
            .count();
        (done >= 200).then_some(())
    })
    .await;
    let key = format!("{}probe", fx.keys.prefix());
    let (old_master, replica) = ClusterNode::master_and_replica_of(&key).await;
    let started = Instant::now();
    replica.fail_over_to().await;
    let promoted = started.elapsed();
    let crash = old_master.crash().await;
    // How long the old master stays down: the fault's duration, not a wait for anything.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(crash); // starts it again; it rejoins as the new master's replica
    eventually(
        Duration::from_secs(30),
        "the old master in sync as a replica",
        || async {
            (old_master.role().await.as_deref() == Some("slave") && old_master.in_sync().await)
                .then_some(())
        },
    )
    .await;
    // Keep submitting through the gateway for a moment after the cluster settled.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let gateway_ids = submitter.await.unwrap();
    let (probes, unready) = readiness.await.unwrap();

    fx.wait_finished(&ids, Duration::from_secs(120)).await;
    fx.wait_finished(&gateway_ids, Duration::from_secs(60))
        .await;
    let all_done = started.elapsed();
    let states = fx.states(&ids).await;
    let gateway_states = fx.states(&gateway_ids).await;
    let done = states
        .values()
        .chain(gateway_states.values())
        .filter(|s| *s == "done")
        .count();
    let failed = states
        .values()
        .chain(gateway_states.values())
        .filter(|s| *s == "failed")
        .count();
    let produced = ids.len() + gateway_ids.len();
    println!(
        "redis cluster failover (promoted in {promoted:?}, old master down 2 s, all done \
         {all_done:?} after the failover began): produced {produced} done {done} failed {failed} \
         lost {} duplicates {}; max at once {} (limit {limit}); gateway: {unready} of {probes} \
         readiness probes failed, {} submits answered 503",
        produced - done - failed,
        downstream.twice(),
        downstream.max(),
        refused.load(Ordering::Relaxed)
    );
    assert_eq!(done, produced, "everything done");
    assert!(downstream.max() <= limit as i64, "ceiling exceeded");
    assert_eq!(unready, 0, "the gateway stayed ready");
    assert!(gateway.alive(), "the gateway is alive");

    // Put the environment back as it was: the old master takes its slots back.
    old_master.fail_over_to().await;
    drop(workers);
    drop(gateway);
    fx.cleanup().await;
}
