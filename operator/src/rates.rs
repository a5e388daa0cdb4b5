//! Rates from cumulative counters, and the capacity of one replica.
//!
//! The scaling policy sizes a workload from two rates: how fast messages arrive (the sum of a
//! topic's log-end offsets, or a Redis counter of pushes, sampled every poll) and how fast one
//! busy replica processes them (the workers' processed counter divided among the ready
//! replicas). Both are derived here from timestamped samples of counters that only grow, and,
//! like [`policy`](crate::policy), this module is pure: the caller passes the time in
//! milliseconds from a monotonic origin.
//!
//! Counters do not always behave:
//!
//! * **Resets.** A Redis counter key that is deleted or expires, a topic that is recreated, a
//!   partition's offsets that are truncated: the total goes down. A naive difference would be
//!   a huge unsigned wrap-around or a negative rate. A decrease instead starts a new baseline
//!   and keeps the previous estimate until the next interval.
//! * **Gaps.** Polls are not evenly spaced (a slow source, a restart, leader election). The
//!   smoothing weight is computed from the actual interval, `1 - exp(-dt / time_constant)`, so
//!   a long interval counts for more than a short one and uneven spacing does not bias the
//!   estimate. A gap longer than `max_gap_ms` makes the old estimate stale: it is dropped, and
//!   the next interval starts afresh.
//! * **Silence.** An exponential average of zeros never reaches zero, and a rate of 10⁻⁹
//!   messages per second would keep one replica alive forever under rate-based sizing. Once the
//!   counter stops moving and the estimate falls below [`MIN_RATE`], it is exactly zero.

/// Rates below this many messages per second, on a counter that did not move, are reported
/// as zero (one message every 100 seconds is no traffic to size a workload for).
pub const MIN_RATE: f64 = 0.01;

/// An exponentially smoothed rate (per second) of a cumulative counter.
#[derive(Clone, Debug, PartialEq)]
pub struct RateEstimator {
    time_constant_ms: u64,
    max_gap_ms: u64,
    /// The previous sample: `(time, total)`.
    last: Option<(u64, u64)>,
    rate: Option<f64>,
}

impl RateEstimator {
    /// An estimator that forgets with time constant `time_constant_ms` (0: no smoothing, each
    /// interval's rate replaces the estimate) and drops its estimate after an interval longer
    /// than `max_gap_ms`.
    pub fn new(time_constant_ms: u64, max_gap_ms: u64) -> Self {
        RateEstimator {
            time_constant_ms,
            max_gap_ms,
            last: None,
            rate: None,
        }
    }

    /// Feeds the counter's `total` at `now_ms` and returns the smoothed rate in units per
    /// second, or `None` until two samples an interval apart have been seen.
    ///
    /// A sample at or before the previous time is ignored (unless the counter went down, which
    /// resets the baseline); a decrease of the counter starts a new baseline and keeps the
    /// estimate; an interval longer than `max_gap_ms` starts a new baseline and drops it.
    pub fn observe(&mut self, now_ms: u64, total: u64) -> Option<f64> {
        let Some((then, before)) = self.last else {
            self.last = Some((now_ms, total));
            return self.rate;
        };
        if total < before {
            self.last = Some((now_ms, total));
            return self.rate;
        }
        if now_ms <= then {
            return self.rate;
        }
        self.last = Some((now_ms, total));
        let dt_ms = now_ms - then;
        if dt_ms > self.max_gap_ms {
            self.rate = None;
            return None;
        }
        let delta = total - before;
        let instant = delta as f64 * 1000.0 / dt_ms as f64;
        let mut rate = match self.rate {
            None => instant,
            Some(_) if self.time_constant_ms == 0 => instant,
            Some(previous) => {
                let weight = 1.0 - (-(dt_ms as f64) / self.time_constant_ms as f64).exp();
                previous + weight * (instant - previous)
            }
        };
        if delta == 0 && rate < MIN_RATE {
            rate = 0.0;
        }
        self.rate = Some(rate);
        self.rate
    }

    /// The current estimate, without a new sample.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Forgets everything (for example when the source changed).
    pub fn reset(&mut self) {
        self.last = None;
        self.rate = None;
    }
}

/// Whether the replicas were working at full capacity when a processing rate was measured:
/// every token of the pool was in use and more messages were waiting.
///
/// A backlog alone is not enough. Kafka lag counts the messages in flight and those processed
/// but not yet committed, so a workload that keeps up easily still shows some lag; taking its
/// processing rate (which is then just the arrival rate) for its capacity underestimates a
/// replica, which makes the rate-based sizing add replicas, which lowers the measured rate per
/// replica further, and so on up to the maximum. With every token busy, the processing rate
/// is what the replicas can do at the concurrency they are allowed.
pub fn saturated(backlog: u64, tokens_in_use: u64, token_limit: u32) -> bool {
    backlog > 0 && token_limit > 0 && tokens_in_use >= u64::from(token_limit)
}

