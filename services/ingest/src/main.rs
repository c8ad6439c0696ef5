//! `payledger-ingest`: the ingest gRPC service.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use payledger_ingest::{IngestConfig, SystemClock};

/// Validates payment events and dimension records and appends them, durably, to
/// the JetStream stream PAYLEDGER_EVENTS (created on first start).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Address to serve gRPC on.
    #[arg(long, env = "PAYLEDGER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    config: IngestConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Dropped last, after the service drained: buffered spans are exported then.
    let _telemetry = payledger_server_common::telemetry::init_tracing("payledger-ingest");
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    payledger_ingest::run(
        cli.config,
        Arc::new(SystemClock),
        listener,
        payledger_server_common::shutdown::signal_received(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, IngestConfig};

    /// `payledger dev`, the bench and the in-process tests run `IngestConfig::new`:
    /// it must be what this binary runs with no flags.
    #[test]
    fn the_library_config_is_what_the_binary_runs_without_flags() {
        let cli = Cli::try_parse_from(["payledger-ingest"]).unwrap();
        let library = IngestConfig::new(&cli.config.server.nats.url);
        assert_eq!(format!("{library:?}"), format!("{:?}", cli.config));
    }
}
