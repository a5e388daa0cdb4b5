//! Reading the scaling signals of `spec.scaling.signals` from the QueueProcessor's Redis: one
//! command per signal, all at once, each with a timeout. A missing key reads as zero (a counter
//! nobody has incremented yet); a key of the wrong type is an error that names the key, its type
//! and the type the signal needs, so the user sees what to fix instead of a Redis error code.

use std::time::Duration;

use futures::future::join_all;
use qp_protocol::redis_conn::Conn;
use redis::Value;

use crate::crd::{SignalKind, SignalSpec};
use crate::error::{Error, Result};

/// How long one signal's read may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One signal as read: the raw value (for `counterRate`, the counter's total).
#[derive(Debug, Clone)]
pub struct SignalReading {
    pub spec: SignalSpec,
    pub value: Result<f64, String>,
}

/// Read every signal, each from its Redis (`redis_of(i)`: the connection for signal `i`, or
/// why there is none); `now_unix_s` is "now" for `dueOnly` sorted sets.
pub async fn read<F, Fut>(specs: &[SignalSpec], redis_of: F, now_unix_s: f64) -> Vec<SignalReading>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Conn>>,
{
    join_all(specs.iter().enumerate().map(|(i, spec)| {
        let conn = redis_of(i);
        async move {
            let value = match conn.await {
                Err(e) => Err(e.to_string()),
                Ok(conn) => {
                    match tokio::time::timeout(READ_TIMEOUT, read_one(&conn, spec, now_unix_s))
                        .await
                    {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("reading key {} timed out", spec.key)),
                    }
                }
            };
            SignalReading {
                spec: spec.clone(),
                value,
            }
        }
    }))
    .await
}

async fn read_one(conn: &Conn, spec: &SignalSpec, now_unix_s: f64) -> Result<f64> {
    let mut c = conn.clone();
    let key = spec.key.as_str();
    let reply: redis::RedisResult<Value> = match spec.kind {
        SignalKind::Counter | SignalKind::CounterRate => {
            redis::cmd("GET").arg(key).query_async(&mut c).await
        }
        SignalKind::HashField => {
            redis::cmd("HGET")
                .arg(key)
                .arg(spec.field.as_deref().unwrap_or_default())
                .query_async(&mut c)
                .await
        }
        SignalKind::ListLength => redis::cmd("LLEN").arg(key).query_async(&mut c).await,
        SignalKind::SortedSetSize if spec.due_only => {
            redis::cmd("ZCOUNT")
                .arg(key)
                .arg("-inf")
                .arg(now_unix_s)
                .query_async(&mut c)
                .await
        }
        SignalKind::SortedSetSize => redis::cmd("ZCARD").arg(key).query_async(&mut c).await,
        SignalKind::SetSize => redis::cmd("SCARD").arg(key).query_async(&mut c).await,
        SignalKind::StreamLength => redis::cmd("XLEN").arg(key).query_async(&mut c).await,
        SignalKind::StreamLag | SignalKind::StreamPending => {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut c)
                .await
                .map_err(|e| Error::Redis(e.to_string()))?;
            if exists == 0 {
                return Ok(0.0);
            }
            redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(key)
                .query_async(&mut c)
                .await
        }
    };
    let reply = match reply {
        Ok(v) => v,
        Err(e) if e.code() == Some("WRONGTYPE") => {
            let actual: String = redis::cmd("TYPE")
                .arg(key)
                .query_async(&mut c)
                .await
                .unwrap_or_else(|_| "another type".into());
            return Err(Error::Signal(format!(
                "key {key} is a {actual}; a {} signal needs a {}",
                kind_name(spec.kind),
                spec.kind.redis_type()
            )));
        }
        Err(e) => return Err(Error::Redis(format!("reading key {key}: {e}"))),
    };
    match spec.kind {
        SignalKind::StreamLag | SignalKind::StreamPending => {
            group_figure(&reply, spec).map_err(Error::Signal)
        }
        _ => number(&reply).ok_or_else(|| {
            Error::Signal(format!(
                "key {key}{} does not hold a number",
                spec.field
                    .as_deref()
                    .map(|f| format!(" field {f}"))
                    .unwrap_or_default()
            ))
        }),
    }
}

