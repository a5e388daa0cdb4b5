//! The end-to-end test's stream phase: a QueueProcessor on a Redis stream, its workers in pods
//! on the node, scaled from zero by the group's lag and back.

use std::time::{Duration, Instant};

use qp_protocol::keys::Keys;
use serde_json::json;

use crate::e2e::E2e;
use crate::fixture::{self, eventually};

const QP: &str = "stream";

pub async fn stream_queue_processor_in_pods(e: &E2e) {
    let t = Instant::now();
    let keys = Keys::new(&e.ns, QP);
    let stream = format!("{}entries", keys.prefix());
    let qp = json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": QP, "namespace": e.ns},
        "spec": {
            "source": {"redisStream": {"key": stream, "group": "workers",
                                       "trimAcknowledged": true}},
            "redis": {"url": e.env.get("QP_POD_REDIS_URL")},
            "concurrency": {"perReplicaTokens": 4, "globalMaxTokens": 16},
            "scaling": {"minReplicas": 0, "maxReplicas": 3, "targetBacklogPerReplica": 100,
                        "pollIntervalSeconds": 1, "cooldownSeconds": 3,
                        "scaleDownStabilizationSeconds": 2},
            "worker": e.worker_spec()
        }
    });
    e.apply_qp(&qp).await;
    let ids: Vec<String> = (0..300).map(|i| format!("st-{i}")).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("id")
            .arg(id)
            .arg("body")
            .arg(id)
            .ignore();
    }
    let _: () = pipe.query_async(&mut e.redis.clone()).await.unwrap();
    eventually(
        Duration::from_secs(120),
        "stream: 300 entries done",
        || async {
            let states = fixture::states(&e.redis, &keys, &ids).await;
            (states.values().filter(|s| *s == "done").count() == ids.len()).then_some(())
        },
    )
    .await;
    e.time(
        "stream QueueProcessor from 0 replicas: 300 entries done in pods",
        t.elapsed(),
    );
    let t = Instant::now();
    eventually(
        Duration::from_secs(60),
        "the stream workers back to 0",
        || async {
            let (desired, _) = e.replicas(&format!("{QP}-worker")).await;
            let len: i64 = redis::cmd("XLEN")
                .arg(&stream)
                .query_async(&mut e.redis.clone())
                .await
                .ok()?;
            (desired == 0 && len == 0).then_some(())
        },
    )
    .await;
    e.time(
        "stream drained to 0 replicas, acknowledged entries trimmed",
        t.elapsed(),
    );
    e.delete_qp(QP).await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut e.redis.clone())
        .await
        .unwrap();
}
