//! The processing loop: take a job from the source, wait for a local slot and a global token,
//! run the handler (with retries), make the outcome durable, then acknowledge the source.
//!
//! ```text
//!  source ──job──▶ [ordering lanes] ──▶ slot ──▶ token ──▶ handler ──▶ token back
//!                                                            │
//!                        source ◀──ack── result/dead letter ◀┘
//! ```
//!
//! The order of the last steps is what makes delivery at-least-once without loss: the source
//! forgets a message only after its result (or its dead letter) is in Redis. A crash anywhere
//! before that redelivers it, and the result store's write-once rule makes the redelivery
//! harmless. The token is returned as soon as the handler is done: it protects what the handler
//! calls, not our own bookkeeping. For the same reason a message waiting to retry gives its
//! token back for the backoff and is admitted again afterwards.
//!
//! Whatever ends a job's task, the source and the ordering lane hear of it (see [`Running`]):
//! a handler that panics fails its message like any other permanent error (dead letter, then
//! acknowledgement), and a task that ends without an acknowledgement (aborted at the drain
//! timeout, or the result store shut down) *abandons* its message: it is delivered again, and
//! nobody waits for it any longer. A Kafka offset left "started" would otherwise hold every
//! later commit of its partition and make each revocation wait the full drain timeout.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::Retryable;
use bytes::Bytes;
use futures::FutureExt;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Span, debug, info, instrument, warn};

use crate::deadletter::DeadLetter;
use crate::handler::{Handler, HandlerError, Request};
use crate::keeper::{LeaseKeeper, Permit};
use crate::metrics::Metrics;
use crate::results::{Begun, Outcome, ResultStore};
use crate::source::kafka::KafkaAcker;
use crate::source::redis_list::RedisListAcker;
use crate::source::redis_stream::RedisStreamAcker;
use crate::source::{Job, Origin};

/// Admission control: the global token pool, or nothing (ungated benchmarks).
#[derive(Clone)]
pub enum Gate {
    Open,
    Tokens(LeaseKeeper),
}

impl Gate {
    /// Wait for a token; `None` when `stop` fired first.
    async fn admit(&self, stop: &CancellationToken) -> Option<Option<Permit>> {
        match self {
            Gate::Open => Some(None),
            Gate::Tokens(keeper) => loop {
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    p = keeper.acquire() => match p {
                        Ok(p) => return Some(Some(p)),
                        Err(e) => {
                            warn!(error = %e, "token pool unavailable; retrying");
                            tokio::select! {
                                _ = stop.cancelled() => return None,
                                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                            }
                        }
                    },
                }
            },
        }
    }
}

/// The job channel of a source: unbounded for Kafka (the source bounds itself by pausing),
/// bounded for the Redis list.
enum Jobs {
    Bounded(mpsc::Receiver<Job>),
    Unbounded(mpsc::UnboundedReceiver<Job>),
}

impl Jobs {
    async fn recv(&mut self) -> Option<Job> {
        match self {
            Jobs::Bounded(rx) => rx.recv().await,
            Jobs::Unbounded(rx) => rx.recv().await,
        }
    }
}

/// How a finished job is acknowledged to its source.
#[derive(Clone)]
pub enum Acker {
    Kafka(KafkaAcker),
    RedisList(RedisListAcker),
    RedisStream(RedisStreamAcker),
}

impl Acker {
    fn start(&self, job: &Job) -> bool {
        match (self, &job.origin) {
            (Acker::Kafka(a), Origin::Kafka { partition, offset }) => a.start(*partition, *offset),
            _ => true,
        }
    }

    async fn ack(&self, job: &Job) {
        match (self, &job.origin) {
            (Acker::Kafka(a), Origin::Kafka { partition, offset }) => a.ack(*partition, *offset),
            (Acker::RedisList(a), Origin::RedisList { raw }) => a.ack(raw.clone()).await,
            (Acker::RedisStream(a), Origin::RedisStream { entry }) => a.ack(entry).await,
            _ => unreachable!("a job is acknowledged to the source it came from"),
        }
    }

