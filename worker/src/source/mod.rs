//! Where messages come from: a Kafka consumer group, a Redis list or a Redis stream.
//!
//! Both sources hand the engine [`Job`]s and take back acknowledgements. A source only forgets a
//! message (commits its offset, removes it from the processing list) after the engine
//! acknowledged it, and the engine only acknowledges after the result or dead letter is in Redis:
//! that ordering is the whole of at-least-once.

pub mod kafka;
pub mod redis_list;
pub mod redis_stream;

use bytes::Bytes;

/// One message to process.
#[derive(Debug, Clone)]
pub struct Job {
    /// Request id: the key of the result in Redis. From the `qp-id` header (Kafka) or the
    /// envelope (Redis list); derived from the message position when absent.
    pub id: String,
    /// Ordering key: with ordering enabled, jobs with the same key run one at a time, in order.
    pub key: Option<Bytes>,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// Set when the source could not make sense of the message (reason); such jobs go straight
    /// to the dead letter instead of the handler.
    pub malformed: Option<String>,
    pub origin: Origin,
}

/// Where a job came from, so that its acknowledgement finds its way back.
#[derive(Debug, Clone)]
pub enum Origin {
    Kafka { partition: i32, offset: i64 },
    RedisList { raw: Bytes },
    RedisStream { entry: String },
}

/// Valid request ids: short, printable, no spaces or key separators that could escape the
/// QueueProcessor's key space. Anything else is replaced by a derived id.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A JSON body that does not parse is malformed; other content types are opaque bytes.
pub fn check_content(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    let json = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if json && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Some(format!("malformed: body is not valid JSON ({e})"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("0192f3a4-7b1c-7d2e-8f90-123456789abc"));
        assert!(valid_id("orders-3-1234"));
        assert!(!valid_id(""));
        assert!(!valid_id("has space"));
        assert!(!valid_id("a}b"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[test]
    fn json_content_is_checked() {
        assert_eq!(check_content(Some("application/json"), br#"{"a":1}"#), None);
        assert!(check_content(Some("application/json; charset=utf-8"), b"{nope").is_some());
        assert_eq!(check_content(Some("text/plain"), b"{nope"), None);
        assert_eq!(check_content(None, b"\xff\x00"), None);
    }
}
