//! Group commit with more than one batch on its way: the loop shared by the result writer and
//! the acknowledgers of the Redis sources.
//!
//! With a single batch in flight the worker and its Redis take turns: the worker gathers while
//! Redis waits, Redis runs the batch while the worker waits, and neither uses more than about
//! half a core (gated worker: 43,500 msg/s, worker 45% and Redis 60% of a core). With two, the
//! next batch is gathered while Redis runs the last one (74,000 msg/s on the same machine). More
//! than two only makes the batches smaller (an earlier attempt with four was slower than one):
//! each script call has a fixed cost in Redis.
//!
//! Batches that are out together must not depend on each other's order; each caller says why
//! theirs do not.

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};

/// How many batches of script calls may be on their way at once.
pub const IN_FLIGHT: usize = 2;

/// Start `write` on each batch of `batches` as it comes, with up to `in_flight` writes
/// running; returns once `batches` ended and every started write finished.
///
/// The writes are boxed: a plain generic future borrowing the caller's state makes the
/// caller's task fail the compiler's `Send` check (a known limit of its inference for
/// higher-ranked lifetimes); one allocation per batch costs nothing here.
pub async fn run<'a, B>(
    in_flight_max: usize,
    batches: impl Stream<Item = B>,
    write: impl Fn(B) -> BoxFuture<'a, ()>,
) {
    let mut batches = std::pin::pin!(batches);
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            // A stream keeps a half-taken batch when this `next` loses the race.
            batch = batches.next(), if in_flight.len() < in_flight_max => match batch {
                Some(batch) => in_flight.push(write(batch)),
                None => {
                    while in_flight.next().await.is_some() {}
                    return;
                }
            },
        }
    }
}

/// The batches of an acknowledger: everything queued, up to `max`, waiting for the first.
pub fn drained<T>(
    rx: tokio::sync::mpsc::UnboundedReceiver<T>,
    max: usize,
) -> impl Stream<Item = Vec<T>> {
    futures::stream::unfold(rx, move |mut rx| async move {
        let mut batch = Vec::new();
        (rx.recv_many(&mut batch, max).await > 0).then_some((batch, rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::{Semaphore, mpsc};

    /// Two writes overlap, no third starts beside them, and every batch is written before
    /// `run` returns.
    #[tokio::test]
    async fn at_most_two_writes_overlap_and_all_finish() {
        let (tx, rx) = mpsc::unbounded_channel::<u32>();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        drop(tx);
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let release = Arc::new(Semaphore::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicUsize::new(0));
        let task = {
            let (release, running, peak, written) = (
                release.clone(),
                running.clone(),
                peak.clone(),
                written.clone(),
            );
            tokio::spawn(async move {
                run(IN_FLIGHT, drained(rx, 1), |batch: Vec<u32>| {
                    let (started, release, running, peak, written) = (
                        started_tx.clone(),
                        release.clone(),
                        running.clone(),
                        peak.clone(),
                        written.clone(),
                    );
                    Box::pin(async move {
                        peak.fetch_max(
                            running.fetch_add(1, Ordering::SeqCst) + 1,
                            Ordering::SeqCst,
                        );
                        started.send(()).unwrap();
                        release.acquire().await.unwrap().forget();
                        running.fetch_sub(1, Ordering::SeqCst);
                        written.fetch_add(batch.len(), Ordering::SeqCst);
                    })
                })
                .await
            })
        };
        // Two writes start while none may finish; then all are let through.
        started.recv().await.unwrap();
        started.recv().await.unwrap();
        release.add_permits(5);
        task.await.unwrap();
        assert_eq!(peak.load(Ordering::SeqCst), IN_FLIGHT);
        assert_eq!(written.load(Ordering::SeqCst), 5);
    }
}
