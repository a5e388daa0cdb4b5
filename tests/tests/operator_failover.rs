//! A new leader goes on where the old one stopped: `qp-operator run` twice against the real
//! kube-apiserver, Kafka and Redis, the leader killed in the middle of a scale-down window.

use std::time::Duration;

use jiff::Timestamp;
use qp_tests::cluster;
use qp_tests::fixture::eventually;
use qp_tests::kafka;
use qp_tests::operator::*;
use serde_json::json;

const WINDOW_SECONDS: i64 = 30;

/// The stabilization window and the cooldown survive a failover. The first leader scales to 8
/// on a backlog, the backlog is worked off (committed), and the leader holds 8 replicas for the
/// window; it is killed 10 s into the window. The new leader keeps holding 8 and removes them
/// when the window and the cooldown that started on the first leader end. Before, the new
/// leader started with an empty memory: 8 -> 1 at its first decision (a fresh cooldown kept
/// one), and zero a whole cooldown after the takeover.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_keeps_the_window_and_the_cooldown() {
    let s = setup("op-failover").await;
    let bootstrap = s.env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("op-{}", s.ns);
    let group = format!("{topic}-group");
    kafka::create_topic(&bootstrap, &topic, 8).await;
    let ids: Vec<String> = (0..80).map(|i| format!("m{i}")).collect();
    kafka::send_many(&kafka::producer(&bootstrap), &topic, &ids).await;

    let lease_secs = 4;
    let (mut a, _port_a) = cluster::start_operator(&s.env, &s.ns, "op-a", lease_secs);
    let mut qp = kafka_qp(&s, "orders", &topic, 0, json!({}));
    qp["spec"]["scaling"]["scaleDownStabilizationSeconds"] = json!(WINDOW_SECONDS);
    qp["spec"]["scaling"]["cooldownSeconds"] = json!(WINDOW_SECONDS);
    apply_qp(&s, &qp).await;
    eventually(Duration::from_secs(20), "8 replicas", || async {
        (replicas(&s, "orders-worker").await == Some(8)).then_some(())
    })
    .await;

    // The backlog is gone: the leader goes idle and holds 8 for the window.
    commit_all(&bootstrap, &topic, &group, 8);
    let idle_since = eventually(
        Duration::from_secs(20),
        "idleSince in the status",
        || async {
            let qp = qp_status(&s, "orders").await;
            let memory = qp.status?.scaling_memory?;
            (memory.recommendations.first()?.replicas == 8).then_some(())?;
            memory.idle_since.map(|t| t.0)
        },
    )
    .await;
    assert_eq!(replicas(&s, "orders-worker").await, Some(8));

    // Fail over 10 s into the window: the follower waits meanwhile, the leader dies.
    let (_b, port_b) = cluster::start_operator(&s.env, &s.ns, "op-b", lease_secs);
    eventually(Duration::from_secs(30), "10 s of idleness", || async {
        (Timestamp::now().duration_since(idle_since).as_secs() >= 10).then_some(())
    })
    .await;
    a.kill9();
    eventually(
        Duration::from_secs(lease_secs + 10),
        "op-b deciding",
        || async { cluster::metric(port_b, "qp_operator_desired_replicas").await },
    )
    .await;
    assert_eq!(
        cluster::metric(port_b, "qp_operator_desired_replicas").await,
        Some(8.0),
        "the new leader's first decision dropped what the window held"
    );
    assert_eq!(replicas(&s, "orders-worker").await, Some(8));

    // Zero when the window and cooldown that began on op-a end, not a cooldown after takeover.
    eventually(
        Duration::from_secs(WINDOW_SECONDS as u64 + 15),
        "0 replicas",
        || async { (replicas(&s, "orders-worker").await == Some(0)).then_some(()) },
    )
    .await;
    let idle = Timestamp::now().duration_since(idle_since).as_secs_f64();
    println!("idle {idle:.1} s before scaling to zero (window and cooldown {WINDOW_SECONDS} s)");
    // idleSince has a resolution of a second; polls come every second.
    assert!(
        idle >= WINDOW_SECONDS as f64 - 1.0 && idle <= WINDOW_SECONDS as f64 + 4.0,
        "scaled to zero after {idle:.1} s of idleness"
    );
    cluster::delete_namespace(&s.client, &s.ns).await;
}
