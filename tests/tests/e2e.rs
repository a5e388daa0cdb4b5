//! End to end, as users run it: the project's image on a real node (kubelet, containerd, runc,
//! kube-proxy, a CNI bridge; see `hack/node.sh`), the chart installed with `helm install`, and
//! QueueProcessors whose workers and gateway really run in pods against Kafka and Redis.
//!
//! One test, in phases, because one operator watches every namespace (the chart's default) and
//! a second release would fight it over the same QueueProcessors. Each phase prints how long it
//! took; the times are also appended to `$QP_RUN/e2e-times.txt`, which `make test` shows.
//!
//! The node carries a taint that only these pods tolerate (older tests play the kubelet for
//! Deployments that must not start); that toleration is the only value given to the chart
//! beyond a test's own choices.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::RedisSettings;
use qp_tests::chart::{chart_app_version, chart_dir};
use qp_tests::e2e::{
    E2e, FULLNAME, RELEASE, chart_values, collect_queries, is_ready, lease_holder, operator_pods,
    prometheus_query, sample, start_prometheus,
};
use qp_tests::env;
use qp_tests::fixture::eventually;
use qp_tests::kafka;
use qp_tests::tools::{Release, TestNamespace, can_i, helm, kubectl, run, run_ok, unique};
use serde_json::{Value as Json, json};

const QP: &str = "orders";
const PARTITIONS: i32 = 4;
const MAX_REPLICAS: i32 = 4;
const PER_REPLICA_TOKENS: u64 = 4;
/// The operator's default lease (qp-operator run --lease-duration-seconds).
const LEASE_SECONDS: u64 = 15;
/// Longest time without a leader in a rolling update: the old leader resigns its Lease on
/// SIGTERM, and the new one takes it at its next attempt (every 2 s,
/// --lease-renew-seconds) and reports it at once. Without the resignation the new leader
/// waited for the lease to expire (13 s seen).
const HANDOVER_SECONDS: u64 = 5;
/// pollIntervalSeconds of the QueueProcessor whose image does not exist.
const BROKEN_POLL_SECONDS: u64 = 2;

// Two threads: the leader sampler of the upgrade phase runs beside the test's own calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_operator_workers_and_gateway_run_in_pods_end_to_end() {
    let env = env::load();
    let node = env.try_get("QP_NODE_NAME").unwrap_or_else(|| {
        panic!("the local environment has no node: run `make env-up` (as root) first")
    });
    let client = env::kube_client().await;
    let ns = TestNamespace::create("qp-e2e");
    let redis = RedisSettings::single(env.get("QP_REDIS_URL"))
        .connect()
        .await
        .unwrap();
    let e = E2e {
        keys: Keys::new(&ns.0, QP),
        topic: unique("e2e-orders"),
        redis_user: unique("qp-e2e"),
        env,
        client,
        ns: ns.0.clone(),
        redis,
        started: Instant::now(),
    };
    let _ = std::fs::remove_file(std::path::Path::new(&e.env.get("QP_RUN")).join("e2e-times.txt"));

    // The image `make image` built is on the node, under the chart's default reference.
    let app_version = chart_app_version();
    let image = format!("ghcr.io/queue-processor/queue-processor:{app_version}");
    let images = run_ok(
        std::process::Command::new("ctr").args([
            "-a",
            &e.env.get("QP_CONTAINERD_SOCK"),
            "-n",
            "k8s.io",
            "images",
            "ls",
            "-q",
        ]),
        None,
    );
    assert!(
        images.lines().any(|l| l == image),
        "{image} is not on node {node} (images: {images}); `make test` imports it"
    );

    let mut release = install_chart(&e);
    kafka_queue_processor(&e).await;
    // Scraping from the start, so the dashboard's rates see the bursts below.
    let (_prometheus, prometheus_url) = start_prometheus(&e);
    burst_scales_up_and_down(&e).await;
    worker_pod_killed_mid_burst_loses_nothing(&e).await;
    gateway_answers_through_its_service(&e, &prometheus_url).await;
    prometheus_scrapes_the_pods(&e, &prometheus_url).await;
    qp_tests::e2e_secured::secured_queue_processor_in_pods(&e).await;
    qp_tests::e2e_stream::stream_queue_processor_in_pods(&e).await;
    upgrade_rolls_the_operator_with_one_leader(&e).await;
    missing_image_makes_ready_false(&e).await;
    delete_removes_deployments_and_redis_keys(&e).await;

    // helm uninstall keeps the CRD (resource-policy keep).
    let t = Instant::now();
    run_ok(
        helm().args(["uninstall", RELEASE, "--namespace", &e.ns, "--wait"]),
        None,
    );
    release.uninstalled = true;
    run_ok(
        kubectl().args([
            "get",
            "crd",
            "queueprocessors.queueprocessing.dev",
            "-o",
            "name",
        ]),
        None,
    );
    e.time("helm uninstall (CRD kept)", t.elapsed());

    // Clean up what is not in the namespace.
    let _: redis::RedisResult<()> = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&e.redis_user)
        .query_async(&mut e.redis.clone())
        .await;
    kafka::delete_topic(&e.env.get("QP_KAFKA_BOOTSTRAP"), &e.topic).await;
    e.time("all phases", e.started.elapsed());
}

