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
//! - one ListOffsets per partition leader for the log end and one for the log start
//!   (`offsets_for_times` with the "latest" / "earliest" sentinel timestamps).
//!
//! `fetch_watermarks` would cost a request per partition, so it is not used. All calls block:
//! run them on a blocking thread.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::KafkaArgs;
use crate::{Error, Result};

/// librdkafka's sentinel timestamps for ListOffsets.
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

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

/// A reusable lag probe for one (topic, group).
pub struct GroupLag {
    consumer: BaseConsumer,
    topic: String,
    timeout: Duration,
}

impl GroupLag {
    pub fn new(kafka: &KafkaArgs, topic: &str, group: &str) -> Result<Self> {
        Self::with_properties(
            kafka.bootstrap()?,
            &kafka.security_properties(),
            topic,
            group,
        )
    }

    pub fn with_properties(
        bootstrap: &str,
        properties: &[(String, String)],
        topic: &str,
        group: &str,
    ) -> Result<Self> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("client.id", "qp-lag")
            .set("enable.auto.commit", "false")
            .set("socket.timeout.ms", "5000");
        for (k, v) in properties {
            config.set(k, v);
        }
        let consumer: BaseConsumer = config
            .create()
            .map_err(|e| Error::Kafka(format!("creating lag consumer: {e}")))?;
        Ok(GroupLag {
            consumer,
            topic: topic.to_owned(),
            timeout: Duration::from_secs(5),
        })
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

    fn list_offsets(&self, n: i32, sentinel: i64) -> Result<Vec<i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(sentinel))
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
        let starts = self.list_offsets(n, EARLIEST)?;
        let mut lags: Vec<PartitionLag> = (0..n)
            .map(|p| PartitionLag {
                partition: p,
                log_start: starts[p as usize],
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

/// The lag rule, pure: from the committed offset, or from the log start when nothing (or
/// something older than the log start) was committed.
pub fn partition_lag(log_start: i64, log_end: i64, committed: Option<i64>) -> u64 {
    let from = committed.map_or(log_start, |c| c.max(log_start));
    (log_end - from).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::partition_lag;

    #[test]
    fn lag_rules() {
        assert_eq!(partition_lag(0, 100, Some(40)), 60);
        assert_eq!(partition_lag(0, 100, None), 100);
        // Retention removed offsets 0..90: an uncommitted group is 10 behind, not 100.
        assert_eq!(partition_lag(90, 100, None), 10);
        assert_eq!(partition_lag(90, 100, Some(5)), 10);
        assert_eq!(partition_lag(0, 100, Some(100)), 0);
        assert_eq!(partition_lag(0, 100, Some(120)), 0);
    }
}
