//! The token pool against a real Redis and a real Redis Cluster.
//!
//! Start them first with `make env-up` (or `hack/env.sh start redis redis-cluster`); the
//! addresses come from the env file (`QP_ENV_FILE`, default `<workspace>/.qp-env/env`).
//! Every test runs twice, on the single server and on the cluster, under a fresh
//! QueueProcessor name, and deletes its keys at the end.
//!
//! Waiting in these tests always goes through the pool's own blocking behaviour; the only
//! sleeps stand in for a handler's work, and the only loops that re-check a condition wait for
//! a waiter to have registered itself in Redis before the test measures how fast it is woken.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use qp_protocol::keys::{self, Keys};
use qp_protocol::redis_conn::{Conn, RedisSettings};
use qp_protocol::tokens::{PoolOptions, RoundTrips, TokenPool};
use qp_tests::fixture::eventually;
use qp_tests::proxy::RedisProxy;
use qp_worker::keeper::{KeeperConfig, LeaseKeeper};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Single,
    Cluster,
}

fn env() -> &'static HashMap<String, String> {
    static ENV: OnceLock<HashMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = std::env::var("QP_ENV_FILE")
            .unwrap_or_else(|_| format!("{}/../.qp-env/env", env!("CARGO_MANIFEST_DIR")));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("cannot read the env file {path} ({e}): run `make env-up` first")
        });
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    })
}

fn var(name: &str) -> String {
    env()
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} missing from the env file: run `make env-up` first"))
}

fn settings(kind: Kind) -> RedisSettings {
    match kind {
        Kind::Single => RedisSettings::from_parts(Some(&var("QP_REDIS_URL")), None, None, false),
        Kind::Cluster => RedisSettings::from_parts(
            None,
            Some(&var("QP_REDIS_CLUSTER_NODES")),
            Some(var("QP_REDIS_CLUSTER_PASSWORD")),
            false,
        ),
    }
    .unwrap()
}

/// A fresh QueueProcessor: its settings, a shared connection and its keys.
struct Qp {
    settings: RedisSettings,
    conn: Conn,
    keys: Keys,
}

impl Qp {
    async fn new(kind: Kind) -> Self {
        let settings = settings(kind);
        let conn = settings.connect().await.unwrap_or_else(|e| {
            panic!("cannot connect to {kind:?} Redis ({e}): run `make env-up` first")
        });
        let keys = Keys::new("test", &format!("tokens-{}", uuid::Uuid::new_v4().simple()));
        Qp {
            settings,
            conn,
            keys,
        }
    }

    /// A pool for one simulated worker, on a connection of its own (like a separate process).
    async fn pool(&self, owner: &str, ttl: Duration) -> TokenPool {
        TokenPool::connect(
            self.settings.clone(),
            self.keys.clone(),
            PoolOptions {
                owner: owner.to_string(),
                lease_ttl: ttl,
                ..PoolOptions::default()
            },
        )
        .await
        .unwrap()
    }

    /// Waits until some owner has asked for more than it got, i.e. a waiter is about to block
    /// (or is blocked) in BLPOP. A wake-up pushed from then on cannot be missed.
    async fn until_starving(&self, pool: &TokenPool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.snapshot().await.unwrap().starving == 0 {
            assert!(Instant::now() < deadline, "no waiter showed up");
            tokio::task::yield_now().await;
        }
    }

    /// Waits until a waiter has registered for a hand-off (its ACQUIRE found nothing).
    async fn until_waiting(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.waiting().await == 0 {
            assert!(Instant::now() < deadline, "no waiter registered");
            tokio::task::yield_now().await;
        }
    }

    /// Registered waiters.
    async fn waiting(&self) -> u64 {
        let mut conn = self.conn.clone();
        redis::cmd("ZCARD")
            .arg(self.keys.waiters())
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Hand-offs that no waiter has taken yet.
    async fn pending_hand_offs(&self) -> usize {
        self.pending_hand_off_ids().await.len()
    }

    /// The lease ids of the hand-offs that no waiter has taken yet.
    async fn pending_hand_off_ids(&self) -> Vec<String> {
        let mut conn = self.conn.clone();
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(self.keys.granted())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        entries
            .iter()
            .map(|e| e.split_once(' ').expect("'<ttl> <id>'").1.to_owned())
            .collect()
    }

    async fn cleanup(&self) {
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("DEL")
            .arg(&self.keys.token_keys()[..])
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

fn ids(leases: &[qp_protocol::tokens::Lease]) -> Vec<String> {
    leases.iter().map(|l| l.id.clone()).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sum(trips: impl IntoIterator<Item = RoundTrips>) -> RoundTrips {
    trips
        .into_iter()
        .fold(RoundTrips::default(), |a, b| RoundTrips {
            acquire: a.acquire + b.acquire,
            renew: a.renew + b.renew,
            release: a.release + b.release,
            blpop: a.blpop + b.blpop,
            other: a.other + b.other,
        })
}

/// Runs a test body once on the single Redis and once on the cluster.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn single() {
                super::$name(super::Kind::Single).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cluster() {
                super::$name(super::Kind::Cluster).await
            }
        }
    )*};
}

