//! The replay coordinator (DESIGN.md sections 2 and 5).
//!
//! A replay folds the archive from the beginning of history through a cutoff (a
//! watermark) and publishes the rows of a day range as a new commit of the
//! authoritative table. The coordinator splits it into shards of partitions, runs
//! them on projector replay workers (`RunShard`) in parallel with a per-worker
//! limit, retries a failed or vanished shard on another worker, verifies every part
//! (row count and content hash read back from storage), commits with put-if-absent
//! only when all shards are verified, then reconciles the snapshot with the stream's
//! provisional rows and stores the report. Replay state is kept in the NATS KV
//! bucket `replays`; a restarted coordinator resumes what was running.

mod metrics;
mod reconcile;
mod registry;
mod runner;
mod service;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use payledger_server_common::auth::Role;
use payledger_server_common::config::{AccessArgs, NatsArgs, parse_duration};
use payledger_server_common::serve::{ServerOptions, serve_grpc};
use payledger_server_common::topology::{
    DAILY_BUCKET, PROGRESS_BUCKET, STREAM, ensure_buckets, wait_for_settings,
};
use payledger_storage::{ArchiveStore, SnapshotStore, open_store};
use tokio::net::TcpListener;

pub use registry::REPLAYS_BUCKET;

#[derive(clap::Args, Clone, Debug)]
pub struct CoordinatorConfig {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub tls: payledger_server_common::tls::TlsArgs,
    #[command(flatten)]
    pub metrics: payledger_server_common::metrics::MetricsArgs,
    /// Object storage holding the archive and the authoritative table: a directory,
    /// file:///path or s3://bucket/prefix (the same location ingest archives to).
    #[arg(long, env = "PAYLEDGER_STORE", default_value = "./data")]
    pub store: String,
    /// Replay workers (projectors serving RunShard) as gRPC URLs, comma-separated,
    /// e.g. http://projector-0:50053,http://projector-1:50053.
    #[arg(
        long,
        env = "PAYLEDGER_WORKERS",
        value_delimiter = ',',
        required = true
    )]
    pub workers: Vec<String>,
    /// Shards one worker runs at once (keep it at most the workers'
    /// --max-concurrent-shards).
    #[arg(long, env = "PAYLEDGER_MAX_SHARDS_PER_WORKER", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_shards_per_worker: u16,
    /// Partitions folded by one shard (one part per partition either way).
    #[arg(long, env = "PAYLEDGER_PARTITIONS_PER_SHARD", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub partitions_per_shard: u32,
    /// Attempts per shard before the replay fails.
    #[arg(long, env = "PAYLEDGER_SHARD_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub shard_attempts: u32,
    /// An attempt that reports no progress for this long is abandoned and retried.
    #[arg(long, env = "PAYLEDGER_SHARD_STALL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub shard_stall_timeout: Duration,
    /// A worker whose attempt failed gets no new shard for this long (unless no
    /// other worker is left).
    #[arg(long, env = "PAYLEDGER_WORKER_COOLDOWN", default_value = "10s", value_parser = parse_duration)]
    pub worker_cooldown: Duration,
    /// Replays running at once; one more is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PAYLEDGER_MAX_ACTIVE_REPLAYS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_active_replays: u16,
    /// How long reconciliation waits for the stream projector to apply the log
    /// through the cutoff before comparing anyway (the report then says so).
    #[arg(long, env = "PAYLEDGER_RECONCILE_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub reconcile_wait: Duration,
    /// Differences listed in a stored reconciliation report (the counts are complete).
    #[arg(
        long,
        env = "PAYLEDGER_MAX_DIFFERENCES_STORED",
        default_value_t = 10_000
    )]
    pub max_differences_stored: usize,
    /// KV bucket replicas when the coordinator creates buckets.
    #[arg(long, env = "PAYLEDGER_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
}

