//! `qp-worker replay`: send dead letters through the QueueProcessor again, once whatever made
//! them fail is fixed.
//!
//! A dead letter cannot simply be produced again by hand: its request is `failed`, and results
//! are write-once, so the worker would skip the message as a duplicate; and a Redis-list dead
//! letter carries a `reason` field that makes it a malformed envelope for the worker. Replay
//! does it properly, for each chosen dead letter, in this order:
//!
//! 1. forget the request's state (its result hash, delivery count included), so that the worker
//!    runs it again;
//! 2. queue the original message on the QueueProcessor's source (the Kafka topic with its
//!    `qp-id` and `content-type` headers and key, or the Redis list as a plain envelope);
//! 3. remove the entry from a Redis dead-letter list (a Kafka dead-letter topic keeps it: the
//!    log is append-only, so choose by `--id` to replay a message only once).
//!
//! `--dry-run` lists what would be replayed and changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::source::redis_list::Envelope;
use crate::{Error, Result};
use qp_protocol::redis_conn::Conn;
use qp_protocol::settings::{CommonArgs, KafkaArgs, SourceKind};

/// `qp-worker replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Where the dead letters are: `redis:<list key>` or `kafka:<topic>` (the worker's
    /// --dead-letter). Default: the QueueProcessor's own dead-letter list in Redis.
    #[arg(long, env = "QP_DEAD_LETTER")]
    pub dead_letter: Option<String>,
    /// Where to queue them again: the QueueProcessor's source.
    #[arg(long, env = "QP_SOURCE", value_enum)]
    pub source: SourceKind,
    /// The source list (with --source redis-list).
    #[arg(long, env = "QP_LIST_KEY")]
    pub list_key: Option<String>,
    /// The source stream (with --source redis-stream).
    #[arg(long, env = "QP_STREAM_KEY")]
    pub stream_key: Option<String>,
    /// Replay the dead letter of this request id (repeat for more).
    #[arg(long = "id", value_name = "ID", required_unless_present = "all")]
    pub ids: Vec<String>,
    /// Replay every dead letter.
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,
    /// List what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// One dead letter, as found.
#[derive(Debug, Clone)]
struct Letter {
    id: String,
    key: Option<Bytes>,
    content_type: Option<String>,
    body: Bytes,
    reason: String,
    /// The list item, for removing it from a Redis dead-letter list.
    raw: Option<Bytes>,
}

/// Where dead letters are read from.
enum Target {
    Redis(String),
    Kafka(String),
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Dead letters found at the target.
    pub found: usize,
    /// Chosen and queued again (or, with --dry-run, that would be).
    pub replayed: usize,
    /// Ids asked for by --id that have no dead letter.
    pub missing: Vec<String>,
    /// Entries that are not dead letters (unreadable), left alone.
    pub unreadable: usize,
}

pub async fn replay(args: ReplayArgs) -> Result<Report> {
    let keys = args.common.keys();
    let redis = args.common.redis()?;
    let mut conn = redis.connect().await?;
    let target = match args.dead_letter.as_deref() {
        None => Target::Redis(keys.dead_letter()),
        Some(s) => match s.split_once(':') {
            Some(("redis", key)) if !key.is_empty() => Target::Redis(key.to_owned()),
            Some(("kafka", topic)) if !topic.is_empty() => Target::Kafka(topic.to_owned()),
            _ => {
                return Err(Error::config(format!(
                    "--dead-letter must be kafka:<topic> or redis:<list key>, got {s:?}"
                )));
            }
        },
    };
    let (letters, unreadable) = match &target {
        Target::Redis(key) => read_list(&mut conn, key).await?,
        Target::Kafka(topic) => (read_topic(&args.kafka, topic).await?, 0),
    };
    let mut report = Report {
        found: letters.len(),
        unreadable,
        ..Report::default()
    };
    let chosen = choose(letters, &args.ids, args.all, &mut report.missing);
    for id in &report.missing {
        println!("no dead letter for {id}");
    }
    let queue = Queue::new(&args, conn.clone())?;
    for letter in &chosen {
        let verb = if args.dry_run {
            "would replay"
        } else {
            "replaying"
        };
        println!(
            "{verb} {} ({} bytes): {}",
            letter.id,
            letter.body.len(),
            letter.reason
        );
        if args.dry_run {
            continue;
        }
        let _: i64 = redis::cmd("DEL")
            .arg(keys.result(&letter.id))
            .query_async(&mut conn)
            .await?;
        queue.send(letter).await?;
        if let (Target::Redis(key), Some(raw)) = (&target, &letter.raw) {
            let _: i64 = redis::cmd("LREM")
                .arg(key)
                .arg(1)
                .arg(raw.as_ref())
                .query_async(&mut conn)
                .await?;
        }
    }
    report.replayed = chosen.len();
    let done = if args.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    println!(
        "{done} {} of {} dead letters ({} unreadable entries left alone)",
        report.replayed, report.found, report.unreadable
    );
    Ok(report)
}

