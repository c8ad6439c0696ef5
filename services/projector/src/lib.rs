//! The projector: the one place where the semantics runs against the live log.
//!
//! Stream mode owns a set of partitions. For each it restores the newest
//! checkpoint from object storage, reads the partition's subject in sequence
//! order from right after it, applies `payledger_semantics`, writes the changed
//! current and provisional daily rows to the KV buckets `exposure_current` and
//! `exposure_daily`, and checkpoints state plus log position. A partition that
//! fails restarts from its checkpoint; nothing is lost or counted twice because
//! the fold is deterministic and row writes never go backwards.
//!
//! Replay mode serves `ProjectorService.RunShard`: the same fold over the archive,
//! one shard of a replay at a time, written as snapshot parts (see `replay`).

mod bootstrap;
mod lease;
mod metrics;
mod partition;
pub mod replay;
mod rows;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use payledger_proto::v1;
use payledger_semantics::SEMANTICS_VERSION;
use payledger_server_common::config::{ProjectionArgs, ServerArgs, flag_defaults, parse_duration};
use payledger_server_common::serve::{ServerOptions, serve_grpc};
use payledger_server_common::topology::{
    CURRENT_BUCKET, DAILY_BUCKET, LEASE_BUCKET, PROGRESS_BUCKET, ensure_buckets, wait_for_settings,
};
use payledger_storage::{CheckpointStore, open_store};
use prost::Message;
use tokio::net::TcpListener;

pub use partition::Tuning;

/// What a projector process does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Project the owned partitions and serve RunShard.
    Both,
    /// Project the owned partitions only.
    Stream,
    /// Serve RunShard only (a replay worker).
    Replay,
}

impl Mode {
    fn streams(self) -> bool {
        self != Mode::Replay
    }
    fn replays(self) -> bool {
        self != Mode::Stream
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct ProjectorConfig {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub projection: ProjectionArgs,
    /// Stream projection, replay worker (RunShard), or both.
    #[arg(long, env = "PAYLEDGER_MODE", value_enum, default_value_t = Mode::Both)]
    pub mode: Mode,
    /// Object storage for checkpoints: a directory, file:///path or s3://bucket/prefix.
    #[arg(long, env = "PAYLEDGER_STORE", default_value = "./data")]
    pub store: String,
    /// Object storage holding the archive, the authoritative table and the replay
    /// states, which RunShard reads and writes and a partition without a usable
    /// checkpoint starts from; default: --store.
    #[arg(long, env = "PAYLEDGER_ARCHIVE_STORE")]
    pub archive_store: Option<String>,
    /// Shards this worker runs at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PAYLEDGER_MAX_CONCURRENT_SHARDS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_concurrent_shards: u16,
    /// Pace replay reading to at most this many records per second per shard, so a
    /// backfill leaves object storage and CPU to the live path; 0: unpaced.
    #[arg(
        long,
        env = "PAYLEDGER_REPLAY_MAX_RECORDS_PER_SEC",
        default_value_t = 0
    )]
    pub replay_max_records_per_sec: u64,
    /// Partitions this projector owns, e.g. "0-7" or "1,3,5"; empty: all of them.
    #[arg(long, env = "PAYLEDGER_OWN_PARTITIONS", default_value = "")]
    pub own_partitions: String,
    /// This pod's name in a StatefulSet (`payledger-projector-2`): with --replicas,
    /// the projector owns the partitions p with p % replicas == its ordinal, so that
    /// scaling re-balances deterministically. Overrides --own-partitions.
    #[arg(long, env = "PAYLEDGER_POD_NAME", requires = "replicas")]
    pub pod_name: Option<String>,
    /// Projector replicas in the StatefulSet (see --pod-name).
    #[arg(long, env = "PAYLEDGER_PROJECTOR_REPLICAS", value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: Option<u32>,
    /// A partition is applied only while this projector holds its lease in NATS KV
    /// (bucket `projector_leases`), renewed every quarter of this. A partition
    /// whose holder died is taken over after this long; one released on shutdown
    /// at once.
    #[arg(long, env = "PAYLEDGER_PARTITION_LEASE_TTL", default_value = "10s", value_parser = parse_lease_ttl)]
    pub partition_lease_ttl: Duration,
    /// Flush once this many merchant-currencies have changed rows.
    #[arg(long, env = "PAYLEDGER_FLUSH_ROWS", default_value_t = 2000)]
    pub flush_rows: usize,
    /// Flush at the latest this long after the first unflushed record.
    #[arg(long, env = "PAYLEDGER_FLUSH_INTERVAL", default_value = "50ms", value_parser = parse_duration)]
    pub flush_interval: Duration,
    /// Checkpoint after this many records...
    #[arg(
        long = "checkpoint-every",
        env = "PAYLEDGER_CHECKPOINT_EVERY",
        default_value_t = 100_000
    )]
    pub checkpoint_every_records: u64,
    /// ...or this long, whichever comes first.
    #[arg(long, env = "PAYLEDGER_CHECKPOINT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// Checkpoints kept per partition.
    #[arg(long, env = "PAYLEDGER_CHECKPOINTS_KEPT", default_value_t = 3)]
    pub checkpoints_kept: usize,
    /// KV bucket replicas when the projector creates them.
    #[arg(long, env = "PAYLEDGER_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// How long to wait for JetStream to acknowledge a row batch.
    #[arg(long, env = "PAYLEDGER_ACK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
}

