//! `payledger-query`: the query service.

use std::net::SocketAddr;

use clap::Parser;
use payledger_query::QueryConfig;

/// Answers exposure queries over gRPC: current balances, daily rows, and where
/// each answer came from.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Address to serve gRPC on.
    #[arg(long, env = "PAYLEDGER_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    #[command(flatten)]
    config: QueryConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Dropped last, after the service drained: buffered spans are exported then.
    let _telemetry = payledger_server_common::telemetry::init_tracing("payledger-query");
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    payledger_query::run(
        cli.config,
        listener,
        payledger_server_common::shutdown::signal_received(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, QueryConfig};

    /// `payledger dev`, the bench and the in-process tests run `QueryConfig::new`:
    /// it must be what this binary runs with no flags.
    #[test]
    fn the_library_config_is_what_the_binary_runs_without_flags() {
        let cli = Cli::try_parse_from(["payledger-query"]).unwrap();
        let library = QueryConfig::new(&cli.config.server.nats.url);
        assert_eq!(format!("{library:?}"), format!("{:?}", cli.config));
    }
}
