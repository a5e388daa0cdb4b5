//! The Redis Streams source against the real Redis (AOF on): workers read through a consumer
//! group, acknowledge only once the result is durable, and take over the entries of a worker
//! killed with SIGKILL after the claim idle time; a Redis crash and restart mid-run loses
//! nothing; a poison entry is dead-lettered after the configured deliveries. Its own binary:
//! one test crashes the shared Redis, and the tests here take turns.

use std::time::{Duration, Instant};

use qp_tests::downstream::Downstream;
use qp_tests::faults::RedisCrash;
use qp_tests::fixture::{Fixture, GatewayQueue, RedisKind, eventually};
use qp_tests::procs::Proc;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const GROUP: &str = "workers";

fn stream_worker(fx: &Fixture, id: &str, key: &str, handler: &str, extra: &[&str]) -> Proc {
    let mut cmd = fx.worker_command(id);
    cmd.args(["--source", "redis-stream", "--stream-key", key])
        .args(["--stream-group", GROUP, "--stream-claim-idle-ms", "2000"])
        .args(["--handler", handler])
        .args(extra);
    Proc::spawn(&format!("{}-{id}", fx.name), cmd)
}

async fn add(fx: &Fixture, key: &str, id: &str, body: &str) {
    let _: String = redis::cmd("XADD")
        .arg(key)
        .arg("*")
        .arg("id")
        .arg(id)
        .arg("contentType")
        .arg("text/plain")
        .arg("body")
        .arg(body)
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
}

async fn pending(fx: &Fixture, key: &str) -> i64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(GROUP)
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    match summary {
        redis::Value::Array(v) => match v.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_entry_gets_a_result_through_a_kill_and_a_redis_restart() {
    kill_and_maybe_crash(RedisKind::Single).await;
}

/// On Redis Cluster: the stream and the QueueProcessor's keys share a hash tag, so one node
/// holds them; a worker killed with SIGKILL loses nothing (the cluster's own restarts are
/// `worker_cluster_restart.rs`'s).
#[tokio::test(flavor = "multi_thread")]
async fn every_entry_gets_a_result_through_a_kill_on_redis_cluster() {
    kill_and_maybe_crash(RedisKind::Cluster).await;
}

async fn kill_and_maybe_crash(kind: RedisKind) {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("stream", kind, 0).await;
    fx.pool().set_limit(8).await.unwrap();
    let key = format!("{}stream", fx.keys.prefix());
    // The handler's downstream counts what it sees twice and the most requests at once.
    let downstream = Downstream::start(Duration::from_millis(20), false).await;
    let extra = ["--max-concurrency", "4"];
    let mut w0 = stream_worker(&fx, "w0", &key, &downstream.url, &extra);
    let mut w1 = stream_worker(&fx, "w1", &key, &downstream.url, &extra);
    let ids: Vec<String> = (0..400).map(|i| format!("e-{i}")).collect();
    for id in &ids {
        add(&fx, &key, id, id).await;
    }
    let t = Instant::now();
    // w1 dies holding entries: they stay pending under it until w0 claims them.
    eventually(Duration::from_secs(30), "100 entries done", || async {
        let states = fx.states(&ids).await;
        (states.values().filter(|s| *s == "done").count() >= 100).then_some(())
    })
    .await;
    let held = pending(&fx, &key).await;
    w1.kill9();
    println!("killed w1 with {held} entries pending in the group");
    // Redis crashes and comes back (AOF): the group, its pending list and the results persist.
    eventually(Duration::from_secs(30), "200 entries done", || async {
        let states = fx.states(&ids).await;
        (states.values().filter(|s| *s == "done").count() >= 200).then_some(())
    })
    .await;
    if kind == RedisKind::Single {
        let crash = RedisCrash::now(&fx.conn).await;
        tokio::time::sleep(Duration::from_secs(2)).await; // the outage's length, not a wait
        crash.end(&fx.conn).await;
    }
    fx.wait_finished(&ids, Duration::from_secs(90)).await;
    let states = fx.states(&ids).await;
    let failed = states.values().filter(|s| *s == "failed").count();
    eventually(Duration::from_secs(20), "nothing left pending", || async {
        (pending(&fx, &key).await == 0).then_some(())
    })
    .await;
    println!(
        "{kind:?}: 400 entries all done in {:.1?} through a kill -9{}, {failed} failed, 0 pending",
        t.elapsed(),
        if kind == RedisKind::Single {
            " and a Redis restart"
        } else {
            ""
        }
    );
    let twice = downstream.twice();
    println!(
        "duplicates {twice} (bound: {held} pending at the kill + 8 in flight at the restart), \
         most at once {} (limit 8)",
        downstream.max()
    );
    assert_eq!(failed, 0);
    assert!(downstream.max() <= 8, "ceiling held");
    assert!(
        twice as i64 <= held + 8,
        "duplicates only of work in flight"
    );
    assert!(w0.alive(), "w0 rode out the Redis restart");
    fx.cleanup().await;
}

/// The handler of the poison test: kills its own worker on a message that contains "crash".
const CRASHER: &str =
    r#"exec:["sh", "-c", "b=$(cat); case \"$b\" in *crash*) kill -9 $PPID;; esac; echo ok"]"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_entry_is_dead_lettered_after_max_deliveries() {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("streampoison", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let key = format!("{}stream", fx.keys.prefix());
    for (id, body) in [("good-0", "fine"), ("poison", "crash"), ("good-1", "fine")] {
        add(&fx, &key, id, body).await;
    }
    let all: Vec<String> = ["good-0", "poison", "good-1"].map(String::from).to_vec();
    // Restarted after every crash with the same id; its own pending entries come back first.
    let starts = fx
        .restart_until_finished(&all, 6, || {
            stream_worker(
                &fx,
                "w0",
                &key,
                CRASHER,
                &["--max-deliveries", "3", "--max-concurrency", "1"],
            )
        })
        .await;
    let states = fx.states(&all).await;
    assert_eq!(
        (states["good-0"].as_str(), states["good-1"].as_str()),
        ("done", "done")
    );
    assert_eq!(states["poison"], "failed");
    let reason: String = redis::cmd("HGET")
        .arg(fx.keys.result("poison"))
        .arg("error")
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    println!("poison entry: dead-lettered after {starts} worker starts: {reason}");
    assert!(reason.contains("delivered 4 times"), "{reason}");
    fx.cleanup().await;
}

