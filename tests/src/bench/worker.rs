//! The worker benchmark group: throughput with and without the token gate, against a
//! re-creation of the source article's gate, Redis round trips per message, and how fast a
//! released token reaches a waiting worker. `BENCHMARKS.md` explains every figure.
//!
//! Everything Redis-related runs on a private `redis-server` started for this group (see
//! [`super::private_redis`]), so no other client disturbs the command counts.
//!
//! Settings (environment): `QP_BENCH_MESSAGES` (default 100000), `QP_BENCH_PARTITIONS` (8),
//! `QP_BENCH_LIMIT` (token limit and `--max-concurrency` of the gated worker, 64),
//! `QP_BENCH_WAKE_SAMPLES` (300), `QP_BENCH_ROUNDS` (3: each throughput is the best of this
//! many runs), `QP_BENCH_SEED_PACED_MESSAGES` (5000: the article's pacing runs at about 1000
//! msg/s), `QP_BENCH_WORKER_LOG` (the workers' `RUST_LOG`, default
//! `warn`; their logs go to `target/test-logs/bench-*.log`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::{Conn, RedisSettings};
use qp_protocol::tokens::{PoolOptions, TokenPool};
use qp_worker::keeper::{KeeperConfig, LeaseKeeper};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use super::private_redis::{CountingProxy, PrivateRedis, commands_executed};
use super::{Figure, setting};
use crate::env::Env;
use crate::procs::{self, Proc};

/// Bytes of each message body (plus its id): a small JSON request.
const PAYLOAD_BYTES: usize = 100;

/// The article's constants: 10 tokens, 10 consumer threads, a 10 ms schedule, a 5 s `BLPOP`.
const SEED_TOKENS: usize = 10;
const SEED_THREADS: usize = 10;
const SEED_TICK: Duration = Duration::from_millis(10);
const SEED_BLPOP_SECONDS: u64 = 5;

/// How long results live, in both designs.
const RESULT_TTL_SECONDS: u64 = 3600;

/// The article's "decrement if greater than zero" script, verbatim in behaviour: -1 when the
/// counter is 0, the decremented value when it was positive.
const DECR_IF_GREATER_THAN_ZERO: &str = "local count = redis.call('get',KEYS[1]);\
    if count and tonumber(count)==0 then count=-1; end;\
    if count and tonumber(count)>0 then count=redis.call('incrby',KEYS[1],-1); end;\
    return tonumber(count)";

struct Settings {
    messages: u64,
    partitions: i32,
    limit: u64,
    wake_samples: usize,
    /// Messages for the paced seed-style run (about 1000 msg/s, so fewer).
    seed_paced_messages: u64,
    /// Runs of each throughput measurement (the best counts).
    rounds: u32,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench worker] {}", msg.as_ref());
}

/// Run the whole group; panics (after cleaning up) when a measurement cannot be taken.
pub async fn run(env: &Env) -> Vec<Figure> {
    match run_inner(env).await {
        Ok(figures) => figures,
        Err(e) => panic!("worker benchmark failed: {e:#}"),
    }
}

