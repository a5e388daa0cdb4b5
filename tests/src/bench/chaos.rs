//! The soak (`chaos` group): a steady stream through Kafka into four workers while, on a fixed
//! schedule, workers are killed with SIGKILL (and started again two seconds later, as a
//! Deployment's pod would be), Redis crashes and comes back, and Kafka restarts.
//!
//! Figures (goals in BENCHMARKS.md):
//! - `chaos.lost`: messages produced that never got a result;
//! - `chaos.duplicates`: messages the handler saw more than once, next to
//!   `chaos.in_flight_at_kills`, what was running in the killed workers (the most that may run
//!   twice after a kill; a Redis crash may add a few);
//! - `chaos.max_concurrency_over_limit`: the handler's most requests at once above the limit;
//! - `chaos.max_stall_s`: the longest time a partition's stream paused from 10 s into the run
//!   (the group has formed) to its end, measured at the handler's downstream (a Kafka restart
//!   stops every stream: that pause is in it too), and `chaos.max_stall_before_kafka_restart_s`,
//!   the same up to the Kafka restart (worker kills and the Redis crash);
//! - `chaos.kafka_restart_s`: from stopping the broker to its having started again (5 s down,
//!   then the broker's own start), and `chaos.resume_after_kafka_restart_s`: from then until
//!   every partition's stream has resumed (what the consumers add);
//!   `chaos.resume_after_redis_crash_s` the same after Redis (down 3 s) answers again.
//!
//! Settings: `QP_BENCH_CHAOS_RATE` (messages per second, default 200),
//! `QP_BENCH_CHAOS_SECONDS` (how long messages are produced, default 120).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Figure, setting};
use crate::downstream::Downstream;
use crate::env::Env;
use crate::faults::RedisCrash;
use crate::fixture::{Fixture, RedisKind};
use crate::kafka;
use crate::procs::Proc;

const PARTITIONS: i32 = 8;
const WORKERS: usize = 4;
const LIMIT: u64 = 16;

/// What happens when, in seconds from the start of the stream.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillWorker(usize),
    CrashRedis,
    RestartKafka,
}

const SCHEDULE: &[(u64, Fault)] = &[
    (15, Fault::KillWorker(0)),
    (35, Fault::CrashRedis),
    (55, Fault::KillWorker(1)),
    (75, Fault::RestartKafka),
    (100, Fault::KillWorker(2)),
];

fn worker(fx: &Fixture, i: usize, url: &str) -> Proc {
    fx.kafka_worker(
        &format!("w{i}"),
        url,
        &[
            "--max-concurrency",
            "8",
            "--kafka-session-timeout-ms",
            "1000",
        ],
    )
}

