//! `qp-worker run`: wires settings into a running worker and shuts it down in the right order.
//!
//! Shutdown on SIGTERM (what Kubernetes sends before killing a pod):
//! 1. readiness goes false and intake stops (no new messages are started);
//! 2. running messages get `--drain-timeout-seconds` to finish and be acknowledged;
//! 3. the source commits (Kafka: final offsets, synchronously) or returns what it still holds
//!    (Redis list: after its last `BLMOVE` was answered, back onto the queue);
//! 4. held tokens are released so other replicas can use them at once;
//! 5. the replica's heartbeat entries are removed, unless a Redis-list worker could not return
//!    everything: then the heartbeat goes stale and the reaper of another worker returns the
//!    rest (`dead_after` later).
//!
//! Steps 3 to 5 share [`AFTER_DRAIN`]: the operator gives a pod the drain timeout plus 10 s
//! before it is killed, and a worker killed while it still holds leases keeps them from others
//! for a lease TTL. Each step that talks to Redis or Kafka is cut off at its share.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::deadletter::DeadLetter;
use crate::engine::{Acker, Engine, Gate};
use crate::handler::Handler;
use crate::keeper::{KeeperConfig, LeaseKeeper};
use crate::metrics::Metrics;
use crate::results::ResultStore;
use crate::server::{self, Readiness};
use crate::source::kafka::{KafkaSettings, KafkaSource};
use crate::source::redis_list::{self, IntakeEnd, RedisListSettings, RedisListSource};
use crate::source::redis_stream::{self, RedisStreamSettings, RedisStreamSource};
use crate::{Error, Result};
use qp_protocol::kafka::{KafkaArgs, KafkaProducer};
use qp_protocol::keys::Keys;
use qp_protocol::observability;
use qp_protocol::redis_conn::Conn;
use qp_protocol::settings::{RunArgs, SourceKind};
use qp_protocol::tokens::{PoolOptions, TokenPool};

/// A token cancelled by the first SIGTERM or SIGINT.
pub fn stop_on_signals() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
        }
        s.cancel();
    });
    stop
}

/// A Kafka producer with the same brokers and credentials as the consumer.
pub fn kafka_producer(kafka: &KafkaArgs) -> Result<KafkaProducer> {
    let mut config = kafka.client_config("qp-worker")?;
    config
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "10000");
    Ok(KafkaProducer::new(&mut config, kafka.bootstrap()?)?)
}

fn dead_letter(args: &RunArgs, keys: &Keys, conn: &Conn) -> Result<DeadLetter> {
    match args.dead_letter.as_deref() {
        None => Ok(DeadLetter::RedisList {
            conn: conn.clone(),
            key: keys.dead_letter(),
        }),
        Some(s) => match s.split_once(':') {
            Some(("redis", key)) if !key.is_empty() => Ok(DeadLetter::RedisList {
                conn: conn.clone(),
                key: key.to_owned(),
            }),
            Some(("kafka", topic)) if !topic.is_empty() => Ok(DeadLetter::Kafka {
                producer: kafka_producer(&args.kafka)?,
                topic: topic.to_owned(),
            }),
            _ => Err(Error::config(format!(
                "--dead-letter must be kafka:<topic> or redis:<list key>, got {s:?}"
            ))),
        },
    }
}

