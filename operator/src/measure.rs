//! Measuring a QueueProcessor: how much work waits (Kafka lag or Redis list length), whether the
//! consumer group is rebalancing, and what the workers report in Redis (throughput, work in
//! flight, live replicas, tokens in use).
//!
//! Clients are shared: Kafka lag of every group on a plaintext cluster comes from one
//! [`Fleet`] round per cluster (a few requests for all its groups); a cluster with SASL or TLS
//! settings still gets one librdkafka probe per (brokers, group, topic) (see [`LagProbe`]); and
//! one multiplexed Redis connection per Redis endpoint. Every measurement runs with a timeout,
//! so one unreachable source never delays the measurement of another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qp_protocol::keys::Keys;
use qp_protocol::lag::{LagProbe, PartitionLag};
use qp_protocol::redis_conn::{Conn, RedisSettings};
use qp_protocol::tokens::{PoolOptions, TokenPool};

use crate::endpoints::Endpoints;
use crate::error::{Error, Result};
use crate::kafka::{self, Fleet};

/// How long one measurement may take before it counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the work comes from, with resolved credentials.
#[derive(Clone)]
pub enum SourceTarget {
    Kafka {
        bootstrap: String,
        topic: String,
        group: String,
        /// librdkafka security properties, secrets resolved (never logged).
        properties: Vec<(String, String)>,
    },
    RedisList {
        key: String,
    },
    RedisStream {
        key: String,
        group: String,
    },
}

impl SourceTarget {
    /// Where the backlog is measured, without credentials: a change means a different log.
    pub fn identity(&self) -> String {
        match self {
            SourceTarget::Kafka {
                bootstrap,
                topic,
                group,
                ..
            } => format!("kafka|{bootstrap}|{topic}|{group}"),
            SourceTarget::RedisList { key } => format!("redis|{key}"),
            SourceTarget::RedisStream { key, group } => format!("stream|{key}|{group}"),
        }
    }
}

/// What the source says.
#[derive(Debug, Clone, Default)]
pub struct SourceReading {
    pub backlog: u64,
    pub partitions: Option<u32>,
    /// Sum of log-end offsets (Kafka): its growth rate is the arrival rate.
    pub produced_total: Option<u64>,
    pub lags: Vec<PartitionLag>,
    pub group_state: Option<String>,
}

impl SourceReading {
    fn from_lags(lags: Vec<PartitionLag>, group_state: Option<String>) -> Self {
        SourceReading {
            backlog: lags.iter().map(|l| l.lag).sum(),
            partitions: Some(lags.len() as u32),
            produced_total: Some(lags.iter().map(|l| l.log_end.max(0) as u64).sum()),
            lags,
            group_state,
        }
    }

    /// A group between generations: replicas must not change now (every change is another
    /// rebalance).
    pub fn rebalancing(&self) -> bool {
        matches!(
            self.group_state.as_deref(),
            Some("PreparingRebalance" | "CompletingRebalance")
        )
    }
}

/// What the workers report in Redis.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerReading {
    pub processed_total: u64,
    pub failed_total: u64,
    /// Workers whose heartbeat is fresh.
    pub live_replicas: u32,
    /// Sum of the live workers' measured rates (messages/s).
    pub rate: f64,
    pub in_flight: u64,
    pub tokens_in_use: u64,
    pub tokens_limit: u64,
}

/// Shared measurement clients.
#[derive(Default)]
pub struct Probes {
    fleet: Fleet,
    /// Per QueueProcessor: what its probe measures, and the probe.
    kafka: Mutex<HashMap<String, (String, Arc<LagProbe>)>>,
    redis: Endpoints,
}

impl Probes {
    /// The librdkafka probe of QueueProcessor `qp` (secured clusters): replaced when what it
    /// measures or its credentials change, dropped by [`Probes::forget`].
    fn kafka_probe(
        &self,
        qp: &str,
        bootstrap: &str,
        topic: &str,
        group: &str,
        properties: &[(String, String)],
    ) -> Arc<LagProbe> {
        // Credentials are part of the identity (a rotated password needs a new client) but
        // must not sit in memory twice in clear: compare a hash of them.
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(properties, &mut h);
        let id = format!(
            "{bootstrap}|{topic}|{group}|{:x}",
            std::hash::Hasher::finish(&h)
        );
        let mut map = self.kafka.lock().expect("probe map lock");
        match map.get(qp) {
            Some((known, probe)) if *known == id => probe.clone(),
            _ => {
                let probe = Arc::new(LagProbe::new(bootstrap, properties, topic, group));
                map.insert(qp.to_owned(), (id, probe.clone()));
                probe
            }
        }
    }

    /// The shared connection to a Redis endpoint ([`Endpoints`]).
    pub async fn redis(&self, settings: &RedisSettings) -> Result<Conn> {
        self.redis.get(settings).await
    }

    /// Record which Redis QueueProcessor `qp` uses (its own, then any its signals read), so an
    /// endpoint nobody uses is dropped.
    pub fn use_redis(&self, qp: &str, settings: &[RedisSettings]) {
        self.redis.use_for(qp, settings);
    }

