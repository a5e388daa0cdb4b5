//! Kafka source: a consumer-group member that processes many messages of a partition at once and
//! still commits correct offsets.
//!
//! - Offsets are stored by hand (`enable.auto.offset.store=false`): after every acknowledgement
//!   the partition's low watermark (see [`crate::offsets`]) goes to librdkafka's offset store, and
//!   librdkafka's auto-commit sends stored offsets every `commit_interval`. Nothing is ever stored
//!   above an unfinished message.
//! - Revocation (cooperative-sticky, so only the moved partitions) waits a bounded time for the
//!   messages of the revoked partitions that are already running, stores the final watermark and
//!   commits it synchronously before the partition goes to its new owner. Queued messages of a
//!   revoked partition are dropped: the new owner starts from the committed offset and gets them.
//! - Back-pressure: a partition with too many fetched-but-unfinished messages is paused and
//!   resumed when it drained to half, so a slow handler never makes the worker buffer a topic.
//!   Pausing is not free, though: librdkafka drops a paused partition's prefetched messages and
//!   fetches them again after the resume, which at a few hundred messages per pause costs a
//!   fast handler most of its throughput. So when the engine is draining fast enough to empty
//!   the backlog within [`SOFT_WAIT`], the poll thread just stops taking messages until the
//!   full partitions drained to half, and pauses only if that takes longer.
//!
//! librdkafka is driven from one dedicated thread (`BaseConsumer::poll`): the rebalance callback
//! may block for the drain, and blocking a thread of our own is fine where blocking an async
//! runtime thread is not.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use qp_protocol::kafka::{BrokerLoss, client_config};
use qp_protocol::observability::Readiness;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Job, Origin, check_content, valid_id};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::{Error, Result};

/// Everything needed to join the consumer group.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub topic: String,
    pub group: String,
    /// Extra librdkafka properties (security.protocol, sasl.*, ssl.*), already resolved from
    /// Secrets by the caller. Values are never logged.
    pub properties: Vec<(String, String)>,
    /// Pause a partition when this many of its messages are fetched but unfinished.
    pub max_pending_per_partition: usize,
    /// Where the group starts on a partition it never committed.
    pub auto_offset_reset: qp_protocol::settings::OffsetReset,
    pub commit_interval: Duration,
    /// How long the group waits for a silent member before reassigning its partitions.
    pub session_timeout: Duration,
    /// How long a revocation or shutdown waits for running messages before committing anyway.
    pub drain_timeout: Duration,
    /// Largest message the worker accepts; bigger ones are dead-lettered.
    pub max_message_bytes: usize,
}

/// State shared between the poll thread, the rebalance callback and acknowledgements.
struct Shared {
    topic: String,
    tracker: Mutex<OffsetTracker>,
    /// Signalled whenever a message finishes while a drain waits.
    finished: Condvar,
    /// Messages acknowledged so far (the poll thread derives the completion rate from it).
    acks: AtomicU64,
    /// Drains waiting on `finished`. Acknowledgements only signal the condvar when one waits:
    /// a signal is a system call, and there are thousands of acknowledgements a second.
    draining: AtomicUsize,
    /// Partitions currently revoked or being revoked: their queued jobs must not start.
    revoked: Mutex<HashSet<i32>>,
    /// Whether librdkafka dropped every broker (see [`BrokerLoss`]).
    brokers: BrokerLoss,
    drain_timeout: Duration,
    metrics: Metrics,
    /// The worker's readiness: false while the brokers refuse us (credentials, certificate),
    /// true again once the group assigns partitions or a message arrives, until `stop`.
    ready: Readiness,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn healthy(&self) {
        if !self.stop.load(Ordering::SeqCst) {
            self.ready.set(true);
        }
    }
}

impl Shared {
    /// Wait until no message of `partitions` is running, or the drain timeout passes.
    fn drain(&self, partitions: &[i32]) -> bool {
        self.draining.fetch_add(1, Ordering::SeqCst);
        let drained = self.drain_waiting(partitions);
        self.draining.fetch_sub(1, Ordering::SeqCst);
        drained
    }

