//! Taking messages: as many as the engine has room for, up to [`BATCH`], in one round trip of
//! pipelined `LMOVE source processing`s; a blocking `BLMOVE` for one only when the list was
//! empty. Each move is atomic, as before: a message is in exactly one of the two lists whether
//! the pipeline's reply arrives or not, and a batch never takes more than the job channel has
//! room for, so nothing taken waits outside it.
//!
//! Two things can make this worker lose track of a message that the server moved into its
//! processing list, and both are handled here:
//!
//! * **A lost reply.** If the connection drops after the server moved a message but before its
//!   reply arrived, the message sits in the processing list and nobody works on it; the reaper
//!   does not help while this worker lives. So after a `BLMOVE` fails the intake compares the
//!   processing list with what it knows it [holds](Holdings) and *adopts* the difference: those
//!   messages are handed to the engine like new ones.
//! * **Stopping mid-`BLMOVE`.** The command is still blocked on the server when the worker
//!   decides to stop; abandoning it would let it move a message after the worker returned its
//!   processing list. So the intake waits for the answer (the server gives one within the block
//!   timeout) before it ends, and reports whether it got one ([`IntakeEnd`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{RedisListSettings, to_job};
use crate::Result;
use crate::source::Job;
use qp_protocol::redis_conn::Conn;

/// The most messages taken in one round trip; also the capacity of the job channel, so a full
/// batch always has room. 32 keeps the round trips per message near 0.03 at full speed while a
/// stopping worker holds at most this many not yet started (they go back with its processing
/// list).
pub const BATCH: usize = 32;

/// How long one `BLMOVE` blocks on the server.
const BLOCK: Duration = Duration::from_secs(1);

/// How long, after being asked to stop, the intake waits for the answer to a `BLMOVE` it sent.
/// The server answers within [`BLOCK`]; the rest is for the network.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// How the intake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntakeEnd {
    /// Every `BLMOVE` it sent was answered: nothing more can land in the processing list.
    Settled,
    /// Its last `BLMOVE` got no answer: a message may still land in the processing list after
    /// the worker returned what it held, so the worker must leave its heartbeat for the reaper.
    Unsettled,
}

/// What this worker holds in its processing list as far as it knows: messages taken and not
/// yet removed (a multiset: two producers may push identical bytes). Shared by the intake,
/// which adds what it takes, and the acknowledger, which removes what it `LREM`ed.
#[derive(Clone, Default)]
pub struct Holdings {
    inner: Arc<Mutex<HoldingsInner>>,
}

#[derive(Default)]
struct HoldingsInner {
    counts: HashMap<Bytes, usize>,
    /// Set when something may be in the processing list that is not in `counts`.
    recheck: bool,
}

impl Holdings {
    fn lock(&self) -> MutexGuard<'_, HoldingsInner> {
        // Every critical section is a few plain updates: a panic cannot leave them half done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, raw: &Bytes) {
        *self.lock().counts.entry(raw.clone()).or_default() += 1;
    }

    /// Forget one copy of `raw` (it was removed from the processing list).
    pub fn remove(&self, raw: &Bytes) {
        let mut inner = self.lock();
        if let Some(n) = inner.counts.get_mut(raw) {
            *n -= 1;
            if *n == 0 {
                inner.counts.remove(raw);
            }
        }
    }

    fn suspect(&self) {
        self.lock().recheck = true;
    }

    fn take_recheck(&self) -> bool {
        std::mem::take(&mut self.lock().recheck)
    }

    /// The messages of `listed` (the processing list) beyond what is held: orphans. Adds them
    /// to the holdings, since the caller adopts them.
    fn adopt(&self, listed: Vec<Bytes>) -> Vec<Bytes> {
        let mut inner = self.lock();
        let found = orphans(listed, &inner.counts);
        for raw in &found {
            *inner.counts.entry(raw.clone()).or_default() += 1;
        }
        found
    }
}

