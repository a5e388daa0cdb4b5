//! Returning the messages of dead workers. Every worker heartbeats (see `crate::heartbeat`);
//! whichever worker wins a short lock finds the workers silent for longer than `dead_after` and
//! pushes their processing lists back onto the consuming end of the source list.
//!
//! A worker that stops cleanly forgets its own heartbeat, after it returned its messages itself.
//! One that could not (Redis refused the return, or its last `BLMOVE` was never answered) keeps
//! it, so that this reaper finds it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::RedisListSettings;
use crate::Result;
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::Conn;

/// Periodically return the messages of dead workers. Any worker may do it; a short lock keeps
/// them from doing it all at once (doing it twice would still be safe: LMOVE is atomic).
pub(super) async fn run(
    mut conn: Conn,
    keys: Keys,
    settings: RedisListSettings,
    stop: CancellationToken,
) {
    let every = (settings.dead_after / 2).max(Duration::from_millis(500));
    let lock = keys.reaper_lock();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = reap_once(&mut conn, &keys, &settings, &lock, every).await {
            debug!(error = %e, "reaper pass failed");
        }
    }
}

async fn reap_once(
    conn: &mut Conn,
    keys: &Keys,
    settings: &RedisListSettings,
    lock: &str,
    hold: Duration,
) -> Result<()> {
    let got: Option<String> = redis::cmd("SET")
        .arg(lock)
        .arg(&settings.worker_id)
        .arg("NX")
        .arg("PX")
        .arg(hold.as_millis() as u64)
        .query_async(conn)
        .await?;
    if got.is_none() {
        return Ok(());
    }
    let dead: Vec<String> = qp_protocol::scripts::STALE
        .key(keys.heartbeats())
        .arg(settings.dead_after.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    for worker in dead {
        let processing = keys.processing_list(&settings.key, &worker)?;
        let moved: i64 = qp_protocol::scripts::RECOVER
            .key(&processing)
            .key(&settings.key)
            .invoke_async(conn)
            .await?;
        // Forget the worker only after its messages are safe.
        let _: i64 = redis::cmd("ZREM")
            .arg(keys.heartbeats())
            .arg(&worker)
            .query_async(conn)
            .await?;
        let _: i64 = redis::cmd("HDEL")
            .arg(keys.rates())
            .arg(&worker)
            .query_async(conn)
            .await?;
        if moved > 0 {
            info!(
                worker,
                moved, "returned messages of a dead worker to the queue"
            );
        }
    }
    Ok(())
}
