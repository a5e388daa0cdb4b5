//! The global token pool: a lease semaphore in Redis, and the per-worker [`LeaseKeeper`].
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
//! [`crate::keys`]), so the scripts work on Redis Cluster. They take the six keys of
//! [`Keys::token_keys`] in order. Each first drops expired leases (and expired `owners` /
//! `starving` marks) and, if that freed capacity, pushes wake-ups.
//!
//! * [`ACQUIRE_LUA`] `(owner, k, ttl_ms, held)`: grants `g = min(k, limit - in_use)` new lease
//!   ids `owner:<n>`; while another owner is starving, no more than `fair share - held`.
//!   Reply `[wait, limit, in_use, owners, starving_others, id...]` where `wait` is 0 when
//!   something was granted, else the milliseconds until the earliest lease expires, -1 when no
//!   lease exists (the limit itself is the obstacle), or -2 when the fair share held the
//!   caller back. A `k` the caller could not get marks it *starving* for two seconds.
//! * [`RENEW_LUA`] `(owner, ttl_ms, id...)`: extends the ids that still exist. Reply
//!   `[limit, in_use, owners, starving_others, lost_id...]`.
//! * [`RELEASE_LUA`] `(id...)`: removes the ids and pushes one wake-up per freed slot, but never
//!   more than the free capacity (after a shrink, releases free nothing). Reply
//!   `[removed, woken]`.
//! * [`SETLIMIT_LUA`] `(n)`: sets `limit`; growth pushes `new - old` wake-ups, a shrink touches
//!   no lease (running work drains). Reply `[old_limit, woken]`.
//! * [`SNAPSHOT_LUA`] `(owner or "")`: reply `[limit, in_use, owners, starving, wake_len,
//!   next_expiry_ms or -1]`.
//!
//! `wake` is a list used only to wake blocked acquirers. It is trimmed to the free capacity
//! (at most [`MAX_WAKE`]) by every ACQUIRE and whenever wake-ups are pushed, so stale wake-ups
//! never pile up and a waiter's `BLPOP` really blocks when nothing is free.
//!
//! # Waiting without polling
//!
//! When ACQUIRE grants nothing, [`TokenPool::acquire`] blocks in `BLPOP wake` on a dedicated
//! connection (see [`crate::redis_conn`]) with a timeout of min(time until the earliest lease
//! expires, [`WAKE_CHECK`], time left). A release or a limit increase wakes it at once; a dead
//! holder's lease is reclaimed when it expires, because that is exactly when the waiter's
//! timeout ends. The one-second cap only bounds the damage of a lost wake-up (a waiter cancelled
//! after popping one). Wake-ups are hints: a woken waiter simply retries ACQUIRE.
//!
//! # Fewer round trips than messages: the lease keeper
//!
//! A worker does not go to Redis per message. Its [`LeaseKeeper`] holds a local stock of
//! leases; [`LeaseKeeper::acquire`] hands out a [`Permit`] for one of them, and dropping the
//! permit returns the lease to the stock, straight to the next local waiter if there is one. So
//! under load a lease is reused for message after message with no Redis call at all. Redis is
//! only involved when the stock changes:
//!
//! * a *refill* task asks for as many leases as there are local waiters (up to `batch`) in one
//!   ACQUIRE, and is the only task of the worker that blocks in `BLPOP`;
//! * a *maintenance* task renews every held lease in one RENEW each `sync_interval`, and gives
//!   back leases that sat unused for `linger`, in one RELEASE;
//! * leases that must go (see below) are released in batches by a *releaser* task.
//!
//! Holding on to leases must not starve other workers or ignore a smaller limit, so each RENEW
//! reply carries the pool's status, and the keeper sheds leases as their permits come back:
//!
//! * after a shrink (`in_use > limit`) it keeps only its proportional part,
//!   `floor(held * limit / in_use)`;
//! * when another owner is starving (asked for more than it got) it keeps at most its fair
//!   share `ceil(limit / owners)` and stops asking for more until the others are served.
//!   ACQUIRE enforces the same rule with fresh numbers (the keeper passes how many it holds),
//!   and an owner held back there passes on the wake-up it may have consumed and waits for
//!   its next sync instead of `BLPOP`, so freed slots reach the starving owner.
//!
//! So a worker reacts to a smaller limit or a starving peer within one sync interval, and to a
//! larger limit at once when it is blocked in `BLPOP` (or within one sync interval when its
//! fair share was holding it back).
//!
//! Leases reported lost by RENEW (expired, say after a long pause) are dropped: no new work
//! starts under them, and [`LeaseKeeper::lost`] counts them. Tokens are admission control, not
//! mutual exclusion: a lost lease does not stop work already running, and correctness never
//! depends on a lease alone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use redis::{Script, Value};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::redis_conn::{Conn, MAX_BLOCK, RedisSettings};