/// Pure: the items of `listed` that occur more often than `held` accounts for.
fn orphans(listed: Vec<Bytes>, held: &HashMap<Bytes, usize>) -> Vec<Bytes> {
    let mut budget = held.clone();
    let mut out = Vec::new();
    for raw in listed {
        match budget.get_mut(&raw) {
            Some(n) if *n > 0 => *n -= 1,
            _ => out.push(raw),
        }
    }
    out
}

/// The intake task: hands the engine messages as it has room for them, until `stop`, or until
/// the engine drops its end of the channel.
pub(super) async fn run(
    settings: RedisListSettings,
    mut blocking: Conn,
    mut conn: Conn,
    processing: String,
    holdings: Holdings,
    tx: mpsc::Sender<Job>,
    stop: CancellationToken,
) -> IntakeEnd {
    let mut blmove = redis::cmd("BLMOVE");
    blmove
        .arg(&settings.key)
        .arg(&processing)
        .arg("RIGHT")
        .arg("LEFT")
        .arg(BLOCK.as_secs_f64());
    let mut adopted: VecDeque<Bytes> = VecDeque::new();
    let mut failures = 0u32;
    loop {
        // Wait for room first, so we never take a message we cannot hand over; then take what
        // else is free without waiting (this task is the only sender: room only grows).
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return IntakeEnd::Settled,
            p = tx.reserve_many(1) => match p { Ok(p) => p, Err(_) => return IntakeEnd::Settled },
        };
        let more = tx.capacity().min(BATCH - 1);
        let mut permits: VecDeque<_> = first
            .chain(tx.try_reserve_many(more).ok().into_iter().flatten())
            .collect();
        if holdings.take_recheck() {
            match lrange(&mut conn, &processing).await {
                Ok(listed) => {
                    let found = holdings.adopt(listed);
                    if !found.is_empty() {
                        info!(
                            adopted = found.len(),
                            "took up messages in our processing list that nobody worked on"
                        );
                    }
                    adopted.extend(found);
                }
                Err(e) => {
                    warn!(error = %e, "reading our processing list failed; retrying");
                    holdings.suspect();
                    if pause(&mut failures, &stop).await.is_err() {
                        return IntakeEnd::Settled;
                    }
                    continue;
                }
            }
        }
        if !adopted.is_empty() {
            let n = permits.len().min(adopted.len());
            for (permit, raw) in permits.drain(..n).zip(adopted.drain(..n)) {
                permit.send(to_job(raw, &settings));
            }
            continue;
        }

        // Never more than there are permits for: a message taken must be handed over.
        let room = permits.len();
        let taken = match take(
            &mut blocking,
            &blmove,
            &settings.key,
            &processing,
            room,
            &stop,
        )
        .await
        {
            Taken::Messages(taken) => taken,
            Taken::Stopped(end) => return end,
        };
        match taken {
            Ok(taken) => {
                failures = 0;
                // None taken: the list stayed empty for a second.
                debug_assert!(taken.len() <= room, "took more than there is room for");
                for (raw, permit) in taken.into_iter().zip(permits.drain(..)) {
                    let raw = Bytes::from(raw);
                    holdings.add(&raw);
                    permit.send(to_job(raw, &settings));
                }
            }
            Err(e) => {
                // The server may have moved messages whose reply we lost: look next time.
                holdings.suspect();
                warn!(error = %e, "taking messages failed");
                if pause(&mut failures, &stop).await.is_err() {
                    return IntakeEnd::Unsettled;
                }
            }
        }
    }
}

/// What one attempt to take messages came to.
enum Taken {
    /// The server answered (with the messages moved, possibly none) or the request failed.
    Messages(redis::RedisResult<Vec<Vec<u8>>>),
    /// Asked to stop while a request was out: how the intake ends.
    Stopped(IntakeEnd),
}

