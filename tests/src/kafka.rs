//! Kafka helpers for tests and benchmarks: topics, bulk production, and outages.

use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

pub fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client")
}

/// Create a topic and wait until it exists.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let res = admin(bootstrap)
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

pub async fn delete_topic(bootstrap: &str, topic: &str) {
    let _ = admin(bootstrap)
        .delete_topics(&[topic], &AdminOptions::new())
        .await;
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// Produce one message with a `qp-id` header (and optional content type) and wait for it.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    id: &str,
    key: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "qp-id",
        value: Some(id.as_bytes()),
    });
    if let Some(ct) = content_type {
        headers = headers.insert(Header {
            key: "content-type",
            value: Some(ct.as_bytes()),
        });
    }
    let mut record = FutureRecord::to(topic).payload(body).headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .unwrap_or_else(|(e, _)| panic!("producing {id}: {e}"));
}

/// Produce `ids` as messages whose body is the id, concurrently, and wait for all.
pub async fn send_many(producer: &FutureProducer, topic: &str, ids: &[String]) {
    let futures = ids.iter().map(|id| {
        let headers = OwnedHeaders::new().insert(Header {
            key: "qp-id",
            value: Some(id.as_bytes()),
        });
        producer.send(
            FutureRecord::to(topic)
                .key(id.as_str())
                .payload(id.as_bytes())
                .headers(headers),
            Duration::from_secs(30),
        )
    });
    for r in futures::future::join_all(futures).await {
        r.unwrap_or_else(|(e, _)| panic!("producing: {e}"));
    }
}

/// Produce one message with a `qp-id` header to partition `partition` and wait for it.
pub async fn send_to(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    id: &str,
    key: Option<&str>,
    body: &[u8],
) {
    let headers = OwnedHeaders::new().insert(Header {
        key: "qp-id",
        value: Some(id.as_bytes()),
    });
    let mut record = FutureRecord::to(topic)
        .partition(partition)
        .payload(body)
        .headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .unwrap_or_else(|(e, _)| panic!("producing {id}: {e}"));
}

/// Per partition of `topic` (0..partitions): the offset `group` committed (-1 when none) and
/// the high watermark. Lag is the difference.
pub async fn committed_and_end(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<(i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let (bootstrap, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        // A consumer that names the group but never joins it: it only reads the group's offsets.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .create()
            .expect("consumer");
        let timeout = Duration::from_secs(10);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, timeout)
            .expect("committed offsets");
        (0..partitions)
            .map(|p| {
                let c = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                };
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, timeout)
                    .expect("watermarks");
                (c, high)
            })
            .collect()
    })
    .await
    .expect("committed_and_end task")
}

/// Messages ever written to `topic`: the sum of its partitions' high watermarks (one request per
/// partition; for tests, not for loops).
pub async fn message_count(bootstrap: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("consumer");
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(&topic), timeout)
            .expect("topic metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        (0..partitions)
            .map(|p| {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, timeout)
                    .expect("watermarks");
                assert_eq!(low, 0, "nothing was deleted from a fresh test topic");
                high
            })
            .sum()
    })
    .await
    .expect("message_count task")
}

/// Kafka stopped through `hack/env.sh stop kafka`; started again by [`Outage::end`] or on drop,
/// also when the test panics, so a failed assertion never leaves Kafka down for the next test.
pub struct Outage {
    running: bool,
}

fn env_sh(action: &str) -> bool {
    env_sh_service(action, "kafka")
}

fn env_sh_service(action: &str, service: &str) -> bool {
    Command::new("bash")
        .arg(crate::env::workspace_root().join("hack/env.sh"))
        .args([action, service])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A second Kafka broker, node [`SecondBroker::ID`] (`hack/env.sh start kafka-broker2`), stopped
/// on drop. Use it from a test binary of its own with one test: while it runs, topics that
/// other tests create could get partitions on it, and they would lose them when it stops.
pub struct SecondBroker {
    running: bool,
}

impl SecondBroker {
    pub const ID: i32 = 2;

    /// Start the broker; returns once it has started.
    pub fn start() -> SecondBroker {
        assert!(
            env_sh_service("start", "kafka-broker2"),
            "hack/env.sh start kafka-broker2 failed"
        );
        SecondBroker { running: true }
    }

    /// Stop it (its partitions lose their leader once the controller fences it).
    pub fn stop(&mut self) {
        self.running = false;
        assert!(
            env_sh_service("stop", "kafka-broker2"),
            "hack/env.sh stop kafka-broker2 failed"
        );
    }

    /// Start it again, with its data.
    pub fn restart(&mut self) {
        assert!(
            env_sh_service("start", "kafka-broker2"),
            "hack/env.sh start kafka-broker2 failed"
        );
        self.running = true;
    }
}

impl Drop for SecondBroker {
    fn drop(&mut self) {
        if self.running && !env_sh_service("stop", "kafka-broker2") {
            eprintln!(
                "could not stop the second broker: run `bash hack/env.sh stop kafka-broker2`"
            );
        }
    }
}

impl Outage {
    /// Stop Kafka; returns once it is down.
    pub fn begin() -> Outage {
        assert!(env_sh("stop"), "hack/env.sh stop kafka failed");
        Outage { running: false }
    }

    /// Start Kafka again; returns once it answers.
    pub fn end(&mut self) {
        if !self.running {
            self.running = true;
            assert!(env_sh("start"), "hack/env.sh start kafka failed");
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A second panic here would abort the test binary: only say what to do.
            if !self.running && !env_sh("start") {
                eprintln!("could not restart Kafka: run `bash hack/env.sh start kafka`");
            }
        } else {
            self.end();
        }
    }
}

/// The Kafka broker unregistered from its KRaft controller (Kafka's own `kafka-cluster
/// unregister`), so it is fenced while it keeps running: it answers every Metadata request
/// listing no broker at all, as a broker does for a moment while it starts or stops. It stays
/// fenced until it restarts: [`Fence::lift`] or drop (also when the test panics) restarts it.
pub struct Fence {
    lifted: bool,
}

impl Fence {
    /// Unregister the single broker (node 1).
    pub fn broker() -> Fence {
        let env = crate::env::load();
        let libs = format!("{}/*", env.get("QP_KAFKA_LIBS"));
        let bootstrap = env.get("QP_KAFKA_BOOTSTRAP");
        let out = Command::new("java")
            .args([
                "-Xmx128m",
                "-cp",
                &libs,
                "org.apache.kafka.tools.ClusterTool",
            ])
            .args(["unregister", "--bootstrap-server", &bootstrap, "--id", "1"])
            .output()
            .expect("running java (Kafka's ClusterTool)");
        assert!(
            out.status.success(),
            "kafka-cluster unregister failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Fence { lifted: false }
    }

    /// Restart the broker, which registers it again; returns once it answers.
    pub fn lift(&mut self) {
        if !self.lifted {
            self.lifted = true;
            let mut outage = Outage::begin();
            outage.end();
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        if self.lifted {
            return;
        }
        if !(env_sh("stop") && env_sh("start")) {
            eprintln!(
                "could not restart Kafka: run `bash hack/env.sh stop kafka; bash hack/env.sh start kafka`"
            );
        }
    }
}