/// The gateway adds requests to the stream; a worker answers them through the long poll.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_submits_to_a_stream() {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("streamgw", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let key = format!("{}stream", fx.keys.prefix());
    let (_gw, base) = fx.gateway(GatewayQueue::RedisStream(&key), &[]).await;
    let _w = stream_worker(&fx, "w0", &key, "echo", &[]);
    let http = reqwest::Client::new();
    for i in 0..20 {
        let accepted: serde_json::Value = http
            .post(format!("{base}/v1/requests"))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("k-{i}"))
            .body(format!("{{\"n\": {i}}}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = accepted["id"].as_str().unwrap().to_owned();
        let answer: serde_json::Value = http
            .get(format!("{base}/v1/requests/{id}?wait=10"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"], "done", "{answer}");
        assert_eq!(answer["result"]["n"], i, "{answer}");
    }
    fx.cleanup().await;
}

/// With trimming on, acknowledged entries leave the stream; an entry added later is kept until
/// it is processed.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_entries_are_trimmed() {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("streamtrim", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let key = format!("{}stream", fx.keys.prefix());
    let ids: Vec<String> = (0..100).map(|i| format!("t-{i}")).collect();
    for id in &ids {
        add(&fx, &key, id, "work").await;
    }
    let _w = stream_worker(&fx, "w0", &key, "echo", &["--stream-trim-acknowledged"]);
    fx.wait_finished(&ids, Duration::from_secs(30)).await;
    let t = Instant::now();
    let len = |fx: &Fixture| {
        let mut c = fx.conn.clone();
        let key = key.clone();
        async move {
            redis::cmd("XLEN")
                .arg(&key)
                .query_async::<i64>(&mut c)
                .await
                .unwrap()
        }
    };
    eventually(Duration::from_secs(10), "the stream trimmed", || async {
        (len(&fx).await == 0).then_some(())
    })
    .await;
    println!(
        "100 acknowledged entries trimmed {:.1?} after the last result",
        t.elapsed()
    );
    fx.cleanup().await;
}
