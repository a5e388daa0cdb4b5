//! Fault test: the shared Redis (AOF on, fsync every second, as production runs it) crashes
//! (SIGKILL: up to a second of writes may be lost) and is started again while a Kafka-source
//! and a Redis-list-source workload are running. Workers pause while it is down and resume
//! after it; nothing is lost, the ceiling holds (measured at the handler's downstream, not in
//! Redis). A test binary of its own with one test: it stops a service every other test uses.

use std::time::{Duration, Instant};

use qp_tests::downstream::Downstream;
use qp_tests::faults::RedisCrash;
use qp_tests::fixture::{Fixture, RedisKind, eventually};
use qp_tests::kafka;
use qp_tests::procs::Proc;
use qp_worker::source::redis_list::Envelope;

fn done(states: &std::collections::HashMap<String, String>) -> usize {
    states.values().filter(|s| *s == "done").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_crash_mid_run_loses_nothing_and_holds_the_ceiling() {
    let limit = 6;
    let kafka_fx = Fixture::new("restart-kafka", RedisKind::Single, 4).await;
    let list_fx = Fixture::new("restart-list", RedisKind::Single, 0).await;
    kafka_fx.pool().set_limit(limit).await.unwrap();
    list_fx.pool().set_limit(limit).await.unwrap();
    let kafka_ids: Vec<String> = (0..600).map(|i| format!("k-{i}")).collect();
    let list_ids: Vec<String> = (0..600).map(|i| format!("l-{i}")).collect();
    kafka::send_many(
        &kafka::producer(&kafka_fx.bootstrap),
        &kafka_fx.topic,
        &kafka_ids,
    )
    .await;
    let list = format!("{}queue", list_fx.keys.prefix());
    let mut pipe = redis::pipe();
    for id in &list_ids {
        pipe.cmd("LPUSH")
            .arg(&list)
            .arg(Envelope::new(id, Some("text/plain"), id.as_bytes()).to_bytes())
            .ignore();
    }
    let _: () = pipe.query_async(&mut list_fx.conn.clone()).await.unwrap();

    let kafka_down = Downstream::start(Duration::from_millis(25), false).await;
    let list_down = Downstream::start(Duration::from_millis(25), false).await;
    let args = ["--max-concurrency", "4", "--dead-after-ms", "5000"];
    let mut workers: Vec<Proc> = Vec::new();
    for i in 0..3 {
        workers.push(kafka_fx.kafka_worker(&format!("k{i}"), &kafka_down.url, &args));
        workers.push(list_fx.list_worker(&format!("l{i}"), &list, &list_down.url, &args));
    }
    // Restart once a third of each workload is done.
    eventually(Duration::from_secs(60), "a third done", || async {
        let k = done(&kafka_fx.states(&kafka_ids).await);
        let l = done(&list_fx.states(&list_ids).await);
        (k >= 200 && l >= 200).then_some(())
    })
    .await;
    let stopped = Instant::now();
    let guard = RedisCrash::now(&kafka_fx.conn).await;
    let down_for = Duration::from_secs(3);
    // How long Redis stays down: the fault's duration, not a wait for anything.
    tokio::time::sleep(down_for).await;
    drop(guard); // starts it again
    let restarted = stopped.elapsed();
    // The test's own connections reconnect on their first failed command.
    for fx in [&kafka_fx, &list_fx] {
        eventually(
            Duration::from_secs(10),
            "the test's connection back",
            || async {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut fx.conn.clone()).await;
                pong.ok()
            },
        )
        .await;
    }

    kafka_fx
        .wait_finished(&kafka_ids, Duration::from_secs(180))
        .await;
    list_fx
        .wait_finished(&list_ids, Duration::from_secs(180))
        .await;
    let resumed = stopped.elapsed();
    for (fx, ids) in [(&kafka_fx, &kafka_ids), (&list_fx, &list_ids)] {
        let states = fx.states(ids).await;
        assert_eq!(done(&states), ids.len(), "{}: not all done", fx.name);
    }
    assert!(workers.iter_mut().all(|w| w.alive()), "no worker died");
    let processing = (0..3)
        .map(|i| {
            list_fx
                .keys
                .processing_list(&list, &format!("l{i}"))
                .unwrap()
        })
        .collect::<Vec<_>>();
    for p in &processing {
        eventually(
            Duration::from_secs(10),
            "empty processing lists",
            || async {
                let n: i64 = redis::cmd("LLEN")
                    .arg(p)
                    .query_async(&mut list_fx.conn.clone())
                    .await
                    .unwrap();
                (n == 0).then_some(())
            },
        )
        .await;
    }
    println!(
        "redis crash (AOF, down {down_for:?}, back after {restarted:?}): 1200 messages, 0 \
         lost, all done {resumed:?} after the stop; max at once: kafka {} / list {} (limit \
         {limit} each); processed twice: kafka {} / list {}",
        kafka_down.max(),
        list_down.max(),
        kafka_down.twice(),
        list_down.twice()
    );
    assert!(kafka_down.max() <= limit as i64, "kafka: ceiling exceeded");
    assert!(list_down.max() <= limit as i64, "list: ceiling exceeded");
    drop(workers);
    kafka_fx.cleanup().await;
    list_fx.cleanup().await;
}