/// `helm install --wait`: the operator pod Running and Ready under the chart's ServiceAccount,
/// holding the leader Lease; what it must not do is denied.
fn install_chart(e: &E2e) -> Release {
    let values = std::env::temp_dir().join(format!("{}-values.yaml", e.ns));
    std::fs::write(&values, chart_values()).unwrap();
    let t = Instant::now();
    let mut install = helm();
    install
        .args(["install", RELEASE])
        .arg(chart_dir())
        .args([
            "--namespace",
            &e.ns,
            "--take-ownership",
            "--force-conflicts",
        ])
        .args(["--wait", "--timeout", "180s", "-f"])
        .arg(&values);
    let done = run(&mut install, None);
    let out = String::from_utf8_lossy(&done.stdout).into_owned();
    if !done.status.success() {
        // Say why the operator pod is not ready: its state, events and logs.
        let mut why = String::new();
        for args in [
            vec!["get", "pods", "-o", "wide"],
            vec!["describe", "pods"],
            vec![
                "logs",
                "--all-containers",
                "--tail",
                "80",
                "-l",
                "app.kubernetes.io/name=queue-processor",
            ],
        ] {
            let o = run(kubectl().args(&args).args(["--namespace", &e.ns]), None);
            why.push_str(&format!(
                "--- kubectl {}\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        panic!(
            "helm install failed: {}\n{out}\n{}\n{why}",
            done.status,
            String::from_utf8_lossy(&done.stderr)
        );
    }
    assert!(out.contains("STATUS: deployed"), "{out}");
    e.time("helm install --wait to operator Ready", t.elapsed());
    let _ = std::fs::remove_file(&values);
    Release {
        name: RELEASE.into(),
        namespace: e.ns.clone(),
        uninstalled: false,
    }
}

/// A Kafka QueueProcessor as in examples/kafka-queueprocessor.yaml, with local addresses and a
/// real Secret (a Redis ACL user limited to the keys of this namespace's QueueProcessors).
async fn kafka_queue_processor(e: &E2e) {
    // First, the operator from the chart: Running, Ready, its own identity, the leader.
    let pods = operator_pods(e).await;
    assert_eq!(pods.len(), 1, "one operator pod");
    let pod = &pods[0];
    let pod_name = pod.metadata.name.clone().unwrap();
    assert!(is_ready(pod), "operator pod Ready after helm --wait");
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some(FULLNAME));
    let t = Instant::now();
    let holder = eventually(
        Duration::from_secs(30),
        "the operator takes the Lease",
        || async { lease_holder(e).await.filter(|h| *h == pod_name) },
    )
    .await;
    e.time("operator Ready to Lease held", t.elapsed());
    assert_eq!(holder, pod_name);
    // Its RBAC, not an admin's: what it needs is allowed, the rest denied.
    for (verb, resource, allowed) in [
        ("patch", "deployments.apps", true),
        ("get", "secrets", true),
        ("list", "secrets", false),
        ("watch", "secrets", false),
        ("create", "pods", false),
        ("delete", "pods", false),
        ("create", "queueprocessors.queueprocessing.dev", false),
        ("delete", "queueprocessors.queueprocessing.dev", false),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            false,
        ),
        ("get", "nodes", false),
    ] {
        assert_eq!(
            can_i(FULLNAME, &e.ns, verb, resource, Some(&e.ns)),
            allowed,
            "can {FULLNAME} {verb} {resource}?"
        );
    }

    // The Secret and the ACL user behind it.
    let password = uuid::Uuid::new_v4().simple().to_string();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&e.redis_user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("resetkeys")
        // Every QueueProcessor of the test's namespace (the hash tag starts with it), nothing else.
        .arg(format!("~qp:{{{}/*", e.ns))
        .arg(format!("&qp:{{{}/*", e.ns))
        .arg("+@all")
        .query_async(&mut e.redis.clone())
        .await
        .unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "orders-credentials"},
        "stringData": {
            "redis-username": e.redis_user,
            "redis-password": password,
            "gateway-tokens": format!("e2e:{}\n", gateway_token(e)),
        }
    }))
    .unwrap();
    e.api::<Secret>()
        .create(&Default::default(), &secret)
        .await
        .unwrap();

    kafka::create_topic(&e.env.get("QP_KAFKA_BOOTSTRAP"), &e.topic, PARTITIONS).await;
    let qp = json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": QP, "namespace": e.ns},
        "spec": {
            "source": {"kafka": {
                "bootstrapServers": e.env.get("QP_POD_KAFKA_BOOTSTRAP"),
                "topic": e.topic,
                "consumerGroup": format!("{}-workers", e.topic),
                "autoOffsetReset": "earliest",
            }},
            "redis": {
                "url": e.env.get("QP_POD_REDIS_URL"),
                "usernameSecretRef": {"name": "orders-credentials", "key": "redis-username"},
                "passwordSecretRef": {"name": "orders-credentials", "key": "redis-password"},
            },
            "concurrency": {"perReplicaTokens": PER_REPLICA_TOKENS, "globalMaxTokens": 100, "leaseSeconds": 10},
            "scaling": {
                "minReplicas": 1, "maxReplicas": MAX_REPLICAS, "targetBacklogPerReplica": 200,
                "targetDrainSeconds": 10, "pollIntervalSeconds": 1,
                "scaleDownStabilizationSeconds": 5, "cooldownSeconds": 5, "activationBacklog": 0
            },
            "worker": e.worker_spec(),
            "results": {"ttlSeconds": 900},
            "gateway": {
                "enabled": true, "replicas": 1,
                "auth": {"tokensSecretRef": {"name": "orders-credentials", "key": "gateway-tokens"}}
            }
        }
    });
    let t = Instant::now();
    e.apply_qp(&qp).await;
    eventually(Duration::from_secs(90), "a worker pod Ready", || async {
        (e.replicas("orders-worker").await.1 >= 1).then_some(())
    })
    .await;
    e.time("QueueProcessor applied to worker pod Ready", t.elapsed());
    eventually(Duration::from_secs(60), "the gateway pod Ready", || async {
        (e.replicas("orders-gateway").await.1 >= 1).then_some(())
    })
    .await;
    let ready = eventually(Duration::from_secs(30), "Ready=True", || async {
        e.condition(QP, "Ready").await.filter(|c| c.0 == "True")
    })
    .await;
    e.time("QueueProcessor applied to Ready=True", t.elapsed());
    assert_eq!(ready.0, "True", "{ready:?}");
}

