//! The Redis key layout of one QueueProcessor.
//!
//! Every key that belongs to a QueueProcessor starts with `qp:{<namespace>/<name>}:`. The part
//! in braces is a Redis Cluster *hash tag*: when a key contains `{...}`, the cluster hashes only
//! what is between the first `{` and the next `}` to choose the key's slot. So all keys of one
//! QueueProcessor live in one slot, on one node, and a Lua script may touch any of them (a
//! script that touched keys in two slots would fail with `CROSSSLOT`). On a single Redis the
//! tag is just part of the name.
//!
//! | key                          | type   | written by | meaning                                   |
//! |------------------------------|--------|------------|-------------------------------------------|
//! | `limit`                      | string | operator   | how many leases may exist at once         |
//! | `leases`                     | zset   | scripts    | lease id -> expiry (ms, Redis server time)|
//! | `wake`                       | list   | scripts    | wake-ups for blocked acquirers            |
//! | `lease-seq`                  | string | (none)     | written by 0.1 only; deleted with the QP  |
//! | `owners`                     | zset   | scripts    | lease owner -> expiry of its interest     |
//! | `starving`                   | zset   | scripts    | owners that asked for more than they got  |
//! | `result:<id>`                | string | worker     | the handler's result for a request        |
//! | `state:<id>`                 | string | both       | pending / processing / done / failed      |
//! | `processed`, `failed`        | string | worker     | monotonic counters (INCR)                 |
//! | `inflight`                   | string | worker     | messages being handled right now          |
//! | `heartbeats`                 | zset   | worker     | replica -> last seen (ms)                 |
//! | `rates`                      | hash   | worker     | replica -> measured messages per second   |
//! | `dead-letter`                | list   | worker     | default dead-letter list                  |
//! | `reaper-lock`                | string | worker     | who reaps dead Redis-list workers now     |
//! | `done`                       | pubsub | worker     | ids of requests that just finished        |
//!
//! # The Redis list source is the exception
//!
//! The list a Redis-list QueueProcessor consumes from is named by the user and usually has no
//! hash tag of ours, so it lives in whatever slot its own name hashes to. `BLMOVE` from that list
//! into a worker's processing list is only allowed on a cluster when both keys share a slot, so
//! processing lists are *not* under the QueueProcessor's tag: [`Keys::processing_list`] derives
//! them from the source key's slot instead. Scripts must therefore never combine a processing
//! list with the other keys.

use crate::error::{Error, Result};

