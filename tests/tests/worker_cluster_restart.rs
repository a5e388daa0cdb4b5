//! Fault test: the Redis Cluster masters that serve two running workloads crash (SIGKILL; AOF
//! on, fsync every second) and start again with their data and membership, sooner than the
//! cluster's node timeout (3 s), so that they come back as the masters (a failover is the other
//! fault test). Workers pause and resume; nothing is lost, the ceiling holds. A test binary of
//! its own: it stops nodes every Redis Cluster test uses.

use std::time::Duration;

use qp_tests::fixture::RedisKind;

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_master_crash_mid_run_loses_nothing_and_holds_the_ceiling() {
    qp_tests::restart::crash_mid_run(RedisKind::Cluster, Duration::from_secs(1)).await;
}
