//! `payledger-projector`: the stream projector and replay worker.

use std::net::SocketAddr;

use clap::Parser;
use payledger_projector::ProjectorConfig;

/// Applies the exposure semantics to the log, partition by partition, keeping the
/// KV tables exposure_current and exposure_daily and checkpointing to object storage;
/// and, as a replay worker, folds shards of the archive into snapshot parts (RunShard).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Address to serve gRPC on (RunShard, health, reflection).
    #[arg(long, env = "PAYLEDGER_LISTEN", default_value = "127.0.0.1:50053")]
    listen: SocketAddr,
    #[command(flatten)]
    config: ProjectorConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Dropped last, after the service drained: buffered spans are exported then.
    let _telemetry = payledger_server_common::telemetry::init_tracing("payledger-projector");
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    payledger_projector::run(
        cli.config,
        listener,
        payledger_server_common::shutdown::signal_received(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, ProjectorConfig};

    /// `payledger dev`, the bench and the in-process tests run `ProjectorConfig::new`:
    /// it must be what this binary runs with no flags.
    #[test]
    fn the_library_config_is_what_the_binary_runs_without_flags() {
        let cli = Cli::try_parse_from(["payledger-projector"]).unwrap();
        let library = ProjectorConfig::new(&cli.config.server.nats.url, &cli.config.store);
        assert_eq!(format!("{library:?}"), format!("{:?}", cli.config));
    }
}