/// A burst scales the Deployment up, every message gets a result, the token limit follows the
/// ready pods, and the Deployment scales back down.
async fn burst_scales_up_and_down(e: &E2e) {
    let n = 4000;
    let t = Instant::now();
    let ids = e.produce("burst", n).await;
    e.time(&format!("producing {n} messages"), t.elapsed());
    let scaled = eventually(Duration::from_secs(30), "scale-up", || async {
        let (desired, _) = e.replicas("orders-worker").await;
        (desired > 1).then_some(desired)
    })
    .await;
    e.time(&format!("burst to scale-up (1 -> {scaled})"), t.elapsed());
    // The token limit is perReplicaTokens x ready pods, as pods become ready.
    let (ready, limit) = eventually(
        Duration::from_secs(90),
        "limit = tokens x ready",
        || async {
            let (_, ready) = e.replicas("orders-worker").await;
            let limit = e.token_limit().await?;
            (ready > 1 && limit == PER_REPLICA_TOKENS * ready as u64).then_some((ready, limit))
        },
    )
    .await;
    e.time(
        &format!("burst to {ready} ready pods with token limit {limit}"),
        t.elapsed(),
    );
    // What runs on the node now, for the record of the run.
    let pods = run_ok(
        kubectl().args(["get", "pods", "-o", "wide", "--namespace", &e.ns]),
        None,
    );
    e.record(&pods);
    e.wait_done(&ids, Duration::from_secs(180), "burst").await;
    e.time(&format!("burst of {n} to drained"), t.elapsed());
    let t = Instant::now();
    eventually(Duration::from_secs(90), "scale back to 1", || async {
        (e.replicas("orders-worker").await == (1, 1)).then_some(())
    })
    .await;
    let limit = eventually(
        Duration::from_secs(30),
        "limit back to one pod's",
        || async { e.token_limit().await.filter(|l| *l == PER_REPLICA_TOKENS) },
    )
    .await;
    assert_eq!(limit, PER_REPLICA_TOKENS);
    e.time("drained to scaled back to 1 replica", t.elapsed());
}

