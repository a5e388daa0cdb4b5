//! Decisions over time: activation, cooldown, stabilization windows, step limits, tokens.

use super::*;

/// Runs a sequence of observations at given times against one state, the backend
/// following every decision; checks replicas and rule at each step.
fn run(p: &Policy, steps: &[(u64, Observation, u32, Rule)]) {
    let mut state = PolicyState::default();
    let mut current = None;
    for (i, (now, o, want, rule)) in steps.iter().enumerate() {
        let mut o = o.clone();
        if let Some(c) = current {
            o.current_replicas = c;
            o.ready_replicas = c;
        }
        let d = decide(p, &o, &mut state, *now);
        assert_eq!(
            (d.replicas, d.reason.rule()),
            (*want, *rule),
            "step {i} at {now} ms: {}",
            d.reason
        );
        current = Some(d.replicas);
    }
}

#[test]
fn cooldown_before_zero() {
    let p = Policy {
        min_replicas: 0,
        cooldown_ms: 100 * SEC,
        stabilization_ms: 0,
        ..policy()
    };
    let busy = Observation {
        in_flight: 3,
        ..obs(0, 1)
    };
    run(
        &p,
        &[
            (0, obs(500, 0), 5, Rule::Backlog),
            (10 * SEC, obs(100, 5), 1, Rule::Backlog),
            // Queue empty but work in flight: still active.
            (20 * SEC, busy, 1, Rule::InFlight),
            (30 * SEC, obs(0, 1), 1, Rule::Cooldown),
            (119 * SEC, obs(0, 1), 1, Rule::Cooldown),
            (120 * SEC - 1, obs(0, 1), 1, Rule::Cooldown),
            // Exactly the cooldown since the last activity (20 s).
            (120 * SEC, obs(0, 1), 0, Rule::Backlog),
            (130 * SEC, obs(0, 1), 0, Rule::Backlog),
        ],
    );
    // The message of the cooldown says how long is left.
    let mut state = PolicyState::default();
    decide(&p, &obs(5, 1), &mut state, 0);
    let d = decide(&p, &obs(0, 1), &mut state, 40 * SEC);
    assert_eq!(
        d.reason.to_string(),
        "backlog 0 / 100 per replica -> 0, kept at 1 for the cooldown (60s left)"
    );

    // Activity restarts the cooldown; a source error counts as activity.
    run(
        &p,
        &[
            (0, obs(5, 1), 1, Rule::Backlog),
            (90 * SEC, obs(0, 1), 1, Rule::Cooldown),
            (
                95 * SEC,
                Observation {
                    backlog: Err("timeout".into()),
                    ..obs(0, 1)
                },
                1,
                Rule::SourceError,
            ),
            (100 * SEC, obs(0, 1), 1, Rule::Cooldown),
            (195 * SEC, obs(0, 1), 0, Rule::Backlog),
        ],
    );

    // The cooldown clock starts with the first decision (an operator restart does not
    // drop a running workload to zero at once), and a zero cooldown drops at once.
    run(
        &p,
        &[
            (500 * SEC, obs(0, 1), 1, Rule::Cooldown),
            (600 * SEC, obs(0, 1), 0, Rule::Backlog),
        ],
    );
    let p = Policy {
        cooldown_ms: 0,
        ..p
    };
    run(&p, &[(0, obs(0, 1), 0, Rule::Backlog)]);
    // With min > 0 there is no cooldown; the minimum applies.
    let p = Policy {
        min_replicas: 2,
        ..p
    };
    run(&p, &[(0, obs(0, 3), 2, Rule::MinReplicas)]);
}

#[test]
fn stabilization_window() {
    let p = Policy {
        stabilization_ms: 60 * SEC,
        ..policy()
    };
    run(
        &p,
        &[
            (0, obs(1000, 1), 10, Rule::Backlog),
            // A dip: held at the highest recommendation of the last 60 s.
            (10 * SEC, obs(200, 10), 10, Rule::Stabilization),
            (20 * SEC, obs(0, 10), 10, Rule::Stabilization),
            // A spike: up at once.
            (30 * SEC, obs(1500, 10), 15, Rule::Backlog),
            (40 * SEC, obs(300, 15), 15, Rule::Stabilization),
            (89 * SEC, obs(300, 15), 15, Rule::Stabilization),
            // 60 s after the spike, the highest left in the window is 3 (seen from 40 s to 89 s).
            (90 * SEC, obs(100, 15), 3, Rule::Stabilization),
            (100 * SEC, obs(100, 3), 3, Rule::Stabilization),
            (100 * SEC + 1, obs(100, 3), 3, Rule::Stabilization),
            (160 * SEC, obs(100, 3), 1, Rule::Backlog),
        ],
    );
    let d = {
        let mut s = PolicyState::default();
        decide(&p, &obs(1000, 1), &mut s, 0);
        decide(&p, &obs(0, 10), &mut s, 30 * SEC)
    };
    assert_eq!(
        d.reason.to_string(),
        "backlog 0 / 100 per replica -> 0, raised to min 1, held at 10 by the 60s scale-down window"
    );

    // No window: straight down.
    let p = Policy {
        stabilization_ms: 0,
        ..policy()
    };
    run(
        &p,
        &[
            (0, obs(1000, 1), 10, Rule::Backlog),
            (1, obs(200, 10), 2, Rule::Backlog),
        ],
    );

    // Remembered recommendations obey today's caps: a lowered max applies at once.
    let mut s = PolicyState::default();
    decide(&policy(), &obs(2000, 1), &mut s, 0);
    let lowered = Policy {
        max_replicas: 4,
        ..policy()
    };
    let d = decide(&lowered, &obs(2000, 20), &mut s, SEC);
    assert_eq!((d.replicas, d.reason.rule()), (4, Rule::MaxReplicas));
    let d = decide(&lowered, &obs(0, 4), &mut s, 2 * SEC);
    assert_eq!((d.replicas, d.reason.rule()), (4, Rule::Stabilization));
}