impl ProjectorConfig {
    /// The binary's defaults (its flags', see [`flag_defaults`]) with NATS at
    /// `nats_url` and checkpoints in `store`.
    pub fn new(nats_url: &str, store: &str) -> Self {
        let mut config: Self = flag_defaults(&[]);
        config.server.nats.url = nats_url.to_string();
        config.store = store.to_string();
        config
    }
}

fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let ttl = parse_duration(s)?;
    if ttl < Duration::from_millis(500) || ttl > Duration::from_secs(600) {
        return Err(format!(
            "{s} is outside 500ms..=10m: shorter leases expire under normal pauses, longer ones stall a partition that long after a crash"
        ));
    }
    Ok(ttl)
}

/// Parses "0-3,7" into partition numbers below `partitions`; empty means all.
pub fn parse_partitions(spec: &str, partitions: u32) -> anyhow::Result<Vec<u32>> {
    if spec.trim().is_empty() {
        return Ok((0..partitions).collect());
    }
    let mut out = std::collections::BTreeSet::new();
    for part in spec.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>()?, b.trim().parse::<u32>()?),
            None => {
                let p = part.parse::<u32>()?;
                (p, p)
            }
        };
        anyhow::ensure!(
            lo <= hi && hi < partitions,
            "partition range '{part}' is outside 0..{partitions} (the stream has {partitions} partitions)"
        );
        out.extend(lo..=hi);
    }
    Ok(out.into_iter().collect())
}

/// The partitions of StatefulSet pod `pod_name` (its ordinal is the trailing
/// `-N`) among `replicas`: p % replicas == ordinal.
pub fn ordinal_partitions(
    pod_name: &str,
    replicas: u32,
    partitions: u32,
) -> anyhow::Result<Vec<u32>> {
    let ordinal: u32 = pod_name
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--pod-name '{pod_name}' does not end in -<ordinal> as StatefulSet pods do"
            )
        })?;
    anyhow::ensure!(
        ordinal < replicas,
        "--pod-name '{pod_name}' has ordinal {ordinal}, but --replicas is {replicas}"
    );
    Ok((0..partitions)
        .filter(|p| p % replicas == ordinal)
        .collect())
}

