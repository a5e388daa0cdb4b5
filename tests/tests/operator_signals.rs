//! Scaling on Redis signals (`spec.scaling.signals`) with the operator against the real API
//! server and Redis: a counter, a hash field, a sorted set of scheduled jobs (only the due ones
//! count), a stream consumer group's lag and a counter's rate each scale a workload from zero
//! and back, honouring activation and cooldown; a key of the wrong type is a condition and an
//! event that name the key and its type; `kubectl get -o wide` shows the dominant signal.

use std::time::{Duration, Instant};

use qp_tests::cluster;
use qp_tests::fixture::eventually;
use qp_tests::operator::{Setup, apply_qp, condition, events, qp_status, replicas, setup};
use qp_tests::tools::kubectl;
use serde_json::{Value, json};

const COOLDOWN_S: u64 = 3;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn redis_cmd(s: &Setup, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut s.redis.clone()).await.unwrap()
}

/// A QueueProcessor whose own source (an empty Redis list) never asks for anything, with these
/// signals.
fn qp(s: &Setup, signals: Value) -> Value {
    json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": "signals", "namespace": s.ns},
        "spec": {
            "source": {"redisList": {"key": format!("{}:empty", s.ns)}},
            "redis": {"url": s.env.get("QP_REDIS_URL")},
            "concurrency": {"perReplicaTokens": 4, "globalMaxTokens": 100},
            "scaling": {
                "minReplicas": 0, "maxReplicas": 8, "pollIntervalSeconds": 1,
                "cooldownSeconds": COOLDOWN_S, "scaleDownStabilizationSeconds": 1,
                "signals": signals
            },
            "worker": {"handler": {"builtin": {"name": "echo"}}}
        }
    })
}

async fn wait_replicas(s: &Setup, n: i32, what: &str) -> Duration {
    let t = Instant::now();
    eventually(Duration::from_secs(30), what, || async {
        (replicas(s, "signals-worker").await.unwrap_or(0) == n).then_some(())
    })
    .await;
    t.elapsed()
}