    fn drain_waiting(&self, partitions: &[i32]) -> bool {
        let deadline = Instant::now() + self.drain_timeout;
        // `draining` was raised before this lock: an acknowledgement that takes the lock after
        // us sees it and signals.
        let mut tracker = self.tracker.lock().expect("offset tracker lock");
        loop {
            let running: usize = partitions
                .iter()
                .filter_map(|p| tracker.get(*p))
                .map(|o| o.in_progress())
                .sum();
            if running == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                warn!(
                    running,
                    "drain timed out; committing below the unfinished messages"
                );
                return false;
            }
            tracker = self
                .finished
                .wait_timeout(tracker, deadline - now)
                .expect("offset tracker lock")
                .0;
        }
    }

    /// Offsets to store for the given partitions (all when `None`), as a partition list.
    fn storable(&self, only: Option<&[i32]>) -> TopicPartitionList {
        let mut tracker = self.tracker.lock().expect("offset tracker lock");
        let mut tpl = TopicPartitionList::new();
        for (p, mark) in tracker.take_storable(only) {
            let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(mark));
        }
        tpl
    }
}

/// librdkafka callbacks: rebalances, statistics (consumer lag), errors.
struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        let usable = self.shared.brokers.stats(&stats);
        self.shared
            .metrics
            .kafka_brokers
            .with_label_values(&["consumer"])
            .set(usable as i64);
        if let Some(topic) = stats.topics.get(&self.shared.topic) {
            for (p, part) in &topic.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.shared
                        .metrics
                        .partition_lag
                        .with_label_values(&[&p.to_string()])
                        .set(part.consumer_lag);
                }
            }
        }
    }

    /// Authentication and TLS failures are configuration errors that retrying will not fix:
    /// said plainly, and the worker is unready (its pod shows it) instead of looking healthy
    /// while it consumes nothing. librdkafka keeps retrying, so fixing the Secret heals it.
    fn error(&self, error: KafkaError, reason: &str) {
        if qp_protocol::kafka::is_refusal(&error) {
            self.shared.ready.set(false);
            warn!(error = %error, %reason, "Kafka refused this worker (check the SASL credentials and the CA / certificates); not ready until it is accepted");
        } else {
            warn!(target: "librdkafka", error = %error, %reason, "Kafka client error");
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => warn!(target: "librdkafka", fac, "{msg}"),
            RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
                info!(target: "librdkafka", fac, "{msg}")
            }
            _ => debug!(target: "librdkafka", fac, "{msg}"),
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        info!(?partitions, "partitions revoked: draining before commit");
        self.shared
            .revoked
            .lock()
            .expect("revoked lock")
            .extend(partitions.iter().copied());
        self.shared.drain(&partitions);
        let offsets = self.shared.storable(Some(&partitions));
        if offsets.count() > 0 {
            if let Err(e) = consumer.store_offsets(&offsets) {
                warn!(error = %e, "storing offsets of revoked partitions failed");
            }
            match consumer.commit(&offsets, CommitMode::Sync) {
                Ok(()) => info!(?partitions, "committed revoked partitions"),
                Err(e) => {
                    self.shared.metrics.commit_errors.inc();
                    warn!(error = %e, "synchronous commit on revoke failed");
                }
            }
        }
        let mut tracker = self.shared.tracker.lock().expect("offset tracker lock");
        for p in &partitions {
            tracker.remove(*p);
            let _ = self
                .shared
                .metrics
                .partition_lag
                .remove_label_values(&[&p.to_string()]);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // librdkafka keeps a partition's pause across a revocation: a partition paused
                // under back-pressure, revoked, and assigned back later would never be fetched
                // again (seen: whole partitions left unconsumed after a worker died). Whatever
                // was paused before is forgotten by the poll loop; start every assigned
                // partition unpaused.
                if let Err(e) = consumer.resume(tpl) {
                    warn!(error = %e, "resuming newly assigned partitions failed");
                }
                // Accepted by the group: whatever refused us before is fixed.
                self.shared.healthy();
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let mut revoked = self.shared.revoked.lock().expect("revoked lock");
                for p in &partitions {
                    revoked.remove(p);
                }
                info!(?partitions, "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        // "No offset stored" is the normal answer of an idle auto-commit.
        if let Err(e) = result
            && !is_no_offset(&e)
        {
            self.shared.metrics.commit_errors.inc();
            warn!(error = %e, "offset commit failed");
        }
    }
}

/// A running Kafka source: owns the consumer and its poll thread. Jobs arrive on the channel
/// returned by [`KafkaSource::start`]; acknowledge each through a [`KafkaAcker`].
pub struct KafkaSource {
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<Context>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Cloneable acknowledgement handle for jobs of a [`KafkaSource`].
#[derive(Clone)]
pub struct KafkaAcker {
    shared: Arc<Shared>,
}

impl KafkaAcker {
    /// Mark a job started. `false`: its partition was revoked meanwhile, do not process it.
    pub fn start(&self, partition: i32, offset: i64) -> bool {
        if self
            .shared
            .revoked
            .lock()
            .expect("revoked lock")
            .contains(&partition)
        {
            return false;
        }
        self.shared
            .tracker
            .lock()
            .expect("offset tracker lock")
            .partition(partition)
            .started(offset)
    }

    /// The job is finished and its result durable: its offset may be committed.
    pub fn ack(&self, partition: i32, offset: i64) {
        let mut tracker = self.shared.tracker.lock().expect("offset tracker lock");
        tracker.partition(partition).completed(offset);
        drop(tracker);
        self.shared.acks.fetch_add(1, Ordering::Relaxed);
        if self.shared.draining.load(Ordering::SeqCst) > 0 {
            self.shared.finished.notify_all();
        }
    }

    /// A started job ended without an outcome (aborted at the drain timeout, or its task
    /// failed): it stays pending, so it is not committed and is delivered again, but it no
    /// longer counts as running, so a revocation or close does not wait for it.
    pub fn abandon(&self, partition: i32, offset: i64) {
        let mut tracker = self.shared.tracker.lock().expect("offset tracker lock");
        tracker.partition(partition).abandoned(offset);
        drop(tracker);
        if self.shared.draining.load(Ordering::SeqCst) > 0 {
            self.shared.finished.notify_all();
        }
    }
}

impl KafkaSource {
    /// Join the group and start fetching.
    pub fn start(
        settings: KafkaSettings,
        metrics: Metrics,
        ready: Readiness,
    ) -> Result<(Self, KafkaAcker, mpsc::UnboundedReceiver<Job>)> {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            ready,
            stop: stop.clone(),
            topic: settings.topic.clone(),
            tracker: Mutex::new(OffsetTracker::default()),
            finished: Condvar::new(),
            draining: AtomicUsize::new(0),
            acks: AtomicU64::new(0),
            revoked: Mutex::new(HashSet::new()),
            brokers: BrokerLoss::default(),
            drain_timeout: settings.drain_timeout,
            metrics,
        });
        let mut config = client_config(
            &settings.bootstrap_servers,
            "qp-worker",
            &settings.properties,
        );
        config
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.commit.interval.ms",
                settings.commit_interval.as_millis().to_string(),
            )
            .set("auto.offset.reset", settings.auto_offset_reset.as_str())
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Every second: a consumer that lost its brokers (see `BrokerLoss`) learns it from
            // these reports, and every second it waits is a second without messages.
            .set("statistics.interval.ms", "1000")
            .set(
                "session.timeout.ms",
                settings.session_timeout.as_millis().to_string(),
            )
            // A third of the session timeout at most, as Kafka recommends; at most 1 s, since a
            // member learns of a rebalance with a heartbeat; not chattier than 4 per second.
            .set(
                "heartbeat.interval.ms",
                (settings.session_timeout.as_millis() / 3)
                    .clamp(250, 1000)
                    .to_string(),
            )
            .set(
                "message.max.bytes",
                (settings.max_message_bytes.max(1_000_000) + 64 * 1024).to_string(),
            )
            // Keep librdkafka's own prefetch modest; our back-pressure is per partition.
            .set("queued.max.messages.kbytes", "16384");
        let consumer: BaseConsumer<Context> = config
            .create_with_context(Context {
                shared: shared.clone(),
            })
            .map_err(|e| Error::Kafka(format!("creating consumer: {e}")))?;
        consumer
            .subscribe(&[&settings.topic])
            .map_err(|e| Error::Kafka(format!("subscribing to {}: {e}", settings.topic)))?;
        let consumer = Arc::new(consumer);
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = {
            let consumer = consumer.clone();
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("kafka-poll".into())
                .spawn(move || poll_loop(&consumer, &shared, &settings, &stop, tx))
                .map_err(|e| Error::Kafka(format!("spawning poll thread: {e}")))?
        };
        let acker = KafkaAcker {
            shared: shared.clone(),
        };
        Ok((
            KafkaSource {
                shared,
                consumer,
                stop,
                thread: Some(thread),
            },
            acker,
            rx,
        ))
    }

    /// A flag that stops fetching when set (from any thread).
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Stop fetching. Call [`KafkaSource::close`] once the engine drained.
    pub fn stop_intake(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Store and synchronously commit the final offsets, then leave the group (revoking our
    /// partitions, which triggers one more bounded drain and commit).
    pub fn close(mut self) {
        self.stop_intake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let offsets = self.shared.storable(None);
        if offsets.count() > 0
            && let Err(e) = self.consumer.store_offsets(&offsets)
        {
            warn!(error = %e, "storing final offsets failed");
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync)
            && !is_no_offset(&e)
        {
            self.shared.metrics.commit_errors.inc();
            warn!(error = %e, "final commit failed");
        }
        // Dropping the last reference closes the consumer: librdkafka revokes our partitions
        // (running the rebalance callback, which commits) and leaves the group.
        let consumer = self.consumer;
        std::thread::spawn(move || drop(consumer)).join().ok();
        info!("kafka consumer closed");
    }
}

/// The longest the poll thread stops taking messages, when a partition is full, instead of
/// pausing it. Bounded, because while it waits it serves no rebalance callbacks either; and
/// only tried when the measured completion rate drains the whole backlog within this time.
pub const SOFT_WAIT: Duration = Duration::from_millis(250);

/// How often the completion rate behind [`SOFT_WAIT`] is measured.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// How often moved low watermarks go to librdkafka's offset store while messages flow. They
/// are committed every `commit_interval` (and synchronously on revoke and close, which store
/// their own), so storing after every single message would only cost time.
const STORE_EVERY: Duration = Duration::from_millis(10);

fn poll_loop(
    consumer: &BaseConsumer<Context>,
    shared: &Shared,
    settings: &KafkaSettings,
    stop: &AtomicBool,
    tx: mpsc::UnboundedSender<Job>,
) {
    let mut paused: HashSet<i32> = HashSet::new();
    let mut last_store = Instant::now();
    let mut rate = DrainRate::new(shared.acks.load(Ordering::Relaxed));
    while !stop.load(Ordering::SeqCst) {
        if shared
            .brokers
            .recover(consumer.client(), &settings.bootstrap_servers)
        {
            shared
                .metrics
                .kafka_rebootstraps
                .with_label_values(&["consumer"])
                .inc();
        }
        rate.update(shared.acks.load(Ordering::Relaxed));
        let (full, backlog) = full_partitions(shared, settings, &paused);
        if !full.is_empty() {
            let fast = rate.drains_soon(backlog);
            if !fast || !wait_for_room(shared, settings, stop, &full) {
                pause(consumer, settings, &full, &mut paused);
                shared.metrics.kafka_pauses.inc_by(full.len() as u64);
            }
        }
        let msg = consumer.poll(Duration::from_millis(100));
        let idle = msg.is_none();
        match msg {
            None => {}
            Some(Err(e)) => {
                warn!(error = %e, "kafka poll error");
            }
            Some(Ok(msg)) => {
                shared.healthy();
                let partition = msg.partition();
                let offset = msg.offset();
                let job = to_job(&msg, settings);
                shared
                    .tracker
                    .lock()
                    .expect("offset tracker lock")
                    .partition(partition)
                    .fetched(offset);
                if tx.send(job).is_err() {
                    break; // engine gone
                }
            }
        }
        if idle || last_store.elapsed() >= STORE_EVERY {
            store_offsets(consumer, shared);
            last_store = Instant::now();
        }
        resume_drained(consumer, shared, settings, &mut paused);
        shared
            .metrics
            .kafka_paused_partitions
            .set(paused.len() as i64);
    }
}

/// Partitions (not paused) with `max_pending_per_partition` or more unfinished messages, and
/// the unfinished messages of all partitions.
fn full_partitions(
    shared: &Shared,
    settings: &KafkaSettings,
    paused: &HashSet<i32>,
) -> (Vec<i32>, usize) {
    let tracker = shared.tracker.lock().expect("offset tracker lock");
    let full = tracker
        .partitions()
        .filter(|(p, o)| !paused.contains(p) && o.pending() >= settings.max_pending_per_partition)
        .map(|(p, _)| p)
        .collect();
    (full, tracker.total_pending())
}

/// How fast the engine finishes messages, as the poll thread sees it: the best rate of recent
/// [`RATE_WINDOW`]s, forgotten slowly ([`RATE_MEMORY`]).
///
/// Why the best and not the latest: pausing starves the engine (librdkafka drops the paused
/// partition's prefetched messages and refetches them after the resume), so the rate measured
/// right after a pause is low, which would make the next full partition look slow and be
/// paused too. Judged by the latest window, a fast worker could lock itself into that state:
/// the benchmark saw a gated worker run at 3k msg/s for 30 s, pausing a partition every 256
/// messages, where it otherwise runs at 20k msg/s.
struct DrainRate {
    since: Instant,
    acks_then: u64,
    best: f64,
}

/// How long a fast rate is remembered: it halves every this long without a window as fast.
const RATE_MEMORY: Duration = Duration::from_secs(5);

impl DrainRate {
    fn new(acks: u64) -> Self {
        DrainRate {
            since: Instant::now(),
            acks_then: acks,
            best: 0.0,
        }
    }

    fn update(&mut self, acks: u64) {
        let elapsed = self.since.elapsed();
        if elapsed >= RATE_WINDOW {
            let rate = acks.saturating_sub(self.acks_then) as f64 / elapsed.as_secs_f64();
            self.best = remembered(self.best, rate, elapsed);
            self.since = Instant::now();
            self.acks_then = acks;
        }
    }

    /// Whether `backlog` messages are expected to drain within [`SOFT_WAIT`], so that waiting
    /// is cheaper than pausing. Before anything has finished the answer is yes: a wait costs
    /// at most [`SOFT_WAIT`], once, and tells; a needless pause costs far more.
    fn drains_soon(&self, backlog: usize) -> bool {
        self.best <= 0.0 || backlog as f64 / self.best <= SOFT_WAIT.as_secs_f64()
    }
}

/// The best rate after a window of `elapsed` that measured `rate`.
fn remembered(best: f64, rate: f64, elapsed: Duration) -> f64 {
    let decay = 0.5f64.powf(elapsed.as_secs_f64() / RATE_MEMORY.as_secs_f64());
    rate.max(best * decay)
}

/// Stop taking messages until the `full` partitions drained to half, for at most
/// [`SOFT_WAIT`]. Returns false when they are still full (the handler is slow: pause them).
fn wait_for_room(
    shared: &Shared,
    settings: &KafkaSettings,
    stop: &AtomicBool,
    full: &[i32],
) -> bool {
    let low = settings.max_pending_per_partition / 2;
    let deadline = Instant::now() + SOFT_WAIT;
    loop {
        {
            let tracker = shared.tracker.lock().expect("offset tracker lock");
            let drained = full
                .iter()
                .all(|p| tracker.get(*p).is_none_or(|o| o.pending() <= low));
            if drained {
                return true;
            }
        }
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // A short sleep, not the `finished` condvar: it is signalled on every acknowledgement,
        // thousands of times a second, and the engine has half a partition's worth of work
        // queued, so resuming intake a millisecond late costs nothing.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Hand moved low watermarks to the offset store.
fn store_offsets(consumer: &BaseConsumer<Context>, shared: &Shared) {
    let offsets = shared.storable(None);
    if offsets.count() > 0
        && let Err(e) = consumer.store_offsets(&offsets)
    {
        // Storing for a partition we just lost fails harmlessly.
        debug!(error = %e, "offset store failed");
    }
}

fn pause(
    consumer: &BaseConsumer<Context>,
    settings: &KafkaSettings,
    partitions: &[i32],
    paused: &mut HashSet<i32>,
) {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(&settings.topic, *p);
        paused.insert(*p);
    }
    debug!(?partitions, "pausing partitions under back-pressure");
    let _ = consumer.pause(&tpl);
}

/// Resume paused partitions that drained to half, and forget the ones we no longer own.
fn resume_drained(
    consumer: &BaseConsumer<Context>,
    shared: &Shared,
    settings: &KafkaSettings,
    paused: &mut HashSet<i32>,
) {
    if paused.is_empty() {
        return;
    }
    let to_resume = {
        let tracker = shared.tracker.lock().expect("offset tracker lock");
        let low = settings.max_pending_per_partition / 2;
        let mut to_resume = TopicPartitionList::new();
        paused.retain(|p| match tracker.get(*p) {
            None => false,
            Some(o) if o.pending() <= low => {
                to_resume.add_partition(&settings.topic, *p);
                false
            }
            Some(_) => true,
        });
        to_resume
    };
    if to_resume.count() > 0 {
        let _ = consumer.resume(&to_resume);
    }
}

fn is_no_offset(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e,
        rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
    )
}

fn to_job<M: Message>(msg: &M, settings: &KafkaSettings) -> Job {
    let partition = msg.partition();
    let offset = msg.offset();
    let mut id = None;
    let mut content_type = None;
    if let Some(headers) = msg.headers() {
        for h in headers.iter() {
            match (h.key, h.value) {
                ("qp-id", Some(v)) => id = std::str::from_utf8(v).ok().map(str::to_owned),
                ("content-type", Some(v)) => {
                    content_type = std::str::from_utf8(v).ok().map(str::to_owned)
                }
                _ => {}
            }
        }
    }
    let body = Bytes::copy_from_slice(msg.payload().unwrap_or_default());
    let mut malformed = None;
    let id = match id {
        Some(id) if valid_id(&id) => id,
        Some(_) => {
            malformed = Some("malformed: invalid qp-id header".to_owned());
            format!("{}-{partition}-{offset}", msg.topic())
        }
        None => format!("{}-{partition}-{offset}", msg.topic()),
    };
    if malformed.is_none() && body.len() > settings.max_message_bytes {
        malformed = Some(format!(
            "oversized: {} bytes exceeds the limit of {} bytes",
            body.len(),
            settings.max_message_bytes
        ));
    }
    if malformed.is_none() {
        malformed = check_content(content_type.as_deref(), &body);
    }
    Job {
        id,
        key: msg.key().map(Bytes::copy_from_slice),
        content_type,
        body,
        malformed,
        origin: Origin::Kafka { partition, offset },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(best: f64) -> DrainRate {
        DrainRate {
            since: Instant::now(),
            acks_then: 0,
            best,
        }
    }

    #[test]
    fn a_dip_after_a_pause_does_not_make_a_fast_worker_look_slow() {
        // 20k msg/s, then a window starved by a pause: still judged by the 20k.
        let best = remembered(20_000.0, 1_000.0, RATE_WINDOW);
        assert!(best > 19_000.0, "{best}");
        assert!(
            rate(best).drains_soon(2048),
            "2048 messages at ~20k/s: ~0.1 s"
        );
        // Slow for a long time: forgotten (halved every RATE_MEMORY).
        let later = remembered(20_000.0, 100.0, RATE_MEMORY * 4);
        assert!((later - 1_250.0).abs() < 1.0, "{later}");
        assert!(!rate(later).drains_soon(2048));
    }

    #[test]
    fn before_anything_finished_waiting_is_tried_first() {
        assert!(rate(0.0).drains_soon(10_000));
        // A slow handler, once measured, is paused at once.
        assert!(!rate(50.0).drains_soon(256));
    }
}
