//! One smoke test per local service, proving each is the real thing and reachable at the address
//! the env file gives. If one of these fails, every other test would fail for the same reason, so
//! they are the first place to look.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use redis::AsyncCommands;

use qp_tests::env;

#[tokio::test]
async fn kube_apiserver_creates_and_reads_a_namespace() {
    let client = env::kube_client().await;
    let version = client.apiserver_version().await.expect("GET /version");
    let wanted = env::load().get("QP_K8S_VERSION");
    assert_eq!(
        version.git_version, wanted,
        "API server reports the built version"
    );

    let namespaces: Api<Namespace> = Api::all(client);
    let name = format!("smoke-{}", uuid::Uuid::new_v4().simple());
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    let read = namespaces.get(&name).await.expect("read namespace back");
    assert_eq!(read.metadata.name.as_deref(), Some(name.as_str()));
    assert!(read.metadata.uid.is_some(), "the API server assigned a uid");
    namespaces
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete namespace");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_creates_a_topic_and_round_trips_a_message() {
    let bootstrap = env::load().get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("smoke-{}", uuid::Uuid::new_v4().simple());

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            [&NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    assert!(
        created.iter().all(|r| r.is_ok()),
        "topic created: {created:?}"
    );

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload("hello kafka"),
            Duration::from_secs(10),
        )
        .await
        .expect("message delivered");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("{topic}-group"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a message within 30 s")
        .expect("consume");
    assert_eq!(msg.payload(), Some(&b"hello kafka"[..]));
    drop(msg);
    eprintln!("consumed; closing consumer");
    drop(consumer);
    eprintln!("consumer closed; deleting topic");

    admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .expect("delete topic");
}

const LUA_INCR_IF_BELOW: &str = r#"
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v < tonumber(ARGV[1]) then return redis.call('INCR', KEYS[1]) end
return -1
"#;

#[tokio::test]
async fn redis_runs_a_lua_script() {
    let url = env::load().get("QP_REDIS_URL");
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let key = format!("smoke:{}", uuid::Uuid::new_v4().simple());
    let script = redis::Script::new(LUA_INCR_IF_BELOW);
    let a: i64 = script
        .key(&key)
        .arg(2)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    let b: i64 = script
        .key(&key)
        .arg(2)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    let c: i64 = script
        .key(&key)
        .arg(2)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((a, b, c), (1, 2, -1));
    let _: () = conn.del(&key).await.unwrap();
}

#[tokio::test]
async fn redis_cluster_runs_a_lua_script_with_a_password() {
    let env = env::load();
    let nodes: Vec<String> = env
        .get("QP_REDIS_CLUSTER_NODES")
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(nodes.len(), 6, "three masters and their replicas");

    // Without the password the cluster refuses us: the password is really enforced.
    let anonymous = redis::cluster::ClusterClient::new(nodes.clone()).unwrap();
    assert!(anonymous.get_async_connection().await.is_err());

    let client = redis::cluster::ClusterClientBuilder::new(nodes)
        .password(env.get("QP_REDIS_CLUSTER_PASSWORD"))
        .build()
        .unwrap();
    let mut conn = client
        .get_async_connection()
        .await
        .expect("cluster connect");
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(info.contains("cluster_state:ok"), "{info}");

    // Keys in three different hash tags land on different slots; the script runs where each lives.
    let script = redis::Script::new(LUA_INCR_IF_BELOW);
    for tag in ["a", "b", "c"] {
        let key = format!("smoke:{{{tag}-{}}}", uuid::Uuid::new_v4().simple());
        let first: i64 = script
            .key(&key)
            .arg(1)
            .invoke_async(&mut conn)
            .await
            .unwrap();
        let second: i64 = script
            .key(&key)
            .arg(1)
            .invoke_async(&mut conn)
            .await
            .unwrap();
        assert_eq!((first, second), (1, -1));
        let _: () = conn.del(&key).await.unwrap();
    }
}

#[tokio::test]
async fn prometheus_answers_a_query() {
    let url = env::load().get("QP_PROMETHEUS_URL");
    let http = reqwest::Client::new();
    let build: serde_json::Value = http
        .get(format!("{url}/api/v1/status/buildinfo"))
        .send()
        .await
        .expect("prometheus reachable")
        .json()
        .await
        .unwrap();
    assert_eq!(build["status"], "success");
    assert!(build["data"]["version"].as_str().is_some());

    let query: serde_json::Value = http
        .get(format!("{url}/api/v1/query"))
        .query(&[("query", "vector(1) + 1")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(query["status"], "success", "{query}");
    assert_eq!(query["data"]["result"][0]["value"][1], "2");
}
