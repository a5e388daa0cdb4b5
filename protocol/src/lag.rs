//! Kafka consumer-group lag, measured cheaply.
//!
//! Lag of a partition = log-end offset - committed offset. A partition the group never
//! committed counts from its log-start offset, not from zero: after retention deleted old
//! segments, "from zero" would report millions of messages that no longer exist (a known KEDA
//! complaint).
//!
//! Cost per measurement, whatever the partition count (rdkafka 0.39 has no admin call for
//! group offsets or list-offsets, so the consumer API is used):
//! - one metadata request (partition count; librdkafka caches it),
//! - one OffsetFetch for the group (`committed_offsets` on a consumer that carries the group id
//!   but never subscribes, so it never joins or disturbs the group),
//! - one ListOffsets per partition leader for the log end (`offsets_for_times` with the
//!   "latest" sentinel timestamp), and one more for the log start ("earliest") only when some
//!   partition has no committed offset;
//! - for [`GroupLag::group_state`], the group listing (rebalancing or stable).
//!
//! `fetch_watermarks` would cost a request per partition, so it is not used. All calls block:
//! run them on a blocking thread. Requests actually sent are counted from librdkafka's
//! statistics ([`GroupLag::requests_sent`]), which is how the benchmark proves the cost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::kafka::{KafkaArgs, Refusal, client_config};
use crate::{Error, Result};

/// librdkafka's sentinel timestamps for ListOffsets.
const LATEST: Offset = Offset::End;
const EARLIEST: Offset = Offset::Beginning;

/// Lag of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    pub log_start: i64,
    pub log_end: i64,
    /// `None` when the group never committed this partition.
    pub committed: Option<i64>,
    pub lag: u64,
}

/// Counts requests sent to brokers, from librdkafka's periodic statistics, and remembers
/// whether the brokers refuse the client.
#[derive(Default)]
struct Counting {
    tx: Arc<AtomicU64>,
    refusal: Refusal,
}

impl ClientContext for Counting {
    fn stats(&self, stats: Statistics) {
        let tx: u64 = stats.brokers.values().map(|b| b.tx).sum();
        self.tx.store(tx, Ordering::Relaxed);
        self.refusal.stats(&stats);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !self.refusal.error(&error, reason) {
            tracing::debug!(target: "librdkafka", %error, reason, "lag client error");
        }
    }
}

impl ConsumerContext for Counting {}

/// A reusable lag probe for one (topic, group).
pub struct GroupLag {
    consumer: BaseConsumer<Counting>,
    tx: Arc<AtomicU64>,
    refusal: Refusal,
    group: String,
    topic: String,
    timeout: Duration,
}

impl GroupLag {
    pub fn with_properties(
        bootstrap: &str,
        properties: &[(String, String)],
        topic: &str,
        group: &str,
    ) -> Result<Self> {
        let mut config = client_config(bootstrap, "qp-lag", properties);
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("socket.timeout.ms", "5000")
            .set("statistics.interval.ms", "1000");
        let context = Counting::default();
        let tx = context.tx.clone();
        let refusal = context.refusal.clone();
        let consumer: BaseConsumer<Counting> = config
            .create_with_context(context)
            .map_err(|e| Error::Kafka(format!("creating lag consumer: {e}")))?;
        Ok(GroupLag {
            consumer,
            tx,
            refusal,
            group: group.to_owned(),
            topic: topic.to_owned(),
            timeout: Duration::from_secs(5),
        })
    }

    /// Requests sent to brokers so far, as of librdkafka's last statistics report (every
    /// second; statistics are only delivered while the client is polled, which every call
    /// here does).
    pub fn requests_sent(&self) -> u64 {
        self.serve_events();
        self.tx.load(Ordering::Relaxed)
    }

    /// Why the brokers refuse this client, if they do (SASL or TLS; see [`Refusal`]). Serves
    /// the events queued meanwhile: librdkafka reports the refusal as an event, while the
    /// blocking call that met it only times out.
    pub fn refusal(&self) -> Option<String> {
        self.serve_events();
        self.refusal.reason()
    }

    fn serve_events(&self) {
        // Each poll serves one queued event; drain what accumulated since the last call (the
        // synchronous calls above do not serve the queue). The consumer never subscribes, so
        // no message can be consumed here.
        // rdkafka does not say whether an event was served, so poll a bounded number of times
        // (an empty queue answers a zero-timeout poll at once).
        for _ in 0..256 {
            self.consumer.poll(Duration::ZERO);
        }
    }

