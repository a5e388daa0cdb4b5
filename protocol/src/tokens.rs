//! The global token pool: a lease semaphore in Redis. The scripts are in `lua/token_*.lua`; the
//! worker's per-process lease keeper (`qp-worker`'s `keeper` module) builds on [`TokenPool`].
//!
//! # Why leases, not a list of tokens
//!
//! The obvious design keeps N tokens in a Redis list: `BLPOP` one before a message, `RPUSH` it
//! back afterwards. A worker killed between the two loses the token for good, and every message
//! costs two extra round trips. Here a permit is a *lease*: an id in the sorted set `leases`,
//! scored by the moment it expires (Redis server time, read with `TIME` inside the scripts, so
//! client clocks do not matter). A holder renews its leases; a dead holder stops renewing and
//! its leases fall out of the set on the next script run. The number of leases is capped by
//! `limit`, which the operator writes.
//!
//! # The scripts
//!
//! All state changes are Lua scripts (sent as `EVALSHA`, falling back to loading the script), so
//! each is atomic and costs one round trip. Every key lives under one hash tag (see
//! [`crate::keys`]), so the scripts work on Redis Cluster. They take the seven keys of
//! [`Keys::token_keys`] in order. Each first drops expired leases (and expired `owners` /
//! `starving` marks, ended waits, and hand-offs whose lease expired) and, if that freed
//! capacity, pushes wake-ups.
//!
//! Every script's first argument is the limit the caller saw last (see "When Redis loses its
//! data" below); the arguments listed here follow it.
//!
//! * ACQUIRE `(owner, k, ttl_ms, held, id_prefix, first, wait_ms, done_ticket)`: first takes
//!   up to `k` hand-offs no waiter popped, then grants `g = min(k, limit - in_use)` new leases
//!   named `<id_prefix><first>`, `<id_prefix><first + 1>`, ...; while another owner is
//!   starving, no more than `share - held`. When nothing is granted and `wait_ms > 0`, the
//!   caller is registered as a waiter with the ticket `<id_prefix><first + k>` until `wait_ms`
//!   (plus [`WAITER_SLACK`]) from now; `done_ticket` drops the caller's previous registration.
//!   Reply `[wait, limit, in_use, owners, starving_others, share, id...]` where `wait` is 0 when
//!   something was granted, else the milliseconds until the earliest lease expires, -1 when no
//!   lease exists (the limit itself is the obstacle), or -2 when the fair share held the
//!   caller back. A `k` the caller could not get marks it *starving* for two seconds.
//! * RENEW `(owner, ttl_ms, id...)`: extends the ids that still exist. Reply
//!   `[limit, in_use, owners, starving_others, share, lost_id...]`.
//! * RELEASE `(id...)`: removes the ids and hands each freed slot to a registered waiter (see
//!   "Waiting without polling"), or, with none left, pushes a wake-up for it; never more than
//!   the free capacity (after a shrink, releases free nothing). Reply `[removed, woken,
//!   handed_off]`.
//! * WITHDRAW `(owner, ttl_ms, ticket)`: a waiter that stops waiting drops its registration
//!   and a hand-off made to it that nobody popped (its slot goes on as a RELEASE's would).
//! * SETLIMIT `(n)`: sets `limit`; growth pushes `new - old` wake-ups, a shrink touches
//!   no lease (running work drains). Reply `[old_limit, woken]`.
//! * SNAPSHOT `(owner or "")`: reply `[limit, in_use, owners, starving, share, wake_len,
//!   next_expiry_ms or -1]`.
//!
//! `share` is the caller's fair share: the limit split over the interested owners so that the
//! shares add up to the limit, the remainder going to owners in turn (see
//! `lua/token_prelude.lua`, and [`SHARE_TURN`]).
//!
//! `wake` is a list used only to wake blocked acquirers. It is trimmed to the free capacity
//! (at most [`MAX_WAKE`]) by every ACQUIRE and whenever wake-ups are pushed, so stale wake-ups
//! never pile up and a waiter's `BLPOP` really blocks when nothing is free.
//!
//! # When Redis loses its data
//!
//! A failover to a replica that missed the last writes, or a restart without persistence, can
//! lose leases, the limit, or both. Two rules keep the ceiling meaningful then:
//!
//! * Lease ids are made by the caller: `<owner>:<random per process>-<local counter>`. A
//!   counter kept in Redis (as version 0.1 did) can go back after a failover and grant a worker
//!   an id it already holds; the two permits then count as one lease and the ceiling is
//!   exceeded for good. Ids made this way never repeat, whatever Redis remembers.
//! * A missing `limit` key is not a limit of 0: a pool made with
//!   [`PoolOptions::keep_last_limit`] (the workers') passes the limit it saw last, and the
//!   scripts use it until the operator writes the key again on its next poll. Lost leases are
//!   reported by RENEW and no new work starts under them, so admission exceeds the limit by
//!   at most the work that was already running when the data was lost.
//!
//! # Waiting without polling
//!
//! When ACQUIRE grants nothing, [`TokenPool::acquire`] blocks in `BLPOP granted wake` on a
//! dedicated connection (see [`crate::redis_conn`]) with a timeout of min(time until the
//! earliest lease expires, [`WAKE_CHECK`], time left). A dead holder's lease is reclaimed when
//! it expires, because that is exactly when the waiter's timeout ends. A limit increase (and
//! capacity that expired) pushes wake-ups: hints, on which a woken waiter retries ACQUIRE. The
//! one-second cap bounds the damage of a lost wake-up (a waiter cancelled after popping one).
//!
//! A RELEASE does better than a hint: the ACQUIRE that found the pool full registered its
//! caller in `waiters` under a *ticket*, a lease id the caller made and never uses otherwise.
//! RELEASE turns a freed slot into the lease named by a registered waiter's ticket and pushes
//! it to `granted`; the blocked waiter pops it and holds a permit without asking again: from a
//! release to the waiter's permit is the release's round trip and the pop, not a second
//! ACQUIRE. Any blocked waiter may pop any hand-off (Redis serves the longest-blocked first);
//! each hand-off was made after the popper's own ACQUIRE, which took every hand-off left
//! over, so the popper knows a moment before which the lease cannot expire ([`Ticket::since`]).
//! What keeps a hand-off from being lost:
//! * a registration ends with the wait it announced, and the next ACQUIRE of its caller drops
//!   it; a waiter that stops otherwise (cancelled, or handed another waiter's lease) WITHDRAWs;
//! * a hand-off that no blocked waiter pops goes to the next ACQUIRE of anyone, and one that
//!   nobody takes expires with its TTL like any lease (a waiter killed right after registering
//!   costs at most that);
//! * the ceiling is not at stake: a hand-off is a lease from the moment it is made, made only
//!   into free capacity.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use redis::{Script, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::redis_conn::{Conn, MAX_BLOCK, RESPONSE_TIMEOUT, RedisSettings};

