//! Connections to a single Redis or to a Redis Cluster, behind one type.
//!
//! Everything in this crate (and the gateway and operator) talks to Redis through [`Conn`], an
//! enum over the `redis` crate's [`ConnectionManager`] (single server, reconnects on its own)
//! and its async [`ClusterConnection`] (routes each command to the node owning the key's slot,
//! follows `MOVED`/`ASK`). Both are multiplexed: one TCP connection (per node) carries the
//! commands of every task, pipelined, and a clone is a cheap handle to the same connection.
//!
//! # Two kinds of connection
//!
//! * [`RedisSettings::connect`] gives the *shared* connection. Use it for every ordinary
//!   command and script; clone it freely.
//! * [`RedisSettings::connect_blocking`] gives a *dedicated* connection for blocking commands
//!   (`BLPOP`, `BLMOVE`). Redis answers the commands of one connection strictly in order, so a
//!   `BLPOP` that waits one second on the shared connection would hold up every command queued
//!   behind it for that second. A dedicated connection waits alone. On a cluster it is a cluster
//!   connection too, so the blocking command is sent to the node that owns the key.
//!
//! # Timeouts
//!
//! The crate's defaults do not fit blocking commands: a [`ConnectionManager`] gives up on a
//! reply after 500 ms (`DEFAULT_RESPONSE_TIMEOUT` in `redis/src/client.rs`), which would cut a
//! one-second `BLPOP` short, while a cluster connection has no response timeout at all unless
//! one is set on the builder. We set both explicitly: [`RESPONSE_TIMEOUT`] on shared
//! connections, and [`MAX_BLOCK`] + [`RESPONSE_TIMEOUT`] on blocking ones. Callers must never
//! block for longer than [`MAX_BLOCK`] in one command.
//!
//! # TLS
//!
//! `tls: true` (or a `rediss://` URL) connects with rustls and verifies the server against the
//! system's trust store (`rustls-native-certs`, which also honours `SSL_CERT_FILE` and
//! `SSL_CERT_DIR`), or only against a given CA ([`RedisSettings::with_ca`], from a Secret: the
//! way to trust a private CA without changing the process's trust store).
//!
//! # Secrets
//!
//! The password usually comes from a Kubernetes Secret and is passed separately from the URL.
//! [`RedisSettings`] implements `Debug` by hand and redacts it, as well as any credentials
//! embedded in the URLs.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture,
    TlsCertificates, Value,
};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// How long an ordinary command may take before the call fails.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long establishing a TCP (and TLS) connection may take.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest timeout a blocking command (`BLPOP`, `BLMOVE`) may use on a connection from
/// [`RedisSettings::connect_blocking`]. Its response timeout is this plus [`RESPONSE_TIMEOUT`].
pub const MAX_BLOCK: Duration = Duration::from_secs(10);

/// Where Redis is.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis server, as a `redis://` or `rediss://` URL.
    Single(String),
    /// A Redis Cluster, as the URLs of some of its nodes (one reachable node is enough; the
    /// client discovers the rest).
    Cluster(Vec<String>),
}

/// Everything needed to connect: where, the password, and whether to use TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// The server or cluster.
    pub target: RedisTarget,
    /// The password (`AUTH`), kept out of the URL because it comes from a Secret. Overrides a
    /// password embedded in the URL.
    pub password: Option<String>,
    /// The ACL user (Redis 6+), also from a Secret; `None` is the default user.
    pub username: Option<String>,
    /// Use TLS (`rediss://`) even if the URLs say `redis://`.
    pub tls: bool,
    /// The CA (PEM) that the server's certificate must chain to, instead of the system's.
    pub ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTarget::Single(url) => f.debug_tuple("Single").field(&redact_url(url)).finish(),
            RedisTarget::Cluster(urls) => f
                .debug_tuple("Cluster")
                .field(&urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>())
                .finish(),
        }
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("target", &self.target)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("username", &self.username.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .finish()
    }
}

impl fmt::Display for RedisTarget {
    /// A loggable description: URLs with any embedded credentials replaced.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTarget::Single(url) => write!(f, "{}", redact_url(url)),
            RedisTarget::Cluster(urls) => {
                write!(f, "cluster[")?;
                for (i, u) in urls.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{}", redact_url(u))?;
                }
                write!(f, "]")
            }
        }
    }
}

