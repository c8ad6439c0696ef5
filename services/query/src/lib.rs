//! The query service: point and range reads of merchant exposure over gRPC.
//!
//! Current rows and provisional daily rows live in memory, kept by watches of the
//! KV buckets the stream projector writes; dimension records are read from the
//! archive through its highest watermark and from the log after it (`dims`). Every
//! answer names its source and how far the stream has read.

mod api;
mod authoritative;
mod dims;
mod metrics;
pub mod part_cache;
mod routing;
mod tables;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use payledger_server_common::config::{ProjectionArgs, ServerArgs, flag_defaults};
use payledger_server_common::serve::{ServerOptions, serve_grpc};
use payledger_server_common::topology::{
    CURRENT_BUCKET, DAILY_BUCKET, PROGRESS_BUCKET, ensure_buckets, wait_for_settings,
};
use tokio::net::TcpListener;

pub use api::REPORTING_INCOMPLETE;
pub use part_cache::{DiskTier, PartCache, PartCacheConfig, PartCacheCounters, PartCacheStats};

#[derive(clap::Args, Clone, Debug)]
pub struct QueryConfig {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The projection settings of the rows it serves (their version key is in
    /// every answer's provenance).
    #[command(flatten)]
    pub projection: ProjectionArgs,
    /// Most merchants one WatchCurrentExposure call may follow.
    #[arg(long, env = "PAYLEDGER_MAX_WATCH_MERCHANTS", default_value_t = 1000)]
    pub max_watch_merchants: usize,
    /// Requests handled at once per connection.
    #[arg(long, env = "PAYLEDGER_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Object storage holding the authoritative tables (a directory, file:///…, s3://…);
    /// without it every answer comes from the stream.
    #[arg(long, env = "PAYLEDGER_STORE")]
    pub store: Option<String>,
    /// Object storage holding the archive ingest's archiver writes, where the FX and
    /// risk records come from once the log's retention (max_age) has dropped them;
    /// default: --store. Without either, they come from the log alone.
    #[arg(long, env = "PAYLEDGER_ARCHIVE_STORE")]
    pub archive_store: Option<String>,
    /// How often the commit log is read for new commits (and the archive's watermarks
    /// while the log lacks FX or risk records the archive does not reach yet).
    #[arg(long, env = "PAYLEDGER_COMMIT_POLL_INTERVAL", default_value = "2s", value_parser = payledger_server_common::config::parse_duration)]
    pub commit_poll_interval: std::time::Duration,
    /// Memory for decoded snapshot parts (bytes, or with KiB, MiB, GiB; at least 1MiB).
    #[arg(long, env = "PAYLEDGER_CACHE_MEMORY_BYTES", default_value = "256MiB", value_parser = parse_cache_memory_bytes)]
    pub cache_memory_bytes: u64,
    /// Directory for the part cache's disk tier: parts evicted from memory, or read
    /// before a restart, come from here rather than from object storage. One process
    /// per directory (it is locked). Without it the cache is memory only, the default,
    /// since the service may run on a read-only filesystem: point it at a volume of
    /// its own to turn the disk tier on.
    #[arg(long, env = "PAYLEDGER_CACHE_DISK_DIR")]
    pub cache_disk_dir: Option<PathBuf>,
    /// Disk the part cache may fill under --cache-disk-dir (bytes, or with KiB, MiB,
    /// GiB; at least 16MiB). A part whose encoding exceeds 1/64 of it (a disk block,
    /// at most 64MiB) is cached in memory only.
    #[arg(long, env = "PAYLEDGER_CACHE_DISK_BYTES", default_value = "1GiB", value_parser = parse_cache_disk_bytes)]
    pub cache_disk_bytes: u64,
    /// KV bucket replicas if the query service has to create the buckets.
    #[arg(long, env = "PAYLEDGER_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
}

fn parse_cache_memory_bytes(text: &str) -> Result<u64, String> {
    payledger_server_common::config::parse_bytes(text).and_then(part_cache::check_memory_bytes)
}

fn parse_cache_disk_bytes(text: &str) -> Result<u64, String> {
    payledger_server_common::config::parse_bytes(text).and_then(part_cache::check_disk_bytes)
}

impl QueryConfig {
    pub fn part_cache(&self) -> PartCacheConfig {
        PartCacheConfig {
            memory_bytes: self.cache_memory_bytes,
            disk: self.cache_disk_dir.as_ref().map(|dir| DiskTier {
                dir: dir.clone(),
                bytes: self.cache_disk_bytes,
            }),
        }
    }