/// Up to `room` messages in one round trip: `room` pipelined non-blocking `LMOVE`s (another
/// client's push may land between two of them, so any of the replies may carry a message), or,
/// when none moved anything, a `BLMOVE` that waits up to [`BLOCK`] for one.
async fn take(
    blocking: &mut Conn,
    blmove: &redis::Cmd,
    source: &str,
    processing: &str,
    room: usize,
    stop: &CancellationToken,
) -> Taken {
    let mut pipe = redis::pipe();
    for _ in 0..room {
        pipe.cmd("LMOVE")
            .arg(source)
            .arg(processing)
            .arg("RIGHT")
            .arg("LEFT");
    }
    let moved = match answered(pipe.query_async::<Vec<Option<Vec<u8>>>>(blocking), stop).await {
        Ok(Ok(moved)) => moved.into_iter().flatten().collect::<Vec<_>>(),
        Ok(Err(e)) => return Taken::Messages(Err(e)),
        Err(end) => return Taken::Stopped(end),
    };
    if !moved.is_empty() {
        return Taken::Messages(Ok(moved));
    }
    match answered(blmove.query_async::<Option<Vec<u8>>>(blocking), stop).await {
        Ok(r) => Taken::Messages(r.map(|m| m.into_iter().collect())),
        Err(end) => Taken::Stopped(end),
    }
}

/// The answer to a request that moves messages, or, if asked to stop while it is out, how the
/// intake ends: it waits for the answer first (a `BLMOVE` may still be blocked on the server),
/// or a message could move into the processing list after the worker returned it.
async fn answered<T>(
    request: impl std::future::Future<Output = redis::RedisResult<T>>,
    stop: &CancellationToken,
) -> std::result::Result<redis::RedisResult<T>, IntakeEnd> {
    tokio::pin!(request);
    tokio::select! {
        r = &mut request => Ok(r),
        _ = stop.cancelled() => match tokio::time::timeout(BLOCK + ANSWER_GRACE, request).await {
            // Moved or not, the return step finds it in the processing list.
            Ok(Ok(_)) => Err(IntakeEnd::Settled),
            Ok(Err(_)) | Err(_) => Err(IntakeEnd::Unsettled),
        },
    }
}

/// Backoff after a failure: 100 ms doubling to 5 s. `Err` when `stop` fired meanwhile.
async fn pause(failures: &mut u32, stop: &CancellationToken) -> std::result::Result<(), ()> {
    let delay = Duration::from_millis(100)
        .saturating_mul(1 << (*failures).min(6))
        .min(Duration::from_secs(5));
    *failures += 1;
    tokio::select! {
        _ = stop.cancelled() => Err(()),
        _ = tokio::time::sleep(delay) => Ok(()),
    }
}

async fn lrange(conn: &mut Conn, processing: &str) -> Result<Vec<Bytes>> {
    let items: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(processing)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    Ok(items.into_iter().map(Bytes::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn orphans_are_what_is_listed_beyond_what_is_held() {
        let held = HashMap::from([(b("a"), 1), (b("dup"), 1)]);
        let listed = vec![b("a"), b("dup"), b("dup"), b("lost")];
        assert_eq!(orphans(listed, &held), vec![b("dup"), b("lost")]);
        assert!(orphans(vec![b("a")], &held).is_empty());
        // Held but already removed from the list (acknowledged meanwhile): nothing to adopt.
        assert!(orphans(Vec::new(), &held).is_empty());
    }

    #[test]
    fn holdings_count_copies_and_adopt_marks_held() {
        let h = Holdings::default();
        h.add(&b("x"));
        h.add(&b("x"));
        h.remove(&b("x"));
        assert_eq!(h.adopt(vec![b("x"), b("x")]), vec![b("x")]);
        assert!(h.adopt(vec![b("x"), b("x")]).is_empty(), "adopted are held");
        h.suspect();
        assert!(h.take_recheck());
        assert!(!h.take_recheck());
    }
}
