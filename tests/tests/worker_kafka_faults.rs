//! The Kafka worker through shutdown, rebalance and handler faults: each test injects one fault
//! into real `qp-worker` processes against the real Kafka and Redis, and checks that shutdown
//! stays within its bound, offsets are committed, and no message is stranded.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qp_tests::fixture::{Fixture, RedisKind, eventually};
use qp_tests::kafka;
use qp_tests::procs::Proc;

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Wait until the group has committed everything written to the topic.
async fn committed_to_the_end(fx: &Fixture, partitions: i32, within: Duration) {
    eventually(within, "every partition committed to its end", || async {
        let offsets =
            kafka::committed_and_end(&fx.bootstrap, &fx.group, &fx.topic, partitions).await;
        offsets.iter().all(|(c, end)| c == end).then_some(())
    })
    .await;
}

/// Defect: at the drain timeout the engine aborted the running tasks but left their offsets
/// "started", so closing the consumer (which revokes its partitions) waited the whole drain
/// timeout a second time, and the pod, whose grace period is the drain timeout plus 10 s, could
/// be killed holding its leases. Stuck handlers must not stretch shutdown beyond the drain
/// timeout and a few seconds, leases are released, and the abandoned messages are delivered
/// again.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_with_stuck_handlers_ends_soon_after_the_drain_timeout() {
    let fx = Fixture::new("stuckstop", RedisKind::Single, 2).await;
    fx.pool().set_limit(8).await.unwrap();
    let ids = ids("m", 4);
    kafka::send_many(&kafka::producer(&fx.bootstrap), &fx.topic, &ids).await;
    let drain = Duration::from_secs(4);
    let mut w0 = fx.kafka_worker(
        "w0",
        "probe:600000",
        &[
            "--drain-timeout-seconds",
            "4",
            "--max-concurrency",
            "4",
            "--lease-ttl-ms",
            "30000",
        ],
    );
    eventually(Duration::from_secs(30), "4 stuck handlers", || async {
        (fx.probe("current").await >= 4).then_some(())
    })
    .await;
    let asked = Instant::now();
    let exited = w0.terminate_within(Duration::from_secs(60));
    let took = asked.elapsed();
    assert_eq!(exited, Some(true), "the worker exits cleanly");
    // The leases (TTL 30 s) were released, not left to expire.
    assert_eq!(fx.pool().snapshot().await.unwrap().in_use, 0);
    println!("stuck handlers: stopped {took:?} after SIGTERM (drain timeout {drain:?})");
    assert!(
        took < drain + Duration::from_millis(2500),
        "shutdown took {took:?} with a drain timeout of {drain:?}"
    );

    let _w1 = fx.kafka_worker("w1", "echo", &[]);
    fx.wait_finished(&ids, Duration::from_secs(60)).await;
    fx.cleanup().await;
}

/// The exec handler of the revocation test: tells that it started (`<file>.started`), then
/// waits until the test creates `<file>`, the message body.
const GATED: &str = r#"exec:["sh", "-c", "read f; touch \"$f.started\"; while [ ! -e \"$f\" ]; do sleep 0.02; done; echo ok"]"#;

/// The partitions of the first "partitions revoked" line of a JSON log.
fn revoked_in(log: &str) -> Option<Vec<i32>> {
    log.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = v.get("fields")?;
        if fields.get("message")?.as_str()? != "partitions revoked: draining before commit" {
            return None;
        }
        let list = fields.get("partitions")?.as_str()?;
        Some(
            list.trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect(),
        )
    })
}

fn gate(dir: &Path, partition: i32) -> PathBuf {
    dir.join(format!("p{partition}"))
}

