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

/// An estimate of how many messages per second one busy replica processes, learned from how
/// fast one message slot works: the processing rate divided by the messages in flight (Little's
/// law: in flight = rate x time per message), times the slots a replica may fill
/// (`perReplicaTokens`).
///
/// It used to learn only while every token was busy and more messages waited: a replica idling
/// on an empty queue processes what arrives, which says nothing about its capacity. But after a
/// downstream brownout (slow handler, capacity learned low) the workload was no longer
/// saturated once the handler was fast again, so the low estimate stood for good and the
/// workload stayed over-provisioned. The time per message is measurable whenever anything is
/// in flight, so this estimate follows the handler both ways.
///
/// Both inputs are smoothed with the same time constant (the in-flight count is a snapshot per
/// poll), and a poll with less than a tenth of a message in flight on average says too little to
/// learn from. The estimate also waits until the ready replica count has been unchanged for
/// `settle_ms`: fresh replicas spend their first seconds joining the group, holding slots
/// without processing. Choose `settle_ms` at least three time constants.
#[derive(Clone, Debug, PartialEq)]
pub struct PerReplicaCapacity {
    settle_ms: u64,
    time_constant_ms: u64,
    /// The ready replica count and since when it has been that.
    ready: Option<(u32, u64)>,
    /// Smoothed messages in flight, and when it was last updated.
    in_flight: Option<(u64, f64)>,
    estimate: Option<f64>,
}

/// Fewer messages in flight than this on average say too little about the time per message
/// (a fast handler under light load has well under one in flight: 16/s at 8 ms is 0.13).
const MIN_IN_FLIGHT: f64 = 0.1;

impl PerReplicaCapacity {
    /// An estimator that smooths the in-flight count with `time_constant_ms` and trusts a
    /// processing rate once the ready count has held for `settle_ms`.
    pub fn new(settle_ms: u64, time_constant_ms: u64) -> Self {
        PerReplicaCapacity {
            settle_ms,
            time_constant_ms,
            ready: None,
            in_flight: None,
            estimate: None,
        }
    }

    /// Feeds one poll: the smoothed processing rate of all replicas together, the messages in
    /// flight now, the ready replicas, and the slots one replica may fill. Returns the
    /// estimate, which changes only when the replicas were settled and working.
    pub fn observe(
        &mut self,
        now_ms: u64,
        processing_rate: Option<f64>,
        in_flight: u64,
        ready_replicas: u32,
        slots_per_replica: u32,
    ) -> Option<f64> {
        let since = match self.ready {
            Some((ready, since)) if ready == ready_replicas => since,
            _ => {
                self.ready = Some((ready_replicas, now_ms));
                now_ms
            }
        };
        let sample = in_flight as f64;
        let smoothed = match self.in_flight {
            Some((t, avg)) if now_ms > t => {
                let dt = (now_ms - t) as f64;
                let weight = if self.time_constant_ms == 0 {
                    1.0
                } else {
                    1.0 - (-dt / self.time_constant_ms as f64).exp()
                };
                avg + weight * (sample - avg)
            }
            Some((_, avg)) => avg,
            None => sample,
        };
        self.in_flight = Some((now_ms, smoothed));
        let settled = now_ms.saturating_sub(since) >= self.settle_ms;
        if let Some(rate) = processing_rate
            && settled
            && ready_replicas > 0
            && smoothed >= MIN_IN_FLIGHT
            && rate.is_finite()
            && rate > 0.0
        {
            self.estimate = Some(rate / smoothed * f64::from(slots_per_replica.max(1)));
        }
        self.estimate
    }

    /// Start from an estimate learnt before (by the previous leader, read back from the
    /// status), so that a new leader sizes by rate at once instead of by backlog until the
    /// replicas have settled again. A non-positive or non-finite value is ignored.
    pub fn resume(&mut self, estimate: Option<f64>) {
        self.estimate = estimate.filter(|e| e.is_finite() && *e > 0.0);
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
    fn per_replica_capacity() {
        // No smoothing, to read the rule plainly; 4 slots per replica.
        let mut c = PerReplicaCapacity::new(5_000, 0);
        // (time ms, processing rate, in flight, ready, expected estimate)
        type Step = (u64, Option<f64>, u64, u32, Option<f64>);
        let cases: &[Step] = &[
            // Not settled yet.
            (0, Some(100.0), 8, 2, None),
            (4_999, Some(100.0), 8, 2, None),
            // 100/s with 8 in flight: 12.5/s per slot, 50/s per 4-slot replica.
            (5_000, Some(100.0), 8, 2, Some(50.0)),
            // Nothing in flight: says nothing, estimate kept.
            (6_000, Some(10.0), 0, 2, Some(50.0)),
            // Scale-up: wait for the new count to settle.
            (7_000, Some(110.0), 16, 4, Some(50.0)),
            (12_000, Some(180.0), 16, 4, Some(45.0)),
            // Unknown, zero or broken rates and no ready replicas are ignored.
            (13_000, None, 16, 4, Some(45.0)),
            (14_000, Some(0.0), 16, 4, Some(45.0)),
            (15_000, Some(f64::NAN), 16, 4, Some(45.0)),
            (16_000, Some(f64::INFINITY), 16, 4, Some(45.0)),
            (17_000, Some(100.0), 16, 0, Some(45.0)),
            // Back to four after zero: settling starts again.
            (18_000, Some(100.0), 16, 4, Some(45.0)),
            (23_000, Some(100.0), 16, 4, Some(25.0)),
        ];
        for (i, (t, rate, in_flight, ready, want)) in cases.iter().enumerate() {
            assert_eq!(
                c.observe(*t, *rate, *in_flight, *ready, 4),
                *want,
                "step {i}"
            );
        }
        assert_eq!(c.estimate(), Some(25.0));
    }

    #[test]
    fn capacity_recovers_after_a_brownout_without_saturation() {
        // Time constant 3 s, settle 9 s, 4 slots per replica, 2 replicas throughout.
        let mut c = PerReplicaCapacity::new(9_000, 3_000);
        let mut t = 0;
        let mut feed = |rate: f64, in_flight: u64, polls: u64| {
            let mut last = None;
            for _ in 0..polls {
                t += 1_000;
                last = c.observe(t, Some(rate), in_flight, 2, 4);
            }
            last
        };
        // Brownout: 200 ms per message, every slot busy: 8 in flight, 40/s. 5/s per slot.
        let low = feed(40.0, 8, 30).unwrap();
        assert!((low - 20.0).abs() < 0.5, "{low}");
        // The handler is fast again (10 ms) and the workload easily keeps up with 60/s: under
        // one message in flight on average (0.6), far from saturated. The estimate follows.
        let high = feed(60.0, 1, 12).unwrap();
        // In-flight samples of 1 against a true 0.6: the snapshot overstates the occupancy
        // here, so the estimate lands below the true 400/s, but far above the brownout's 20.
        assert!(high > 200.0, "{high}");
    }
}