/// The letters to replay: those of `ids` (the newest letter of an id dead-lettered more than
/// once), or all with `all`. Ids without a letter are added to `missing`.
fn choose(
    letters: Vec<Letter>,
    ids: &[String],
    all: bool,
    missing: &mut Vec<String>,
) -> Vec<Letter> {
    // Newest wins: letters are in the order they were written.
    let mut by_id: BTreeMap<String, Letter> = BTreeMap::new();
    for l in letters {
        by_id.insert(l.id.clone(), l);
    }
    if all {
        return by_id.into_values().collect();
    }
    let mut out = Vec::new();
    for id in ids {
        match by_id.remove(id) {
            Some(l) => out.push(l),
            None => missing.push(id.clone()),
        }
    }
    out
}

/// A Redis dead-letter entry: an envelope with a `reason`. `None` for anything else.
fn parse_entry(raw: &[u8]) -> Option<Letter> {
    let mut value: Value = serde_json::from_slice(raw).ok()?;
    let reason = match value.as_object_mut()?.remove("reason")? {
        Value::String(r) => r,
        _ => return None,
    };
    let env: Envelope = serde_json::from_value(value).ok()?;
    let body = match (&env.body, &env.body_base64) {
        (Some(t), None) => Bytes::from(t.clone().into_bytes()),
        (None, Some(b)) => {
            use base64::Engine;
            Bytes::from(
                crate::source::redis_list::BODY_BASE64
                    .decode(b.trim_end_matches('='))
                    .ok()?,
            )
        }
        (None, None) => Bytes::new(),
        (Some(_), Some(_)) => return None,
    };
    Some(Letter {
        id: env.id,
        key: None,
        content_type: env.content_type,
        body,
        reason,
        raw: Some(Bytes::copy_from_slice(raw)),
    })
}

/// Every entry of a dead-letter list, oldest first (entries are pushed on the left).
async fn read_list(conn: &mut Conn, key: &str) -> Result<(Vec<Letter>, usize)> {
    let items: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    let mut letters = Vec::new();
    let mut unreadable = 0;
    for raw in items.iter().rev() {
        match parse_entry(raw) {
            Some(l) => letters.push(l),
            None => unreadable += 1,
        }
    }
    Ok((letters, unreadable))
}

/// Every message of a dead-letter topic, read from the start of each partition to its end
/// as of now (without a consumer group: nothing is committed).
async fn read_topic(kafka: &KafkaArgs, topic: &str) -> Result<Vec<Letter>> {
    let config = kafka.client_config("qp-replay")?;
    let topic = topic.to_owned();
    let read = move || -> Result<Vec<Letter>> {
        let kafka_err = |what: &str, e: rdkafka::error::KafkaError| {
            Error::Kafka(format!("{what} {topic}: {e}"))
        };
        let consumer: BaseConsumer = config
            .clone()
            .set("group.id", "qp-replay")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| kafka_err("reading", e))?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(&topic), timeout)
            .map_err(|e| kafka_err("metadata of", e))?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len() as i32)
            .unwrap_or(0);
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, timeout)
                .map_err(|e| kafka_err("watermarks of", e))?;
            if high > low {
                ends.insert(p, high);
                tpl.add_partition_offset(&topic, p, Offset::Offset(low))
                    .map_err(|e| kafka_err("assigning", e))?;
            }
        }
        consumer
            .assign(&tpl)
            .map_err(|e| kafka_err("assigning", e))?;
        let mut letters = Vec::new();
        while !ends.is_empty() {
            let Some(msg) = consumer.poll(timeout) else {
                return Err(Error::Kafka(format!(
                    "reading {topic}: no message for 10 s"
                )));
            };
            let msg = msg.map_err(|e| kafka_err("reading", e))?;
            let header = |name: &str| {
                msg.headers().and_then(|h| {
                    h.iter()
                        .find(|h: &Header<'_, &[u8]>| h.key == name)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
            };
            if let Some(id) = header("qp-id") {
                letters.push(Letter {
                    id,
                    key: msg.key().map(Bytes::copy_from_slice),
                    content_type: header("content-type"),
                    body: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
                    reason: header("qp-reason").unwrap_or_default(),
                    raw: None,
                });
            }
            if ends
                .get(&msg.partition())
                .is_some_and(|end| msg.offset() + 1 >= *end)
            {
                ends.remove(&msg.partition());
            }
        }
        Ok(letters)
    };
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| Error::Kafka(format!("reading dead letters: {e}")))?
}