/// An estimate of how many messages per second one busy replica processes.
///
/// It learns only from saturated intervals (see [`saturated`]): a replica idling on an empty
/// queue processes what arrives, which says nothing about what it could do. In between, the
/// last good estimate stands. It also waits until the ready replica count has been unchanged
/// for `settle_ms`, because the smoothed processing rate still reflects the old count for a
/// while after a change (and fresh replicas spend their first seconds joining the group):
/// dividing it by the new count would underestimate a replica right after every scale-up.
/// Choose `settle_ms` at least three time constants of the processing-rate estimator.
#[derive(Clone, Debug, PartialEq)]
pub struct PerReplicaCapacity {
    settle_ms: u64,
    /// The ready replica count and since when it has been that.
    ready: Option<(u32, u64)>,
    estimate: Option<f64>,
}

impl PerReplicaCapacity {
    /// An estimator that trusts a processing rate once the ready count has held for
    /// `settle_ms`.
    pub fn new(settle_ms: u64) -> Self {
        PerReplicaCapacity {
            settle_ms,
            ready: None,
            estimate: None,
        }
    }

    /// Feeds one poll: the smoothed processing rate of all replicas together, the ready
    /// replicas, and whether they were saturated. Returns the estimate, which changes only
    /// when the replicas were saturated, settled and processing.
    pub fn observe(
        &mut self,
        now_ms: u64,
        processing_rate: Option<f64>,
        ready_replicas: u32,
        saturated: bool,
    ) -> Option<f64> {
        let since = match self.ready {
            Some((ready, since)) if ready == ready_replicas => since,
            _ => {
                self.ready = Some((ready_replicas, now_ms));
                now_ms
            }
        };
        let settled = now_ms.saturating_sub(since) >= self.settle_ms;
        if let Some(rate) = processing_rate
            && saturated
            && settled
            && ready_replicas > 0
            && rate.is_finite()
            && rate > 0.0
        {
            self.estimate = Some(rate / f64::from(ready_replicas));
        }
        self.estimate
    }

