//! Command line of `qp-operator`. Every flag has an environment fallback (the Helm chart sets
//! the environment).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "qp-operator",
    version,
    about = "Scales token-gated QueueProcessor workers on Kafka lag and Redis counters",
    long_about = "In a cluster (`run`), reconciles a worker Deployment per QueueProcessor and \
                  sizes it and its token pool from the backlog. On one machine (`local`), \
                  drives qp-worker processes from a QueueProcessor YAML file with the same \
                  decision loop."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller against the cluster in KUBECONFIG or the in-cluster config.
    Run(RunArgs),
    /// Drive qp-worker processes on this machine from a QueueProcessor file (no cluster).
    ///
    /// Replicas are `qp-worker` processes; scale-down sends SIGTERM (the worker drains). A
    /// process that exits unexpectedly is restarted at once the first time, then after 1, 2,
    /// 4 ... up to 30 s while it keeps crashing (a minute of running resets the count).
    Local(LocalArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "QP_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Elect a leader on a Lease so several replicas are safe (only the leader reconciles).
    #[arg(long, env = "QP_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "QP_LEASE_NAME", default_value = "qp-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the election (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, env = "QP_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Seconds between lease renewals.
    #[arg(long, env = "QP_LEASE_RENEW_SECONDS", default_value_t = 2)]
    pub lease_renew_seconds: u64,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "QP_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Worker image for QueueProcessors that do not name one.
    #[arg(
        long,
        env = "QP_WORKER_IMAGE",
        default_value = "ghcr.io/queue-processor/queue-processor:0.1.0"
    )]
    pub worker_image: String,
    /// Seconds after a QueueProcessor's deletion during which the operator keeps trying to
    /// remove its Redis keys; then it lets the deletion finish and a Warning event names the
    /// keys left behind (a Redis that is gone for good must not block `kubectl delete`).
    #[arg(long, env = "QP_CLEANUP_TIMEOUT_SECONDS", default_value_t = 300)]
    pub cleanup_timeout_seconds: u64,
    #[arg(long, env = "QP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// The QueueProcessor manifest to run.
    #[arg(short = 'f', long = "file", env = "QP_LOCAL_FILE")]
    pub file: PathBuf,
    /// The qp-worker binary (default: next to qp-operator, then $PATH).
    #[arg(long, env = "QP_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// Directory of Secret values: <dir>/<secret name>/<key> (like a mounted Secret).
    #[arg(long, env = "QP_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Address of the operator's /metrics, /healthz and /status.json.
    #[arg(long, env = "QP_OPERATOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// First port for worker processes' /metrics (one per replica, counting up); the gateway
    /// gets the port below this one.
    #[arg(long, env = "QP_LOCAL_BASE_PORT", default_value_t = 9100)]
    pub base_port: u16,
    /// Write Prometheus file_sd targets for the workers here (a JSON file).
    #[arg(long, env = "QP_PROMETHEUS_TARGETS_FILE")]
    pub prometheus_targets: Option<PathBuf>,
    /// Directory for worker logs.
    #[arg(long, env = "QP_LOCAL_LOG_DIR", default_value = "qp-local-logs")]
    pub log_dir: PathBuf,
    #[arg(long, env = "QP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
