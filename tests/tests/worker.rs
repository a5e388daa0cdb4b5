//! The worker against real Kafka, Redis and Redis Cluster, as separate `qp-worker` processes.
//!
//! The `probe:<ms>` handler records in Redis how many handlers run at once (and how often each
//! id ran), which is what the token pool must bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use qp_protocol::tokens::{WAITER_SLACK, WAKE_CHECK};
use qp_tests::fixture::{AclUser, Fixture, RedisKind, eventually};
use qp_tests::kafka;
use qp_worker::source::redis_list::Envelope;

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn cap_holds(kind: RedisKind) {
    let fx = Fixture::new("cap", kind, 6).await;
    fx.pool().set_limit(8).await.unwrap();
    let ids = ids("m", 240);
    kafka::send_many(&kafka::producer(&fx.bootstrap), &fx.topic, &ids).await;

    let _workers: Vec<_> = (0..3)
        .map(|i| fx.kafka_worker(&format!("w{i}"), "probe:40", &["--max-concurrency", "8"]))
        .collect();
    fx.wait_finished(&ids, Duration::from_secs(90)).await;

    let max = fx.probe("max").await;
    let (dups, _) = fx.duplicate_runs().await;
    println!("{kind:?}: 3 workers, limit 8: observed max concurrency {max}, duplicates {dups}");
    assert!(max <= 8, "the token limit of 8 was exceeded: {max}");
    assert!(
        max >= 7,
        "under backlog the limit should be used: max {max}"
    );
    assert_eq!(dups, 0, "nothing crashed, so nothing runs twice");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_share_a_limit_of_8() {
    cap_holds(RedisKind::Single).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_share_a_limit_of_8_on_redis_cluster() {
    cap_holds(RedisKind::Cluster).await;
}

/// Samples `probe:current` every 5 ms; records the maximum seen since the last reset and
/// every sample with its time.
struct Sampler {
    max: Arc<AtomicI64>,
    last: Arc<AtomicI64>,
    samples: Arc<std::sync::Mutex<Vec<(Instant, i64)>>>,
    stop: Arc<AtomicBool>,
}

impl Sampler {
    fn start(fx: &Fixture) -> Sampler {
        let max = Arc::new(AtomicI64::new(0));
        let last = Arc::new(AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (m, l, s, all) = (max.clone(), last.clone(), stop.clone(), samples.clone());
        let key = format!("{}probe:current", fx.keys.prefix());
        let mut conn = fx.conn.clone();
        tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                let v: Option<i64> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(None);
                let v = v.unwrap_or(0);
                l.store(v, Ordering::SeqCst);
                m.fetch_max(v, Ordering::SeqCst);
                all.lock().unwrap().push((Instant::now(), v));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Sampler {
            max,
            last,
            samples,
            stop,
        }
    }

    /// When concurrency was last seen above `limit` (after `since`), if it was.
    fn last_above(&self, limit: i64, since: Instant) -> Option<Instant> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, v)| *t >= since && *v > limit)
            .map(|(t, _)| *t)
            .max()
    }

    fn reset(&self) {
        self.max.store(0, Ordering::SeqCst);
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_follows_limit_changes_within_a_second() {
    let fx = Fixture::new("resize", RedisKind::Single, 6).await;
    let pool = fx.pool();
    pool.set_limit(8).await.unwrap();
    let ids = ids("m", 3000);
    kafka::send_many(&kafka::producer(&fx.bootstrap), &fx.topic, &ids).await;
    let _workers: Vec<_> = (0..3)
        .map(|i| fx.kafka_worker(&format!("w{i}"), "probe:50", &["--max-concurrency", "8"]))
        .collect();
    let s = Sampler::start(&fx);

    // Phase 1: limit 8 is reached, and all three workers ask for tokens. The first worker to
    // join the group consumes every partition and can fill the limit of 8 alone; until the
    // group's rebalance hands partitions to the others (about 2 s after they start), they have
    // nothing to run, and a growth to 16 measured then measured the rebalance (400 ms in some
    // runs, more in one that failed), not the workers.
    eventually(Duration::from_secs(30), "concurrency 8", || async {
        (s.last.load(Ordering::SeqCst) >= 8).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "three workers asking for tokens",
        || {
            let pool = pool.clone();
            async move { (pool.snapshot().await.ok()?.owners == 3).then_some(()) }
        },
    )
    .await;

    // Phase 2: shrink to 2. Running work is not revoked; new work stops until below 2. Watch
    // for 1.5 s: concurrency must not exceed 2 after the first second.
    let t = Instant::now();
    pool.set_limit(2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shrink = s.last_above(2, t).map_or(Duration::ZERO, |l| l - t);
    assert!(
        shrink <= Duration::from_secs(1),
        "concurrency was still above 2 {shrink:?} after the shrink"
    );
    assert!(s.last.load(Ordering::SeqCst) <= 2);

    // Phase 3: grow to 16: waiters wake and the new capacity is used.
    s.reset();
    let t = Instant::now();
    pool.set_limit(16).await.unwrap();
    eventually(
        Duration::from_secs(1),
        "concurrency 16 after growth",
        || async { (s.last.load(Ordering::SeqCst) >= 16).then_some(()) },
    )
    .await;
    let grow = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let max = s.max.load(Ordering::SeqCst);
    println!("8 -> 2 settled in {shrink:?}; 2 -> 16 reached in {grow:?}; max after growth {max}");
    assert!(max <= 16, "limit 16 exceeded: {max}");
    drop(s);

    // Nothing was revoked or lost: every message finishes, none failed.
    fx.wait_finished(&ids, Duration::from_secs(120)).await;
    let states = fx.states(&ids).await;
    assert!(states.values().all(|s| s == "done"), "a message failed");
    fx.cleanup().await;
}

/// Lease ids start with their owner (the worker id).
async fn leases_of(fx: &Fixture, owner: &str) -> usize {
    let leases: Vec<String> = redis::cmd("ZRANGE")
        .arg(fx.keys.leases())
        .arg(0)
        .arg(-1)
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    leases
        .iter()
        .filter(|l| l.starts_with(&format!("{owner}:")))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_returns_its_tokens_and_loses_nothing() {
    let fx = Fixture::new("crash", RedisKind::Single, 6).await;
    fx.pool().set_limit(8).await.unwrap();
    let ids = ids("m", 300);
    kafka::send_many(&kafka::producer(&fx.bootstrap), &fx.topic, &ids).await;
    let ttl_ms = 2000;
    let args = ["--max-concurrency", "8", "--lease-ttl-ms", "2000"];
    let mut victim = fx.kafka_worker("victim", "probe:100", &args);
    let _others: Vec<_> = (0..2)
        .map(|i| fx.kafka_worker(&format!("w{i}"), "probe:100", &args))
        .collect();

    // Kill it while it holds leases and has work in flight.
    let held = eventually(
        Duration::from_secs(30),
        "the victim holding leases",
        || async {
            let n = leases_of(&fx, "victim").await;
            (n >= 2).then_some(n)
        },
    )
    .await;
    let done_before = fx
        .states(&ids)
        .await
        .values()
        .filter(|s| *s == "done")
        .count();
    victim.kill9();
    let killed = Instant::now();

    // Its permits come back within a lease TTL of the last lease it got: one it held (renewed
    // up to the kill), or one a RELEASE handed to the registration of an ACQUIRE it was
    // blocked in, which outlives the kill by up to one wait (`WAKE_CHECK` + `WAITER_SLACK`;
    // tokens.rs, "Waiting without polling"). The TTL + 1 s this test allowed before is shorter
    // than that, and failed once in CI. Then, 0.5 s for the test's own polling. Expired leases
    // stay in the sorted set until the next script reaps them, so look the way an acquirer
    // does: reap (a snapshot), then count.
    let pool = fx.pool();
    eventually(
        Duration::from_millis(ttl_ms) + WAKE_CHECK + WAITER_SLACK + Duration::from_millis(500),
        "the victim's leases to expire",
        || async {
            pool.snapshot().await.unwrap();
            (leases_of(&fx, "victim").await == 0).then_some(())
        },
    )
    .await;
    let returned = killed.elapsed();

    fx.wait_finished(&ids, Duration::from_secs(120)).await;
    let states = fx.states(&ids).await;
    assert!(
        states.values().all(|s| s == "done"),
        "every message ends with a result"
    );
    let (dups, extra) = fx.duplicate_runs().await;
    println!(
        "killed a worker holding {held} leases after {done_before} results; its permits \
         returned after {returned:?} (ttl {ttl_ms} ms); processed twice: {dups} messages \
         ({extra} extra runs)"
    );
    // Only what was in flight in the victim can have run twice: at most its concurrency.
    assert!(
        dups <= 8,
        "{dups} messages ran twice; at most the victim's 8 in flight may"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn adding_and_removing_workers_mid_stream_loses_nothing() {
    let fx = Fixture::new("rebalance", RedisKind::Single, 6).await;
    fx.pool().set_limit(12).await.unwrap();
    let ids = ids("m", 900);
    kafka::send_many(&kafka::producer(&fx.bootstrap), &fx.topic, &ids).await;
    let args = ["--max-concurrency", "4"];
    let mut first = fx.kafka_worker("w0", "probe:20", &args);

    let done = |n: usize| {
        let fx = &fx;
        let ids = &ids;
        async move {
            let d = fx
                .states(ids)
                .await
                .values()
                .filter(|s| *s == "done")
                .count();
            (d >= n).then_some(d)
        }
    };
    eventually(Duration::from_secs(60), "a third done", || done(300)).await;
    let mut second = fx.kafka_worker("w1", "probe:20", &args);
    let _third = fx.kafka_worker("w2", "probe:20", &args);
    eventually(Duration::from_secs(60), "two thirds done", || done(600)).await;
    // A graceful stop (drain + synchronous commit) and a crash, mid-stream.
    assert!(first.terminate(), "SIGTERM drains and exits 0");
    second.kill9();

    fx.wait_finished(&ids, Duration::from_secs(120)).await;
    let states = fx.states(&ids).await;
    assert_eq!(states.len(), ids.len());
    assert!(states.values().all(|s| s == "done"));
    let (dups, _) = fx.duplicate_runs().await;
    println!(
        "rebalance: {} messages, all done; processed twice: {dups}",
        ids.len()
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_list_source_survives_a_killed_worker() {
    let fx = Fixture::new("list", RedisKind::Single, 0).await;
    fx.pool().set_limit(6).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let ids = ids("m", 300);
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("LPUSH")
            .arg(&list)
            .arg(Envelope::new(id, Some("text/plain"), id.as_bytes()).to_bytes())
            .ignore();
    }
    let _: () = pipe.query_async(&mut fx.conn.clone()).await.unwrap();

    let args = [
        "--max-concurrency",
        "4",
        "--dead-after-ms",
        "2000",
        "--heartbeat-ms",
        "250",
    ];
    let mut victim = fx.list_worker("victim", &list, "probe:50", &args);
    let _others: Vec<_> = (0..2)
        .map(|i| fx.list_worker(&format!("w{i}"), &list, "probe:50", &args))
        .collect();
    let processing = fx.keys.processing_list(&list, "victim").unwrap();
    // Kill it while its processing list holds messages.
    eventually(
        Duration::from_secs(30),
        "the victim to hold messages",
        || async {
            let n: i64 = redis::cmd("LLEN")
                .arg(&processing)
                .query_async(&mut fx.conn.clone())
                .await
                .unwrap();
            (n > 0).then_some(())
        },
    )
    .await;
    victim.kill9();

    fx.wait_finished(&ids, Duration::from_secs(90)).await;
    let states = fx.states(&ids).await;
    assert!(states.values().all(|s| s == "done"));
    let left: i64 = redis::cmd("LLEN")
        .arg(&processing)
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    assert_eq!(
        left, 0,
        "the reaper emptied the dead worker's processing list"
    );
    let (dups, _) = fx.duplicate_runs().await;
    println!("redis list: 300 messages done after a kill -9; processed twice: {dups}");
    assert!(
        dups <= 4,
        "only the victim's in-flight messages may run twice"
    );
    fx.cleanup().await;
}

/// Dead letters of a Redis list target: (id, reason) pairs.
async fn dead_letters(fx: &Fixture, key: &str) -> Vec<(String, String)> {
    let raw: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    raw.iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(r).expect("dead letter is JSON");
            (
                v["id"].as_str().unwrap_or_default().to_owned(),
                v["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_go_to_the_dead_letter_and_the_worker_keeps_going() {
    let fx = Fixture::new("bad", RedisKind::Single, 2).await;
    fx.pool().set_limit(4).await.unwrap();
    let p = kafka::producer(&fx.bootstrap);
    kafka::send(&p, &fx.topic, "ok-1", None, Some("text/plain"), b"fine").await;
    kafka::send(
        &p,
        &fx.topic,
        "bad-json",
        None,
        Some("application/json"),
        b"{nope",
    )
    .await;
    kafka::send(&p, &fx.topic, "too-big", None, None, &vec![b'x'; 4096]).await;
    kafka::send(&p, &fx.topic, "poison", None, None, b"a poison pill").await;
    kafka::send(&p, &fx.topic, "ok-2", None, None, b"also fine").await;

    let _w = fx.kafka_worker(
        "w0",
        "fail:poison",
        &[
            "--retries",
            "2",
            "--retry-backoff-ms",
            "10",
            "--max-message-bytes",
            "1024",
        ],
    );
    let all: Vec<String> = ["ok-1", "bad-json", "too-big", "poison", "ok-2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    fx.wait_finished(&all, Duration::from_secs(60)).await;
    let states = fx.states(&all).await;
    assert_eq!(states["ok-1"], "done");
    assert_eq!(states["ok-2"], "done");
    for id in ["bad-json", "too-big", "poison"] {
        assert_eq!(states[id], "failed", "{id}");
    }

    let dlq = dead_letters(&fx, &fx.keys.dead_letter()).await;
    let reason = |id: &str| {
        dlq.iter()
            .find(|(i, _)| i == id)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{id} is not in the dead letter: {dlq:?}"))
    };
    assert!(
        reason("bad-json").contains("malformed"),
        "{}",
        reason("bad-json")
    );
    assert!(
        reason("too-big").contains("oversized"),
        "{}",
        reason("too-big")
    );
    assert!(
        reason("poison").contains("gave up after 3 attempts"),
        "{}",
        reason("poison")
    );
    assert_eq!(dlq.len(), 3);

    // The poll API shows the failure reason too.
    let err: Option<String> = redis::cmd("HGET")
        .arg(fx.keys.result("poison"))
        .arg("error")
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    assert!(err.unwrap().contains("poison"));
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_list_items_go_to_a_kafka_dead_letter_topic() {
    let fx = Fixture::new("badlist", RedisKind::Cluster, 1).await;
    fx.pool().set_limit(2).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let mut conn = fx.conn.clone();
    let _: i64 = redis::cmd("LPUSH")
        .arg(&list)
        .arg(&b"this is not an envelope"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let good = Envelope::new("good", None, b"ok").to_bytes();
    let _: i64 = redis::cmd("LPUSH")
        .arg(&list)
        .arg(good)
        .query_async(&mut conn)
        .await
        .unwrap();
    let dead_topic = fx.topic.clone(); // created with 1 partition by the fixture
    let mut cmd = fx.worker_command("w0");
    cmd.args([
        "--source",
        "redis-list",
        "--list-key",
        &list,
        "--handler",
        "echo",
    ])
    .args(["--kafka-bootstrap", &fx.bootstrap])
    .args(["--dead-letter", &format!("kafka:{dead_topic}")]);
    let _w = qp_tests::procs::Proc::spawn(&format!("{}-w0", fx.name), cmd);

    fx.wait_finished(&["good".to_owned()], Duration::from_secs(30))
        .await;
    // The malformed item arrives on the dead-letter topic with its reason.
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &fx.bootstrap)
        .set("group.id", format!("{}-reader", fx.name))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dead_topic]).unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a dead letter within 30 s")
        .unwrap();
    assert_eq!(msg.payload(), Some(&b"this is not an envelope"[..]));
    let reason = msg
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "qp-reason"))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("qp-reason header");
    assert!(reason.contains("malformed"), "{reason}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_authenticates_as_a_redis_acl_user_limited_to_its_keys() {
    let fx = Fixture::new("acl", RedisKind::Single, 0).await;
    fx.pool().set_limit(2).await.unwrap();
    // Only this QueueProcessor's keys (and its pub/sub channel), nothing else.
    let pattern = format!("~{}*", fx.keys.prefix());
    let channel = format!("&{}*", fx.keys.prefix());
    let user = AclUser::create(&fx, &["resetkeys", &pattern, &channel, "+@all"]).await;
    let list = format!("{}queue", fx.keys.prefix());
    let _: i64 = redis::cmd("LPUSH")
        .arg(&list)
        .arg(Envelope::new("acl-1", None, b"hi").to_bytes())
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    let mut cmd = fx.worker_command("w0");
    cmd.args([
        "--source",
        "redis-list",
        "--list-key",
        &list,
        "--handler",
        "echo",
    ])
    .envs(user.env());
    let _w = qp_tests::procs::Proc::spawn(&format!("{}-w0", fx.name), cmd);
    fx.wait_finished(&["acl-1".to_owned()], Duration::from_secs(30))
        .await;
    drop(user);
    fx.cleanup().await;
}

/// Back-pressure: with a slow handler, a partition with `--max-pending-per-partition` fetched
/// but unfinished messages is paused (the worker does not buffer the topic), resumed as it
/// drains, and nothing is lost. The pause counter is what an operator watches; the benchmark
/// checks the other side (a fast worker pauses nothing).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_handler_pauses_full_partitions_and_loses_nothing() {
    let fx = Fixture::new("pause", RedisKind::Single, 2).await;
    fx.pool().set_limit(2).await.unwrap();
    let ids = ids("m", 40);
    kafka::send_many(&kafka::producer(&fx.bootstrap), &fx.topic, &ids).await;
    let port = qp_tests::procs::free_port();
    // About 6 messages/s: a full partition takes far longer than the soft wait to drain.
    let args = ["--max-concurrency", "2", "--max-pending-per-partition", "8"];
    let mut worker = fx.kafka_worker_on("w0", port, "probe:300", &args);
    let paused = eventually(Duration::from_secs(30), "a paused partition", || async {
        qp_tests::cluster::metric(port, "qp_worker_kafka_paused_partitions")
            .await
            .filter(|n| *n >= 1.0)
    })
    .await;
    fx.wait_finished(&ids, Duration::from_secs(60)).await;
    let states = fx.states(&ids).await;
    assert!(states.values().all(|s| s == "done"), "every message done");
    let pauses = qp_tests::cluster::metric(port, "qp_worker_kafka_pauses_total")
        .await
        .unwrap();
    let now_paused = qp_tests::cluster::metric(port, "qp_worker_kafka_paused_partitions")
        .await
        .unwrap();
    println!("back-pressure: {paused} partitions paused at once, {pauses} pauses in all");
    assert!(pauses >= 2.0, "pausing again after resuming: {pauses}");
    assert_eq!(now_paused, 0.0, "drained partitions are resumed");
    assert!(worker.terminate());
    fx.cleanup().await;
}

/// `autoOffsetReset: latest` reaches the consumer: a new group skips what the topic held
/// before it joined and processes only what comes after. The worker used to start every new
/// group at the earliest offset whatever the QueueProcessor said.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_group_with_latest_reset_skips_what_came_before() {
    let fx = Fixture::new("reset", RedisKind::Single, 2).await;
    fx.pool().set_limit(4).await.unwrap();
    let producer = kafka::producer(&fx.bootstrap);
    let old = ids("old", 20);
    kafka::send_many(&producer, &fx.topic, &old).await;
    let _w = fx.kafka_worker("w0", "echo", &["--kafka-auto-offset-reset", "latest"]);
    // Until the group has joined, a new message may fall before its starting point: send one
    // more at each check until any of them is processed.
    let mut sent = Vec::new();
    let first = eventually(Duration::from_secs(40), "a new message processed", || {
        sent.push(format!("new-{}", sent.len()));
        let (fx, producer, sent) = (&fx, &producer, sent.clone());
        async move {
            let id = sent.last().expect("one was just added");
            kafka::send_many(producer, &fx.topic, std::slice::from_ref(id)).await;
            let states = fx.states(&sent).await;
            sent.into_iter()
                .find(|id| states.get(id).map(String::as_str) == Some("done"))
        }
    })
    .await;
    // From here on, every message is processed, and none of those sent before.
    let after = ids("after", 10);
    kafka::send_many(&producer, &fx.topic, &after).await;
    fx.wait_finished(&after, Duration::from_secs(30)).await;
    let states = fx.states(&old).await;
    assert!(
        states.is_empty(),
        "messages sent before the group joined were processed: {states:?} (first new: {first})"
    );
    fx.cleanup().await;
}
