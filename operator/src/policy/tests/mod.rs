//! Unit tests of the scaling policy: single decisions, then sequences of decisions against one
//! state (activation, cooldown, stabilization, maximum step), token limits and reason texts.

use super::*;

const SEC: u64 = 1000;

/// The policy of the tests: min 1, max 20, 100 messages per replica, 30 s drain, 300 s
/// cooldown, 60 s window, max step 20, 10 tokens per replica under a budget of 1000.
pub(super) fn policy() -> Policy {
    Policy {
        min_replicas: 1,
        max_replicas: 20,
        activation_backlog: 0,
        target_backlog_per_replica: 100,
        target_drain_seconds: 30.0,
        cooldown_ms: 300 * SEC,
        stabilization_ms: 60 * SEC,
        max_step: 20,
        per_replica_tokens: 10,
        global_max_tokens: 1000,
    }
}

pub(super) fn obs(backlog: u64, current: u32) -> Observation {
    Observation {
        backlog: Ok(backlog),
        partitions: None,
        arrival_rate: None,
        per_replica_rate: None,
        in_flight: 0,
        rebalancing: false,
        current_replicas: current,
        ready_replicas: current,
        paused: false,
        signals: Vec::new(),
    }
}

/// One decision from a fresh state.
pub(super) fn once(p: &Policy, o: &Observation) -> Decision {
    decide(p, o, &mut PolicyState::default(), 0)
}