on_both!(
    keys_share_one_cluster_slot,
    limit_holds_under_concurrent_acquirers,
    batch_acquire_grants_up_to_k,
    expired_leases_come_back,
    renew_reports_lost_leases,
    set_limit_growth_wakes_and_shrink_drains,
    release_wakes_a_waiter,
    release_hands_the_slot_to_a_waiter,
    a_hand_off_nobody_took_goes_to_the_next_acquirer,
    a_hand_off_nobody_took_expires,
    a_cancelled_waiter_withdraws,
    release_hands_off_nothing_above_a_shrunk_limit,
    keepers_cap_concurrency_with_few_round_trips,
    keepers_follow_limit_changes,
    keepers_at_their_share_use_a_limit_increase_at_once,
    keeper_reports_lost_leases_and_closes,
    keepers_share_fairly,
    lease_ids_never_repeat_after_redis_loses_data,
    a_lost_limit_is_not_a_limit_of_zero,
    uneven_limits_leave_nobody_without_leases,
);

/// Our slot function agrees with the server's `CLUSTER KEYSLOT`, and all keys share a slot.
async fn keys_share_one_cluster_slot(kind: Kind) {
    let qp = Qp::new(kind).await;
    if let Kind::Cluster = kind {
        let mut conn = qp.conn.clone();
        let tokens = qp.keys.token_keys();
        let extra = [
            qp.keys.result("r1"),
            qp.keys.state("r1"),
            qp.keys.heartbeats(),
        ];
        for key in tokens.iter().chain(extra.iter()) {
            let server: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(server, keys::slot(key.as_bytes()), "{key}");
            assert_eq!(server, keys::slot(tokens[0].as_bytes()), "{key}");
        }
        let p = qp.keys.processing_list("jobs", "w1").unwrap();
        let server: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&p)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(server, keys::slot(b"jobs"));
    }
    // The scripts run (one slot per script) on both kinds.
    let pool = qp.pool("a", Duration::from_secs(5)).await;
    pool.set_limit(1).await.unwrap();
    assert_eq!(pool.try_acquire(1).await.unwrap().leases.len(), 1);
    qp.cleanup().await;
}

