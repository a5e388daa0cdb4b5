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
        kill9(&info);
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

/// A node of the environment's Redis Cluster (`hack/env.sh`: three masters, one replica each),
/// addressed directly rather than through the cluster client, so that a test can crash it or
/// fail it over.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub port: u16,
    client: redis::Client,
}

impl ClusterNode {
    /// The node on `port` of the environment's cluster (its password from the env file).
    pub fn on(port: u16) -> ClusterNode {
        let password = crate::env::load().get("QP_REDIS_CLUSTER_PASSWORD");
        let client = redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}"))
            .expect("a Redis Cluster node URL");
        ClusterNode { port, client }
    }

    /// The master that serves `key`'s slot now, and its replica.
    pub async fn master_and_replica_of(key: &str) -> (ClusterNode, ClusterNode) {
        let env = crate::env::load();
        let seeds = env.get("QP_REDIS_CLUSTER_NODES");
        let any = seeds.split(',').find_map(|url| {
            let port: u16 = url.rsplit(':').next()?.parse().ok()?;
            Some(ClusterNode::on(port))
        });
        let any = any.expect("a node in QP_REDIS_CLUSTER_NODES");
        let slot: i64 = any.cmd(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await;
        let nodes: String = any.cmd(redis::cmd("CLUSTER").arg("NODES")).await;
        let (master, replica) = master_and_replica_in(&nodes, slot)
            .unwrap_or_else(|| panic!("no master with a replica for slot {slot} in:\n{nodes}"));
        (ClusterNode::on(master), ClusterNode::on(replica))
    }

    /// Run one command on this node (panics on an error: a fault test's own step failed).
    pub async fn cmd<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let mut conn = self
            .client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to the cluster node on {}: {e}", self.port));
        cmd.query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cluster node {}: {e}", self.port))
    }

    /// `master` or `slave`, as the node says of itself (None while it does not answer).
    pub async fn role(&self) -> Option<String> {
        let mut conn = self.client.get_multiplexed_async_connection().await.ok()?;
        let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await.ok()?;
        match role {
            redis::Value::Array(items) => match items.first()? {
                redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                redis::Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// A replica's link to its master is up (it has synchronised).
    pub async fn in_sync(&self) -> bool {
        let mut conn = match self.client.get_multiplexed_async_connection().await {
            Ok(c) => c,
            Err(_) => return false,
        };
        let info: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await;
        info.is_ok_and(|i| i.contains("master_link_status:up"))
    }

    /// Promote this replica with a coordinated `CLUSTER FAILOVER` (its master stops writes until
    /// the replica has caught up: nothing acknowledged is lost) and wait until it is master.
    pub async fn fail_over_to(&self) {
        let _: () = self.cmd(redis::cmd("CLUSTER").arg("FAILOVER")).await;
        crate::fixture::eventually(
            std::time::Duration::from_secs(20),
            "the replica promoted",
            || async { (self.role().await.as_deref() == Some("master")).then_some(()) },
        )
        .await;
    }

    /// SIGKILL the node (found by `INFO server`'s `process_id`); dropping the guard starts it
    /// again with its AOF data and membership (`hack/env.sh revive-cluster-node`).
    pub async fn crash(&self) -> ClusterNodeCrash {
        let info: String = self.cmd(redis::cmd("INFO").arg("server")).await;
        kill9(&info);
        ClusterNodeCrash { port: self.port }
    }
}

/// The slot ranges of a `CLUSTER NODES` line's tail ("0-5460", "5461", "[...]" migrations).
fn serves(slots: &[&str], slot: i64) -> bool {
    slots.iter().any(|range| {
        let mut ends = range.splitn(2, '-').map(|n| n.parse::<i64>().ok());
        match (ends.next().flatten(), ends.next()) {
            (Some(a), None) => a == slot,
            (Some(a), Some(Some(b))) => (a..=b).contains(&slot),
            _ => false,
        }
    })
}

/// In `CLUSTER NODES` output, the ports of the master serving `slot` and of one of its
/// replicas. Lines: `<id> <ip:port@cport> <flags> <master-id|-> <ping> <pong> <epoch> <link>
/// <slots...>`.
fn master_and_replica_in(nodes: &str, slot: i64) -> Option<(u16, u16)> {
    let port_of = |addr: &str| -> Option<u16> {
        addr.split(['@', ','])
            .next()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()
    };
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let master = lines.iter().find(|f| {
        f.len() >= 8 && f[2].contains("master") && !f[2].contains("fail") && serves(&f[8..], slot)
    })?;
    let replica = lines.iter().find(|f| {
        f.len() >= 8 && f[2].contains("slave") && !f[2].contains("fail") && f[3] == master[0]
    })?;
    Some((port_of(master[1])?, port_of(replica[1])?))
}

fn kill9(info_server: &str) {
    let pid = info_server
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .expect("process_id in INFO server")
        .trim()
        .to_owned();
    let killed = Command::new("kill").args(["-KILL", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -KILL {pid}");
}

/// A Redis Cluster node killed with SIGKILL; dropping it starts the node again.
pub struct ClusterNodeCrash {
    port: u16,
}

impl Drop for ClusterNodeCrash {
    fn drop(&mut self) {
        let ok = Command::new("bash")
            .arg(crate::env::workspace_root().join("hack/env.sh"))
            .args(["revive-cluster-node", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok || std::thread::panicking(),
            "hack/env.sh revive-cluster-node {} failed",
            self.port
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
a1 127.0.0.1:17010@27010 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:17011@27011 master - 0 1 2 connected 5461-10922
a3 127.0.0.1:17012@27012 master - 0 1 3 connected 10923-16383
b1 127.0.0.1:17030@27030 slave a2 0 1 2 connected
b2 127.0.0.1:17031@27031 slave a3 0 1 3 connected
b3 127.0.0.1:17032@27032 slave a1 0 1 1 connected
";

    #[test]
    fn finds_the_master_of_a_slot_and_its_replica() {
        assert_eq!(master_and_replica_in(NODES, 0), Some((17010, 17032)));
        assert_eq!(master_and_replica_in(NODES, 5461), Some((17011, 17030)));
        assert_eq!(master_and_replica_in(NODES, 16383), Some((17012, 17031)));
        assert_eq!(master_and_replica_in(NODES, 16384), None);
    }

    #[test]
    fn a_failed_master_serves_nothing() {
        let failed = NODES.replace(
            "a2 127.0.0.1:17011@27011 master",
            "a2 127.0.0.1:17011@27011 master,fail",
        );
        assert_eq!(master_and_replica_in(&failed, 6000), None);
    }
}
