//! The lease keeper: fewer round trips than messages.
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
//!   share (the pool tells each owner its own; the shares add up to the limit, so nobody is
//!   left with none while others hold theirs) and stops asking for more until the others are
//!   served.
//!   ACQUIRE enforces the same rule with fresh numbers (the keeper passes how many it holds),
//!   and an owner held back there passes on the wake-up it may have consumed and does not
//!   register as a waiter, so freed slots reach the starving owner.
//!
//! So a worker reacts to a smaller limit or a starving peer within one sync interval, and to a
//! larger limit at once: a keeper at its fair share still waits in `BLPOP` for wake-ups (not
//! for hand-offs) until its next sync, and a limit increase pushes wake-ups. Only right
//! after a wake-up that was of no use to it does it wait for the sync instead.
//!
//! Leases reported lost by RENEW (expired, say after a long pause) are dropped: no new work
//! starts under them, and [`LeaseKeeper::lost`] counts them. Tokens are admission control, not
//! mutual exclusion: a lost lease does not stop work already running, and correctness never
//! depends on a lease alone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use qp_protocol::tokens::{Lease, PoolStatus, Ticket, TokenPool, WAKE_CHECK, Wake};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{Error, Result};

/// Locks a mutex, ignoring poisoning: the keeper's state stays consistent between statements,
/// so a panic elsewhere leaves nothing half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
    /// A sync brought a fresh status: a keeper waiting at its fair share looks again.
    synced: Notify,
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
            synced: Notify::new(),
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
            let _ = self.release_tx.send(id);
            return;
        }
        if st.place(Held { id, valid_until }, now) {
            drop(st);
            self.maintain.notify_one();
        }
    }

    /// How many leases to ask for now: the unmet local demand, within the local cap, the batch
    /// size and, while another owner starves, the fair share of the last status heard. The
    /// second number is the same without the fair share: what to ask once a wake-up says the
    /// status may have changed (ACQUIRE applies the share that holds then).
    fn wanted(&self, st: &mut KeeperState) -> (usize, usize) {
        if st.closed || st.to_shed > 0 {
            return (0, 0);
        }
        let demand = st.live_waiters();
        let held = st.held();
        let past_share = demand
            .min(self.config.max_held.saturating_sub(held))
            .min(self.config.batch);
        let mut want = past_share;
        if let Some(status) = st.status
            && status.starving_others > 0
        {
            let share = usize::try_from(status.share).unwrap_or(usize::MAX);
            want = want.min(share.saturating_sub(held));
        }
        (want, past_share)
    }

    /// Puts granted leases into service, with the pool's status if the grant came with one
    /// (a hand-off does not). Returns their ids instead when the keeper is closed.
    fn take_leases(&self, leases: Vec<Lease>, status: Option<PoolStatus>) -> Option<Vec<String>> {
        let now = Instant::now();
        let mut st = lock(&self.state);
        if status.is_some() {
            st.status = status;
        }
        if st.closed {
            return Some(leases.into_iter().map(|l| l.id).collect());
        }
        let mut schedule = false;
        for lease in leases {
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
    /// the worker that blocks in `BLPOP`. When it ends, a registration it left behind is
    /// withdrawn, so that no RELEASE hands a slot to a keeper that is gone.
    async fn refill_loop(self: Arc<Self>) {
        if let Some(ticket) = self.refill().await {
            self.withdraw(&ticket).await;
        }
    }

    /// Drops a waiter registration that no ACQUIRE will drop (see `TokenPool::withdraw`).
    async fn withdraw(&self, ticket: &Ticket) {
        if let Err(error) = self.pool.withdraw(ticket).await {
            // It ends with its wait (at most a second) anyway.
            tracing::warn!(%error, "withdrawing a token wait failed");
        }
    }

    /// The loop of `refill_loop`; returns the ticket of a wait still registered. Its
    /// backoff stays hand-written: one delay serves two different failures inside a larger
    /// loop and resets on a grant, which is not a retry of one operation.
    async fn refill(&self) -> Option<Ticket> {
        let mut backoff = Duration::from_millis(50);
        // The ticket of the last wait, unless a hand-off consumed it: the next ACQUIRE drops
        // its registration.
        let mut done: Option<Ticket> = None;
        // At the fair share: whether the last wait ended with a wake-up (see `wait_at_share`),
        // and whether the next ACQUIRE may ask past the share last heard of.
        let mut woken_at_share = false;
        let mut past_share = false;
        loop {
            let (want, beyond, held) = {
                let mut st = lock(&self.state);
                let (want, beyond) = self.wanted(&mut st);
                let want = if std::mem::take(&mut past_share) {
                    beyond
                } else {
                    want
                };
                (want, beyond, st.held())
            };
            if want == 0 {
                if let Some(ticket) = done.take() {
                    // No ACQUIRE may come for a while: drop the registration now.
                    self.withdraw(&ticket).await;
                }
                if beyond > 0 {
                    // At our fair share of the last status: a wake-up or the next sync.
                    past_share = self.wait_at_share(&mut woken_at_share).await?;
                    continue;
                }
                tokio::select! {
                    _ = self.refill.notified() => continue,
                    _ = self.cancel.cancelled() => return None,
                }
            }
            let acquired = self
                .pool
                .try_acquire_or_wait(want, held, WAKE_CHECK, done.as_ref())
                .await;
            let mut grant = match acquired {
                Ok(grant) => {
                    done = None;
                    grant
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "acquiring token leases failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => return done,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            let ticket = grant.ticket.take();
            let (granted, held_back, retry_after) =
                (!grant.leases.is_empty(), grant.held_back, grant.retry_after);
            if !self.put_to_use(grant.leases, Some(grant.status)).await {
                return ticket;
            }
            if granted {
                // A wake-up that brought leases was of use: the next wait at the share
                // listens for wake-ups again.
                woken_at_share = false;
                continue;
            }
            if held_back {
                // At our fair share while another worker starves (not registered: RELEASEs
                // hand their slots to the starving).
                past_share = self.wait_at_share(&mut woken_at_share).await?;
                continue;
            }
            let wait = retry_after.unwrap_or(WAKE_CHECK).min(WAKE_CHECK);
            let woke = self
                .pool
                .wait_for_wake(wait, Some(&self.cancel), ticket.as_ref())
                .await;
            done = ticket;
            match woke {
                Ok(Wake::Granted(lease)) => {
                    // A RELEASE handed a slot over: held without another ACQUIRE. If it was
                    // made for another waiter, ours is still registered (`done`). After a
                    // cancel this is the hand-off the wait popped as it ended: `put_to_use`
                    // gives it back.
                    if done.as_ref().is_some_and(|t| t.id == lease.id) {
                        done = None;
                    }
                    if !self.put_to_use(vec![lease], None).await {
                        return done;
                    }
                }
                Ok(Wake::Woken | Wake::TimedOut) => {}
                Err(qp_protocol::Error::Closed) => return done,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "waiting for token wake-ups failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => return done,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// The wait of a keeper at its fair share while another worker starves, until a wake-up or
    /// its next sync, whichever comes first. It only learns that its share grew from a status:
    /// waiting for the next sync alone made a limit increase take up to a sync interval to be
    /// used (0-460 ms, evenly spread, with three keepers growing from 2 to 16 and syncs every
    /// 500 ms). A limit increase pushes wake-ups, so it also waits for one, as an unregistered
    /// waiter (RELEASE hand-offs stay the starving owners'). `Some(true)` when one came: the
    /// next ACQUIRE asks past the old share, and the pool grants what the new one allows (or
    /// holds it back and passes the wake-up on). Right after a wake-up it waits for the sync
    /// only (`woken`), so that a wake-up nobody can use does not go round between keepers at
    /// their shares. `None` when the keeper is cancelled.
    async fn wait_at_share(&self, woken: &mut bool) -> Option<bool> {
        // A sync that came before this wait is already in the status the caller decided on.
        let _ = self.synced.notified().now_or_never();
        if std::mem::take(woken) {
            tokio::select! {
                _ = self.synced.notified() => return Some(false),
                _ = self.cancel.cancelled() => return None,
            }
        }
        let sync_came = self.cancel.child_token();
        let wait = self
            .pool
            .wait_for_wake(self.sync_interval, Some(&sync_came), None);
        tokio::pin!(wait);
        let woke = tokio::select! {
            w = &mut wait => w,
            _ = self.synced.notified() => {
                // Ends the BLPOP without losing its connection. A wake-up it popped at that
                // moment is dropped, as any cancelled waiter's is (the pool's waiters retry
                // within a second); the fresh status tells this keeper what it would have.
                sync_came.cancel();
                match wait.await {
                    Err(qp_protocol::Error::Closed) if !self.cancel.is_cancelled() => {
                        return Some(false);
                    }
                    w => w,
                }
            }
        };
        match woke {
            Ok(Wake::Woken) => {
                *woken = true;
                Some(true)
            }
            Ok(Wake::TimedOut) => Some(false),
            // Nothing is handed to an unregistered waiter; kept, not lost, if it ever were.
            Ok(Wake::Granted(lease)) => self.put_to_use(vec![lease], None).await.then_some(false),
            Err(qp_protocol::Error::Closed) => None,
            Err(error) => {
                tracing::warn!(%error, "waiting for token wake-ups failed");
                tokio::select! {
                    _ = self.synced.notified() => Some(false),
                    _ = self.cancel.cancelled() => None,
                }
            }
        }
    }

    /// Puts leases into service; once the keeper is closed (`close` awaits the refill task),
    /// gives them back directly instead and returns false.
    async fn put_to_use(&self, leases: Vec<Lease>, status: Option<PoolStatus>) -> bool {
        let Some(late) = self.take_leases(leases, status) else {
            return true;
        };
        if let Err(error) = self.pool.release(&late).await {
            tracing::warn!(%error, "releasing token leases failed");
        }
        false
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
            {
                let mut st = lock(&self.state);
                let n = st
                    .idle
                    .iter()
                    .take_while(|i| i.since + self.config.linger <= now)
                    .count();
                for idle in st.idle.drain(..n) {
                    let _ = self.release_tx.send(idle.id);
                }
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
                held.min(s.share)
            } else {
                held
            };
            st.to_shed = usize::try_from(held - keep).unwrap_or(usize::MAX);
            // Shed idle leases now (the longest unused first), busy ones as they come back.
            let n = st.to_shed.min(st.idle.len());
            for idle in st.idle.drain(..n) {
                let _ = self.release_tx.send(idle.id);
            }
            st.to_shed -= n;
            if lost_now > 0 {
                tracing::warn!(lost = lost_now, "token leases expired before renewal");
                self.lost.send_modify(|total| *total += lost_now as u64);
            }
        }
        // The status may allow more leases now (for example, the starving owner was served).
        self.refill.notify_one();
        self.synced.notify_one();
    }

    /// Releases leases sent to it, batching whatever queued up while the last call ran.
    /// Leases leave the keeper's state and enter this queue under the state lock, so once
    /// `close` has taken the state, everything else is queued here and released on the way
    /// out.
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