    /// The group's state as the coordinator reports it (`Stable`, `PreparingRebalance`,
    /// `CompletingRebalance`, `Empty`, `Dead`); `None` if the group is unknown.
    pub fn group_state(&self) -> Result<Option<String>> {
        let list = self
            .consumer
            .fetch_group_list(Some(&self.group), self.timeout)
            .map_err(|e| Error::Kafka(format!("describing group {}: {e}", self.group)))?;
        Ok(list
            .groups()
            .iter()
            .find(|g| g.name() == self.group)
            .map(|g| g.state().to_owned()))
    }

    /// Number of partitions of the topic.
    pub fn partitions(&self) -> Result<i32> {
        let md = self
            .consumer
            .fetch_metadata(Some(&self.topic), self.timeout)
            .map_err(|e| Error::Kafka(format!("metadata for {}: {e}", self.topic)))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| Error::Kafka(format!("topic {} not found", self.topic)))?;
        if let Some(e) = t.error() {
            return Err(Error::Kafka(format!("topic {}: {e:?}", self.topic)));
        }
        Ok(t.partitions().len() as i32)
    }

    fn list_offsets(&self, n: i32, sentinel: Offset) -> Result<Vec<i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition_offset(&self.topic, p, sentinel)
                .map_err(|e| Error::Kafka(e.to_string()))?;
        }
        let out = self
            .consumer
            .offsets_for_times(tpl, self.timeout)
            .map_err(|e| Error::Kafka(format!("list offsets of {}: {e}", self.topic)))?;
        let mut offsets = vec![0; n as usize];
        for e in out.elements() {
            if let Offset::Offset(o) = e.offset() {
                offsets[e.partition() as usize] = o;
            }
        }
        Ok(offsets)
    }

    /// Lag of every partition.
    pub fn measure(&self) -> Result<Vec<PartitionLag>> {
        let n = self.partitions()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, self.timeout)
            .map_err(|e| Error::Kafka(format!("committed offsets: {e}")))?;
        let ends = self.list_offsets(n, LATEST)?;
        let mut lags: Vec<PartitionLag> = (0..n)
            .map(|p| PartitionLag {
                partition: p,
                log_start: 0,
                log_end: ends[p as usize],
                committed: None,
                lag: 0,
            })
            .collect();
        for e in committed.elements() {
            if let Offset::Offset(o) = e.offset()
                && let Some(l) = lags.get_mut(e.partition() as usize)
            {
                l.committed = Some(o);
            }
        }
        // Log starts matter only where nothing was committed: fetch them only then.
        if lags.iter().any(|l| needs_log_start(l.log_end, l.committed)) {
            let starts = self.list_offsets(n, EARLIEST)?;
            for l in &mut lags {
                l.log_start = starts[l.partition as usize];
            }
        }
        for l in &mut lags {
            l.lag = partition_lag(l.log_start, l.log_end, l.committed);
        }
        Ok(lags)
    }

    /// Total lag over all partitions.
    pub fn total(&self) -> Result<u64> {
        Ok(self.measure()?.iter().map(|l| l.lag).sum())
    }
}

/// A lag probe that replaces its Kafka client after any failure.
///
/// Why: a librdkafka client that lived through a broker restart can keep failing every
/// metadata request with `BrokerTransportFailure` long after the broker is back (seen in about
/// half of the restarts in `tests/tests/operator_kafka_down.rs`, for 25 s and more), while a new
/// client answers at once. The likely cause is [`crate::kafka::BrokerLoss`]: a fenced broker
/// answered a metadata request with no broker and the client lost them all. A lag client holds
/// no group membership, so building a new one is cheap: the failed one is dropped and the next
/// call starts afresh. The client is also built lazily, so a broker that is down when the probe
/// is made does not make the probe useless.
///
/// Every method blocks (librdkafka calls, and dropping a client): call from a blocking thread.
pub struct LagProbe {
    bootstrap: String,
    properties: Vec<(String, String)>,
    topic: String,
    group: String,
    client: Mutex<Option<Arc<GroupLag>>>,
    /// Requests sent by clients that were dropped, so the count never goes backwards.
    retired_requests: AtomicU64,
    rebuilt: AtomicU64,
}