/// Where replayed messages are queued: the QueueProcessor's source.
enum Queue {
    Kafka {
        producer: qp_protocol::kafka::KafkaProducer,
        topic: String,
    },
    RedisList {
        conn: Conn,
        key: String,
    },
    RedisStream {
        conn: Conn,
        key: String,
    },
}

impl Queue {
    fn new(args: &ReplayArgs, conn: Conn) -> Result<Queue> {
        Ok(match args.source {
            SourceKind::Kafka => Queue::Kafka {
                producer: crate::run::kafka_producer(&args.kafka)?,
                topic: args.kafka.topic()?.to_owned(),
            },
            SourceKind::RedisStream => Queue::RedisStream {
                conn,
                key: args.stream_key.clone().ok_or_else(|| {
                    Error::config(
                        "--stream-key (QP_STREAM_KEY) is required for --source redis-stream",
                    )
                })?,
            },
            SourceKind::RedisList => Queue::RedisList {
                conn,
                key: args.list_key.clone().ok_or_else(|| {
                    Error::config("--list-key (QP_LIST_KEY) is required for --source redis-list")
                })?,
            },
        })
    }

    async fn send(&self, letter: &Letter) -> Result<()> {
        match self {
            Queue::Kafka { producer, topic } => {
                let mut headers = OwnedHeaders::new().insert(Header {
                    key: "qp-id",
                    value: Some(letter.id.as_bytes()),
                });
                if let Some(ct) = &letter.content_type {
                    headers = headers.insert(Header {
                        key: "content-type",
                        value: Some(ct.as_bytes()),
                    });
                }
                let mut record = FutureRecord::to(topic)
                    .payload(letter.body.as_ref())
                    .headers(headers);
                if let Some(key) = &letter.key {
                    record = record.key(key.as_ref());
                }
                producer
                    .get()
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| Error::Kafka(format!("queueing {}: {e}", letter.id)))?;
            }
            Queue::RedisStream { conn, key } => {
                crate::source::redis_stream::add(
                    &mut conn.clone(),
                    key,
                    &letter.id,
                    letter.content_type.as_deref(),
                    &letter.body,
                )
                .await?;
            }
            Queue::RedisList { conn, key } => {
                let env = Envelope::new(&letter.id, letter.content_type.as_deref(), &letter.body);
                let _: i64 = redis::cmd("LPUSH")
                    .arg(key)
                    .arg(env.to_bytes())
                    .query_async(&mut conn.clone())
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str, reason: &str) -> Letter {
        Letter {
            id: id.into(),
            key: None,
            content_type: None,
            body: Bytes::from_static(b"x"),
            reason: reason.into(),
            raw: None,
        }
    }

    #[test]
    fn dead_letter_entries_parse_without_their_reason() {
        let entry = br#"{"id":"r1","contentType":"text/plain","body":"hi","reason":"boom"}"#;
        let l = parse_entry(entry).unwrap();
        assert_eq!((l.id.as_str(), l.reason.as_str()), ("r1", "boom"));
        assert_eq!(&l.body[..], b"hi");
        assert_eq!(l.content_type.as_deref(), Some("text/plain"));
        assert!(
            parse_entry(br#"{"id":"r1","body":"hi"}"#).is_none(),
            "no reason"
        );
        assert!(parse_entry(b"garbage").is_none());
        let bin = br#"{"id":"r2","bodyBase64":"//4=","reason":"r"}"#;
        assert_eq!(&parse_entry(bin).unwrap().body[..], b"\xff\xfe");
    }

    #[test]
    fn choosing_takes_the_newest_letter_of_an_id_and_reports_missing_ids() {
        let letters = vec![letter("a", "old"), letter("b", "b"), letter("a", "new")];
        let mut missing = Vec::new();
        let all = choose(letters.clone(), &[], true, &mut missing);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].reason, "new");
        let some = choose(letters, &["a".into(), "zz".into()], false, &mut missing);
        assert_eq!(some.len(), 1);
        assert_eq!(missing, vec!["zz".to_owned()]);
    }
}