pub async fn run(_env: &Env) -> Vec<Figure> {
    let rate: u64 = setting("QP_BENCH_CHAOS_RATE", 200);
    let seconds: u64 = setting("QP_BENCH_CHAOS_SECONDS", 120);
    let fx = Fixture::new("chaos", RedisKind::Single, PARTITIONS).await;
    fx.pool().set_limit(LIMIT).await.expect("set the limit");
    let downstream = Downstream::start(Duration::from_millis(10), false).await;
    let mut workers: Vec<Proc> = (0..WORKERS)
        .map(|i| worker(&fx, i, &downstream.url))
        .collect();

    // The stream: `rate` messages a second, each to partition n % PARTITIONS.
    let produced = Arc::new(Mutex::new(Vec::<String>::new()));
    let start = Instant::now();
    let producer = {
        let (produced, topic) = (produced.clone(), fx.topic.clone());
        let p = kafka::producer(&fx.bootstrap);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1) as u32);
            let mut n = 0u64;
            while start.elapsed() < Duration::from_secs(seconds) {
                tick.tick().await;
                let part = (n % PARTITIONS as u64) as i32;
                let id = format!("p{part}-{n}");
                // Awaited one by one: while Kafka is down the stream pauses, as a real one would.
                kafka::send_to(&p, &topic, part, &id, None, id.as_bytes()).await;
                produced.lock().await.push(id);
                n += 1;
            }
        })
    };

    let mut in_flight_at_kills = 0;
    // When Kafka was stopped and when it had started again.
    let mut kafka_outage: Option<(std::time::Instant, std::time::Instant)> = None;
    // When Redis had answered again after its crash.
    let mut redis_back: Option<std::time::Instant> = None;
    for (at, fault) in SCHEDULE.iter().copied() {
        if at >= seconds {
            break;
        }
        // The schedule's pace: faults happen at fixed times of the run.
        tokio::time::sleep_until(start + Duration::from_secs(at)).await;
        eprintln!("[bench] chaos: {fault:?} at {at} s");
        match fault {
            Fault::KillWorker(i) => {
                // At most what runs right now, in all workers, can run twice.
                in_flight_at_kills += downstream.current().max(0) as u64;
                workers[i].kill9();
                tokio::time::sleep(Duration::from_secs(2)).await;
                workers[i] = worker(&fx, i, &downstream.url);
            }
            Fault::CrashRedis => {
                let crash = RedisCrash::now(&fx.conn).await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                crash.end(&fx.conn).await;
                redis_back = Some(std::time::Instant::now());
            }
            Fault::RestartKafka => {
                let stopping = std::time::Instant::now();
                let mut outage = kafka::Outage::begin();
                tokio::time::sleep(Duration::from_secs(5)).await;
                outage.end(); // returns once the broker has started
                kafka_outage = Some((stopping, std::time::Instant::now()));
            }
        }
    }
    producer.await.expect("the producer");
    let ids = produced.lock().await.clone();
    eprintln!(
        "[bench] chaos: {} messages produced in {:.0} s; waiting for the rest",
        ids.len(),
        start.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let lost = loop {
        let states = fx.states(&ids).await;
        let missing = ids
            .iter()
            .filter(|id| states.get(*id).map(String::as_str) != Some("done"))
            .count();
        if missing == 0 || Instant::now() >= deadline {
            break missing;
        }
        // The progress check's period, bounded by the deadline above.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let partition_of = |body: &[u8]| {
        String::from_utf8_lossy(body)
            .split('-')
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    // From 10 s in: the group formed, the stream flows, and no fault has happened yet.
    let from = (start + Duration::from_secs(10)).into_std();
    let stall = downstream
        .longest_pause_since(from, partition_of)
        .map_or(f64::NAN, |(_, d)| d.as_secs_f64());
    // The same before Kafka's restart: worker kills and the Redis crash only.
    let kafka_restart = SCHEDULE
        .iter()
        .find(|(_, f)| matches!(f, Fault::RestartKafka))
        .map(|(at, _)| (start + Duration::from_secs(*at)).into_std());
    let stall_before_kafka = downstream
        .longest_pause_between(from, kafka_restart, partition_of)
        .map_or(f64::NAN, |(_, d)| d.as_secs_f64());
    // After Kafka's restart: from the broker being back to the next fault, the longest a
    // partition waited for its stream to resume (what the consumers add to the broker's own
    // restart, whose length is `chaos.kafka_restart_s`).
    // The first fault that began after `t` (a slow restart can outlast the next fault's time:
    // the pause then runs into the next fault's window, and it counts).
    let next_fault = |t: std::time::Instant| {
        SCHEDULE
            .iter()
            .map(|(at, _)| (start + Duration::from_secs(*at)).into_std())
            .find(|when| *when > t && *when < (start + Duration::from_secs(seconds)).into_std())
    };
    let (kafka_restart_s, resume_after_kafka) = match kafka_outage {
        Some((stopping, back)) => (
            back.duration_since(stopping).as_secs_f64(),
            downstream
                .longest_pause_between(back, next_fault(back), partition_of)
                .map_or(f64::NAN, |(_, d)| d.as_secs_f64()),
        ),
        None => (f64::NAN, f64::NAN),
    };
    let resume_after_redis = redis_back
        .and_then(|back| downstream.longest_pause_between(back, next_fault(back), partition_of))
        .map_or(f64::NAN, |(_, d)| d.as_secs_f64());
    let figures = vec![
        ("chaos.lost".to_owned(), lost as f64, "messages".to_owned()),
        (
            "chaos.duplicates".to_owned(),
            downstream.twice() as f64,
            "messages".to_owned(),
        ),
        (
            "chaos.in_flight_at_kills".to_owned(),
            in_flight_at_kills as f64,
            "messages".to_owned(),
        ),
        (
            "chaos.max_concurrency_over_limit".to_owned(),
            (downstream.max() - LIMIT as i64).max(0) as f64,
            "requests".to_owned(),
        ),
        ("chaos.max_stall_s".to_owned(), stall, "s".to_owned()),
        (
            "chaos.max_stall_before_kafka_restart_s".to_owned(),
            stall_before_kafka,
            "s".to_owned(),
        ),
        (
            "chaos.kafka_restart_s".to_owned(),
            kafka_restart_s,
            "s".to_owned(),
        ),
        (
            "chaos.resume_after_kafka_restart_s".to_owned(),
            resume_after_kafka,
            "s".to_owned(),
        ),
        (
            "chaos.resume_after_redis_crash_s".to_owned(),
            resume_after_redis,
            "s".to_owned(),
        ),
        (
            "chaos.messages".to_owned(),
            ids.len() as f64,
            "messages".to_owned(),
        ),
    ];
    drop(workers);
    fx.cleanup().await;
    figures
}