/// The longest a waiter blocks before it retries ACQUIRE even without a wake-up.
pub const WAKE_CHECK: Duration = Duration::from_secs(1);

/// Default lease time to live.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// The most wake-ups kept in the `wake` list (and pushed by one script run).
pub const MAX_WAKE: u64 = 1024;

/// How long a waiter's registration outlives the wait it announced: the time its `BLPOP`
/// takes to reach Redis after the ACQUIRE reply. A registration that outlives its waiter only
/// costs a hand-off that the next ACQUIRE adopts (see `lua/token_acquire.lua`).
pub const WAITER_SLACK: Duration = Duration::from_millis(100);

/// Idle dedicated `BLPOP` connections a pool keeps for reuse; more are closed after use.
const MAX_IDLE_BLOCKING: usize = 8;

/// How long an owner's "starving" mark lasts after its last unsatisfied ACQUIRE. Waiters retry
/// at least every [`WAKE_CHECK`], so an owner that still waits keeps its mark.
pub const STARVING_MARK: Duration = Duration::from_secs(2);

/// How often the owners that get one lease more than the others (when the limit does not divide
/// evenly) change. Long enough that leases are not shuffled between workers all the time, short
/// enough that with fewer leases than workers nobody waits long for its turn.
pub const SHARE_TURN: Duration = Duration::from_secs(5);

