//! Every Lua script of the project except the token pool's (see [`crate::tokens`]), loaded from
//! `src/lua/` at compile time. Each is written once and used by whoever runs it, so the worker
//! that writes a heartbeat and the operator that reads it agree by construction.

use std::sync::LazyLock;

use redis::Script;

pub static BEAT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/heartbeat_beat.lua")));

pub static FORGET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/heartbeat_forget.lua")));

/// Mark each id `processing` unless it already finished. KEYS: the result hashes.
/// ARGV[1] = ttl ms. Returns one entry per id: 1 = run it, 0 = already finished (skip).
pub static BEGIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/results_begin.lua")));

/// Finish each id once. KEYS[1] = processed counter, KEYS[2] = failed counter,
/// KEYS[3..] = result hashes. ARGV[1] = ttl ms, ARGV[2] = channel, ARGV[3] = `PUBLISH` or
/// `SPUBLISH`, then per id: outcome ('done'|'failed'), payload (body or error), id. Announces
/// an id only when a long poll watches it (see [`WATCH`]).
/// Returns one entry per id: 1 = written, 0 = was already finished.
pub static FINISH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/results_finish.lua")));

/// Mark a request watched (if it exists) and read it: `{state, body, error}`. KEYS[1] = result
/// hash.
pub static WATCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/gateway_watch.lua")));

/// Claim `id` as pending unless a request with that id exists. KEYS[1] = result hash.
/// ARGV[1] = reservation ttl ms. Returns the existing state, or "" when newly claimed.
pub static CLAIM: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/gateway_claim.lua")));

/// Moves every message of a dead worker's processing list back onto the source's consuming end.
/// KEYS[1] = processing list, KEYS[2] = source list. Returns how many were moved.
pub static RECOVER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/list_recover.lua")));

/// Workers whose heartbeat is older than ARGV[1] ms (Redis server time), removed from the set.
/// KEYS[1] = heartbeats.
pub static STALE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/list_stale.lua")));

/// Records the running count in `<prefix>:probe:current`, its maximum in `<prefix>:probe:max`
/// and how often each id ran in the hash `<prefix>:probe:runs` (to count duplicate processing).
pub static PROBE_ENTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/probe_enter.lua")));

/// Reads the workers' counters in one script call and prunes heartbeats of long-dead replicas.
/// KEYS: processed, failed, heartbeats, rates, inflight. ARGV[1] = fresh window ms,
/// ARGV[2] = prune after ms.
pub static COUNTERS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/heartbeat_read.lua")));