/// The value the status reports for signal `name`, once it equals `v`.
async fn wait_value(s: &Setup, name: &str, v: f64) {
    eventually(
        Duration::from_secs(20),
        &format!("status shows {name} = {v}"),
        || async {
            let st = qp_status(s, "signals").await.status?;
            st.signals
                .iter()
                .any(|x| x.name == name && x.value == Some(v))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signals_scale_from_zero_and_back() {
    let s = setup("op-signals").await;
    let ns = s.ns.clone();
    // Keys share the namespace as a hash tag, as they would on Redis Cluster.
    let key = |k: &str| format!("{{{ns}}}:{k}");
    let (counter, hash, zset, stream, hits) = (
        key("pending"),
        key("jobs"),
        key("scheduled"),
        key("events"),
        key("hits"),
    );
    redis_cmd(
        &s,
        &["XGROUP", "CREATE", &stream, "workers", "$", "MKSTREAM"],
    )
    .await;
    let (_op, _) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(
        &s,
        &qp(
            &s,
            json!([
                {"name": "pending", "type": "counter", "key": counter,
                 "targetPerReplica": 10, "activation": 5},
                {"name": "jobs", "type": "hashField", "key": hash, "field": "queued",
                 "targetPerReplica": 10},
                {"name": "due", "type": "sortedSetSize", "key": zset, "dueOnly": true,
                 "targetPerReplica": 10},
                {"name": "events", "type": "streamLag", "key": stream, "group": "workers",
                 "targetPerReplica": 10},
                {"name": "hits", "type": "counterRate", "key": hits, "targetPerReplica": 25}
            ]),
        ),
    )
    .await;
    wait_value(&s, "pending", 0.0).await;
    assert_eq!(replicas(&s, "signals-worker").await.unwrap_or(0), 0);

    // A counter at its activation threshold does not wake the workload; above it, it does.
    redis_cmd(&s, &["SET", &counter, "5"]).await;
    wait_value(&s, "pending", 5.0).await;
    wait_value(&s, "pending", 5.0).await;
    assert_eq!(
        replicas(&s, "signals-worker").await.unwrap_or(0),
        0,
        "at activation"
    );
    redis_cmd(&s, &["SET", &counter, "45"]).await;
    let up = wait_replicas(&s, 5, "5 replicas for a counter of 45").await;
    // The status is written right after the Deployment: wait for it to catch up.
    let st = eventually(
        Duration::from_secs(10),
        "the status of that poll",
        || async {
            let st = qp_status(&s, "signals").await.status?;
            (st.summary.as_ref()?.dominant == "pending=45").then_some(st)
        },
    )
    .await;
    println!(
        "counter 45: 5 replicas after {up:.1?}; dominant {}",
        st.summary.unwrap().dominant
    );
    let wide = kubectl()
        .args(["get", "qp", "signals", "-n", &ns, "-o", "wide"])
        .output()
        .unwrap();
    let wide = String::from_utf8_lossy(&wide.stdout);
    println!("{wide}");
    assert!(
        wide.contains("SIGNAL") && wide.contains("pending=45"),
        "{wide}"
    );
    // Back to zero: the last replica waits for the cooldown.
    redis_cmd(&s, &["SET", &counter, "0"]).await;
    let down = wait_replicas(&s, 0, "back to 0").await;
    println!("counter 0: 0 replicas after {down:.1?} (cooldown {COOLDOWN_S} s)");
    assert!(down >= Duration::from_secs(COOLDOWN_S), "{down:?}");

    // A hash field.
    redis_cmd(&s, &["HSET", &hash, "queued", "30", "done", "900"]).await;
    wait_replicas(&s, 3, "3 replicas for a hash field of 30").await;
    redis_cmd(&s, &["HSET", &hash, "queued", "0"]).await;
    wait_replicas(&s, 0, "back to 0").await;

    // Scheduled jobs: only those due count.
    let later = format!("{}", unix_now() + 3600.0);
    let past = format!("{}", unix_now() - 10.0);
    for i in 0..20 {
        redis_cmd(&s, &["ZADD", &zset, &later, &format!("later-{i}")]).await;
    }
    wait_value(&s, "due", 0.0).await;
    assert_eq!(
        replicas(&s, "signals-worker").await.unwrap_or(0),
        0,
        "future jobs"
    );
    for i in 0..40 {
        redis_cmd(&s, &["ZADD", &zset, &past, &format!("due-{i}")]).await;
    }
    wait_replicas(&s, 4, "4 replicas for 40 due jobs").await;
    redis_cmd(&s, &["ZREMRANGEBYSCORE", &zset, "-inf", &past]).await;
    wait_replicas(&s, 0, "back to 0").await;

    // A stream consumer group's lag: entries not yet delivered to the group.
    for i in 0..60 {
        redis_cmd(&s, &["XADD", &stream, "*", "n", &i.to_string()]).await;
    }
    wait_replicas(&s, 6, "6 replicas for a lag of 60").await;
    redis_cmd(
        &s,
        &[
            "XREADGROUP",
            "GROUP",
            "workers",
            "c1",
            "COUNT",
            "100",
            "STREAMS",
            &stream,
            ">",
        ],
    )
    .await;
    wait_value(&s, "events", 0.0).await;
    wait_replicas(&s, 0, "back to 0 once the group read everything").await;

    // A counter's rate: about 100 increments a second at 25 per replica.
    let t = Instant::now();
    let target = 4;
    let mut reached = None;
    while t.elapsed() < Duration::from_secs(20) {
        redis_cmd(&s, &["INCRBY", &hits, "10"]).await;
        // Pacing of the load, not synchronization: 10 every 100 ms is the rate under test.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if replicas(&s, "signals-worker").await.unwrap_or(0) >= target {
            reached = Some(t.elapsed());
            break;
        }
    }
    let st = qp_status(&s, "signals").await.status.unwrap();
    let rate = st
        .signals
        .iter()
        .find(|x| x.name == "hits")
        .and_then(|x| x.value);
    println!("counter rate {rate:?}/s: {target} replicas after {reached:?}");
    assert!(
        reached.is_some(),
        "the rate of hits never scaled to {target} (rate {rate:?})"
    );
    wait_replicas(&s, 0, "back to 0 once the counter stops").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_of_the_wrong_type_is_named_in_a_condition_and_an_event() {
    let s = setup("op-signal-type").await;
    let list = format!("{{{}}}:a-list", s.ns);
    redis_cmd(&s, &["RPUSH", &list, "x"]).await;
    let (mut op, _) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    apply_qp(
        &s,
        &qp(
            &s,
            json!([{"name": "backlog", "type": "counter", "key": list, "targetPerReplica": 10}]),
        ),
    )
    .await;
    let message = eventually(
        Duration::from_secs(30),
        "SourceReachable False for the signal",
        || async {
            let qp = qp_status(&s, "signals").await;
            let (status, reason, message) = condition(&qp, "SourceReachable")?;
            (status == "False" && reason == "SignalUnreadable").then_some(message)
        },
    )
    .await;
    println!("{message}");
    assert!(
        message.contains(&format!("key {list} is a list")) && message.contains("needs a string"),
        "{message}"
    );
    let event = eventually(
        Duration::from_secs(20),
        "a SignalUnreadable event",
        || async { events(&s, "SignalUnreadable").await.into_iter().next() },
    )
    .await;
    assert!(event.note.unwrap_or_default().contains("is a list"));
    assert!(op.alive());
}

/// A signal read from another Redis than the QueueProcessor's, by reference: a counter on the
/// Redis Cluster (its key carries a hash tag, so it is read from the node that owns its slot),
/// the cluster's password from a Secret.
#[tokio::test(flavor = "multi_thread")]
async fn a_counter_on_redis_cluster_scales_from_zero_and_back() {
    use qp_protocol::redis_conn::RedisSettings;
    use qp_tests::operator::put_secret;

    let s = setup("op-signal-cluster").await;
    let nodes: Vec<String> = s
        .env
        .get("QP_REDIS_CLUSTER_NODES")
        .split(',')
        .map(|n| n.trim_start_matches("redis://").to_owned())
        .collect();
    let password = s.env.get("QP_REDIS_CLUSTER_PASSWORD");
    put_secret(&s, "cluster", json!({"password": password})).await;
    let cluster = RedisSettings::cluster(nodes.clone())
        .with_password(Some(password))
        .connect()
        .await
        .unwrap();
    let counter = format!("{{{}}}:pending", s.ns);
    let set = |v: &'static str| {
        let (mut c, counter) = (cluster.clone(), counter.clone());
        async move {
            let _: () = redis::cmd("SET")
                .arg(&counter)
                .arg(v)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    };
    let (_op, _) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    let mut spec = qp(
        &s,
        json!([{"name": "pending", "type": "counter", "key": counter, "targetPerReplica": 10}]),
    );
    // The QueueProcessor's own Redis stays the single one: the signal names the cluster, with
    // its password by reference, as an application's own Redis would be.
    spec["spec"]["scaling"]["signals"][0]["redis"] = json!({
        "clusterNodes": nodes,
        "passwordSecretRef": {"name": "cluster", "key": "password"}
    });
    apply_qp(&s, &spec).await;
    wait_value(&s, "pending", 0.0).await;
    set("25").await;
    let up = wait_replicas(&s, 3, "3 replicas for a counter of 25 on the cluster").await;
    set("0").await;
    let down = wait_replicas(&s, 0, "back to 0").await;
    println!("cluster counter: up in {up:.1?}, down in {down:.1?}");
    let _: () = redis::cmd("DEL")
        .arg(&counter)
        .query_async(&mut cluster.clone())
        .await
        .unwrap();
}

/// A Redis Streams source is scaled on its consumer group's lag plus its pending entries: read
/// but unacknowledged entries still need a replica.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_source_scales_on_lag_and_pending() {
    let s = setup("op-stream").await;
    let stream = format!("{{{}}}:orders", s.ns);
    redis_cmd(
        &s,
        &["XGROUP", "CREATE", &stream, "workers", "0", "MKSTREAM"],
    )
    .await;
    for i in 0..35 {
        redis_cmd(&s, &["XADD", &stream, "*", "body", &i.to_string()]).await;
    }
    let (_op, _) = cluster::start_operator(&s.env, &s.ns, "op-a", 15);
    let mut spec = qp(&s, json!([]));
    spec["spec"]["source"] = json!({"redisStream": {"key": stream, "group": "workers"}});
    spec["spec"]["scaling"]["targetBacklogPerReplica"] = json!(10);
    apply_qp(&s, &spec).await;
    wait_replicas(&s, 4, "4 replicas for a lag of 35").await;
    // 20 read, not acknowledged: still a backlog of 35.
    redis_cmd(
        &s,
        &[
            "XREADGROUP",
            "GROUP",
            "workers",
            "c",
            "COUNT",
            "20",
            "STREAMS",
            &stream,
            ">",
        ],
    )
    .await;
    // The status is written after the Deployment: wait for a measurement after the read.
    let st = eventually(
        Duration::from_secs(20),
        "a status after the read",
        || async {
            let st = qp_status(&s, "signals").await.status?;
            let lag = st.signals.is_empty() && st.summary.is_some();
            lag.then_some(st)
        },
    )
    .await;
    assert_eq!(st.backlog, Some(35), "lag 15 + pending 20");
    assert_eq!(st.summary.unwrap().source, format!("stream:{stream}"));
    // Acknowledged: 15 left.
    let pending: redis::Value =
        redis_cmd(&s, &["XPENDING", &stream, "workers", "-", "+", "100"]).await;
    let redis::Value::Array(entries) = pending else {
        panic!("XPENDING: {pending:?}")
    };
    for e in entries {
        let redis::Value::Array(fields) = e else {
            continue;
        };
        if let Some(redis::Value::BulkString(id)) = fields.first() {
            let id = String::from_utf8_lossy(id).into_owned();
            redis_cmd(&s, &["XACK", &stream, "workers", &id]).await;
        }
    }
    wait_replicas(&s, 2, "2 replicas for 15 left").await;
}