    /// The binary's defaults (its flags', see [`flag_defaults`]) with NATS at `nats_url`.
    pub fn new(nats_url: &str) -> Self {
        let mut config: Self = flag_defaults(&[]);
        config.server.nats.url = nats_url.to_string();
        config
    }
}

pub async fn run(
    config: QueryConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with_counters(config, listener, shutdown, Arc::default()).await
}

/// [`run`], counting the part cache's hits and misses into `counters`, which the
/// caller can read while the service runs (a metrics exporter, a benchmark).
pub async fn run_with_counters(
    config: QueryConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    counters: Arc<PartCacheCounters>,
) -> anyhow::Result<()> {
    let mut registry = payledger_server_common::metrics::Registry::default();
    let metrics = metrics::QueryMetrics::register(&mut registry, counters.clone());
    let readiness = payledger_server_common::readiness::Readiness::new();
    readiness.register(&mut registry);
    let metrics_server = config
        .server
        .metrics
        .serve(registry, std::future::pending())
        .await?;
    let client = config.server.nats.connect("payledger-query").await?;
    let js = async_nats::jetstream::new(client.clone());
    let (recorded, settings) = wait_for_settings(&js, config.projection.settings()?).await?;
    ensure_buckets(&js, config.kv_replicas).await?;
    let tables = Arc::new(tables::Tables::default());
    let (changes, _) = tokio::sync::broadcast::channel(4096);

    let archived = match config.archive_store.as_ref().or(config.store.as_ref()) {
        Some(location) => Some(Arc::new(dims::ArchivedDims::new(
            payledger_storage::ArchiveStore::new(
                payledger_storage::open_store(location)?,
                recorded,
            ),
        ))),
        None => None,
    };
    let authoritative = match (&config.store, &archived) {
        (Some(location), Some(archived)) => {
            let snapshots =
                payledger_storage::SnapshotStore::new(payledger_storage::open_store(location)?);
            let parts = PartCache::open(&config.part_cache(), snapshots.clone(), counters).await?;
            let auth = Arc::new(authoritative::Authoritative::new(
                snapshots,
                parts,
                archived.clone(),
            ));
            auth.refresh().await?;
            Some(auth)
        }
        _ => None,
    };
    // A JoinSet, so that the one follower found finished is taken out of it and
    // never awaited again when the rest are stopped.
    let mut followers = tokio::task::JoinSet::new();
    followers.spawn(tables::follow_bucket(
        js.get_key_value(CURRENT_BUCKET).await?,
        tables::current_applier(tables.clone(), changes.clone()),
        config.server.nats.stall_timeout,
    ));
    followers.spawn(tables::follow_bucket(
        js.get_key_value(DAILY_BUCKET).await?,
        tables::daily_applier(tables.clone()),
        config.server.nats.stall_timeout,
    ));
    followers.spawn(tables::follow_bucket(
        js.get_key_value(PROGRESS_BUCKET).await?,
        tables::progress_applier(tables.clone()),
        config.server.nats.stall_timeout,
    ));
    followers.spawn(dims::follow_dimensions_riding_out_restarts(
        js.clone(),
        tables.clone(),
        archived,
        config.commit_poll_interval,
    ));
    if let Some(auth) = &authoritative {
        followers.spawn(authoritative::follow_commits(
            auth.clone(),
            config.commit_poll_interval,
        ));
    }
    let api = api::QueryApi {
        authoritative: authoritative.clone(),
        tables,
        settings,
        changes,
        max_watch_merchants: config.max_watch_merchants,
        metrics,
    };
    tracing::info!(local = %listener.local_addr()?, "query serving");
    // Query writes nothing to NATS: ready while connected to it.
    let (stop_probe, probe_stopped) = tokio::sync::watch::channel(false);
    let probe = readiness.spawn_probe(client, None, &config.server.readiness, probe_stopped);
    let limits = ServerOptions {
        max_request_bytes: 1 << 20,
        concurrency_per_connection: config.max_concurrent_requests,
        tokens: config.server.access.tokens()?,
        tls: config.server.tls.clone(),
        serving_while: vec![("payledger.v1.QueryService", readiness.watch())],
    };
    // Followers ride out NATS restarts; one that still stops has tables it can no
    // longer keep right, so the service stops with its reason rather than serve them.
    let mut follower_error = None;
    let served = {
        let follower_failed = async {
            let why = match followers.join_next().await {
                Some(Ok(Err(e))) => e,
                Some(Ok(Ok(()))) => anyhow::anyhow!("a table follower ended"),
                Some(Err(e)) => anyhow::anyhow!("a table follower did not finish: {e}"),
                None => anyhow::anyhow!("no table follower was started"),
            };
            tracing::error!(
                error = format!("{why:#}"),
                "a table follower stopped; shutting down"
            );
            follower_error = Some(why);
        };
        let stop = async {
            tokio::select! {
                _ = shutdown => {}
                _ = follower_failed => {}
            }
        };
        serve_grpc(
            Some(api.into_routes()),
            &["payledger.v1.QueryService"],
            listener,
            &limits,
            stop,
        )
        .await
    };
    // Stop the followers before closing the part cache, so nothing holds it (nor its
    // disk directory's lock) once `run` returns: a restart in the same process, as in
    // tests and benchmarks, can open the directory again.
    followers.shutdown().await;
    let _ = stop_probe.send(true);
    let _ = probe.await;
    if let Some(auth) = authoritative {
        authoritative::log_cache_stats(&auth.cache_stats());
        auth.close().await;
    }
    if let Some(task) = metrics_server {
        task.abort();
    }
    served?;
    if let Some(why) = follower_error {
        return Err(why.context(
            "the query service stopped because it can no longer follow its tables; \
             started again, it rebuilds them from NATS",
        ));
    }
    tracing::info!("query stopped");
    Ok(())
}
