//! `qp-worker replay` against real Redis and Kafka: dead letters go back onto the source and run
//! again once the handler is fixed. Dead letters could not be re-driven before: results are
//! write-once (a re-produced message was skipped as a duplicate) and a Redis dead-letter entry
//! (an envelope with a `reason`) was rejected as malformed when pushed back.

use std::process::{Command, Output};
use std::time::Duration;

use qp_tests::fixture::{Fixture, RedisKind, eventually};
use qp_tests::kafka;
use qp_tests::procs;
use qp_worker::source::redis_list::Envelope;

/// `qp-worker replay` for the fixture's QueueProcessor with `args`; waits for it to exit.
fn replay(fx: &Fixture, args: &[&str]) -> Output {
    let out = Command::new(procs::binary("qp-worker"))
        .arg("replay")
        .args(["--namespace", &fx.namespace, "--name", &fx.name])
        .args(["--redis-url", &fx.env.get("QP_REDIS_URL")])
        .args(args)
        .output()
        .expect("running qp-worker replay");
    println!(
        "qp-worker replay {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn state(fx: &Fixture, id: &str) -> Option<String> {
    fx.states(&[id.to_owned()]).await.remove(id)
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_a_redis_list_run_again_after_a_replay() {
    let fx = Fixture::new("replay-list", RedisKind::Single, 0).await;
    fx.pool().set_limit(2).await.unwrap();
    let list = format!("{}queue", fx.keys.prefix());
    let dlq = fx.keys.dead_letter();
    let mut pipe = redis::pipe();
    for (id, body) in [
        ("p-1", "poison one"),
        ("p-2", "poison two"),
        ("ok-1", "fine"),
    ] {
        pipe.cmd("LPUSH")
            .arg(&list)
            .arg(Envelope::new(id, Some("text/plain"), body.as_bytes()).to_bytes())
            .ignore();
    }
    let _: () = pipe.query_async(&mut fx.conn.clone()).await.unwrap();
    let all: Vec<String> = ["p-1", "p-2", "ok-1"].map(String::from).to_vec();
    let mut broken = fx.list_worker("w0", &list, "fail:poison", &["--retries", "0"]);
    fx.wait_finished(&all, Duration::from_secs(30)).await;
    assert_eq!(fx.llen(&dlq).await, 2);
    assert!(broken.terminate());

    let source = ["--source", "redis-list", "--list-key", &list];
    // A dry run lists and changes nothing.
    let out = replay(&fx, &[&source[..], &["--all", "--dry-run"]].concat());
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would replay p-1") && text.contains("would replay p-2"),
        "{text}"
    );
    assert_eq!(fx.llen(&dlq).await, 2);
    assert_eq!(fx.llen(&list).await, 0);
    assert_eq!(state(&fx, "p-1").await.as_deref(), Some("failed"));

    // The handler is fixed; one id is replayed, then an unknown one fails the command.
    let _fixed = fx.list_worker("w1", &list, "echo", &[]);
    let out = replay(&fx, &[&source[..], &["--id", "p-1"]].concat());
    assert!(out.status.success());
    eventually(Duration::from_secs(30), "p-1 to run again", || async {
        (state(&fx, "p-1").await.as_deref() == Some("done")).then_some(())
    })
    .await;
    assert_eq!(state(&fx, "p-2").await.as_deref(), Some("failed"));
    assert_eq!(fx.llen(&dlq).await, 1, "the replayed entry is gone");
    let out = replay(&fx, &[&source[..], &["--id", "nope"]].concat());
    assert!(
        !out.status.success(),
        "an id without a dead letter is an error"
    );
    let out = replay(&fx, &[&source[..], &["--all"]].concat());
    assert!(out.status.success());
    eventually(Duration::from_secs(30), "p-2 to run again", || async {
        (state(&fx, "p-2").await.as_deref() == Some("done")).then_some(())
    })
    .await;
    assert_eq!(fx.llen(&dlq).await, 0);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_a_kafka_topic_run_again_after_a_replay() {
    let fx = Fixture::new("replay-kafka", RedisKind::Single, 1).await;
    fx.pool().set_limit(2).await.unwrap();
    let dlq_topic = format!("{}-dead", fx.topic);
    kafka::create_topic(&fx.bootstrap, &dlq_topic, 1).await;
    let producer = kafka::producer(&fx.bootstrap);
    kafka::send(
        &producer,
        &fx.topic,
        "p-1",
        Some("k1"),
        Some("text/plain"),
        b"poison",
    )
    .await;
    kafka::send(&producer, &fx.topic, "ok-1", None, None, b"fine").await;
    let dead_letter = format!("kafka:{dlq_topic}");
    let mut broken = fx.kafka_worker(
        "w0",
        "fail:poison",
        &["--retries", "0", "--dead-letter", &dead_letter],
    );
    let all: Vec<String> = ["p-1", "ok-1"].map(String::from).to_vec();
    fx.wait_finished(&all, Duration::from_secs(30)).await;
    assert_eq!(state(&fx, "p-1").await.as_deref(), Some("failed"));
    assert!(broken.terminate());

    let _fixed = fx.kafka_worker("w1", "echo", &[]);
    let out = replay(
        &fx,
        &[
            "--source",
            "kafka",
            "--kafka-bootstrap",
            &fx.bootstrap,
            "--kafka-topic",
            &fx.topic,
            "--dead-letter",
            &dead_letter,
            "--all",
        ],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 1 of 1"));
    eventually(Duration::from_secs(30), "p-1 to run again", || async {
        (state(&fx, "p-1").await.as_deref() == Some("done")).then_some(())
    })
    .await;
    let result: Option<String> = redis::cmd("HGET")
        .arg(fx.keys.result("p-1"))
        .arg("body")
        .query_async(&mut fx.conn.clone())
        .await
        .unwrap();
    assert_eq!(
        result.as_deref(),
        Some("poison"),
        "the original body ran again"
    );
    kafka::delete_topic(&fx.bootstrap, &dlq_topic).await;
    fx.cleanup().await;
}
