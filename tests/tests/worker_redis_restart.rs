//! Fault test: the shared Redis (AOF on, fsync every second, as production runs it) crashes
//! (SIGKILL: up to a second of writes may be lost) and is started again while a Kafka-source
//! and a Redis-list-source workload are running. Workers pause while it is down and resume
//! after it; nothing is lost, the ceiling holds (measured at the handler's downstream, not in
//! Redis). A test binary of its own with one test: it stops a service every other test uses.

use std::time::Duration;

use qp_tests::fixture::RedisKind;

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_crash_mid_run_loses_nothing_and_holds_the_ceiling() {
    qp_tests::restart::crash_mid_run(RedisKind::Single, Duration::from_secs(3)).await;
}
