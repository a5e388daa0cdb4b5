//! Redis list source: reliable-queue consumption with a per-worker processing list.
//!
//! Producers `LPUSH` envelopes onto the source list. A worker takes one with `BLMOVE source
//! processing RIGHT LEFT`, or up to 32 at once with pipelined `LMOVE`s while the list has
//! messages: each move is atomic, so a message is always in exactly one of the two lists and a
//! crash between "taken" and "done" cannot lose it. When the result is durable the
//! worker removes the message from its processing list (`LREM`, batched).
//!
//! A worker that dies leaves its processing list behind. Every worker heartbeats into the
//! QueueProcessor's `heartbeats` sorted set (Redis server time); a reaper, run by whichever worker
//! wins a short lock, finds workers silent for longer than `dead_after` and pushes their
//! unfinished messages back onto the *consuming* end of the source list, so they are next
//! (`reaper`). How the worker keeps track of what it holds, and why it waits for its last
//! `BLMOVE` before stopping, is in `intake`.
//!
//! Envelope (JSON): `{"id": "...", "contentType": "application/json", "body": "..."}`, with
//! `bodyBase64` instead of `body` for binary payloads. The gateway writes exactly this. An item
//! that is not a valid envelope is a malformed message: it goes to the dead letter with the
//! reason, it never stalls the worker.

mod intake;
mod reaper;

use std::hash::{Hash, Hasher};
use std::time::Duration;

use backon::Retryable;
use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use intake::Holdings;
pub use intake::IntakeEnd;

use super::{Job, Origin, check_content, valid_id};
use crate::Result;
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::{Conn, RedisSettings};

/// The wire format of a list item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl Envelope {
    /// Wrap a payload: UTF-8 bodies travel as text, anything else as base64.
    pub fn new(id: &str, content_type: Option<&str>, body: &[u8]) -> Self {
        let (text, b64) = match std::str::from_utf8(body) {
            Ok(s) => (Some(s.to_owned()), None),
            Err(_) => (None, Some(BODY_BASE64.encode(body))),
        };
        Envelope {
            id: id.to_owned(),
            content_type: content_type.map(str::to_owned),
            body: text,
            body_base64: b64,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }
}

#[derive(Debug, Clone)]
pub struct RedisListSettings {
    /// The list producers push to.
    pub key: String,
    /// This worker's identity (pod name in Kubernetes); names its processing list.
    pub worker_id: String,
    pub max_message_bytes: usize,
    /// A worker silent this long is dead and its messages are returned.
    pub dead_after: Duration,
}

pub struct RedisListSource {
    pub jobs: mpsc::Receiver<Job>,
    /// The intake task; see [`Intake::end`].
    pub intake: Intake,
}

/// The running intake task.
pub struct Intake(JoinHandle<IntakeEnd>);

impl Intake {
    /// Waits until the intake stopped (it stops within a few seconds once the stop token fired
    /// or the engine dropped its job channel) and says whether its last `BLMOVE` was answered.
    pub async fn end(self) -> IntakeEnd {
        self.0.await.unwrap_or(IntakeEnd::Unsettled)
    }
}

/// Cloneable acknowledgement handle.
#[derive(Clone)]
pub struct RedisListAcker {
    tx: mpsc::UnboundedSender<(Bytes, tokio::sync::oneshot::Sender<()>)>,
}