/// Whether Redis refused these settings: a wrong user or password, a missing permission, or a
/// server certificate that does not verify. Retrying will not fix these; a changed Secret will.
pub fn is_refusal(error: &Error) -> bool {
    let Error::Redis(e) = error else {
        return false;
    };
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
    {
        return true;
    }
    // A certificate rustls rejects reaches us only as the text of an I/O error ("invalid peer
    // certificate: UnknownIssuer"): the `redis` crate does not expose the I/O error's source.
    e.is_io_error() && e.to_string().contains("invalid peer certificate")
}

/// Replaces the `user:password@` part of a URL, if any, so the URL can be logged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}<redacted>@{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// Adds `redis://` to a bare `host:port`.
fn with_scheme(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("redis://{url}")
    }
}

impl RedisSettings {
    /// Settings for one Redis server, no password, no TLS.
    pub fn single(url: impl Into<String>) -> Self {
        RedisSettings {
            target: RedisTarget::Single(with_scheme(&url.into())),
            password: None,
            username: None,
            tls: false,
            ca_pem: None,
        }
    }

    /// Settings for a Redis Cluster, no password, no TLS.
    pub fn cluster(nodes: impl IntoIterator<Item = impl Into<String>>) -> Self {
        RedisSettings {
            target: RedisTarget::Cluster(
                nodes.into_iter().map(|n| with_scheme(&n.into())).collect(),
            ),
            password: None,
            username: None,
            tls: false,
            ca_pem: None,
        }
    }

    /// Sets the password (an empty string means none).
    pub fn with_password(mut self, password: Option<String>) -> Self {
        self.password = password.filter(|p| !p.is_empty());
        self
    }

    /// Sets the ACL user name (an empty string means the default user).
    pub fn with_username(mut self, username: Option<String>) -> Self {
        self.username = username.filter(|u| !u.is_empty());
        self
    }

    /// Trust only this CA (PEM) for the server's certificate; turns TLS on.
    pub fn with_ca(mut self, ca_pem: Option<Vec<u8>>) -> Self {
        if ca_pem.is_some() {
            self.tls = true;
        }
        self.ca_pem = ca_pem;
        self
    }