#[test]
fn single_decisions() {
    type Tweak = fn(&mut Policy, &mut Observation);
    let cases: &[(&str, u64, u32, Tweak, u32, Rule)] = &[
        // (name, backlog, current, tweak, expected replicas, rule)
        ("backlog sizing", 450, 1, |_, _| {}, 5, Rule::Backlog),
        ("exact multiple", 500, 1, |_, _| {}, 5, Rule::Backlog),
        ("one message", 1, 1, |_, _| {}, 1, Rule::Backlog),
        ("empty at min", 0, 1, |_, _| {}, 1, Rule::MinReplicas),
        (
            "capped at max",
            1_000_000,
            1,
            |_, _| {},
            20,
            Rule::MaxReplicas,
        ),
        (
            "capped at partitions",
            4200,
            1,
            |_, o| o.partitions = Some(12),
            12,
            Rule::PartitionCap,
        ),
        (
            "partitions above need",
            400,
            1,
            |_, o| o.partitions = Some(12),
            4,
            Rule::Backlog,
        ),
        (
            "capped at token budget",
            4200,
            1,
            |p, _| p.global_max_tokens = 64,
            7,
            Rule::TokenBudget,
        ),
        (
            "lowest cap wins",
            4200,
            1,
            |p, o| {
                p.global_max_tokens = 64;
                o.partitions = Some(3);
            },
            3,
            Rule::PartitionCap,
        ),
        (
            "min wins over partitions",
            4200,
            1,
            |p, o| {
                p.min_replicas = 5;
                o.partitions = Some(3);
            },
            5,
            Rule::MinReplicas,
        ),
        (
            "min wins over token budget",
            0,
            5,
            |p, _| {
                p.min_replicas = 5;
                p.global_max_tokens = 20;
            },
            5,
            Rule::MinReplicas,
        ),
        (
            "min equals max, idle",
            0,
            3,
            |p, _| {
                p.min_replicas = 3;
                p.max_replicas = 3;
            },
            3,
            Rule::MinReplicas,
        ),
        (
            "min equals max, busy",
            9000,
            3,
            |p, _| {
                p.min_replicas = 3;
                p.max_replicas = 3;
            },
            3,
            Rule::MaxReplicas,
        ),
        (
            "below min moves straight to min",
            0,
            0,
            |p, _| {
                p.min_replicas = 5;
                p.max_step = 2;
            },
            5,
            Rule::MinReplicas,
        ),
        (
            "above a lowered max moves straight to max",
            1000,
            15,
            |p, _| {
                p.max_replicas = 4;
                p.max_step = 2;
            },
            4,
            Rule::MaxReplicas,
        ),
        (
            "rates known",
            3000,
            1,
            |_, o| {
                o.arrival_rate = Some(120.0);
                o.per_replica_rate = Some(20.0);
            },
            // (120 + 3000 / 30) / 20 = 11
            11,
            Rule::Rate,
        ),
        (
            "rates known, empty queue still needs the arrival rate",
            0,
            1,
            |_, o| {
                o.arrival_rate = Some(45.0);
                o.per_replica_rate = Some(10.0);
            },
            5,
            Rule::Rate,
        ),
        (
            "rates known, float noise does not add a replica",
            0,
            1,
            |_, o| {
                o.arrival_rate = Some(0.1 + 0.2);
                o.per_replica_rate = Some(0.1);
            },
            3,
            Rule::Rate,
        ),
        (
            "only arrival known",
            3000,
            1,
            |_, o| o.arrival_rate = Some(120.0),
            20,
            Rule::MaxReplicas,
        ),
        (
            "only per-replica rate known",
            450,
            1,
            |_, o| o.per_replica_rate = Some(20.0),
            5,
            Rule::Backlog,
        ),
        (
            "per-replica rate zero falls back",
            450,
            1,
            |_, o| {
                o.arrival_rate = Some(120.0);
                o.per_replica_rate = Some(0.0);
            },
            5,
            Rule::Backlog,
        ),
        (
            "NaN rate falls back",
            450,
            1,
            |_, o| {
                o.arrival_rate = Some(f64::NAN);
                o.per_replica_rate = Some(20.0);
            },
            5,
            Rule::Backlog,
        ),
        (
            "huge capacity still gives a backlog one replica",
            1,
            0,
            |p, o| {
                p.min_replicas = 0;
                o.arrival_rate = Some(0.0);
                o.per_replica_rate = Some(1e300);
            },
            1,
            Rule::Rate,
        ),
        (
            "zero drain time drains at once",
            1,
            1,
            |p, o| {
                p.target_drain_seconds = 0.0;
                o.arrival_rate = Some(0.0);
                o.per_replica_rate = Some(1.0);
            },
            20,
            Rule::MaxReplicas,
        ),
        (
            "huge backlog saturates",
            u64::MAX,
            1,
            |p, _| {
                p.max_replicas = u32::MAX;
                p.global_max_tokens = u32::MAX;
                p.per_replica_tokens = 1;
                p.max_step = u32::MAX;
            },
            u32::MAX,
            Rule::Backlog,
        ),
        (
            "huge backlog, rates known, saturates then caps",
            u64::MAX,
            u32::MAX,
            |p, o| {
                p.target_drain_seconds = 1e-300;
                o.arrival_rate = Some(f64::MAX);
                o.per_replica_rate = Some(f64::MIN_POSITIVE);
                o.in_flight = u64::MAX;
                o.ready_replicas = u32::MAX;
            },
            20,
            Rule::MaxReplicas,
        ),
        (
            "target per replica zero counts as one",
            7,
            1,
            |p, _| p.target_backlog_per_replica = 0,
            7,
            Rule::Backlog,
        ),
        (
            "work in flight keeps replicas",
            0,
            6,
            |_, o| o.in_flight = 41,
            5,
            Rule::InFlight,
        ),
        (
            "in-flight floor is capped too",
            0,
            6,
            |_, o| {
                o.in_flight = 41;
                o.partitions = Some(2);
            },
            2,
            Rule::PartitionCap,
        ),
        (
            "rebalancing holds",
            5000,
            3,
            |_, o| o.rebalancing = true,
            3,
            Rule::Rebalancing,
        ),
        (
            "paused holds",
            5000,
            3,
            |_, o| o.paused = true,
            3,
            Rule::Paused,
        ),
        (
            "paused wins over an error",
            0,
            3,
            |_, o| {
                o.paused = true;
                o.backlog = Err("x".into());
            },
            3,
            Rule::Paused,
        ),
        (
            "error wins over rebalancing",
            0,
            3,
            |_, o| {
                o.rebalancing = true;
                o.backlog = Err("x".into());
            },
            3,
            Rule::SourceError,
        ),
        (
            "source error holds",
            0,
            7,
            |_, o| o.backlog = Err("broker down".into()),
            7,
            Rule::SourceError,
        ),
        (
            "source error at zero stays at zero",
            0,
            0,
            |p, o| {
                p.min_replicas = 0;
                o.backlog = Err("broker down".into());
            },
            0,
            Rule::SourceError,
        ),
        (
            "source error does not enforce min",
            0,
            0,
            |p, o| {
                p.min_replicas = 2;
                o.backlog = Err("broker down".into());
            },
            0,
            Rule::SourceError,
        ),
        (
            "max step up",
            5000,
            2,
            |p, _| p.max_step = 3,
            5,
            Rule::MaxStep,
        ),
    ];
    for (name, backlog, current, tweak, want, rule) in cases {
        let mut p = policy();
        let mut o = obs(*backlog, *current);
        tweak(&mut p, &mut o);
        let d = once(&p, &o);
        assert_eq!(
            (d.replicas, d.reason.rule()),
            (*want, *rule),
            "{name}: {}",
            d.reason
        );
        assert_eq!(d.changed, d.replicas != *current, "{name}");
    }
}

