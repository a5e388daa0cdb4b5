//! `spec.redis`: the connection to the Redis (standalone or Redis Cluster) that holds the token
//! pool and the results.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;
use super::schema::{MAX_CLUSTER_NODES, redis_rules, tidy_docs};

/// Connection to Redis. Set exactly one of `url` (standalone Redis) or `clusterNodes`
/// (Redis Cluster).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = redis_rules)]
#[schemars(transform = tidy_docs)]
pub struct RedisSpec {
    /// URL of a standalone Redis: `redis://host:port[/db]`, or `rediss://` for TLS. Must not
    /// contain credentials; use `passwordSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), pattern(r"^rediss?://"))]
    pub url: Option<String>,

    /// Seed nodes of a Redis Cluster, each `host:port` (the rest of the cluster is discovered
    /// from them). Must not contain credentials; use `passwordSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = MAX_CLUSTER_NODES),
        inner(length(min = 1, max = 512))
    )]
    pub cluster_nodes: Option<Vec<String>>,

    /// Use TLS for every Redis connection (implied by a `rediss://` url).
    #[serde(default)]
    pub tls: bool,

    /// Secret key holding the Redis ACL username. Omit for the `default` user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeyRef>,

    /// Secret key holding the Redis password (`requirepass`, or the ACL user's password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,

    /// Secret key holding the PEM CA that the Redis server's certificate must chain to, for a
    /// private CA; the system's trust store is used when omitted. Implies `tls`. Mounted into
    /// the pods as a file; the operator reads it to measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// Where Redis is, as an enum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RedisEndpoint<'a> {
    /// A standalone Redis at this URL.
    Url(&'a str),
    /// A Redis Cluster reachable through these seed nodes.
    Cluster(&'a [String]),
}

impl RedisSpec {
    /// The one configured endpoint; `None` when zero or both are set.
    pub fn endpoint(&self) -> Option<RedisEndpoint<'_>> {
        match (&self.url, &self.cluster_nodes) {
            (Some(u), None) => Some(RedisEndpoint::Url(u)),
            (None, Some(n)) => Some(RedisEndpoint::Cluster(n)),
            _ => None,
        }
    }

    /// True for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster_nodes.is_some()
    }

    /// True if connections must use TLS (`tls: true` or a `rediss://` url).
    pub fn uses_tls(&self) -> bool {
        self.tls
            || self.ca_secret_ref.is_some()
            || self
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
    }
}
