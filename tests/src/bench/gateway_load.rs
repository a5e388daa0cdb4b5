//! The gateway under an outside load generator: `vegeta` (installed by `hack/bench-tools.sh`,
//! found through `$QP_VEGETA`), not a client of ours, so the figures mean what they would mean
//! to a user who points their own tool at the gateway.
//!
//! * **Capacity.** Open loop (vegeta sends on schedule whatever the answers do) at rising rates
//!   of `POST /v1/requests`, echo handler, two workers; one submit in [`LONGPOLL_SHARE`] is
//!   also long-polled until its result arrives, by a client of ours that learns the id from
//!   vegeta's streamed results. A step passes when every submit got its `202`, vegeta kept the
//!   rate, and the p99 (vegeta's own latencies) is at most 50 ms. The same tool, closed loop as
//!   fast as it can, against `GET /healthz` of the same process is the ceiling of the HTTP stack
//!   on this machine.
//! * **Parked long polls.** 10,000 requests submitted while no worker runs, one long poll
//!   each; the gateway's RSS with all of them parked (its own gauge says when), then a worker
//!   finishes them at a steady pace and each answer's delay after its result was written is
//!   the wake latency (`at`, Redis server time, against this machine's clock).
//!
//! Settings: `QP_BENCH_GATEWAY_LADDER` (comma-separated rates, default
//! `500,1000,2000,3000,4000,6000,8000,12000`), `QP_BENCH_GATEWAY_STEP_SECONDS` (5),
//! `QP_BENCH_GATEWAY_WAITERS` (10000).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;

use super::gateway::percentile;
use super::operator::rss_mb;
use super::{Figure, setting};
use crate::fixture::{Fixture, GatewayQueue, RedisKind};
use crate::procs::Proc;

/// One submit in this many is long-polled for its result during the capacity steps.
const LONGPOLL_SHARE: u64 = 10;

/// A step fails above this submit p99.
const P99_BUDGET_MS: f64 = 50.0;

/// A step fails when vegeta sent less than this share of the asked rate (it could not keep up
/// on these two cores, so the step measured a lower rate than its name).
const RATE_KEPT: f64 = 0.95;

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench gateway-load] {}", msg.as_ref());
}

/// The figures of this part of the gateway group.
pub async fn run() -> Vec<Figure> {
    let vegeta = match std::env::var("QP_VEGETA") {
        Ok(v) => v,
        Err(_) => panic!(
            "QP_VEGETA is not set: run `make bench` (hack/bench.sh installs vegeta), or \
             `eval \"$(bash hack/bench-tools.sh)\"` first"
        ),
    };
    let fx = Fixture::new("bench-gwload", RedisKind::Single, 8).await;
    let result = measure(&fx, &vegeta).await;
    fx.cleanup().await;
    match result {
        Ok(figures) => figures,
        Err(e) => panic!("gateway load benchmark failed: {e:#}"),
    }
}