#[test]
fn activation_from_zero() {
    let p = Policy {
        min_replicas: 0,
        activation_backlog: 50,
        ..policy()
    };
    // (backlog, replicas, rule)
    let cases = [
        (0, 0, Rule::Backlog),
        (1, 0, Rule::BelowActivation),
        (50, 0, Rule::BelowActivation),
        (51, 1, Rule::Backlog),
        (250, 3, Rule::Backlog),
    ];
    for (backlog, want, rule) in cases {
        let d = once(&p, &obs(backlog, 0));
        assert_eq!(
            (d.replicas, d.reason.rule()),
            (want, rule),
            "backlog {backlog}"
        );
    }
    // The threshold gates deactivation too (as in KEDA): once running, a backlog at or below
    // it recommends zero, and only the cooldown keeps the last replica for a while (see
    // `windows::a_trickle_below_activation_lets_the_workload_sleep`).
    let d = once(&p, &obs(10, 1));
    assert_eq!((d.replicas, d.reason.rule()), (1, Rule::Cooldown));

    // With activation 0, any message activates; stale in-flight counters at zero do not.
    let p = Policy {
        activation_backlog: 0,
        ..p
    };
    assert_eq!(once(&p, &obs(1, 0)).replicas, 1);
    let stale = Observation {
        in_flight: 30,
        ..obs(0, 0)
    };
    let d = once(&p, &stale);
    assert_eq!((d.replicas, d.reason.rule()), (0, Rule::BelowActivation));
    // Activation respects the maximum step only in that one step is at least one.
    let p = Policy { max_step: 2, ..p };
    let d = once(&p, &obs(1000, 0));
    assert_eq!(
        (d.replicas, d.target, d.reason.rule()),
        (2, 10, Rule::MaxStep)
    );
}

