//! What one measuring round learned from a Kafka cluster, and the lag of one consumer group
//! computed from it. Pure: the round ([`super::round`]) fills [`Answers`], [`Answers::lag`]
//! reads them, and the rules live here with their tests.
//!
//! A partial answer is a failed measurement. A partition without a leader, a partition error
//! in ListOffsets or OffsetFetch, a group whose coordinator is moving: the topic's or group's
//! lag is then unknown, not the sum of the partitions that did answer. Counting a leaderless
//! partition as lag 0 made the backlog drop, and its return made the arrival estimate spike.

use std::collections::{BTreeMap, HashMap};

use qp_protocol::lag::{PartitionLag, needs_log_start, partition_lag};

/// Why part of an answer is missing.
pub type Why = String;

/// Offsets by (topic, partition).
pub type Offsets = HashMap<(String, i32), i64>;

/// Everything a round learned, for every topic and group it was asked about.
#[derive(Debug, Default, Clone)]
pub struct Answers {
    /// Log-end offset of every partition of a topic, or why it is not known.
    pub ends: HashMap<String, Result<BTreeMap<i32, i64>, Why>>,
    /// Known log-start offsets (only fetched where a group committed nothing, or something
    /// beyond the log end).
    pub starts: Offsets,
    /// A group's committed offsets by (topic, partition); a partition it never committed is
    /// absent.
    pub committed: HashMap<String, Result<Offsets, Why>>,
    /// A group's state (`Stable`, `PreparingRebalance`, ...), `None` for a group the
    /// coordinator does not know.
    pub states: HashMap<String, Result<Option<String>, Why>>,
}

/// One group's lag on one topic, and the group's state.
pub type GroupLag = (Vec<PartitionLag>, Option<String>);

impl Answers {
    /// Answers in which every pair in `wanted` failed for the same reason.
    pub fn failed(wanted: &[(String, String)], why: &str) -> Self {
        let mut a = Answers::default();
        for (t, g) in wanted {
            a.ends.insert(t.clone(), Err(why.to_owned()));
            a.committed.insert(g.clone(), Err(why.to_owned()));
            a.states.insert(g.clone(), Err(why.to_owned()));
        }
        a
    }

    /// Partitions of `topic` whose log start is needed for `group`'s lag and not known yet.
    pub fn missing_starts(&self, topic: &str, group: &str) -> Vec<i32> {
        let (Some(Ok(ends)), Some(Ok(committed))) =
            (self.ends.get(topic), self.committed.get(group))
        else {
            return Vec::new();
        };
        ends.iter()
            .filter(|&(&p, &end)| {
                let c = committed.get(&(topic.to_owned(), p)).copied();
                needs_log_start(end, c) && !self.starts.contains_key(&(topic.to_owned(), p))
            })
            .map(|(&p, _)| p)
            .collect()
    }

    /// `group`'s lag on `topic`, or why it is unknown.
    pub fn lag(&self, topic: &str, group: &str) -> Result<GroupLag, Why> {
        let ends = match self.ends.get(topic) {
            Some(Ok(e)) => e,
            Some(Err(why)) => return Err(why.clone()),
            None => return Err(format!("topic {topic} was not measured")),
        };
        let committed = match self.committed.get(group) {
            Some(Ok(c)) => c,
            Some(Err(why)) => return Err(why.clone()),
            None => return Err(format!("group {group} was not measured")),
        };
        let state = match self.states.get(group) {
            Some(Ok(s)) => s.clone(),
            Some(Err(why)) => return Err(why.clone()),
            None => return Err(format!("group {group} was not described")),
        };
        let mut lags = Vec::with_capacity(ends.len());
        for (&partition, &log_end) in ends {
            let key = (topic.to_owned(), partition);
            let c = committed.get(&key).copied();
            let log_start = if needs_log_start(log_end, c) {
                *self
                    .starts
                    .get(&key)
                    .ok_or_else(|| format!("log start of {topic}/{partition} is unknown"))?
            } else {
                0
            };
            lags.push(PartitionLag {
                partition,
                log_start,
                log_end,
                committed: c,
                lag: partition_lag(log_start, log_end, c),
            });
        }
        Ok((lags, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers() -> Answers {
        let mut a = Answers::default();
        a.ends.insert(
            "orders".into(),
            Ok(BTreeMap::from([(0, 100), (1, 50), (2, 10)])),
        );
        a.committed.insert(
            "g".into(),
            Ok(HashMap::from([
                (("orders".into(), 0), 90),
                // Beyond the log end: the topic was made again.
                (("orders".into(), 2), 400),
            ])),
        );
        a.states.insert("g".into(), Ok(Some("Stable".into())));
        a
    }

    #[test]
    fn lag_counts_from_the_commit_or_from_the_log_start() {
        let mut a = answers();
        assert_eq!(a.missing_starts("orders", "g"), vec![1, 2]);
        assert!(a.lag("orders", "g").unwrap_err().contains("log start"));
        a.starts.insert(("orders".into(), 1), 20);
        a.starts.insert(("orders".into(), 2), 0);
        assert!(a.missing_starts("orders", "g").is_empty());
        let (lags, state) = a.lag("orders", "g").unwrap();
        let by_partition: Vec<(i32, u64)> = lags.iter().map(|l| (l.partition, l.lag)).collect();
        assert_eq!(by_partition, vec![(0, 10), (1, 30), (2, 10)]);
        assert_eq!(state.as_deref(), Some("Stable"));
    }

    #[test]
    fn a_partial_answer_is_a_failed_measurement() {
        let mut a = answers();
        a.starts.insert(("orders".into(), 1), 0);
        a.starts.insert(("orders".into(), 2), 0);
        // A leaderless partition makes the whole topic unknown, not 0.
        a.ends.insert(
            "orders".into(),
            Err("partition orders/1 has no leader".into()),
        );
        assert!(a.lag("orders", "g").unwrap_err().contains("no leader"));
        let mut b = answers();
        b.committed
            .insert("g".into(), Err("coordinator moving".into()));
        assert_eq!(b.lag("orders", "g").unwrap_err(), "coordinator moving");
        let mut c = answers();
        c.states.remove("g");
        assert!(c.lag("orders", "g").is_err());
        assert!(answers().lag("payments", "g").is_err());
    }
}
