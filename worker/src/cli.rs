//! The `qp-worker` command line: one subcommand per mode. The settings of each mode are the
//! typed structs of `qp_protocol::settings`, which the operator renders into a pod's
//! environment (every flag has an environment fallback; secrets come from `secretKeyRef`, so they
//! never appear in the pod spec or in `ps`).

use std::num::NonZeroUsize;

use crate::replay::ReplayArgs;
use clap::{Parser, Subcommand};
use qp_protocol::settings::{GatewayArgs, RunArgs};

#[derive(Debug, Parser)]
#[command(
    name = "qp-worker",
    version,
    about = "Token-gated, at-least-once queue consumer for QueueProcessor workloads",
    long_about = "Consumes a Kafka topic (consumer group) or a Redis list, takes a token from the \
                  QueueProcessor's global pool in Redis before each message, runs the handler, \
                  and stores the result in Redis for clients to poll. `gateway` serves the HTTP \
                  intake and poll API instead."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Threads of the async runtime. Default: 1 for `run`, one per CPU available to the
    /// process (its cgroup's CPU limit counts) for the other modes. A worker waits on Kafka,
    /// Redis and its handler, and scales out by replicas: with more threads, handing each
    /// message between them (wake-ups, futex calls, context switches) cost more than the
    /// second core gave (BENCHMARKS.md: 31,000 vs 40,500 messages/s on two cores).
    #[arg(long, global = true, env = "QP_RUNTIME_THREADS")]
    pub runtime_threads: Option<NonZeroUsize>,
}

impl Cli {
    /// How many threads the runtime gets (see `--runtime-threads`).
    pub fn runtime_threads(&self) -> usize {
        match (self.runtime_threads, &self.command) {
            (Some(n), _) => n.get(),
            (None, Command::Run(_)) => 1,
            (None, _) => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume messages and run the handler (the worker Deployment runs this).
    Run(Box<RunArgs>),
    /// Accept requests over HTTP, queue them, and answer polls for their results.
    Gateway(Box<GatewayArgs>),
    /// Queue dead letters on the source again (by --id, or --all), resetting their requests so
    /// that they run again; --dry-run lists them.
    Replay(Box<ReplayArgs>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use qp_protocol::settings::HandlerSpec;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn runtime_threads_default_per_mode() {
        let run = [
            "qp-worker",
            "run",
            "--name",
            "o",
            "--source",
            "redis-list",
            "--handler",
            "echo",
        ];
        let cli = Cli::try_parse_from(run).unwrap();
        assert_eq!(cli.runtime_threads(), 1);
        let cli = Cli::try_parse_from(run.iter().chain(&["--runtime-threads", "3"])).unwrap();
        assert_eq!(cli.runtime_threads(), 3);
        let gateway = [
            "qp-worker",
            "gateway",
            "--name",
            "o",
            "--source",
            "redis-list",
        ];
        let cli = Cli::try_parse_from(gateway).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(cli.runtime_threads(), cpus);
        assert!(Cli::try_parse_from(run.iter().chain(&["--runtime-threads", "0"])).is_err());
    }

    #[test]
    fn parses_a_minimal_run() {
        let cli = Cli::try_parse_from([
            "qp-worker",
            "run",
            "--name",
            "orders",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--source",
            "kafka",
            "--kafka-bootstrap",
            "127.0.0.1:9092",
            "--kafka-topic",
            "orders",
            "--handler",
            "echo",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("run expected")
        };
        assert_eq!(run.common.keys().prefix(), "qp:{default/orders}:");
        assert_eq!(run.handler, HandlerSpec::Echo);
        assert_eq!(run.max_concurrency, 16);
    }
}
