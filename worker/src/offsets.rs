//! Which Kafka offset is safe to commit when messages of one partition finish out of order.
//!
//! Kafka's committed offset is a single number per partition: "everything below this is done".
//! A worker that processes many messages of one partition at once (concurrency beyond the
//! partition count) finishes them in any order, so it may only commit the *low watermark*: the
//! smallest offset that was fetched but is not finished yet. Everything below it is complete;
//! anything at or above it is redelivered after a crash or rebalance and deduplicated by the
//! result store.
//!
//! This module is pure bookkeeping (no I/O) so the rule is unit-tested on its own.

use std::collections::{BTreeMap, HashMap};

/// Lifecycle of one fetched offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Fetched from Kafka, waiting for a permit.
    Queued,
    /// A handler is working on it.
    Started,
}

/// Pending offsets of one partition, in offset order.
#[derive(Debug, Default)]
pub struct PartitionOffsets {
    pending: BTreeMap<i64, Stage>,
    /// One past the highest offset ever fetched: the commit point when nothing is pending.
    next_fetch: Option<i64>,
    /// The last offset handed to the consumer's offset store, to avoid storing it twice.
    last_stored: Option<i64>,
    started: usize,
}

impl PartitionOffsets {
    /// A message at `offset` was fetched.
    pub fn fetched(&mut self, offset: i64) {
        self.pending.insert(offset, Stage::Queued);
        self.next_fetch = Some(self.next_fetch.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Work on `offset` began. Returns false if the offset is unknown (e.g. the partition was
    /// revoked and reassigned meanwhile), in which case the caller must not process it.
    pub fn started(&mut self, offset: i64) -> bool {
        match self.pending.get_mut(&offset) {
            Some(stage @ Stage::Queued) => {
                *stage = Stage::Started;
                self.started += 1;
                true
            }
            _ => false,
        }
    }

    /// Work on `offset` stopped without an outcome (its task was aborted at the drain timeout,
    /// or failed unexpectedly): it is no longer running, so nobody waits for it, but it stays
    /// pending, so the commit stays below it and it is delivered again.
    pub fn abandoned(&mut self, offset: i64) {
        if let Some(stage @ Stage::Started) = self.pending.get_mut(&offset) {
            *stage = Stage::Queued;
            self.started -= 1;
        }
    }

    /// Work on `offset` is finished (a result or a dead letter was written).
    pub fn completed(&mut self, offset: i64) {
        if self.pending.remove(&offset) == Some(Stage::Started) {
            self.started -= 1;
        }
    }

    /// The next offset to commit: the smallest pending offset, or one past the highest fetched
    /// offset when nothing is pending. `None` before anything was fetched.
    pub fn low_watermark(&self) -> Option<i64> {
        self.pending.keys().next().copied().or(self.next_fetch)
    }

    /// The low watermark if it moved since the last call; records it as stored.
    pub fn take_storable(&mut self) -> Option<i64> {
        let mark = self.low_watermark()?;
        if self.last_stored == Some(mark) {
            return None;
        }
        self.last_stored = Some(mark);
        Some(mark)
    }

    /// Fetched but not finished (queued or started).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Started but not finished.
    pub fn in_progress(&self) -> usize {
        self.started
    }
}

/// Offsets of every partition this consumer owns, keyed by partition number (one topic).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
}

impl OffsetTracker {
    pub fn partition(&mut self, partition: i32) -> &mut PartitionOffsets {
        self.partitions.entry(partition).or_default()
    }

    pub fn get(&self, partition: i32) -> Option<&PartitionOffsets> {
        self.partitions.get(&partition)
    }

    /// Forget a partition that was revoked; returns its state for a final commit.
    pub fn remove(&mut self, partition: i32) -> Option<PartitionOffsets> {
        self.partitions.remove(&partition)
    }

    pub fn total_pending(&self) -> usize {
        self.partitions
            .values()
            .map(PartitionOffsets::pending)
            .sum()
    }

    pub fn partitions(&self) -> impl Iterator<Item = (i32, &PartitionOffsets)> {
        self.partitions.iter().map(|(p, o)| (*p, o))
    }

    /// Low watermarks that moved since they were last stored, ready for the offset store: of
    /// the given partitions only, or of all when `None`. A partition not asked for keeps its
    /// moved mark for the next call (taking it here would mean it is never stored).
    pub fn take_storable(&mut self, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter_mut()
            .filter(|(p, _)| only.is_none_or(|ps| ps.contains(p)))
            .filter_map(|(p, o)| o.take_storable().map(|m| (*p, m)))
            .collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(p: &mut PartitionOffsets, offsets: impl IntoIterator<Item = i64>) {
        for o in offsets {
            p.fetched(o);
        }
    }

    #[test]
    fn nothing_fetched_means_nothing_to_commit() {
        let p = PartitionOffsets::default();
        assert_eq!(p.low_watermark(), None);
    }

    #[test]
    fn in_order_completion_commits_one_past_the_last() {
        let mut p = PartitionOffsets::default();
        fetched(&mut p, 10..13);
        for o in 10..13 {
            assert!(p.started(o));
            p.completed(o);
        }
        assert_eq!(p.low_watermark(), Some(13));
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn out_of_order_completion_holds_the_watermark_at_the_oldest_unfinished() {
        let mut p = PartitionOffsets::default();
        fetched(&mut p, 0..5);
        for o in 0..5 {
            p.started(o);
        }
        for o in [4, 3, 1] {
            p.completed(o);
        }
        assert_eq!(p.low_watermark(), Some(0), "offset 0 is still running");
        p.completed(0);
        assert_eq!(p.low_watermark(), Some(2), "0 and 1 done, 2 running");
        p.completed(2);
        assert_eq!(p.low_watermark(), Some(5));
    }

    #[test]
    fn queued_messages_hold_the_watermark_too() {
        // A revoked partition commits below messages that were fetched but never started, so the
        // next owner processes them.
        let mut p = PartitionOffsets::default();
        fetched(&mut p, 0..4);
        p.started(0);
        p.completed(0);
        assert_eq!(p.low_watermark(), Some(1));
        assert_eq!(p.in_progress(), 0);
        assert_eq!(p.pending(), 3);
    }

    #[test]
    fn unknown_offsets_are_not_started() {
        let mut p = PartitionOffsets::default();
        fetched(&mut p, [7]);
        assert!(!p.started(8));
        assert!(p.started(7));
        assert!(!p.started(7), "a message starts once");
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave gaps between offsets.
        let mut p = PartitionOffsets::default();
        fetched(&mut p, [3, 9, 20]);
        for o in [3, 9, 20] {
            p.started(o);
        }
        p.completed(9);
        assert_eq!(p.low_watermark(), Some(3));
        p.completed(3);
        assert_eq!(p.low_watermark(), Some(20));
        p.completed(20);
        assert_eq!(p.low_watermark(), Some(21));
    }

    #[test]
    fn storable_marks_are_reported_once() {
        let mut t = OffsetTracker::default();
        t.partition(0).fetched(0);
        t.partition(1).fetched(5);
        assert_eq!(t.take_storable(None), vec![(0, 0), (1, 5)]);
        assert_eq!(t.take_storable(None), vec![]);
        t.partition(1).started(5);
        t.partition(1).completed(5);
        assert_eq!(t.take_storable(None), vec![(1, 6)]);
        assert_eq!(t.total_pending(), 1);
    }

    #[test]
    fn storing_some_partitions_keeps_the_others_marks() {
        // A revocation stores the revoked partitions only; a retained partition whose last
        // message finished meanwhile must still be stored later.
        let mut t = OffsetTracker::default();
        t.partition(0).fetched(0);
        t.partition(1).fetched(7);
        assert_eq!(t.take_storable(None), vec![(0, 0), (1, 7)]);
        for (p, o) in [(0, 0), (1, 7)] {
            t.partition(p).started(o);
            t.partition(p).completed(o);
        }
        assert_eq!(t.take_storable(Some(&[0])), vec![(0, 1)]);
        assert_eq!(t.take_storable(None), vec![(1, 8)]);
    }

    #[test]
    fn an_abandoned_offset_stops_running_but_is_not_committed() {
        let mut p = PartitionOffsets::default();
        fetched(&mut p, 0..2);
        p.started(0);
        p.started(1);
        p.completed(1);
        p.abandoned(0);
        assert_eq!(p.in_progress(), 0, "nothing for a drain to wait for");
        assert_eq!(p.low_watermark(), Some(0), "delivered again");
        p.abandoned(0);
        assert_eq!(p.in_progress(), 0, "abandoning twice changes nothing");
    }
}
