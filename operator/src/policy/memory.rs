//! The policy's memory in a form that outlives the process: a new leader (after a failover or
//! during an upgrade) restores it and goes on with the same stabilization window, cooldown and
//! rebalance clocks, instead of starting fresh and scaling down at once what the window held.
//!
//! Times stay in the caller's monotonic milliseconds here; the caller converts them to and from
//! wall-clock times for storage (see the scaler), so this module stays pure.

use super::{Policy, PolicyState};

/// What [`PolicyState`] needs to go on, at the time of the latest decision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Remembered {
    /// Recommendations inside the stabilization window, highest (and oldest) first, with when
    /// each was last made. The last one is the latest recommendation: it has no time, because it
    /// was still being made when this was taken (storing its time would change the stored copy
    /// at every poll).
    pub recommendations: Vec<(u32, Option<u64>)>,
    /// Since when the workload has been idle, if it was idle at the latest decision. Only kept
    /// when the policy can scale to zero (the only use of the cooldown): with a minimum of one
    /// replica, light traffic flips between idle and active at every poll, for nothing.
    pub idle_since_ms: Option<u64>,
    /// Since when the consumer group has been rebalancing, if it was at the latest decision.
    pub rebalancing_since_ms: Option<u64>,
}

impl PolicyState {
    /// What to store so that [`PolicyState::resume`] can go on from here.
    pub fn remembered(&self, policy: &Policy) -> Remembered {
        let latest = self.recent.len().saturating_sub(1);
        let recommendations = self
            .recent
            .iter()
            .enumerate()
            .map(|(i, &(t, r))| (r, (i < latest).then_some(t)))
            .collect();
        let idle_since_ms = match (self.last_active_ms, self.last_decision_ms) {
            (Some(active), Some(decided)) if policy.min_replicas == 0 && active < decided => {
                Some(active)
            }
            _ => None,
        };
        Remembered {
            recommendations,
            idle_since_ms,
            rebalancing_since_ms: self.rebalancing_since,
        }
    }

    /// The state [`PolicyState::remembered`] described, resumed at `now_ms`. The latest
    /// recommendation counts as made now; times after `now_ms` (clocks of two replicas that
    /// disagree) count as now.
    pub fn resume(memory: &Remembered, now_ms: u64) -> PolicyState {
        let mut state = PolicyState::default();
        for &(replicas, t) in &memory.recommendations {
            state.remember(t.unwrap_or(now_ms).min(now_ms), replicas);
        }
        // Active until proven idle: without a stored idle time, the cooldown starts now.
        state.last_active_ms = Some(memory.idle_since_ms.unwrap_or(now_ms).min(now_ms));
        state.rebalancing_since = memory.rebalancing_since_ms.map(|t| t.min(now_ms));
        state.last_decision_ms = Some(now_ms);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{obs, policy};
    use super::super::{Bound, Decision, Reason, decide};
    use super::*;

    const SEC: u64 = 1000;

    fn bounds(d: &Decision) -> &[Bound] {
        match &d.reason {
            Reason::Computed { bounds, .. } => bounds,
            other => panic!("no computed decision: {other:?}"),
        }
    }

    /// A run of decisions, then the same run cut in two by a "failover": the second half on a
    /// state resumed from what the first half remembered gives the same decisions.
    #[test]
    fn a_resumed_state_decides_like_the_one_it_was_taken_from() {
        let mut p = policy();
        p.min_replicas = 0;
        // (time, backlog, current replicas)
        let run: &[(u64, u64, u32)] = &[
            (0, 900, 1),
            (5 * SEC, 900, 9),
            (10 * SEC, 300, 9),
            (15 * SEC, 0, 9),
            (40 * SEC, 0, 9),
            (70 * SEC, 0, 9),
            (200 * SEC, 0, 3),
            (320 * SEC, 0, 1),
        ];
        let mut whole = PolicyState::default();
        let expected: Vec<Decision> = run
            .iter()
            .map(|&(t, b, c)| decide(&p, &obs(b, c), &mut whole, t))
            .collect();
        for cut in 1..run.len() {
            let mut first = PolicyState::default();
            for &(t, b, c) in &run[..cut] {
                decide(&p, &obs(b, c), &mut first, t);
            }
            // Another process, another monotonic origin: times shift by a constant.
            let shift = 1_000_000;
            let mut memory = first.remembered(&p);
            for (_, t) in &mut memory.recommendations {
                *t = t.map(|t| t + shift);
            }
            memory.idle_since_ms = memory.idle_since_ms.map(|t| t + shift);
            let mut resumed = PolicyState::resume(&memory, run[cut - 1].0 + shift);
            for (i, &(t, b, c)) in run.iter().enumerate().skip(cut) {
                let d = decide(&p, &obs(b, c), &mut resumed, t + shift);
                assert_eq!(d, expected[i], "cut after {cut}, decision {i}");
            }
        }
    }

    #[test]
    fn a_fresh_state_forgets_the_window_that_a_resumed_one_keeps() {
        let p = policy();
        let mut state = PolicyState::default();
        decide(&p, &obs(900, 1), &mut state, 0);
        decide(&p, &obs(0, 9), &mut state, 10 * SEC);
        let memory = state.remembered(&p);
        assert_eq!(memory.recommendations, vec![(9, Some(0)), (1, None)]);
        // Fresh: down to the minimum at once.
        let fresh = decide(&p, &obs(0, 9), &mut PolicyState::default(), 20 * SEC);
        assert_eq!(fresh.replicas, 1);
        // Resumed: held by the window until 60 s after the 9 was recommended.
        let mut resumed = PolicyState::resume(&memory, 20 * SEC);
        let held = decide(&p, &obs(0, 9), &mut resumed, 20 * SEC);
        assert_eq!(held.replicas, 9);
        assert!(
            bounds(&held)
                .iter()
                .any(|b| matches!(b, Bound::Stabilization { .. })),
            "{held:?}"
        );
        assert_eq!(decide(&p, &obs(0, 9), &mut resumed, 60 * SEC).replicas, 1);
    }

    #[test]
    fn idle_time_is_kept_only_where_the_cooldown_applies() {
        let mut p = policy();
        let mut state = PolicyState::default();
        decide(&p, &obs(50, 1), &mut state, 0);
        decide(&p, &obs(0, 1), &mut state, 5 * SEC);
        assert_eq!(state.remembered(&p).idle_since_ms, None);
        p.min_replicas = 0;
        assert_eq!(state.remembered(&p).idle_since_ms, Some(0));
        decide(&p, &obs(50, 1), &mut state, 10 * SEC);
        assert_eq!(state.remembered(&p).idle_since_ms, None, "active again");
    }

    #[test]
    fn times_from_a_clock_ahead_count_as_now() {
        let memory = Remembered {
            recommendations: vec![(5, Some(90 * SEC)), (2, None)],
            idle_since_ms: Some(95 * SEC),
            rebalancing_since_ms: Some(99 * SEC),
        };
        let state = PolicyState::resume(&memory, 10 * SEC);
        assert_eq!(
            state.remembered(&Policy {
                min_replicas: 0,
                ..policy()
            }),
            Remembered {
                recommendations: vec![(5, Some(10 * SEC)), (2, None)],
                idle_since_ms: None,
                rebalancing_since_ms: Some(10 * SEC),
            }
        );
    }
}