/// The names of one QueueProcessor's keys. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys of the QueueProcessor `namespace/name`: prefix `qp:{namespace/name}:`.
    ///
    /// Any name works: the `{` we add is the first one in the key and the first `}` after it
    /// is at the latest the one we add, so every key built from this prefix hashes to the
    /// same slot.
    pub fn new(namespace: &str, name: &str) -> Self {
        Keys {
            prefix: format!("qp:{{{namespace}/{name}}}:"),
        }
    }

    /// Keys under a raw prefix (for tests and tools). The prefix should contain a non-empty
    /// hash tag (see [`Keys::hash_tag`]); without one, the keys scatter over a cluster's slots
    /// and the scripts fail there.
    pub fn from_prefix(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }

    /// The common prefix, ending in `:` when built by [`Keys::new`].
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash tag that pins every key to one slot, if the prefix has one.
    pub fn hash_tag(&self) -> Option<&str> {
        hash_tag(self.prefix.as_bytes()).map(|r| &self.prefix[r])
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// String: the number of leases that may exist at once, written by the operator.
    pub fn limit(&self) -> String {
        self.key("limit")
    }

    /// Sorted set: lease id -> expiry in milliseconds of Redis server time.
    pub fn leases(&self) -> String {
        self.key("leases")
    }

    /// List: one element per wake-up for acquirers blocked in `BLPOP`.
    pub fn wake(&self) -> String {
        self.key("wake")
    }

    /// String: the lease-id counter of version 0.1. Lease ids no longer come from Redis (a
    /// counter that Redis can lose hands out ids that are still held); the key is only deleted
    /// with the QueueProcessor, so an upgraded installation leaves nothing behind.
    pub fn lease_seq(&self) -> String {
        self.key("lease-seq")
    }

    /// Sorted set: lease owner (a worker) -> expiry of its interest in leases. An owner is
    /// interested while it asks for leases or renews some.
    pub fn owners(&self) -> String {
        self.key("owners")
    }

    /// Sorted set: owners whose last request was not fully granted -> expiry of that mark.
    pub fn starving(&self) -> String {
        self.key("starving")
    }

    /// Sorted set: each acquirer about to block or blocked in `BLPOP` (its TTL, owner and
    /// ticket) -> when its wait ends. A RELEASE hands freed slots to these waiters.
    pub fn waiters(&self) -> String {
        self.key("waiters")
    }

    /// List: `<ttl_ms> <lease id>` of each lease a RELEASE handed over that no waiter has
    /// popped yet. Blocked waiters pop it before `wake`; the next ACQUIRE takes what is left.
    pub fn granted(&self) -> String {
        self.key("granted")
    }

    /// List: pushed to by a waiter that gives up, to end its own `BLPOP` (one key per wait,
    /// named by `token`). Exists for a moment; it expires if the waiter dies in between.
    pub fn unblock(&self, token: &str) -> String {
        self.key(&format!("unblock:{token}"))
    }

    /// Every key of the token pool, in the order the token scripts take them as `KEYS`.
    pub fn token_keys(&self) -> [String; 7] {
        [
            self.limit(),
            self.leases(),
            self.wake(),
            self.owners(),
            self.starving(),
            self.waiters(),
            self.granted(),
        ]
    }

    /// String: the result of request `id`.
    pub fn result(&self, id: &str) -> String {
        self.key(&format!("result:{id}"))
    }

    /// String: the state of request `id` (`pending`, `processing`, `done`, `failed`).
    pub fn state(&self, id: &str) -> String {
        self.key(&format!("state:{id}"))
    }

    /// String counter: messages handled successfully.
    pub fn processed(&self) -> String {
        self.key("processed")
    }

    /// String counter: messages that failed for good.
    pub fn failed(&self) -> String {
        self.key("failed")
    }

    /// String counter: messages being handled right now.
    pub fn inflight(&self) -> String {
        self.key("inflight")
    }

    /// Sorted set: replica -> last heartbeat (ms since the epoch).
    pub fn heartbeats(&self) -> String {
        self.key("heartbeats")
    }

    /// Hash: replica -> its measured throughput (messages per second).
    pub fn rates(&self) -> String {
        self.key("rates")
    }

    /// List: the default dead-letter target for a Redis-list source.
    pub fn dead_letter(&self) -> String {
        self.key("dead-letter")
    }

    /// String with an expiry: held by the one worker that currently reaps dead workers'
    /// processing lists of a Redis-list source (`SET NX PX`).
    pub fn reaper_lock(&self) -> String {
        self.key("reaper-lock")
    }

    /// Every key that lives as long as the QueueProcessor (removed when it is deleted):
    /// the token pool, the counters, heartbeats and rates, the reaper lock. Results, request
    /// states and dead letters are not among them: they expire or are the user's.
    pub fn lifetime_keys(&self) -> Vec<String> {
        let mut names = self.token_keys().to_vec();
        names.extend([
            self.lease_seq(),
            self.processed(),
            self.failed(),
            self.inflight(),
            self.heartbeats(),
            self.rates(),
            self.reaper_lock(),
        ]);
        names
    }

    /// Pub/sub channel: the id of every request that just finished (done or failed). The
    /// gateway's long polls listen here instead of polling.
    pub fn done_channel(&self) -> String {
        self.key("done")
    }

    /// List: the messages worker `worker_id` took from the Redis list `source_key` and has not
    /// finished. Lives in the *source's* slot (see the module docs), and still names this
    /// QueueProcessor so two QueueProcessors reading one list do not collide:
    ///
    /// * a source inside this QueueProcessor's own key space (`<prefix>queue`, the gateway's
    ///   default) gives `<prefix>processing:<worker>`, so one ACL pattern covers every key;
    /// * a source with a hash tag `{t}` gives `{t}:<prefix>processing:<worker>`;
    /// * a source without one gives `{<source>}:<prefix>processing:<worker>`, which hashes
    ///   exactly like the untagged source name.
    ///
    /// Fails for a source name whose slot cannot be reproduced (a `}` with no `{` before it).
    pub fn processing_list(&self, source_key: &str, worker_id: &str) -> Result<String> {
        let tag = match hash_tag(source_key.as_bytes()) {
            Some(r) => &source_key[r],
            None if !source_key.contains('}') && !source_key.is_empty() => source_key,
            None => {
                return Err(Error::config(format!(
                    "Redis list source key {source_key:?} cannot share a cluster slot with a \
                     processing list; give it a hash tag, e.g. {{{source_key}}}"
                )));
            }
        };
        // A source inside our own key space (the gateway's default) keeps its processing lists
        // there too, so one ACL key pattern (`~qp:{ns/name}:*`) covers everything.
        if self.hash_tag() == Some(tag) && source_key.starts_with(&self.prefix) {
            return Ok(format!("{}processing:{worker_id}", self.prefix));
        }
        Ok(format!("{{{tag}}}:{}processing:{worker_id}", self.prefix))
    }
}

