//! Request state and results in Redis, written in batches.
//!
//! Each request id has one hash, `qp:{ns/name}:result:<id>`, with a TTL:
//! `state` (`pending` | `processing` | `done` | `failed`), `body` (the handler's result),
//! `error` (why it failed) and `at` (Redis server time of the last change, in ms).
//!
//! Two rules make redelivery harmless:
//! - *write once*: a request that is `done` or `failed` is never overwritten, so a message that
//!   Kafka delivers twice cannot replace a result a client may already have read;
//! - *skip finished work*: before running the handler the worker asks whether the request is
//!   already finished, and if so acknowledges the message without running it again.
//!
//! Per-message round trips are what limit a Redis-backed worker (the source articles pay about
//! five per message). Here every BEGIN and FINISH goes through one writer task that drains its
//! queue and sends everything it found as one script call per kind: under load a single round
//! trip covers many messages, and with no load the first message goes out immediately (group
//! commit, no timer). A finish is only acknowledged to the source once Redis has it, so a crash
//! can lose no result: the offset or list entry stays and the message comes back.

use std::time::Duration;

use backon::Retryable;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::{Error, Result};
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::{Conn, RedisSettings};

/// What happened to a request, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestState {
    Pending,
    Processing,
    Done(Bytes),
    Failed(String),
}

impl RequestState {
    pub fn name(&self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Processing => "processing",
            RequestState::Done(_) => "done",
            RequestState::Failed(_) => "failed",
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self, RequestState::Done(_) | RequestState::Failed(_))
    }
}

/// The final outcome of one message.
#[derive(Debug, Clone)]
pub enum Outcome {
    Done(Bytes),
    Failed(String),
}

/// What BEGIN found for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begun {
    /// It already has its outcome: do not run it again.
    Finished,
    /// Marked `processing`; this is its n-th delivery (1 the first time).
    Delivery(u64),
}

enum Op {
    Begin {
        id: String,
        reply: oneshot::Sender<Result<Begun>>,
    },
    Finish {
        id: String,
        outcome: Outcome,
        reply: oneshot::Sender<Result<bool>>,
    },
}

/// Handle to the result store. Cheap to clone; all clones share one writer task.
#[derive(Clone)]
pub struct ResultStore {
    keys: Keys,
    conn: Conn,
    ttl: Duration,
    tx: mpsc::UnboundedSender<Op>,
}

/// Cap on ids per script call: keeps a single call's run time in Redis short.
const MAX_BATCH: usize = 256;

/// Cap on the bytes of results and errors per script call. Redis runs a script alone, so one
/// call that writes 256 results of 1 MiB each would stall every client of that Redis, and a
/// call larger than the server's `client-query-buffer-limit` can never succeed. A single result
/// larger than this still goes out, alone.
const MAX_BATCH_BYTES: usize = 4 << 20;

impl Op {
    /// Bytes this operation adds to a script call (ids and fixed arguments are small).
    fn payload_bytes(&self) -> usize {
        match self {
            Op::Begin { .. } => 0,
            Op::Finish { outcome, .. } => match outcome {
                Outcome::Done(body) => body.len(),
                Outcome::Failed(reason) => reason.len(),
            },
        }
    }
}

/// A request's state from the `state`, `body` and `error` fields of its hash.
fn parse_state(
    state: Option<String>,
    body: Option<Vec<u8>>,
    error: Option<String>,
) -> Option<RequestState> {
    state.map(|s| match s.as_str() {
        "done" => RequestState::Done(Bytes::from(body.unwrap_or_default())),
        "failed" => RequestState::Failed(error.unwrap_or_default()),
        "processing" => RequestState::Processing,
        _ => RequestState::Pending,
    })
}

/// Moves operations from `rx` into `batch` while both caps allow: at least one (waiting for
/// it), then whatever is already queued. An operation that would cross [`MAX_BATCH_BYTES`] is
/// kept in `carry` for the next batch. Returns false when every handle is gone.
async fn next_batch(
    rx: &mut mpsc::UnboundedReceiver<Op>,
    carry: &mut Option<Op>,
    batch: &mut Vec<Op>,
) -> bool {
    let mut bytes = 0;
    let first = match carry.take() {
        Some(op) => op,
        None => match rx.recv().await {
            Some(op) => op,
            None => return false,
        },
    };
    bytes += first.payload_bytes();
    batch.push(first);
    while batch.len() < MAX_BATCH {
        let Ok(op) = rx.try_recv() else { break };
        if bytes + op.payload_bytes() > MAX_BATCH_BYTES {
            *carry = Some(op);
            break;
        }
        bytes += op.payload_bytes();
        batch.push(op);
    }
    true
}

