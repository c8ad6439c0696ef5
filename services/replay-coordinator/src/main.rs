//! `payledger-replay-coordinator`: plans and runs replays of the archive.

use std::net::SocketAddr;

use clap::Parser;
use payledger_replay_coordinator::CoordinatorConfig;

/// Plans replays of the archived log (one shard per partition by default), runs the
/// shards on projector replay workers with retries on another worker, commits the
/// authoritative snapshot of merchant_exposure_daily, and stores a reconciliation
/// report comparing it with the stream's rows. Replay state lives in NATS KV, so a
/// restarted coordinator carries on where it stopped.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Address to serve gRPC on (ReplayCoordinator, health, reflection).
    #[arg(long, env = "PAYLEDGER_LISTEN", default_value = "127.0.0.1:50054")]
    listen: SocketAddr,
    #[command(flatten)]
    config: CoordinatorConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Dropped last, after the service drained: buffered spans are exported then.
    let _telemetry =
        payledger_server_common::telemetry::init_tracing("payledger-replay-coordinator");
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    payledger_replay_coordinator::run(
        cli.config,
        listener,
        payledger_server_common::shutdown::signal_received(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, CoordinatorConfig};

    /// `payledger dev`, the bench and the in-process tests run `CoordinatorConfig::new`:
    /// it must be what this binary runs with only the workers given.
    #[test]
    fn the_library_config_is_what_the_binary_runs_with_only_its_workers() {
        let cli = Cli::try_parse_from([
            "payledger-replay-coordinator",
            "--workers",
            "http://w-0:50053,http://w-1:50053",
        ])
        .unwrap();
        let library = CoordinatorConfig::new(
            &cli.config.server.nats.url,
            &cli.config.store,
            cli.config.workers.clone(),
        );
        assert_eq!(format!("{library:?}"), format!("{:?}", cli.config));
    }
}