    /// A started job ended without an acknowledgement. A Redis-list message simply stays in
    /// the processing list (returned at shutdown or by the reaper).
    fn abandon(&self, origin: &Origin) {
        if let (Acker::Kafka(a), Origin::Kafka { partition, offset }) = (self, origin) {
            a.abandon(*partition, *offset);
        }
    }
}

/// Owned by the task of one started job. Dropped however the task ends (finished, panicked,
/// aborted): abandons the message unless it was acknowledged, and lets the next job of its
/// ordering key go.
struct Running {
    acker: Acker,
    origin: Origin,
    lane: Option<(mpsc::UnboundedSender<Bytes>, Bytes)>,
    acknowledged: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.acknowledged {
            self.acker.abandon(&self.origin);
        }
        if let Some((tx, key)) = self.lane.take() {
            let _ = tx.send(key);
        }
    }
}

/// Everything a job needs besides the job itself.
pub struct Engine {
    pub store: ResultStore,
    pub handler: Handler,
    pub gate: Gate,
    pub dead_letter: DeadLetter,
    pub metrics: Metrics,
    pub retries: u32,
    pub retry_backoff: Duration,
    /// Dead-letter a message started this many times without an outcome (0: never).
    pub max_deliveries: u64,
    pub max_concurrency: usize,
    pub ordered_by_key: bool,
    pub drain_timeout: Duration,
}

impl Engine {
    /// Run until `stop` fires or the source ends, then drain: running jobs get up to
    /// `drain_timeout` to finish; jobs not started are left to the source (redelivered).
    pub async fn run(
        self: Arc<Self>,
        jobs: mpsc::UnboundedReceiver<Job>,
        acker: Acker,
        stop: CancellationToken,
    ) {
        self.dispatch(Jobs::Unbounded(jobs), acker, stop).await;
    }

    /// [`Engine::run`] for a bounded job channel (the Redis list source).
    pub async fn run_bounded(
        self: Arc<Self>,
        jobs: mpsc::Receiver<Job>,
        acker: Acker,
        stop: CancellationToken,
    ) {
        self.dispatch(Jobs::Bounded(jobs), acker, stop).await;
    }

    /// The dispatch loop runs as a task of its own: the caller is often the future that
    /// `#[tokio::main]` blocks on, which lives on the main thread outside the worker pool, and
    /// every job would then cost a wake-up of that thread (a futex call and a context switch)
    /// on top of the wake-ups of the tasks it starts.
    async fn dispatch(self: Arc<Self>, jobs: Jobs, acker: Acker, stop: CancellationToken) {
        if let Err(e) = tokio::spawn(self.dispatch_loop(jobs, acker, stop)).await {
            warn!(error = %e, "dispatch loop failed");
        }
    }