async fn run_inner(env: &Env) -> Result<Vec<Figure>> {
    let s = Settings {
        messages: setting("QP_BENCH_MESSAGES", 100_000),
        partitions: setting("QP_BENCH_PARTITIONS", 8),
        limit: setting("QP_BENCH_LIMIT", 64),
        wake_samples: setting("QP_BENCH_WAKE_SAMPLES", 300),
        seed_paced_messages: setting("QP_BENCH_SEED_PACED_MESSAGES", 5000),
        rounds: setting("QP_BENCH_ROUNDS", 3).max(1),
    };
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let redis = PrivateRedis::start(&format!("bench-redis-{suffix}")).await?;
    let proxy = CountingProxy::start(redis.port).await?;
    progress(format!(
        "private redis-server on {}, counting proxy on {}",
        redis.url(),
        proxy.url()
    ));
    let bootstrap = env.get("QP_KAFKA_BOOTSTRAP");
    let topic = format!("qp-bench-{suffix}");
    crate::kafka::create_topic(&bootstrap, &topic, s.partitions).await;
    let result = async {
        let t = Instant::now();
        produce(&bootstrap, &topic, s.messages).await?;
        progress(format!(
            "produced {} messages to {topic} ({} partitions) in {:.1}s",
            s.messages,
            s.partitions,
            t.elapsed().as_secs_f64()
        ));
        let ctx = KafkaRun {
            redis: &redis,
            proxy: &proxy,
            bootstrap: &bootstrap,
            topic: &topic,
            messages: s.messages,
            limit: s.limit,
        };
        // The same messages from a Redis stream and a Redis list, filled anew for each run.
        let stream_key = format!("{{bench}}:stream-{suffix}");
        let list_key = format!("{{bench}}:list-{suffix}");
        let kinds = [
            ("ungated", false, From::Kafka),
            ("gated", true, From::Kafka),
            ("stream", true, From::Stream(&stream_key)),
            ("list", true, From::List(&list_key)),
        ];
        // Each throughput is the best of `rounds` runs, taken in turns so that a slow minute of
        // the machine weighs on every kind alike (as kcat's figure is the best of three).
        let mut best: [Option<KafkaResult>; 4] = Default::default();
        for round in 1..=s.rounds {
            progress(format!("round {round} of {}", s.rounds));
            for ((kind, gated, from), best) in kinds.iter().zip(&mut best) {
                let name = format!("{kind}-{suffix}-{round}");
                let r = ctx.run_from(&name, *gated, false, *from).await?;
                if best.as_ref().is_none_or(|b| r.rate > b.rate) {
                    *best = Some(r);
                }
            }
        }
        let [ungated, gated, stream, list] = best.map(|b| b.expect("at least one round"));
        // Commands per message, counted through the proxy (which slows the worker: these runs
        // give no throughput figure).
        let counted = ctx.run(&format!("counted-{suffix}"), true, true).await?;
        let stream_counted = ctx
            .run_from(
                &format!("stream-counted-{suffix}"),
                true,
                true,
                From::Stream(&stream_key),
            )
            .await?;
        // The yardstick: a bare librdkafka consumer reading the same topic to its end.
        let kcat = kcat_rate(&bootstrap, &topic, s.messages).await?;
        let seed = seed_style(
            &redis,
            s.seed_paced_messages.min(s.messages),
            &format!("{suffix}-paced"),
            Pacing::EveryTick,
        )
        .await?;
        let unpaced = seed_style(
            &redis,
            s.messages,
            &format!("{suffix}-unpaced"),
            Pacing::OnlyWhenIdle,
        )
        .await?;
        let wake = wake_latency(&redis, s.wake_samples, &suffix).await?;
        Ok::<_, anyhow::Error>((
            gated,
            ungated,
            counted,
            [seed, unpaced],
            wake,
            [stream, stream_counted],
            list,
            kcat,
        ))
    }
    .await;
    crate::kafka::delete_topic(&bootstrap, &topic).await;
    let (gated, ungated, counted, [seed, unpaced], wake, [stream, stream_counted], list, kcat) =
        result?;
    progress(format!(
        "list: {:.0} msg/s ({:.2} of Kafka gated); kcat: {kcat:.0} msg/s (gated is {:.3} of it)",
        list.rate,
        list.rate / gated.rate,
        gated.rate / kcat,
    ));
    let stream_sent = stream_counted.sent.unwrap_or_default();
    progress(format!(
        "stream: {:.0} msg/s ({:.2} of Kafka gated), counted run: {stream_sent} commands sent \
         ({:.4}/msg), {:.2} executed/msg ({})",
        stream.rate,
        stream.rate / gated.rate,
        stream_sent as f64 / s.messages as f64,
        stream_counted.executed as f64 / s.messages as f64,
        stream_counted.breakdown,
    ));

    let n = s.messages as f64;
    let sent = counted.sent.unwrap_or_default();
    progress(format!(
        "gated: {:.0} msg/s, {:.2} commands executed/msg; counted run: {:.0} msg/s through the \
         proxy, {sent} commands sent ({:.4}/msg), {} executed by Redis incl. inside scripts \
         ({:.2}/msg: {})",
        gated.rate,
        gated.executed as f64 / n,
        counted.rate,
        sent as f64 / n,
        counted.executed,
        counted.executed as f64 / n,
        counted.breakdown,
    ));
    progress(format!(
        "ungated: {:.0} msg/s, {:.2} commands executed/msg",
        ungated.rate,
        ungated.executed as f64 / n
    ));
    for (label, r) in [("seed-style", &seed), ("seed-style unpaced", &unpaced)] {
        let m = r.messages as f64;
        progress(format!(
            "{label}: {} messages, {:.0} msg/s, {:.2} commands sent/msg, {:.2} executed/msg, {} \
             idle 10 ms ticks",
            r.messages,
            r.rate,
            r.sent as f64 / m,
            r.executed as f64 / m,
            r.idle_ticks
        ));
    }
    progress(format!(
        "wake: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} samples",
        wake.p50_ms, wake.p99_ms, wake.max_ms, wake.samples
    ));
    let fig = |name: &str, value: f64, unit: &str| (name.to_owned(), value, unit.to_owned());
    Ok(vec![
        fig("worker.gated_msgs_per_s", gated.rate, "msg/s"),
        fig("worker.ungated_msgs_per_s", ungated.rate, "msg/s"),
        fig("worker.seedstyle_msgs_per_s", seed.rate, "msg/s"),
        fig(
            "worker.ratio_gated_vs_ungated",
            gated.rate / ungated.rate,
            "ratio",
        ),
        fig(
            "worker.ratio_gated_vs_seedstyle",
            gated.rate / seed.rate,
            "ratio",
        ),
        fig("worker.seedstyle_unpaced_msgs_per_s", unpaced.rate, "msg/s"),
        fig(
            "worker.ratio_gated_vs_seedstyle_unpaced",
            gated.rate / unpaced.rate,
            "ratio",
        ),
        fig(
            "worker.redis_roundtrips_per_msg",
            sent as f64 / n,
            "roundtrips/msg",
        ),
        fig("worker.wake_p99_ms", wake.p99_ms, "ms"),
        fig("worker.stream_msgs_per_s", stream.rate, "msg/s"),
        fig(
            "worker.ratio_stream_vs_kafka",
            stream.rate / gated.rate,
            "ratio",
        ),
        fig(
            "worker.redis_roundtrips_per_msg_stream",
            stream_sent as f64 / n,
            "roundtrips/msg",
        ),
        fig("worker.redis_list_msgs_per_s", list.rate, "msg/s"),
        fig(
            "worker.ratio_list_vs_kafka",
            list.rate / gated.rate,
            "ratio",
        ),
        fig("worker.kcat_msgs_per_s", kcat, "msg/s"),
        fig("worker.ratio_gated_vs_kcat", gated.rate / kcat, "ratio"),
    ])
}

