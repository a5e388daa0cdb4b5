//! `qp-demo`: the driver behind `make demo` (hack/demo.sh).
//!
//! ```text
//! qp-demo setup -f <queueprocessor.yaml> [--partitions N]
//!     create the QueueProcessor's Kafka topic with N partitions (default 12), or grow an
//!     existing one to N
//! qp-demo run -f <queueprocessor.yaml> --operator <url> [--requests N] [--timeout SECONDS]
//!             [--secrets-dir DIR]
//!     submit a burst through the gateway of the local mode at <url> and print a live table
//!     every second until the backlog is drained and the replicas are back at the minimum,
//!     then a summary
//! ```
//!
//! Results are followed in Redis (one pipelined read per second), latencies are from just
//! before a request was submitted to the time its result was written, and at the end every
//! result is fetched once more through the gateway, the way a client would: with the token of
//! the first client in the gateway's tokens Secret (`spec.gateway.auth.tokensSecretRef`), read
//! from local mode's secrets directory (`<dir>/<secret>/<key>`).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qp_operator::crd::{QueueProcessor, Source};
use qp_operator::scaler::{self, SecretValues};
use qp_protocol::keys::Keys;
use qp_tests::local::{self, LocalStatus, ResultTracker, WorkerCounter};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

const USAGE: &str = "usage:
  qp-demo setup -f <queueprocessor.yaml> [--partitions N]
  qp-demo run -f <queueprocessor.yaml> --operator <url> [--requests N] [--timeout SECONDS]
              [--secrets-dir DIR]";

/// The series counting redelivered messages that a worker skipped because the request already
/// had its result.
const DUPLICATES: &str = "qp_worker_messages_total{outcome=\"duplicate\"}";

