//! The data plane through Redis faults: what a worker does when Redis refuses, or loses a
//! reply, at the worst moment. Each test injects one fault into real `qp-worker` processes
//! against the real Redis and checks that no message is stranded.

use std::process::Command;
use std::time::{Duration, Instant};

use qp_tests::downstream::Downstream;
use qp_tests::fixture::{AclUser, Fixture, RedisKind, eventually};
use qp_tests::procs::{self, Proc};
use qp_tests::proxy::RedisProxy;
use qp_worker::source::redis_list::Envelope;

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn push(fx: &Fixture, list: &str, ids: &[String]) {
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("LPUSH")
            .arg(list)
            .arg(Envelope::new(id, Some("text/plain"), id.as_bytes()).to_bytes())
            .ignore();
    }
    let _: () = pipe.query_async(&mut fx.conn.clone()).await.unwrap();
}

/// How long a worker with `--drain-timeout-seconds 1` may take to exit after SIGTERM: the drain
/// timeout, then the steps after it (return, release) whose bound is shared (7 s at most,
/// `AFTER_DRAIN`), here with a healthy Redis that answers at once.
const DRAIN_BOUND: Duration = Duration::from_millis(3500);

/// Graceful shutdown of a Redis-list worker whose handlers outlast the drain timeout: it exits
/// within the bound, returns what it held to the list (a second worker finishes it), releases
/// its leases and removes its heartbeat.
async fn slow_list_handlers_stop_in_time(kind: RedisKind) {
    let fx = Fixture::new("liststop", kind, 0).await;
    fx.pool().set_limit(10).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let ids = ids("m", 12);
    push(&fx, &list, &ids).await;
    let mut victim = fx.list_worker(
        "victim",
        &list,
        "probe:600000",
        &[
            "--max-concurrency",
            "4",
            "--drain-timeout-seconds",
            "1",
            "--lease-ttl-ms",
            "30000",
        ],
    );
    eventually(Duration::from_secs(30), "4 slow handlers", || async {
        (fx.probe("current").await >= 4).then_some(())
    })
    .await;
    let asked = Instant::now();
    let exited = victim.terminate_within(Duration::from_secs(30));
    let took = asked.elapsed();
    assert_eq!(exited, Some(true), "the worker exits cleanly");
    let processing = fx.keys.processing_list(&list, "victim").unwrap();
    let held = fx.llen(&processing).await;
    let in_use = fx.pool().snapshot().await.unwrap().in_use;
    let heartbeat: Option<f64> = redis::cmd("ZSCORE")
        .arg(fx.keys.heartbeats())
        .arg("victim")
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    println!(
        "redis list ({kind:?}), slow handlers: stopped {took:?} after SIGTERM (drain 1 s), \
         {held} left in its processing list, {in_use} leases held"
    );
    assert!(took < DRAIN_BOUND, "shutdown took {took:?}");
    assert_eq!(held, 0, "returned to the list");
    assert_eq!(in_use, 0, "leases released");
    assert_eq!(
        heartbeat, None,
        "heartbeat removed after a successful return"
    );

    let _rescuer = fx.list_worker("rescuer", &list, "echo", &[]);
    fx.wait_finished(&ids, Duration::from_secs(30)).await;
    let states = fx.states(&ids).await;
    assert!(states.values().all(|s| s == "done"), "{states:?}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_list_handlers_stop_in_time_and_return_their_messages() {
    slow_list_handlers_stop_in_time(RedisKind::Single).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_list_handlers_stop_in_time_and_return_their_messages_on_redis_cluster() {
    slow_list_handlers_stop_in_time(RedisKind::Cluster).await;
}

/// Defect: a Redis-list worker whose return step fails at shutdown only logged it and then
/// removed its heartbeat, so the reaper never looked at its processing list and the messages in
/// it never finished. The fault: the worker's Redis user loses `LMOVE` (what the return script
/// uses) while it holds messages, then it is stopped with a drain timeout shorter than its
/// handler. Its heartbeat must stay, so that another worker's reaper returns the messages.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_cannot_return_its_messages_leaves_them_to_the_reaper() {
    let fx = Fixture::new("noreturn", RedisKind::Single, 0).await;
    fx.pool().set_limit(10).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let ids = ids("m", 6);
    push(&fx, &list, &ids).await;

    let user = AclUser::create(&fx, &["allkeys", "allchannels", "+@all"]).await;

    let common = [
        "--dead-after-ms",
        "2000",
        "--heartbeat-ms",
        "250",
        "--drain-timeout-seconds",
        "1",
    ];
    let mut cmd = fx.worker_command("victim");
    cmd.args(["--source", "redis-list", "--list-key", &list])
        .args(["--handler", "probe:60000", "--max-concurrency", "4"])
        .args(common)
        .envs(user.env());
    let mut victim = Proc::spawn(&format!("{}-victim", fx.name), cmd);
    let processing = fx.keys.processing_list(&list, "victim").unwrap();
    eventually(
        Duration::from_secs(30),
        "the victim to hold 4 messages",
        || async { (fx.probe("current").await >= 4).then_some(()) },
    )
    .await;

    // The return step (a script that moves items with LMOVE) is now refused.
    user.set(&["-lmove"]).await;
    let stopped = Instant::now();
    assert!(victim.terminate(), "the victim exits cleanly");
    let stop_took = stopped.elapsed();
    let stranded = fx.llen(&processing).await;
    assert!(stranded >= 4, "the refused return left {stranded} messages");
    // Within the shutdown bound all the same, and the leases released (not left to expire).
    assert!(stop_took < DRAIN_BOUND, "stopping took {stop_took:?}");
    assert_eq!(fx.pool().snapshot().await.unwrap().in_use, 0, "leases held");

    let _rescuer = fx.list_worker("rescuer", &list, "probe:10", &common);
    let rescued = Instant::now();
    fx.wait_finished(&ids, Duration::from_secs(30)).await;
    let states = fx.states(&ids).await;
    assert!(states.values().all(|s| s == "done"), "{states:?}");
    eventually(
        Duration::from_secs(10),
        "an empty processing list",
        || async { (fx.llen(&processing).await == 0).then_some(()) },
    )
    .await;
    println!(
        "return refused: victim stopped in {stop_took:?} holding {stranded} messages; all {} \
         done {:?} after a second worker started (dead-after 2 s)",
        ids.len(),
        rescued.elapsed()
    );
    drop(user);
    fx.cleanup().await;
}

/// Defect: when the connection dropped after the server moved a message into the worker's
/// processing list but before the reply arrived, the message sat there, unprocessed, until the
/// worker exited. The fault: a proxy between worker and Redis swallows the reply to the `BLMOVE`
/// that took the message and closes the connection. The live worker must find and process it.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_blmove_reply_does_not_strand_the_message() {
    let fx = Fixture::new("lostreply", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let upstream = fx.env.get("QP_REDIS_URL");
    let proxy = RedisProxy::start(upstream.trim_start_matches("redis://")).await;

    let port = procs::free_port();
    let mut cmd = Command::new(procs::binary("qp-worker"));
    cmd.arg("run")
        .args(["--namespace", &fx.namespace, "--name", &fx.name])
        .args([
            "--worker-id",
            "w0",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--redis-url", &proxy.url()])
        .args(["--source", "redis-list", "--list-key", &list])
        .args(["--handler", "echo"])
        .env("RUST_LOG", "info");
    let _worker = Proc::spawn(&format!("{}-w0", fx.name), cmd);
    // The worker is up once it processed something.
    let warmup = ids("warmup", 1);
    push(&fx, &list, &warmup).await;
    fx.wait_finished(&warmup, Duration::from_secs(30)).await;

    proxy.cut_next_move();
    let lost = ids("lost", 1);
    push(&fx, &list, &lost).await;
    let pushed = Instant::now();
    eventually(Duration::from_secs(10), "the reply to be cut", || async {
        (proxy.cuts() == 1).then_some(())
    })
    .await;
    fx.wait_finished(&lost, Duration::from_secs(15)).await;
    let recovered = pushed.elapsed();
    let after = ids("after", 3);
    push(&fx, &list, &after).await;
    fx.wait_finished(&after, Duration::from_secs(15)).await;
    let processing = fx.keys.processing_list(&list, "w0").unwrap();
    eventually(Duration::from_secs(10), "nothing left behind", || async {
        (fx.llen(&processing).await == 0).then_some(())
    })
    .await;
    println!("lost BLMOVE reply: the message was processed {recovered:?} after it was pushed");
    fx.cleanup().await;
}

/// The handler of the poison test: kills its own worker (the parent of the exec child) on a
/// message that contains "crash", the way a segfaulting library or an OOM kill would.
const CRASHER: &str =
    r#"exec:["sh", "-c", "b=$(cat); case \"$b\" in *crash*) kill -9 $PPID;; esac; echo ok"]"#;

/// Defect: a message that takes its worker down was delivered again without end (the restarted
/// worker returns its processing list first, so the same message comes straight back). Deliveries
/// are counted; the one past `--max-deliveries` is dead-lettered with the reason instead of run,
/// and the messages around it are processed.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_crashes_the_worker_is_dead_lettered_after_max_deliveries() {
    let fx = Fixture::new("poison", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let mut pipe = redis::pipe();
    for (id, body) in [("good-0", "fine"), ("poison", "crash"), ("good-1", "fine")] {
        pipe.cmd("LPUSH")
            .arg(&list)
            .arg(Envelope::new(id, Some("text/plain"), body.as_bytes()).to_bytes())
            .ignore();
    }
    let _: () = pipe.query_async(&mut fx.conn.clone()).await.unwrap();
    let all: Vec<String> = ["good-0", "poison", "good-1"].map(String::from).to_vec();

    // Restarted after every crash, with the same id (as a pod's container is).
    let starts = fx
        .restart_until_finished(&all, 6, || {
            fx.list_worker(
                "w0",
                &list,
                CRASHER,
                &["--max-deliveries", "3", "--max-concurrency", "1"],
            )
        })
        .await;
    let states = fx.states(&all).await;
    assert_eq!(states["good-0"], "done");
    assert_eq!(states["good-1"], "done");
    assert_eq!(states["poison"], "failed");
    let reason: String = redis::cmd("HGET")
        .arg(fx.keys.result("poison"))
        .arg("error")
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    assert!(reason.contains("delivered 4 times"), "{reason}");
    println!(
        "poison message: dead-lettered at the 4th delivery after {starts} worker starts: {reason}"
    );
    fx.cleanup().await;
}

/// Fault test: every connection of the workers' Redis user is killed (`CLIENT KILL USER`) every
/// 200 ms while 300 messages go through a Redis list with a limit of 4: blocked `BLMOVE`s and
/// `BLPOP`s, script calls and acknowledgements fail mid-flight, again and again. Nothing may be
/// lost or left in a processing list, and the ceiling holds.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_workers_redis_connections_repeatedly_loses_nothing() {
    let fx = Fixture::new("clientkill", RedisKind::Single, 0).await;
    fx.pool().set_limit(4).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let ids = ids("m", 300);
    push(&fx, &list, &ids).await;
    let user = AclUser::create(&fx, &["allkeys", "allchannels", "+@all"]).await;
    // Concurrency is measured at the downstream: the probe handler keeps its count in Redis,
    // through the very connections this test kills.
    let downstream = Downstream::start(Duration::from_millis(20), false).await;
    let workers: Vec<Proc> = (0..3)
        .map(|i| {
            let mut cmd = fx.worker_command(&format!("w{i}"));
            cmd.args(["--source", "redis-list", "--list-key", &list])
                .args(["--handler", &downstream.url, "--max-concurrency", "4"])
                .envs(user.env());
            Proc::spawn(&format!("{}-w{i}", fx.name), cmd)
        })
        .collect();

    let kills = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let killer = {
        let mut conn = fx.conn.clone();
        let user = user.name.clone();
        let kills = kills.clone();
        tokio::spawn(async move {
            loop {
                let killed: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("USER")
                    .arg(&user)
                    .query_async(&mut conn)
                    .await;
                let n = killed.unwrap_or(0).max(0) as u64;
                kills.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                // The fault's pace: a kill every 200 ms, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let started = Instant::now();
    fx.wait_finished(&ids, Duration::from_secs(180)).await;
    let took = started.elapsed();
    killer.abort();
    let states = fx.states(&ids).await;
    let failed = states.values().filter(|s| *s != "done").count();
    assert_eq!(failed, 0, "{failed} messages failed");
    for i in 0..3 {
        let processing = fx.keys.processing_list(&list, &format!("w{i}")).unwrap();
        eventually(
            Duration::from_secs(10),
            "empty processing lists",
            || async { (fx.llen(&processing).await == 0).then_some(()) },
        )
        .await;
    }
    let (max, dups) = (downstream.max(), downstream.twice());
    let kills = kills.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "{kills} connections killed, every 200 ms: 300 messages done in {took:?}, 0 lost, 0 \
         failed, max concurrency {max} (limit 4), processed twice: {dups}"
    );
    assert!(
        kills >= 10,
        "the fault happened: {kills} connections killed"
    );
    assert!(max <= 4, "the limit of 4 was exceeded: {max}");
    drop(workers);
    drop(user);
    fx.cleanup().await;
}

/// Fault test: the HTTP downstream answers 503 for 30 s, then recovers. Messages retry with
/// backoff without holding tokens (the pool's leases in use stay well below the limit during
/// the outage), the retries are bounded, and everything completes after the recovery.
#[tokio::test(flavor = "multi_thread")]
async fn a_downstream_outage_pins_no_tokens_and_everything_completes_after_it() {
    use std::sync::atomic::Ordering;
    let fx = Fixture::new("outage", RedisKind::Single, 0).await;
    let limit = 4;
    fx.pool().set_limit(limit).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let ids = ids("m", 40);
    push(&fx, &list, &ids).await;
    let downstream = Downstream::start(Duration::ZERO, true).await;
    let retries = 8;
    let args = [
        "--retries",
        "8",
        "--retry-backoff-ms",
        "200",
        "--max-concurrency",
        "8",
    ];
    let _workers: Vec<Proc> = (0..2)
        .map(|i| fx.list_worker(&format!("w{i}"), &list, &downstream.url, &args))
        .collect();

    // Sample the leases in use during the outage.
    let outage = Duration::from_secs(30);
    let pool = fx.pool();
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < outage {
        samples.push(pool.snapshot().await.unwrap().in_use);
        // The sampling period of a measurement, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    downstream.state.down.store(false, Ordering::SeqCst);
    let refused = downstream.state.refused.load(Ordering::SeqCst);
    fx.wait_finished(&ids, Duration::from_secs(90)).await;
    let recovered = started.elapsed() - outage;
    let states = fx.states(&ids).await;
    assert!(states.values().all(|s| s == "done"), "{states:?}");
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
    let max = samples.iter().max().copied().unwrap_or(0);
    println!(
        "30 s outage: leases in use mean {mean:.2} / max {max} of {limit}; {refused} requests \
         refused (at most {} with {retries} retries); all 40 done {recovered:?} after recovery",
        ids.len() * (retries + 1)
    );
    assert!(
        mean < limit as f64 / 2.0,
        "tokens were held through the outage: mean {mean:.2} of {limit}"
    );
    assert!(
        refused <= (ids.len() * (retries + 1)) as u64,
        "retries are bounded"
    );
    fx.cleanup().await;
}