/// Three pools, many tasks each, limit 8: never more than 8 at once, and close to 8 reached.
async fn limit_holds_under_concurrent_acquirers(kind: Kind) {
    let qp = Qp::new(kind).await;
    let mut pools = Vec::new();
    for i in 0..3 {
        pools.push(qp.pool(&format!("p{i}"), Duration::from_secs(5)).await);
    }
    pools[0].set_limit(8).await.unwrap();
    let active = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for pool in &pools {
        for _ in 0..10 {
            let (pool, active, max) = (pool.clone(), active.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..15 {
                    let leases = pool
                        .acquire(1, Instant::now() + Duration::from_secs(20))
                        .await
                        .unwrap();
                    assert_eq!(leases.len(), 1);
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await; // the "work"
                    active.fetch_sub(1, Ordering::SeqCst);
                    pool.release(&ids(&leases)).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let max = max.load(Ordering::SeqCst);
    println!("{kind:?}: max concurrency {max} (limit 8)");
    assert!(max <= 8, "limit exceeded: {max}");
    assert!(max >= 7, "limit not reached: {max}");
    assert_eq!(pools[0].in_use().await.unwrap(), 0);
    qp.cleanup().await;
}

/// One ACQUIRE grants up to k; with nothing free, acquire blocks until its deadline.
async fn batch_acquire_grants_up_to_k(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(5);
    let pool = qp.pool("a", ttl).await;
    // No limit set yet: nothing is granted and there is no expiry to wait for.
    let none = pool.try_acquire(3).await.unwrap();
    assert!(none.leases.is_empty());
    assert_eq!(none.retry_after, None);

    pool.set_limit(5).await.unwrap();
    let first = pool.try_acquire(3).await.unwrap();
    assert_eq!(first.leases.len(), 3);
    assert_eq!(first.status.in_use, 3);
    let second = pool
        .acquire(3, Instant::now() + Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(second.len(), 2, "only 2 of 5 were left");
    let all: HashSet<String> = ids(&first.leases).into_iter().chain(ids(&second)).collect();
    assert_eq!(all.len(), 5, "lease ids are unique");

    let full = pool.try_acquire(1).await.unwrap();
    assert!(full.leases.is_empty());
    let retry = full
        .retry_after
        .expect("leases exist, so one expires first");
    assert!(
        retry <= ttl && retry > ttl - Duration::from_secs(1),
        "{retry:?}"
    );

    let before = pool.round_trips();
    let start = Instant::now();
    let got = pool
        .acquire(1, Instant::now() + Duration::from_millis(300))
        .await
        .unwrap();
    let waited = start.elapsed();
    let calls = pool.round_trips();
    assert!(got.is_empty());
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_millis(800), "{waited:?}");
    // Blocked in BLPOP, not spinning: a couple of calls for 300 ms.
    assert!(
        calls.acquire - before.acquire <= 3,
        "{before:?} -> {calls:?}"
    );
    assert!(calls.blpop - before.blpop <= 2, "{before:?} -> {calls:?}");

    let all: Vec<String> = all.into_iter().collect();
    assert_eq!(pool.release(&all).await.unwrap(), 5);
    let snap = pool.snapshot().await.unwrap();
    assert_eq!(snap.in_use, 0);
    assert!(snap.wake_len <= 5, "{snap:?}");
    qp.cleanup().await;
}

/// A holder that dies without releasing: a blocked waiter gets the permits back when the lease
/// expires, woken by its own BLPOP timeout (no release ever happens).
async fn expired_leases_come_back(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(1);
    let dead = qp.pool("dead", ttl).await;
    let waiter = qp.pool("waiter", Duration::from_secs(5)).await;
    dead.set_limit(2).await.unwrap();
    let granted_at = Instant::now();
    assert_eq!(dead.try_acquire(2).await.unwrap().leases.len(), 2);
    drop(dead); // "killed": never renews, never releases

    let got = waiter
        .acquire(2, granted_at + Duration::from_secs(5))
        .await
        .unwrap();
    let after = granted_at.elapsed();
    println!(
        "{kind:?}: dead holder's permits back after {:.0} ms (ttl 1000 ms)",
        ms(after)
    );
    assert!(!got.is_empty());
    assert!(after >= ttl - Duration::from_millis(50), "{after:?}");
    assert!(after <= ttl + Duration::from_millis(500), "{after:?}");
    qp.cleanup().await;
}

/// RENEW extends what still exists and names what was lost.
async fn renew_reports_lost_leases(kind: Kind) {
    let qp = Qp::new(kind).await;
    let a = qp.pool("a", Duration::from_millis(500)).await;
    let b = qp.pool("b", Duration::from_secs(5)).await;
    a.set_limit(3).await.unwrap();
    let held = ids(&a.try_acquire(3).await.unwrap().leases);
    // Someone else releases one of a's leases.
    b.release(&held[1..2]).await.unwrap();
    assert_eq!(a.renew(&held).await.unwrap(), vec![held[1].clone()]);
    a.release(&held).await.unwrap();

    // a's lease expires while b waits for it; b's BLPOP timeout ends at the expiry.
    a.set_limit(1).await.unwrap();
    let mine = ids(&a.try_acquire(1).await.unwrap().leases);
    let theirs = b
        .acquire(1, Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(a.renew(&mine).await.unwrap(), mine);
    assert!(b.renew(&ids(&theirs)).await.unwrap().is_empty());
    let renewal = b.renew_with_status(&ids(&theirs)).await.unwrap();
    assert_eq!(renewal.status.in_use, 1);
    assert_eq!(renewal.status.limit, 1);
    qp.cleanup().await;
}

/// Lease ids do not depend on anything Redis can lose. Version 0.1 numbered them with a
/// counter in Redis: after a failover to a replica that had not seen the last increments (here:
/// the counter deleted), a worker was granted an id it still held, the two permits counted as one
/// lease, and the limit was exceeded. A restarted worker (same owner name, new process) must
/// not collide with leases its previous process left behind either.
async fn lease_ids_never_repeat_after_redis_loses_data(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(5);
    let a = qp.pool("w", ttl).await;
    a.set_limit(8).await.unwrap();
    let first = ids(&a.try_acquire(2).await.unwrap().leases);
    let _: () = redis::cmd("DEL")
        .arg(qp.keys.lease_seq())
        .query_async(&mut qp.conn.clone())
        .await
        .unwrap();
    let second = ids(&a.try_acquire(2).await.unwrap().leases);
    let restarted = qp.pool("w", ttl).await;
    let third = ids(&restarted.try_acquire(2).await.unwrap().leases);
    let all: HashSet<_> = first.iter().chain(&second).chain(&third).collect();
    assert_eq!(all.len(), 6, "ids repeated: {first:?} {second:?} {third:?}");
    assert!(all.iter().all(|id| id.starts_with("w:")), "{all:?}");
    assert_eq!(
        a.snapshot().await.unwrap().in_use,
        6,
        "six permits, six leases"
    );
    qp.cleanup().await;
}

/// When Redis loses the `limit` key, a worker's pool admits under the last limit it saw until
/// the operator writes the key again, instead of stopping (a missing key used to read as 0).
/// Leases lost with the data are reported lost, so what runs beyond the limit is at most the
/// work already running. The operator's view (a pool without `keep_last_limit`, and `GET`)
/// still says the key is gone, so the operator rewrites it.
async fn a_lost_limit_is_not_a_limit_of_zero(kind: Kind) {
    let qp = Qp::new(kind).await;
    let worker = TokenPool::connect(
        qp.settings.clone(),
        qp.keys.clone(),
        PoolOptions {
            owner: "w".into(),
            keep_last_limit: true,
            ..PoolOptions::default()
        },
    )
    .await
    .unwrap();
    let operator = qp.pool("", Duration::from_secs(5)).await;
    operator.set_limit(3).await.unwrap();
    let running = ids(&worker.try_acquire(2).await.unwrap().leases);
    assert_eq!(running.len(), 2);

    // Redis loses everything of this QueueProcessor (a restart without persistence).
    let _: () = redis::cmd("DEL")
        .arg(&qp.keys.token_keys()[..])
        .query_async(&mut qp.conn.clone())
        .await
        .unwrap();
    let renewal = worker.renew_with_status(&running).await.unwrap();
    assert_eq!(renewal.lost.len(), 2, "the running work's leases are gone");
    assert_eq!(renewal.status.limit, 3, "the worker keeps the last limit");
    let grant = worker.try_acquire(5).await.unwrap();
    assert_eq!(
        grant.leases.len(),
        3,
        "admission goes on under the old limit"
    );
    assert_eq!(grant.status.in_use, 3);
    assert_eq!(operator.limit().await.unwrap(), 0, "the key really is gone");
    assert_eq!(operator.snapshot().await.unwrap().limit, 0);

    // The operator's next poll writes a new limit; the worker follows it.
    operator.set_limit(1).await.unwrap();
    let status = worker.renew_with_status(&[]).await.unwrap().status;
    assert_eq!(status.limit, 1);
    qp.cleanup().await;
}

/// Fair shares add up to the limit. They used to be `ceil(limit / owners)` each: with a limit
/// of 4 and three busy workers, the first two kept 2 each and the third never got a lease. With
/// fewer leases than workers, the lease goes round: every worker gets its turn.
async fn uneven_limits_leave_nobody_without_leases(kind: Kind) {
    let qp = Qp::new(kind).await;
    let config = KeeperConfig {
        max_held: 8,
        batch: 8,
        ..KeeperConfig::default()
    };
    let ttl = Duration::from_millis(1500);
    let keepers: Vec<LeaseKeeper> = {
        let mut v = Vec::new();
        for name in ["a", "b", "c"] {
            v.push(LeaseKeeper::start(qp.pool(name, ttl).await, config.clone()));
        }
        v
    };
    keepers[0].pool().set_limit(4).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let granted: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let busy_loop = |keeper: LeaseKeeper, count: Arc<AtomicUsize>, stop: Arc<AtomicBool>| async move {
        while !stop.load(Ordering::SeqCst) {
            let permit = keeper.acquire().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(3)).await;
            drop(permit);
        }
    };
    let mut tasks = Vec::new();
    // a and b take everything first; c arrives last.
    for i in 0..3 {
        if i == 2 {
            while granted[0].load(Ordering::SeqCst) == 0 || granted[1].load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for _ in 0..8 {
            tasks.push(tokio::spawn(busy_loop(
                keepers[i].clone(),
                granted[i].clone(),
                stop.clone(),
            )));
        }
    }
    let arrived = Instant::now();
    while granted[2].load(Ordering::SeqCst) == 0 {
        assert!(
            arrived.elapsed() < Duration::from_secs(5),
            "limit 4, three workers: c got no lease in 5 s (a {} / b {})",
            keepers[0].held(),
            keepers[1].held()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c_waited = arrived.elapsed();

    // Fewer leases than workers: each gets its turn within two turns of the shares.
    keepers[0].pool().set_limit(2).await.unwrap();
    // The shrink takes effect: the keepers shed leases as permits come back.
    let shrunk = Instant::now();
    while keepers[0].pool().snapshot().await.unwrap().in_use > 2 {
        assert!(
            shrunk.elapsed() < Duration::from_secs(5),
            "the shrink took effect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before: Vec<usize> = granted.iter().map(|g| g.load(Ordering::SeqCst)).collect();
    let window = qp_protocol::tokens::SHARE_TURN * 2 + Duration::from_secs(1);
    // The observation window: two turns of the shares.
    tokio::time::sleep(window).await;
    let during: Vec<usize> = granted
        .iter()
        .zip(&before)
        .map(|(g, b)| g.load(Ordering::SeqCst) - b)
        .collect();
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "{kind:?}: limit 4 over 3 workers: the last one's first lease after {:.0} ms; \
         limit 2 over 3 workers, permits in {window:?}: {during:?}",
        ms(c_waited)
    );
    assert!(
        during.iter().all(|n| *n > 0),
        "someone got no turn: {during:?}"
    );
    for k in &keepers {
        k.close().await.unwrap();
    }
    qp.cleanup().await;
}

/// A higher limit wakes a blocked waiter at once; a lower one revokes nothing and wakes no one.
async fn set_limit_growth_wakes_and_shrink_drains(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(5);
    let a = qp.pool("a", ttl).await;
    let b = qp.pool("b", ttl).await;
    let c = qp.pool("c", ttl).await;
    a.set_limit(1).await.unwrap();
    let a_held = ids(&a.try_acquire(1).await.unwrap().leases);

    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            let got = b
                .acquire(1, Instant::now() + Duration::from_secs(10))
                .await
                .unwrap();
            (got, Instant::now())
        })
    };
    qp.until_starving(&c).await;
    let grown_at = Instant::now();
    assert_eq!(c.set_limit(2).await.unwrap(), 1);
    let (b_held, woken_at) = waiter.await.unwrap();
    let latency = woken_at - grown_at;
    println!(
        "{kind:?}: limit growth -> waiter granted in {:.2} ms",
        ms(latency)
    );
    assert_eq!(b_held.len(), 1);
    assert!(latency < Duration::from_millis(100), "{latency:?}");

    // Shrink to 1 while 2 are held: nothing is revoked.
    assert_eq!(c.set_limit(1).await.unwrap(), 2);
    assert!(a.renew(&a_held).await.unwrap().is_empty());
    assert!(b.renew(&ids(&b_held)).await.unwrap().is_empty());
    assert_eq!(c.in_use().await.unwrap(), 2);
    assert!(c.try_acquire(1).await.unwrap().leases.is_empty());
    // The first release only drains the excess: no capacity, no wake-up.
    a.release(&a_held).await.unwrap();
    let snap = c.snapshot().await.unwrap();
    assert_eq!(
        (snap.in_use, snap.limit, snap.wake_len),
        (1, 1, 0),
        "{snap:?}"
    );
    assert!(c.try_acquire(1).await.unwrap().leases.is_empty());
    // The second one frees a slot again.
    b.release(&ids(&b_held)).await.unwrap();
    assert_eq!(c.try_acquire(1).await.unwrap().leases.len(), 1);
    qp.cleanup().await;
}

/// A release wakes the waiter blocked in BLPOP; measures release -> grant latency.
async fn release_wakes_a_waiter(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(10);
    let mut holder = qp.pool("a", ttl).await;
    let mut waiter = qp.pool("b", ttl).await;
    let observer = qp.pool("observer", ttl).await;
    holder.set_limit(1).await.unwrap();
    let mut held = ids(&holder.try_acquire(1).await.unwrap().leases);
    let mut latencies = Vec::new();
    for _ in 0..40 {
        let task = {
            let waiter = waiter.clone();
            tokio::spawn(async move {
                let got = waiter
                    .acquire(1, Instant::now() + Duration::from_secs(10))
                    .await
                    .unwrap();
                (got, Instant::now())
            })
        };
        qp.until_starving(&observer).await;
        let released_at = Instant::now();
        holder.release(&held).await.unwrap();
        let (got, woken_at) = task.await.unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        latencies.push(woken_at - released_at);
        held = ids(&got);
        std::mem::swap(&mut holder, &mut waiter);
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let max = *latencies.last().unwrap();
    println!(
        "{kind:?}: release -> waiter granted: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        ms(p50),
        ms(p99),
        ms(max),
        latencies.len()
    );
    assert!(p99 < Duration::from_millis(100), "{latencies:?}");
    qp.cleanup().await;
}

/// A RELEASE gives the freed slot to the blocked waiter as a lease: the waiter holds it without
/// a second ACQUIRE (one round trip less on every wake), the lease is real (RENEW keeps it) and
/// the limit holds. Raw pools and a worker's keeper alike.
async fn release_hands_the_slot_to_a_waiter(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(10);
    let holder = qp.pool("a", ttl).await;
    let waiter = qp.pool("b", ttl).await;
    let observer = qp.pool("observer", ttl).await;
    holder.set_limit(1).await.unwrap();
    let rounds = 10;
    for round in 0..rounds {
        let held = ids(&holder.try_acquire(1).await.unwrap().leases);
        assert_eq!(held.len(), 1);
        let task = {
            let waiter = waiter.clone();
            tokio::spawn(async move {
                waiter
                    .acquire(1, Instant::now() + Duration::from_secs(10))
                    .await
                    .unwrap()
            })
        };
        qp.until_starving(&observer).await;
        holder.release(&held).await.unwrap();
        let got = ids(&task.await.unwrap());
        assert_eq!(got.len(), 1, "round {round}");
        assert!(
            waiter.renew(&got).await.unwrap().is_empty(),
            "round {round}"
        );
        assert_eq!(observer.in_use().await.unwrap(), 1, "round {round}");
        waiter.release(&got).await.unwrap();
    }
    // One ACQUIRE per acquire: the one that found the pool full. (Before hand-offs, every
    // wake-up cost a second ACQUIRE.)
    assert_eq!(
        waiter.round_trips().acquire,
        rounds,
        "{:?}",
        waiter.round_trips()
    );

    // A worker's keeper takes the hand-off the same way.
    let pool = qp.pool("k", ttl).await;
    let keeper = LeaseKeeper::start(
        pool,
        KeeperConfig {
            max_held: 1,
            batch: 1,
            linger: Duration::ZERO,
            sync_interval: None,
        },
    );
    let held = ids(&holder.try_acquire(1).await.unwrap().leases);
    let task = {
        let keeper = keeper.clone();
        tokio::spawn(async move { keeper.acquire().await.map(drop) })
    };
    qp.until_starving(&observer).await;
    let before = keeper.pool().round_trips();
    holder.release(&held).await.unwrap();
    task.await.unwrap().unwrap();
    let after = keeper.pool().round_trips();
    assert_eq!(after.acquire, before.acquire, "{before:?} -> {after:?}");
    keeper.close().await.unwrap();
    assert_eq!(observer.in_use().await.unwrap(), 0);
    qp.cleanup().await;
}

/// A waiter of `pool` that registers and never blocks: a worker killed between its ACQUIRE
/// and its `BLPOP`. Its registration stays until its wait would have ended.
async fn vanished_waiter(pool: &TokenPool) {
    let grant = pool
        .try_acquire_or_wait(1, 0, Duration::from_secs(1), None)
        .await
        .unwrap();
    assert!(
        grant.leases.is_empty() && grant.ticket.is_some(),
        "{grant:?}"
    );
}

/// A waiter that stops waiting (cancelled: a worker shutting down) withdraws: the slot a
/// RELEASE frees next is free, not handed to it.
async fn a_cancelled_waiter_withdraws(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(10);
    let (holder, gone, observer) = (
        qp.pool("a", ttl).await,
        qp.pool("b", ttl).await,
        qp.pool("c", ttl).await,
    );
    holder.set_limit(1).await.unwrap();
    let held = ids(&holder.try_acquire(1).await.unwrap().leases);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = {
        let (gone, cancel) = (gone.clone(), cancel.clone());
        tokio::spawn(async move {
            gone.acquire_until(1, Instant::now() + Duration::from_secs(10), Some(&cancel))
                .await
        })
    };
    qp.until_waiting().await;
    cancel.cancel();
    assert!(matches!(
        task.await.unwrap(),
        Err(qp_protocol::Error::Closed)
    ));
    assert_eq!(qp.waiting().await, 0);
    holder.release(&held).await.unwrap();
    assert_eq!(qp.pending_hand_offs().await, 0);
    assert_eq!(observer.in_use().await.unwrap(), 0);
    qp.cleanup().await;
}

/// A hand-off to a waiter that stopped waiting is not lost: it stays a lease (the limit holds)
/// until the next ACQUIRE, of anyone, takes it.
async fn a_hand_off_nobody_took_goes_to_the_next_acquirer(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(10);
    let (holder, gone, next) = (
        qp.pool("a", ttl).await,
        qp.pool("b", ttl).await,
        qp.pool("c", ttl).await,
    );
    holder.set_limit(1).await.unwrap();
    let held = ids(&holder.try_acquire(1).await.unwrap().leases);
    vanished_waiter(&gone).await;
    holder.release(&held).await.unwrap();
    assert_eq!(qp.pending_hand_offs().await, 1);
    assert_eq!(next.in_use().await.unwrap(), 1, "the hand-off is a lease");
    let got = next.try_acquire(2).await.unwrap().leases;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].id.starts_with("b:"),
        "the waiter's ticket names it: {got:?}"
    );
    assert_eq!(qp.pending_hand_offs().await, 0);
    assert_eq!(next.in_use().await.unwrap(), 1);
    assert!(next.renew(&ids(&got)).await.unwrap().is_empty());
    assert!(next.try_acquire(1).await.unwrap().leases.is_empty());
    qp.cleanup().await;
}

/// A hand-off nobody takes expires with the waiter's TTL, and nobody can take it afterwards.
async fn a_hand_off_nobody_took_expires(kind: Kind) {
    let qp = Qp::new(kind).await;
    let holder = qp.pool("a", Duration::from_secs(10)).await;
    let gone = qp.pool("b", Duration::from_millis(300)).await;
    let next = qp.pool("c", Duration::from_secs(10)).await;
    holder.set_limit(1).await.unwrap();
    let held = ids(&holder.try_acquire(1).await.unwrap().leases);
    vanished_waiter(&gone).await;
    holder.release(&held).await.unwrap();
    let pending = qp.pending_hand_off_ids().await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    let expiry = next.snapshot().await.unwrap().next_expiry.expect("a lease");
    assert!(expiry <= Duration::from_millis(300), "{expiry:?}");
    // The lease expires within its TTL; SNAPSHOT (in_use) reaps it and the hand-off with it.
    let deadline = Instant::now() + expiry + Duration::from_secs(2);
    while next.in_use().await.unwrap() != 0 {
        assert!(Instant::now() < deadline, "the hand-off outlived its TTL");
        tokio::task::yield_now().await;
    }
    assert_eq!(
        qp.pending_hand_offs().await,
        0,
        "the expired hand-off is dropped"
    );
    // The waiter that vanished is still marked starving, so its owner asks (the others would
    // be held back for it): a fresh lease, not the expired hand-off.
    let got = gone.try_acquire(1).await.unwrap().leases;
    assert_eq!(got.len(), 1);
    assert_ne!(got[0].id, pending[0], "a fresh lease");
    qp.cleanup().await;
}

/// After a shrink, a RELEASE that frees no capacity hands nothing over; the next one does.
async fn release_hands_off_nothing_above_a_shrunk_limit(kind: Kind) {
    let qp = Qp::new(kind).await;
    let ttl = Duration::from_secs(10);
    let (holder, waiter, observer) = (
        qp.pool("a", ttl).await,
        qp.pool("b", ttl).await,
        qp.pool("c", ttl).await,
    );
    holder.set_limit(2).await.unwrap();
    let held = ids(&holder.try_acquire(2).await.unwrap().leases);
    assert_eq!(held.len(), 2);
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            waiter
                .acquire(1, Instant::now() + Duration::from_secs(10))
                .await
                .unwrap()
        })
    };
    qp.until_starving(&observer).await;
    qp.until_waiting().await;
    observer.set_limit(1).await.unwrap();
    holder.release(&held[..1]).await.unwrap();
    let snap = observer.snapshot().await.unwrap();
    assert_eq!((snap.in_use, snap.limit), (1, 1), "{snap:?}");
    assert_eq!(qp.pending_hand_offs().await, 0);
    assert!(!task.is_finished());
    holder.release(&held[1..]).await.unwrap();
    let got = task.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(observer.in_use().await.unwrap(), 1);
    qp.cleanup().await;
}

/// Three keepers (workers), limit 8, many tasks: the cap holds, it is reached, and the Redis
/// calls per message stay well under one.
async fn keepers_cap_concurrency_with_few_round_trips(kind: Kind) {
    let qp = Qp::new(kind).await;
    let mut keepers = Vec::new();
    for i in 0..3 {
        let pool = qp.pool(&format!("k{i}"), Duration::from_secs(3)).await;
        keepers.push(LeaseKeeper::start(
            pool,
            KeeperConfig {
                max_held: 16,
                batch: 16,
                ..KeeperConfig::default()
            },
        ));
    }
    keepers[0].pool().set_limit(8).await.unwrap();
    let active = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let per_task = 60;
    let tasks_per_keeper = 16;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for keeper in &keepers {
        for _ in 0..tasks_per_keeper {
            let (keeper, active, max) = (keeper.clone(), active.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    let permit = keeper.acquire().await.unwrap();
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    let messages = (3 * tasks_per_keeper * per_task) as f64;
    let trips = sum(keepers.iter().map(|k| k.pool().round_trips()));
    let max = max.load(Ordering::SeqCst);
    println!(
        "{kind:?}: keepers: max concurrency {max}/8, {messages} msgs in {:.0} ms, \
         {:.3} Redis calls per message ({trips:?})",
        ms(elapsed),
        trips.total() as f64 / messages
    );
    assert!(max <= 8, "limit exceeded: {max}");
    assert!(max >= 7, "limit not reached: {max}");
    assert!(
        (trips.total() as f64) / messages < 0.3,
        "too many round trips: {trips:?} for {messages} messages"
    );
    for k in &keepers {
        k.close().await.unwrap();
    }
    assert_eq!(keepers[0].pool().in_use().await.unwrap(), 0);
    qp.cleanup().await;
}

/// Defect (found by CI in `keepers_cap_concurrency_with_few_round_trips`): a keeper closed
/// while its `BLPOP` had just popped a hand-off dropped the reply, and the lease stayed taken,
/// by nobody, until its TTL ran out. The fault: a proxy holds that reply back (a slow network)
/// and the keeper closes meanwhile. Single Redis only: the proxy fronts one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keeper_closed_while_a_hand_off_is_on_its_way_keeps_nothing() {
    let qp = Qp::new(Kind::Single).await;
    let ttl = Duration::from_secs(30);
    let holder = qp.pool("a", ttl).await;
    holder.set_limit(1).await.unwrap();
    let held = ids(&holder.try_acquire(1).await.unwrap().leases);

    let proxy = RedisProxy::start(var("QP_REDIS_URL").trim_start_matches("redis://")).await;
    let slow = TokenPool::connect(
        RedisSettings::from_parts(Some(&proxy.url()), None, None, false).unwrap(),
        qp.keys.clone(),
        PoolOptions {
            owner: "b".into(),
            lease_ttl: ttl,
            ..PoolOptions::default()
        },
    )
    .await
    .unwrap();
    let keeper = LeaseKeeper::start(slow, KeeperConfig::default());
    let wants = {
        let keeper = keeper.clone();
        tokio::spawn(async move { keeper.acquire().await.map(drop) })
    };
    qp.until_waiting().await;
    proxy.delay_next_pop(Duration::from_secs(2));
    holder.release(&held).await.unwrap();
    proxy.until_delayed(1).await;
    // Redis handed the slot to the keeper; the keeper has not heard of it yet.
    assert_eq!(holder.in_use().await.unwrap(), 1);
    keeper.close().await.unwrap();
    assert!(
        wants.await.unwrap().is_err(),
        "closed before it got a permit"
    );
    assert_eq!(
        holder.in_use().await.unwrap(),
        0,
        "the hand-off was lost with the reply"
    );
    let mut conn = qp.conn.clone();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}unblock:*", qp.keys.prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    qp.cleanup().await;
}

/// Limit 8 -> 2 -> 16 under load: the observed concurrency follows within a second, and no
/// running work is revoked (no lease is lost).
async fn keepers_follow_limit_changes(kind: Kind) {
    let qp = Qp::new(kind).await;
    let mut keepers = Vec::new();
    for i in 0..2 {
        let pool = qp.pool(&format!("k{i}"), Duration::from_millis(1500)).await;
        keepers.push(LeaseKeeper::start(
            pool,
            KeeperConfig {
                max_held: 12,
                batch: 12,
                ..KeeperConfig::default()
            },
        ));
    }
    let admin = qp.pool("operator", Duration::from_secs(5)).await;
    admin.set_limit(8).await.unwrap();
    let active = Arc::new(AtomicUsize::new(0));
    let window_max = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for keeper in &keepers {
        for _ in 0..12 {
            let (keeper, active, window_max, stop) = (
                keeper.clone(),
                active.clone(),
                window_max.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let permit = keeper.acquire().await.unwrap();
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    window_max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                }
            }));
        }
    }
    // The run measures windows of time, so it has to wait for them.
    let window = |from: Duration, len: Duration| {
        let window_max = window_max.clone();
        async move {
            tokio::time::sleep(from).await;
            window_max.store(0, Ordering::SeqCst);
            tokio::time::sleep(len).await;
            window_max.load(Ordering::SeqCst)
        }
    };
    let at_8 = window(Duration::from_millis(500), Duration::from_millis(500)).await;
    admin.set_limit(2).await.unwrap();
    let at_2 = window(Duration::from_secs(1), Duration::from_millis(500)).await;
    admin.set_limit(16).await.unwrap();
    let at_16 = window(Duration::from_secs(1), Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let lost: u64 = keepers.iter().map(|k| *k.lost().borrow()).sum();
    println!("{kind:?}: limit 8 -> max {at_8}; 2 -> max {at_2}; 16 -> max {at_16}; lost {lost}");
    assert!((7..=8).contains(&at_8), "{at_8}");
    assert!((1..=2).contains(&at_2), "{at_2}");
    assert!((14..=16).contains(&at_16), "{at_16}");
    assert_eq!(lost, 0);
    for k in &keepers {
        k.close().await.unwrap();
    }
    qp.cleanup().await;
}

