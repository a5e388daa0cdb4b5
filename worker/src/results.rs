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
use qp_protocol::redis_conn::Conn;

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

enum Op {
    Begin {
        id: String,
        reply: oneshot::Sender<Result<bool>>,
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

impl ResultStore {
    /// Start the writer task. `ttl` is how long results and states live.
    pub fn start(keys: Keys, conn: Conn, ttl: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(keys.clone(), conn.clone(), ttl, rx));
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

    /// Mark `id` as processing. `Ok(false)` means it already finished: skip the handler.
    pub async fn begin(&self, id: &str) -> Result<bool> {
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
        Ok(state.map(|s| match s.as_str() {
            "done" => RequestState::Done(Bytes::from(body.unwrap_or_default())),
            "failed" => RequestState::Failed(error.unwrap_or_default()),
            "processing" => RequestState::Processing,
            _ => RequestState::Pending,
        }))
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
/// pipeline, answer every waiter, repeat. Redis errors are retried with backoff and never
/// dropped: a waiter is answered with an error only when the store is shutting down.
async fn writer(keys: Keys, conn: Conn, ttl: Duration, mut rx: mpsc::UnboundedReceiver<Op>) {
    let begin = qp_protocol::scripts::BEGIN.clone();
    let finish = qp_protocol::scripts::FINISH.clone();
    let ttl_ms = ttl.as_millis() as u64;
    let channel = keys.done_channel();
    let mut batch: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return; // every handle dropped
        }
        let mut begins = Vec::new();
        let mut finishes = Vec::new();
        for op in batch.drain(..) {
            match op {
                Op::Begin { id, reply } => begins.push((id, reply)),
                Op::Finish { id, outcome, reply } => finishes.push((id, outcome, reply)),
            }
        }
        // Both calls go out together on the multiplexed connection: one round trip of latency.
        // Both scripts are idempotent for a given batch (write once), so re-running the half
        // that succeeded is harmless.
        let written = (|| async {
            let (mut c1, mut c2) = (conn.clone(), conn.clone());
            let (b, f) = tokio::join!(
                run_begin(&keys, &mut c1, &begin, &begins, ttl_ms),
                run_finish(&keys, &mut c2, &finish, &finishes, ttl_ms, &channel),
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
        for ((_, reply), flag) in begins.drain(..).zip(bflags) {
            let _ = reply.send(Ok(flag == 1));
        }
        for ((_, _, reply), flag) in finishes.drain(..).zip(fflags) {
            let _ = reply.send(Ok(flag == 1));
        }
    }
}

type BeginBatch = Vec<(String, oneshot::Sender<Result<bool>>)>;
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
    channel: &str,
) -> Result<Vec<i64>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = script.prepare_invoke();
    inv.key(keys.processed()).key(keys.failed());
    inv.arg(ttl_ms).arg(channel);
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