async fn measure(fx: &Fixture, vegeta: &str) -> Result<Vec<Figure>> {
    let ladder: Vec<u32> = std::env::var("QP_BENCH_GATEWAY_LADDER")
        .unwrap_or_else(|_| "500,1000,2000,3000,4000,6000,8000,12000".into())
        .split(',')
        .map(|r| r.trim().parse().context("QP_BENCH_GATEWAY_LADDER: a rate"))
        .collect::<Result<_>>()?;
    let step = Duration::from_secs(setting("QP_BENCH_GATEWAY_STEP_SECONDS", 5));
    let waiters: usize = setting("QP_BENCH_GATEWAY_WAITERS", 10_000);

    fx.pool().set_limit(256).await?;
    let workers: Vec<Proc> = (0..2)
        .map(|i| fx.kafka_worker(&format!("w{i}"), "echo", &["--max-concurrency", "64"]))
        .collect();
    let (gateway, base) = fx
        .gateway(GatewayQueue::Kafka, &["--max-wait-seconds", "60"])
        .await;
    let dir = std::env::temp_dir().join(format!("qp-bench-gwload-{}", fx.name));
    std::fs::create_dir_all(&dir)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(70))
        .build()?;

    // Warm-up: the workers join their group, the producer connects.
    let mut warm = attack(
        vegeta,
        &dir,
        &submit_target(&base),
        200,
        Duration::from_secs(3),
        &http,
    )?;
    warm.settle().await;
    progress(format!(
        "warm-up: {} submits, p99 {:.1} ms",
        warm.latencies_ms.len(),
        warm.p99()
    ));

    let noop = max_rate(vegeta, &dir, &format!("GET {base}/healthz\n"), step)?;
    progress(format!(
        "no-op route: {noop:.0} requests/s (closed loop, 64 connections)"
    ));

    let mut best = 0u32;
    let mut best_step: Option<Step> = None;
    for rate in ladder {
        let mut s = attack(vegeta, &dir, &submit_target(&base), rate, step, &http)?;
        let polled = s.settle().await;
        let passed = s.passed(rate);
        progress(format!(
            "{rate} submits/s for {step:?}: sent at {:.0}/s, {} of {} accepted, p50 {:.1} ms, \
             p99 {:.1} ms, max {:.1} ms; {} long-polled to their result ({} failed): {}",
            s.sent_rate,
            s.accepted,
            s.latencies_ms.len(),
            s.p50(),
            s.p99(),
            s.max(),
            polled.0,
            polled.1,
            if passed { "pass" } else { "fail" }
        ));
        if polled.1 > 0 {
            bail!("{} long-polled requests did not finish as done", polled.1);
        }
        if !passed {
            break;
        }
        best = rate;
        best_step = Some(s);
    }
    let best_p99 = best_step.as_ref().map_or(f64::NAN, Step::p99);
    drop(workers);

    let parked = park(fx, &gateway, &base, &http, waiters).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(vec![
        fig(
            "gateway.max_submit_rps_p99_under_50ms",
            f64::from(best),
            "req/s",
        ),
        fig("gateway.max_submit_rps_p99_ms", best_p99, "ms"),
        fig("gateway.noop_rps", noop, "req/s"),
        fig(
            "gateway.ratio_submit_vs_noop",
            f64::from(best) / noop,
            "ratio",
        ),
        fig("gateway.longpoll_waiters_10k_rss_mb", parked.rss_mb, "MB"),
        fig("gateway.longpoll_idle_rss_mb", parked.idle_rss_mb, "MB"),
        fig("gateway.longpoll_wake_p99_ms", parked.wake_p99_ms, "ms"),
    ])
}

fn fig(name: &str, value: f64, unit: &str) -> Figure {
    (name.to_owned(), value, unit.to_owned())
}

/// A vegeta target (its `http` format) for a small JSON submit.
fn submit_target(base: &str) -> String {
    format!("POST {base}/v1/requests\nContent-Type: application/json\n@{{BODY}}\n",)
}

/// One open-loop step as vegeta saw it.
struct Step {
    latencies_ms: Vec<f64>,
    accepted: usize,
    /// Requests per second vegeta actually sent.
    sent_rate: f64,
    /// Long polls started for a share of the accepted ids.
    polls: Vec<tokio::task::JoinHandle<bool>>,
}

impl Step {
    fn p50(&self) -> f64 {
        percentile(&self.latencies_ms, 0.50)
    }
    fn p99(&self) -> f64 {
        percentile(&self.latencies_ms, 0.99)
    }
    fn max(&self) -> f64 {
        self.latencies_ms.last().copied().unwrap_or(f64::NAN)
    }
    fn passed(&self, rate: u32) -> bool {
        self.accepted == self.latencies_ms.len()
            && self.sent_rate >= RATE_KEPT * f64::from(rate)
            && self.p99() <= P99_BUDGET_MS
    }
    /// Waits for this step's long polls: (finished as done, not).
    async fn settle(&mut self) -> (usize, usize) {
        let (mut done, mut not) = (0, 0);
        for poll in std::mem::take(&mut self.polls) {
            match poll.await {
                Ok(true) => done += 1,
                _ => not += 1,
            }
        }
        (done, not)
    }
}

