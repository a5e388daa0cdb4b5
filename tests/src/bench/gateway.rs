//! The gateway benchmark group: how long a client waits from submitting a request to holding its
//! result, through the whole path (HTTP -> Kafka -> worker -> Redis -> HTTP), and how much the
//! long poll saves over the source article's client, which polls every second up to ten times.
//!
//! Workload: a fixed request rate (open loop: a request is sent on schedule whatever the earlier
//! ones are doing), small JSON bodies, the `echo` handler, a Kafka source with two workers, one
//! gateway. It runs twice with the same workload: once with clients that long-poll
//! (`?wait=10`), once with the article's client. Latency is measured on the client, from just
//! before the `POST` to the moment the answer with the result arrived.
//!
//! Settings (environment): `QP_BENCH_GATEWAY_RATE` (requests per second, default 200),
//! `QP_BENCH_GATEWAY_SECONDS` (length of each run, default 10).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use serde_json::Value;

use super::{Figure, setting};
use crate::env::Env;
use crate::fixture::{Fixture, GatewayQueue, RedisKind};

/// What to run.
#[derive(Debug, Clone)]
pub struct GatewayBench {
    /// Requests per second, sent on a fixed schedule.
    pub rate: u32,
    /// Length of each of the two runs.
    pub duration: Duration,
    /// Worker processes consuming the topic.
    pub workers: usize,
    /// Partitions of the topic.
    pub partitions: i32,
    /// Unmeasured requests first, at the same rate: the workers join their group, connections
    /// open.
    pub warmup: Duration,
}

impl Default for GatewayBench {
    fn default() -> Self {
        GatewayBench {
            rate: 200,
            duration: Duration::from_secs(10),
            workers: 2,
            partitions: 4,
            warmup: Duration::from_secs(3),
        }
    }
}

/// How a client waits for its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// `GET ?wait=10` until the answer is final.
    LongPoll,
    /// The article's client: sleep 1 s, `GET`, at most 10 times, then give up.
    Poll1s,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench gateway] {}", msg.as_ref());
}

/// The group as `qp-bench` runs it, with settings from the environment.
pub async fn run(env: &Env) -> Vec<Figure> {
    let settings = GatewayBench {
        rate: setting("QP_BENCH_GATEWAY_RATE", 200),
        duration: Duration::from_secs(setting("QP_BENCH_GATEWAY_SECONDS", 10)),
        ..GatewayBench::default()
    };
    let mut figures = gateway_bench(env, &settings).await;
    // Then the same gateway under an outside load tool (`gateway_load`).
    figures.extend(super::gateway_load::run().await);
    figures
}

/// Run the benchmark; panics (after cleaning up) when a measurement cannot be taken.
///
/// The services come from the env file (`$QP_ENV_FILE`, the one `env` was read from); the
/// binaries from `$QP_BIN_DIR` or the current target directory.
pub async fn gateway_bench(_env: &Env, settings: &GatewayBench) -> Vec<Figure> {
    let fx = Fixture::new("bench-gw", RedisKind::Single, settings.partitions).await;
    let result = measure(&fx, settings).await;
    fx.cleanup().await;
    match result {
        Ok(figures) => figures,
        Err(e) => panic!("gateway benchmark failed: {e:#}"),
    }
}

