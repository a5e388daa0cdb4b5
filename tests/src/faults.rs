//! Faults injected into the shared services, undone on drop (also when a test panics), so that
//! a failing test never leaves a service down for the next one.

use std::process::Command;

use qp_protocol::redis_conn::Conn;

/// The shared single Redis, killed with SIGKILL (no shutdown: up to a second of AOF writes
/// may be lost). Dropping it starts Redis again (`hack/env.sh start redis`, which waits until it
/// answers).
pub struct RedisCrash;

impl RedisCrash {
    /// Kill the Redis that `conn` talks to (found by `INFO server`'s `process_id`).
    pub async fn now(conn: &Conn) -> RedisCrash {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn.clone())
            .await
            .expect("INFO server");
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .expect("process_id in INFO server")
            .trim()
            .to_owned();
        let killed = Command::new("kill").args(["-KILL", &pid]).status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -KILL {pid}");
        RedisCrash
    }
}

impl RedisCrash {
    /// Start Redis again and wait until `conn` (which reconnects on its first failed command)
    /// answers again.
    pub async fn end(self, conn: &Conn) {
        drop(self);
        crate::fixture::eventually(
            std::time::Duration::from_secs(10),
            "the connection back after the restart",
            || async {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn.clone()).await;
                pong.ok()
            },
        )
        .await;
    }
}

impl Drop for RedisCrash {
    fn drop(&mut self) {
        let ok = Command::new("bash")
            .arg(crate::env::workspace_root().join("hack/env.sh"))
            .args(["start", "redis"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok || std::thread::panicking(),
            "hack/env.sh start redis failed"
        );
    }
}