impl RedisListAcker {
    /// Remove a finished message from the processing list; returns when Redis has done it.
    pub async fn ack(&self, raw: Bytes) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send((raw, tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl RedisListSource {
    /// Recover this worker's own leftovers, then start taking messages until `stop`.
    pub async fn start(
        settings: RedisListSettings,
        redis: &RedisSettings,
        conn: Conn,
        keys: Keys,
        stop: CancellationToken,
    ) -> Result<(Self, RedisListAcker)> {
        let processing = keys.processing_list(&settings.key, &settings.worker_id)?;
        // A restarted worker with the same id first returns what it held before.
        let recovered: i64 = qp_protocol::scripts::RECOVER
            .key(&processing)
            .key(&settings.key)
            .invoke_async(&mut conn.clone())
            .await?;
        if recovered > 0 {
            info!(recovered, "returned messages left in our processing list");
        }
        let blocking = redis.connect_blocking().await?;
        let holdings = Holdings::default();
        let (tx, rx) = mpsc::channel(intake::BATCH);
        let intake = tokio::spawn(intake::run(
            settings.clone(),
            blocking,
            conn.clone(),
            processing.clone(),
            holdings.clone(),
            tx,
            stop.clone(),
        ));
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        tokio::spawn(acker(conn.clone(), processing, holdings.clone(), ack_rx));
        tokio::spawn(reaper::run(conn, keys, settings, stop));
        let source = RedisListSource {
            jobs: rx,
            intake: Intake(intake),
        };
        Ok((source, RedisListAcker { tx: ack_tx }))
    }
}

/// Put back whatever is left in this worker's processing list (messages taken but never
/// finished, e.g. when a drain timed out). Called at shutdown, after the engine stopped.
pub async fn return_unfinished(
    conn: &mut Conn,
    keys: &Keys,
    settings: &RedisListSettings,
) -> Result<i64> {
    let processing = keys.processing_list(&settings.key, &settings.worker_id)?;
    Ok(qp_protocol::scripts::RECOVER
        .key(&processing)
        .key(&settings.key)
        .invoke_async(conn)
        .await?)
}

/// Batches `LREM`s: everything acknowledged while earlier batches were in flight goes in one
/// pipeline, with up to two pipelines out at once ([`crate::group_commit`]). They may run in
/// any order: each removes messages of its own, and a message is forgotten from the holdings
/// only after its `LREM` succeeded.
async fn acker(
    conn: Conn,
    processing: String,
    holdings: Holdings,
    rx: mpsc::UnboundedReceiver<(Bytes, tokio::sync::oneshot::Sender<()>)>,
) {
    use crate::group_commit::{IN_FLIGHT, drained, run};
    run(IN_FLIGHT, drained(rx, 256), |batch| {
        Box::pin(remove(&conn, &processing, &holdings, batch))
    })
    .await;
}

/// One batch of [`acker`]: `LREM` every message, then answer each waiter.
async fn remove(
    conn: &Conn,
    processing: &str,
    holdings: &Holdings,
    batch: Vec<(Bytes, tokio::sync::oneshot::Sender<()>)>,
) {
    let mut pipe = redis::pipe();
    for (raw, _) in &batch {
        // One copy, searched from the tail: messages enter at the head, so the oldest,
        // which mostly finish first, are near the tail. From the head, every removal
        // compared the message with most of the list (twice the Redis time per message).
        pipe.cmd("LREM")
            .arg(processing)
            .arg(-1)
            .arg(raw.as_ref())
            .ignore();
    }
    let lrem = || {
        let (pipe, mut conn) = (&pipe, conn.clone());
        async move { pipe.query_async::<()>(&mut conn).await }
    };
    // Retried until it succeeds: an acknowledgement is answered only once Redis has it.
    let _ = lrem
        .retry(crate::retry::forever(
            Duration::from_millis(50),
            Duration::from_secs(2),
        ))
        .notify(|e, _| warn!(error = %e, "LREM from processing list failed; retrying"))
        .await;
    for (raw, done) in batch {
        holdings.remove(&raw);
        let _ = done.send(());
    }
}

fn to_job(raw: Bytes, settings: &RedisListSettings) -> Job {
    let origin = Origin::RedisList { raw: raw.clone() };
    let derived_id = || {
        let mut h = std::hash::DefaultHasher::new();
        raw.hash(&mut h);
        format!("raw-{:016x}", h.finish())
    };
    let oversized = |bytes: usize| {
        format!(
            "oversized: a body of {bytes} bytes exceeds the limit of {} bytes",
            settings.max_message_bytes
        )
    };
    // The limit is on the body; the envelope around it may be larger (base64 adds a third, JSON
    // escapes up to six times). An item too large to hold any acceptable body is not parsed.
    if raw.len() > max_envelope_bytes(settings.max_message_bytes) {
        return Job {
            id: derived_id(),
            key: None,
            content_type: None,
            body: raw.clone(),
            malformed: Some(oversized(raw.len())),
            origin,
        };
    }
    let parsed = serde_json::from_slice::<Envelope>(&raw)
        .map_err(|e| format!("malformed: not a queue-processor envelope ({e})"))
        .and_then(|env| {
            if !valid_id(&env.id) {
                return Err("malformed: invalid id in envelope".to_owned());
            }
            let body = match (env.body, env.body_base64) {
                (Some(t), None) => Bytes::from(t),
                (None, Some(b)) => Bytes::from(
                    BODY_BASE64
                        // Any run of `=` at the end is accepted, as before the crate was used.
                        .decode(b.trim_end_matches('='))
                        .map_err(|_| "malformed: bodyBase64 is not valid base64")?,
                ),
                (None, None) => Bytes::new(),
                (Some(_), Some(_)) => {
                    return Err("malformed: envelope has both body and bodyBase64".to_owned());
                }
            };
            Ok((env.id, env.content_type, body))
        });
    match parsed {
        Ok((id, content_type, body)) => Job {
            malformed: if body.len() > settings.max_message_bytes {
                Some(oversized(body.len()))
            } else {
                check_content(content_type.as_deref(), &body)
            },
            id,
            key: None,
            content_type,
            body,
            origin,
        },
        Err(reason) => Job {
            id: derived_id(),
            key: None,
            content_type: None,
            body: raw.clone(),
            malformed: Some(reason),
            origin,
        },
    }
}

/// The largest list item that can carry a body of `max_body` bytes: a JSON string escapes a
/// byte into at most six (`\u0000`), plus room for the id and the other fields.
fn max_envelope_bytes(max_body: usize) -> usize {
    max_body.saturating_mul(6).saturating_add(4096)
}

/// The base64 of `bodyBase64`: the standard alphabet, padded when written. Read leniently, as
/// producers may strip the padding: missing `=` and non-zero unused trailing bits are accepted.
pub const BODY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Properties of the list item parser, which reads whatever anyone pushed to the list.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn settings(max: usize) -> RedisListSettings {
        RedisListSettings {
            key: "q".into(),
            worker_id: "w".into(),
            max_message_bytes: max,
            dead_after: Duration::from_secs(5),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// What a producer wraps comes out unchanged: id, content type and every byte of the
        /// body, text or binary.
        #[test]
        fn envelopes_round_trip(
            id in "[A-Za-z0-9._:-]{1,128}",
            content_type in proptest::option::of("[a-z]{1,10}/[a-z+.-]{1,20}"),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let raw = Bytes::from(Envelope::new(&id, content_type.as_deref(), &body).to_bytes());
            let job = to_job(raw, &settings(1000));
            prop_assert_eq!(&job.id, &id);
            prop_assert_eq!(job.content_type.as_deref(), content_type.as_deref());
            prop_assert_eq!(&job.body[..], &body[..]);
            prop_assert!(job.malformed.is_none(), "{:?}", job.malformed);
        }

        /// Any bytes at all become a job: parsed, or malformed with a reason (dead-lettered),
        /// never a panic; a malformed item keeps its raw bytes, bounded by the limit's envelope.
        #[test]
        fn arbitrary_items_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let job = to_job(Bytes::from(raw.clone()), &settings(64));
            prop_assert!(valid_id(&job.id), "{}", job.id);
            if job.malformed.is_some() {
                prop_assert_eq!(&job.body[..], &raw[..]);
            } else {
                prop_assert!(job.body.len() <= 64);
            }
        }

        /// JSON-shaped garbage (the likelier kind) is classified, never accepted with an
        /// invalid id.
        #[test]
        fn json_shaped_items_are_checked(
            id in ".{0,140}",
            body in proptest::option::of(".{0,80}"),
            b64 in proptest::option::of("[A-Za-z0-9+/=!]{0,40}"),
        ) {
            let raw = serde_json::json!({"id": id, "body": body, "bodyBase64": b64}).to_string();
            let job = to_job(Bytes::from(raw), &settings(64));
            if job.malformed.is_none() {
                prop_assert!(valid_id(&job.id));
                prop_assert_eq!(&job.id, &id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RedisListSettings {
        RedisListSettings {
            key: "q".into(),
            worker_id: "w".into(),
            max_message_bytes: 64,
            dead_after: Duration::from_secs(5),
        }
    }

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"\xff\x00\x10binary"] {
            assert_eq!(BODY_BASE64.decode(BODY_BASE64.encode(data)).unwrap(), data);
        }
        assert_eq!(BODY_BASE64.encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(BODY_BASE64.encode(b"fo"), "Zm8=");
        assert!(BODY_BASE64.decode("!!").is_err());
        // Unpadded and non-canonical input is read as the hand-written decoder read it.
        assert_eq!(BODY_BASE64.decode("Zm8").unwrap(), b"fo");
        assert_eq!(
            BODY_BASE64.decode("Zm8==".trim_end_matches('=')).unwrap(),
            b"fo"
        );
        assert_eq!(BODY_BASE64.decode("Zm9=").unwrap(), b"fo");
    }

    #[test]
    fn envelopes_become_jobs() {
        let env = Envelope::new("r1", Some("text/plain"), b"hi");
        let job = to_job(Bytes::from(env.to_bytes()), &settings());
        assert_eq!(job.id, "r1");
        assert_eq!(&job.body[..], b"hi");
        assert!(job.malformed.is_none());

        let bin = Envelope::new("r2", None, b"\xff\xfe");
        let job = to_job(Bytes::from(bin.to_bytes()), &settings());
        assert_eq!(&job.body[..], b"\xff\xfe");
    }

    #[test]
    fn bad_items_are_malformed_not_fatal() {
        for raw in [
            &b"not json"[..],
            br#"{"id":"x y","body":"a"}"#,
            br#"{"id":"a","body":"x","bodyBase64":"eA=="}"#,
            br#"{"id":"a","contentType":"application/json","body":"{nope"}"#,
            br#"{"id":"a","extra":1}"#,
        ] {
            let job = to_job(Bytes::copy_from_slice(raw), &settings());
            assert!(job.malformed.is_some(), "{}", String::from_utf8_lossy(raw));
        }
        let big = Bytes::from(vec![b'x'; max_envelope_bytes(64) + 1]);
        assert!(
            to_job(big, &settings())
                .malformed
                .unwrap()
                .starts_with("oversized")
        );
    }

    #[test]
    fn the_limit_is_on_the_body_not_the_envelope() {
        // 64 binary bytes travel as 88 base64 characters in an envelope of ~110 bytes.
        let at_limit = Envelope::new("b1", None, &[0xff; 64]).to_bytes();
        assert!(at_limit.len() > 100);
        let job = to_job(Bytes::from(at_limit), &settings());
        assert!(job.malformed.is_none(), "{:?}", job.malformed);
        assert_eq!(job.body.len(), 64);
        let over = Envelope::new("b2", None, &[0xff; 65]).to_bytes();
        let job = to_job(Bytes::from(over), &settings());
        assert_eq!(job.id, "b2");
        assert!(job.malformed.unwrap().starts_with("oversized"));
    }
}
