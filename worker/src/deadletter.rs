//! Where messages go when they cannot be processed: malformed, oversized, or still failing after
//! every retry. A dead letter keeps the original body and says why, so an operator can inspect,
//! fix and replay it. It is written *before* the message is acknowledged, so it is never lost.
//!
//! Targets: a Kafka topic (body as the value; `qp-id`, `qp-reason`, `content-type` headers) or a
//! Redis list (a JSON envelope with an extra `reason` field).

use std::time::Duration;

use qp_protocol::kafka::KafkaProducer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::Serialize;

use crate::source::Job;
use crate::source::redis_list::Envelope;
use crate::{Error, Result};
use qp_protocol::redis_conn::Conn;

#[derive(Clone)]
pub enum DeadLetter {
    Kafka {
        producer: KafkaProducer,
        topic: String,
    },
    RedisList {
        conn: Conn,
        key: String,
    },
}

/// The Redis-list form of a dead letter.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Entry<'a> {
    #[serde(flatten)]
    envelope: Envelope,
    reason: &'a str,
}

impl DeadLetter {
    pub fn describe(&self) -> String {
        match self {
            DeadLetter::Kafka { topic, .. } => format!("kafka topic {topic}"),
            DeadLetter::RedisList { key, .. } => format!("redis list {key}"),
        }
    }

    /// Write one dead letter. Returns once the target has it.
    pub async fn send(&self, job: &Job, reason: &str) -> Result<()> {
        match self {
            DeadLetter::Kafka { producer, topic } => {
                let mut headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "qp-id",
                        value: Some(job.id.as_bytes()),
                    })
                    .insert(Header {
                        key: "qp-reason",
                        value: Some(reason.as_bytes()),
                    });
                if let Some(ct) = &job.content_type {
                    headers = headers.insert(Header {
                        key: "content-type",
                        value: Some(ct.as_bytes()),
                    });
                }
                let mut record = FutureRecord::to(topic)
                    .payload(job.body.as_ref())
                    .headers(headers);
                if let Some(key) = &job.key {
                    record = record.key(key.as_ref());
                }
                producer
                    .get()
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| Error::Kafka(format!("dead letter to {topic}: {e}")))?;
                Ok(())
            }
            DeadLetter::RedisList { conn, key } => {
                let entry = Entry {
                    envelope: Envelope::new(&job.id, job.content_type.as_deref(), &job.body),
                    reason,
                };
                let bytes = serde_json::to_vec(&entry).expect("dead letter serializes");
                let _: i64 = redis::cmd("LPUSH")
                    .arg(key)
                    .arg(bytes)
                    .query_async(&mut conn.clone())
                    .await?;
                Ok(())
            }
        }
    }
}