/// The byte range of a key's hash tag: the bytes between the first `{` and the first `}`
/// after it, if that is not empty. Redis Cluster hashes only these bytes.
pub fn hash_tag(key: &[u8]) -> Option<std::ops::Range<usize>> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')? + open + 1;
    (close > open + 1).then_some(open + 1..close)
}

/// The Redis Cluster slot (0..16384) of a key: CRC16-XMODEM of its hash tag, or of the whole
/// key when it has none, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = match hash_tag(key) {
        Some(r) => &key[r],
        None => key,
    };
    // CRC16 with polynomial 0x1021 and initial value 0 (XMODEM), as Redis Cluster uses.
    crc16::State::<crc16::XMODEM>::calculate(hashed) % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_redis_reference_values() {
        // The check value of CRC16-XMODEM, and slots given by `CLUSTER KEYSLOT`.
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31C3
        );
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}")); // empty tag: whole key
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    fn all_keys(k: &Keys) -> Vec<String> {
        let mut v = k.token_keys().to_vec();
        v.extend([
            k.result("r-1"),
            k.state("r-1"),
            k.result("another id with spaces"),
            k.processed(),
            k.failed(),
            k.inflight(),
            k.heartbeats(),
            k.rates(),
            k.dead_letter(),
            k.reaper_lock(),
        ]);
        v
    }

    #[test]
    fn all_keys_of_one_qp_share_a_slot() {
        for (ns, name) in [
            ("default", "orders"),
            ("prod", "a"),
            ("x", "y-z.1"),
            ("weird}", "{name"),
            ("", ""),
        ] {
            let k = Keys::new(ns, name);
            let expected = slot(k.limit().as_bytes());
            for key in all_keys(&k) {
                assert!(key.starts_with(k.prefix()));
                assert_eq!(slot(key.as_bytes()), expected, "{key}");
            }
        }
    }

    #[test]
    fn layout_is_stable() {
        let k = Keys::new("default", "orders");
        assert_eq!(k.prefix(), "qp:{default/orders}:");
        assert_eq!(k.hash_tag(), Some("default/orders"));
        assert_eq!(k.limit(), "qp:{default/orders}:limit");
        assert_eq!(k.result("42"), "qp:{default/orders}:result:42");
        assert_eq!(Keys::from_prefix("plain:").hash_tag(), None);
    }

    #[test]
    fn different_qps_usually_use_different_slots() {
        let a = slot(Keys::new("default", "a").limit().as_bytes());
        let b = slot(Keys::new("default", "b").limit().as_bytes());
        assert_ne!(a, b);
    }

    #[test]
    fn processing_lists_share_the_source_slot() {
        let k = Keys::new("default", "jobs");
        for source in ["jobs", "queue:{orders}:in", "a{b"] {
            let p = k.processing_list(source, "worker-1").unwrap();
            assert_eq!(
                slot(p.as_bytes()),
                slot(source.as_bytes()),
                "{source} -> {p}"
            );
            assert!(p.contains("qp:{default/jobs}:processing:worker-1"));
        }
        assert_ne!(
            k.processing_list("jobs", "w1").unwrap(),
            k.processing_list("jobs", "w2").unwrap()
        );
        assert!(k.processing_list("odd}key", "w").is_err());
        assert!(k.processing_list("x{}y", "w").is_err());
        assert!(k.processing_list("", "w").is_err());
    }
}
