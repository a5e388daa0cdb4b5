//! Redis Streams source: a consumer group keeps the books that the list source keeps by hand.
//!
//! `XREADGROUP ... >` hands this worker new entries; each stays in the group's pending entries
//! list (PEL) under this consumer until `XACK`, which the worker sends only once the result is
//! durable. A worker that dies leaves its entries pending; any worker takes over entries idle
//! for longer than `claim_idle` with `XAUTOCLAIM` (the crash recovery, instead of the list
//! source's heartbeats and reaper), and a reply lost on the way (the entry pending, the worker
//! never told) is recovered the same way. So there is nothing to return at shutdown. Entries a
//! worker is still working on are kept from looking idle (`XCLAIM ... JUSTID` to itself every
//! third of the idle time), so a slow handler's entry is never taken over while it runs.
//!
//! Entry fields: `body` (required), `id` (the request id; derived from the entry id when
//! absent or invalid) and `contentType`. The gateway writes exactly these. An entry without a
//! body, or larger than the limit, is malformed and goes to the dead letter.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::Retryable;
use bytes::Bytes;
use redis::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Job, Origin, check_content, valid_id};
use crate::Result;
use qp_protocol::redis_conn::{Conn, RedisSettings};

/// How long one `XREADGROUP` blocks (well under the blocking connection's response timeout).
const BLOCK: Duration = Duration::from_secs(1);
/// Pause after a failed Redis call before the next.
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct RedisStreamSettings {
    pub key: String,
    pub group: String,
    /// This worker's consumer name in the group (its worker id).
    pub consumer: String,
    /// Entries idle this long under another consumer are claimed.
    pub claim_idle: Duration,
    pub max_message_bytes: usize,
    /// Entries read per call.
    pub batch: usize,
    /// Delete acknowledged entries at every claim round and when the worker stops ([`trim`]):
    /// a workload scaled to zero right after its last entries still leaves them trimmed.
    pub trim_acknowledged: bool,
}

pub struct RedisStreamSource {
    pub jobs: mpsc::Receiver<Job>,
    pub intake: JoinHandle<()>,
}

/// Entries handed to the engine and not acknowledged yet.
type Held = Arc<Mutex<HashSet<String>>>;

/// Acknowledges entries (`XACK`) once their result is durable: one `XACK` for every entry
/// acknowledged while the earlier ones were on their way, so a busy worker makes far less than
/// one round trip per entry.
#[derive(Clone)]
pub struct RedisStreamAcker {
    tx: mpsc::UnboundedSender<(String, tokio::sync::oneshot::Sender<()>)>,
}

