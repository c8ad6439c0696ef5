//! The replay coordinator (docs/architecture.md, docs/storage.md).
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
//!
//! In a cluster the workers are the ready endpoints of the projectors' headless
//! Service (`discovery`), and of several coordinator replicas only the holder of a
//! Lease plans and runs replays (`leader`). Without `--workers-service` and
//! `--lease-name` the coordinator never talks to the Kubernetes API. With
//! `--worker-ca` it calls the workers over TLS (`workers`).

mod discovery;
#[cfg(test)]
#[path = "../tests/support/fake_kube.rs"]
mod fake_kube;
mod leader;
mod lifecycle;
mod metrics;
mod reconcile;
mod registry;
mod runner;
mod service;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use payledger_server_common::config::{ProjectionArgs, ServerArgs, flag_defaults, parse_duration};
use payledger_server_common::serve::{ServerOptions, serve_grpc};
use payledger_server_common::topology::{
    DAILY_BUCKET, PROGRESS_BUCKET, STREAM, ensure_buckets, wait_for_settings,
};
use payledger_storage::{ArchiveStore, SnapshotStore, StateStore, open_store};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::leader::{Leadership, LeaseElector, LeaseSettings};
use crate::runner::Context;

pub use registry::REPLAYS_BUCKET;

/// The gRPC service the coordinator serves. Its health status is SERVING only
/// while this replica leads (always, without a Lease), NOT_SERVING on a standby;
/// the server as a whole ("") is SERVING either way.
pub use payledger_proto::v1::replay_coordinator_server::SERVICE_NAME;
pub use workers::WorkerTlsArgs;

#[derive(clap::Args, Clone, Debug)]
pub struct CoordinatorConfig {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The projection settings of the replays it plans: with the stream's, they
    /// make the version key the workers must fold under.
    #[command(flatten)]
    pub projection: ProjectionArgs,
    /// Object storage holding the archive and the authoritative table: a directory,
    /// file:///path or s3://bucket/prefix (the same location ingest archives to).
    #[arg(long, env = "PAYLEDGER_STORE", default_value = "./data")]
    pub store: String,
    /// Replay workers (projectors serving RunShard) as gRPC URLs, comma-separated,
    /// e.g. http://projector-0:50053,http://projector-1:50053. Not used with
    /// --workers-service.
    #[arg(
        long,
        env = "PAYLEDGER_WORKERS",
        value_delimiter = ',',
        required_unless_present = "workers_service"
    )]
    pub workers: Vec<String>,
    /// In a cluster: the projectors' headless Service. Its ready endpoints (from
    /// its EndpointSlices, watched) are the replay workers, on the port named grpc.
    #[arg(long, env = "PAYLEDGER_WORKERS_SERVICE")]
    pub workers_service: Option<String>,
    #[command(flatten)]
    pub worker_tls: WorkerTlsArgs,
    /// Namespace of --workers-service and --lease-name (default: the pod's own, or
    /// the kubeconfig context's).
    #[arg(long, env = "PAYLEDGER_NAMESPACE")]
    pub namespace: Option<String>,
    /// A coordination.k8s.io Lease: of several coordinator replicas, only its
    /// holder plans and runs replays; the others answer StartReplay UNAVAILABLE.
    #[arg(long, env = "PAYLEDGER_LEASE_NAME", requires = "pod_name")]
    pub lease_name: Option<String>,
    /// This replica's holder identity in the Lease: its pod name.
    #[arg(long, env = "PAYLEDGER_POD_NAME")]
    pub pod_name: Option<String>,
    /// A Lease not renewed for this long may be taken by another replica (whole seconds).
    #[arg(long, env = "PAYLEDGER_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How often the Lease is renewed, and read by the other replicas (at most a
    /// third of --lease-duration).
    #[arg(long, env = "PAYLEDGER_LEASE_RENEW_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub lease_renew_interval: Duration,
    /// The Kubernetes API server, reached without credentials (e.g.
    /// http://127.0.0.1:8001 of `kubectl proxy`). Default: the pod's service
    /// account in a cluster, else the kubeconfig.
    #[arg(long, env = "PAYLEDGER_KUBE_API")]
    pub kube_api: Option<String>,
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
    /// How long a replay asked for without a cutoff waits for the archive to reach
    /// the stream's last sequence at the request before it fails
    /// (docs/operations.md, "Read-your-writes").
    #[arg(long, env = "PAYLEDGER_ARCHIVE_WAIT", default_value = "120s", value_parser = parse_duration)]
    pub archive_wait: Duration,
    /// How long reconciliation waits for the stream projector to apply the log
    /// through the cutoff before comparing anyway (the report then says so).
    #[arg(long, env = "PAYLEDGER_RECONCILE_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub reconcile_wait: Duration,
    /// How long a commit the object store fails (unreachable, erroring) is tried
    /// again, every second, before the replay fails; a commit is published whole or
    /// not at all, so a retry is safe.
    #[arg(long, env = "PAYLEDGER_COMMIT_RETRY_FOR", default_value = "60s", value_parser = parse_duration)]
    pub commit_retry_for: Duration,
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
    /// The binary's defaults (its flags', see [`flag_defaults`]) with NATS at
    /// `nats_url`, the archive and tables in `store`, and `workers` as the replay
    /// workers.
    pub fn new(nats_url: &str, store: &str, workers: Vec<String>) -> Self {
        // The flags need workers or a workers Service; the list given replaces them.
        let mut config: Self = flag_defaults(&["--workers", "http://127.0.0.1:50053"]);
        config.server.nats.url = nats_url.to_string();
        config.store = store.to_string();
        config.workers = workers;
        config
    }
}

