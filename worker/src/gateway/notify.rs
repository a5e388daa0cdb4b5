//! Result notifications: how a long poll learns that its request finished without polling.
//!
//! Workers announce a finished id on the QueueProcessor's `done` channel, but only when a long
//! poll marked the request as watched (see `lua/gateway_watch.lua`): a finish nobody waits for
//! costs no message. On a single Redis that is classic pub/sub. On a Redis Cluster it is
//! *sharded* pub/sub (Redis 7): `SPUBLISH` reaches only the shard that owns the channel's slot,
//! the QueueProcessor's slot, where a classic `PUBLISH` is copied to every node of the cluster;
//! the gateway `SSUBSCRIBE`s through a cluster connection, which follows the slot to its new
//! owner after a failover and subscribes again after a reconnect.
//!
//! Notifications are a shortcut, not a dependency: while the subscription is down (a node
//! failing over, a connection killed, a Redis user without channel permissions) the gateway
//! stays ready, and parked long polls read their state every [`FALLBACK_POLL`] instead. After
//! the subscription comes back every parked poll reads once, so a result written during the
//! gap is not missed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use prometheus::IntGauge;
use redis::{PushKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::{Error, Result};
use qp_protocol::redis_conn::RedisSettings;

/// How often a parked long poll reads its state while notifications are down.
pub const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// Parked long polls and whether notifications currently reach them.
pub(super) struct Notifications {
    pub(super) waiters: Waiters,
    up: AtomicBool,
    up_gauge: IntGauge,
}

impl Notifications {
    pub(super) fn new(metrics: &Metrics) -> Result<Self> {
        let up_gauge = IntGauge::new(
            "qp_gateway_notifications_up",
            "1 while the result-notification subscription is up; long polls poll while it is 0",
        )
        .map_err(|e| Error::Http(e.to_string()))?;
        metrics
            .registry
            .register(Box::new(up_gauge.clone()))
            .map_err(|e| Error::Http(e.to_string()))?;
        Ok(Notifications {
            waiters: Waiters::new(metrics)?,
            up: AtomicBool::new(false),
            up_gauge,
        })
    }

    /// Whether a parked poll can rely on being woken.
    pub(super) fn up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::SeqCst);
        self.up_gauge.set(i64::from(up));
        if up && !was {
            info!("result notifications up");
            // Anything written while we were deaf: every parked poll reads once.
            self.waiters.notify_all();
        } else if was && !up {
            // Polls parked before now are not woken: their read would fail while Redis is
            // down (the usual cause), where waiting lets them ride through a restart; they read
            // at their deadline or when the subscription is back. Polls parked from now on
            // read every FALLBACK_POLL.
            warn!("result notifications down; new long polls read their state every 500 ms");
        }
    }
}

/// Keeps the subscription to `channel` up until `stop`, waking the waiters of every id heard.
/// The reconnect loop stays hand-written: it also waits after a clean disconnect, which is not
/// a failed attempt, and it keeps the `up` flag.
pub(super) async fn listen(
    redis: RedisSettings,
    channel: String,
    notes: std::sync::Arc<Notifications>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let heard = if redis.sharded_pubsub() {
            listen_sharded(&redis, &channel, &notes, &stop).await
        } else {
            listen_classic(&redis, &channel, &notes, &stop).await
        };
        match heard {
            // Stopped: not an outage, so no warning that notifications are down.
            Ok(false) => return,
            Ok(true) => backoff = Duration::from_millis(100),
            Err(e) => warn!(error = %e, "subscribing to result notifications failed"),
        }
        notes.set_up(false);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// `SUBSCRIBE` on the single server. `Ok(true)`: subscribed, then disconnected; `Ok(false)`:
/// stopped.
async fn listen_classic(
    redis: &RedisSettings,
    channel: &str,
    notes: &Notifications,
    stop: &CancellationToken,
) -> Result<bool> {
    let client = redis.pubsub_client()?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    notes.set_up(true);
    let mut messages = pubsub.on_message();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            m = messages.next() => match m {
                Some(m) => {
                    let id: String = m.get_payload().unwrap_or_default();
                    notes.waiters.notify(&id);
                }
                None => return Ok(true),
            },
        }
    }
}