impl RedisStreamAcker {
    /// Acknowledge `entry`; returns when Redis has it.
    pub async fn ack(&self, entry: &str) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send((entry.to_owned(), tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Up to two `XACK`s out at once ([`crate::group_commit`]), in any order: each acknowledges
/// entries of its own.
async fn acker(
    s: RedisStreamSettings,
    conn: Conn,
    held: Held,
    rx: mpsc::UnboundedReceiver<(String, tokio::sync::oneshot::Sender<()>)>,
) {
    use crate::group_commit::{drained, run};
    // One at a time: an `XACK` names every entry of its batch, so letting them pile up while
    // one is out costs fewer commands than a second `XACK` would save in latency (two out at
    // once: 0.32 commands per message instead of 0.25, for no steady gain in throughput).
    run(1, drained(rx, 512), |batch| {
        Box::pin(xack(&s, &conn, &held, batch))
    })
    .await;
}

/// One batch of [`acker`]: one `XACK` for every entry, then answer each waiter.
async fn xack(
    s: &RedisStreamSettings,
    conn: &Conn,
    held: &Held,
    batch: Vec<(String, tokio::sync::oneshot::Sender<()>)>,
) {
    let xack = || {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&s.key).arg(&s.group);
        for (entry, _) in &batch {
            cmd.arg(entry);
        }
        let mut conn = conn.clone();
        async move { cmd.query_async::<i64>(&mut conn).await }
    };
    // Retried until it succeeds: an acknowledgement is answered only once Redis has it (an
    // entry left pending is only delivered again, and its stored result answers for it).
    let _ = xack
        .retry(crate::retry::forever(
            Duration::from_millis(50),
            Duration::from_secs(2),
        ))
        .notify(|e, _| warn!(error = %e, "XACK failed; retrying"))
        .await;
    let mut h = held.lock().expect("held lock");
    for (entry, done) in batch {
        h.remove(&entry);
        let _ = done.send(());
    }
}

/// Add one message to the stream, in the fields the source reads (the gateway and `replay`
/// write through this).
pub async fn add(
    conn: &mut Conn,
    key: &str,
    id: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> redis::RedisResult<String> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*").arg("id").arg(id);
    if let Some(ct) = content_type {
        cmd.arg("contentType").arg(ct);
    }
    cmd.arg("body").arg(body).query_async(conn).await
}

impl RedisStreamSource {
    /// Make the group if missing (at the stream's start, so entries added before the first
    /// worker count), then take entries until `stop`.
    pub async fn start(
        settings: RedisStreamSettings,
        redis: &RedisSettings,
        conn: Conn,
        stop: CancellationToken,
    ) -> Result<(Self, RedisStreamAcker)> {
        let made: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&settings.key)
            .arg(&settings.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn.clone())
            .await;
        match made {
            Ok(()) => info!(key = %settings.key, group = %settings.group, "consumer group made"),
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e.into()),
        }
        let blocking = redis.connect_blocking().await?;
        let (tx, rx) = mpsc::channel(settings.batch.max(1));
        let held = Held::default();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        tokio::spawn(acker(settings.clone(), conn.clone(), held.clone(), ack_rx));
        let acker = RedisStreamAcker { tx: ack_tx };
        tokio::spawn(keep_fresh(
            settings.clone(),
            conn.clone(),
            held.clone(),
            stop.clone(),
        ));
        let intake = tokio::spawn(intake(settings, blocking, conn, held, tx, stop));
        Ok((RedisStreamSource { jobs: rx, intake }, acker))
    }
}

/// Reset the idle time of the entries this worker holds, so that no other worker claims them
/// while they run (a handler may take longer than the idle time).
async fn keep_fresh(s: RedisStreamSettings, mut conn: Conn, held: Held, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(s.claim_idle / 3) => {}
        }
        let ids: Vec<String> = held.lock().expect("held lock").iter().cloned().collect();
        for chunk in ids.chunks(100) {
            let r: redis::RedisResult<Value> = redis::cmd("XCLAIM")
                .arg(&s.key)
                .arg(&s.group)
                .arg(&s.consumer)
                .arg(0)
                .arg(chunk)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                warn!(error = %e, "refreshing held stream entries failed");
            }
        }
    }
}