/// A token script: the constants the Rust side owns, the shared prelude
/// (`lua/token_prelude.lua`), then the script's own body. Built once per process.
fn token_script(body: &str) -> Script {
    Script::new(&format!(
        "local MAX_WAKE = {MAX_WAKE}\nlocal STARVING_MS = {}\nlocal SHARE_TURN_MS = {}\n\
         local WAITER_SLACK_MS = {}\n{}{body}",
        STARVING_MARK.as_millis(),
        SHARE_TURN.as_millis(),
        WAITER_SLACK.as_millis(),
        include_str!("lua/token_prelude.lua"),
    ))
}

struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    withdraw: Script,
    set_limit: Script,
    snapshot: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    acquire: token_script(include_str!("lua/token_acquire.lua")),
    renew: token_script(include_str!("lua/token_renew.lua")),
    release: token_script(include_str!("lua/token_release.lua")),
    withdraw: token_script(include_str!("lua/token_withdraw.lua")),
    set_limit: token_script(include_str!("lua/token_set_limit.lua")),
    snapshot: token_script(include_str!("lua/token_snapshot.lua")),
});

/// One granted permit: a lease id, valid until `valid_until` unless renewed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The id in the `leases` sorted set, `<owner>:<n>`.
    pub id: String,
    /// When the lease expires at the latest, on this machine's clock: the moment the request
    /// was sent plus the TTL (the server's expiry is never earlier).
    pub valid_until: Instant,
}

/// The pool's state as seen by one script run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// The current limit (0 when unset).
    pub limit: u64,
    /// Leases that exist right now.
    pub in_use: u64,
    /// Owners that recently asked for or renewed leases.
    pub owners: u64,
    /// Owners, other than the caller, whose last ACQUIRE was not fully granted.
    pub starving_others: u64,
    /// The caller's fair share: the limit split over the interested owners so that the shares
    /// add up to the limit (see `lua/token_prelude.lua`); what it may keep while others starve.
    pub share: u64,
}

/// The answer to one ACQUIRE.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The granted leases (possibly none).
    pub leases: Vec<Lease>,
    /// When nothing was granted: how long until the earliest lease expires, or `None` when no
    /// lease exists at all (only a release or a higher limit can help).
    pub retry_after: Option<Duration>,
    /// Nothing was granted because the caller holds its fair share while another owner
    /// starves: waiting for a wake-up would take it from that owner, so don't; ask again
    /// after the next status refresh.
    pub held_back: bool,
    /// The pool after the grant.
    pub status: PoolStatus,
    /// When nothing was granted and the caller announced a wait: its place among the waiters,
    /// to pass to [`TokenPool::wait_for_wake`] and, if that did not hand it a lease, to the
    /// next ACQUIRE.
    pub ticket: Option<Ticket>,
}

/// A registered waiter: a RELEASE that frees a slot while the waiter blocks hands the slot
/// over as a lease named `id`, so the waiter holds a permit without another ACQUIRE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The name of the lease a hand-off creates: a lease id this pool never uses otherwise.
    pub id: String,
    /// When the registering ACQUIRE was sent: a hand-off happens after it, so its lease is
    /// valid until at least this moment plus the TTL.
    pub since: Instant,
}

/// What ended a [`TokenPool::wait_for_wake`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wake {
    /// A RELEASE handed a freed slot over: the caller holds this lease.
    Granted(Lease),
    /// A wake-up: capacity may be free, ACQUIRE again.
    Woken,
    /// The wait ran out.
    TimedOut,
}

/// The answer to one RENEW.
#[derive(Clone, Debug)]
pub struct Renewal {
    /// Ids that no longer existed (expired or released by someone else).
    pub lost: Vec<String>,
    /// The renewed leases are valid until at least this moment.
    pub valid_until: Instant,
    /// The pool after the renewal.
    pub status: PoolStatus,
}

/// The pool's state, for the operator, metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The current limit (0 when unset).
    pub limit: u64,
    /// Leases that exist right now.
    pub in_use: u64,
    /// Owners that recently asked for or renewed leases.
    pub owners: u64,
    /// Owners whose last ACQUIRE was not fully granted: demand beyond the limit.
    pub starving: u64,
    /// Wake-ups waiting in the `wake` list.
    pub wake_len: u64,
    /// Time until the earliest lease expires, if any lease exists.
    pub next_expiry: Option<Duration>,
}