/// The same `n` messages as [`produce`] (ids `m-<i>`, the same body) into a stream or a list of
/// the private Redis, in the order a worker takes them (`m-0` first), 1000 to a pipeline.
async fn fill(redis: &PrivateRedis, into: From<'_>, n: u64) -> Result<()> {
    let mut conn = RedisSettings::single(redis.url()).connect().await?;
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for j in i..(i + 1000).min(n) {
            let id = format!("m-{j}");
            let body = payload(&id);
            match into {
                From::Stream(key) => pipe
                    .cmd("XADD")
                    .arg(key)
                    .arg("*")
                    .arg("id")
                    .arg(&id)
                    .arg("contentType")
                    .arg("application/json")
                    .arg("body")
                    .arg(body),
                From::List(key) => pipe.cmd("LPUSH").arg(key).arg(
                    qp_worker::source::redis_list::Envelope::new(
                        &id,
                        Some("application/json"),
                        body.as_bytes(),
                    )
                    .to_bytes(),
                ),
                From::Kafka => bail!("Kafka is filled by `produce`"),
            }
            .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
        i += 1000;
    }
    Ok(())
}

/// [`fill`], saying how long it took.
async fn fill_timed(redis: &PrivateRedis, into: From<'_>, n: u64) -> Result<()> {
    let t = Instant::now();
    fill(redis, into, n).await?;
    let key = match into {
        From::Stream(key) | From::List(key) => key,
        From::Kafka => "",
    };
    progress(format!(
        "{n} messages into {key} in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// `kcat -C -e` (`$QP_KCAT`, installed by `hack/bench-tools.sh`) reading every message of the
/// topic from the beginning, the best of three runs, in messages per second from its first
/// message to its last (as the worker's rate is measured), printing one short line each.
async fn kcat_rate(bootstrap: &str, topic: &str, n: u64) -> Result<f64> {
    let kcat = std::env::var("QP_KCAT").unwrap_or_else(|_| "kcat".into());
    let mut best: f64 = 0.0;
    for run in 1..=3 {
        let mut child = std::process::Command::new(&kcat)
            .args(["-C", "-e", "-q", "-o", "beginning"])
            .args(["-b", bootstrap, "-t", topic, "-f", "%o\\n"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {kcat} (apt-get install kcat)"))?;
        let out = child.stdout.take().expect("piped");
        let started = Instant::now();
        let (count, first, last) = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let (mut count, mut first, mut last) = (0u64, None, None);
            for line in std::io::BufReader::new(out).lines() {
                if line.is_err() {
                    break;
                }
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                count += 1;
            }
            (count, first, last)
        })
        .await?;
        let status = tokio::task::spawn_blocking(move || child.wait()).await??;
        if !status.success() || count != n {
            bail!("kcat run {run} read {count} of {n} messages and exited with {status}");
        }
        let (first, last) = (first.expect("read some"), last.expect("read some"));
        let rate = (count - 1) as f64 / last.duration_since(first).as_secs_f64();
        progress(format!(
            "kcat run {run}: {count} messages, {rate:.0} msg/s first to last, {:.2}s in all",
            started.elapsed().as_secs_f64()
        ));
        best = best.max(rate);
    }
    Ok(best)
}

/// Produce `n` messages with ids `m-<i>` and a ~100 byte JSON body, keyed by id (so they
/// spread over the partitions), and wait until Kafka has all of them.
async fn produce(bootstrap: &str, topic: &str, n: u64) -> Result<()> {
    let producer = crate::kafka::producer(bootstrap);
    let ids: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    for chunk in ids.chunks(10_000) {
        let sends = chunk.iter().map(|id| {
            let body = payload(id);
            let producer = &producer;
            async move {
                let headers = OwnedHeaders::new().insert(Header {
                    key: "qp-id",
                    value: Some(id.as_bytes()),
                });
                producer
                    .send(
                        FutureRecord::to(topic)
                            .key(id.as_str())
                            .payload(&body)
                            .headers(headers),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| anyhow!("producing {id}: {e}"))
            }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
    }
    Ok(())
}

fn payload(id: &str) -> String {
    let pad = PAYLOAD_BYTES.saturating_sub(id.len() + 20);
    format!("{{\"id\":\"{id}\",\"data\":\"{}\"}}", "x".repeat(pad))
}

/// Where a measured worker reads the messages from.
#[derive(Clone, Copy)]
enum From<'a> {
    /// The pre-produced topic.
    Kafka,
    /// A Redis stream in the private Redis, filled anew for each run.
    Stream(&'a str),
    /// A Redis list in the private Redis.
    List(&'a str),
}

/// What one worker run measured.
struct KafkaResult {
    rate: f64,
    /// Commands the worker sent to Redis over its whole life (start to exit), when it talked
    /// to Redis through the counting proxy.
    sent: Option<u64>,
    /// Commands Redis executed for it, including those inside scripts.
    executed: u64,
    /// `INFO commandstats` deltas of the biggest command kinds, for the log.
    breakdown: String,
}

struct KafkaRun<'a> {
    redis: &'a PrivateRedis,
    proxy: &'a CountingProxy,
    bootstrap: &'a str,
    topic: &'a str,
    messages: u64,
    limit: u64,
}

impl KafkaRun<'_> {
    /// One `qp-worker run` process consuming the whole topic with its own consumer group and
    /// QueueProcessor name (so nothing of an earlier run is reused). The rate is measured from
    /// the first processed message to the last (the `processed` counter in Redis, polled every
    /// 5 ms), so process start and the consumer-group join are not part of it. With `counted`
    /// the worker reaches Redis through the counting proxy; that costs CPU and a hop of
    /// latency, so the throughput figures come from runs without it.
    async fn run(&self, name: &str, gated: bool, counted: bool) -> Result<KafkaResult> {
        self.run_from(name, gated, counted, From::Kafka).await
    }

    /// [`KafkaRun::run`] from `from` instead of the topic.
    async fn run_from(
        &self,
        name: &str,
        gated: bool,
        counted: bool,
        from: From<'_>,
    ) -> Result<KafkaResult> {
        // Every run starts from an empty Redis holding only its input.
        self.redis.flush().await?;
        if !matches!(from, From::Kafka) {
            fill_timed(self.redis, from, self.messages).await?;
        }
        let settings = RedisSettings::single(self.redis.url());
        let mut conn = settings.connect().await?;
        let keys = Keys::new("bench", name);
        if gated {
            let pool = TokenPool::new(
                conn.clone(),
                settings.clone(),
                keys.clone(),
                PoolOptions::default(),
            );
            pool.set_limit(self.limit).await?;
        }
        let stats_before = command_stats(&mut conn).await?;
        let executed_before = commands_executed(&mut conn).await?;
        let sent_before = self.proxy.commands();
        let redis_url = if counted {
            self.proxy.url()
        } else {
            self.redis.url()
        };

        let mut cmd = std::process::Command::new(procs::binary("qp-worker"));
        cmd.arg("run")
            .args(["--namespace", "bench", "--name", name])
            .args(["--worker-id", &format!("{name}-w")])
            .args(["--listen", &format!("127.0.0.1:{}", procs::free_port())])
            .args(["--redis-url", &redis_url])
            .args(["--handler", "echo"])
            .args(["--max-concurrency", &self.limit.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("QP_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            );
        match from {
            From::Kafka => cmd
                .args(["--source", "kafka", "--kafka-bootstrap", self.bootstrap])
                .args(["--kafka-topic", self.topic])
                .args(["--kafka-group", &format!("{name}-group")]),
            From::Stream(key) => cmd
                .args(["--source", "redis-stream", "--stream-key", key])
                .args(["--stream-group", &format!("{name}-group")]),
            From::List(key) => cmd.args(["--source", "redis-list", "--list-key", key]),
        };
        if !gated {
            cmd.arg("--ungated");
        }
        if let Ok(extra) = std::env::var("QP_BENCH_DEBUG_ARGS") {
            cmd.args(extra.split_whitespace());
        }
        let label = match (gated, counted, from) {
            (false, _, _) => "ungated",
            (true, false, From::Kafka) => "gated",
            (true, true, From::Kafka) => "gated+counted",
            (true, false, From::Stream(_)) => "stream",
            (true, true, From::Stream(_)) => "stream+counted",
            (true, false, From::List(_)) => "list",
            (true, true, From::List(_)) => "list+counted",
        };
        progress(format!("{label}: starting qp-worker"));
        let mut worker = Proc::spawn(&format!("bench-{name}"), cmd);

        let mut polls = 0u64;
        let started = Instant::now();
        let processed_key = keys.processed();
        let mut first: Option<(Instant, u64)> = None;
        let mut cpu_at_first = (0.0, 0.0);
        let last = loop {
            let count: Option<u64> = redis::cmd("GET")
                .arg(&processed_key)
                .query_async(&mut conn)
                .await?;
            polls += 1;
            let count = count.unwrap_or(0);
            let now = Instant::now();
            if count > 0 && first.is_none() {
                first = Some((now, count));
                cpu_at_first = (self.redis.cpu_seconds(), procs::cpu_seconds(worker.pid()));
                progress(format!(
                    "{label}: first results after {:.1}s (process start and group join)",
                    started.elapsed().as_secs_f64()
                ));
            }
            if count >= self.messages {
                let (redis_cpu, worker_cpu) = cpu_at_first;
                progress(format!(
                    "{label}: CPU seconds from the first result to the last: Redis {:.2}, \
                     worker {:.2}",
                    self.redis.cpu_seconds() - redis_cpu,
                    procs::cpu_seconds(worker.pid()) - worker_cpu,
                ));
                break (now, count);
            }
            if !worker.alive() {
                bail!("{label} worker exited early; see target/test-logs/bench-{name}.log");
            }
            let limit = if first.is_some() { 120 } else { 60 };
            if started.elapsed() > Duration::from_secs(limit) {
                bail!(
                    "{label} worker processed only {count} of {} messages in {limit}s",
                    self.messages
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (t0, c0) = first.expect("first is set before the last");
        let elapsed = last.0.duration_since(t0).as_secs_f64();
        let rate = if elapsed > 0.0 {
            (last.1 - c0) as f64 / elapsed
        } else {
            f64::NAN
        };
        progress(format!(
            "{label}: {} messages in {:.2}s after the first results: {rate:.0} msg/s",
            last.1 - c0,
            elapsed
        ));

        let clean = tokio::task::spawn_blocking(move || worker.terminate()).await?;
        if !clean {
            progress(format!("{label}: worker did not exit cleanly on SIGTERM"));
        }
        let sent = counted.then(|| self.proxy.commands() - sent_before);
        // The delta includes our first INFO and our polls; the second INFO counts itself
        // only after it ran.
        let executed = commands_executed(&mut conn).await? - executed_before - 1 - polls;
        let stats_after = command_stats(&mut conn).await?;
        Ok(KafkaResult {
            rate,
            sent,
            executed,
            breakdown: breakdown(&stats_before, &stats_after),
        })
    }
}

/// `INFO commandstats` as (command, calls).
async fn command_stats(conn: &mut Conn) -> Result<Vec<(String, u64)>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect())
}

/// The commands whose call counts grew most, as `name=delta` pairs.
fn breakdown(before: &[(String, u64)], after: &[(String, u64)]) -> String {
    let mut deltas: Vec<(String, u64)> = after
        .iter()
        .map(|(name, calls)| {
            let prev = before
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, c)| *c);
            (name.clone(), calls - prev)
        })
        .filter(|(name, d)| *d > 0 && name != "info" && name != "get")
        .collect();
    deltas.sort_by_key(|d| std::cmp::Reverse(d.1));
    deltas
        .iter()
        .take(6)
        .map(|(n, d)| format!("{n}={d}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// The article's gate, re-created

struct SeedResult {
    messages: u64,
    rate: f64,
    /// Commands the re-creation sent (it counts its own calls).
    sent: u64,
    /// Commands Redis executed, including the two inside the Lua script.
    executed: u64,
    /// Times a consumer found the counter at zero and slept one 10 ms tick.
    idle_ticks: u64,
}

/// Shared state of the seed-style consumers.
struct Seed {
    queue: String,
    counter: String,
    tokens: String,
    result_prefix: String,
    processed: AtomicU64,
    sent: AtomicU64,
    idle_ticks: AtomicU64,
    stop: AtomicBool,
    target: u64,
    /// One check per 10 ms tick, as the article's scheduler runs it (see [`Pacing`]).
    pacing: Pacing,
    first: std::sync::Mutex<Option<Instant>>,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Seed {
    fn count(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often a seed-style consumer checks for work.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pacing {
    /// The article: "every 10 ms it loops once" (a scheduled thread pool), one message per
    /// consumer per tick at most. This is the baseline of `worker.seedstyle_msgs_per_s`.
    EveryTick,
    /// Generous: a consumer that found work loops again at once; the 10 ms wait only when idle.
    /// Reported as `worker.seedstyle_unpaced_msgs_per_s`, to show the gate's own cost.
    OnlyWhenIdle,
}

/// The gate of the second source article, in Rust, faithful where it matters for speed:
///
/// * a Redis list `queue` pre-filled with the messages and a counter of pending messages (the
///   article increments it per enqueued message; here it starts at N);
/// * 10 tokens in a Redis list; 10 consumer tasks (the article's threads), each with its own
///   connection as a Jedis pool gives each thread;
/// * each consumer: run the Lua "decrement if greater than zero"; on a result >= 0, `BLPOP` a
///   token (5 s timeout), `RPOP` a message, process it asynchronously (echo, then `SET` the
///   result with a TTL) and `RPUSH` the token back, also on error; when no token came within
///   the timeout, `INCR` the counter back. A result < 0 waits for the next 10 ms tick.
///
/// Generous to the baseline (see BENCHMARKS.md): ticks run at a fixed rate (an iteration that
/// takes long does not delay the next one), the asynchronous part shares one pipelined
/// connection, and a token is also returned when `RPOP` finds the queue empty (the article's
/// code would leak it). With [`Pacing::OnlyWhenIdle`] it is more generous still.
async fn seed_style(
    redis: &PrivateRedis,
    n: u64,
    suffix: &str,
    pacing: Pacing,
) -> Result<SeedResult> {
    redis.flush().await?;
    let client = redis::Client::open(redis.url())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(SEED_BLPOP_SECONDS + 5)));
    let mut admin = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let seed = Arc::new(Seed {
        queue: format!("seed:{suffix}:queue"),
        counter: format!("seed:{suffix}:counter"),
        tokens: format!("seed:{suffix}:tokens"),
        result_prefix: format!("seed:{suffix}:result:"),
        processed: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        idle_ticks: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        target: n,
        pacing,
        first: std::sync::Mutex::new(None),
        last: std::sync::Mutex::new(None),
    });
    // Fill the queue the way the article's producers do (LPUSH, consumers RPOP: FIFO).
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        let mut push = redis::cmd("LPUSH");
        push.arg(&seed.queue);
        for i in chunk {
            let id = format!("m-{i}");
            push.arg(format!("{id}|{}", payload(&id)));
        }
        pipe.add_command(push).ignore();
        let _: () = pipe.query_async(&mut admin).await?;
    }
    let _: () = redis::cmd("SET")
        .arg(&seed.counter)
        .arg(n)
        .query_async(&mut admin)
        .await?;
    let tokens: Vec<String> = (1..=SEED_TOKENS).map(|i| i.to_string()).collect();
    let _: () = redis::cmd("RPUSH")
        .arg(&seed.tokens)
        .arg(&tokens)
        .query_async(&mut admin)
        .await?;
    progress(format!(
        "seed-style: queued {n} messages in a Redis list in {:.1}s; {SEED_THREADS} consumers, \
         {SEED_TOKENS} tokens",
        t.elapsed().as_secs_f64()
    ));

    let executed_before = commands_executed(&mut admin).await?;
    let worker_conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let mut consumers = Vec::new();
    for _ in 0..SEED_THREADS {
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        consumers.push(tokio::spawn(seed_consumer(
            seed.clone(),
            conn,
            worker_conn.clone(),
        )));
    }
    let started = Instant::now();
    while seed.processed.load(Ordering::Relaxed) < n {
        if started.elapsed() > Duration::from_secs(120) {
            seed.stop.store(true, Ordering::Relaxed);
            bail!(
                "seed-style processed only {} of {n} messages in 120s",
                seed.processed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seed.stop.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await.context("seed-style consumer")??;
    }
    let first = seed.first.lock().unwrap().context("no first message")?;
    let last = seed.last.lock().unwrap().context("no last message")?;
    let elapsed = last.duration_since(first).as_secs_f64();
    let rate = (n - 1) as f64 / elapsed;
    progress(format!(
        "seed-style: {n} messages in {elapsed:.2}s from the first to the last: {rate:.0} msg/s"
    ));
    let executed = commands_executed(&mut admin).await? - executed_before - 1;
    let left: u64 = redis::cmd("LLEN")
        .arg(&seed.tokens)
        .query_async(&mut admin)
        .await?;
    if left != SEED_TOKENS as u64 {
        progress(format!(
            "seed-style: {left} of {SEED_TOKENS} tokens back in the list at the end"
        ));
    }
    let _: () = redis::cmd("DEL")
        .arg(&seed.queue)
        .arg(&seed.counter)
        .arg(&seed.tokens)
        .query_async(&mut admin)
        .await?;
    Ok(SeedResult {
        messages: n,
        rate,
        sent: seed.sent.load(Ordering::Relaxed),
        executed,
        idle_ticks: seed.idle_ticks.load(Ordering::Relaxed),
    })
}

/// One of the article's consumer threads.
async fn seed_consumer(
    seed: Arc<Seed>,
    mut conn: redis::aio::MultiplexedConnection,
    worker_conn: redis::aio::MultiplexedConnection,
) -> Result<()> {
    let decr = redis::cmd("EVAL")
        .arg(DECR_IF_GREATER_THAN_ZERO)
        .arg(1)
        .arg(&seed.counter)
        .to_owned();
    let mut schedule = tokio::time::interval(SEED_TICK);
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while !seed.stop.load(Ordering::Relaxed) {
        if seed.pacing == Pacing::EveryTick {
            schedule.tick().await;
        }
        let count: Option<i64> = decr.query_async(&mut conn).await?;
        seed.count();
        if count.unwrap_or(-1) < 0 {
            // Nothing pending: wait for the next tick of the article's scheduler.
            seed.idle_ticks.fetch_add(1, Ordering::Relaxed);
            if seed.pacing == Pacing::OnlyWhenIdle {
                tokio::time::sleep(SEED_TICK).await;
            }
            continue;
        }
        let waited = Instant::now();
        let token: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&seed.tokens)
            .arg(SEED_BLPOP_SECONDS)
            .query_async(&mut conn)
            .await?;
        seed.count();
        let Some((_, token)) = token else {
            if waited.elapsed() >= Duration::from_secs(SEED_BLPOP_SECONDS) {
                // The decrement was for nothing: give it back.
                let _: i64 = redis::cmd("INCR")
                    .arg(&seed.counter)
                    .query_async(&mut conn)
                    .await?;
                seed.count();
            }
            continue;
        };
        let message: Option<String> = redis::cmd("RPOP")
            .arg(&seed.queue)
            .query_async(&mut conn)
            .await?;
        seed.count();
        let Some(message) = message else {
            let _: i64 = redis::cmd("RPUSH")
                .arg(&seed.tokens)
                .arg(&token)
                .query_async(&mut conn)
                .await?;
            seed.count();
            continue;
        };
        // Process asynchronously and give the token back afterwards, also on error.
        let seed = seed.clone();
        let mut wc = worker_conn.clone();
        tokio::spawn(async move {
            let outcome = seed_process(&seed, &mut wc, &message).await;
            let back: redis::RedisResult<i64> = redis::cmd("RPUSH")
                .arg(&seed.tokens)
                .arg(&token)
                .query_async(&mut wc)
                .await;
            seed.count();
            if let Err(e) = outcome.and(back.map(|_| ())) {
                progress(format!("seed-style: processing failed: {e}"));
                return;
            }
            let now = Instant::now();
            let done = seed.processed.fetch_add(1, Ordering::Relaxed) + 1;
            if done == 1 {
                *seed.first.lock().unwrap() = Some(now);
            }
            if done == seed.target {
                *seed.last.lock().unwrap() = Some(now);
            }
        });
    }
    Ok(())
}

/// The article's "consume": here the echo handler, its result written with a TTL.
async fn seed_process(
    seed: &Seed,
    conn: &mut redis::aio::MultiplexedConnection,
    message: &str,
) -> redis::RedisResult<()> {
    let (id, body) = message.split_once('|').unwrap_or((message, ""));
    let result = body.to_owned(); // echo
    let r = redis::cmd("SET")
        .arg(format!("{}{id}", seed.result_prefix))
        .arg(result)
        .arg("EX")
        .arg(RESULT_TTL_SECONDS)
        .query_async(conn)
        .await;
    seed.count();
    r
}

// ---------------------------------------------------------------------------------------------
// Wake-up latency

struct WakeResult {
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// From a release to the waiting worker holding its permit. Limit 1. Holder A is a raw
/// [`TokenPool`] (its RELEASE reaches Redis at once); waiter B is a worker's [`LeaseKeeper`]
/// (the code path a worker blocked on tokens takes: refill task in `BLPOP wake`, ACQUIRE, hand
/// the lease to the waiting task), with `linger` 0 so it gives its lease back as soon as the
/// permit is dropped. Separate pools, separate connections. Each sample: A holds the permit,
/// B calls `acquire` and is seen blocked in `BLPOP` (`INFO clients`), then the clock starts and
/// A releases; the clock stops when B's `acquire` returns.
async fn wake_latency(redis: &PrivateRedis, samples: usize, suffix: &str) -> Result<WakeResult> {
    redis.flush().await?;
    let settings = RedisSettings::single(redis.url());
    let keys = Keys::new("bench", &format!("wake-{suffix}"));
    let pool = |owner: &str| {
        let settings = settings.clone();
        let keys = keys.clone();
        let owner = owner.to_owned();
        async move {
            TokenPool::connect(
                settings,
                keys,
                PoolOptions {
                    owner,
                    ..PoolOptions::default()
                },
            )
            .await
        }
    };
    let a = pool(&format!("holder-{suffix}")).await?;
    let b = pool(&format!("waiter-{suffix}")).await?;
    let mut admin = settings.connect().await?;
    a.set_limit(1).await?;
    let keeper = LeaseKeeper::start(
        b,
        KeeperConfig {
            max_held: 1,
            batch: 1,
            linger: Duration::ZERO,
            sync_interval: None,
        },
    );
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let held = a
            .acquire(1, tokio::time::Instant::now() + Duration::from_secs(10))
            .await?;
        if held.len() != 1 {
            bail!("wake sample {i}: holder got {} leases", held.len());
        }
        let blocked_before = blocked_clients(&mut admin).await?;
        let waiter = {
            let keeper = keeper.clone();
            tokio::spawn(async move {
                let permit = keeper.acquire().await;
                (Instant::now(), permit)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while blocked_clients(&mut admin).await? <= blocked_before {
            if Instant::now() > deadline {
                bail!("wake sample {i}: the waiter never blocked");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let ids: Vec<String> = held.into_iter().map(|l| l.id).collect();
        let t0 = Instant::now();
        a.release(&ids).await?;
        let (t1, permit) = waiter.await?;
        let permit = permit?;
        times.push(t1.duration_since(t0).as_secs_f64() * 1000.0);
        drop(permit); // linger 0: the keeper gives the lease back to Redis right away
    }
    keeper.close().await?;
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
    Ok(WakeResult {
        samples: times.len(),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        max_ms: *times.last().unwrap_or(&f64::NAN),
    })
}

async fn blocked_clients(conn: &mut Conn) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("clients").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO clients has no blocked_clients")
}