/// The longest a waiter blocks before it retries ACQUIRE even without a wake-up.
pub const WAKE_CHECK: Duration = Duration::from_secs(1);

/// Default lease time to live.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// The most wake-ups kept in the `wake` list (and pushed by one script run).
pub const MAX_WAKE: u64 = 1024;

/// Idle dedicated `BLPOP` connections a pool keeps for reuse; more are closed after use.
const MAX_IDLE_BLOCKING: usize = 8;

/// How long an owner's "starving" mark lasts after its last unsatisfied ACQUIRE. Waiters retry
/// at least every [`WAKE_CHECK`], so an owner that still waits keeps its mark.
pub const STARVING_MARK: Duration = Duration::from_secs(2);

/// Code shared by every script: key names, server time, the limit, and the helpers `reap`,
/// `wake` and `status`. A macro so that `concat!` can build each script as one literal.
macro_rules! lua_prelude {
    () => {
        r#"
local K_LIMIT, K_LEASES, K_WAKE, K_SEQ, K_OWNERS, K_STARVING =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local MAX_WAKE = 1024
local STARVING_MS = 2000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = 0
do
  local raw = redis.call('GET', K_LIMIT)
  if raw then limit = math.max(0, math.floor(tonumber(raw) or 0)) end
end

-- Drop expired leases and marks; return how many leases expired.
local function reap()
  redis.call('ZREMRANGEBYSCORE', K_OWNERS, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', K_STARVING, '-inf', now)
  return redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', now)
end

-- Push up to n wake-ups, never more than the free capacity, and trim the list to it.
local function wake(n)
  local free = limit - redis.call('ZCARD', K_LEASES)
  if free <= 0 then
    redis.call('DEL', K_WAKE)
    return 0
  end
  if free > MAX_WAKE then free = MAX_WAKE end
  if n > free then n = free end
  if n > 0 then
    local tokens = {}
    for i = 1, n do tokens[i] = '1' end
    redis.call('LPUSH', K_WAKE, unpack(tokens))
  end
  redis.call('LTRIM', K_WAKE, 0, free - 1)
  return n
end

-- {limit, in_use, owners, starving owners other than `owner`}
local function status(owner)
  local starving = redis.call('ZCARD', K_STARVING)
  if owner ~= '' and redis.call('ZSCORE', K_STARVING, owner) then starving = starving - 1 end
  return {limit, redis.call('ZCARD', K_LEASES), redis.call('ZCARD', K_OWNERS), starving}
end
"#
    };
}

/// ACQUIRE(owner, k, ttl_ms): grant up to k leases. See the module docs for the reply.
pub const ACQUIRE_LUA: &str = concat!(
    lua_prelude!(),
    r#"
local owner, k, ttl, held = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4] or '0')
local expired = reap()
redis.call('ZADD', K_OWNERS, now + math.max(ttl, STARVING_MS), owner)
local in_use = redis.call('ZCARD', K_LEASES)
local g = math.max(0, math.min(k, limit - in_use))
-- Fair share: while another owner starves, nobody grows beyond ceil(limit / owners).
local held_back = false
local before = status(owner)
if before[4] > 0 then
  local room = math.max(0, math.ceil(limit / math.max(1, before[3])) - held)
  if room < g then
    g = room
    held_back = true
  end
end
local ids = {}
if g > 0 then
  local last = redis.call('INCRBY', K_SEQ, g)
  for i = 1, g do
    local id = owner .. ':' .. string.format('%d', last - g + i)
    ids[i] = id
    redis.call('ZADD', K_LEASES, now + ttl, id)
  end