/// A worker pod deleted with --grace-period=0 --force in the middle of a burst: its messages
/// are redelivered to the others, nothing is lost.
async fn worker_pod_killed_mid_burst_loses_nothing(e: &E2e) {
    let n = 2000;
    let ids = e.produce("kill", n).await;
    let t = Instant::now();
    // Wait until work is spread over several pods, then kill one that is working.
    eventually(Duration::from_secs(60), "two ready workers", || async {
        (e.replicas("orders-worker").await.1 >= 2).then_some(())
    })
    .await;
    let done_before = e.count_state(&ids, "done").await;
    assert!(
        done_before < n,
        "the burst drained before a second pod was ready; nothing to kill mid-way"
    );
    let pods = e
        .pods("app.kubernetes.io/instance=orders,app.kubernetes.io/component=worker")
        .await;
    let victim = pods
        .iter()
        .find(|p| is_ready(p))
        .and_then(|p| p.metadata.name.clone())
        .expect("a ready worker pod");
    run_ok(
        kubectl().args([
            "delete",
            "pod",
            &victim,
            "--namespace",
            &e.ns,
            "--grace-period=0",
            "--force",
        ]),
        None,
    );
    eprintln!("e2e killed {victim} with {done_before} of {n} done");
    e.wait_done(&ids, Duration::from_secs(180), "after a force-deleted pod")
        .await;
    assert_eq!(e.count_state(&ids, "failed").await, 0);
    e.time(
        &format!("burst of {n} with a pod force-deleted, all done"),
        t.elapsed(),
    );
}

/// The gateway token of the test's client `e2e` (in the Secret `orders-credentials`).
fn gateway_token(e: &E2e) -> String {
    format!("{}-gateway-token-0123456789abcdef", e.ns)
}