/// Three keepers that want more than a limit of 2 allows sit at their fair shares; a limit
/// of 16 is in use within a few milliseconds, not at their next sync (a keeper at its share
/// learnt of the room only from the status a sync brings: 0-460 ms after the increase, evenly
/// spread with syncs every 500 ms). Three increases, each at another point of the sync cycle.
async fn keepers_at_their_share_use_a_limit_increase_at_once(kind: Kind) {
    let qp = Qp::new(kind).await;
    let admin = qp.pool("operator", Duration::from_secs(5)).await;
    admin.set_limit(2).await.unwrap();
    let mut keepers = Vec::new();
    for i in 0..3 {
        keepers.push(LeaseKeeper::start(
            qp.pool(&format!("s{i}"), Duration::from_secs(5)).await,
            KeeperConfig {
                max_held: 8,
                batch: 8,
                ..KeeperConfig::default()
            },
        ));
    }
    let active = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for keeper in &keepers {
        for _ in 0..8 {
            let (keeper, active, stop) = (keeper.clone(), active.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let permit = keeper.acquire().await.unwrap();
                    active.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                }
            }));
        }
    }
    let mut growths = Vec::new();
    for i in 0..3u64 {
        // At the limit of 2, then past a sync or two (every 500 ms), so that every keeper's
        // status says the limit is 2; each round ends at another point of the sync cycle.
        let at_2 = active.clone();
        eventually(Duration::from_secs(10), "the limit of 2 in use", || {
            let n = at_2.load(Ordering::SeqCst);
            async move { (n == 2).then_some(()) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(700 + 170 * i)).await;
        let t = Instant::now();
        admin.set_limit(16).await.unwrap();
        let at_16 = active.clone();
        eventually(Duration::from_secs(3), "the limit of 16 in use", || {
            let n = at_16.load(Ordering::SeqCst);
            async move { (n >= 16).then_some(()) }
        })
        .await;
        growths.push(t.elapsed());
        admin.set_limit(2).await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    println!("{kind:?}: 2 -> 16 in use after {growths:?}");
    for (i, g) in growths.iter().enumerate() {
        assert!(
            *g <= Duration::from_millis(150),
            "increase {i}: 16 in use only after {g:?} ({growths:?})"
        );
    }
    for k in &keepers {
        k.close().await.unwrap();
    }
    qp.cleanup().await;
}

/// Leases that vanish are reported through `lost()` and never handed out again; `close`
/// releases everything and fails later acquires.
async fn keeper_reports_lost_leases_and_closes(kind: Kind) {
    let qp = Qp::new(kind).await;
    let pool = qp.pool("k", Duration::from_secs(1)).await;
    pool.set_limit(4).await.unwrap();
    let keeper = LeaseKeeper::start(pool.clone(), KeeperConfig::default());
    let mut lost = keeper.lost();
    let permit = keeper.acquire().await.unwrap();
    assert_eq!(keeper.held(), 1);
    // Someone else frees our lease (as if it had expired and been reclaimed).
    pool.release(&[permit.lease_id().to_string()])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), lost.changed())
        .await
        .expect("loss reported within a renew interval")
        .unwrap();
    assert_eq!(*lost.borrow(), 1);
    assert_eq!(keeper.held(), 0);
    drop(permit); // a lost permit's return is a no-op
    assert_eq!(keeper.held(), 0);

    // Hold 3, return 2 to the local stock, then close: everything goes back to Redis.
    let permits = [
        keeper.acquire().await.unwrap(),
        keeper.acquire().await.unwrap(),
        keeper.acquire().await.unwrap(),
    ];
    let [p1, p2, p3] = permits;
    drop(p1);
    drop(p2);
    assert_eq!(keeper.held(), 3);
    assert_eq!(keeper.busy(), 1);
    assert_eq!(pool.in_use().await.unwrap(), 3);
    keeper.close().await.unwrap();
    assert_eq!(pool.in_use().await.unwrap(), 0);
    assert!(keeper.acquire().await.is_err());
    drop(p3);
    assert_eq!(pool.in_use().await.unwrap(), 0);
    qp.cleanup().await;
}