/// Defect: a revocation took the moved low watermarks of *every* partition but stored only the
/// revoked ones', so a partition the worker kept, whose last message finished while the
/// revocation drained, never had its final offset committed (phantom lag that blocks scaling to
/// zero, and a replay on the next rebalance). The test holds one message per partition in a
/// gated handler, makes a second worker join, lets the retained partition's message finish
/// while the revoked one's still drains, then checks that both partitions commit to the end.
#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_does_not_swallow_a_retained_partitions_offset() {
    let fx = Fixture::new("revoke", RedisKind::Single, 2).await;
    fx.pool().set_limit(8).await.unwrap();
    let dir = std::env::temp_dir().join(&fx.name);
    std::fs::create_dir_all(&dir).unwrap();
    let producer = kafka::producer(&fx.bootstrap);
    for p in 0..2 {
        let body = gate(&dir, p).display().to_string();
        kafka::send_to(
            &producer,
            &fx.topic,
            p,
            &format!("p{p}"),
            None,
            body.as_bytes(),
        )
        .await;
    }
    let args = [
        "--drain-timeout-seconds",
        "60",
        "--commit-interval-ms",
        "200",
    ];
    let mut a = fx.worker_command("a");
    a.args(["--source", "kafka", "--kafka-bootstrap", &fx.bootstrap])
        .args(["--kafka-topic", &fx.topic, "--kafka-group", &fx.group])
        .args(["--handler", GATED])
        .args(args)
        .env("QP_LOG_FORMAT", "json");
    let a = Proc::spawn(&format!("{}-a", fx.name), a);
    eventually(
        Duration::from_secs(30),
        "both messages running in a",
        || async {
            (0..2)
                .all(|p| gate(&dir, p).with_extension("started").exists())
                .then_some(())
        },
    )
    .await;

    let _b = fx.kafka_worker("b", GATED, &args);
    let revoked = eventually(Duration::from_secs(30), "a revocation in a", || async {
        revoked_in(&a.log_text())
    })
    .await;
    assert_eq!(revoked.len(), 1, "one of two partitions moves: {revoked:?}");
    let (moved, kept) = (revoked[0], 1 - revoked[0]);
    // The kept partition's message finishes while the revocation waits for the moved one's.
    std::fs::write(gate(&dir, kept), b"").unwrap();
    fx.wait_finished(&[format!("p{kept}")], Duration::from_secs(30))
        .await;
    std::fs::write(gate(&dir, moved), b"").unwrap();
    fx.wait_finished(&[format!("p{moved}")], Duration::from_secs(30))
        .await;

    committed_to_the_end(&fx, 2, Duration::from_secs(15)).await;
    println!("revocation of partition {moved}: partition {kept}'s offset was committed too");
    let _ = std::fs::remove_dir_all(&dir);
    fx.cleanup().await;
}

/// Defect: a handler that panicked took its task down with the message's offset "started", so
/// nothing of its partition was committed past it again, and with `--ordered-by-key` its key's
/// lane stayed blocked: later messages of the key never ran. A panic must fail its message
/// (dead letter, with the reason) and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_fails_its_message_alone() {
    let fx = Fixture::new("panic", RedisKind::Single, 1).await;
    fx.pool().set_limit(4).await.unwrap();
    let producer = kafka::producer(&fx.bootstrap);
    let mut all = vec!["boom-0".to_owned()];
    kafka::send_to(&producer, &fx.topic, 0, "boom-0", Some("k"), b"boom").await;
    for id in ids("ok", 4) {
        kafka::send_to(&producer, &fx.topic, 0, &id, Some("k"), b"fine").await;
        all.push(id);
    }
    let _w = fx.kafka_worker(
        "w0",
        "panic:boom",
        &["--ordered-by-key", "--commit-interval-ms", "200"],
    );
    fx.wait_finished(&all, Duration::from_secs(30)).await;
    let states = fx.states(&all).await;
    assert_eq!(states["boom-0"], "failed");
    assert!(all[1..].iter().all(|id| states[id] == "done"), "{states:?}");
    let reason: Option<String> = redis::cmd("HGET")
        .arg(fx.keys.result("boom-0"))
        .arg("error")
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    let reason = reason.unwrap_or_default();
    assert!(reason.contains("panicked"), "{reason}");
    committed_to_the_end(&fx, 1, Duration::from_secs(15)).await;
    fx.cleanup().await;
}

/// Defect: a message waiting to retry kept its token through the backoff sleep, so during a
/// downstream outage the failing messages pinned the whole budget and messages that would have
/// succeeded waited for them to give up. Here two failing messages (retried twice, 2 s backoff
/// and more) hold a limit of 2 first; the healthy messages behind them must all finish while
/// the failing ones are still retrying, and the failing ones still end in the dead letter.
#[tokio::test(flavor = "multi_thread")]
async fn retries_wait_without_their_tokens() {
    let fx = Fixture::new("retrytoken", RedisKind::Single, 1).await;
    fx.pool().set_limit(2).await.unwrap();
    let producer = kafka::producer(&fx.bootstrap);
    let bad = ids("bad", 2);
    let ok = ids("ok", 6);
    for id in &bad {
        kafka::send_to(&producer, &fx.topic, 0, id, None, b"bad").await;
    }
    for id in &ok {
        kafka::send_to(&producer, &fx.topic, 0, id, None, b"fine").await;
    }
    let _w = fx.kafka_worker(
        "w0",
        "fail:bad",
        &[
            "--retries",
            "2",
            "--retry-backoff-ms",
            "2000",
            "--max-concurrency",
            "8",
        ],
    );
    fx.wait_finished(&ok, Duration::from_secs(30)).await;
    let states = fx.states(&bad).await;
    assert!(
        bad.iter()
            .all(|id| states.get(id).map(String::as_str) == Some("processing")),
        "the healthy messages finished only after the failing ones gave up: {states:?}"
    );
    fx.wait_finished(&bad, Duration::from_secs(60)).await;
    let states = fx.states(&bad).await;
    assert!(bad.iter().all(|id| states[id] == "failed"), "{states:?}");
    fx.cleanup().await;
}

