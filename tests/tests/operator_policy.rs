//! Scaling rules seen from outside: `qp-operator run` against the real kube-apiserver, Kafka
//! and Redis, with pods that never start (the node is tainted against them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kube::Api;
use qp_operator::crd::QueueProcessor;
use qp_tests::cluster;
use qp_tests::fixture::eventually;
use qp_tests::kafka;
use qp_tests::operator::*;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;

/// The default `maxStep` goes straight to the computed count: 640 messages at 10 per replica
/// on 64 partitions is 64 replicas in one decision. The old default (10) climbed a staircase,
/// one rebalance per step, against what the documentation promised.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_step_reaches_the_computed_count_at_once() {
    let s = setup("op-step").await;
    let bootstrap = s.env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("op-{}", s.ns);
    kafka::create_topic(&bootstrap, &topic, 64).await;
    // The whole backlog first, so the first decision sees all of it.
    let ids: Vec<String> = (0..640).map(|i| format!("m{i}")).collect();
    kafka::send_many(&kafka::producer(&bootstrap), &topic, &ids).await;
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    let mut qp = kafka_qp(&s, "orders", &topic, 1, json!({}));
    qp["spec"]["scaling"]["maxReplicas"] = json!(64);
    qp["spec"]["concurrency"]["globalMaxTokens"] = json!(1000);
    apply_qp(&s, &qp).await;
    eventually(Duration::from_secs(20), "64 replicas", || async {
        (replicas(&s, "orders-worker").await == Some(64)).then_some(())
    })
    .await;
    // The event follows the apply: wait for it, then it must be the one step.
    let notes = eventually(Duration::from_secs(10), "a ScaledUp event", || async {
        let notes: Vec<String> = events(&s, "ScaledUp")
            .await
            .iter()
            .filter_map(|e| e.note.clone())
            .collect();
        (!notes.is_empty()).then_some(notes)
    })
    .await;
    assert!(
        notes.iter().any(|n| n.starts_with("replicas 1 -> 64")),
        "not one step: {notes:?}"
    );
}

/// Commit `group`'s offset on partition 0 of `topic` at `offset`.
fn commit_at(bootstrap: &str, topic: &str, group: &str, offset: i64) {
    let consumer = committer(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("commit offsets");
}

/// With `minReplicas: 0`, a backlog at or below `activationBacklog` neither wakes the
/// workload nor keeps it awake: after the cooldown the last replica goes although a trickle
/// of messages waits. It used to stay at one replica for as long as any message waited.
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_below_activation_lets_the_workload_scale_to_zero() {
    let s = setup("op-deact").await;
    let bootstrap = s.env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("op-{}", s.ns);
    let group = format!("{topic}-group");
    kafka::create_topic(&bootstrap, &topic, 1).await;
    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    let mut qp = kafka_qp(&s, "orders", &topic, 0, json!({}));
    qp["spec"]["scaling"]["activationBacklog"] = json!(10);
    apply_qp(&s, &qp).await;
    let ids: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    kafka::send_many(&kafka::producer(&bootstrap), &topic, &ids).await;
    eventually(Duration::from_secs(20), "activated: 1 replica", || async {
        (replicas(&s, "orders-worker").await == Some(1)).then_some(())
    })
    .await;
    // Worked down to 5 waiting, below the threshold of 10.
    commit_at(&bootstrap, &topic, &group, 25);
    eventually(Duration::from_secs(30), "0 replicas", || async {
        (replicas(&s, "orders-worker").await == Some(0)).then_some(())
    })
    .await;
    let api: Api<QueueProcessor> = Api::namespaced(s.client.clone(), &s.ns);
    let qp = api.get("orders").await.unwrap();
    assert_eq!(
        qp.status.unwrap().backlog,
        Some(5),
        "the trickle is still there"
    );
}

/// A group member that never finishes a rebalance: its revocation callback blocks (as a
/// handler stuck in a rebalance listener would), so the coordinator waits for it until its
/// rebalance timeout and the group stays `PreparingRebalance`.
struct StuckInRebalance {
    assigned: Arc<AtomicBool>,
    release: Arc<(Mutex<bool>, Condvar)>,
}

impl ClientContext for StuckInRebalance {}

impl ConsumerContext for StuckInRebalance {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance) {
        if let Rebalance::Revoke(_) = rebalance {
            let (lock, cvar) = &*self.release;
            let released = lock.lock().unwrap();
            let _ = cvar
                .wait_timeout_while(released, Duration::from_secs(150), |r| !*r)
                .unwrap();
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned.store(true, Ordering::SeqCst);
        }
    }
}

/// Poll `consumer` on a thread until `stop`.
fn poll_until<C: ConsumerContext + 'static>(
    consumer: BaseConsumer<C>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let _ = consumer.poll(Duration::from_millis(100));
        }
    })
}

/// Decisions hold while the group rebalances, but not for ever: with a member stuck in its
/// rebalance (the group waits for it up to its 120 s rebalance timeout), a backlog is acted on
/// once the rebalance hold (30 s) has passed. Scaling used to stay frozen until the group
/// settled, however long that took.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_that_never_ends_does_not_freeze_scaling() {
    let s = setup("op-rebal").await;
    let bootstrap = s.env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("op-{}", s.ns);
    let group = format!("{topic}-group");
    kafka::create_topic(&bootstrap, &topic, 8).await;
    let member = |ctx_group: &str| {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &bootstrap)
            .set("group.id", ctx_group)
            .set("enable.auto.commit", "false")
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "10000")
            .set("max.poll.interval.ms", "120000");
        c
    };
    let stop = Arc::new(AtomicBool::new(false));
    let release = Arc::new((Mutex::new(false), Condvar::new()));
    let assigned = Arc::new(AtomicBool::new(false));
    let stuck: BaseConsumer<StuckInRebalance> = member(&group)
        .create_with_context(StuckInRebalance {
            assigned: assigned.clone(),
            release: release.clone(),
        })
        .unwrap();
    stuck.subscribe(&[&topic]).unwrap();
    let stuck_thread = poll_until(stuck, stop.clone());
    eventually(
        Duration::from_secs(30),
        "the first member assigned",
        || async { assigned.load(Ordering::SeqCst).then_some(()) },
    )
    .await;
    // A second member joins: the group rebalances and waits for the stuck one.
    let joiner: BaseConsumer = member(&group).create().unwrap();
    joiner.subscribe(&[&topic]).unwrap();
    let joiner_thread = poll_until(joiner, stop.clone());

    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(&s, &kafka_qp(&s, "orders", &topic, 1, json!({}))).await;
    eventually(
        Duration::from_secs(30),
        "Scaling held for the rebalance",
        || async {
            let (_, reason, _) = condition(&qp_status(&s, "orders").await, "Scaling")?;
            (reason == "Rebalancing").then_some(())
        },
    )
    .await;
    let ids: Vec<String> = (0..45).map(|i| format!("m{i}")).collect();
    kafka::send_many(&kafka::producer(&bootstrap), &topic, &ids).await;
    // The hold is 30 s from the first poll that saw the rebalance; the stuck member would
    // hold the group for 120 s.
    eventually(
        Duration::from_secs(50),
        "5 replicas despite the rebalance",
        || async { (replicas(&s, "orders-worker").await == Some(5)).then_some(()) },
    )
    .await;

    {
        let (lock, cvar) = &*release;
        *lock.lock().unwrap() = true;
        cvar.notify_all();
    }
    stop.store(true, Ordering::SeqCst);
    stuck_thread.join().unwrap();
    joiner_thread.join().unwrap();
}
