//! The Redis-list source takes messages in batches: as many as the engine has room for in one
//! round trip of pipelined `LMOVE`s, where it used to send one `BLMOVE` per message. These tests
//! hold it to the round trips and to the crash guarantees of one-at-a-time moves.

use std::process::Command;
use std::time::Duration;

use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::{Conn, RedisSettings};
use qp_protocol::tokens::{PoolOptions, TokenPool};
use qp_tests::bench::private_redis::PrivateRedis;
use qp_tests::fixture::{Fixture, RedisKind, eventually};
use qp_tests::procs::{self, Proc};
use qp_tests::proxy::RedisProxy;
use qp_worker::source::redis_list::Envelope;

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn push(conn: &mut Conn, list: &str, ids: &[String]) {
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("LPUSH")
                .arg(list)
                .arg(Envelope::new(id, Some("text/plain"), id.as_bytes()).to_bytes())
                .ignore();
        }
        let _: () = pipe.query_async(conn).await.unwrap();
    }
}

/// Socket reads the server processed (`INFO stats`): one per batch of commands that arrived
/// together, so a pipeline counts once and a command sent alone counts once.
async fn reads_processed(conn: &mut Conn) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_reads_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_reads_processed (Redis 6 or newer)")
}

/// Defect (issue 16): the list source took one `BLMOVE` round trip per message, behind a job
/// channel of one, so a busy list cost at least one round trip per message on top of the
/// results and acknowledgements. On a private Redis (no other client), 2000 messages queued
/// before the worker starts: the server's reads per message must stay well below one. The old
/// worker read 1.1 or more per message here; batched it is about 0.1 - 0.2.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_list_costs_far_less_than_a_round_trip_per_message() {
    let redis = PrivateRedis::start("list-batch-redis").await.unwrap();
    let settings = RedisSettings::single(redis.url());
    let mut conn = settings.connect().await.unwrap();
    let keys = Keys::new("tests", "list-batch");
    TokenPool::new(
        conn.clone(),
        settings.clone(),
        keys.clone(),
        PoolOptions::default(),
    )
    .set_limit(64)
    .await
    .unwrap();
    let list = format!("{}queue", keys.prefix());
    let n = 2000;
    push(&mut conn, &list, &ids("m", n)).await;

    let before = reads_processed(&mut conn).await;
    let mut cmd = Command::new(procs::binary("qp-worker"));
    cmd.arg("run")
        .args(["--namespace", "tests", "--name", "list-batch"])
        .args(["--worker-id", "w0"])
        .args(["--listen", &format!("127.0.0.1:{}", procs::free_port())])
        .args(["--redis-url", &redis.url()])
        .args(["--source", "redis-list", "--list-key", &list])
        .args(["--handler", "echo", "--max-concurrency", "64"])
        .env("RUST_LOG", "info");
    let mut worker = Proc::spawn("list-batch-w0", cmd);
    let processed = keys.processed();
    let mut polls = 0u64;
    eventually(Duration::from_secs(60), "every message processed", || {
        polls += 1;
        let mut conn = conn.clone();
        let key = processed.clone();
        async move {
            let done: Option<usize> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .ok()?;
            (done? >= n).then_some(())
        }
    })
    .await;
    // Our own reads: the polls and the two INFOs.
    let reads = reads_processed(&mut conn).await - before - polls - 1;
    assert!(worker.terminate(), "the worker exits cleanly");
    let per_message = reads as f64 / n as f64;
    println!("{n} messages from a busy list: {reads} reads by Redis, {per_message:.3} per message");
    assert!(
        per_message < 0.5,
        "{per_message:.3} Redis reads per message: the list is still taken a message per round trip"
    );
    assert_eq!(
        redis::cmd("LLEN")
            .arg(keys.processing_list(&list, "w0").unwrap())
            .query_async::<usize>(&mut conn)
            .await
            .unwrap(),
        0,
        "everything acknowledged"
    );
}

/// The crash guarantee with batches: the reply to a pipeline of `LMOVE`s that moved a whole
/// batch is lost (a proxy swallows it and closes the connection). Every message of the batch
/// sits in the worker's processing list with nobody working on it; the live worker must adopt
/// and process all of them, and leave nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_reply_to_a_batch_strands_none_of_its_messages() {
    let fx = Fixture::new("lostbatch", RedisKind::Single, 0).await;
    fx.pool().set_limit(8).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let upstream = fx.env.get("QP_REDIS_URL");
    let proxy = RedisProxy::start(upstream.trim_start_matches("redis://")).await;
    // Queued before the worker starts: its first take is a batch, and that reply is lost.
    let batch = ids("batch", 20);
    push(&mut fx.conn.clone(), &list, &batch).await;
    proxy.cut_next_move();

    let mut cmd = Command::new(procs::binary("qp-worker"));
    cmd.arg("run")
        .args(["--namespace", &fx.namespace, "--name", &fx.name])
        .args(["--worker-id", "w0"])
        .args(["--listen", &format!("127.0.0.1:{}", procs::free_port())])
        .args(["--redis-url", &proxy.url()])
        .args(["--source", "redis-list", "--list-key", &list])
        .args(["--handler", "echo"])
        .env("RUST_LOG", "info");
    let _worker = Proc::spawn(&format!("{}-w0", fx.name), cmd);
    eventually(
        Duration::from_secs(20),
        "the batch's reply to be cut",
        || async { (proxy.cuts() == 1).then_some(()) },
    )
    .await;
    fx.wait_finished(&batch, Duration::from_secs(20)).await;
    let after = ids("after", 40);
    push(&mut fx.conn.clone(), &list, &after).await;
    fx.wait_finished(&after, Duration::from_secs(20)).await;
    let processing = fx.keys.processing_list(&list, "w0").unwrap();
    eventually(Duration::from_secs(10), "nothing left behind", || async {
        (fx.llen(&processing).await == 0).then_some(())
    })
    .await;
    fx.cleanup().await;
}