/// A busy worker holding the whole budget gives a fair share to a newcomer.
async fn keepers_share_fairly(kind: Kind) {
    let qp = Qp::new(kind).await;
    let config = KeeperConfig {
        max_held: 16,
        batch: 16,
        ..KeeperConfig::default()
    };
    let ttl = Duration::from_millis(1500);
    let a = LeaseKeeper::start(qp.pool("a", ttl).await, config.clone());
    let b = LeaseKeeper::start(qp.pool("b", ttl).await, config);
    a.pool().set_limit(8).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let busy_loop = |keeper: LeaseKeeper, stop: Arc<AtomicBool>| async move {
        while !stop.load(Ordering::SeqCst) {
            let permit = keeper.acquire().await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
            drop(permit);
        }
    };
    let mut tasks = Vec::new();
    for _ in 0..12 {
        tasks.push(tokio::spawn(busy_loop(a.clone(), stop.clone())));
    }
    // a takes everything; then b arrives with work of its own.
    let first = a.acquire().await.unwrap();
    drop(first);
    let arrived = Instant::now();
    let b_first = b.acquire().await.unwrap();
    let waited = arrived.elapsed();
    drop(b_first);
    for _ in 0..12 {
        tasks.push(tokio::spawn(busy_loop(b.clone(), stop.clone())));
    }
    // Let the shares settle (one or two sync intervals), then look.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (held_a, held_b) = (a.held(), b.held());
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "{kind:?}: newcomer's first permit after {:.0} ms; shares a {held_a} / b {held_b}",
        ms(waited)
    );
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    assert!(held_a >= 3 && held_b >= 3, "a {held_a} / b {held_b}");
    assert!(held_a + held_b <= 8);
    a.close().await.unwrap();
    b.close().await.unwrap();
    qp.cleanup().await;
}