pub async fn run(args: RunArgs, stop: CancellationToken) -> Result<()> {
    args.handler.refuse_credentials().map_err(Error::config)?;
    let metrics = Metrics::new();
    let ready = Readiness::default();
    let keys = args.common.keys();
    let worker_id = args.worker_id();
    let redis = args.common.redis()?;
    info!(worker = %worker_id, keys = %keys.prefix(), redis = ?redis, source = ?args.source, "starting");

    let http_stop = CancellationToken::new();
    let probes = {
        let metrics = metrics.clone();
        observability::router(move || metrics.render(), Some(ready.clone()))
    };
    let (_, http) = server::serve(args.common.listen, probes, http_stop.clone()).await?;

    // Unready until Redis answers: a Redis that is away or refuses the Secret's credentials is
    // waited out in the open (the log says which), not a crash loop.
    let Some(conn) = redis.connect_patiently(&stop).await else {
        http_stop.cancel();
        let _ = http.await;
        return Ok(());
    };
    let store = ResultStore::start(
        keys.clone(),
        conn.clone(),
        Duration::from_secs(args.result_ttl_seconds),
        &redis,
    );
    let probe_prefix = keys.prefix().trim_end_matches(':').to_owned();
    let handler = Handler::new(
        args.handler.clone(),
        Duration::from_millis(args.handler_timeout_ms),
        args.max_result_bytes,
        Some((conn.clone(), probe_prefix)),
    )
    .with_exec_env(args.exec_pass_env.clone())
    .with_headers(
        crate::handler::headers_from_env(&args.handler_header_names).map_err(Error::config)?,
    );
    let keeper = (!args.ungated).then(|| {
        let pool = TokenPool::new(
            conn.clone(),
            redis.clone(),
            keys.clone(),
            PoolOptions {
                owner: worker_id.clone(),
                lease_ttl: args.lease_ttl(),
                keep_last_limit: true,
            },
        );
        LeaseKeeper::start(
            pool,
            KeeperConfig {
                max_held: args.max_concurrency,
                batch: args.max_concurrency,
                ..KeeperConfig::default()
            },
        )
    });
    let gate = keeper.clone().map_or(Gate::Open, Gate::Tokens);
    let engine = Arc::new(Engine {
        store,
        handler,
        gate,
        dead_letter: dead_letter(&args, &keys, &conn)?,
        metrics: metrics.clone(),
        retries: args.retries,
        retry_backoff: Duration::from_millis(args.retry_backoff_ms),
        max_deliveries: args.max_deliveries,
        max_concurrency: args.max_concurrency.max(1),
        ordered_by_key: args.ordered_by_key,
        drain_timeout: args.drain_timeout(),
    });

    let beat_stop = CancellationToken::new();
    let beat = tokio::spawn(crate::heartbeat::run(
        conn.clone(),
        keys.clone(),
        worker_id.clone(),
        metrics.clone(),
        Duration::from_millis(args.heartbeat_ms),
        beat_stop.clone(),
    ));
    let gauges = keeper
        .clone()
        .map(|k| tokio::spawn(track_keeper(k, metrics.clone())));

    // Set when the worker stops with messages it could not return (see the module docs).
    let mut leave_heartbeat = false;
    // When the process must be done: set once the engine drained.
    let deadline;
    match args.source {
        SourceKind::Kafka => {
            let settings =
                KafkaSettings {
                    bootstrap_servers: args.kafka.bootstrap()?.to_owned(),
                    topic: args.kafka.topic()?.to_owned(),
                    group: args.kafka.kafka_group.clone().ok_or_else(|| {
                        Error::config("--kafka-group (QP_KAFKA_GROUP) is required")
                    })?,
                    properties: args.kafka.security_properties(),
                    max_pending_per_partition: args.max_pending_per_partition.max(1),
                    auto_offset_reset: args.kafka_auto_offset_reset,
                    commit_interval: Duration::from_millis(args.commit_interval_ms),
                    session_timeout: Duration::from_millis(args.kafka_session_timeout_ms),
                    drain_timeout: args.drain_timeout(),
                    max_message_bytes: args.max_message_bytes,
                };
            ready.set(true);
            let (source, acker, jobs) =
                KafkaSource::start(settings, metrics.clone(), ready.clone())?;
            let stopper = {
                let stop = stop.clone();
                let flag = source.stop_handle();
                tokio::spawn(async move {
                    stop.cancelled().await;
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                })
            };
            engine
                .clone()
                .run(jobs, Acker::Kafka(acker), stop.clone())
                .await;
            ready.set(false);
            stopper.abort();
            let finish_by = Instant::now() + AFTER_DRAIN;
            deadline = finish_by;
            close_bounded(source, finish_by - TOKENS_AND_HEARTBEAT).await;
        }
        SourceKind::RedisStream => {
            let settings = RedisStreamSettings {
                key: args.stream_key.clone().ok_or_else(|| {
                    Error::config(
                        "--stream-key (QP_STREAM_KEY) is required for --source redis-stream",
                    )
                })?,
                group: args.stream_group.clone().ok_or_else(|| {
                    Error::config(
                        "--stream-group (QP_STREAM_GROUP) is required for --source redis-stream",
                    )
                })?,
                consumer: worker_id.clone(),
                claim_idle: Duration::from_millis(args.stream_claim_idle_ms.max(1000)),
                max_message_bytes: args.max_message_bytes,
                batch: args.max_concurrency.max(1),
                trim_acknowledged: args.stream_trim_acknowledged,
            };
            let (source, acker) = RedisStreamSource::start(
                settings.clone(),
                &redis,
                conn.clone(),
                stop.child_token(),
            )
            .await?;
            ready.set(true);
            engine
                .clone()
                .run_bounded(source.jobs, Acker::RedisStream(acker), stop.clone())
                .await;
            ready.set(false);
            deadline = Instant::now() + AFTER_DRAIN;
            // Unacknowledged entries stay pending in the group; other workers claim them.
            source.intake.abort();
            if settings.trim_acknowledged
                && let Ok(Err(e)) = timeout_at(
                    deadline - TOKENS_AND_HEARTBEAT,
                    redis_stream::trim(&mut conn.clone(), &settings),
                )
                .await
            {
                warn!(error = %e, "trimming acknowledged entries at shutdown failed");
            }
        }
        SourceKind::RedisList => {
            let settings = RedisListSettings {
                key: args.list_key.clone().ok_or_else(|| {
                    Error::config("--list-key (QP_LIST_KEY) is required for --source redis-list")
                })?,
                worker_id: worker_id.clone(),
                max_message_bytes: args.max_message_bytes,
                dead_after: Duration::from_millis(args.dead_after_ms),
            };
            let intake_stop = stop.child_token();
            let (source, acker) = RedisListSource::start(
                settings.clone(),
                &redis,
                conn.clone(),
                keys.clone(),
                intake_stop,
            )
            .await?;
            ready.set(true);
            let RedisListSource { jobs, intake } = source;
            engine
                .clone()
                .run_bounded(jobs, Acker::RedisList(acker), stop.clone())
                .await;
            ready.set(false);
            let finish_by = Instant::now() + AFTER_DRAIN;
            deadline = finish_by;
            let settled = timeout_at(finish_by - TOKENS_AND_HEARTBEAT, intake.end())
                .await
                .unwrap_or(IntakeEnd::Unsettled);
            let returned = timeout_at(
                finish_by - TOKENS_AND_HEARTBEAT,
                redis_list::return_unfinished(&mut conn.clone(), &keys, &settings),
            )
            .await
            .unwrap_or(Err(Error::TooSlow("returning unfinished messages")));
            match (&returned, settled) {
                (Ok(n), IntakeEnd::Settled) => {
                    if *n > 0 {
                        info!(returned = n, "returned unfinished messages to the queue");
                    }
                }
                (Ok(_), IntakeEnd::Unsettled) => {
                    leave_heartbeat = true;
                    warn!(
                        dead_after_ms = args.dead_after_ms,
                        "the last BLMOVE was not answered; leaving the heartbeat so that the \
                         reaper returns anything it still moves"
                    );
                }
                (Err(e), _) => {
                    leave_heartbeat = true;
                    warn!(
                        error = %e,
                        dead_after_ms = args.dead_after_ms,
                        "could not return unfinished messages; leaving the heartbeat so that \
                         the reaper returns them"
                    );
                }
            }
        }
    }

    if let Some(k) = &keeper {
        match timeout_at(deadline - HEARTBEAT_SHARE, k.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "releasing tokens failed; they expire with their lease")
            }
            Err(_) => warn!("releasing tokens took too long; they expire with their lease"),
        }
    }
    if let Some(g) = gauges {
        g.abort();
    }
    beat_stop.cancel();
    let _ = beat.await;
    if !leave_heartbeat
        && timeout_at(
            deadline,
            crate::heartbeat::forget(conn.clone(), &keys, &worker_id),
        )
        .await
        .is_err()
    {
        warn!("removing the heartbeat took too long; it goes stale instead");
    }
    http_stop.cancel();
    let _ = http.await;
    info!("stopped");
    Ok(())
}

