//! The `payledger` commands, one module per command or command group. Each
//! parses its flags, does its calls and hands its reports to the rendering layer
//! (`crate::render`), which prints them and decides the exit status.

mod bench;
mod check;
mod dev;
mod ingest;
mod query;
mod reconcile;
mod replay;
mod traffic;

use clap::{Parser, Subcommand};

use crate::render::{EXIT_STATUS_HELP, Exit, Output};

/// PayLedger: merchant exposure from one canonical log of payment facts.
///
/// Start a local stack with `payledger dev`, send traffic with `payledger gen
/// --send`, and read exposure with `payledger query current m-00001`.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true, after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// Print machine-readable JSON (one value per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Bearer token sent with every call (the role the command needs: producer for
    /// ingest and gen --send, reader for query, operator for replay and reconcile).
    #[arg(long, env = "PAYLEDGER_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: payledger_server_common::tls::ClientTlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Endpoints {
    /// Ingest service URL.
    #[arg(
        long,
        env = "PAYLEDGER_INGEST_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub ingest_url: String,
    /// Query service URL.
    #[arg(
        long,
        env = "PAYLEDGER_QUERY_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    pub query_url: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run nats-server, ingest, projector and query on this machine until Ctrl-C or SIGTERM.
    Dev(crate::dev::DevArgs),
    /// Run the stack, send a short generated workload, print a few merchants' exposure, stop.
    Demo(dev::DemoArgs),
    /// Generate realistic traffic: to a JSON-lines file, or straight to ingest with --send.
    Gen(traffic::GenArgs),
    /// Send a file of events, FX rates or risk tiers (CSV or JSON lines) to the
    /// ingest service, line by line as it is read.
    #[command(after_help = ingest::AFTER_HELP)]
    Ingest(ingest::IngestArgs),
    /// Read exposure from the query service.
    #[command(subcommand)]
    Query(query::QueryCommand),
    /// Compare the committed snapshots with the stream's rows and say why they
    /// differ. Exit status 3 when a row is divergent or missing (with --json too).
    Reconcile(reconcile::ReconcileArgs),
    /// Replay archived history and commit the authoritative daily table: through the
    /// replay coordinator (start, status, list, cancel) or in this process (run).
    #[command(subcommand)]
    Replay(replay::ReplayCommand),
    /// Check that services are up: gRPC health answers SERVING and reflection lists
    /// their services. Exits 1 naming the first that is not (the Helm test hook runs it).
    Check {
        /// Service URLs, e.g. http://payledger-query:50052.
        #[arg(required = true)]
        urls: Vec<String>,
    },
    /// Measure ingest, projection, freshness and the fold against baselines (use a release build).
    Bench(payledger_bench::BenchArgs),
}

impl Command {
    /// Commands that run services in this process, whose logs are worth showing.
    pub fn runs_services(&self) -> bool {
        matches!(self, Command::Dev(_) | Command::Demo(_) | Command::Bench(_))
    }
}

/// Runs the command; its reports are printed as `out` says.
pub async fn run(command: Command, out: &Output) -> anyhow::Result<Exit> {
    match command {
        Command::Dev(args) => dev::dev(args, out).await,
        Command::Demo(args) => dev::demo(args, out).await,
        Command::Gen(args) => traffic::run(args, out).await,
        Command::Ingest(args) => ingest::run(args, out).await,
        Command::Query(command) => query::run(command, out).await,
        Command::Reconcile(args) => reconcile::run(args, out).await,
        Command::Replay(command) => replay::run(command, out).await,
        Command::Check { urls } => check::run(urls, out).await,
        Command::Bench(args) => bench::run(args, out).await,
    }
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

use payledger_server_common::clock::now_us;