    async fn dispatch_loop(self: Arc<Self>, mut jobs: Jobs, acker: Acker, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.max_concurrency));
        let mut tasks = JoinSet::new();
        // Ordering lanes: keys with a job running -> jobs of that key waiting, in arrival order.
        let (lane_tx, mut lane_rx) = mpsc::unbounded_channel::<Bytes>();
        let mut lanes: HashMap<Bytes, VecDeque<Job>> = HashMap::new();

        loop {
            let job = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(key) = lane_rx.recv() => {
                    match lanes.get_mut(&key).and_then(VecDeque::pop_front) {
                        Some(next) => next,
                        None => { lanes.remove(&key); continue; }
                    }
                }
                Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = res { warn!(error = %e, "job task failed"); }
                    continue;
                }
                j = jobs.recv() => match j {
                    Some(j) => {
                        if self.ordered_by_key
                            && let Some(key) = &j.key
                        {
                            if let Some(waiting) = lanes.get_mut(key) {
                                waiting.push_back(j);
                                continue;
                            }
                            lanes.insert(key.clone(), VecDeque::new());
                        }
                        j
                    }
                    None => break,
                },
            };

            let slot = tokio::select! {
                _ = stop.cancelled() => break,
                s = slots.clone().acquire_owned() => s.expect("semaphore is never closed"),
            };
            let waited = Instant::now();
            let Some(permit) = self.gate.admit(&stop).await else {
                break;
            };
            self.metrics
                .token_wait_seconds
                .observe(waited.elapsed().as_secs_f64());
            if !acker.start(&job) {
                debug!(id = %job.id, "partition revoked before start; leaving to the new owner");
                if let (true, Some(key)) = (self.ordered_by_key, &job.key) {
                    let _ = lane_tx.send(key.clone());
                }
                continue;
            }
            let engine = self.clone();
            let mut running = Running {
                acker: acker.clone(),
                origin: job.origin.clone(),
                lane: match (self.ordered_by_key, &job.key) {
                    (true, Some(key)) => Some((lane_tx.clone(), key.clone())),
                    _ => None,
                },
                acknowledged: false,
            };
            let stop = stop.clone();
            tasks.spawn(async move {
                running.acknowledged = engine.process(&job, permit, &running.acker, &stop).await;
                drop(slot);
                drop(running);
            });
        }

        info!(
            running = tasks.len(),
            "stopping intake; draining running messages"
        );
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while let Some(res) = tasks.join_next().await {
                if let Err(e) = res {
                    warn!(error = %e, "job task failed");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                abandoned = tasks.len(),
                "drain timeout: unfinished messages will be redelivered"
            );
            tasks.abort_all();
            // Aborted tasks end at their next poll; their `Running` guards abandon the
            // messages, which the source's final commit must already see.
            while tasks.join_next().await.is_some() {}
        }
    }

    /// One job, start to acknowledgement; returns whether it was acknowledged. Its span carries
    /// the request id and, for Kafka, the partition and offset, so every log line about the
    /// message says which one it is.
    #[instrument(name = "message", skip_all, fields(id = %job.id, partition = Empty, offset = Empty))]
    async fn process(
        &self,
        job: &Job,
        permit: Option<Permit>,
        acker: &Acker,
        stop: &CancellationToken,
    ) -> bool {
        if let Origin::Kafka { partition, offset } = job.origin {
            Span::current()
                .record("partition", partition)
                .record("offset", offset);
        }
        self.metrics.in_flight.inc();
        let _gauge = scopeguard(|| self.metrics.in_flight.dec());

        if let Some(reason) = &job.malformed {
            drop(permit);
            let class = if reason.starts_with("oversized") {
                "oversized"
            } else {
                "malformed"
            };
            self.fail(job, reason, class).await;
            acker.ack(job).await;
            return true;
        }

        match self.store.begin(&job.id).await {
            Ok(Begun::Delivery(n)) if self.max_deliveries > 0 && n > self.max_deliveries => {
                // Every earlier delivery ended without an outcome: the worker died or was
                // stopped while running it. Running it again would take this worker down too.
                drop(permit);
                let reason = format!(
                    "poison: delivered {n} times without finishing (the worker crashed, was \
                     killed or stopped while processing it); limit {}",
                    self.max_deliveries
                );
                warn!(id = %job.id, deliveries = n, "dead-lettering a message that never finishes");
                self.fail(job, &reason, "poison").await;
                acker.ack(job).await;
                return true;
            }
            Ok(Begun::Delivery(_)) => {}
            Ok(Begun::Finished) => {
                // Redelivered after its result was written: do not run it again.
                drop(permit);
                self.metrics
                    .messages
                    .with_label_values(&["duplicate"])
                    .inc();
                acker.ack(job).await;
                return true;
            }
            Err(e) => {
                warn!(error = %e, id = %job.id, "result store unavailable; message left for redelivery");
                return false;
            }
        }

        let started = Instant::now();
        // A panicking handler is a bug in it (or in us) that this message triggers: it fails
        // the message, it does not take the worker's bookkeeping down with it. The permit is
        // given back when the handler is done: bookkeeping needs no token.
        let result = AssertUnwindSafe(self.call_with_retries(job, permit, stop))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Some(Err(format!(
                    "the handler panicked: {}",
                    panic_text(&*panic)
                )))
            });
        self.metrics
            .processing_seconds
            .observe(started.elapsed().as_secs_f64());
        let Some(result) = result else {
            debug!(id = %job.id, "stopping during a retry backoff; message left for redelivery");
            return false;
        };

        match result {
            Ok(body) => {
                if self
                    .store
                    .finish(&job.id, Outcome::Done(body))
                    .await
                    .is_err()
                {
                    return false; // shutting down: redelivered, and the handler runs again
                }
                self.metrics.messages.with_label_values(&["done"]).inc();
            }
            Err(reason) => self.fail(job, &reason, "failed").await,
        }
        acker.ack(job).await;
        true
    }

    /// The handler's answer after up to `retries` retries; `None` when `stop` fired while
    /// waiting to retry (the message is then delivered again).
    ///
    /// A retry waits without its permit: the token protects a downstream that is failing right
    /// now, and a message sleeping through its backoff with a token would keep the budget from
    /// messages that may succeed (during an outage, every token would sleep). After the
    /// backoff it is admitted again like a new message.
    async fn call_with_retries(
        &self,
        job: &Job,
        mut permit: Option<Permit>,
        stop: &CancellationToken,
    ) -> Option<Result<Bytes, String>> {
        let req = Request {
            id: &job.id,
            content_type: job.content_type.as_deref(),
            body: &job.body,
        };
        let mut attempt = 0;
        loop {
            match self.handler.call(&req).await {
                Ok(body) => return Some(Ok(body)),
                Err(HandlerError::Permanent(reason)) => return Some(Err(reason)),
                Err(HandlerError::Retryable(reason)) if attempt >= self.retries => {
                    return Some(Err(format!(
                        "{reason} (gave up after {} attempts)",
                        attempt + 1
                    )));
                }
                Err(HandlerError::Retryable(reason)) => {
                    attempt += 1;
                    self.metrics.retries.inc();
                    let delay = backoff(self.retry_backoff, attempt);
                    debug!(id = %job.id, attempt, ?delay, %reason, "retrying");
                    drop(permit.take());
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    let waited = Instant::now();
                    permit = self.gate.admit(stop).await?;
                    self.metrics
                        .token_wait_seconds
                        .observe(waited.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// Dead-letter, then record the failure. The dead letter is retried until it is written:
    /// acknowledging without it would lose the message.
    async fn fail(&self, job: &Job, reason: &str, class: &str) {
        // Until it is sent: the message is acknowledged only after its dead letter exists.
        let _never_fails = (|| self.dead_letter.send(job, reason))
            .retry(crate::retry::forever(
                Duration::from_millis(100),
                Duration::from_secs(5),
            ))
            .notify(|e, _| {
                warn!(error = %e, target = %self.dead_letter.describe(), "dead letter failed; retrying")
            })
            .await;
        self.metrics.dead_letters.with_label_values(&[class]).inc();
        let _ = self
            .store
            .finish(&job.id, Outcome::Failed(reason.to_owned()))
            .await;
        self.metrics.messages.with_label_values(&["failed"]).inc();
    }
}

/// Exponential backoff with full jitter, capped at 30 s. Hand-written on purpose: a pure
/// function of the attempt that the retry loop around the handler calls and a test pins down.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let cap = Duration::from_secs(30);
    let exp = base.saturating_mul(1 << attempt.min(16)).min(cap);
    let ms = exp.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
}

/// The message of a panic payload (`panic!` with a literal or a formatted string).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Runs a closure when dropped (keeps the in-flight gauge right on every return path).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        for attempt in 1..20 {
            let d = backoff(base, attempt);
            let ceiling = base
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(30));
            assert!(d <= ceiling && d >= ceiling / 2, "{attempt}: {d:?}");
        }
    }
}
