//! A QueueProcessor-shaped test fixture: unique names, a Redis (single or cluster) connection,
//! a Kafka topic, and `qp-worker` processes configured the way the operator configures them.

use std::collections::HashMap;
use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use qp_protocol::keys::Keys;
use qp_protocol::redis_conn::{Conn, RedisSettings};
use qp_protocol::tokens::{PoolOptions, TokenPool};

use crate::env::{self, Env};
use crate::procs::{self, Proc};

/// Which Redis a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisKind {
    Single,
    Cluster,
    /// The single Redis through its TLS port, as its ACL user, trusting the environment's CA.
    Tls,
}

/// Where a gateway started by [`Fixture::gateway`] queues requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayQueue<'a> {
    /// The fixture's Kafka topic (and consumer group, for the backlog).
    Kafka,
    /// This Redis list.
    RedisList(&'a str),
    /// This Redis stream.
    RedisStream(&'a str),
}

pub struct Fixture {
    pub env: Env,
    pub namespace: String,
    pub name: String,
    pub keys: Keys,
    pub redis_kind: RedisKind,
    pub redis: RedisSettings,
    pub conn: Conn,
    pub topic: String,
    pub group: String,
    pub bootstrap: String,
}

/// Poll `check` every 20 ms until it returns `Some`, or panic after `timeout` with `what`.
/// This waits for a condition in a real system; it is not a sleep standing in for one.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// States of the given request ids of the QueueProcessor with `keys` (missing ids are absent
/// from the map), read in pipelines of 500.
pub async fn states(conn: &Conn, keys: &Keys, ids: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HGET").arg(keys.result(id)).arg("state");
        }
        let states: Vec<Option<String>> = pipe
            .query_async(&mut conn.clone())
            .await
            .expect("read states");
        for (id, s) in chunk.iter().zip(states) {
            if let Some(s) = s {
                out.insert(id.clone(), s);
            }
        }
    }
    out
}

impl Fixture {
    /// A fresh QueueProcessor identity; `partitions > 0` also creates its Kafka topic.
    pub async fn new(test: &str, redis_kind: RedisKind, partitions: i32) -> Fixture {
        let env = env::load();
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let name = format!("{test}-{suffix}");
        let namespace = "tests".to_owned();
        let redis = match redis_kind {
            RedisKind::Single => RedisSettings::single(env.get("QP_REDIS_URL")),
            RedisKind::Cluster => RedisSettings::cluster(
                env.get("QP_REDIS_CLUSTER_NODES")
                    .split(',')
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            )
            .with_password(Some(env.get("QP_REDIS_CLUSTER_PASSWORD"))),
            RedisKind::Tls => RedisSettings::single(env.get("QP_ENV_REDIS_TLS_URL"))
                .with_username(Some(env.get("QP_ENV_REDIS_USER")))
                .with_password(Some(env.get("QP_ENV_REDIS_PASSWORD")))
                .with_ca(Some(
                    std::fs::read(env.get("QP_ENV_SERVICES_CA")).expect("the services' CA"),
                )),
        };
        let conn = redis.connect().await.expect("connect to redis");
        let bootstrap = env.get("QP_KAFKA_BOOTSTRAP");
        let topic = format!("qp-{name}");
        if partitions > 0 {
            crate::kafka::create_topic(&bootstrap, &topic, partitions).await;
        }
        Fixture {
            keys: Keys::new(&namespace, &name),
            group: format!("{topic}-group"),
            env,
            namespace,
            name,
            redis_kind,
            redis,
            conn,
            topic,
            bootstrap,
        }
    }

    /// The token pool of this QueueProcessor, as the operator sees it.
    pub fn pool(&self) -> TokenPool {
        TokenPool::new(
            self.conn.clone(),
            self.redis.clone(),
            self.keys.clone(),
            PoolOptions::default(),
        )
    }

    /// `qp-worker run` with the common settings; add source and handler flags.
    pub fn worker_command(&self, worker_id: &str) -> Command {
        self.worker_command_on(worker_id, procs::free_port())
    }

    /// [`Fixture::worker_command`] serving `/metrics` on `port`.
    pub fn worker_command_on(&self, worker_id: &str, port: u16) -> Command {
        let mut cmd = Command::new(procs::binary("qp-worker"));
        cmd.arg("run")
            .args(["--namespace", &self.namespace, "--name", &self.name])
            .args(["--worker-id", worker_id])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info,librdkafka=warn");
        self.redis_args(&mut cmd);
        cmd
    }