/// Submit and long-poll through the gateway's Service, as the client `e2e` with its bearer token:
/// to the Service's cluster IP, which kube-proxy's rules on this node route to the pod. (The API
/// server's service proxy cannot be used: it does not pass the `Authorization` header on.)
async fn gateway_answers_through_its_service(e: &E2e, prom: &str) {
    let addr = e.service_routed("orders-gateway").await;
    let base = format!("http://{addr}/v1/requests");
    let http = reqwest::Client::new();
    let bearer = format!("Bearer {}", gateway_token(e));
    // Without the token: refused, through the same path.
    let refused = http.post(&base).body("{}").send().await.unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    let t = Instant::now();
    let mut latencies = Vec::new();
    for i in 0..20 {
        if i == 10 {
            // A counter's first sample already holds what came before it: let Prometheus see the
            // gateway's request counters once, so the second half shows up as a rate.
            let q = format!("qp_gateway_requests_total{{namespace=\"{}\"}}", e.ns);
            eventually(
                Duration::from_secs(30),
                "gateway counters scraped",
                || async { prometheus_query(prom, &q).await.filter(|r| !r.is_empty()) },
            )
            .await;
        }
        let sent = Instant::now();
        let accepted: Json = http
            .post(&base)
            .header("content-type", "application/json")
            .header("idempotency-key", format!("gw-{i}"))
            .header("authorization", &bearer)
            .body(json!({"order": i}).to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .expect("JSON from the gateway");
        let id = accepted["id"].as_str().unwrap().to_owned();
        assert_eq!(id, format!("e2e:gw-{i}"), "ids are scoped to the client");
        let answer: Json = http
            .get(format!("{base}/{id}?wait=20"))
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"], "done", "{answer}");
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    e.time(
        &format!(
            "20 gateway submits + long polls through the Service (median {} ms)",
            latencies[10].as_millis()
        ),
        t.elapsed(),
    );
}

/// Prometheus discovers the pods through this API server; the dashboard's lag, throughput and
/// gateway queries return data from them.
async fn prometheus_scrapes_the_pods(e: &E2e, prom: &str) {
    let query = |q: String| async move { prometheus_query(prom, &q).await };
    let t = Instant::now();
    let ns = &e.ns;
    for component in ["worker", "gateway"] {
        // An empty answer means "not scraped yet", not an answer.
        eventually(Duration::from_secs(60), &format!("{component} pods scraped"), || {
            let q = format!(
                "up{{job=\"queue-processor-pods\",namespace=\"{ns}\",queueprocessor=\"{QP}\",component=\"{component}\"}} == 1"
            );
            async move { query(q).await.filter(|r| !r.is_empty()) }
        })
        .await;
    }
    let dashboard: Json = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("files/dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut panels = BTreeMap::new();
    collect_queries(&dashboard, &mut panels);
    let wanted = [
        "Backlog per QueueProcessor",
        "Backlog per partition",
        "Throughput",
        "Tokens: in use vs limit",
        "Gateway requests",
        "Gateway latency",
    ];
    for title in wanted {
        let exprs = panels
            .get(title)
            .unwrap_or_else(|| panic!("dashboard panel {title:?}"));
        for expr in exprs {
            let q = expr
                .replace("$namespace", ns)
                .replace("$queueprocessor", QP)
                .replace("$__rate_interval", "1m");
            // Gateway traffic must show as a rate above zero, not only as series.
            let positive = title == "Gateway requests";
            eventually(Duration::from_secs(60), &format!("{title}: {q}"), || {
                let q = q.clone();
                let query = &query;
                async move {
                    query(q).await.filter(|r| {
                        !r.is_empty() && (!positive || r.iter().any(|s| sample(s) > 0.0))
                    })
                }
            })
            .await;
        }
    }
    e.time("pods scraped, dashboard queries answered", t.elapsed());
}

/// When it was taken (since the upgrade began), and which operator pods said they lead.
type LeaderSample = (Duration, Vec<String>);

/// `helm upgrade` with a changed value rolls the operator: at no moment two pods lead, the gap
/// without a leader is shorter than the lease, and work goes on.
async fn upgrade_rolls_the_operator_with_one_leader(e: &E2e) {
    let ids = e.produce("upgrade", 1000).await;
    let before: Vec<String> = operator_pods(e)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    // Sample every operator pod's qp_operator_leader gauge through the API server's pod proxy.
    let samples: Arc<Mutex<Vec<LeaderSample>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = Instant::now();
    let sampler = {
        let (client, ns, samples, stop) = (
            e.client.clone(),
            e.ns.clone(),
            samples.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let lp = ListParams::default().labels(
                "app.kubernetes.io/component=operator,app.kubernetes.io/name=queue-processor",
            );
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut leaders = Vec::new();
                for p in pods.list(&lp).await.map(|l| l.items).unwrap_or_default() {
                    let name = p.metadata.name.unwrap_or_default();
                    let path = format!("/api/v1/namespaces/{ns}/pods/{name}:8080/proxy/metrics");
                    let req = http::Request::get(path).body(Vec::new()).unwrap();
                    // A pod that is going away may not answer: that is "not leading".
                    let answer =
                        tokio::time::timeout(Duration::from_secs(2), client.request_text(req));
                    if let Ok(Ok(text)) = answer.await
                        && text.lines().any(|l| l == "qp_operator_leader 1")
                    {
                        leaders.push(name);
                    }
                }
                samples.lock().unwrap().push((t.elapsed(), leaders));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let values = std::env::temp_dir().join(format!("{}-values.yaml", e.ns));
    std::fs::write(&values, chart_values()).unwrap();
    let mut upgrade = helm();
    upgrade
        .args(["upgrade", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", &e.ns, "--wait", "--timeout", "180s", "-f"])
        .arg(&values)
        .args([
            "--set",
            &format!("operator.podAnnotations.rolled={}", unique("at")),
        ]);
    // Off the async threads, so the sampler keeps sampling while helm waits.
    tokio::task::spawn_blocking(move || run_ok(&mut upgrade, None))
        .await
        .unwrap();
    let _ = std::fs::remove_file(&values);
    let after = eventually(Duration::from_secs(60), "a new leader", || async {
        let holder = lease_holder(e).await?;
        (!before.contains(&holder)).then_some(holder)
    })
    .await;
    // Keep sampling until the new leader reports itself.
    eventually(
        Duration::from_secs(30),
        "the new leader's gauge",
        || async {
            let s = samples.lock().unwrap();
            s.last()
                .is_some_and(|(_, l)| l == std::slice::from_ref(&after))
                .then_some(())
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.await.unwrap();
    let samples = samples.lock().unwrap().clone();
    let mut longest_gap = Duration::ZERO;
    let mut gap_start: Option<Duration> = None;
    for (at, leaders) in &samples {
        assert!(leaders.len() <= 1, "two leaders at {at:?}: {leaders:?}");
        match (leaders.is_empty(), gap_start) {
            (true, None) => gap_start = Some(*at),
            (false, Some(s)) => {
                longest_gap = longest_gap.max(*at - s);
                gap_start = None;
            }
            _ => {}
        }
    }
    assert!(
        longest_gap < Duration::from_secs(LEASE_SECONDS.min(HANDOVER_SECONDS)),
        "{longest_gap:?} without a leader (lease: {LEASE_SECONDS} s; a resigning leader \
         hands over within {HANDOVER_SECONDS} s)"
    );
    e.wait_done(&ids, Duration::from_secs(120), "during the upgrade")
        .await;
    e.time(
        &format!(
            "helm upgrade: new leader {after}, longest gap without a leader {:.1} s over {} samples, 1000 messages done",
            longest_gap.as_secs_f64(),
            samples.len()
        ),
        t.elapsed(),
    );
}

/// A QueueProcessor whose image does not exist: Ready=False naming the image problem within one
/// poll of the kubelet reporting it, with an event.
async fn missing_image_makes_ready_false(e: &E2e) {
    let image = "ghcr.io/queue-processor/does-not-exist:0.0.0";
    let mut worker = e.worker_spec();
    worker["image"] = json!(image);
    let qp = json!({
        "apiVersion": "queueprocessing.dev/v1alpha1",
        "kind": "QueueProcessor",
        "metadata": {"name": "broken", "namespace": e.ns},
        "spec": {
            "source": {"redisList": {"key": format!("{}jobs", Keys::new(&e.ns, "broken").prefix())}},
            "redis": {
                "url": e.env.get("QP_POD_REDIS_URL"),
                "usernameSecretRef": {"name": "orders-credentials", "key": "redis-username"},
                "passwordSecretRef": {"name": "orders-credentials", "key": "redis-password"},
            },
            "concurrency": {"perReplicaTokens": 2, "globalMaxTokens": 4},
            "scaling": {"minReplicas": 1, "maxReplicas": 1, "pollIntervalSeconds": BROKEN_POLL_SECONDS},
            "worker": worker
        }
    });
    let t = Instant::now();
    e.apply_qp(&qp).await;
    // When the kubelet first reports the pull failure, and when the QueueProcessor says so.
    let selector = "app.kubernetes.io/instance=broken,app.kubernetes.io/component=worker";
    let mut kubelet_reported: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (reason, message, reported) = loop {
        if kubelet_reported.is_none() {
            let waiting = e.pods(selector).await.iter().any(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
                    .any(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
            });
            if waiting {
                kubelet_reported = Some(Instant::now());
            }
        }
        if let Some((status, reason, message)) = e.condition("broken", "Ready").await
            && status == "False"
            && reason == "ImagePullFailed"
        {
            break (reason, message, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "no Ready=False ImagePullFailed within 120 s: {:?}",
            e.condition("broken", "Ready").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let kubelet_reported = kubelet_reported.unwrap_or(reported);
    let lag = reported.saturating_duration_since(kubelet_reported);
    assert!(
        lag <= Duration::from_secs(BROKEN_POLL_SECONDS) + Duration::from_secs(1),
        "Ready=False came {lag:?} after the kubelet reported the pull failure (poll: {BROKEN_POLL_SECONDS} s)"
    );
    assert!(
        message.contains(image),
        "the message names the image: {message}"
    );
    let printed = run_ok(
        kubectl().args(["get", "qp", "broken", "--namespace", &e.ns]),
        None,
    );
    assert!(
        printed.contains(&reason),
        "kubectl get qp shows {reason}:\n{printed}"
    );
    let events = e.api::<Event>().list(&ListParams::default()).await.unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|ev| ev.reason.as_deref() == Some("ImagePullFailed")
                && ev.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")),
        "a Warning event ImagePullFailed"
    );
    e.time(
        &format!(
            "missing image to Ready=False ImagePullFailed ({:.1} s after the kubelet reported it)",
            lag.as_secs_f64()
        ),
        t.elapsed(),
    );
    run_ok(
        kubectl().args([
            "delete",
            "qp",
            "broken",
            "--namespace",
            &e.ns,
            "--wait=true",
        ]),
        None,
    );
}

/// `kubectl delete qp` stops its pods first (they drain through the token keys), then removes
/// its Redis keys; its Deployments and Service go too. The QueueProcessor outlives its pods: a
/// finalizer that removed keys under running workers saw them written back (a heartbeat and an
/// in-flight counter left behind for good, found by a CI run).
async fn delete_removes_deployments_and_redis_keys(e: &E2e) {
    let t = Instant::now();
    run_ok(
        kubectl().args([
            "delete",
            "qp",
            QP,
            "--namespace",
            &e.ns,
            "--wait=true",
            "--timeout=90s",
        ]),
        None,
    );
    let pods = e.pods("app.kubernetes.io/instance=orders").await;
    assert!(
        pods.is_empty(),
        "the QueueProcessor was gone while its pods still existed: {:?}",
        pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    eventually(
        Duration::from_secs(60),
        "Deployments and Service gone",
        || async {
            let gone = e.deployment("orders-worker").await.is_none()
                && e.deployment("orders-gateway").await.is_none()
                && e.api::<Service>()
                    .get_opt("orders-gateway")
                    .await
                    .unwrap()
                    .is_none();
            gone.then_some(())
        },
    )
    .await;
    let mut left: HashMap<String, i64> = HashMap::new();
    for key in e.keys.token_keys().into_iter().chain([
        e.keys.processed(),
        e.keys.heartbeats(),
        e.keys.inflight(),
    ]) {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut e.redis.clone())
            .await
            .unwrap();
        if n > 0 {
            left.insert(key, n);
        }
    }
    assert!(left.is_empty(), "Redis keys left after delete: {left:?}");
    e.time(
        "kubectl delete qp to Deployments, pods and Redis keys gone",
        t.elapsed(),
    );
    let _ = run(kubectl().args(["get", "all", "--namespace", &e.ns]), None);
}