/// kube's TLS goes through rustls, which finds two crypto providers compiled into
/// this binary (ring, and aws-lc-rs for object_store) and so picks neither by
/// itself: name one for the process.
fn install_crypto_provider() {
    // Err only when one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The Kubernetes API client, for discovery and the Lease.
async fn kube_client(config: &CoordinatorConfig) -> anyhow::Result<kube::Client> {
    install_crypto_provider();
    match &config.kube_api {
        Some(url) => {
            let url = url
                .parse()
                .map_err(|e| anyhow::anyhow!("--kube-api: '{url}' is not a URL: {e}"))?;
            Ok(kube::Client::try_from(kube::Config::new(url))?)
        }
        None => kube::Client::try_default().await.context(
            "--workers-service and --lease-name need the Kubernetes API: no in-cluster service account nor kubeconfig found",
        ),
    }
}

/// Takes over the replays as the leader: reads them again from the KV bucket
/// (another coordinator may have led meanwhile) and resumes the unfinished ones.
async fn lead(ctx: &Arc<Context>) -> anyhow::Result<()> {
    let unfinished = ctx.registry.reload().await?;
    ctx.drivers.lead();
    for id in unfinished {
        tracing::info!(replay = %id, "resuming a replay left unfinished");
        ctx.drivers.start(ctx, id);
    }
    Ok(())
}

/// Follows the Lease. On taking it: `lead`. On losing it: abandons the replays
/// this coordinator drives. They stay as the KV bucket has them (RUNNING, with
/// their finished shards), and the next leader resumes them, as after a
/// coordinator restart, re-running only the shards that were not done. Letting
/// them run on instead would have two coordinators drive one replay once the new
/// leader resumes it, both writing its state. The old leader stops at least a
/// third of a lease duration before another can take over (`leader`), so the two
/// never overlap. A standby re-reads the replays every `refresh`, so that its
/// GetReplay, ListReplays and WatchReplay answers stay current.
async fn follow_leadership(
    ctx: Arc<Context>,
    mut leadership: watch::Receiver<Leadership>,
    refresh: Duration,
) {
    loop {
        let leading = *leadership.borrow_and_update() == Leadership::Leading;
        if leading && !ctx.drivers.leading() {
            if let Err(error) = lead(&ctx).await {
                tracing::warn!(%error, "could not read the replays to take over; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        } else if !leading && ctx.drivers.leading() {
            let abandoned = ctx.drivers.stand_down();
            let count = abandoned.len();
            for task in abandoned {
                let _ = task.await;
            }
            tracing::warn!(
                replays = count,
                "lost the Lease: abandoned the replays this coordinator drove; the next leader resumes them"
            );
        }
        tokio::select! {
            changed = leadership.changed() => if changed.is_err() {
                return;
            },
            () = tokio::time::sleep(refresh), if !leading => {
                if let Err(error) = ctx.registry.reload().await {
                    tracing::debug!(%error, "could not re-read the replays");
                }
            }
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
    let lease = match &config.lease_name {
        Some(name) => {
            let settings = LeaseSettings {
                name: name.clone(),
                identity: config.pod_name.clone().unwrap_or_default(),
                duration: config.lease_duration,
                renew_interval: config.lease_renew_interval,
            };
            settings.validate()?;
            Some(settings)
        }
        None => None,
    };
    // Only a coordinator told to use the Kubernetes API talks to it.
    let kube = match config.workers_service.is_some() || lease.is_some() {
        true => {
            let client = kube_client(&config).await?;
            let namespace = config
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string());
            Some((client, namespace))
        }
        false => None,
    };
    let worker_tls = config.worker_tls.load(config.workers_service.as_deref())?;
    let workers = Arc::new(match &config.workers_service {
        Some(_) => workers::Workers::discovered(
            config.max_shards_per_worker.into(),
            config.worker_cooldown,
            worker_tls,
        ),
        None => workers::Workers::new(
            &config.workers,
            config.max_shards_per_worker.into(),
            config.worker_cooldown,
            worker_tls,
        )?,
    });
    let tokens = config.server.access.tokens()?;
    // RunShard needs the internal role.
    if let Some(tokens) = &tokens {
        runner::internal_bearer(&tokens.current())?;
    }
    let client = config
        .server
        .nats
        .connect("payledger-replay-coordinator")
        .await?;
    let js = async_nats::jetstream::new(client);
    let (recorded, settings) = wait_for_settings(&js, config.projection.settings()?).await?;
    ensure_buckets(&js, config.kv_replicas).await?;
    let store = open_store(&config.store)?;
    let registry = Arc::new(registry::Registry::open(&js, config.kv_replicas).await?);
    let mut metrics_registry = payledger_server_common::metrics::Registry::default();
    let metrics = metrics::CoordinatorMetrics::register(&mut metrics_registry, registry.clone());
    let metrics_server = config
        .server
        .metrics
        .serve(metrics_registry, std::future::pending())
        .await?;
    let (leadership_tx, leadership) = watch::channel(match lease {
        Some(_) => Leadership::Following { holder: None },
        None => Leadership::Leading,
    });
    let ctx = Arc::new(runner::Context {
        registry,
        metrics,
        workers: workers.clone(),
        archive: ArchiveStore::new(store.clone(), recorded),
        snapshots: SnapshotStore::new(store.clone()),
        states: StateStore::new(store),
        settings,
        stream: js.get_stream(STREAM).await?,
        daily: js.get_key_value(DAILY_BUCKET).await?,
        daily_stream: js.get_stream(format!("KV_{DAILY_BUCKET}")).await?,
        progress: js.get_key_value(PROGRESS_BUCKET).await?,
        tokens: tokens.clone(),
        limits: runner::Limits {
            partitions_per_shard: config.partitions_per_shard,
            shard_attempts: config.shard_attempts,
            shard_stall_timeout: config.shard_stall_timeout,
            max_active_replays: config.max_active_replays.into(),
            archive_wait: config.archive_wait,
            reconcile_wait: config.reconcile_wait,
            max_differences_stored: config.max_differences_stored,
            commit_retry_for: config.commit_retry_for,
        },
        drivers: Default::default(),
        leadership: leadership.clone(),
        lease: lease.clone(),
        verified: Default::default(),
    });
    // Background tasks that end with `run`.
    let mut tasks = tokio::task::JoinSet::new();
    if let (Some(service), Some((client, namespace))) = (&config.workers_service, &kube) {
        if !config.workers.is_empty() {
            tracing::info!(%service, "discovering the replay workers; --workers is not used");
        }
        tasks.spawn(discovery::follow_workers(
            client.clone(),
            namespace.clone(),
            service.clone(),
            workers,
        ));
    }
    let (stop_lease, lease_stopped) = tokio::sync::oneshot::channel::<()>();
    let holder = match (&lease, &kube) {
        (Some(settings), Some((client, namespace))) => {
            let elector = LeaseElector::new(client.clone(), namespace, settings.clone());
            tasks.spawn(follow_leadership(
                ctx.clone(),
                leadership,
                settings.renew_interval,
            ));
            Some(tokio::spawn(leader::hold(elector, leadership_tx, async {
                let _ = lease_stopped.await;
            })))
        }
        _ => {
            // No Lease: this coordinator is the only one, and leads from the start.
            lead(&ctx).await?;
            None
        }
    };
    tracing::info!(workers = ?config.workers, workers_service = ?config.workers_service, worker_tls = config.worker_tls.worker_ca.is_some(), lease = ?config.lease_name, store = %config.store, local = %listener.local_addr()?, "replay coordinator serving");
    let served = serve_grpc(
        Some(tonic::service::Routes::new(
            service::CoordinatorApi { ctx: ctx.clone() }.into_service(),
        )),
        &[SERVICE_NAME],
        listener,
        &ServerOptions {
            max_request_bytes: 64 << 10,
            concurrency_per_connection: 64,
            tokens,
            tls: config.server.tls.clone(),
            // Readiness: only the leader takes StartReplay and CancelReplay, so a
            // standby is NOT_SERVING and a Service routes calls to the leader.
            serving_while: vec![(SERVICE_NAME, ctx.drivers.on_leading())],
        },
        shutdown,
    )
    .await;
    // Replays still running stay RUNNING in the KV bucket; the Lease goes last,
    // released so that a standby takes over at once.
    tasks.shutdown().await;
    for task in ctx.drivers.stand_down() {
        let _ = task.await;
    }
    if let Some(holder) = holder {
        let _ = stop_lease.send(());
        let _ = holder.await;
    }
    if let Some(task) = metrics_server {
        task.abort();
    }
    served?;
    tracing::info!("replay coordinator stopped");
    Ok(())
}
