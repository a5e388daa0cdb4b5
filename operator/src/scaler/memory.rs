//! The policy's memory in the status: converted between this process's monotonic clock and
//! wall-clock times (the only clock two operator replicas share), and resumed by a new leader.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::Scaler;
use crate::crd::{QueueProcessorStatus, Recommendation, ScalingMemory};
use crate::policy::{PolicyState, Remembered};

impl Scaler {
    /// The memory a previous leader left in `status` ([`ScalingMemory`] and the capacity
    /// estimate), resumed at `now` (wall clock) = `now_ms` (monotonic clock). Rates start fresh:
    /// they need two polls, not a window.
    pub fn resume(status: Option<&QueueProcessorStatus>, now: Timestamp, now_ms: u64) -> Scaler {
        let mut scaler = Scaler::default();
        let Some(status) = status else {
            return scaler;
        };
        if let Some(memory) = &status.scaling_memory {
            scaler.policy = PolicyState::resume(&remembered(memory, now, now_ms), now_ms);
        }
        scaler.capacity.resume(
            status
                .throughput
                .as_ref()
                .and_then(|t| t.per_replica_per_second),
        );
        scaler
    }
}

/// Monotonic milliseconds `t_ms` as a wall-clock time in whole seconds (what the API server
/// keeps), given that `at_ms` is `at`. Pass a fixed pair ([`crate::tick::clock_pair`]), so the
/// same reading always gives the same time.
fn wall(at: Timestamp, at_ms: u64, t_ms: u64) -> Time {
    let offset = if t_ms >= at_ms {
        SignedDuration::from_millis((t_ms - at_ms).min(i64::MAX as u64) as i64)
    } else {
        -SignedDuration::from_millis((at_ms - t_ms).min(i64::MAX as u64) as i64)
    };
    let t = at.checked_add(offset).unwrap_or(at);
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// A wall-clock time as monotonic milliseconds, given that `now_ms` is `now`. A time ahead of
/// `now` (another replica's clock runs ahead) counts as now.
fn monotonic(now: Timestamp, now_ms: u64, t: &Time) -> u64 {
    let ago = now.duration_since(t.0).as_millis().max(0);
    now_ms.saturating_sub(u64::try_from(ago).unwrap_or(u64::MAX))
}

/// The policy memory stored in a status, on this process's monotonic clock.
fn remembered(memory: &ScalingMemory, now: Timestamp, now_ms: u64) -> Remembered {
    Remembered {
        recommendations: memory
            .recommendations
            .iter()
            .map(|r| {
                let replicas = u32::try_from(r.replicas).unwrap_or(0);
                (replicas, r.time.as_ref().map(|t| monotonic(now, now_ms, t)))
            })
            .collect(),
        idle_since_ms: memory
            .idle_since
            .as_ref()
            .map(|t| monotonic(now, now_ms, t)),
        rebalancing_since_ms: memory
            .rebalancing_since
            .as_ref()
            .map(|t| monotonic(now, now_ms, t)),
    }
}

/// The policy memory of a step, in wall-clock times for the status (`at_ms` is `at`).
pub(super) fn scaling_memory(memory: &Remembered, at: Timestamp, at_ms: u64) -> ScalingMemory {
    ScalingMemory {
        recommendations: memory
            .recommendations
            .iter()
            .map(|&(replicas, t)| Recommendation {
                replicas: i32::try_from(replicas).unwrap_or(i32::MAX),
                time: t.map(|t| wall(at, at_ms, t)),
            })
            .collect(),
        idle_since: memory.idle_since_ms.map(|t| wall(at, at_ms, t)),
        rebalancing_since: memory.rebalancing_since_ms.map(|t| wall(at, at_ms, t)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fill_status;
    use super::super::tests::{at, observed};
    use super::*;
    use crate::policy::Policy;

    #[test]
    fn a_scaler_resumed_from_the_status_keeps_window_and_capacity() {
        use crate::crd::{ConcurrencySpec, ScalingSpec};
        let policy = Policy::from_spec(&ScalingSpec::default(), &ConcurrencySpec::default());
        let with_backlog = |backlog: u64| {
            let mut o = observed(true);
            if let Ok(s) = &mut o.source {
                s.backlog = backlog;
            }
            o
        };
        let mut scaler = Scaler::default();
        scaler.capacity.resume(Some(40.0));
        let up = scaler.step(&policy, &with_backlog(9_000), 1, 1, false, 1_000);
        assert!(up.decision.replicas > 1, "{:?}", up.decision);
        let down = scaler.step(
            &policy,
            &with_backlog(0),
            up.decision.replicas,
            1,
            false,
            6_000,
        );
        let mut st = QueueProcessorStatus::default();
        fill_status(&mut st, &with_backlog(0), &down, 1, Some(1), at(10));
        // This process's monotonic clock read 6 000 at 10:10:00.
        let memory = scaling_memory(&down.memory, at(10).0, 6_000);
        assert_eq!(memory.recommendations.len(), 2, "{memory:?}");
        // Made 5 s (monotonic) before that.
        let made = at(10).0.checked_sub(SignedDuration::from_secs(5)).unwrap();
        assert_eq!(memory.recommendations[0].time, Some(Time(made)));
        assert_eq!(memory.recommendations[1].time, None);
        // The same reading gives the same time, whenever it is converted.
        assert_eq!(scaling_memory(&down.memory, at(10).0, 6_000), memory);
        st.scaling_memory = Some(memory);

        // Another process, whose monotonic clock reads 7 000 000 at 10:10:30.
        let now = at(10).0.checked_add(SignedDuration::from_secs(30)).unwrap();
        let mut resumed = Scaler::resume(Some(&st), now, 7_000_000);
        assert_eq!(resumed.capacity.estimate(), Some(40.0));
        let held = resumed.step(
            &policy,
            &with_backlog(0),
            up.decision.replicas,
            1,
            false,
            7_000_000,
        );
        assert_eq!(
            held.decision.replicas, up.decision.replicas,
            "{:?}",
            held.decision
        );
        // A fresh scaler scales down at once.
        let fresh =
            Scaler::default().step(&policy, &with_backlog(0), up.decision.replicas, 1, false, 0);
        assert!(fresh.decision.replicas < up.decision.replicas);
    }
}
