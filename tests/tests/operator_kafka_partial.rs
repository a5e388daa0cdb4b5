//! A partial answer from Kafka: one partition of a topic loses its only replica while the rest
//! of the cluster answers. Real Kafka with a second broker (`hack/env.sh start kafka-broker2`);
//! this binary holds one test, because topics other tests create while the second broker runs
//! could land on it.

use std::time::Duration;

use qp_tests::cluster;
use qp_tests::fixture::eventually;
use qp_tests::kafka::{self, SecondBroker};
use qp_tests::operator::*;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::producer::FutureRecord;
use serde_json::json;

/// A partition without a leader is a failed measurement: replicas hold and `SourceReachable`
/// turns False naming the topic. It used to count as a lag of 0, so the backlog waiting on that
/// partition vanished and the workload scaled down (and, once the partition was back, its log
/// end read as a burst of arrivals).
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_without_a_leader_holds_replicas() {
    let s = setup("op-partial").await;
    let bootstrap = s.env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("op-{}", s.ns);
    let mut broker2 = SecondBroker::start();
    // Partition 0 on broker 1, partition 1 on broker 2 only. The new broker may take a moment
    // to register with the controller.
    eventually(
        Duration::from_secs(30),
        "the topic on two brokers",
        || async {
            let res = kafka::admin(&bootstrap)
                .create_topics(
                    [&NewTopic::new(
                        &topic,
                        2,
                        TopicReplication::Variable(&[&[1], &[SecondBroker::ID]]),
                    )],
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                )
                .await
                .ok()?;
            res.into_iter().all(|r| r.is_ok()).then_some(())
        },
    )
    .await;
    // 40 messages, all on partition 1: 4 replicas' worth, capped at the 2 partitions.
    let producer = kafka::producer(&bootstrap);
    for i in 0..40 {
        let key = format!("m{i}");
        producer
            .send(
                FutureRecord::to(&topic).partition(1).key(&key).payload("x"),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing {key}: {e}"));
    }

    let (_op, _port) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(&s, &kafka_qp(&s, "orders", &topic, 1, json!({}))).await;
    eventually(Duration::from_secs(30), "2 replicas", || async {
        (replicas(&s, "orders-worker").await == Some(2)).then_some(())
    })
    .await;

    broker2.stop();
    let (_, reason, message) =
        eventually(Duration::from_secs(60), "SourceReachable False", || async {
            let c = condition(&qp_status(&s, "orders").await, "SourceReachable")?;
            (c.0 == "False").then_some(c)
        })
        .await;
    println!("with partition 1 away: {reason}: {message}");
    assert_eq!(reason, "SourceUnreachable", "{message}");
    assert!(message.contains(&topic), "{message}");
    let status = qp_status(&s, "orders").await.status.unwrap();
    assert_eq!(replicas(&s, "orders-worker").await, Some(2));
    assert_eq!(
        status.backlog,
        Some(40),
        "the last backlog measured in full"
    );

    // Back: measured in full again, the same backlog, still 2 replicas.
    broker2.restart();
    eventually(Duration::from_secs(60), "SourceReachable True", || async {
        let c = condition(&qp_status(&s, "orders").await, "SourceReachable")?;
        (c.0 == "True").then_some(())
    })
    .await;
    let status = qp_status(&s, "orders").await.status.unwrap();
    assert_eq!(status.backlog, Some(40));
    assert_eq!(replicas(&s, "orders-worker").await, Some(2));
    kafka::delete_topic(&bootstrap, &topic).await;
    drop(broker2);
    cluster::delete_namespace(&s.client, &s.ns).await;
}