#[test]
fn holds_are_remembered_by_the_window() {
    let p = policy();
    let rebalancing = Observation {
        rebalancing: true,
        ..obs(0, 8)
    };
    run(
        &p,
        &[
            (0, obs(800, 1), 8, Rule::Backlog),
            (100 * SEC, rebalancing, 8, Rule::Rebalancing),
            // The backlog is gone, but the hold 10 s ago is in the window.
            (110 * SEC, obs(0, 8), 8, Rule::Stabilization),
            (160 * SEC, obs(0, 8), 1, Rule::MinReplicas),
        ],
    );
}

#[test]
fn max_step_climbs_and_descends() {
    let p = Policy {
        max_step: 4,
        stabilization_ms: 0,
        ..policy()
    };
    run(
        &p,
        &[
            (0, obs(1800, 1), 5, Rule::MaxStep),
            (1, obs(1800, 5), 9, Rule::MaxStep),
            (2, obs(1800, 9), 13, Rule::MaxStep),
            (3, obs(1800, 13), 17, Rule::MaxStep),
            (4, obs(1800, 17), 18, Rule::Backlog),
            (5, obs(0, 18), 14, Rule::MaxStep),
            (6, obs(0, 14), 10, Rule::MaxStep),
            (7, obs(0, 10), 6, Rule::MaxStep),
            (8, obs(0, 6), 2, Rule::MaxStep),
            (9, obs(0, 2), 1, Rule::MinReplicas),
        ],
    );
    let d = once(&p, &obs(1800, 1));
    assert_eq!(d.target, 18);
    assert_eq!(
        d.reason.to_string(),
        "backlog 1800 / 100 per replica -> 18, stepped to 5 (max step 4)"
    );
    // A zero step counts as one.
    let p = Policy { max_step: 0, ..p };
    assert_eq!(once(&p, &obs(1800, 1)).replicas, 2);
}

#[test]
fn token_limit_follows_ready_replicas() {
    let p = Policy {
        per_replica_tokens: 8,
        global_max_tokens: 64,
        ..policy()
    };
    // (ready, paused, error, rebalancing, limit)
    let cases = [
        (0, false, false, false, 0),
        (3, false, false, false, 24),
        (8, false, false, false, 64),
        (100, false, false, false, 64),
        (3, true, false, false, 24),
        (3, false, true, false, 24),
        (3, false, false, true, 24),
        (u32::MAX, false, false, false, 64),
    ];
    for (ready, paused, error, rebalancing, limit) in cases {
        let mut o = obs(5000, 10);
        o.ready_replicas = ready;
        o.paused = paused;
        o.rebalancing = rebalancing;
        if error {
            o.backlog = Err("down".into());
        }
        assert_eq!(once(&p, &o).token_limit, limit, "ready {ready}");
    }
    assert_eq!(p.token_cap(), 8);
    assert_eq!(
        Policy {
            global_max_tokens: 65,
            ..p
        }
        .token_cap(),
        9
    );
}

#[test]
fn a_trickle_below_activation_lets_the_workload_sleep() {
    let p = Policy {
        min_replicas: 0,
        activation_backlog: 50,
        cooldown_ms: 60 * SEC,
        stabilization_ms: 0,
        ..policy()
    };
    run(
        &p,
        &[
            (0, obs(200, 0), 2, Rule::Backlog),
            // Worked down to a trickle below the threshold: no longer active.
            (10 * SEC, obs(8, 2), 1, Rule::Cooldown),
            (40 * SEC, obs(12, 1), 1, Rule::Cooldown),
            // A minute after the backlog was last above the threshold, the replica goes,
            // although messages trickle in.
            (70 * SEC, obs(5, 1), 0, Rule::BelowActivation),
            (80 * SEC, obs(9, 0), 0, Rule::BelowActivation),
            // Above the threshold it wakes again.
            (90 * SEC, obs(51, 0), 1, Rule::Backlog),
        ],
    );
}

#[test]
fn a_rebalance_holds_decisions_for_a_bounded_time() {
    let p = Policy {
        stabilization_ms: 0,
        ..policy()
    };
    let rebalancing = |backlog| Observation {
        rebalancing: true,
        ..obs(backlog, 1)
    };
    run(
        &p,
        &[
            (0, rebalancing(500), 1, Rule::Rebalancing),
            (
                REBALANCE_HOLD_MS - 1,
                rebalancing(500),
                1,
                Rule::Rebalancing,
            ),
            // A group that never settles: decide on the lag after all.
            (REBALANCE_HOLD_MS, rebalancing(500), 5, Rule::Backlog),
            // Stable, then a new rebalance: held again, from its own start.
            (REBALANCE_HOLD_MS + SEC, obs(500, 5), 5, Rule::Backlog),
            (
                REBALANCE_HOLD_MS + 2 * SEC,
                rebalancing(900),
                5,
                Rule::Rebalancing,
            ),
        ],
    );
}