async fn intake(
    s: RedisStreamSettings,
    mut blocking: Conn,
    mut conn: Conn,
    held: Held,
    tx: mpsc::Sender<Job>,
    stop: CancellationToken,
) {
    // What this consumer name already holds (a restart with the same id: its history, paged
    // from `own`), then new entries, with a claim round every half idle period.
    let mut own = Some("0".to_owned());
    let mut next_claim = Instant::now();
    while !stop.is_cancelled() {
        let mut entries = Vec::new();
        if Instant::now() >= next_claim {
            next_claim = Instant::now() + s.claim_idle / 2;
            if s.trim_acknowledged
                && let Err(e) = trim(&mut conn, &s).await
            {
                warn!(error = %e, "trimming acknowledged entries failed");
            }
            match claim(&mut conn, &s).await {
                Ok(claimed) if !claimed.is_empty() => {
                    info!(
                        claimed = claimed.len(),
                        "claimed entries of silent consumers"
                    );
                    entries = claimed;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "XAUTOCLAIM failed"),
            }
        }
        if entries.is_empty() {
            let from = own.clone().unwrap_or_else(|| ">".to_owned());
            let read = tokio::select! {
                r = read(&mut blocking, &s, &from) => r,
                _ = stop.cancelled() => break,
            };
            match read {
                Ok(e) => {
                    if own.is_some() {
                        own = e.last().map(|(id, _)| id.clone());
                    }
                    entries = e;
                }
                Err(e) => {
                    warn!(error = %e, "XREADGROUP failed");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        for (entry, fields) in entries {
            held.lock().expect("held lock").insert(entry.clone());
            let job = to_job(&s, entry, fields);
            if tx.send(job).await.is_err() {
                return;
            }
        }
    }
}

type Entry = (String, Vec<(String, Bytes)>);

async fn read(
    conn: &mut Conn,
    s: &RedisStreamSettings,
    from: &str,
) -> redis::RedisResult<Vec<Entry>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(&s.group)
        .arg(&s.consumer)
        .arg("COUNT")
        .arg(s.batch);
    if from == ">" {
        cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
    }
    let reply: Value = cmd
        .arg("STREAMS")
        .arg(&s.key)
        .arg(from)
        .query_async(conn)
        .await?;
    // [[key, [[id, [f, v, ...]], ...]]] (RESP2) or {key: [...]} (RESP3); nil on timeout.
    let streams = match reply {
        Value::Array(a) => a,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => return Ok(Vec::new()),
    };
    Ok(streams
        .into_iter()
        .filter_map(|st| match st {
            Value::Array(mut kv) if kv.len() == 2 => Some(kv.remove(1)),
            _ => None,
        })
        .flat_map(entries)
        .collect())
}

/// Delete the entries the group is done with: those before both the oldest entry still pending
/// and the first entry not yet delivered (`XTRIM MINID`, exact). Entries from there on are
/// kept, whoever reads them.
pub async fn trim(conn: &mut Conn, s: &RedisStreamSettings) -> redis::RedisResult<()> {
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&s.key)
        .query_async(conn)
        .await?;
    let Some(last_delivered) = group_field(&groups, &s.group, "last-delivered-id") else {
        return Ok(());
    };
    // The oldest pending entry, if any (XPENDING's summary: count, smallest id, ...).
    let pending: Value = redis::cmd("XPENDING")
        .arg(&s.key)
        .arg(&s.group)
        .query_async(conn)
        .await?;
    let oldest_pending = match &pending {
        Value::Array(v) if v.len() >= 2 => text(&v[1]),
        _ => None,
    };
    // Everything up to and including last-delivered is delivered; keep from the entry after it
    // (or from the oldest pending one, whichever is older).
    let after_delivered = next_id(&last_delivered);
    let keep_from = match oldest_pending {
        Some(p) if older(&p, &after_delivered) => p,
        _ => after_delivered,
    };
    let _: i64 = redis::cmd("XTRIM")
        .arg(&s.key)
        .arg("MINID")
        .arg(keep_from)
        .query_async(conn)
        .await?;
    Ok(())
}

/// A field of group `group` in an `XINFO GROUPS` reply.
fn group_field(reply: &Value, group: &str, field: &str) -> Option<String> {
    let Value::Array(groups) = reply else {
        return None;
    };
    groups.iter().find_map(|g| {
        let pairs: Vec<(&Value, &Value)> = match g {
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|p| Some((p.first()?, p.get(1)?)))
                .collect(),
            Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
            _ => return None,
        };
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| text(k).as_deref() == Some(name))
                .and_then(|(_, v)| text(v))
        };
        (get("name").as_deref() == Some(group))
            .then(|| get(field))
            .flatten()
    })
}

/// Stream ids as (milliseconds, sequence).
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn older(a: &str, b: &str) -> bool {
    matches!((parse_id(a), parse_id(b)), (Some(x), Some(y)) if x < y)
}

/// The smallest id after `id`.
fn next_id(id: &str) -> String {
    match parse_id(id) {
        Some((ms, u64::MAX)) => format!("{}-0", ms + 1),
        Some((ms, seq)) => format!("{ms}-{}", seq + 1),
        None => "0-0".to_owned(),
    }
}

/// Entries idle under other consumers for `claim_idle`, now this worker's.
async fn claim(conn: &mut Conn, s: &RedisStreamSettings) -> redis::RedisResult<Vec<Entry>> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(&s.key)
        .arg(&s.group)
        .arg(&s.consumer)
        .arg(s.claim_idle.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(s.batch)
        .query_async(conn)
        .await?;
    // [next cursor, [[id, fields], ...], [deleted ids]]
    Ok(match reply {
        Value::Array(mut parts) if parts.len() >= 2 => entries(parts.remove(1)),
        _ => Vec::new(),
    })
}