/// Defect: the result writer put up to 256 results in one script call whatever their size (256
/// results of 1 MiB: one 256 MiB call, during which Redis serves nobody else). Here 24 results
/// of 900 kB queue up while Redis pauses writes (`CLIENT PAUSE`), then go out; Redis's slow log
/// (on a private Redis, logging every command) shows how many results each FINISH call carried.
/// At most 4 MiB of results may go in one call.
#[tokio::test(flavor = "multi_thread")]
async fn large_results_are_written_in_bounded_batches() {
    use qp_tests::bench::private_redis::PrivateRedis;
    let fx = Fixture::new("bigresults", RedisKind::Single, 1).await;
    let private = PrivateRedis::start(&format!("{}-redis", fx.name))
        .await
        .unwrap();
    let mut redis = redis::Client::open(private.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (k, v) in [
        ("slowlog-log-slower-than", "0"),
        ("slowlog-max-len", "100000"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let size = 900_000;
    let ids = ids("big", 24);
    let producer = kafka::producer(&fx.bootstrap);
    for id in &ids {
        kafka::send_to(&producer, &fx.topic, 0, id, None, &vec![b'x'; size]).await;
    }
    let port = qp_tests::procs::free_port();
    let mut cmd = std::process::Command::new(qp_tests::procs::binary("qp-worker"));
    cmd.arg("run")
        .args(["--namespace", &fx.namespace, "--name", &fx.name])
        .args([
            "--worker-id",
            "w0",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--redis-url", &private.url(), "--ungated"])
        .args(["--source", "kafka", "--kafka-bootstrap", &fx.bootstrap])
        .args(["--kafka-topic", &fx.topic, "--kafka-group", &fx.group])
        .args(["--handler", "sleep:2000", "--max-concurrency", "64"])
        .env("RUST_LOG", "info,librdkafka=warn");
    let _w = Proc::spawn(&format!("{}-w0", fx.name), cmd);

    let states_conn = redis.clone();
    let state_of = |ids: Vec<String>| {
        let mut conn = states_conn.clone();
        let keys = fx.keys.clone();
        async move {
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGET").arg(keys.result(id)).arg("state");
            }
            let states: Vec<Option<String>> = pipe.query_async(&mut conn).await.unwrap();
            states
        }
    };
    eventually(Duration::from_secs(30), "every message running", || {
        let s = state_of(ids.clone());
        async move {
            let states = s.await;
            states
                .iter()
                .all(|s| s.as_deref() == Some("processing"))
                .then_some(())
        }
    })
    .await;
    // Finishes queue up while writes are paused.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("WRITE")
        .query_async(&mut redis)
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "every result written", || {
        let s = state_of(ids.clone());
        async move {
            let states = s.await;
            states
                .iter()
                .all(|s| s.as_deref() == Some("done"))
                .then_some(())
        }
    })
    .await;

    let finish = qp_protocol::scripts::FINISH.get_hash().to_owned();
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    // Each entry: [id, timestamp, duration µs, [args...], client addr, client name]. FINISH
    // takes KEYS processed, failed, then one result hash per message.
    let mut calls = Vec::new();
    for entry in log {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let (Some(redis::Value::Int(micros)), Some(redis::Value::Array(args))) =
            (fields.get(2), fields.get(3))
        else {
            continue;
        };
        let text = |i: usize| match args.get(i) {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        if text(0).eq_ignore_ascii_case("evalsha") && text(1) == finish {
            let results = text(2).parse::<usize>().unwrap_or(0).saturating_sub(2);
            calls.push((results, *micros));
        }
    }
    let most = calls.iter().map(|c| c.0).max().unwrap_or(0);
    let longest = calls.iter().map(|c| c.1).max().unwrap_or(0);
    println!(
        "24 results of {size} bytes: {} FINISH calls, at most {most} results ({} kB) in one, \
         the longest took {longest} µs in Redis",
        calls.len(),
        most * size / 1000
    );
    // A first call may be answered NOSCRIPT and repeated, so there can be more than 24.
    assert!(calls.iter().map(|c| c.0).sum::<usize>() >= 24, "{calls:?}");
    assert!(
        most * size <= 4 << 20,
        "{most} results of {size} bytes in one call"
    );
    fx.cleanup().await;
}