impl LagProbe {
    pub fn new(bootstrap: &str, properties: &[(String, String)], topic: &str, group: &str) -> Self {
        LagProbe {
            bootstrap: bootstrap.to_owned(),
            properties: properties.to_vec(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            client: Mutex::new(None),
            retired_requests: AtomicU64::new(0),
            rebuilt: AtomicU64::new(0),
        }
    }

    pub fn from_args(kafka: &KafkaArgs, topic: &str, group: &str) -> Result<Self> {
        Ok(Self::new(
            kafka.bootstrap()?,
            &kafka.security_properties(),
            topic,
            group,
        ))
    }

    /// Run `f` with the current client (built if there is none); after an error the client is
    /// dropped so the next call builds a new one.
    pub fn with<T>(&self, f: impl FnOnce(&GroupLag) -> Result<T>) -> Result<T> {
        let client = {
            let mut slot = self.client.lock().expect("lag client lock");
            match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(GroupLag::with_properties(
                        &self.bootstrap,
                        &self.properties,
                        &self.topic,
                        &self.group,
                    )?);
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        let mut out = f(&client);
        if out.is_err() {
            // A refusal says what to fix; the timeout it caused does not.
            if let Some(reason) = client.refusal() {
                out = Err(Error::KafkaRefused(reason));
            }
            let mut slot = self.client.lock().expect("lag client lock");
            // Only retire the client that failed: a concurrent call may have replaced it.
            if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, &client)) {
                *slot = None;
                self.retired_requests
                    .fetch_add(client.requests_sent(), Ordering::Relaxed);
                self.rebuilt.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The last reference, if it was retired, is dropped here, on the caller's thread.
        drop(client);
        out
    }

    /// Lag of every partition and the group's state.
    pub fn measure_with_state(&self) -> Result<(Vec<PartitionLag>, Option<String>)> {
        self.with(|c| Ok((c.measure()?, c.group_state()?)))
    }

    /// Total lag over all partitions.
    pub fn total(&self) -> Result<u64> {
        self.with(GroupLag::total)
    }

    /// Requests sent to brokers by this probe's clients so far.
    pub fn requests_sent(&self) -> u64 {
        let current = self
            .client
            .lock()
            .expect("lag client lock")
            .as_ref()
            .map_or(0, |c| c.requests_sent());
        self.retired_requests.load(Ordering::Relaxed) + current
    }

    /// How many times a failed client was replaced.
    pub fn clients_replaced(&self) -> u64 {
        self.rebuilt.load(Ordering::Relaxed)
    }
}

/// The lag rule, pure: from the committed offset, or from the log start when nothing was
/// committed, something older than the log start was (retention deleted it), or something
/// beyond the log end was (the topic was deleted and made again: the group's offsets belong to
/// the old log, and its consumers will reset to the start).
pub fn partition_lag(log_start: i64, log_end: i64, committed: Option<i64>) -> u64 {
    let from = match committed {
        Some(c) if c <= log_end => c.max(log_start),
        _ => log_start,
    };
    (log_end - from).max(0) as u64
}

/// Whether [`partition_lag`] needs the log start for this partition.
pub fn needs_log_start(log_end: i64, committed: Option<i64>) -> bool {
    committed.is_none_or(|c| c > log_end)
}

#[cfg(test)]
mod tests {
    use super::{needs_log_start, partition_lag};

    #[test]
    fn lag_rules() {
        assert_eq!(partition_lag(0, 100, Some(40)), 60);
        assert_eq!(partition_lag(0, 100, None), 100);
        // Retention removed offsets 0..90: an uncommitted group is 10 behind, not 100.
        assert_eq!(partition_lag(90, 100, None), 10);
        assert_eq!(partition_lag(90, 100, Some(5)), 10);
        assert_eq!(partition_lag(0, 100, Some(100)), 0);
        // Committed beyond the log end: the topic was made again; count from its start.
        assert_eq!(partition_lag(0, 100, Some(120)), 100);
        assert_eq!(partition_lag(40, 100, Some(120)), 60);
        assert!(needs_log_start(100, None) && needs_log_start(100, Some(101)));
        assert!(!needs_log_start(100, Some(100)));
    }
}