/// One vegeta attack: `rate` requests per second for `duration` against `target` (its http
/// target format; `{BODY}` is replaced by a body file), results streamed through `vegeta
/// encode` and read here as they arrive.
fn attack(
    vegeta: &str,
    dir: &std::path::Path,
    target: &str,
    rate: u32,
    duration: Duration,
    http: &reqwest::Client,
) -> Result<Step> {
    let body = dir.join("body.json");
    std::fs::write(
        &body,
        br#"{"bench":"load","payload":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
    )?;
    let targets = dir.join("targets.txt");
    std::fs::write(&targets, target.replace("{BODY}", &body.to_string_lossy()))?;
    let mut attack = Command::new(vegeta)
        .arg("attack")
        .arg(format!("-targets={}", targets.display()))
        .arg(format!("-rate={rate}/1s"))
        .arg(format!("-duration={}s", duration.as_secs()))
        .args(["-timeout=10s", "-max-workers=4096"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting vegeta attack")?;
    let mut encode = Command::new(vegeta)
        .args(["encode", "--to=json"])
        .stdin(attack.stdout.take().expect("piped"))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting vegeta encode")?;
    let lines = BufReader::new(encode.stdout.take().expect("piped"));
    let handle = tokio::runtime::Handle::current();
    let mut latencies_ms = Vec::new();
    let mut accepted = 0;
    let mut polls = Vec::new();
    let (mut first, mut last) = (None::<i128>, None::<i128>);
    // Blocking reads: vegeta's results arrive at the attack's pace; a blocking thread keeps
    // them off the runtime the long polls use.
    let base = target
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let base = base.trim_end_matches("/v1/requests").to_owned();
    tokio::task::block_in_place(|| -> Result<()> {
        for line in lines.lines() {
            let r: VegetaResult = serde_json::from_str(&line?).context("a vegeta result")?;
            latencies_ms.push(r.latency as f64 / 1e6);
            let sent = r
                .timestamp
                .parse::<jiff::Timestamp>()
                .context("a vegeta timestamp")?
                .as_nanosecond();
            first = Some(first.map_or(sent, |f| f.min(sent)));
            last = Some(last.map_or(sent, |l| l.max(sent)));
            if r.code == 202 {
                accepted += 1;
                if r.seq.is_multiple_of(LONGPOLL_SHARE)
                    && let Some(id) = id_of(&r.body)
                {
                    let (http, url) = (http.clone(), format!("{base}/v1/requests/{id}?wait=30"));
                    polls.push(handle.spawn(async move { long_poll_done(&http, &url).await }));
                }
            }
        }
        Ok(())
    })?;
    let _ = attack.wait();
    let _ = encode.wait();
    latencies_ms.sort_by(f64::total_cmp);
    let span = match (first, last) {
        (Some(f), Some(l)) if l > f => (l - f) as f64 / 1e9,
        _ => f64::NAN,
    };
    let sent_rate = if span.is_finite() && latencies_ms.len() > 1 {
        (latencies_ms.len() - 1) as f64 / span
    } else {
        f64::NAN
    };
    Ok(Step {
        latencies_ms,
        accepted,
        sent_rate,
        polls,
    })
}

/// What `vegeta encode --to=json` writes per request (the fields used here).
#[derive(Deserialize)]
struct VegetaResult {
    seq: u64,
    code: u16,
    timestamp: String,
    /// Nanoseconds.
    latency: u64,
    /// Base64 (Go's encoding of a byte slice).
    #[serde(default)]
    body: String,
}

/// The request id in a submit's `202` body.
fn id_of(body_base64: &str) -> Option<String> {
    let body = BASE64.decode(body_base64).ok()?;
    let answer: Value = serde_json::from_slice(&body).ok()?;
    answer["id"].as_str().map(str::to_owned)
}

/// Long-poll `url` until the request is final; whether it finished as `done`.
async fn long_poll_done(http: &reqwest::Client, url: &str) -> bool {
    for _ in 0..4 {
        match http.get(url).send().await {
            Ok(r) if r.status() == StatusCode::OK => {
                return r.json::<Value>().await.is_ok_and(|v| v["status"] == "done");
            }
            Ok(r) if r.status() == StatusCode::ACCEPTED => continue,
            _ => return false,
        }
    }
    false
}

/// Closed loop, as fast as vegeta goes with 64 connections, for `duration`: successful requests
/// per second (vegeta's own report).
fn max_rate(vegeta: &str, dir: &std::path::Path, target: &str, duration: Duration) -> Result<f64> {
    let targets = dir.join("noop-targets.txt");
    std::fs::write(&targets, target)?;
    let out = dir.join("noop.bin");
    let status = Command::new(vegeta)
        .arg("attack")
        .arg(format!("-targets={}", targets.display()))
        .args(["-rate=0", "-max-workers=64", "-timeout=10s"])
        .arg(format!("-duration={}s", duration.as_secs()))
        .arg(format!("-output={}", out.display()))
        .status()
        .context("running vegeta attack")?;
    if !status.success() {
        bail!("vegeta attack (no-op route) exited with {status}");
    }
    let report = Command::new(vegeta)
        .args(["report", "-type=json"])
        .arg(&out)
        .output()
        .context("running vegeta report")?;
    let report: Value = serde_json::from_slice(&report.stdout).context("vegeta's JSON report")?;
    let success = report["success"].as_f64().unwrap_or(0.0);
    if success < 1.0 {
        bail!("the no-op route failed requests under load: {report}");
    }
    report["throughput"]
        .as_f64()
        .context("vegeta's report has a throughput")
}

/// What parking the long polls measured.
struct Parked {
    idle_rss_mb: f64,
    rss_mb: f64,
    wake_p99_ms: f64,
}

/// Submit `n` requests with no worker running, park one long poll on each, read the gateway's
/// RSS, then let one worker finish them at a steady pace and measure how long each answer took
/// after its result was written.
async fn park(
    fx: &Fixture,
    gateway: &Proc,
    base: &str,
    http: &reqwest::Client,
    n: usize,
) -> Result<Parked> {
    let t = Instant::now();
    let ids = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut submits = Vec::with_capacity(n);
    for i in 0..n {
        let (http, base, ids, sem) = (http.clone(), base.to_owned(), ids.clone(), sem.clone());
        submits.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("never closed");
            let id = format!("park-{i}");
            let r = http
                .post(format!("{base}/v1/requests"))
                .header("content-type", "application/json")
                .header("idempotency-key", &id)
                .body(format!(r#"{{"park":{i}}}"#))
                .send()
                .await?;
            if r.status() != StatusCode::ACCEPTED {
                bail!("submit answered {}", r.status());
            }
            ids.lock().await.push(id);
            Ok(())
        }));
    }
    for s in submits {
        s.await??;
    }
    progress(format!(
        "{n} requests submitted in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    // Before any poll parks, after the submits: what the waiters add is the difference.
    let idle_rss_mb = rss_mb(gateway.pid());

    // One connection per long poll (HTTP/1.1 has one request in flight per connection); a
    // client of its own so that the pool keeps none of them for reuse.
    let parker = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(90))
        .build()?;
    let answers = Arc::new(std::sync::Mutex::new(Vec::<(String, f64)>::new()));
    let mut polls = Vec::with_capacity(n);
    let ids = std::mem::take(&mut *ids.lock().await);
    let t = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let (parker, url, answers) = (
            parker.clone(),
            format!("{base}/v1/requests/{id}?wait=60"),
            answers.clone(),
        );
        let id = id.clone();
        polls.push(tokio::spawn(async move {
            if let Ok(r) = parker.get(&url).send().await
                && r.status() == StatusCode::OK
                && r.bytes().await.is_ok()
            {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("after 1970")
                    .as_secs_f64()
                    * 1000.0;
                answers.lock().expect("answers").push((id, now));
            }
        }));
        // Opened in waves, so the listen backlog never overflows (a dropped SYN is retried
        // only after a second).
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let port: u16 = base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("port")?;
    crate::cluster::until_longpolls_parked(port, n, Duration::from_secs(60)).await;
    let rss_mb = rss_mb(gateway.pid());
    progress(format!(
        "{n} long polls parked {:.1}s after the first: gateway RSS {rss_mb:.1} MB (before: {idle_rss_mb:.1} MB)",
        t.elapsed().as_secs_f64()
    ));

    // A steady pace: four handlers of 10 ms, about 400 results a second, every answer
    // measured while thousands are still parked.
    let worker = fx.kafka_worker("pacer", "sleep:10", &["--max-concurrency", "4"]);
    let window = Duration::from_secs(setting("QP_BENCH_GATEWAY_WAKE_SECONDS", 5));
    let first = Instant::now();
    crate::fixture::eventually(Duration::from_secs(30), "the first result", || {
        let done = !answers.lock().expect("answers").is_empty();
        async move { done.then_some(()) }
    })
    .await;
    tokio::time::sleep(window).await;
    drop(worker);
    let answered = std::mem::take(&mut *answers.lock().expect("answers"));
    progress(format!(
        "{} answered in {:.1}s",
        answered.len(),
        first.elapsed().as_secs_f64()
    ));
    for p in &polls {
        p.abort();
    }
    let mut conn = fx.conn.clone();
    let mut lags = Vec::with_capacity(answered.len());
    for (id, answered_ms) in &answered {
        let at: Option<f64> = redis::cmd("HGET")
            .arg(fx.keys.result(id))
            .arg("at")
            .query_async(&mut conn)
            .await?;
        let at = at.context("a finished result has `at`")?;
        // `at` is whole milliseconds: the lag is over-stated by up to 1 ms, never under.
        lags.push((answered_ms - at).max(0.0));
    }
    lags.sort_by(f64::total_cmp);
    let wake_p99_ms = percentile(&lags, 0.99);
    progress(format!(
        "wake among {n} parked: n={} p50 {:.2} ms p99 {wake_p99_ms:.2} ms max {:.2} ms",
        lags.len(),
        percentile(&lags, 0.5),
        lags.last().copied().unwrap_or(f64::NAN)
    ));
    if lags.len() < 100 {
        bail!("only {} long polls were answered in {window:?}", lags.len());
    }
    Ok(Parked {
        idle_rss_mb,
        rss_mb,
        wake_p99_ms,
    })
}