async fn measure(fx: &Fixture, s: &GatewayBench) -> Result<Vec<Figure>> {
    // Enough tokens that the gate is not what is measured here (the worker group measures it).
    fx.pool().set_limit(256).await?;
    let _workers: Vec<_> = (0..s.workers)
        .map(|i| fx.kafka_worker(&format!("w{i}"), "echo", &["--max-concurrency", "64"]))
        .collect();
    let (_gateway, base) = fx.gateway(GatewayQueue::Kafka, &[]).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()?;

    progress(format!(
        "{} workers, {} partitions; warm-up {:?} at {} req/s",
        s.workers, s.partitions, s.warmup, s.rate
    ));
    run_load(&http, &base, s.rate, s.warmup, Client::LongPoll, "warmup").await?;

    progress(format!(
        "long-poll clients: {} req/s for {:?}",
        s.rate, s.duration
    ));
    let long = run_load(&http, &base, s.rate, s.duration, Client::LongPoll, "lp").await?;
    progress(format!(
        "1 s polling clients: {} req/s for {:?}",
        s.rate, s.duration
    ));
    let polled = run_load(&http, &base, s.rate, s.duration, Client::Poll1s, "p1s").await?;

    let mut accepted: Vec<f64> = long.iter().map(|l| l.0).collect();
    let mut long: Vec<f64> = long.iter().map(|l| l.1).collect();
    let polled: Vec<f64> = polled.iter().map(|l| l.1).collect();
    accepted.sort_by(f64::total_cmp);
    long.sort_by(f64::total_cmp);
    let p50 = percentile(&long, 0.50);
    let p99 = percentile(&long, 0.99);
    let long_mean = mean(&long);
    let polled_mean = mean(&polled);
    let (accepted_p50, accepted_p99) = (percentile(&accepted, 0.5), percentile(&accepted, 0.99));
    progress(format!(
        "long-poll: n={} p50 {p50:.1} ms p99 {p99:.1} ms mean {long_mean:.1} ms \
         (202 after p50 {accepted_p50:.1} ms, p99 {accepted_p99:.1} ms); \
         1 s polling: n={} mean {polled_mean:.1} ms",
        long.len(),
        polled.len()
    ));
    let ms = || "ms".to_owned();
    Ok(vec![
        ("gateway.submit_to_result_p50_ms".into(), p50, ms()),
        ("gateway.submit_to_result_p99_ms".into(), p99, ms()),
        (
            "gateway.longpoll_vs_1s_polling_mean_latency_ratio".into(),
            long_mean / polled_mean,
            "ratio".into(),
        ),
        ("gateway.submit_accepted_p50_ms".into(), accepted_p50, ms()),
        ("gateway.submit_accepted_p99_ms".into(), accepted_p99, ms()),
        ("gateway.longpoll_mean_latency_ms".into(), long_mean, ms()),
        (
            "gateway.polling_1s_mean_latency_ms".into(),
            polled_mean,
            ms(),
        ),
    ])
}

/// Send `rate` requests per second for `duration`, each waiting for its result the `client`
/// way; returns the submit-to-`202` and submit-to-result latencies of every request in
/// milliseconds. Fails if any request was refused or got no result.
async fn run_load(
    http: &reqwest::Client,
    base: &str,
    rate: u32,
    duration: Duration,
    client: Client,
    tag: &str,
) -> Result<Vec<(f64, f64)>> {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        tokio::time::sleep_until(start + period * n as u32).await;
        let (http, base) = (http.clone(), base.to_owned());
        let body = format!(
            r#"{{"bench":"{tag}","n":{n},"payload":"{}"}}"#,
            "x".repeat(64)
        );
        tasks.push(tokio::spawn(async move {
            one_request(&http, &base, body, client).await
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.context("request task")? {
            Ok(ms) => latencies.push(ms),
            Err(e) => errors.push(e),
        }
    }
    if let Some(e) = errors.first() {
        bail!("{} of {total} requests failed; first: {e:#}", errors.len());
    }
    Ok(latencies)
}

/// Submit one request and wait for its result; milliseconds from submit to the `202`, and from
/// submit to the result.
async fn one_request(
    http: &reqwest::Client,
    base: &str,
    body: String,
    client: Client,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    let resp = http
        .post(format!("{base}/v1/requests"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    if resp.status() != StatusCode::ACCEPTED {
        bail!("submit answered {}", resp.status());
    }
    let answer: Value = resp.json().await?;
    let accepted = started.elapsed().as_secs_f64() * 1000.0;
    let id = answer["id"].as_str().context("an id")?.to_owned();
    let (url, attempts, pause) = match client {
        Client::LongPoll => (format!("{base}/v1/requests/{id}?wait=10"), 6, None),
        Client::Poll1s => (
            format!("{base}/v1/requests/{id}"),
            10,
            Some(Duration::from_secs(1)),
        ),
    };
    for _ in 0..attempts {
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
        let resp = http.get(&url).send().await?;
        match resp.status() {
            StatusCode::OK => {
                let done: Value = resp.json().await?;
                if done["status"] != "done" {
                    bail!("{id} finished as {}", done["status"]);
                }
                return Ok((accepted, started.elapsed().as_secs_f64() * 1000.0));
            }
            StatusCode::ACCEPTED => {}
            other => bail!("polling {id} answered {other}"),
        }
    }
    bail!("{id} had no result after {attempts} polls")
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
