//! The `qp-worker` command line: one subcommand per mode. The settings of each mode are the
//! typed structs of `qp_protocol::settings`, which the operator renders into a pod's
//! environment (every flag has an environment fallback; secrets come from `secretKeyRef`, so they
//! never appear in the pod spec or in `ps`).

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