#[test]
fn from_spec_and_defaults() {
    let scaling = ScalingSpec {
        min_replicas: 0,
        max_replicas: 12,
        activation_backlog: 5,
        target_backlog_per_replica: 50,
        target_drain_seconds: 20,
        poll_interval_seconds: 2,
        cooldown_seconds: 90,
        scale_down_stabilization_seconds: 30,
        max_step: 4,
        signals: Vec::new(),
    };
    let concurrency = ConcurrencySpec {
        per_replica_tokens: 4,
        global_max_tokens: 32,
        lease_seconds: 30,
    };
    assert_eq!(
        Policy::from_spec(&scaling, &concurrency),
        Policy {
            min_replicas: 0,
            max_replicas: 12,
            activation_backlog: 5,
            target_backlog_per_replica: 50,
            target_drain_seconds: 20.0,
            cooldown_ms: 90_000,
            stabilization_ms: 30_000,
            max_step: 4,
            per_replica_tokens: 4,
            global_max_tokens: 32,
        }
    );
    let negative = ScalingSpec {
        min_replicas: -1,
        activation_backlog: -5,
        cooldown_seconds: -1,
        ..scaling
    };
    let p = Policy::from_spec(&negative, &concurrency);
    assert_eq!(
        (p.min_replicas, p.activation_backlog, p.cooldown_ms),
        (0, 0, 0)
    );

    // The defaults: 8 tokens per replica under 64 can feed 8 replicas, below max 10.
    let p = Policy::default();
    assert_eq!((p.min_replicas, p.max_replicas, p.token_cap()), (1, 10, 8));
    let d = once(&p, &obs(5000, 1));
    assert_eq!((d.replicas, d.reason.rule()), (8, Rule::TokenBudget));
}

#[test]
fn reasons_read_well() {
    let p = policy();
    let cases: Vec<(Observation, &str)> = vec![
        (
            Observation {
                partitions: Some(12),
                ..obs(4200, 1)
            },
            "backlog 4200 / 100 per replica -> 42, capped at 12 partitions",
        ),
        (
            Observation {
                arrival_rate: Some(120.0),
                per_replica_rate: Some(20.0),
                ..obs(3000, 1)
            },
            "(arrival 120/s + backlog 3000 in 30s) / 20.0/s per replica -> 11",
        ),
        (
            Observation {
                arrival_rate: Some(0.5),
                per_replica_rate: Some(2.5),
                ..obs(0, 1)
            },
            "(arrival 0.50/s + backlog 0 in 30s) / 2.5/s per replica -> 1",
        ),
        (
            Observation {
                in_flight: 41,
                ..obs(0, 6)
            },
            "backlog 0 / 100 per replica -> 0, raised to 5 for 41 in flight at 10 tokens per replica",
        ),
        (
            Observation {
                backlog: Err("kafka:9092: connection refused".into()),
                ..obs(0, 4)
            },
            "source unreachable (kafka:9092: connection refused): holding 4 replicas",
        ),
        (
            Observation {
                rebalancing: true,
                ..obs(0, 4)
            },
            "consumer group rebalancing: holding 4 replicas",
        ),
        (
            Observation {
                paused: true,
                ..obs(0, 4)
            },
            "paused: holding 4 replicas",
        ),
    ];
    for (o, text) in cases {
        assert_eq!(once(&p, &o).reason.to_string(), text);
    }
    let p = Policy {
        min_replicas: 0,
        activation_backlog: 10,
        global_max_tokens: 35,
        ..p
    };
    assert_eq!(
        once(&p, &obs(10, 0)).reason.to_string(),
        "backlog 10 / 100 per replica -> 1, kept at 0: backlog 10 <= activation 10"
    );
    assert_eq!(
        once(&p, &obs(900, 1)).reason.to_string(),
        "backlog 900 / 100 per replica -> 9, capped at 4 by the token budget (35 / 10 per replica)"
    );
    assert_eq!(Rule::PartitionCap.to_string(), "PartitionCap");
    assert!(Reason::Paused { replicas: 1 }.is_hold());
}

#[test]
fn window_memory_stays_small() {
    let p = Policy {
        stabilization_ms: 3_600 * SEC,
        max_replicas: 1000,
        ..policy()
    };
    let mut s = PolicyState::default();
    // A day of decisions every 2 s with recommendations going up and down.
    for i in 0..43_200u64 {
        let backlog = (i * 7919) % 100_000;
        decide(&p, &obs(backlog, 50), &mut s, i * 2 * SEC);
        assert!(s.recent.len() <= 1001);
    }
}

mod signals;
mod windows;