/// Projects the owned partitions and/or serves RunShard on `listener` (with health
/// and reflection), until `shutdown`.
pub async fn run(
    config: ProjectorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let mut registry = payledger_server_common::metrics::Registry::default();
    let metrics = metrics::ProjectorMetrics::register(&mut registry);
    // Follows the probe and the writes of rows, leases and progress.
    let readiness =
        payledger_server_common::readiness::Readiness::with_interval(&config.server.readiness);
    readiness.register(&mut registry);
    let metrics_server = config
        .server
        .metrics
        .serve(registry, std::future::pending())
        .await?;
    let (client, losses) = config
        .server
        .nats
        .connect_watched("payledger-projector")
        .await?;
    let js = async_nats::jetstream::new(client.clone());
    let (stream, settings) = wait_for_settings(&js, config.projection.settings()?).await?;
    ensure_buckets(&js, config.kv_replicas).await?;
    let owned = if config.mode.streams() {
        match (&config.pod_name, config.replicas) {
            (Some(pod), Some(replicas)) => ordinal_partitions(pod, replicas, settings.partitions)?,
            _ => parse_partitions(&config.own_partitions, settings.partitions)?,
        }
    } else {
        Vec::new()
    };
    let checkpoints = CheckpointStore::new(
        open_store(&config.store)?,
        config.checkpoints_kept,
        settings.version_key(),
    );
    let tuning = Arc::new(Tuning {
        flush_rows: config.flush_rows.max(1),
        flush_interval: config.flush_interval,
        checkpoint_every_records: config.checkpoint_every_records.max(1),
        checkpoint_interval: config.checkpoint_interval,
        ack_timeout: config.ack_timeout,
        stall_timeout: config.server.nats.stall_timeout,
    });
    let position_daily = |b: &[u8]| {
        v1::DailyRow::decode(b)
            .ok()
            .map(|r| fence_rank(r.semantics_version, r.log_position))
    };
    let position_current = |b: &[u8]| {
        v1::CurrentRow::decode(b)
            .ok()
            .map(|r| fence_rank(r.semantics_version, r.log_position))
    };
    let (rows, row_writer) = rows::RowSink::spawn(
        rows::RowWriter::new(
            client.clone(),
            js.get_key_value(DAILY_BUCKET).await?,
            DAILY_BUCKET,
            position_daily,
            config.ack_timeout,
            losses.clone(),
            readiness.clone(),
        ),
        rows::RowWriter::new(
            client.clone(),
            js.get_key_value(CURRENT_BUCKET).await?,
            CURRENT_BUCKET,
            position_current,
            config.ack_timeout,
            losses.clone(),
            readiness.clone(),
        ),
    );
    // The archive and the committed replay states: where a partition starts when
    // it has no usable checkpoint, and what fills in what the log lost.
    let stores = replay::ReplayStores::at(
        open_store(config.archive_store.as_deref().unwrap_or(&config.store))?,
        stream,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let leases = lease::PartitionLeases::new(
        js.get_key_value(LEASE_BUCKET).await?,
        config.pod_name.clone(),
        config.partition_lease_ttl,
        metrics.clone(),
        losses.clone(),
    )
    .reporting_to(readiness.clone());
    let mut tasks = Vec::new();
    for partition in owned.iter().copied() {
        let ctx = partition::PartitionContext {
            partition,
            settings,
            js: js.clone(),
            checkpoints: checkpoints.clone(),
            stores: stores.clone(),
            rows: rows.clone(),
            progress: js.get_key_value(PROGRESS_BUCKET).await?,
            tuning: tuning.clone(),
            metrics: metrics.clone(),
            losses: losses.clone(),
            readiness: readiness.clone(),
        };
        tasks.push(tokio::spawn(own_partition(
            ctx,
            leases.clone(),
            stopped.clone(),
        )));
    }
    let (routes, served_names) = if config.mode.replays() {
        let worker = worker::Worker {
            stores,
            settings,
            running: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_shards.into(),
            )),
            max_concurrent_shards: config.max_concurrent_shards.into(),
            max_records_per_sec: Some(config.replay_max_records_per_sec).filter(|r| *r > 0),
            metrics: metrics.clone(),
        };
        (
            Some(tonic::service::Routes::new(worker.into_service())),
            &["payledger.v1.ProjectorService"][..],
        )
    } else {
        (None, &[][..])
    };
    tracing::info!(mode = ?config.mode, partitions = ?owned, store = %config.store, version_key = %settings.version_key(), local = %listener.local_addr()?, "projector running");
    // Rows, leases and progress are JetStream writes: the probe writes too.
    let probe = readiness.spawn_probe(
        client.clone(),
        Some(payledger_server_common::readiness::ProbeWriter::new(
            "projector",
            config.kv_replicas,
        )),
        &config.server.readiness,
        stop.subscribe(),
    );
    let served = serve_grpc(
        routes,
        served_names,
        listener,
        &ServerOptions {
            max_request_bytes: 4 << 20,
            concurrency_per_connection: 64,
            tokens: config.server.access.tokens()?,
            tls: config.server.tls.clone(),
            // The readiness probe's name in every mode (docs/operations.md).
            serving_while: vec![("payledger.v1.ProjectorService", readiness.watch())],
        },
        shutdown,
    )
    .await;
    let _ = stop.send(true);
    let _ = probe.await;
    for task in tasks {
        let _ = task.await;
    }
    // Every partition has flushed; the writer ends once the last sender is gone.
    drop(rows);
    let _ = row_writer.await;
    if let Some(task) = metrics_server {
        task.abort();
    }
    tracing::info!("projector stopped");
    served
}