    /// Requests sent to Kafka brokers by the shared measuring clients so far (for the
    /// benchmark and a metric; one atomic read). librdkafka probes of secured clusters are not
    /// counted: reading their statistics means polling every client.
    pub fn kafka_requests(&self) -> u64 {
        self.fleet.requests_sent()
    }

    /// Kafka clusters measured through the shared clients.
    pub fn kafka_clusters(&self) -> usize {
        self.fleet.clusters()
    }

    /// A QueueProcessor is gone: stop measuring for it.
    pub fn forget(&self, qp: &str) {
        self.fleet.forget(qp);
        self.redis.forget(qp);
        self.kafka.lock().expect("probe map lock").remove(qp);
    }

    /// How many failed Kafka clients were replaced (see [`LagProbe`]).
    pub fn kafka_clients_replaced(&self) -> u64 {
        self.kafka
            .lock()
            .expect("probe map lock")
            .values()
            .map(|(_, p)| p.clients_replaced())
            .sum()
    }

    /// Measure the source of QueueProcessor `qp` (`namespace/name`).
    pub async fn source(
        &self,
        qp: &str,
        target: &SourceTarget,
        redis: &RedisSettings,
    ) -> Result<SourceReading> {
        match target {
            SourceTarget::Kafka {
                bootstrap,
                topic,
                group,
                properties,
            } if kafka::is_plaintext(properties) => {
                let (lags, group_state) = tokio::time::timeout(
                    kafka::ROUND_TIMEOUT + PROBE_TIMEOUT,
                    self.fleet.lag(qp, bootstrap, topic, group),
                )
                .await
                .map_err(|_| Error::Source("measuring Kafka lag timed out".into()))?
                .map_err(Error::Source)?;
                Ok(SourceReading::from_lags(lags, group_state))
            }
            SourceTarget::Kafka {
                bootstrap,
                topic,
                group,
                properties,
            } => {
                let probe = self.kafka_probe(qp, bootstrap, topic, group, properties);
                let task = tokio::task::spawn_blocking(move || probe.measure_with_state());
                let (lags, group_state) = tokio::time::timeout(PROBE_TIMEOUT * 3, task)
                    .await
                    .map_err(|_| Error::Source("measuring Kafka lag timed out".into()))?
                    .map_err(|e| Error::Source(format!("lag task: {e}")))??;
                Ok(SourceReading::from_lags(lags, group_state))
            }
            SourceTarget::RedisStream { key, group } => {
                let conn = self.redis(redis).await?;
                // A group not made yet (no worker has started) has nothing pending: the
                // stream's length is its backlog.
                let backlog = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    crate::signals::stream_backlog(&conn, key, group),
                )
                .await
                .map_err(|_| Error::Source("XINFO GROUPS timed out".into()))?;
                let backlog = match backlog {
                    Err(Error::Signal(e)) if e.contains("has no consumer group") => {
                        redis::cmd("XLEN")
                            .arg(key)
                            .query_async(&mut conn.clone())
                            .await
                            .map_err(|e| Error::Source(format!("XLEN {key}: {e}")))?
                    }
                    Err(Error::Signal(e)) => return Err(Error::Source(e)),
                    other => other?,
                };
                Ok(SourceReading {
                    backlog,
                    ..Default::default()
                })
            }
            SourceTarget::RedisList { key } => {
                let mut conn = self.redis(redis).await?;
                let len: u64 = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    redis::cmd("LLEN").arg(key).query_async(&mut conn),
                )
                .await
                .map_err(|_| Error::Source("LLEN timed out".into()))?
                .map_err(|e| Error::Source(format!("LLEN {key}: {e}")))?;
                Ok(SourceReading {
                    backlog: len,
                    ..Default::default()
                })
            }
        }
    }

    /// Read the workers' counters and the token pool.
    pub async fn workers(
        &self,
        redis: &RedisSettings,
        keys: &Keys,
        fresh: Duration,
    ) -> Result<WorkerReading> {
        let conn = self.redis(redis).await?;
        let read = async {
            let (processed, failed, live, rate, inflight): (String, String, u32, String, u64) =
                qp_protocol::scripts::COUNTERS
                    .key(keys.processed())
                    .key(keys.failed())
                    .key(keys.heartbeats())
                    .key(keys.rates())
                    .key(keys.inflight())
                    .arg(fresh.as_millis() as u64)
                    .arg((fresh * 30).as_millis() as u64)
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(|e| Error::Redis(e.to_string()))?;
            let pool = TokenPool::new(
                conn.clone(),
                redis.clone(),
                keys.clone(),
                PoolOptions::default(),
            );
            let snap = pool.snapshot().await?;
            Ok::<_, Error>(WorkerReading {
                processed_total: processed.parse().unwrap_or(0),
                failed_total: failed.parse().unwrap_or(0),
                live_replicas: live,
                rate: rate.parse().unwrap_or(0.0),
                in_flight: inflight,
                tokens_in_use: snap.in_use,
                tokens_limit: snap.limit,
            })
        };
        tokio::time::timeout(PROBE_TIMEOUT, read)
            .await
            .map_err(|_| Error::Redis("reading worker counters timed out".into()))?
    }
}