/// Redis calls made through one [`TokenPool`] (and its clones), for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundTrips {
    /// ACQUIRE script runs.
    pub acquire: u64,
    /// RENEW script runs.
    pub renew: u64,
    /// RELEASE and WITHDRAW script runs.
    pub release: u64,
    /// `BLPOP` calls on `granted` and `wake`.
    pub blpop: u64,
    /// SETLIMIT, SNAPSHOT and `GET limit` calls.
    pub other: u64,
}

impl RoundTrips {
    /// All calls together.
    pub fn total(&self) -> u64 {
        self.acquire + self.renew + self.release + self.blpop + self.other
    }
}

#[derive(Default)]
struct Counters {
    acquire: AtomicU64,
    renew: AtomicU64,
    release: AtomicU64,
    blpop: AtomicU64,
    other: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Options of a [`TokenPool`].
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Who holds the leases: unique per worker process (lease ids start with it). Empty means
    /// a random id.
    pub owner: String,
    /// Lease time to live: how long the permits of a killed worker stay taken.
    pub lease_ttl: Duration,
    /// While the `limit` key is missing (Redis lost its data), admit under the last limit this
    /// pool saw instead of 0. Workers set it; the operator, which rewrites the key, does not.
    pub keep_last_limit: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            owner: String::new(),
            lease_ttl: DEFAULT_LEASE_TTL,
            keep_last_limit: false,
        }
    }
}

/// The token pool of one QueueProcessor: a handle to the lease semaphore in Redis. Cheap to
/// clone; clones share the connection, the idle blocking connections and the counters.
#[derive(Clone)]
pub struct TokenPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    conn: Conn,
    settings: RedisSettings,
    keys: Keys,
    token_keys: [String; 7],
    owner: String,
    /// `<owner>:<random>-`: lease ids are this and a number from `next_id`.
    id_prefix: String,
    next_id: AtomicU64,
    lease_ttl: Duration,
    keep_last_limit: bool,
    /// The limit of the last script reply, `u64::MAX` before the first one.
    last_limit: AtomicU64,
    /// Idle dedicated connections for `BLPOP`, reused by the next waiter.
    blocking: Mutex<Vec<Conn>>,
    counters: Counters,
}

