//! `qp-worker`: see `qp-worker --help`. All logic lives in the library.

use clap::Parser;
use qp_worker::cli::{Cli, Command};

/// jemalloc rather than glibc's malloc: a parked long poll holds a connection whose buffers
/// hyper allocates at 8 KiB and barely touches; glibc writes a chunk header into every one of
/// them and so makes their pages resident, jemalloc keeps no headers in the chunk and leaves
/// untouched pages unfaulted. Measured with 10,000 parked long polls (BENCHMARKS.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.runtime_threads())
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("qp-worker: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> std::process::ExitCode {
    let common = match &cli.command {
        Command::Run(a) => &a.common,
        Command::Gateway(a) => &a.common,
        Command::Replay(a) => &a.common,
    };
    qp_protocol::observability::init_tracing(common.log_format, "info");
    let stop = qp_worker::run::stop_on_signals();
    let res = match cli.command {
        Command::Run(args) => qp_worker::run::run(*args, stop).await,
        Command::Gateway(args) => qp_worker::gateway::run(*args, stop).await,
        Command::Replay(args) => match qp_worker::replay::replay(*args).await {
            // Ids asked for without a dead letter make the command fail, after the others.
            Ok(report) if !report.missing.is_empty() => {
                eprintln!(
                    "qp-worker: {} ids have no dead letter",
                    report.missing.len()
                );
                return std::process::ExitCode::FAILURE;
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        },
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "qp-worker failed");
            eprintln!("qp-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