/// `SSUBSCRIBE` through a cluster connection with RESP3 pushes. The connection resubscribes by
/// itself after a reconnect or a slot move; the pushes say when it is deaf (a disconnection)
/// and when it hears again (the subscription confirmed).
async fn listen_sharded(
    redis: &RedisSettings,
    channel: &str,
    notes: &Notifications,
    stop: &CancellationToken,
) -> Result<bool> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut conn = redis.cluster_push_connection(tx).await?;
    conn.ssubscribe(channel).await?;
    notes.set_up(true);
    loop {
        let push = tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            p = rx.recv() => match p {
                Some(p) => p,
                None => return Ok(true),
            },
        };
        match push.kind {
            PushKind::SMessage => {
                if let Some(Value::BulkString(id)) = push.data.get(1) {
                    notes.waiters.notify(&String::from_utf8_lossy(id));
                }
            }
            PushKind::Disconnection | PushKind::SUnsubscribe => notes.set_up(false),
            PushKind::SSubscribe => notes.set_up(true),
            _ => {}
        }
    }
}

/// Parked long polls, by request id. The gauge counts them (`qp_gateway_longpoll_waiters`).
pub(super) struct Waiters {
    by_id: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    parked: IntGauge,
}

impl Waiters {
    pub(super) fn new(metrics: &Metrics) -> Result<Self> {
        let parked = IntGauge::new(
            "qp_gateway_longpoll_waiters",
            "Long polls parked until their request finishes",
        )
        .map_err(|e| Error::Http(e.to_string()))?;
        metrics
            .registry
            .register(Box::new(parked.clone()))
            .map_err(|e| Error::Http(e.to_string()))?;
        Ok(Waiters {
            by_id: Mutex::default(),
            parked,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<()>>>> {
        self.by_id.lock().expect("waiters lock")
    }

    /// Register interest in `id` finishing.
    pub(super) fn watch<'a>(&'a self, id: &'a str) -> Watch<'a> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(id.to_owned()).or_default().push(tx);
        self.parked.inc();
        Watch {
            waiters: self,
            id,
            rx: Some(rx),
        }
    }

    /// Wake the waiters of `id`.
    fn notify(&self, id: &str) {
        let waiting = self.lock().remove(id).unwrap_or_default();
        self.parked.sub(waiting.len() as i64);
        for tx in waiting {
            let _ = tx.send(());
        }
    }

    /// Wake every waiter: each re-reads its state (after notifications may have been lost), or
    /// answers at once if the gateway is stopping.
    pub(super) fn notify_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for tx in all.into_values().flatten() {
            self.parked.dec();
            let _ = tx.send(());
        }
    }
}

/// One long poll's interest in an id. Dropping it (the poll ended, or the client went away and
/// axum dropped the handler) removes the entry, so waiters of ids that never finish cannot pile
/// up in the map.
pub(super) struct Watch<'a> {
    waiters: &'a Waiters,
    id: &'a str,
    pub(super) rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut w = self.waiters.lock();
        if let Some(list) = w.get_mut(self.id) {
            let before = list.len();
            list.retain(|tx| !tx.is_closed());
            self.waiters.parked.sub((before - list.len()) as i64);
            if list.is_empty() {
                w.remove(self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_woken_and_never_left_behind() {
        let w = Waiters::new(&Metrics::new()).unwrap();
        let count = |w: &Waiters| w.lock().values().map(Vec::len).sum::<usize>();

        // Notified: the waiter wakes, the entry is gone.
        let mut a = w.watch("a");
        let b = w.watch("a");
        assert_eq!((w.parked.get(), count(&w)), (2, 2));
        w.notify("a");
        a.rx.as_mut().unwrap().await.unwrap();
        assert_eq!((w.parked.get(), count(&w)), (0, 0));
        drop((a, b));
        assert_eq!(
            w.parked.get(),
            0,
            "a dropped watch that was notified counts once"
        );

        // Abandoned (the client went away): dropping removes only that waiter.
        let c = w.watch("c");
        let d = w.watch("c");
        drop(c);
        assert_eq!((w.parked.get(), count(&w)), (1, 1));
        drop(d);
        assert!(w.lock().is_empty());
        assert_eq!(w.parked.get(), 0);

        // After a reconnect everyone re-reads.
        let mut e = w.watch("e");
        let _f = w.watch("f");
        w.notify_all();
        e.rx.as_mut().unwrap().await.unwrap();
        assert_eq!((w.parked.get(), count(&w)), (0, 0));
    }
}