impl std::fmt::Debug for TokenPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPool")
            .field("keys", &self.inner.keys.prefix())
            .field("owner", &self.inner.owner)
            .field("lease_ttl", &self.inner.lease_ttl)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data behind (every critical
    // section is a few plain updates), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TokenPool {
    /// A pool on an existing shared connection. `settings` is used to open the dedicated
    /// connections that waiting needs.
    pub fn new(conn: Conn, settings: RedisSettings, keys: Keys, options: PoolOptions) -> Self {
        let owner = if options.owner.is_empty() {
            format!("w-{}", uuid::Uuid::new_v4().simple())
        } else {
            options.owner
        };
        // 64 random bits per process: two processes with the same owner name (a restarted
        // worker) never share an id, and the counter makes them unique within one.
        let id_prefix = format!("{owner}:{:016x}-", uuid::Uuid::new_v4().as_u64_pair().0);
        TokenPool {
            inner: Arc::new(PoolInner {
                conn,
                settings,
                token_keys: keys.token_keys(),
                keys,
                owner,
                id_prefix,
                next_id: AtomicU64::new(1),
                keep_last_limit: options.keep_last_limit,
                last_limit: AtomicU64::new(u64::MAX),
                lease_ttl: options.lease_ttl.max(Duration::from_millis(1)),
                blocking: Mutex::new(Vec::new()),
                counters: Counters::default(),
            }),
        }
    }

    /// Connects and returns a pool with its own shared connection.
    pub async fn connect(
        settings: RedisSettings,
        keys: Keys,
        options: PoolOptions,
    ) -> Result<Self> {
        let conn = settings.connect().await?;
        Ok(Self::new(conn, settings, keys, options))
    }

    /// The keys of this pool.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The owner name leases are granted to.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The lease time to live.
    pub fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl
    }

    /// The shared connection.
    pub fn conn(&self) -> &Conn {
        &self.inner.conn
    }

    /// Redis calls made so far through this pool and its clones.
    pub fn round_trips(&self) -> RoundTrips {
        let c = &self.inner.counters;
        RoundTrips {
            acquire: c.acquire.load(Ordering::Relaxed),
            renew: c.renew.load(Ordering::Relaxed),
            release: c.release.load(Ordering::Relaxed),
            blpop: c.blpop.load(Ordering::Relaxed),
            other: c.other.load(Ordering::Relaxed),
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.inner.lease_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(
        &self,
        script: &Script,
        name: &'static str,
        args: &[&str],
        extra: &[String],
    ) -> Result<Vec<Value>> {
        let mut invocation = script.prepare_invoke();
        for key in &self.inner.token_keys {
            invocation.key(key);
        }
        let last = self.inner.last_limit.load(Ordering::Relaxed);
        if self.inner.keep_last_limit && last != u64::MAX {
            invocation.arg(last);
        } else {
            invocation.arg("");
        }
        for arg in args {
            invocation.arg(*arg);
        }
        for arg in extra {
            invocation.arg(arg);
        }
        let mut conn = self.inner.conn.clone();
        match invocation.invoke_async::<Value>(&mut conn).await? {
            Value::Array(items) => Ok(items),
            other => Err(protocol(name, format!("expected an array, got {other:?}"))),
        }
    }

    /// Remembers the limit a script reply reported (see [`PoolOptions::keep_last_limit`]).
    fn saw(&self, status: PoolStatus) -> PoolStatus {
        self.inner.last_limit.store(status.limit, Ordering::Relaxed);
        status
    }

    /// One ACQUIRE: up to `k` leases, without waiting.
    pub async fn try_acquire(&self, k: usize) -> Result<Grant> {
        self.try_acquire_holding(k, 0).await
    }

    /// One ACQUIRE by an owner that already holds `held` leases: while another owner is
    /// starving, the grant stops at the fair share (see [`Grant::held_back`]).
    pub async fn try_acquire_holding(&self, k: usize, held: usize) -> Result<Grant> {
        self.try_acquire_or_wait(k, held, Duration::ZERO, None)
            .await
    }

    /// One ACQUIRE that, when nothing is granted, registers the caller as a waiter for `wait`
    /// (see [`Grant::ticket`]); the caller then blocks in [`TokenPool::wait_for_wake`] with the
    /// ticket. `done` is the caller's previous ticket, if the wait it was for did not consume
    /// it: the registration is dropped, so no hand-off goes to a waiter that no longer blocks.
    pub async fn try_acquire_or_wait(
        &self,
        k: usize,
        held: usize,
        wait: Duration,
        done: Option<&Ticket>,
    ) -> Result<Grant> {
        let k = k.max(1);
        let sent = Instant::now();
        bump(&self.inner.counters.acquire);
        // Numbers not granted are simply never used; the one after the grants names the
        // ticket.
        let first = self
            .inner
            .next_id
            .fetch_add(k as u64 + 1, Ordering::Relaxed);
        let wait_ms = if wait.is_zero() {
            0
        } else {
            wait.as_millis().max(1)
        };
        let reply = self
            .run(
                &SCRIPTS.acquire,
                "ACQUIRE",
                &[
                    &self.inner.owner,
                    &k.to_string(),
                    &self.ttl_ms().to_string(),
                    &held.to_string(),
                    &self.inner.id_prefix,
                    &first.to_string(),
                    &wait_ms.to_string(),
                    done.map_or("", |t| t.id.as_str()),
                ],
                &[],
            )
            .await?;
        let wait_reply = int_at(&reply, 0, "ACQUIRE")?;
        let status = self.saw(status_at(&reply, 1, "ACQUIRE")?);
        let valid_until = sent + self.inner.lease_ttl;
        let leases = reply[6..]
            .iter()
            .map(|v| {
                Ok(Lease {
                    id: string(v, "ACQUIRE")?,
                    valid_until,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let held_back = wait_reply == -2;
        let retry_after =
            (leases.is_empty() && wait_reply > 0).then(|| Duration::from_millis(wait_reply as u64));
        // The script registers exactly when nothing was granted, the caller was not held back
        // and it announced a wait.
        let ticket = (leases.is_empty() && !held_back && wait_ms > 0).then(|| Ticket {
            id: format!("{}{}", self.inner.id_prefix, first + k as u64),
            since: sent,
        });
        Ok(Grant {
            leases,
            retry_after,
            held_back,
            status,
            ticket,
        })
    }

    /// Acquires between 1 and `k` leases, waiting until `deadline` if none is free. Returns
    /// an empty vector only when the deadline passed.
    ///
    /// Not cancel-safe in one respect: dropping the future while the ACQUIRE script runs may
    /// leave granted leases that nobody holds; they expire after the TTL.
    pub async fn acquire(&self, k: usize, deadline: Instant) -> Result<Vec<Lease>> {
        Ok(self.acquire_until(k, deadline, None).await?.leases)
    }

    /// Like [`TokenPool::acquire`], returning the whole last [`Grant`], and giving up with
    /// [`Error::Closed`] when `cancel` fires (unless a hand-off arrived at that moment: that
    /// lease is returned, see [`TokenPool::wait_for_wake`]). Also returns early, empty-handed, when the grant
    /// was [held back](Grant::held_back) for fairness (only possible when `k` exceeds the fair
    /// share). Cancellation is only observed while blocked in
    /// `BLPOP`, never in the middle of ACQUIRE, so no lease is lost to it.
    pub async fn acquire_until(
        &self,
        k: usize,
        deadline: Instant,
        cancel: Option<&CancellationToken>,
    ) -> Result<Grant> {
        let mut done: Option<Ticket> = None;
        loop {
            let now = Instant::now();
            let wait = (deadline.saturating_duration_since(now)).min(WAKE_CHECK);
            let mut grant = self.try_acquire_or_wait(k, 0, wait, done.as_ref()).await?;
            let now = Instant::now();
            if !grant.leases.is_empty() || grant.held_back || now >= deadline {
                return Ok(grant);
            }
            let mut wait = (deadline - now).min(WAKE_CHECK);
            if let Some(expiry) = grant.retry_after {
                wait = wait.min(expiry);
            }
            let ticket = grant.ticket.take();
            let woke = self
                .wait_for_wake(wait.max(Duration::from_millis(1)), cancel, ticket.as_ref())
                .await;
            match woke {
                Ok(Wake::Granted(lease)) => {
                    // A hand-off made for another waiter: this one's registration must not
                    // catch a slot nobody will take.
                    if let Some(t) = ticket.filter(|t| t.id != lease.id) {
                        self.withdraw(&t).await?;
                    }
                    grant.leases.push(lease);
                    return Ok(grant);
                }
                Ok(Wake::Woken | Wake::TimedOut) => done = ticket,
                Err(e) => {
                    if let Some(t) = &ticket {
                        // Best effort: a registration left behind ends with its wait anyway.
                        let _ = self.withdraw(t).await;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Blocks for at most `wait` on a dedicated connection in `BLPOP granted wake`: a lease
    /// handed over by a RELEASE (valid from the `ticket`'s ACQUIRE on), or a wake-up. Without a
    /// ticket the caller is not registered and only waits for a wake-up.
    ///
    /// When `cancel` fires, the wait ends with [`Error::Closed`], unless the `BLPOP` had
    /// popped a hand-off at that moment: then the lease is returned, and the caller holds it.
    /// Dropping the `BLPOP` instead would lose such a hand-off with its reply, and the slot
    /// with it until the lease's TTL runs out; so the wait also listens on a key of its own
    /// ([`Keys::unblock`]), and giving up pushes to that key and reads the reply.
    pub async fn wait_for_wake(
        &self,
        wait: Duration,
        cancel: Option<&CancellationToken>,
        ticket: Option<&Ticket>,
    ) -> Result<Wake> {
        let wait = wait.min(MAX_BLOCK);
        let mut conn = self.blocking_conn().await?;
        // BLPOP takes seconds as a decimal number (Redis >= 6); 0 would mean "forever".
        let timeout = format!("{:.3}", wait.as_secs_f64().max(0.001));
        let granted = self.inner.keys.granted();
        let unblock = cancel.map(|_| {
            let token = uuid::Uuid::new_v4().simple().to_string();
            self.inner.keys.unblock(&token)
        });
        let mut cmd = redis::cmd("BLPOP");
        if ticket.is_some() {
            cmd.arg(&granted);
        }
        cmd.arg(self.inner.keys.wake());
        if let Some(key) = &unblock {
            cmd.arg(key);
        }
        cmd.arg(timeout);
        bump(&self.inner.counters.blpop);
        let (popped, cancelled): (Option<(String, String)>, bool) = {
            let query = cmd.query_async(&mut conn);
            match (cancel, &unblock) {
                (Some(cancel), Some(key)) => {
                    tokio::pin!(query);
                    tokio::select! {
                        r = &mut query => (r?, false),
                        _ = cancel.cancelled() => (self.end_wait(key, query).await?, true),
                    }
                }
                _ => (query.await?, false),
            }
        };
        let mut idle = lock(&self.inner.blocking);
        if idle.len() < MAX_IDLE_BLOCKING {
            idle.push(conn);
        }
        drop(idle);
        Ok(match (popped, ticket) {
            (Some((key, handed)), Some(ticket)) if key == granted => {
                Wake::Granted(handed_lease(&handed, ticket)?)
            }
            _ if cancelled => return Err(Error::Closed),
            (Some(_), _) => Wake::Woken,
            (None, _) => Wake::TimedOut,
        })
    }

    /// Ends a blocked `BLPOP` that listens on `unblock` by pushing to that key, and returns
    /// what the `BLPOP` popped. If the push fails (Redis unreachable), or the reply does not
    /// come within a round trip's timeout, the wait is simply dropped: [`Error::Closed`].
    async fn end_wait<F>(
        &self,
        unblock: &str,
        query: Pin<&mut F>,
    ) -> Result<Option<(String, String)>>
    where
        F: Future<Output = redis::RedisResult<Option<(String, String)>>>,
    {
        let mut conn = self.inner.conn.clone();
        // The expiry covers a caller that dies between the push and the clean-up below.
        let pushed: redis::RedisResult<()> = redis::pipe()
            .cmd("RPUSH")
            .arg(unblock)
            .arg("stop")
            .ignore()
            .cmd("PEXPIRE")
            .arg(unblock)
            .arg(MAX_BLOCK.as_millis() as u64)
            .ignore()
            .query_async(&mut conn)
            .await;
        if let Err(error) = pushed {
            tracing::debug!(%error, "could not end a token wait; dropping it");
            return Err(Error::Closed);
        }
        let popped = match tokio::time::timeout(RESPONSE_TIMEOUT, query).await {
            Ok(popped) => popped?,
            Err(_) => return Err(Error::Closed),
        };
        if popped.as_ref().is_none_or(|(key, _)| key != unblock) {
            // The BLPOP ended otherwise before the push reached it: the push is left over.
            let _: redis::RedisResult<()> =
                redis::cmd("DEL").arg(unblock).query_async(&mut conn).await;
        }
        Ok(popped)
    }

    async fn blocking_conn(&self) -> Result<Conn> {
        let idle = lock(&self.inner.blocking).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => self.inner.settings.connect_blocking().await,
        }
    }

    /// Renews the given leases for another TTL. Returns the ids that were lost.
    pub async fn renew(&self, ids: &[String]) -> Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.renew_with_status(ids).await?.lost)
    }

    /// Renews the given leases (possibly none, to just read the status) in one call.
    pub async fn renew_with_status(&self, ids: &[String]) -> Result<Renewal> {
        let sent = Instant::now();
        bump(&self.inner.counters.renew);
        let reply = self
            .run(
                &SCRIPTS.renew,
                "RENEW",
                &[&self.inner.owner, &self.ttl_ms().to_string()],
                ids,
            )
            .await?;
        let status = self.saw(status_at(&reply, 0, "RENEW")?);
        let lost = reply[5..]
            .iter()
            .map(|v| string(v, "RENEW"))
            .collect::<Result<Vec<_>>>()?;
        Ok(Renewal {
            lost,
            valid_until: sent + self.inner.lease_ttl,
            status,
        })
    }

    /// Gives leases back and wakes as many waiters as slots were freed. Returns how many of
    /// the ids still existed.
    pub async fn release(&self, ids: &[String]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        bump(&self.inner.counters.release);
        let reply = self.run(&SCRIPTS.release, "RELEASE", &[], ids).await?;
        Ok(int_at(&reply, 0, "RELEASE")?.max(0) as u64)
    }

    /// A waiter that stops waiting: drops its registration, and the hand-off made to it if no
    /// waiter popped it (that slot goes to the next waiter). Returns how many leases that
    /// freed (0 or 1).
    pub async fn withdraw(&self, ticket: &Ticket) -> Result<u64> {
        bump(&self.inner.counters.release);
        let reply = self
            .run(
                &SCRIPTS.withdraw,
                "WITHDRAW",
                &[&self.inner.owner, &self.ttl_ms().to_string(), &ticket.id],
                &[],
            )
            .await?;
        Ok(int_at(&reply, 0, "WITHDRAW")?.max(0) as u64)
    }

    /// Sets the limit. Growth wakes waiters; a shrink lets existing leases drain. Returns the
    /// previous limit.
    pub async fn set_limit(&self, limit: u64) -> Result<u64> {
        bump(&self.inner.counters.other);
        let reply = self
            .run(&SCRIPTS.set_limit, "SETLIMIT", &[&limit.to_string()], &[])
            .await?;
        Ok(int_at(&reply, 0, "SETLIMIT")?.max(0) as u64)
    }

    /// The current limit (0 when unset).
    pub async fn limit(&self) -> Result<u64> {
        bump(&self.inner.counters.other);
        let mut conn = self.inner.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.inner.keys.limit())
            .query_async(&mut conn)
            .await?;
        Ok(raw.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0))
    }

    /// Leases that exist right now, after dropping expired ones.
    pub async fn in_use(&self) -> Result<u64> {
        Ok(self.snapshot().await?.in_use)
    }

    /// The pool's state, after dropping expired leases.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        bump(&self.inner.counters.other);
        let reply = self.run(&SCRIPTS.snapshot, "SNAPSHOT", &[""], &[]).await?;
        let status = status_at(&reply, 0, "SNAPSHOT")?;
        let next = int_at(&reply, 6, "SNAPSHOT")?;
        Ok(Snapshot {
            limit: status.limit,
            in_use: status.in_use,
            owners: status.owners,
            starving: status.starving_others,
            wake_len: int_at(&reply, 5, "SNAPSHOT")?.max(0) as u64,
            next_expiry: (next >= 0).then(|| Duration::from_millis(next as u64)),
        })
    }
}

/// The lease in a `granted` entry, `<ttl_ms> <id>`: the TTL is the one of the waiter it was
/// handed to (not necessarily this one: any blocked waiter pops any hand-off). It was made
/// after the popping waiter's own ACQUIRE (which takes every hand-off left over), so it is
/// valid until at least then plus its TTL.
fn handed_lease(entry: &str, ticket: &Ticket) -> Result<Lease> {
    let parsed = entry
        .split_once(' ')
        .and_then(|(ttl, id)| Some((ttl.parse::<u64>().ok()?, id)));
    match parsed {
        Some((ttl_ms, id)) if !id.is_empty() => Ok(Lease {
            id: id.to_owned(),
            valid_until: ticket.since + Duration::from_millis(ttl_ms),
        }),
        _ => Err(protocol(
            "BLPOP",
            format!("a hand-off is not '<ttl_ms> <id>': {entry:?}"),
        )),
    }
}

fn protocol(script: &'static str, detail: impl Into<String>) -> Error {
    Error::Protocol {
        script,
        detail: detail.into(),
    }
}

fn int_at(reply: &[Value], i: usize, script: &'static str) -> Result<i64> {
    match reply.get(i) {
        Some(Value::Int(n)) => Ok(*n),
        other => Err(protocol(
            script,
            format!("expected an integer at {i}, got {other:?}"),
        )),
    }
}

fn status_at(reply: &[Value], i: usize, script: &'static str) -> Result<PoolStatus> {
    let n = |j| int_at(reply, i + j, script).map(|v| v.max(0) as u64);
    Ok(PoolStatus {
        limit: n(0)?,
        in_use: n(1)?,
        owners: n(2)?,
        starving_others: n(3)?,
        share: n(4)?,
    })
}

fn string(v: &Value, script: &'static str) -> Result<String> {
    match v {
        Value::BulkString(b) => {
            String::from_utf8(b.clone()).map_err(|_| protocol(script, "lease id is not UTF-8"))
        }
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(protocol(
            script,
            format!("expected a lease id, got {other:?}"),
        )),
    }
}
