//! `qp-operator`: see `qp-operator --help`. All logic lives in the library.

use clap::Parser;
use qp_operator::cli::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Run(a) => a.log_format,
        Command::Local(a) => a.log_format,
    };
    let format = match format {
        LogFormat::Text => qp_protocol::settings::LogFormat::Text,
        LogFormat::Json => qp_protocol::settings::LogFormat::Json,
    };
    qp_protocol::observability::init_tracing(format, "info,kube=warn");
    let res = match cli.command {
        Command::Run(args) => qp_operator::run::run(args).await,
        Command::Local(args) => qp_operator::local::run(args).await,
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "qp-operator failed");
            eprintln!("qp-operator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