/// A stream consumer group's backlog: entries not yet delivered (lag) plus entries delivered
/// and not acknowledged (pending), for the Redis Streams source. A missing stream is empty.
pub async fn stream_backlog(conn: &Conn, key: &str, group: &str) -> Result<u64> {
    let spec = |kind| SignalSpec {
        name: "source".into(),
        kind,
        key: key.to_owned(),
        field: None,
        group: Some(group.to_owned()),
        due_only: false,
        target_per_replica: 1,
        activation: 0,
        redis: None,
    };
    let lag = read_one(conn, &spec(SignalKind::StreamLag), 0.0).await?;
    let pending = read_one(conn, &spec(SignalKind::StreamPending), 0.0).await?;
    Ok((lag + pending).max(0.0) as u64)
}

/// A reply as a number: an integer, a numeric string, or nothing (a missing key: zero).
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Nil => Some(0.0),
        Value::Int(i) => Some(*i as f64),
        Value::Double(d) => Some(*d),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
        Value::SimpleString(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The consumer group's `lag` or `pending` from an `XINFO GROUPS` reply (a list of flat
/// field/value lists, or of maps with RESP3).
fn group_figure(reply: &Value, spec: &SignalSpec) -> std::result::Result<f64, String> {
    let group = spec.group.as_deref().unwrap_or_default();
    let field = if spec.kind == SignalKind::StreamLag {
        "lag"
    } else {
        "pending"
    };
    let Value::Array(groups) = reply else {
        return Err(format!("unexpected XINFO GROUPS reply for {}", spec.key));
    };
    for g in groups {
        let pairs: Vec<(&Value, &Value)> = match g {
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|p| Some((p.first()?, p.get(1)?)))
                .collect(),
            Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
            _ => continue,
        };
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| text(k).as_deref() == Some(name))
                .map(|(_, v)| *v)
        };
        if get("name").and_then(text).as_deref() != Some(group) {
            continue;
        }
        return match get(field) {
            // Redis answers a nil lag when it cannot compute it (entries deleted past the
            // group's position): the entries not yet read are then unknown, not zero.
            Some(Value::Nil) => Err(format!(
                "Redis cannot compute the lag of group {group} on {} (entries were deleted)",
                spec.key
            )),
            Some(v) => number(v).ok_or_else(|| format!("unexpected {field} of group {group}")),
            None => Err(format!(
                "this Redis reports no {field} for stream groups (Redis 7 or later is needed)"
            )),
        };
    }
    Err(format!("stream {} has no consumer group {group}", spec.key))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The kind as the spec spells it.
fn kind_name(kind: SignalKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: SignalKind, group: Option<&str>) -> SignalSpec {
        SignalSpec {
            name: "s".into(),
            kind,
            key: "k".into(),
            field: None,
            group: group.map(str::to_owned),
            due_only: false,
            target_per_replica: 10,
            activation: 0,
            redis: None,
        }
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn numbers_and_missing_keys() {
        assert_eq!(number(&Value::Nil), Some(0.0));
        assert_eq!(number(&Value::Int(7)), Some(7.0));
        assert_eq!(number(&bulk(" 12.5 ")), Some(12.5));
        assert_eq!(number(&bulk("abc")), None);
    }

    #[test]
    fn a_group_figure_is_found_by_name() {
        let group = |name: &str, lag: Value, pending: i64| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("pending"),
                Value::Int(pending),
                bulk("lag"),
                lag,
            ])
        };
        let reply = Value::Array(vec![
            group("other", Value::Int(99), 1),
            group("workers", Value::Int(40), 3),
        ]);
        let lag = spec(SignalKind::StreamLag, Some("workers"));
        let pending = spec(SignalKind::StreamPending, Some("workers"));
        assert_eq!(group_figure(&reply, &lag), Ok(40.0));
        assert_eq!(group_figure(&reply, &pending), Ok(3.0));
        let missing = spec(SignalKind::StreamLag, Some("nobody"));
        assert!(
            group_figure(&reply, &missing)
                .unwrap_err()
                .contains("no consumer group nobody")
        );
        let unknown = Value::Array(vec![group("workers", Value::Nil, 0)]);
        assert!(
            group_figure(&unknown, &lag)
                .unwrap_err()
                .contains("cannot compute")
        );
    }

    #[test]
    fn kinds_are_named_as_in_the_spec() {
        assert_eq!(kind_name(SignalKind::HashField), "hashField");
        assert_eq!(kind_name(SignalKind::CounterRate), "counterRate");
    }
}