    /// `qp-worker gateway` for this QueueProcessor, queueing to `queue`, with `extra` flags.
    /// Returns once `/readyz` answers 200, with the process and its base URL
    /// (`http://127.0.0.1:<port>`).
    pub async fn gateway(&self, queue: GatewayQueue<'_>, extra: &[&str]) -> (Proc, String) {
        let port = procs::free_port();
        let mut cmd = Command::new(procs::binary("qp-worker"));
        cmd.arg("gateway")
            .args(["--namespace", &self.namespace, "--name", &self.name])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info,librdkafka=warn");
        self.redis_args(&mut cmd);
        match queue {
            GatewayQueue::Kafka => {
                cmd.args(["--source", "kafka", "--kafka-bootstrap", &self.bootstrap])
                    .args(["--kafka-topic", &self.topic, "--kafka-group", &self.group]);
            }
            GatewayQueue::RedisList(list) => {
                cmd.args(["--source", "redis-list", "--list-key", list]);
            }
            GatewayQueue::RedisStream(key) => {
                cmd.args(["--source", "redis-stream", "--stream-key", key]);
            }
        }
        // Authentication is required unless disabled; tests of other things disable it.
        if !extra.contains(&"--tokens-file") && !extra.contains(&"--client-ca-file") {
            cmd.arg("--no-auth");
        }
        cmd.args(extra);
        let mut proc = Proc::spawn(&format!("{}-gateway-{port}", self.name), cmd);
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let readyz = format!("{base}/readyz");
        eventually(Duration::from_secs(30), "the gateway's /readyz", || {
            assert!(proc.alive(), "the gateway exited; see target/test-logs/");
            let get = http.get(&readyz).send();
            async move {
                get.await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
        (proc, base)
    }

    fn redis_args(&self, cmd: &mut Command) {
        match self.redis_kind {
            RedisKind::Single => {
                cmd.args(["--redis-url", &self.env.get("QP_REDIS_URL")]);
            }
            RedisKind::Cluster => {
                cmd.args([
                    "--redis-cluster-nodes",
                    &self.env.get("QP_REDIS_CLUSTER_NODES"),
                ])
                .env(
                    "QP_REDIS_PASSWORD",
                    self.env.get("QP_REDIS_CLUSTER_PASSWORD"),
                );
            }
            // Credentials as the operator passes them (environment variables from Secrets),
            // the CA as a mounted file.
            RedisKind::Tls => {
                cmd.args(["--redis-url", &self.env.get("QP_ENV_REDIS_TLS_URL")])
                    .args(["--redis-ca-file", &self.env.get("QP_ENV_SERVICES_CA")])
                    .env("QP_REDIS_USERNAME", self.env.get("QP_ENV_REDIS_USER"))
                    .env("QP_REDIS_PASSWORD", self.env.get("QP_ENV_REDIS_PASSWORD"));
            }
        }
    }

    /// A Kafka-source worker with the given handler and extra flags.
    pub fn kafka_worker(&self, worker_id: &str, handler: &str, extra: &[&str]) -> Proc {
        self.kafka_worker_on(worker_id, procs::free_port(), handler, extra)
    }

    /// [`Fixture::kafka_worker`] serving `/metrics` on `port`.
    pub fn kafka_worker_on(
        &self,
        worker_id: &str,
        port: u16,
        handler: &str,
        extra: &[&str],
    ) -> Proc {
        let mut cmd = self.worker_command_on(worker_id, port);
        cmd.args(["--source", "kafka", "--kafka-bootstrap", &self.bootstrap])
            .args(["--kafka-topic", &self.topic, "--kafka-group", &self.group])
            .args(["--handler", handler])
            .args(extra);
        Proc::spawn(&format!("{}-{worker_id}", self.name), cmd)
    }

    /// A Redis-list worker.
    pub fn list_worker(&self, worker_id: &str, list: &str, handler: &str, extra: &[&str]) -> Proc {
        let mut cmd = self.worker_command(worker_id);
        cmd.args(["--source", "redis-list", "--list-key", list])
            .args(["--handler", handler])
            .args(extra);
        Proc::spawn(&format!("{}-{worker_id}", self.name), cmd)
    }

    /// Run a worker from `start` again after each time it dies (as a pod's container is
    /// restarted, with the same id) until every id in `ids` has an outcome (`done` or
    /// `failed`); returns how many starts that took. Fails after `max_starts`.
    pub async fn restart_until_finished(
        &self,
        ids: &[String],
        max_starts: u32,
        start: impl Fn() -> Proc,
    ) -> u32 {
        let mut starts = 0;
        loop {
            starts += 1;
            assert!(
                starts <= max_starts,
                "not every outcome after {} starts",
                starts - 1
            );
            let mut w = start();
            let finished = eventually(Duration::from_secs(30), "a crash or every outcome", || {
                let alive = w.alive();
                async move {
                    let states = self.states(ids).await;
                    let finished = ids.iter().all(|id| {
                        matches!(states.get(id).map(String::as_str), Some("done" | "failed"))
                    });
                    (finished || !alive).then_some(finished)
                }
            })
            .await;
            if finished {
                return starts;
            }
        }
    }

    /// States of the given request ids (missing ids are absent from the map).
    pub async fn states(&self, ids: &[String]) -> HashMap<String, String> {
        states(&self.conn, &self.keys, ids).await
    }

    /// Wait until every id is `done` (or `failed`), panicking with the count still missing.
    pub async fn wait_finished(&self, ids: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let states = self.states(ids).await;
            let unfinished = ids
                .iter()
                .filter(|id| {
                    !matches!(states.get(*id).map(String::as_str), Some("done" | "failed"))
                })
                .count();
            if unfinished == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{unfinished} of {} requests unfinished after {timeout:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The length of a list.
    pub async fn llen(&self, key: &str) -> i64 {
        redis::cmd("LLEN")
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .expect("LLEN")
    }

    /// An integer key of the probe handler (`current`, `max`).
    pub async fn probe(&self, what: &str) -> i64 {
        let key = format!("{}probe:{what}", self.keys.prefix());
        let v: Option<i64> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .expect("read probe");
        v.unwrap_or(0)
    }

    /// How many ids the probe handler ran more than once, and the total extra runs.
    pub async fn duplicate_runs(&self) -> (usize, i64) {
        let key = format!("{}probe:runs", self.keys.prefix());
        let runs: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .expect("read runs");
        let dup: Vec<i64> = runs.values().filter(|r| **r > 1).map(|r| r - 1).collect();
        (dup.len(), dup.iter().sum())
    }

    /// Delete every key of this QueueProcessor (tests clean up what they made).
    pub async fn cleanup(&self) {
        let pattern = format!("{}*", self.keys.prefix());
        let mut conn = self.conn.clone();
        // On a cluster the client asks every primary and merges the answers.
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for chunk in keys.chunks(200) {
            let _: redis::RedisResult<i64> =
                redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
        crate::kafka::delete_topic(&self.bootstrap, &self.topic).await;
    }
}

/// A TCP endpoint that accepts connections and never answers: a broker or Redis that hangs
/// rather than refuses (a stopped VM, a dropped route), the worst case for a client's timeouts.
/// Dropping it closes the listener and every connection it held.
pub struct Silent {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Silent {
    pub async fn start() -> Silent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a silent listener");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        Silent { addr, task }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Redis ACL user of a test on the single Redis, with a random password; deleted on drop
/// (also when the test panics).
pub struct AclUser {
    pub name: String,
    pub password: String,
    conn: Conn,
    url: String,
}

impl AclUser {
    /// `qp-<fixture name>`, switched on, with `rules` (`allkeys`, `-lmove`, `resetchannels`...).
    pub async fn create(fx: &Fixture, rules: &[&str]) -> AclUser {
        let user = AclUser {
            name: format!("qp-{}", fx.name),
            password: uuid::Uuid::new_v4().simple().to_string(),
            conn: fx.conn.clone(),
            url: fx.env.get("QP_REDIS_URL"),
        };
        let pass = format!(">{}", user.password);
        user.set(&[&["on", &pass][..], rules].concat()).await;
        user
    }

    /// `ACL SETUSER <name> rules...`: change the user while it is in use.
    pub async fn set(&self, rules: &[&str]) {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&self.name)
            .arg(rules)
            .query_async(&mut self.conn.clone())
            .await
            .expect("ACL SETUSER");
    }

    /// The environment a `qp-worker` needs to log in as this user.
    pub fn env(&self) -> [(&str, &str); 2] {
        [
            ("QP_REDIS_USERNAME", self.name.as_str()),
            ("QP_REDIS_PASSWORD", self.password.as_str()),
        ]
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        // A plain connection: a destructor cannot await.
        let deleted: redis::RedisResult<i64> = redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| {
                redis::cmd("ACL")
                    .arg("DELUSER")
                    .arg(&self.name)
                    .query(&mut c)
            });
        if let Err(e) = deleted {
            eprintln!("could not delete the Redis ACL user {}: {e}", self.name);
        }
    }
}
