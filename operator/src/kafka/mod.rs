//! Kafka consumer-group lag for every QueueProcessor at once: one set of connections per
//! cluster, and one round of requests for all the groups measured on it ([`round`]), shared by
//! every reconcile that asks within [`SHARE_WINDOW`]. A thousand QueueProcessors on one
//! cluster cost a few requests per round, not a client and several requests per group.
//!
//! Each QueueProcessor registers what it measures; an edit (another topic, group or
//! bootstrap) or a deletion drops its interest at once, and a cluster nobody measures any more
//! is dropped with its connections.
//!
//! Plaintext clusters only: a cluster with SASL or TLS settings is measured through librdkafka,
//! one client per group ([`qp_protocol::lag::LagProbe`]), until this client speaks them too.

mod answers;
mod round;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use answers::{Answers, GroupLag, Why};
use round::ClusterState;

/// A round that started at most this long before a reconcile asked serves that reconcile; so
/// does a round that was still running when it asked (waiting for the next one doubled the
/// wait: at a thousand QueueProcessors a round takes about a second, and reconciles took
/// two).
pub const SHARE_WINDOW: Duration = Duration::from_secs(1);
/// A whole round may take this long (three requests' worth) before it counts as failed.
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether librdkafka properties ask for nothing but plaintext (what [`Fleet`] speaks).
pub fn is_plaintext(properties: &[(String, String)]) -> bool {
    properties
        .iter()
        .all(|(k, v)| k == "security.protocol" && v.eq_ignore_ascii_case("PLAINTEXT"))
}

/// What one QueueProcessor measures.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Interest {
    bootstrap: String,
    topic: String,
    group: String,
}

/// The measuring side of every Kafka cluster the operator knows.
#[derive(Default)]
pub struct Fleet {
    sent: Arc<AtomicU64>,
    clusters: Mutex<HashMap<String, Arc<Cluster>>>,
    by_qp: Mutex<HashMap<String, Interest>>,
}

impl Fleet {
    /// `group`'s lag on `topic` for QueueProcessor `qp` (`namespace/name`).
    pub async fn lag(
        &self,
        qp: &str,
        bootstrap: &str,
        topic: &str,
        group: &str,
    ) -> Result<GroupLag, Why> {
        let interest = Interest {
            bootstrap: bootstrap.to_owned(),
            topic: topic.to_owned(),
            group: group.to_owned(),
        };
        let cluster = self.register(qp, interest);
        cluster.lag(topic, group).await
    }

    /// Record what `qp` measures (dropping what it measured before) and return its cluster.
    fn register(&self, qp: &str, interest: Interest) -> Arc<Cluster> {
        let mut by_qp = self.by_qp.lock().expect("fleet lock");
        let mut clusters = self.clusters.lock().expect("fleet lock");
        if by_qp.get(qp) != Some(&interest) {
            if let Some(old) = by_qp.insert(qp.to_owned(), interest.clone()) {
                Self::release(&mut clusters, &old);
            }
            clusters
                .entry(interest.bootstrap.clone())
                .or_insert_with(|| Arc::new(Cluster::new(&interest.bootstrap, self.sent.clone())))
                .add(&interest.topic, &interest.group);
        }
        clusters
            .get(&interest.bootstrap)
            .cloned()
            .expect("registered above")
    }

    /// A QueueProcessor is gone: stop measuring what it measured.
    pub fn forget(&self, qp: &str) {
        let mut by_qp = self.by_qp.lock().expect("fleet lock");
        let mut clusters = self.clusters.lock().expect("fleet lock");
        if let Some(old) = by_qp.remove(qp) {
            Self::release(&mut clusters, &old);
        }
    }

    fn release(clusters: &mut HashMap<String, Arc<Cluster>>, old: &Interest) {
        if let Some(c) = clusters.get(&old.bootstrap)
            && c.remove(&old.topic, &old.group)
        {
            clusters.remove(&old.bootstrap);
        }
    }

    /// Requests sent to brokers so far (an atomic read: metrics cost nothing per cluster).
    pub fn requests_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Clusters currently measured.
    pub fn clusters(&self) -> usize {
        self.clusters.lock().expect("fleet lock").len()
    }
}

/// The last round's answers.
struct Round {
    started: Instant,
    finished: Instant,
    covered: HashSet<(String, String)>,
    answers: Answers,
}

/// One cluster: its connections and caches, the (topic, group) pairs measured on it, and the
/// last round.
struct Cluster {
    state: tokio::sync::Mutex<(ClusterState, Option<Round>)>,
    /// (topic, group) -> how many QueueProcessors measure it.
    interest: Mutex<HashMap<(String, String), usize>>,
}

impl Cluster {
    fn new(bootstrap: &str, sent: Arc<AtomicU64>) -> Self {
        Cluster {
            state: tokio::sync::Mutex::new((ClusterState::new(bootstrap, sent), None)),
            interest: Mutex::default(),
        }
    }

    fn add(&self, topic: &str, group: &str) {
        *self
            .interest
            .lock()
            .expect("interest lock")
            .entry((topic.to_owned(), group.to_owned()))
            .or_default() += 1;
    }

    /// Returns true when nothing is measured on this cluster any more.
    fn remove(&self, topic: &str, group: &str) -> bool {
        let mut interest = self.interest.lock().expect("interest lock");
        let key = (topic.to_owned(), group.to_owned());
        if let Some(n) = interest.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                interest.remove(&key);
            }
        }
        interest.is_empty()
    }

    /// The lag from a round that started at most [`SHARE_WINDOW`] before this call and
    /// measured this pair, or from a new round over everything measured on this cluster.
    async fn lag(&self, topic: &str, group: &str) -> Result<GroupLag, Why> {
        let asked = Instant::now();
        let key = (topic.to_owned(), group.to_owned());
        let mut guard = self.state.lock().await;
        let (state, last) = &mut *guard;
        if let Some(r) = last.as_ref()
            && r.covered.contains(&key)
            && (asked.saturating_duration_since(r.started) <= SHARE_WINDOW || asked < r.finished)
        {
            return r.answers.lag(topic, group);
        }
        let wanted: Vec<(String, String)> = {
            let mut w: Vec<_> = self
                .interest
                .lock()
                .expect("interest lock")
                .keys()
                .cloned()
                .collect();
            if !w.contains(&key) {
                w.push(key.clone());
            }
            w
        };
        let started = Instant::now();
        let answers = match tokio::time::timeout(ROUND_TIMEOUT, state.run(&wanted)).await {
            Ok(a) => a,
            Err(_) => {
                // A request may be half sent: start over with new connections.
                state.reset_connections();
                Answers::failed(&wanted, &format!("no answer within {ROUND_TIMEOUT:?}"))
            }
        };
        tracing::debug!(
            pairs = wanted.len(),
            took_ms = started.elapsed().as_millis() as u64,
            waited_ms = started.duration_since(asked).as_millis() as u64,
            "kafka round"
        );
        let round = last.insert(Round {
            started,
            finished: Instant::now(),
            covered: wanted.into_iter().collect(),
            answers,
        });
        round.answers.lag(topic, group)
    }
}
