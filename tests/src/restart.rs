//! The Redis restart fault test's scenario, shared by its single-Redis and Redis Cluster
//! binaries (each a binary of its own: they stop a service every other test uses).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use qp_worker::source::redis_list::Envelope;

use crate::downstream::Downstream;
use crate::faults::{ClusterNode, ClusterNodeCrash, RedisCrash};
use crate::fixture::{Fixture, RedisKind, eventually};
use crate::kafka;
use crate::procs::Proc;

fn done(states: &HashMap<String, String>) -> usize {
    states.values().filter(|s| *s == "done").count()
}

/// What was crashed; dropping it starts it again.
enum Crashed {
    Single(#[allow(dead_code)] RedisCrash),
    Cluster(#[allow(dead_code)] Vec<ClusterNodeCrash>),
}

impl Crashed {
    /// SIGKILL the single Redis, or every master that serves one of the fixtures' slots.
    async fn now(kind: RedisKind, fixtures: &[&Fixture]) -> Crashed {
        match kind {
            RedisKind::Single | RedisKind::Tls => {
                Crashed::Single(RedisCrash::now(&fixtures[0].conn).await)
            }
            RedisKind::Cluster => {
                let mut masters: Vec<ClusterNode> = Vec::new();
                for fx in fixtures {
                    let key = format!("{}probe", fx.keys.prefix());
                    let (master, _) = ClusterNode::master_and_replica_of(&key).await;
                    if masters.iter().all(|m| m.port != master.port) {
                        masters.push(master);
                    }
                }
                let mut crashes = Vec::new();
                for m in &masters {
                    crashes.push(m.crash().await);
                }
                Crashed::Cluster(crashes)
            }
        }
    }
}

/// Run a Kafka-source and a Redis-list-source workload (600 messages each, three workers each,
/// a limit of 6 per QueueProcessor) against `kind`, crash its Redis (for the cluster: the masters
/// of both QueueProcessors' slots) once a third is done, start it again after `down_for`, and
/// check that everything finishes, nothing is lost and the ceiling holds.
pub async fn crash_mid_run(kind: RedisKind, down_for: Duration) {
    let limit = 6;
    let kafka_fx = Fixture::new("restart-kafka", kind, 4).await;
    let list_fx = Fixture::new("restart-list", kind, 0).await;
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
    let crashed = Crashed::now(kind, &[&kafka_fx, &list_fx]).await;
    // How long Redis stays down: the fault's duration, not a wait for anything.
    tokio::time::sleep(down_for).await;
    drop(crashed); // starts it again
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
        "redis crash ({kind:?}, AOF, down {down_for:?}, back after {restarted:?}): 1200 \
         messages, 0 lost, all done {resumed:?} after the stop; max at once: kafka {} / list {} \
         (limit {limit} each); processed twice: kafka {} / list {}",
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