    /// The CA to trust, for the `redis` crate's TLS builders.
    fn certificates(&self) -> Option<TlsCertificates> {
        self.ca_pem.as_ref().map(|ca| TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        })
    }

    /// A client for one server, with the CA if one is set.
    fn client(&self, info: ConnectionInfo) -> Result<redis::Client> {
        Ok(match self.certificates() {
            Some(certs) => redis::Client::build_with_tls(info, certs)?,
            None => redis::Client::open(info)?,
        })
    }

    /// A cluster client builder with the credentials and the CA applied.
    fn cluster_builder(&self) -> Result<ClusterClientBuilder> {
        let mut builder = ClusterClientBuilder::new(self.connection_infos()?);
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        if let Some(username) = &self.username {
            builder = builder.username(username);
        }
        if let Some(certs) = self.certificates() {
            builder = builder.certs(certs);
        }
        Ok(builder)
    }

    /// Builds settings from command-line style parts: exactly one of `url` (a single server)
    /// and `cluster_nodes` (comma-separated node URLs or `host:port` pairs) must be given.
    /// An empty password means none. A `rediss://` URL turns TLS on.
    pub fn from_parts(
        url: Option<&str>,
        cluster_nodes: Option<&str>,
        password: Option<String>,
        tls: bool,
    ) -> Result<Self> {
        let url = url.map(str::trim).filter(|s| !s.is_empty());
        let nodes: Vec<String> = cluster_nodes
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(with_scheme)
            .collect();
        let target = match (url, nodes.is_empty()) {
            (Some(_), false) => {
                return Err(Error::config(
                    "give either a Redis URL or Redis Cluster nodes, not both",
                ));
            }
            (None, true) => {
                return Err(Error::config(
                    "no Redis given: set a Redis URL or Redis Cluster nodes",
                ));
            }
            (Some(url), true) => RedisTarget::Single(with_scheme(url)),
            (None, false) => RedisTarget::Cluster(nodes),
        };
        let urls = match &target {
            RedisTarget::Single(u) => std::slice::from_ref(u),
            RedisTarget::Cluster(us) => us.as_slice(),
        };
        let tls = tls || urls.iter().any(|u| u.starts_with("rediss://"));
        let settings = RedisSettings {
            target,
            password: password.filter(|p| !p.is_empty()),
            username: None,
            tls,
            ca_pem: None,
        };
        // Parse now so a typo fails at startup with a clear message, not at first use.
        settings.connection_infos()?;
        Ok(settings)
    }

    /// True for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, RedisTarget::Cluster(_))
    }

    /// The parsed connection info of each URL, with the password and TLS applied.
    fn connection_infos(&self) -> Result<Vec<ConnectionInfo>> {
        let urls = match &self.target {
            RedisTarget::Single(u) => std::slice::from_ref(u),
            RedisTarget::Cluster(us) => us.as_slice(),
        };
        if urls.is_empty() {
            return Err(Error::config("no Redis Cluster nodes given"));
        }
        urls.iter()
            .map(|url| {
                // The parser's error may quote the URL; report a redacted one instead.
                let mut info = url.as_str().into_connection_info().map_err(|e| {
                    Error::config(format!(
                        "cannot parse Redis URL {}: {:?}",
                        redact_url(url),
                        e.kind()
                    ))
                })?;
                if let Some(password) = &self.password {
                    let redis = info.redis_settings().clone().set_password(password);
                    info = info.set_redis_settings(redis);
                }
                if let Some(username) = &self.username {
                    let redis = info.redis_settings().clone().set_username(username);
                    info = info.set_redis_settings(redis);
                }
                if self.tls
                    && let ConnectionAddr::Tcp(host, port) = info.addr().clone()
                {
                    info = info.set_addr(ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: false,
                        tls_params: None,
                    });
                }
                Ok(info)
            })
            .collect()
    }

    async fn open(&self, response_timeout: Duration) -> Result<Conn> {
        match &self.target {
            RedisTarget::Single(_) => {
                let client = self.client(self.connection_infos()?.remove(0))?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(response_timeout))
                    .set_connection_timeout(Some(CONNECTION_TIMEOUT));
                Ok(Conn::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            RedisTarget::Cluster(_) => {
                let client = self
                    .cluster_builder()?
                    .response_timeout(response_timeout)
                    .connection_timeout(CONNECTION_TIMEOUT)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A plain client for `SUBSCRIBE` on a single server.
    pub fn pubsub_client(&self) -> Result<redis::Client> {
        self.client(self.connection_infos()?.remove(0))
    }

    /// Whether notifications use sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`): on a cluster, where
    /// a classic `PUBLISH` is copied to every node and a subscriber on one node depends on it.
    pub fn sharded_pubsub(&self) -> bool {
        matches!(self.target, RedisTarget::Cluster(_))
    }

    /// A cluster connection speaking RESP3 that delivers pushes (sharded messages, and
    /// subscription and disconnection events) to `pushes`, for `SSUBSCRIBE`. The `redis` crate
    /// subscribes it again after a reconnect and follows a channel's slot to its new owner.
    pub async fn cluster_push_connection(
        &self,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Result<ClusterConnection> {
        let builder = self
            .cluster_builder()?
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes)
            .connection_timeout(CONNECTION_TIMEOUT);
        Ok(builder.build()?.get_async_connection().await?)
    }

    /// Opens the shared, multiplexed connection. Clone the returned [`Conn`] to share it.
    pub async fn connect(&self) -> Result<Conn> {
        self.open(RESPONSE_TIMEOUT).await
    }

    /// Why connecting fails, from one attempt without retries: the connection manager retries
    /// a refused password or certificate like a network error, until its caller's timeout,
    /// which then says only "timed out". Called after a connect failed, for a clear message.
    pub async fn diagnose(&self) -> Option<Error> {
        let attempt = async {
            match &self.target {
                RedisTarget::Single(_) => {
                    let client = self.client(self.connection_infos()?.remove(0))?;
                    client.get_multiplexed_async_connection().await?;
                }
                RedisTarget::Cluster(_) => {
                    self.cluster_builder()?
                        .retries(0)
                        .connection_timeout(CONNECTION_TIMEOUT)
                        .build()?
                        .get_async_connection()
                        .await?;
                }
            }
            Ok::<(), Error>(())
        };
        match tokio::time::timeout(CONNECTION_TIMEOUT * 2, attempt).await {
            Ok(Err(e)) => Some(e),
            _ => None,
        }
    }

    /// [`RedisSettings::connect`], trying again (1 s, doubling to 30 s) while Redis cannot be
    /// reached or refuses, until `stop`. A process whose Redis is down or whose Secret is wrong
    /// stays up, unready, and says why in its log, instead of exiting into a crash loop whose
    /// back-off outlasts the outage. `None` when stopped first.
    pub async fn connect_patiently(&self, stop: &CancellationToken) -> Option<Conn> {
        let mut backoff = Duration::from_secs(1);
        let mut said = String::new();
        loop {
            let failed = match tokio::time::timeout(CONNECTION_TIMEOUT * 2, self.connect()).await {
                Ok(Ok(conn)) => {
                    if !said.is_empty() {
                        tracing::info!(redis = %self.target, "connected to Redis");
                    }
                    return Some(conn);
                }
                Ok(Err(e)) => Some(e),
                Err(_) => None,
            };
            let why = match self.diagnose().await.or(failed) {
                Some(e) if is_refusal(&e) => format!(
                    "Redis refused this process (check the user, the password and the CA): {e}"
                ),
                Some(e) => format!("Redis cannot be reached: {e}"),
                None => "Redis cannot be reached: connecting timed out".to_owned(),
            };
            if why != said {
                tracing::warn!(redis = %self.target, retry_in = ?backoff, "{why}");
                said = why;
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Opens a dedicated connection for blocking commands, whose response timeout
    /// ([`MAX_BLOCK`] + [`RESPONSE_TIMEOUT`]) outlasts any block up to [`MAX_BLOCK`]. Do not
    /// share it between concurrent blocking calls: they would queue behind each other.
    pub async fn connect_blocking(&self) -> Result<Conn> {
        self.open(MAX_BLOCK + RESPONSE_TIMEOUT).await
    }
}

/// A connection to a single Redis or a Redis Cluster. Implements
/// [`redis::aio::ConnectionLike`], so commands, pipelines and scripts run on it directly;
/// cloning gives another handle to the same multiplexed connection.
#[derive(Clone)]
pub enum Conn {
    /// A single server, reconnecting automatically.
    Single(ConnectionManager),
    /// A cluster, routing by key slot.
    Cluster(ClusterConnection),
}

impl Conn {
    /// True for a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conn::Single(_) => f.write_str("Conn::Single"),
            Conn::Cluster(_) => f.write_str("Conn::Cluster"),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_parts_single_and_cluster() {
        let s = RedisSettings::from_parts(Some("127.0.0.1:6379"), None, None, false).unwrap();
        assert_eq!(
            s.target,
            RedisTarget::Single("redis://127.0.0.1:6379".into())
        );
        assert!(!s.tls);

        let c = RedisSettings::from_parts(
            None,
            Some("redis://a:1, b:2,,"),
            Some("secret".into()),
            false,
        )
        .unwrap();
        assert_eq!(
            c.target,
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        assert_eq!(c.password.as_deref(), Some("secret"));

        let t = RedisSettings::from_parts(Some("rediss://h:1"), None, Some(String::new()), false)
            .unwrap();
        assert!(t.tls);
        assert_eq!(t.password, None);
    }

    #[test]
    fn from_parts_rejects_none_or_both() {
        assert!(RedisSettings::from_parts(None, None, None, false).is_err());
        assert!(RedisSettings::from_parts(Some(""), Some(" , "), None, false).is_err());
        assert!(RedisSettings::from_parts(Some("redis://a:1"), Some("b:2"), None, false).is_err());
        assert!(RedisSettings::from_parts(Some("http://a:1"), None, None, false).is_err());
    }

    #[test]
    fn debug_and_display_never_show_secrets() {
        let s = RedisSettings::from_parts(
            None,
            Some("redis://user:hunter2@a:1,redis://b:2"),
            Some("s3cret".into()),
            false,
        )
        .unwrap();
        let shown = format!("{s:?} {}", s.target);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("b:2"), "{shown}");
        let err =
            RedisSettings::from_parts(Some("redis://u:hunter2@a:notaport"), None, None, false)
                .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn redact_url_cases() {
        assert_eq!(redact_url("redis://a:1"), "redis://a:1");
        assert_eq!(redact_url("redis://:pw@a:1/0"), "redis://<redacted>@a:1/0");
        assert_eq!(redact_url("rediss://u:p@w@a:1"), "rediss://<redacted>@a:1");
        assert_eq!(redact_url("a:1"), "a:1");
    }
}
