//! `payledger`: run the stack locally, generate traffic, ingest files, query exposure.

use std::process::ExitCode;

use clap::Parser;
use payledger_cli::commands::{self, Cli};
use payledger_cli::render::{Exit, Output};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Services log warnings only, to keep the output readable; RUST_LOG overrides.
    // Dropped when main returns: spans still buffered are exported then.
    let _telemetry = cli.command.runs_services().then(|| {
        payledger_server_common::telemetry::init_tracing_with_default("payledger", "warn")
    });
    let output = Output::new(cli.json);
    let ran = async {
        payledger_cli::connect::set_token(cli.token.as_deref())?;
        payledger_cli::connect::set_tls(&cli.tls)?;
        commands::run(cli.command, &output).await
    };
    let exit = ran.await.unwrap_or_else(|error| {
        eprintln!("Error: {error:?}");
        Exit::Error
    });
    ExitCode::from(exit.code())
}