/// Where a stored row stands for the write fence: a row of another semantics
/// version ranks below every row of this one, so the fence keeps rows from moving
/// backwards within a version and a new version replaces the old one's rows (one
/// writer per partition, by lease).
fn fence_rank(semantics_version: u32, log_position: u64) -> u64 {
    if semantics_version == SEMANTICS_VERSION {
        log_position
    } else {
        0
    }
}

/// How long a refused partition waits before it looks at the log and the archive again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Applies one partition while holding its lease: waits for the lease, applies
/// until stopped (then flushes, checkpoints and releases it) and, when the lease
/// is lost, stops at once and waits for it again. A failing partition restarts
/// from its checkpoint and keeps its lease.
async fn own_partition(
    ctx: partition::PartitionContext,
    leases: lease::PartitionLeases,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let partition = ctx.partition;
    loop {
        let lease = match leases.acquire(partition, &mut stopped).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(partition, error = %e, "cannot read the partition's lease; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopped.changed() => return,
                }
            }
        };
        loop {
            let lost = lease.lost();
            let result = tokio::select! {
                result = partition::run(ctx.clone(), stopped.clone()) => result,
                reason = lost => {
                    // The next owner resumes from a checkpoint; whatever this one
                    // still writes is fenced by log_position.
                    tracing::warn!(partition, %reason, "lost the partition's lease; stopped applying it");
                    break;
                }
            };
            match result {
                Ok(()) => {
                    lease.release().await;
                    return;
                }
                Err(e) => {
                    // A refused partition waits for its records to reappear (a
                    // restored archive); anything else is retried at once.
                    let retry = if e.is::<bootstrap::Refused>() {
                        REFUSED_RETRY
                    } else {
                        tracing::error!(partition, error = %e, "partition failed; restarting from its checkpoint");
                        Duration::from_secs(1)
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = stopped.changed() => {
                            lease.release().await;
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statefulset_ordinals_split_the_partitions_without_overlap() {
        let all: Vec<Vec<u32>> = (0..5)
            .map(|i| ordinal_partitions(&format!("payledger-projector-{i}"), 5, 16).unwrap())
            .collect();
        assert_eq!(all[0], [0, 5, 10, 15]);
        assert_eq!(all[4], [4, 9, 14]);
        let mut union: Vec<u32> = all.concat();
        union.sort_unstable();
        assert_eq!(union, (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn a_pod_name_without_an_ordinal_or_beyond_the_replicas_is_refused() {
        assert!(ordinal_partitions("projector", 3, 16).is_err());
        let err = ordinal_partitions("payledger-projector-3", 3, 16).unwrap_err();
        assert!(err.to_string().contains("ordinal 3"), "{err}");
    }

    #[test]
    fn a_lease_ttl_outside_its_bounds_is_refused_with_the_reason() {
        assert_eq!(parse_lease_ttl("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_lease_ttl("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["499ms", "11m"] {
            let err = parse_lease_ttl(bad).unwrap_err();
            assert!(err.contains("outside 500ms..=10m"), "{bad}: {err}");
        }
        assert!(parse_lease_ttl("soon").is_err());
    }

    #[test]
    fn partition_specs_parse_and_out_of_range_is_refused() {
        assert_eq!(parse_partitions("0-2,7", 16).unwrap(), [0, 1, 2, 7]);
        assert_eq!(parse_partitions("", 4).unwrap(), [0, 1, 2, 3]);
        assert!(parse_partitions("15-16", 16).is_err());
    }
}