impl ResultStore {
    /// Start the writer task. `ttl` is how long results and states live.
    /// `redis` says how finishes are announced: classic pub/sub on one server, sharded on a
    /// cluster (see the gateway's `notify` module).
    pub fn start(keys: Keys, conn: Conn, ttl: Duration, redis: &RedisSettings) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let publish = if redis.sharded_pubsub() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        tokio::spawn(writer(keys.clone(), conn.clone(), ttl, publish, rx));
        ResultStore {
            keys,
            conn,
            ttl,
            tx,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Mark `id` as processing and count the delivery, unless it already finished.
    pub async fn begin(&self, id: &str) -> Result<Begun> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Begin {
                id: id.to_owned(),
                reply,
            })
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Record the final outcome. `Ok(false)` means another delivery finished it first.
    /// Returns only once Redis has the write.
    pub async fn finish(&self, id: &str, outcome: Outcome) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Finish {
                id: id.to_owned(),
                outcome,
                reply,
            })
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Read the state of a request; `None` when unknown or expired.
    pub async fn get(&self, id: &str) -> Result<Option<RequestState>> {
        let mut conn = self.conn.clone();
        let (state, body, error): (Option<String>, Option<Vec<u8>>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.keys.result(id))
                .arg("state")
                .arg("body")
                .arg("error")
                .query_async(&mut conn)
                .await?;
        Ok(parse_state(state, body, error))
    }

    /// [`ResultStore::get`] that also marks the request watched (if it exists), so that a
    /// worker announces its finish on the `done` channel: only finishes a long poll waits for
    /// are announced.
    pub async fn watch(&self, id: &str) -> Result<Option<RequestState>> {
        let (state, body, error): (Option<String>, Option<Vec<u8>>, Option<String>) =
            qp_protocol::scripts::WATCH
                .key(self.keys.result(id))
                .invoke_async(&mut self.conn.clone())
                .await?;
        Ok(parse_state(state, body, error))
    }

    /// Counters the operator reads: (processed, failed) since the keys were created.
    pub async fn counters(&self) -> Result<(u64, u64)> {
        let mut conn = self.conn.clone();
        let (p, f): (Option<u64>, Option<u64>) = redis::cmd("MGET")
            .arg(self.keys.processed())
            .arg(self.keys.failed())
            .query_async(&mut conn)
            .await?;
        Ok((p.unwrap_or(0), f.unwrap_or(0)))
    }
}

/// The group-commit loop: take everything queued, send it as (at most) two script calls in one
/// pipeline, answer every waiter, repeat, with up to two batches out at once
/// ([`crate::group_commit`]). A message's FINISH is queued only after its BEGIN was answered;
/// two deliveries of one id may sit in batches that are out together, in either order, which
/// the write-once scripts make harmless as they did within one batch. Redis errors are retried with backoff and never
/// dropped: a waiter is answered with an error only when the store is shutting down.
async fn writer(
    keys: Keys,
    conn: Conn,
    ttl: Duration,
    publish: &'static str,
    rx: mpsc::UnboundedReceiver<Op>,
) {
    let ctx = Batches {
        begin: qp_protocol::scripts::BEGIN.clone(),
        finish: qp_protocol::scripts::FINISH.clone(),
        ttl_ms: ttl.as_millis() as u64,
        channel: keys.done_channel(),
        keys,
        conn,
        publish,
    };
    let batches = futures::stream::unfold((rx, None), |(mut rx, mut carry)| async move {
        let mut batch = Vec::new();
        next_batch(&mut rx, &mut carry, &mut batch)
            .await
            .then_some((batch, (rx, carry)))
    });
    crate::group_commit::run(crate::group_commit::IN_FLIGHT, batches, |batch| {
        Box::pin(ctx.write(batch))
    })
    .await;
}

/// What every batch's write needs.
struct Batches {
    keys: Keys,
    conn: Conn,
    begin: redis::Script,
    finish: redis::Script,
    ttl_ms: u64,
    channel: String,
    publish: &'static str,
}