/// `[[id, [field, value, ...]], ...]` as entries; entries deleted meanwhile come with nil fields
/// and are left out.
fn entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut pair) = item else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = text(&pair.pop()?)?;
            let flat = match fields {
                Value::Array(f) => f,
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => return None,
            };
            let fields = flat
                .chunks(2)
                .filter_map(|kv| Some((text(kv.first()?)?, bytes(kv.get(1)?)?)))
                .collect();
            Some((id, fields))
        })
        .collect()
}

fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn bytes(v: &Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}

fn to_job(s: &RedisStreamSettings, entry: String, fields: Vec<(String, Bytes)>) -> Job {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let id = get("id")
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .filter(|i| valid_id(i))
        .unwrap_or_else(|| format!("{}:{entry}", s.key.replace([' ', '{', '}'], "_")));
    let content_type = get("contentType").map(|b| String::from_utf8_lossy(&b).into_owned());
    let body = get("body");
    let malformed = match &body {
        None => Some("malformed: the stream entry has no body field".to_owned()),
        Some(b) if b.len() > s.max_message_bytes => Some(format!(
            "message too large: {} bytes, the limit is {}",
            b.len(),
            s.max_message_bytes
        )),
        Some(b) => check_content(content_type.as_deref(), b),
    };
    Job {
        id: if valid_id(&id) {
            id
        } else {
            format!("stream-{entry}")
        },
        key: None,
        content_type,
        body: body.unwrap_or_default(),
        malformed,
        origin: Origin::RedisStream { entry },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn settings() -> RedisStreamSettings {
        RedisStreamSettings {
            key: "{q}:s".into(),
            group: "g".into(),
            consumer: "w".into(),
            claim_idle: Duration::from_secs(30),
            max_message_bytes: 10,
            batch: 8,
            trim_acknowledged: false,
        }
    }

    #[test]
    fn trimming_keeps_the_oldest_pending_and_everything_undelivered() {
        assert_eq!(next_id("5-3"), "5-4");
        assert_eq!(next_id(&format!("5-{}", u64::MAX)), "6-0");
        assert!(older("4-9", "5-0") && older("5-0", "5-1") && !older("5-1", "5-1"));
        let groups = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("workers"),
            bulk("last-delivered-id"),
            bulk("7-2"),
        ])]);
        assert_eq!(
            group_field(&groups, "workers", "last-delivered-id").as_deref(),
            Some("7-2")
        );
        assert_eq!(group_field(&groups, "other", "last-delivered-id"), None);
    }

    #[test]
    fn entries_become_jobs() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("id"), bulk("r-1"), bulk("body"), bulk("hello")]),
            ]),
            // Deleted while pending: nil fields, left out.
            Value::Array(vec![bulk("2-0"), Value::Nil]),
            Value::Array(vec![
                bulk("3-0"),
                Value::Array(vec![bulk("body"), bulk("x".repeat(11).as_str())]),
            ]),
            Value::Array(vec![
                bulk("4-0"),
                Value::Array(vec![bulk("nobody"), bulk("")]),
            ]),
        ]);
        let jobs: Vec<Job> = entries(reply)
            .into_iter()
            .map(|(e, f)| to_job(&settings(), e, f))
            .collect();
        assert_eq!(jobs.len(), 3);
        assert_eq!(
            (jobs[0].id.as_str(), &jobs[0].body[..]),
            ("r-1", &b"hello"[..])
        );
        assert!(jobs[0].malformed.is_none());
        assert!(matches!(&jobs[0].origin, Origin::RedisStream { entry } if entry == "1-0"));
        // No id: derived from the entry, with the key's braces replaced.
        assert_eq!(jobs[1].id, "_q_:s:3-0");
        assert!(jobs[1].malformed.as_deref().unwrap().contains("too large"));
        assert!(jobs[2].malformed.as_deref().unwrap().contains("no body"));
    }
}