struct Args {
    command: String,
    file: PathBuf,
    operator: String,
    partitions: i32,
    requests: usize,
    timeout: Duration,
    secrets_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or("missing command")?;
    let mut args = Args {
        command,
        file: PathBuf::new(),
        operator: String::new(),
        partitions: 12,
        requests: 3000,
        timeout: Duration::from_secs(150),
        secrets_dir: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "-f" | "--file" => args.file = PathBuf::from(value()?),
            "--operator" => args.operator = value()?.trim_end_matches('/').to_owned(),
            "--partitions" => args.partitions = value()?.parse().map_err(|e| format!("{e}"))?,
            "--requests" => args.requests = value()?.parse().map_err(|e| format!("{e}"))?,
            "--timeout" => {
                args.timeout = Duration::from_secs(value()?.parse().map_err(|e| format!("{e}"))?)
            }
            "--secrets-dir" => args.secrets_dir = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.file.as_os_str().is_empty() {
        return Err("-f <queueprocessor.yaml> is required".into());
    }
    if args.command == "run" && args.operator.is_empty() {
        return Err("--operator <url> is required".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("qp-demo: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let qp = match std::fs::read_to_string(&args.file)
        .map_err(|e| e.to_string())
        .and_then(|t| QueueProcessor::from_yaml(&t).map_err(|e| e.to_string()))
    {
        Ok(qp) => qp,
        Err(e) => {
            eprintln!("qp-demo: {}: {e}", args.file.display());
            return ExitCode::from(2);
        }
    };
    let res = match args.command.as_str() {
        "setup" => setup(&qp, args.partitions).await,
        "run" => run(&qp, &args).await,
        other => {
            eprintln!("qp-demo: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qp-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Create the Kafka topic of the QueueProcessor, or keep it when it exists.
async fn setup(qp: &QueueProcessor, partitions: i32) -> anyhow::Result<ExitCode> {
    let Some(Source::Kafka(k)) = qp.spec.source.get() else {
        println!("the source is not Kafka: nothing to create");
        return Ok(ExitCode::SUCCESS);
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &k.bootstrap_servers)
        .create()?;
    let res = admin
        .create_topics(
            [&NewTopic::new(
                &k.topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in res {
        match r {
            Ok(t) => println!("created Kafka topic {t} with {partitions} partitions"),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                let have = partition_count(&k.bootstrap_servers, &t).await?;
                if have < partitions as usize {
                    let res = admin
                        .create_partitions(
                            [&NewPartitions::new(&t, partitions as usize)],
                            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                        )
                        .await?;
                    for r in res {
                        r.map_err(|(t, e)| anyhow::anyhow!("adding partitions to {t}: {e}"))?;
                    }
                    println!(
                        "Kafka topic {t} exists; grew it from {have} to {partitions} partitions"
                    );
                } else {
                    println!("Kafka topic {t} exists with {have} partitions (kept)");
                }
            }
            Err((t, e)) => anyhow::bail!("creating topic {t}: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Partitions of `topic` (one metadata request).
async fn partition_count(bootstrap: &str, topic: &str) -> anyhow::Result<usize> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        Ok(md.topics().first().map_or(0, |t| t.partitions().len()))
    })
    .await?
}

/// Figures collected while the demo runs.
#[derive(Default)]
struct Peaks {
    replicas: u32,
    backlog: i64,
    tokens_in_use: i32,
    /// Seconds after the first submission when the backlog was measured empty with every
    /// result in.
    drained_at: Option<f64>,
    /// Seconds after the first submission when the workers were back at the minimum, after the
    /// drain.
    scaled_back_at: Option<f64>,
}

async fn run(qp: &QueueProcessor, args: &Args) -> anyhow::Result<ExitCode> {
    let ns = qp.namespace_or_default();
    let name = qp.metadata.name.clone().unwrap_or_default();
    let min = qp.spec.scaling.min_replicas.max(0) as u32;
    let redis = scaler::redis_settings(&qp.spec.redis, &SecretValues::new())?;
    let conn = redis.connect().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .default_headers(gateway_auth(qp, args)?)
        .build()?;
    let mut interrupt = Box::pin(tokio::signal::ctrl_c());

    // 1. Local mode is up: a worker consumes and the gateway takes requests.
    println!("waiting for the first worker and the gateway of {ns}/{name} ...");
    let wait_deadline = Instant::now() + Duration::from_secs(90);
    let st = loop {
        if let Some(st) = local::status(&http, &args.operator).await
            && st.ready_replicas >= 1
            && let Some(g) = &st.gateway_url
            && http
                .get(format!("{g}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        {
            break st;
        }
        if let Some(st) = local::status(&http, &args.operator).await {
            anyhow::ensure!(
                st.restarts < 5,
                "the workers of {ns}/{name} keep exiting ({} restarts): see their logs",
                st.restarts
            );
        }
        anyhow::ensure!(
            Instant::now() < wait_deadline,
            "local mode at {} did not get a ready worker and gateway within 90 s \
             (is spec.gateway.enabled set? see the logs)",
            args.operator
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut interrupt => return Ok(ExitCode::from(130)),
        }
    };
    let gateway = st.gateway_url.clone().expect("checked above");
    if st.backlog() > 0 {
        println!(
            "note: {} messages of an earlier run are still queued; they are processed too",
            st.backlog()
        );
    }
    println!(
        "ready: {} worker(s), gateway at {gateway}; submitting {} requests\n",
        st.ready_replicas, args.requests
    );

    // 2. The burst, submitted in the background while the table runs.
    let submitted = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let first_ms = local::now_ms();
    let mut submitter = tokio::spawn({
        let (http, gateway, submitted) = (http.clone(), gateway.clone(), submitted.clone());
        let (count, deadline) = (args.requests, started + args.timeout);
        async move { local::submit_burst(&http, &gateway, count, 32, deadline, submitted, tx).await }
    });

    // 3. The live table.
    let mut tracker = ResultTracker::new(Keys::new(&ns, &name), conn);
    let mut all_ids: Vec<String> = Vec::with_capacity(args.requests);
    let mut duplicates = WorkerCounter::default();
    let mut window: VecDeque<Vec<i64>> = VecDeque::new();
    let mut peaks = Peaks::default();
    let mut last_scale: Option<String> = None;
    let mut submit_error: Option<String> = None;
    let mut submit_done = false;
    let mut interrupted = false;
    let mut last_tick = Instant::now();
    let mut rows = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut interrupt => { interrupted = true; break; }
        }
        // Finished first, then drained: nothing it sent before finishing is left behind.
        if !submit_done && submitter.is_finished() {
            submit_done = true;
            match (&mut submitter).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => submit_error = Some(format!("{e:#}")),
                Err(e) => submit_error = Some(e.to_string()),
            }
            if let Some(e) = &submit_error {
                println!("        submitting stopped: {e}");
            }
        }
        while let Ok(s) = rx.try_recv() {
            all_ids.push(s.id.clone());
            tracker.add(s);
        }
        let newly = match tracker.refresh().await {
            Ok(n) => n,
            Err(e) => {
                println!("  (reading results from Redis failed: {e}; retrying)");
                Vec::new()
            }
        };
        let elapsed = last_tick.elapsed().as_secs_f64().max(0.001);
        last_tick = Instant::now();
        window.push_back(newly.clone());
        if window.len() > 5 {
            window.pop_front();
        }
        let recent: Vec<i64> = window.iter().flatten().copied().collect();
        let st = local::status(&http, &args.operator).await;
        let t = started.elapsed().as_secs_f64();
        let Some(st) = st else {
            println!(
                "{t:>6.0}s  (local mode does not answer on {})",
                args.operator
            );
            if started.elapsed() > args.timeout {
                break;
            }
            continue;
        };
        duplicates.scrape(&http, &st.worker_ports, DUPLICATES).await;
        peaks.replicas = peaks.replicas.max(st.replicas);
        peaks.backlog = peaks.backlog.max(st.backlog());
        peaks.tokens_in_use = peaks.tokens_in_use.max(st.tokens().0);

        if rows % 20 == 0 {
            print_header();
        }
        rows += 1;
        print_row(
            t,
            submitted.load(Ordering::Relaxed),
            &st,
            newly.len() as f64 / elapsed,
            local::quantile(&recent, 0.99),
            tracker.finished(),
        );
        if let Some(reason) = &st.status.last_scale_reason
            && last_scale.as_ref() != Some(reason)
        {
            if last_scale.is_some() || st.replicas != min {
                println!("        scaling: {reason}");
            }
            last_scale = Some(reason.clone());
        }

        let everything_in = submit_done && tracker.open() == 0;
        if everything_in && peaks.drained_at.is_none() && st.backlog() == 0 {
            peaks.drained_at = Some(t);
            println!(
                "        every request has its result ({:.1} s after the first was submitted); \
                 waiting for the workers to scale back to {min}",
                tracker
                    .last_result_ms
                    .map_or(t, |l| (l - first_ms) as f64 / 1000.0)
            );
        }
        if peaks.drained_at.is_some() && st.replicas <= min && st.desired() <= min {
            peaks.scaled_back_at = Some(t);
            break;
        }
        if started.elapsed() > args.timeout {
            println!(
                "\ngave up after {} s: {} requests still without a result, {} replicas",
                args.timeout.as_secs(),
                tracker.open(),
                st.replicas
            );
            break;
        }
    }
    if !submit_done {
        submitter.abort();
    }
    if interrupted {
        println!("\ninterrupted");
        return Ok(ExitCode::from(130));
    }

    // 4. Every result once more, through the gateway, as a client would fetch it.
    let fetched = fetch_results(&http, &gateway, &all_ids).await;
    summary(
        qp,
        args,
        &all_ids,
        &tracker,
        fetched,
        duplicates.total(),
        &peaks,
        submit_error.as_deref(),
    );
    let ok = all_ids.len() == args.requests
        && tracker.open() == 0
        && tracker.failed.is_empty()
        && fetched == all_ids.len();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_header() {
    println!(
        "{:>7} {:>9} {:>8} {:>9} {:>6} {:>8} {:>7} {:>9} {:>12}",
        "time",
        "submitted",
        "backlog",
        "replicas",
        "ready",
        "tokens",
        "done/s",
        "p99 (5s)",
        "results"
    );
}

fn print_row(
    t: f64,
    submitted: usize,
    st: &LocalStatus,
    rate: f64,
    p99_ms: Option<i64>,
    finished: usize,
) {
    let replicas = if st.desired() != st.replicas {
        format!("{}→{}", st.replicas, st.desired())
    } else {
        st.replicas.to_string()
    };
    let (in_use, limit) = st.tokens();
    let p99 = p99_ms.map_or("-".to_owned(), |ms| format!("{:.2}s", ms as f64 / 1000.0));
    println!(
        "{:>6.0}s {:>9} {:>8} {:>9} {:>6} {:>8} {:>7.0} {:>9} {:>12}",
        t,
        submitted,
        st.status.backlog.map_or("?".to_owned(), |b| b.to_string()),
        replicas,
        st.ready_replicas,
        format!("{in_use}/{limit}"),
        rate,
        p99,
        format!("{finished}/{submitted}"),
    );
}

/// How many of `ids` the gateway returns as done (plain GETs, 32 at a time).
/// `Authorization: Bearer <token>` of the first client in the gateway's tokens file, when the
/// gateway has authentication on.
fn gateway_auth(qp: &QueueProcessor, args: &Args) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut headers = reqwest::header::HeaderMap::new();
    let Some(r) = &qp.spec.gateway.auth.tokens_secret_ref else {
        return Ok(headers);
    };
    let dir = args.secrets_dir.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "the gateway takes tokens from Secret {}: pass --secrets-dir",
            r.name
        )
    })?;
    let path = dir.join(&r.name).join(&r.key);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let token = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| l.split_once(':').map(|(_, t)| t.trim().to_owned()))
        .ok_or_else(|| anyhow::anyhow!("no <client>:<token> line in {}", path.display()))?;
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(headers)
}

async fn fetch_results(http: &reqwest::Client, gateway: &str, ids: &[String]) -> usize {
    futures::stream::iter(ids)
        .map(|id| async move {
            let resp = http
                .get(format!("{gateway}/v1/requests/{id}"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = resp.json().await.ok()?;
            (v["status"] == "done").then_some(())
        })
        .buffer_unordered(32)
        .filter(|r| futures::future::ready(r.is_some()))
        .count()
        .await
}

#[allow(clippy::too_many_arguments)]
fn summary(
    qp: &QueueProcessor,
    args: &Args,
    ids: &[String],
    tracker: &ResultTracker,
    fetched: usize,
    duplicates: f64,
    peaks: &Peaks,
    submit_error: Option<&str>,
) {
    let secs = |ms: Option<i64>| ms.map_or("-".to_owned(), |v| format!("{:.2} s", v as f64 / 1e3));
    println!("\nsummary");
    println!(
        "  requests       {} submitted through the gateway (of {})",
        ids.len(),
        args.requests
    );
    if let Some(e) = submit_error {
        println!("                 submitting stopped: {e}");
    }
    println!(
        "  results        {} done, {} failed, {} missing; {} of {} fetched back through the gateway",
        tracker.done_ms.len(),
        tracker.failed.len(),
        tracker.open(),
        fetched,
        ids.len()
    );
    println!(
        "  duplicates     {duplicates:.0} redelivered messages skipped because their result existed \
         (results are written once: no request got two)"
    );
    println!(
        "  latency        p50 {}, p99 {}, max {} (submit to result)",
        secs(local::quantile(&tracker.done_ms, 0.5)),
        secs(local::quantile(&tracker.done_ms, 0.99)),
        secs(tracker.done_ms.iter().copied().max()),
    );
    println!(
        "  peak           {} replicas (max {}), backlog {}, {} tokens in use (limit {})",
        peaks.replicas,
        qp.spec.scaling.max_replicas,
        peaks.backlog,
        peaks.tokens_in_use,
        qp.spec.concurrency.global_max_tokens
    );
    match peaks.drained_at {
        Some(d) => println!("  drained        {d:.0} s after the first request"),
        None => println!("  drained        no (see the table)"),
    }
    match (peaks.drained_at, peaks.scaled_back_at) {
        (Some(d), Some(s)) => println!(
            "  scaled back    to {} replica(s) {:.0} s after the drain",
            qp.spec.scaling.min_replicas,
            s - d
        ),
        _ => println!("  scaled back    not yet"),
    }
    if let Some(url) = qp_tests::env::path()
        .exists()
        .then(qp_tests::env::load)
        .and_then(|e| e.try_get("QP_PROMETHEUS_URL"))
    {
        // The console page's graphs read their range from the URL fragment: the last 10 min.
        println!(
            "\ndashboard: {url}/consoles/queue-processor.html#pctc%7B%22duration%22%3A600%2C%22endTime%22%3A0%7D"
        );
    }
}