impl Batches {
    /// Write one batch (retrying until it succeeds) and answer its waiters.
    async fn write(&self, batch: Vec<Op>) {
        let mut begins = Vec::new();
        let mut finishes = Vec::new();
        for op in batch {
            match op {
                Op::Begin { id, reply } => begins.push((id, reply)),
                Op::Finish { id, outcome, reply } => finishes.push((id, outcome, reply)),
            }
        }
        // Both calls go out together on the multiplexed connection: one round trip of latency.
        // Both scripts are idempotent for a given batch (write once), so re-running the half
        // that succeeded is harmless, except that a repeated BEGIN counts its deliveries once
        // more: the count may overstate, never understate, how often a message was started.
        let written = (|| async {
            let (mut c1, mut c2) = (self.conn.clone(), self.conn.clone());
            let (b, f) = tokio::join!(
                run_begin(&self.keys, &mut c1, &self.begin, &begins, self.ttl_ms),
                run_finish(
                    &self.keys,
                    &mut c2,
                    &self.finish,
                    &finishes,
                    self.ttl_ms,
                    (&self.channel, self.publish)
                ),
            );
            Ok::<_, Error>((b?, f?))
        })
        .retry(crate::retry::forever(
            Duration::from_millis(50),
            Duration::from_secs(2),
        ))
        .notify(|e, retry_in| warn!(error = %e, ?retry_in, "result store write failed; retrying"))
        .await;
        let Ok((bflags, fflags)) = written else {
            unreachable!("retried without a limit")
        };
        for ((_, reply), n) in begins.into_iter().zip(bflags) {
            let begun = match u64::try_from(n) {
                Ok(n) if n > 0 => Begun::Delivery(n),
                _ => Begun::Finished,
            };
            let _ = reply.send(Ok(begun));
        }
        for ((_, _, reply), flag) in finishes.into_iter().zip(fflags) {
            let _ = reply.send(Ok(flag == 1));
        }
    }
}

type BeginBatch = Vec<(String, oneshot::Sender<Result<Begun>>)>;
type FinishBatch = Vec<(String, Outcome, oneshot::Sender<Result<bool>>)>;

async fn run_begin(
    keys: &Keys,
    conn: &mut Conn,
    script: &redis::Script,
    batch: &BeginBatch,
    ttl_ms: u64,
) -> Result<Vec<i64>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = script.prepare_invoke();
    for (id, _) in batch {
        inv.key(keys.result(id));
    }
    inv.arg(ttl_ms);
    Ok(inv.invoke_async(conn).await?)
}

async fn run_finish(
    keys: &Keys,
    conn: &mut Conn,
    script: &redis::Script,
    batch: &FinishBatch,
    ttl_ms: u64,
    (channel, publish): (&str, &str),
) -> Result<Vec<i64>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = script.prepare_invoke();
    inv.key(keys.processed()).key(keys.failed());
    inv.arg(ttl_ms).arg(channel).arg(publish);
    for (id, outcome, _) in batch {
        inv.key(keys.result(id));
        match outcome {
            Outcome::Done(body) => inv.arg("done").arg(body.as_ref()),
            Outcome::Failed(err) => inv.arg("failed").arg(err.as_str()),
        };
        inv.arg(id.as_str());
    }
    Ok(inv.invoke_async(conn).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish(bytes: usize) -> Op {
        Op::Finish {
            id: "x".into(),
            outcome: Outcome::Done(Bytes::from(vec![0u8; bytes])),
            reply: oneshot::channel().0,
        }
    }

    #[tokio::test]
    async fn batches_are_bounded_by_bytes_and_nothing_is_dropped() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for _ in 0..10 {
            tx.send(finish(1 << 20)).unwrap();
        }
        drop(tx);
        let (mut carry, mut batch, mut sizes) = (None, Vec::new(), Vec::new());
        while next_batch(&mut rx, &mut carry, &mut batch).await {
            sizes.push(batch.len());
            batch.clear();
        }
        assert_eq!(
            sizes,
            vec![4, 4, 2],
            "1 MiB results, at most 4 MiB per call"
        );
    }

    #[tokio::test]
    async fn an_oversized_result_goes_alone_and_small_ones_fill_up() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(finish(10 << 20)).unwrap();
        for _ in 0..300 {
            tx.send(finish(10)).unwrap();
        }
        drop(tx);
        let (mut carry, mut batch, mut sizes) = (None, Vec::new(), Vec::new());
        while next_batch(&mut rx, &mut carry, &mut batch).await {
            sizes.push(batch.len());
            batch.clear();
        }
        assert_eq!(sizes, vec![1, MAX_BATCH, 300 - MAX_BATCH]);
    }
}
