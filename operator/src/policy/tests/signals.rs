//! Scaling signals in the policy: the largest want wins, activation and cooldown see them, an
//! unreadable one holds, a rate is sized by the measured throughput of a replica.

use super::*;

fn signal(name: &str, value: f64, target: f64, activation: f64) -> SignalValue {
    SignalValue {
        name: name.into(),
        value: Ok(value),
        target_per_replica: target,
        activation,
        rate: false,
    }
}

fn scale_to_zero() -> Policy {
    Policy {
        min_replicas: 0,
        cooldown_ms: 30 * SEC,
        stabilization_ms: 0,
        ..policy()
    }
}

#[test]
fn a_signal_that_wants_more_than_the_backlog_sizes_the_workload() {
    let p = scale_to_zero();
    let mut o = obs(0, 0);
    o.signals = vec![
        signal("pending", 45.0, 10.0, 0.0),
        signal("other", 12.0, 10.0, 0.0),
    ];
    let d = once(&p, &o);
    assert_eq!(d.replicas, 5);
    assert_eq!(d.reason.rule(), Rule::Signal);
    assert!(
        d.reason
            .to_string()
            .contains("signal pending: 45 / 10 per replica"),
        "{}",
        d.reason
    );
    // The backlog wants more: it wins, and no signal is named.
    let mut o = obs(900, 1);
    o.signals = vec![signal("pending", 45.0, 10.0, 0.0)];
    let d = once(&policy(), &o);
    assert_eq!((d.replicas, d.reason.rule()), (9, Rule::Backlog));
    // Caps still apply.
    let mut o = obs(0, 1);
    o.signals = vec![signal("pending", 10_000.0, 10.0, 0.0)];
    assert_eq!(once(&policy(), &o).replicas, 20);
}

#[test]
fn activation_and_cooldown_follow_the_signals() {
    let p = scale_to_zero();
    let mut state = PolicyState::default();
    let at = |v: f64, current: u32| {
        let mut o = obs(0, current);
        o.signals = vec![signal("queued", v, 10.0, 5.0)];
        o
    };
    // At or below its activation, a signal does not wake the workload.
    let d = decide(&p, &at(5.0, 0), &mut state, 0);
    assert_eq!((d.replicas, d.reason.rule()), (0, Rule::BelowActivation));
    // Above it, it does.
    let d = decide(&p, &at(6.0, 0), &mut state, SEC);
    assert_eq!(d.replicas, 1);
    // Back to zero demand: the last replica stays for the cooldown, then goes.
    let d = decide(&p, &at(0.0, 1), &mut state, 2 * SEC);
    assert_eq!((d.replicas, d.reason.rule()), (1, Rule::Cooldown));
    let d = decide(&p, &at(0.0, 1), &mut state, 32 * SEC);
    assert_eq!(d.replicas, 0);
}

#[test]
fn an_unreadable_signal_holds_like_the_source() {
    let mut o = obs(0, 3);
    o.signals = vec![SignalValue {
        value: Err("key jobs is a list; a counter signal needs a string".into()),
        ..signal("jobs", 0.0, 10.0, 0.0)
    }];
    let d = once(&scale_to_zero(), &o);
    assert_eq!((d.replicas, d.reason.rule()), (3, Rule::SourceError));
    assert!(
        d.reason
            .to_string()
            .contains("signal jobs: key jobs is a list"),
        "{}",
        d.reason
    );
}

#[test]
fn a_rate_is_sized_by_the_throughput_of_a_replica_once_measured() {
    let p = scale_to_zero();
    let mut o = obs(0, 1);
    o.signals = vec![SignalValue {
        rate: true,
        ..signal("requests", 100.0, 10.0, 0.0)
    }];
    // Before throughput is measured: the target per replica.
    assert_eq!(once(&p, &o).replicas, 10);
    // Then: arrivals over what one replica does (100/s at 25/s each).
    o.per_replica_rate = Some(25.0);
    let d = once(&p, &o);
    assert_eq!(d.replicas, 4);
    assert!(
        d.reason.to_string().contains("100 / 25 per replica"),
        "{}",
        d.reason
    );
}