    /// The last good estimate.
    pub fn estimate(&self) -> Option<f64> {
        self.estimate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9 * b.abs().max(1.0))
    }

    #[test]
    fn rate_from_samples() {
        // (time ms, total, expected rate) with no smoothing.
        let cases: &[(u64, u64, Option<f64>)] = &[
            (1_000, 100, None),
            (3_000, 300, Some(100.0)),
            (4_000, 350, Some(50.0)),
            // Same instant: ignored.
            (4_000, 999, Some(50.0)),
            // Clock going backwards: ignored.
            (3_500, 999, Some(50.0)),
            // The ignored samples did not move the baseline: 650 over 1 s.
            (5_000, 1000, Some(650.0)),
            // Counter reset: new baseline, estimate kept.
            (6_000, 20, Some(650.0)),
            (7_000, 70, Some(50.0)),
            // Flat: zero.
            (8_000, 70, Some(0.0)),
            // A gap longer than max_gap: estimate dropped, new baseline.
            (20_000, 5000, None),
            (21_000, 5010, Some(10.0)),
            // Reset to zero.
            (22_000, 0, Some(10.0)),
            (23_000, 0, Some(0.0)),
        ];
        let mut r = RateEstimator::new(0, 10_000);
        for (i, (t, total, want)) in cases.iter().enumerate() {
            let got = r.observe(*t, *total);
            assert_eq!(got, *want, "sample {i}");
            assert_eq!(r.rate(), *want);
        }
        r.reset();
        assert_eq!(r.observe(30_000, 1), None);
        assert_eq!(r.observe(31_000, 2), Some(1.0));
    }

    #[test]
    fn smoothing_weighs_by_interval() {
        // Time constant 10 s: a 10 s interval moves the estimate 1 - 1/e of the way.
        let mut r = RateEstimator::new(10_000, 60_000);
        r.observe(0, 0);
        assert_eq!(r.observe(1_000, 100), Some(100.0));
        let got = r.observe(11_000, 100 + 200 * 10);
        let weight = 1.0 - (-1.0f64).exp();
        assert!(close(got, 100.0 + weight * 100.0), "{got:?}");

        // From 10/s to 50/s: ten 1 s samples and one 10 s sample end at the same estimate,
        // so uneven spacing does not bias it.
        let (mut a, mut b) = (
            RateEstimator::new(5_000, 60_000),
            RateEstimator::new(5_000, 60_000),
        );
        for r in [&mut a, &mut b] {
            r.observe(0, 0);
            r.observe(1_000, 10);
        }
        for s in 2..=11 {
            a.observe(s * 1_000, 10 + (s - 1) * 50);
        }
        b.observe(11_000, 510);
        assert!(close(a.rate(), b.rate().unwrap()), "{a:?} {b:?}");
        assert!(close(a.rate(), 50.0 - 40.0 * (-2.0f64).exp()), "{a:?}");

        // A steady rate is tracked exactly.
        let mut r = RateEstimator::new(10_000, 60_000);
        for s in 0..100u64 {
            r.observe(s * 2_000, s * 2_000 / 10);
        }
        assert!(close(r.rate(), 100.0));
    }

    #[test]
    fn silence_reaches_zero() {
        let mut r = RateEstimator::new(10_000, 60_000);
        r.observe(0, 0);
        r.observe(2_000, 2_000);
        assert_eq!(r.rate(), Some(1000.0));
        let mut t = 2_000;
        let mut zero_at = None;
        while t < 600_000 {
            t += 2_000;
            let rate = r.observe(t, 2_000).unwrap();
            assert!(rate >= 0.0);
            if rate == 0.0 {
                zero_at = Some(t);
                break;
            }
        }
        // 1000/s decays below 0.01/s after about 10 s * ln(10^5) = 115 s.
        let zero_at = zero_at.expect("the estimate reaches zero");
        assert!((110_000..130_000).contains(&zero_at), "{zero_at}");
        // A single message makes the estimate positive again, until the counter has been
        // flat for long enough.
        t += 2_000;
        assert!(r.observe(t, 2_001).unwrap() > 0.0);
        let mut flat = 0;
        while r.observe(t + 2_000 * (flat + 1), 2_001) != Some(0.0) {
            flat += 1;
            assert!(flat < 30);
        }
    }

    #[test]
    fn huge_counters() {
        let mut r = RateEstimator::new(0, 10_000);
        r.observe(0, u64::MAX - 1000);
        assert_eq!(r.observe(1_000, u64::MAX), Some(1000.0));
        // Wrap to a small value counts as a reset.
        assert_eq!(r.observe(2_000, 5), Some(1000.0));
        assert_eq!(r.observe(3_000, 10), Some(5.0));
    }

    #[test]
    fn saturation() {
        // (backlog, tokens in use, token limit, saturated)
        let cases = [
            (10, 64, 64, true),
            (10, 70, 64, true),
            (10, 63, 64, false),
            (0, 64, 64, false),
            (10, 0, 0, false),
        ];
        for (backlog, in_use, limit, want) in cases {
            assert_eq!(
                saturated(backlog, in_use, limit),
                want,
                "{backlog} {in_use} {limit}"
            );
        }
    }

    #[test]
    fn per_replica_capacity() {
        let mut c = PerReplicaCapacity::new(5_000);
        // (time ms, processing rate, ready, saturated, expected estimate)
        type Step = (u64, Option<f64>, u32, bool, Option<f64>);
        let cases: &[Step] = &[
            // Not settled yet.
            (0, Some(100.0), 2, true, None),
            (4_999, Some(100.0), 2, true, None),
            (5_000, Some(100.0), 2, true, Some(50.0)),
            // Idle on an empty queue: says nothing, estimate kept.
            (6_000, Some(10.0), 2, false, Some(50.0)),
            // Scale-up: the rate still reflects two replicas; wait for it to settle.
            (7_000, Some(110.0), 4, true, Some(50.0)),
            (11_999, Some(150.0), 4, true, Some(50.0)),
            (12_000, Some(180.0), 4, true, Some(45.0)),
            // Unknown, zero or broken rates and no ready replicas are ignored.
            (13_000, None, 4, true, Some(45.0)),
            (14_000, Some(0.0), 4, true, Some(45.0)),
            (15_000, Some(f64::NAN), 4, true, Some(45.0)),
            (16_000, Some(f64::INFINITY), 4, true, Some(45.0)),
            (17_000, Some(100.0), 0, true, Some(45.0)),
            // Back to four after zero: settling starts again.
            (18_000, Some(100.0), 4, true, Some(45.0)),
            (23_000, Some(100.0), 4, true, Some(25.0)),
        ];
        for (i, (t, rate, ready, sat, want)) in cases.iter().enumerate() {
            assert_eq!(c.observe(*t, *rate, *ready, *sat), *want, "step {i}");
        }
        assert_eq!(c.estimate(), Some(25.0));

        let mut c = PerReplicaCapacity::new(0);
        assert_eq!(c.observe(0, Some(30.0), 3, true), Some(10.0));
    }
}