/// How long shutdown may take once the engine drained (it drains for at most the drain
/// timeout). The pod's grace period is the drain timeout plus 10 s; 3 s of that are left for
/// the process to exit and for clock differences.
const AFTER_DRAIN: Duration = Duration::from_secs(7);

/// The end of [`AFTER_DRAIN`] kept for releasing tokens and removing the heartbeat.
const TOKENS_AND_HEARTBEAT: Duration = Duration::from_secs(2);

/// The end of [`AFTER_DRAIN`] kept for removing the heartbeat alone.
const HEARTBEAT_SHARE: Duration = Duration::from_secs(1);

/// Close the consumer (final commit, leave the group), but not past `until`.
///
/// librdkafka's close can block for good: a consumer that lived through a broker restart can
/// keep waiting for a group coordinator it never finds again, and a worker asked to stop then
/// never exited (seen in `tests/tests/operator_kafka_down.rs`). The close runs on a thread of
/// its own, not a runtime blocking task (the runtime waits for those when it shuts down); past
/// `until` the worker exits without its final commit, and the uncommitted messages are
/// delivered again: at least once still holds.
async fn close_bounded(source: KafkaSource, until: Instant) {
    let (done, closed) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        source.close();
        let _ = done.send(());
    });
    if timeout_at(until, closed).await.is_err() {
        warn!(
            "closing the Kafka consumer did not finish; exiting without the final commit \
             (uncommitted messages will be redelivered)"
        );
    }
}

/// Mirror the keeper's state into the metrics.
async fn track_keeper(keeper: LeaseKeeper, metrics: Metrics) {
    let mut lost = keeper.lost();
    let mut seen = *lost.borrow();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => metrics.tokens_held.set(keeper.held() as i64),
            changed = lost.changed() => {
                if changed.is_err() { return; }
                let now = *lost.borrow();
                metrics.leases_lost.inc_by(now.saturating_sub(seen));
                seen = now;
            }
        }
    }
}