end
if g < k then
  redis.call('ZADD', K_STARVING, now + STARVING_MS, owner)
else
  redis.call('ZREM', K_STARVING, owner)
end
-- Wake others for capacity that expired, and pass on the wake-up this caller may have used
-- but may not act on. This also trims stale wake-ups to the capacity left, so that a waiter's
-- BLPOP really blocks when nothing is free.
local pass = expired
if held_back then pass = pass + 1 end
wake(pass)
local wait = 0
if g == 0 then
  if held_back then
    wait = -2
  else
    wait = -1
    local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
    if first[2] then wait = math.max(1, tonumber(first[2]) - now) end
  end
end
local reply = status(owner)
table.insert(reply, 1, wait)
for i = 1, #ids do reply[#reply + 1] = ids[i] end
return reply
"#
);

/// RENEW(owner, ttl_ms, id...): extend the ids still present, report the lost ones.
pub const RENEW_LUA: &str = concat!(
    lua_prelude!(),
    r#"
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local expired = reap()
local lost = {}
local kept = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', K_LEASES, id) then
    redis.call('ZADD', K_LEASES, 'XX', now + ttl, id)
    kept = kept + 1
  else
    lost[#lost + 1] = id
  end
end
if kept > 0 then redis.call('ZADD', K_OWNERS, now + math.max(ttl, STARVING_MS), owner) end
if expired > 0 then wake(expired) end
local reply = status(owner)
for i = 1, #lost do reply[#reply + 1] = lost[i] end
return reply
"#
);

/// RELEASE(id...): remove the ids and wake one waiter per freed slot.
pub const RELEASE_LUA: &str = concat!(
    lua_prelude!(),
    r#"
local expired = reap()
local removed = 0
for i = 1, #ARGV do removed = removed + redis.call('ZREM', K_LEASES, ARGV[i]) end
local woken = 0
if removed + expired > 0 then woken = wake(removed + expired) end
return {removed, woken}
"#
);

/// SETLIMIT(n): set the limit; growth wakes waiters, a shrink revokes nothing.
pub const SETLIMIT_LUA: &str = concat!(
    lua_prelude!(),
    r#"
local n = math.max(0, math.floor(tonumber(ARGV[1])))
local old = limit
redis.call('SET', K_LIMIT, n)
limit = n
local expired = reap()
local grow = n - old
if grow < 0 then grow = 0 end
return {old, wake(grow + expired)}
"#
);

/// SNAPSHOT(owner or ""): the pool's state, after dropping expired leases.
pub const SNAPSHOT_LUA: &str = concat!(
    lua_prelude!(),
    r#"
local expired = reap()
if expired > 0 then wake(expired) end
local reply = status(ARGV[1] or '')
reply[#reply + 1] = redis.call('LLEN', K_WAKE)
local next_expiry = -1
local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
if first[2] then next_expiry = math.max(0, tonumber(first[2]) - now) end
reply[#reply + 1] = next_expiry
return reply
"#
);

struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    set_limit: Script,
    snapshot: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    acquire: Script::new(ACQUIRE_LUA),
    renew: Script::new(RENEW_LUA),
    release: Script::new(RELEASE_LUA),
    set_limit: Script::new(SETLIMIT_LUA),
    snapshot: Script::new(SNAPSHOT_LUA),
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
}

impl PoolStatus {
    /// `ceil(limit / owners)`: what each interested owner would hold if shared evenly.
    pub fn fair_share(&self) -> u64 {
        self.limit.div_ceil(self.owners.max(1))
    }
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
    /// RELEASE script runs.
    pub release: u64,
    /// `BLPOP` calls on `wake`.
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
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            owner: String::new(),
            lease_ttl: DEFAULT_LEASE_TTL,
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
    token_keys: [String; 6],
    owner: String,
    lease_ttl: Duration,
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
        TokenPool {
            inner: Arc::new(PoolInner {
                conn,
                settings,
                token_keys: keys.token_keys(),
                keys,
                owner,
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

    /// One ACQUIRE: up to `k` leases, without waiting.
    pub async fn try_acquire(&self, k: usize) -> Result<Grant> {
        self.try_acquire_holding(k, 0).await
    }

    /// One ACQUIRE by an owner that already holds `held` leases: while another owner is
    /// starving, the grant stops at the fair share (see [`Grant::held_back`]).
    pub async fn try_acquire_holding(&self, k: usize, held: usize) -> Result<Grant> {
        let k = k.max(1);
        let sent = Instant::now();
        bump(&self.inner.counters.acquire);
        let reply = self
            .run(
                &SCRIPTS.acquire,
                "ACQUIRE",
                &[
                    &self.inner.owner,
                    &k.to_string(),
                    &self.ttl_ms().to_string(),
                    &held.to_string(),
                ],
                &[],
            )
            .await?;
        let wait = int_at(&reply, 0, "ACQUIRE")?;
        let status = status_at(&reply, 1, "ACQUIRE")?;
        let valid_until = sent + self.inner.lease_ttl;
        let leases = reply[5..]
            .iter()
            .map(|v| {
                Ok(Lease {
                    id: string(v, "ACQUIRE")?,
                    valid_until,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let retry_after =
            (leases.is_empty() && wait > 0).then(|| Duration::from_millis(wait as u64));
        Ok(Grant {
            leases,
            retry_after,
            held_back: wait == -2,
            status,
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
    /// [`Error::Closed`] when `cancel` fires. Also returns early, empty-handed, when the grant
    /// was [held back](Grant::held_back) for fairness (only possible when `k` exceeds the fair
    /// share). Cancellation is only observed while blocked in
    /// `BLPOP`, never in the middle of ACQUIRE, so no lease is lost to it.
    pub async fn acquire_until(
        &self,
        k: usize,
        deadline: Instant,
        cancel: Option<&CancellationToken>,
    ) -> Result<Grant> {
        loop {
            let grant = self.try_acquire(k).await?;
            let now = Instant::now();
            if !grant.leases.is_empty() || grant.held_back || now >= deadline {
                return Ok(grant);
            }
            let mut wait = (deadline - now).min(WAKE_CHECK);
            if let Some(expiry) = grant.retry_after {
                wait = wait.min(expiry);
            }
            self.wait_for_wake(wait.max(Duration::from_millis(1)), cancel)
                .await?;
        }
    }

    /// Blocks in `BLPOP wake` for at most `wait` on a dedicated connection. Returns whether a
    /// wake-up was popped.
    pub async fn wait_for_wake(
        &self,
        wait: Duration,
        cancel: Option<&CancellationToken>,
    ) -> Result<bool> {
        let wait = wait.min(MAX_BLOCK);
        let mut conn = self.blocking_conn().await?;
        // BLPOP takes seconds as a decimal number (Redis >= 6); 0 would mean "forever".
        let timeout = format!("{:.3}", wait.as_secs_f64().max(0.001));
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(self.inner.keys.wake()).arg(timeout);
        bump(&self.inner.counters.blpop);
        let popped: Option<(String, String)> = match cancel {
            None => cmd.query_async(&mut conn).await?,
            Some(cancel) => tokio::select! {
                // The connection is dropped with the cancelled future; its reply would
                // otherwise arrive ahead of the next caller's.
                _ = cancel.cancelled() => return Err(Error::Closed),
                r = cmd.query_async(&mut conn) => r?,
            },
        };
        let mut idle = lock(&self.inner.blocking);
        if idle.len() < MAX_IDLE_BLOCKING {
            idle.push(conn);
        }
        Ok(popped.is_some())
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
        let status = status_at(&reply, 0, "RENEW")?;
        let lost = reply[4..]
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
        let next = int_at(&reply, 5, "SNAPSHOT")?;
        Ok(Snapshot {
            limit: status.limit,
            in_use: status.in_use,
            owners: status.owners,
            starving: status.starving_others,
            wake_len: int_at(&reply, 4, "SNAPSHOT")?.max(0) as u64,
            next_expiry: (next >= 0).then(|| Duration::from_millis(next as u64)),
        })
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

// ---------------------------------------------------------------------------------------------
// The lease keeper

/// Settings of a [`LeaseKeeper`].
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// The most leases held at once: the worker's local concurrency cap.
    pub max_held: usize,
    /// The most leases asked for in one ACQUIRE.
    pub batch: usize,
    /// How long an unused lease is kept before it is given back. Short enough that idle
    /// capacity returns to the pool quickly, long enough to bridge the gaps of a busy worker.
    pub linger: Duration,
    /// How often every held lease is renewed (one RENEW) and the pool's status refreshed.
    /// `None`: a third of the lease TTL, at most 500 ms, so that a smaller limit or a starving
    /// worker is noticed within half a second. Never more than half the TTL.
    pub sync_interval: Option<Duration>,
}

impl Default for KeeperConfig {
    fn default() -> Self {
        KeeperConfig {
            max_held: 64,
            batch: 16,
            linger: Duration::from_millis(250),
            sync_interval: None,
        }
    }
}

/// One leased permit to process a message. Dropping it returns the lease to the keeper's local
/// stock (or to the pool, when the keeper is shedding leases).
#[derive(Debug)]
pub struct Permit {
    keeper: Arc<KeeperInner>,
    id: String,
}

impl Permit {
    /// The lease id this permit stands for.
    pub fn lease_id(&self) -> &str {
        &self.id
    }

    /// True once RENEW found this permit's lease gone (or the keeper closed). Work already
    /// running may finish; the lease simply no longer counts against the limit.
    pub fn is_lost(&self) -> bool {
        !lock(&self.keeper.state).busy.contains_key(&self.id)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.keeper.give_back(std::mem::take(&mut self.id));
    }
}

/// Holds a worker's leases: hands out [`Permit`]s from a local stock, refills it in batches,
/// renews everything in one call per interval, sheds leases when the limit shrinks or another
/// worker starves, and releases everything on [`LeaseKeeper::close`]. See the module docs.
///
/// Clones share the keeper. The background tasks stop when the last clone is dropped, without
/// releasing anything (leases then expire after the TTL): call [`LeaseKeeper::close`] on
/// shutdown.
#[derive(Clone, Debug)]
pub struct LeaseKeeper {
    inner: Arc<KeeperInner>,
    _stop_on_drop: Arc<DropGuard>,
}

struct Held {
    id: String,
    valid_until: Instant,
}

struct Idle {
    id: String,
    valid_until: Instant,
    since: Instant,
}

#[derive(Default)]
struct KeeperState {
    /// Unused leases, a stack: the top is reused first, the bottom is the longest unused.
    idle: Vec<Idle>,
    /// Leases with a live permit: id -> valid until.
    busy: HashMap<String, Instant>,
    /// Local tasks waiting for a permit, first come first served.
    waiters: VecDeque<oneshot::Sender<Held>>,
    /// Leases to give back as permits return (after a shrink, or to make room for others).
    to_shed: usize,
    status: Option<PoolStatus>,
    closed: bool,
}

impl KeeperState {
    fn held(&self) -> usize {
        self.idle.len() + self.busy.len()
    }

    fn live_waiters(&mut self) -> usize {
        self.waiters.retain(|w| !w.is_closed());
        self.waiters.len()
    }

    /// Hands a lease to the first live waiter, or puts it on the idle stack. Returns true when
    /// the idle stack went from empty to non-empty (the linger timer must be scheduled).
    fn place(&mut self, mut held: Held, now: Instant) -> bool {
        while let Some(waiter) = self.waiters.pop_front() {
            self.busy.insert(held.id.clone(), held.valid_until);
            match waiter.send(held) {
                Ok(()) => return false,
                Err(back) => {
                    self.busy.remove(&back.id);
                    held = back;
                }
            }
        }
        self.idle.push(Idle {
            id: held.id,
            valid_until: held.valid_until,
            since: now,
        });
        self.idle.len() == 1
    }
}

struct KeeperInner {
    pool: TokenPool,
    config: KeeperConfig,
    sync_interval: Duration,
    /// A lease is not handed out when it would expire within this margin.
    margin: Duration,
    state: Mutex<KeeperState>,
    /// Local demand appeared, or the status changed: the refill task should look again.
    refill: Notify,
    /// The idle stack became non-empty: the maintenance task should schedule the linger check.
    maintain: Notify,
    lost: watch::Sender<u64>,
    release_tx: mpsc::UnboundedSender<String>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for KeeperInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("pool", &self.pool)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LeaseKeeper {
    /// Starts a keeper on `pool` (spawns its background tasks on the current Tokio runtime).
    pub fn start(pool: TokenPool, config: KeeperConfig) -> Self {
        let ttl = pool.lease_ttl();
        let sync_interval = config
            .sync_interval
            .unwrap_or_else(|| (ttl / 3).min(Duration::from_millis(500)))
            // A lease must be renewed well before it expires: leases within `ttl / 4` of
            // their expiry are no longer handed out.
            .min(ttl / 2)
            .max(Duration::from_millis(10));
        let config = KeeperConfig {
            max_held: config.max_held.max(1),
            batch: config.batch.max(1),
            ..config
        };
        let (release_tx, release_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let inner = Arc::new(KeeperInner {
            pool,
            config,
            sync_interval,
            margin: ttl / 4,
            state: Mutex::new(KeeperState::default()),
            refill: Notify::new(),
            maintain: Notify::new(),
            lost: watch::channel(0).0,
            release_tx,
            cancel: cancel.clone(),
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = vec![
            tokio::spawn(inner.clone().refill_loop()),
            tokio::spawn(inner.clone().maintain_loop()),
            tokio::spawn(inner.clone().release_loop(release_rx)),
        ];
        *lock(&inner.tasks) = tasks;
        LeaseKeeper {
            inner,
            _stop_on_drop: Arc::new(cancel.drop_guard()),
        }
    }

    /// Waits for a permit: from the local stock if one is idle (no Redis call), else from the
    /// next refill or returned permit. Fails only with [`Error::Closed`]. Cancel-safe.
    pub async fn acquire(&self) -> Result<Permit> {
        let rx = {
            let mut st = lock(&self.inner.state);
            if st.closed {
                return Err(Error::Closed);
            }
            let now = Instant::now();
            while let Some(idle) = st.idle.pop() {
                if idle.valid_until > now + self.inner.margin {
                    st.busy.insert(idle.id.clone(), idle.valid_until);
                    return Ok(self.permit(idle.id));
                }
                // Not renewed in time (Redis unreachable?): start no work under it.
                let _ = self.inner.release_tx.send(idle.id);
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(tx);
            rx
        };
        self.inner.refill.notify_one();
        let mut wait = Waiting {
            keeper: &self.inner,
            rx,
        };
        match (&mut wait.rx).await {
            Ok(held) => Ok(self.permit(held.id)),
            Err(_) => Err(Error::Closed),
        }
    }

    fn permit(&self, id: String) -> Permit {
        Permit {
            keeper: self.inner.clone(),
            id,
        }
    }

    /// The pool this keeper draws from.
    pub fn pool(&self) -> &TokenPool {
        &self.inner.pool
    }

    /// Leases held (idle and busy).
    pub fn held(&self) -> usize {
        lock(&self.inner.state).held()
    }

    /// Leases with a live permit.
    pub fn busy(&self) -> usize {
        lock(&self.inner.state).busy.len()
    }

    /// Local tasks waiting in [`LeaseKeeper::acquire`].
    pub fn waiting(&self) -> usize {
        lock(&self.inner.state).live_waiters()
    }

    /// The pool's status from the latest ACQUIRE or RENEW reply.
    pub fn status(&self) -> Option<PoolStatus> {
        lock(&self.inner.state).status
    }

    /// The number of leases lost so far (found expired by RENEW); changes are signalled.
    pub fn lost(&self) -> watch::Receiver<u64> {
        self.inner.lost.subscribe()
    }

    /// Stops the keeper: waiting `acquire` calls fail with [`Error::Closed`], the background
    /// tasks stop, and every held lease (idle or busy) is released in one call. Call it after
    /// in-flight work has finished or timed out; permits dropped later do nothing.
    pub async fn close(&self) -> Result<()> {
        let mut ids = {
            let mut st = lock(&self.inner.state);
            st.closed = true;
            st.waiters.clear();
            let mut ids: Vec<String> = st.idle.drain(..).map(|i| i.id).collect();
            ids.extend(st.busy.drain().map(|(id, _)| id));
            ids
        };
        self.inner.cancel.cancel();
        let tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        for task in tasks {
            let _ = task.await;
        }
        // Leases the refill task placed after `closed` was set are released by it; collect
        // anything that raced in anyway.
        {
            let mut st = lock(&self.inner.state);
            ids.extend(st.idle.drain(..).map(|i| i.id));
            ids.extend(st.busy.drain().map(|(id, _)| id));
        }
        self.inner.pool.release(&ids).await?;
        Ok(())
    }
}

/// A pending [`LeaseKeeper::acquire`]. If it is dropped after a lease was sent to it but
/// before it was received, the lease goes back to the keeper instead of being lost.
struct Waiting<'a> {
    keeper: &'a Arc<KeeperInner>,
    rx: oneshot::Receiver<Held>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(held) = self.rx.try_recv() {
            self.keeper.give_back(held.id);
        }
    }
}

impl KeeperInner {
    /// A permit was dropped: reuse its lease locally, or give it back to the pool.
    fn give_back(&self, id: String) {
        let mut st = lock(&self.state);
        if st.closed {
            return;
        }
        // Unknown ids were lost (RENEW said so) and are already forgotten.
        let Some(valid_until) = st.busy.remove(&id) else {
            return;
        };
        let now = Instant::now();
        if st.to_shed > 0 || valid_until <= now + self.margin {
            st.to_shed = st.to_shed.saturating_sub(1);
            drop(st);
            let _ = self.release_tx.send(id);
            return;
        }
        if st.place(Held { id, valid_until }, now) {
            drop(st);
            self.maintain.notify_one();
        }
    }

    /// How many leases to ask for now: the unmet local demand, within the local cap, the batch
    /// size and, while another owner starves, the fair share.
    fn wanted(&self, st: &mut KeeperState) -> usize {
        if st.closed || st.to_shed > 0 {
            return 0;
        }
        let demand = st.live_waiters();
        let held = st.held();
        let mut room = self.config.max_held.saturating_sub(held);
        if let Some(status) = st.status
            && status.starving_others > 0
        {
            let share = usize::try_from(status.fair_share()).unwrap_or(usize::MAX);
            room = room.min(share.saturating_sub(held));
        }
        demand.min(room).min(self.config.batch)
    }

    /// Puts granted leases into service. Returns their ids instead when the keeper is closed.
    fn take_grant(&self, grant: Grant) -> Option<Vec<String>> {
        let now = Instant::now();
        let mut st = lock(&self.state);
        st.status = Some(grant.status);
        if st.closed {
            return Some(grant.leases.into_iter().map(|l| l.id).collect());
        }
        let mut schedule = false;
        for lease in grant.leases {
            schedule |= st.place(
                Held {
                    id: lease.id,
                    valid_until: lease.valid_until,
                },
                now,
            );
        }
        drop(st);
        if schedule {
            self.maintain.notify_one();
        }
        None
    }

    /// Asks the pool for leases whenever local tasks wait and none is idle. The only task of
    /// the worker that blocks in `BLPOP`.
    async fn refill_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let (want, held) = {
                let mut st = lock(&self.state);
                (self.wanted(&mut st), st.held())
            };
            if want == 0 {
                tokio::select! {
                    _ = self.refill.notified() => continue,
                    _ = self.cancel.cancelled() => return,
                }
            }
            let grant = match self.pool.try_acquire_holding(want, held).await {
                Ok(grant) => grant,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "acquiring token leases failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            let (granted, held_back, retry_after) =
                (!grant.leases.is_empty(), grant.held_back, grant.retry_after);
            if let Some(late) = self.take_grant(grant) {
                // `close` is awaiting this task: give the late grant back directly.
                if let Err(error) = self.pool.release(&late).await {
                    tracing::warn!(%error, "releasing token leases failed");
                }
                return;
            }
            if granted {
                continue;
            }
            if held_back {
                // At our fair share while another worker starves: the wake-ups are theirs.
                // The next sync (or new local demand) brings fresh status.
                tokio::select! {
                    _ = self.refill.notified() => {}
                    _ = self.cancel.cancelled() => return,
                }
                continue;
            }
            let wait = retry_after.unwrap_or(WAKE_CHECK).min(WAKE_CHECK);
            match self.pool.wait_for_wake(wait, Some(&self.cancel)).await {
                Ok(_) => {}
                Err(Error::Closed) => return,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "waiting for token wake-ups failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Renews every held lease each sync interval and gives back leases idle for `linger`.
    async fn maintain_loop(self: Arc<Self>) {
        let mut next_sync = Instant::now() + self.sync_interval;
        loop {
            let linger_due = lock(&self.state)
                .idle
                .first()
                .map(|oldest| oldest.since + self.config.linger);
            let wake_at = linger_due.map_or(next_sync, |l| l.min(next_sync));
            tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = self.maintain.notified() => continue,
                _ = self.cancel.cancelled() => return,
            }
            let now = Instant::now();
            let stale: Vec<String> = {
                let mut st = lock(&self.state);
                let n = st
                    .idle
                    .iter()
                    .take_while(|i| i.since + self.config.linger <= now)
                    .count();
                st.idle.drain(..n).map(|i| i.id).collect()
            };
            for id in stale {
                let _ = self.release_tx.send(id);
            }
            if now >= next_sync {
                self.sync().await;
                next_sync = Instant::now() + self.sync_interval;
            }
        }
    }

    /// One RENEW of everything held; applies lost leases and decides what to shed.
    async fn sync(&self) {
        let ids: Vec<String> = {
            let mut st = lock(&self.state);
            if st.held() == 0 && st.live_waiters() == 0 {
                // Nothing to renew and no demand: an idle worker costs Redis nothing.
                return;
            }
            st.idle
                .iter()
                .map(|i| i.id.clone())
                .chain(st.busy.keys().cloned())
                .collect()
        };
        let renewal = match self.pool.renew_with_status(&ids).await {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(%error, held = ids.len(), "renewing token leases failed");
                return;
            }
        };
        let lost: std::collections::HashSet<&str> =
            renewal.lost.iter().map(String::as_str).collect();
        let mut shed = Vec::new();
        {
            let mut st = lock(&self.state);
            let before = st.held();
            st.idle.retain(|i| !lost.contains(i.id.as_str()));
            st.busy.retain(|id, _| !lost.contains(id.as_str()));
            // Leases acquired after `ids` was taken have a later validity already.
            for idle in &mut st.idle {
                idle.valid_until = idle.valid_until.max(renewal.valid_until);
            }
            for valid_until in st.busy.values_mut() {
                *valid_until = (*valid_until).max(renewal.valid_until);
            }
            let lost_now = before - st.held();
            let s = renewal.status;
            st.status = Some(s);
            let held = st.held() as u64;
            let keep = if s.in_use > s.limit {
                // Over the limit after a shrink: keep our proportional part of it.
                held * s.limit / s.in_use.max(1)
            } else if s.starving_others > 0 {
                held.min(s.fair_share())
            } else {
                held
            };
            st.to_shed = usize::try_from(held - keep).unwrap_or(usize::MAX);
            // Shed idle leases now (the longest unused first), busy ones as they come back.
            let n = st.to_shed.min(st.idle.len());
            shed.extend(st.idle.drain(..n).map(|i| i.id));
            st.to_shed -= n;
            if lost_now > 0 {
                tracing::warn!(lost = lost_now, "token leases expired before renewal");
                self.lost.send_modify(|total| *total += lost_now as u64);
            }
        }
        for id in shed {
            let _ = self.release_tx.send(id);
        }
        // The status may allow more leases now (for example, the starving owner was served).
        self.refill.notify_one();
    }

    /// Releases leases sent to it, batching whatever queued up while the last call ran.
    async fn release_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<String>) {
        loop {
            let mut batch = Vec::new();
            tokio::select! {
                id = rx.recv() => match id {
                    Some(id) => batch.push(id),
                    None => return,
                },
                // On shutdown, release what is queued, then stop.
                _ = self.cancel.cancelled() => {}
            }
            while let Ok(id) = rx.try_recv() {
                batch.push(id);
            }
            if !batch.is_empty()
                && let Err(error) = self.pool.release(&batch).await
            {
                tracing::warn!(%error, count = batch.len(), "releasing token leases failed");
            }
            if self.cancel.is_cancelled() {
                return;
            }
        }
    }
}
