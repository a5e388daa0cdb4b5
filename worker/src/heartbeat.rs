//! Per-replica liveness and throughput in Redis, for the operator and the Redis-list reaper.
//!
//! Every `heartbeat` period a worker writes, in one script call: its last-seen time (Redis server
//! time) into `heartbeats`, its measured rate (messages finished per second over the last period)
//! into `rates`, and its running message count into `inflight`. The operator sums these over
//! live replicas to learn the per-replica throughput the scaling policy needs.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::Metrics;
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::Conn;

/// Messages this process finished (any outcome), from its metrics.
fn finished(metrics: &Metrics) -> u64 {
    ["done", "failed", "duplicate"]
        .iter()
        .map(|o| metrics.messages.with_label_values(&[o]).get())
        .sum()
}

/// Beat once now, then every `every` until `stop`. The entries stay: [`forget`] removes them
/// once the worker knows it left nothing behind.
pub async fn run(
    mut conn: Conn,
    keys: Keys,
    worker_id: String,
    metrics: Metrics,
    every: Duration,
    stop: CancellationToken,
) {
    let script = qp_protocol::scripts::BEAT.clone();
    let mut last = (Instant::now(), finished(&metrics));
    loop {
        let now = Instant::now();
        let total = finished(&metrics);
        let elapsed = now.duration_since(last.0).as_secs_f64();
        let rate = if elapsed > 0.0 {
            (total - last.1) as f64 / elapsed
        } else {
            0.0
        };
        last = (now, total);
        let res: redis::RedisResult<i64> = script
            .key(keys.heartbeats())
            .key(keys.rates())
            .key(keys.inflight())
            .arg(&worker_id)
            .arg(format!("{rate:.3}"))
            .arg(metrics.in_flight.get())
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = res {
            debug!(error = %e, "heartbeat failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Remove this replica's entries. Only for a worker that leaves nothing to clean up: the
/// Redis-list reaper returns the messages of workers whose heartbeat went stale, and finds no
/// worker that was forgotten.
pub async fn forget(mut conn: Conn, keys: &Keys, worker_id: &str) {
    let res: redis::RedisResult<i64> = qp_protocol::scripts::FORGET
        .key(keys.heartbeats())
        .key(keys.rates())
        .key(keys.inflight())
        .arg(worker_id)
        .invoke_async(&mut conn)
        .await;
    if let Err(e) = res {
        debug!(error = %e, "removing the heartbeat failed; it goes stale instead");
    }
}
