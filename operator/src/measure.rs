//! Measuring a QueueProcessor: how much work waits (Kafka lag or Redis list length), whether the
//! consumer group is rebalancing, and what the workers report in Redis (throughput, work in
//! flight, live replicas, tokens in use).
//!
//! Clients are cached: one Kafka lag probe per (brokers, group, topic) — an offset fetch is
//! always made on behalf of one group id, so a group needs its own consumer handle; a probe
//! replaces its client after a failure (see [`LagProbe`]) — and one multiplexed Redis
//! connection per Redis endpoint. Every probe runs with a timeout on its own
//! task, so one unreachable source never delays the measurement of another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qp_protocol::keys::Keys;
use qp_protocol::lag::{LagProbe, PartitionLag};
use qp_protocol::redis_conn::{Conn, RedisSettings};
use qp_protocol::tokens::{PoolOptions, TokenPool};

use crate::error::{Error, Result};

/// How long one probe may take before it counts as unreachable.
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
    kafka: Mutex<HashMap<String, Arc<LagProbe>>>,
    redis: tokio::sync::Mutex<Vec<(RedisSettings, Conn)>>,
}

impl Probes {
    fn kafka_probe(
        &self,
        bootstrap: &str,
        topic: &str,
        group: &str,
        properties: &[(String, String)],
    ) -> Arc<LagProbe> {
        // Credentials are part of the identity (a rotated password needs a new client) but
        // must not sit in a map key in clear: use a hash of them.
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(properties, &mut h);
        let key = format!(
            "{bootstrap}|{topic}|{group}|{:x}",
            std::hash::Hasher::finish(&h)
        );
        let mut map = self.kafka.lock().expect("probe map lock");
        map.entry(key)
            .or_insert_with(|| Arc::new(LagProbe::new(bootstrap, properties, topic, group)))
            .clone()
    }

    /// The shared connection to a Redis endpoint.
    pub async fn redis(&self, settings: &RedisSettings) -> Result<Conn> {
        let mut conns = self.redis.lock().await;
        if let Some((_, c)) = conns.iter().find(|(s, _)| s == settings) {
            return Ok(c.clone());
        }
        let conn = tokio::time::timeout(PROBE_TIMEOUT, settings.connect())
            .await
            .map_err(|_| Error::Redis("connecting timed out".into()))??;
        conns.push((settings.clone(), conn.clone()));
        Ok(conn)
    }

    /// Requests sent by every Kafka probe so far (for the benchmark and a metric).
    pub fn kafka_requests(&self) -> u64 {
        self.kafka
            .lock()
            .expect("probe map lock")
            .values()
            .map(|p| p.requests_sent())
            .sum()
    }

    /// How many failed Kafka clients were replaced (see [`LagProbe`]).
    pub fn kafka_clients_replaced(&self) -> u64 {
        self.kafka
            .lock()
            .expect("probe map lock")
            .values()
            .map(|p| p.clients_replaced())
            .sum()
    }

    /// Measure the source.
    pub async fn source(
        &self,
        target: &SourceTarget,
        redis: &RedisSettings,
    ) -> Result<SourceReading> {
        match target {
            SourceTarget::Kafka {
                bootstrap,
                topic,
                group,
                properties,
            } => {
                let probe = self.kafka_probe(bootstrap, topic, group, properties);
                let task = tokio::task::spawn_blocking(move || probe.measure_with_state());
                let (lags, group_state) = tokio::time::timeout(PROBE_TIMEOUT * 3, task)
                    .await
                    .map_err(|_| Error::Source("measuring Kafka lag timed out".into()))?
                    .map_err(|e| Error::Source(format!("lag task: {e}")))??;
                Ok(SourceReading {
                    backlog: lags.iter().map(|l| l.lag).sum(),
                    partitions: Some(lags.len() as u32),
                    produced_total: Some(lags.iter().map(|l| l.log_end.max(0) as u64).sum()),
                    lags,
                    group_state,
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