impl CoordinatorConfig {
    pub fn new(nats_url: &str, store: &str, workers: Vec<String>) -> Self {
        Self {
            nats: NatsArgs::new(nats_url),
            access: AccessArgs::default(),
            tls: Default::default(),
            metrics: Default::default(),
            store: store.to_string(),
            workers,
            max_shards_per_worker: 1,
            partitions_per_shard: 1,
            shard_attempts: 3,
            shard_stall_timeout: Duration::from_secs(60),
            worker_cooldown: Duration::from_secs(10),
            max_active_replays: 4,
            reconcile_wait: Duration::from_secs(60),
            max_differences_stored: 10_000,
            kv_replicas: 1,
        }
    }
}

/// Serves the coordinator on `listener` until `shutdown`. Replays still running at
/// shutdown stay RUNNING in the KV bucket and are resumed by the next coordinator.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let workers = workers::Workers::new(
        &config.workers,
        config.max_shards_per_worker.into(),
        config.worker_cooldown,
    )?;
    let tokens = config.access.tokens()?;
    // RunShard needs the internal role.
    let internal_token = match tokens.as_ref().map(|t| t.token_of(Role::Internal)) {
        Some(Some(token)) => Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| anyhow::anyhow!("the internal token is not a valid header value"))?,
        ),
        Some(None) => anyhow::bail!(
            "--tokens-dir has no 'internal' token file: the coordinator needs it to call the workers' RunShard"
        ),
        None => None,
    };
    let client = config.nats.connect("payledger-replay-coordinator").await?;
    let js = async_nats::jetstream::new(client);
    let settings = wait_for_settings(&js).await;
    ensure_buckets(&js, config.kv_replicas).await?;
    let store = open_store(&config.store)?;
    let (registry, unfinished) = registry::Registry::open(&js, config.kv_replicas).await?;
    let registry = Arc::new(registry);
    let mut metrics_registry = payledger_server_common::metrics::Registry::default();
    let metrics = metrics::CoordinatorMetrics::register(&mut metrics_registry, registry.clone());
    let metrics_server = config
        .metrics
        .serve(metrics_registry, std::future::pending())
        .await?;
    let ctx = Arc::new(runner::Context {
        registry,
        metrics,
        workers: Arc::new(workers),
        archive: ArchiveStore::new(store.clone(), settings.fingerprint()),
        snapshots: SnapshotStore::new(store),
        settings,
        stream: js.get_stream(STREAM).await?,
        daily: js.get_key_value(DAILY_BUCKET).await?,
        daily_stream: js.get_stream(format!("KV_{DAILY_BUCKET}")).await?,
        progress: js.get_key_value(PROGRESS_BUCKET).await?,
        internal_token,
        limits: runner::Limits {
            partitions_per_shard: config.partitions_per_shard,
            shard_attempts: config.shard_attempts,
            shard_stall_timeout: config.shard_stall_timeout,
            max_active_replays: config.max_active_replays.into(),
            reconcile_wait: config.reconcile_wait,
            max_differences_stored: config.max_differences_stored,
        },
    });
    for id in unfinished {
        tracing::info!(replay = %id, "resuming a replay the previous coordinator left unfinished");
        tokio::spawn(runner::drive(ctx.clone(), id));
    }
    tracing::info!(workers = ?config.workers, store = %config.store, local = %listener.local_addr()?, "replay coordinator serving");
    serve_grpc(
        Some(tonic::service::Routes::new(
            service::CoordinatorApi { ctx }.into_service(),
        )),
        &["payledger.v1.ReplayCoordinator"],
        listener,
        &ServerOptions {
            max_request_bytes: 64 << 10,
            concurrency_per_connection: 64,
            tokens,
            tls: config.tls.clone(),
        },
        shutdown,
    )
    .await?;
    if let Some(task) = metrics_server {
        task.abort();
    }
    tracing::info!("replay coordinator stopped");
    Ok(())
}
