//! Taking messages: `BLMOVE source processing`, one at a time, only when the engine has room.
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

/// The intake task: hands the engine one message at a time until `stop`, or until the engine
/// drops its end of the channel.
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
        // Wait for room first, so we never take a message we cannot hand over.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => return IntakeEnd::Settled,
            p = tx.reserve() => match p { Ok(p) => p, Err(_) => return IntakeEnd::Settled },
        };
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
        if let Some(raw) = adopted.pop_front() {
            permit.send(to_job(raw, &settings));
            continue;
        }

        let answer = blmove.query_async::<Option<Vec<u8>>>(&mut blocking);
        tokio::pin!(answer);
        let answer = tokio::select! {
            r = &mut answer => r,
            // Asked to stop: the command is still blocked on the server. Wait for its answer,
            // or a message could move into the processing list after it was returned.
            _ = stop.cancelled() => match tokio::time::timeout(BLOCK + ANSWER_GRACE, answer).await {
                // Moved or not, the return step finds it in the processing list.
                Ok(Ok(_)) => return IntakeEnd::Settled,
                Ok(Err(_)) | Err(_) => return IntakeEnd::Unsettled,
            },
        };
        match answer {
            Ok(Some(raw)) => {
                failures = 0;
                let raw = Bytes::from(raw);
                holdings.add(&raw);
                permit.send(to_job(raw, &settings));
            }
            Ok(None) => failures = 0, // nothing queued for a second
            Err(e) => {
                // The server may have moved a message whose reply we lost: look next time.
                holdings.suspect();
                warn!(error = %e, "BLMOVE failed");
                if pause(&mut failures, &stop).await.is_err() {
                    return IntakeEnd::Unsettled;
                }
            }
        }
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
