//! Local mode end to end: `qp-operator local` drives real `qp-worker` processes and a gateway
//! against the real Kafka and Redis. A burst submitted through its gateway scales the workers
//! out and back to the minimum, a worker killed with SIGKILL is restarted, and every request
//! ends with its result.
//!
//! Other tests stop and restart the shared Kafka for a few seconds; every wait here is an
//! eventual check with a generous deadline, and submissions retry on 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use qp_tests::fixture::{Fixture, RedisKind, eventually};
use qp_tests::local::{self, LocalMode, LocalStatus, ResultTracker, TestQp};

const REQUESTS: usize = 1200;
const MIN_REPLICAS: u32 = 1;

/// Poll `/status.json` until `check` accepts it, or panic after `timeout` with `what`.
async fn wait_status(
    lm: &mut LocalMode,
    timeout: Duration,
    what: &str,
    check: impl Fn(&LocalStatus) -> bool,
) -> LocalStatus {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        assert!(
            lm.alive(),
            "qp-operator local exited; see {}",
            lm.log.display()
        );
        if let Some(st) = lm.status().await {
            if check(&st) {
                return st;
            }
            last = Some(st);
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last status: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_scales_out_and_back_without_loss_and_crashed_workers_restart() {
    let f = Fixture::new("local", RedisKind::Single, 8).await;
    let file = local::manifest(
        &f,
        &TestQp {
            sleep_millis: 100,
            per_replica_tokens: 4,
            max_replicas: 4,
        },
    );
    let mut lm = LocalMode::start(&f.name, &file, None);
    let st = lm.wait_ready(Duration::from_secs(120)).await;
    assert_eq!(st.replicas, MIN_REPLICAS, "starts at the minimum: {st:?}");
    let gateway = st.gateway_url.clone().expect("the gateway is enabled");
    let http = reqwest::Client::new();

    // The peak, sampled in the background for the whole run.
    let peak = Arc::new(AtomicU32::new(0));
    let sampler = tokio::spawn({
        let (peak, http, url) = (peak.clone(), http.clone(), lm.url.clone());
        async move {
            loop {
                if let Some(st) = local::status(&http, &url).await {
                    peak.fetch_max(st.replicas.min(st.ready_replicas), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });

    // The burst, through the gateway. One replica handles ~40 requests/s.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let accepted = local::submit_burst(
        &http,
        &gateway,
        REQUESTS,
        32,
        Instant::now() + Duration::from_secs(120),
        Arc::new(AtomicUsize::new(0)),
        tx,
    )
    .await
    .expect("the gateway takes the burst");
    assert_eq!(accepted, REQUESTS);
    let mut tracker = ResultTracker::new(f.keys.clone(), f.conn.clone());
    while let Ok(s) = rx.try_recv() {
        tracker.add(s);
    }

    // Scaled out on the backlog.
    let st = wait_status(&mut lm, Duration::from_secs(60), "two ready workers", |s| {
        s.replicas >= 2 && s.ready_replicas >= 2
    })
    .await;

    // A crash: SIGKILL one worker while it works. Local mode starts a new one on the same port,
    // and what the dead one held is redelivered.
    let victim = *st.worker_pids.last().expect("worker pids in the status");
    let victim_port = *st.worker_ports.last().expect("worker ports in the status");
    let replicas_before = st.replicas;
    let cmdline = std::fs::read(format!("/proc/{victim}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("qp-worker"),
        "pid {victim} from /status.json is a qp-worker"
    );
    local::signal(victim as i32, "-KILL");
    let st = wait_status(
        &mut lm,
        Duration::from_secs(30),
        "the killed worker restarted",
        |s| s.restarts >= 1 && !s.worker_pids.contains(&victim),
    )
    .await;
    assert_eq!(st.worker_pids.len(), st.worker_ports.len());
    // Restarted in place (unless a scale-down removed that replica in the meantime).
    assert!(
        st.worker_ports.contains(&victim_port) || st.replicas < replicas_before,
        "the replacement serves port {victim_port}: {st:?}"
    );
    let metrics = http
        .get(format!("{}/metrics", lm.url))
        .send()
        .await
        .expect("local mode /metrics")
        .text()
        .await
        .unwrap();
    let series = format!(
        "qp_operator_local_restarts_total{{namespace=\"{}\",queueprocessor=\"{}\"}}",
        f.namespace, f.name
    );
    let restarts = local::sample(&metrics, &series);
    assert!(
        restarts.is_some_and(|r| r >= 1.0),
        "{series} counts the restart: {restarts:?}"
    );

    // No loss: every request ends with a result.
    let deadline = Instant::now() + Duration::from_secs(180);
    while tracker.open() > 0 {
        let _ = tracker.refresh().await;
        assert!(
            Instant::now() < deadline,
            "{} of {REQUESTS} requests without a result after 180 s; logs in {}",
            tracker.open(),
            lm.log_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        tracker.failed.is_empty(),
        "failed requests: {:?}",
        tracker.failed
    );
    assert_eq!(tracker.done_ms.len(), REQUESTS);

    // Back to the minimum once the backlog is gone.
    wait_status(
        &mut lm,
        Duration::from_secs(90),
        "the workers back at the minimum",
        |s| s.replicas == MIN_REPLICAS && s.desired() == MIN_REPLICAS && s.backlog() == 0,
    )
    .await;
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak >= 2, "at least two ready replicas at the peak: {peak}");
    eprintln!(
        "local mode: peak {peak} replicas, p99 {:?} ms submit-to-result",
        local::quantile(&tracker.done_ms, 0.99)
    );

    // A clean stop drains and stops every process it started.
    assert!(
        lm.stop(Duration::from_secs(60)).await,
        "local mode stops cleanly on SIGTERM; see {}",
        lm.log.display()
    );
    for pid in st.worker_pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "worker {pid} is gone after the stop"
        );
    }
    f.cleanup().await;
}

/// An exec handler's arguments reach the process as written, through the operator's rendering
/// of the worker's settings and the worker's parsing of them: `["sh", "-c", "echo a b"]` runs
/// `echo a b` in a shell. (Its command was once joined with spaces and split again, so the
/// worker ran `sh -c echo a b` and answered "\n".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_handler_arguments_keep_their_spaces() {
    let f = Fixture::new("local-exec", RedisKind::Single, 1).await;
    let file = local::manifest_with_handler(
        &f,
        &TestQp {
            sleep_millis: 0,
            per_replica_tokens: 2,
            max_replicas: 1,
        },
        "exec:\n        command: [sh, -c, echo a b]",
    );
    let mut lm = LocalMode::start(&f.name, &file, None);
    let st = lm.wait_ready(Duration::from_secs(120)).await;
    let gateway = st.gateway_url.expect("the gateway is enabled");
    let http = reqwest::Client::new();
    // Submit (retried while the gateway answers 503 at start), then long-poll the result.
    let answer: serde_json::Value = eventually(
        Duration::from_secs(60),
        "the exec handler's result",
        || async {
            let submitted = http
                .post(format!("{gateway}/v1/requests"))
                .header("content-type", "text/plain")
                .header("idempotency-key", "exec-1")
                .body("ignored")
                .send()
                .await
                .ok()?;
            if !submitted.status().is_success() {
                return None;
            }
            let id = submitted.json::<serde_json::Value>().await.ok()?["id"]
                .as_str()?
                .to_owned();
            let polled = http
                .get(format!("{gateway}/v1/requests/{id}?wait=10"))
                .send()
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()?;
            (polled["status"] != "pending" && polled["status"] != "processing").then_some(polled)
        },
    )
    .await;
    assert_eq!(answer["status"], "done", "{answer}");
    assert_eq!(answer["result"], "a b\n", "{answer}");
    assert!(lm.stop(Duration::from_secs(30)).await, "local mode stops");
}

/// The capacity of a replica is learned again after a downstream brownout. While the handler
/// is slow every slot is busy and a replica does little; once it is fast again the workload
/// keeps up easily and is never saturated, and the operator used to learn capacity only while
/// saturated: the low estimate stood and the workload stayed over-provisioned for good. Now the
/// time per message (processing rate over messages in flight) is learned whenever anything is
/// in flight, and the replicas come back down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_learned_again_after_a_brownout() {
    let f = Fixture::new("local-brownout", RedisKind::Single, 8).await;
    let dir = qp_tests::env::workspace_root()
        .join("target/test-logs")
        .join(&f.name);
    std::fs::create_dir_all(&dir).unwrap();
    let latency = dir.join("latency");
    std::fs::write(&latency, "0.25").unwrap();
    let handler = format!(
        "exec:\n        command: [sh, -c, 'sleep $(cat {}); cat']",
        latency.display()
    );
    let file = local::manifest_with_handler(
        &f,
        &TestQp {
            sleep_millis: 0,
            per_replica_tokens: 2,
            max_replicas: 6,
        },
        &handler,
    );
    let mut lm = LocalMode::start(&f.name, &file, None);
    lm.wait_ready(Duration::from_secs(120)).await;

    // A steady 16 messages a second for the whole test (at most 150 s).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producing = tokio::spawn({
        let (stop, bootstrap, topic) = (stop.clone(), f.bootstrap.clone(), f.topic.clone());
        async move {
            let producer = qp_tests::kafka::producer(&bootstrap);
            let started = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(150) {
                let ids: Vec<String> = (0..4).map(|i| format!("b{n}-{i}")).collect();
                qp_tests::kafka::send_many(&producer, &topic, &ids).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });

    // Brownout: 250 ms per message, 2 slots per replica: about 8/s per replica, so 16/s
    // needs more than one replica, and the estimate says so.
    let slow = wait_status(
        &mut lm,
        Duration::from_secs(90),
        "a low capacity learned",
        |st| {
            st.status
                .throughput
                .as_ref()
                .and_then(|t| t.per_replica_per_second)
                .is_some_and(|r| r < 12.0)
                && st.desired() >= 2
        },
    )
    .await;
    let learned = slow
        .status
        .throughput
        .as_ref()
        .unwrap()
        .per_replica_per_second;
    println!(
        "brownout: {learned:?}/s per replica, {} replicas wanted",
        slow.desired()
    );

    // Recovered: the handler is fast. One replica keeps up with 16/s many times over.
    std::fs::write(&latency, "0.005").unwrap();
    let fast = wait_status(
        &mut lm,
        Duration::from_secs(60),
        "back to 1 replica",
        |st| {
            st.desired() == 1
                && st
                    .status
                    .throughput
                    .as_ref()
                    .and_then(|t| t.per_replica_per_second)
                    .is_some_and(|r| r > 32.0)
        },
    )
    .await;
    println!(
        "recovered: {:?}/s per replica, {} replica wanted",
        fast.status
            .throughput
            .as_ref()
            .unwrap()
            .per_replica_per_second,
        fast.desired()
    );
    stop.store(true, Ordering::Relaxed);
    producing.await.unwrap();
    assert!(
        lm.stop(Duration::from_secs(60)).await,
        "local mode stops cleanly; see {}",
        lm.log.display()
    );
    f.cleanup().await;
}

/// The processes whose parent is `pid`, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // /proc/<pid>/stat: "pid (comm) state ppid ...", comm may contain spaces.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Running (neither gone nor a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.get(s.rfind(')')? + 2..)?.chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Defect: `qp-operator local` killed with SIGKILL left its workers and gateway running, with a
/// token limit nobody maintained any more. They must die with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_die_with_a_killed_local_operator() {
    let f = Fixture::new("local-orphans", RedisKind::Single, 1).await;
    let file = local::manifest(
        &f,
        &TestQp {
            sleep_millis: 0,
            per_replica_tokens: 2,
            max_replicas: 1,
        },
    );
    let mut lm = LocalMode::start(&f.name, &file, None);
    lm.wait_ready(Duration::from_secs(120)).await;
    let children = children_of(lm.pid());
    assert!(
        children.len() >= 2,
        "a worker and the gateway: {children:?}"
    );
    // The operator alone, not its process group (which the test's cleanup kills).
    local::signal(lm.pid() as i32, "-KILL");
    eventually(Duration::from_secs(15), "its processes to exit", || async {
        children.iter().all(|p| !running(*p)).then_some(())
    })
    .await;
    f.cleanup().await;
}
