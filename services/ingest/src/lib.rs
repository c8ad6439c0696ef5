//! The ingest service: validates facts and dimension records, stamps
//! `ingest_time` from its clock and appends them to the JetStream stream
//! `PAYLEDGER_EVENTS`.
//!
//! Durability contract: `Publish` answers for an event only after the atomic batch
//! holding it was acknowledged by JetStream (which, configured as the project
//! requires, fsynced it). Retrying a call is safe: each event carries a
//! `Nats-Msg-Id` hashed from its identity and content, so an exact resend inside
//! the duplicate window is absorbed and answered with the original sequence.
//! Quiet partitions get heartbeats so that their days close (docs/semantics.md R5).

mod archiver;
mod clock;
mod dimensions;
mod heartbeat;
mod metrics;
mod publish_status;
mod publisher;
mod retention;
mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use payledger_server_common::config::{
    ServerArgs, StreamArgs, flag_defaults, format_duration, parse_duration,
};
use payledger_server_common::serve::{ServerOptions, serve_grpc};
use payledger_server_common::topology::{STREAM, StreamOptions, ensure_stream, stream_max_age};
use tokio::net::TcpListener;

pub use clock::{Clock, ManualClock, SystemClock};
pub use payledger_semantics::message_id;

#[derive(clap::Args, Clone, Debug)]
pub struct IngestConfig {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Most events one Publish call may carry; a larger call is refused whole.
    #[arg(long, env = "PAYLEDGER_MAX_BATCH_EVENTS", default_value_t = 1000)]
    pub max_batch_events: usize,
    /// Largest gRPC request accepted, in bytes.
    #[arg(long, env = "PAYLEDGER_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Publish calls handled at once. JetStream allows 50 atomic batches in
    /// flight per stream.
    #[arg(long, env = "PAYLEDGER_MAX_CONCURRENT_BATCHES", default_value_t = 32)]
    pub max_concurrent_batches: usize,
    /// Calls that may wait for a slot while --max-concurrent-batches are in
    /// flight; one more is refused at once with RESOURCE_EXHAUSTED, so that an
    /// overload is shed before it becomes latency for everyone.
    #[arg(long, env = "PAYLEDGER_MAX_QUEUED_BATCHES", default_value_t = 16)]
    pub max_queued_batches: usize,
    /// How long a queued call may wait for a slot before it is shed.
    #[arg(long, env = "PAYLEDGER_ADMISSION_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub admission_timeout: Duration,
    /// How long to wait for JetStream's acknowledgement of a batch.
    #[arg(long, env = "PAYLEDGER_ACK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// A partition with no record for this long gets a heartbeat; 0 turns heartbeats off.
    #[arg(long, env = "PAYLEDGER_HEARTBEAT_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Stream replicas when ingest creates the stream (3 in a cluster).
    #[arg(long, env = "PAYLEDGER_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// Ids acked within the duplicate window that ingest remembers, to answer resends
    /// without a round trip (about 100 bytes each); 0 turns the shortcut off.
    #[arg(long, env = "PAYLEDGER_RECENT_IDS", default_value_t = 1_000_000)]
    pub recent_ids_capacity: usize,
    /// JetStream's duplicate window for Nats-Msg-Id.
    #[arg(long, env = "PAYLEDGER_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub duplicate_window: Duration,
    /// How long JetStream keeps records (0s: for ever).
    ///
    /// Projectors and query read from the archive whatever the log has dropped, so
    /// this does not bound what they answer, and it need not cover the dedup
    /// horizon. It bounds how long a projector may be down and resume from its own
    /// checkpoint without reading the archive, and how far the archiver may fall
    /// behind before records are lost for good (alert: PayLedgerArchiveLag). With
    /// 7d a projector down for a week resumes from its checkpoint alone; longer
    /// costs only disk. The one minimum is JetStream's: --duplicate-window. Set
    /// when ingest creates the stream; on an existing stream the archiver (ingest
    /// with --archive-store) applies a new value when it starts, a shorter one once
    /// the archive holds every record it deletes.
    #[arg(long, env = "PAYLEDGER_STREAM_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub stream_max_age: Duration,
    /// Object storage to archive the log to (a directory, file:///…, s3://…); the
    /// archiver runs only when this is set.
    #[arg(long, env = "PAYLEDGER_ARCHIVE_STORE")]
    pub archive_store: Option<String>,
    /// An archive cut is written at the latest this long after its first record...
    #[arg(long, env = "PAYLEDGER_ARCHIVE_FLUSH_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub archive_flush_interval: Duration,
    /// ...or once it holds this many records.
    #[arg(long, env = "PAYLEDGER_ARCHIVE_CUT_RECORDS", default_value_t = 200_000)]
    pub archive_cut_records: usize,
    /// Largest message the stream stores, in bytes.
    #[arg(long, env = "PAYLEDGER_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: i32,
}

impl IngestConfig {
    /// The binary's defaults (its flags', see [`flag_defaults`]) with NATS at `nats_url`.
    pub fn new(nats_url: &str) -> Self {
        let mut config: Self = flag_defaults(&[]);
        config.server.nats.url = nats_url.to_string();
        config
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_batch_events >= 1,
            "--max-batch-events must be at least 1"
        );
        anyhow::ensure!(
            (1..=50).contains(&self.max_concurrent_batches),
            "--max-concurrent-batches must be within 1..=50 (JetStream's in-flight batch limit per stream)"
        );
        anyhow::ensure!(
            self.stream_max_age.is_zero() || self.stream_max_age >= self.duplicate_window,
            "--stream-max-age {} is shorter than --duplicate-window {}, which JetStream refuses (0s keeps records for ever)",
            format_duration(self.stream_max_age),
            format_duration(self.duplicate_window)
        );
        Ok(())
    }
}

/// Serves ingest on `listener` until `shutdown` resolves, with `clock` stamping ingest_time.
pub async fn run(
    config: IngestConfig,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate()?;
    let settings = config.stream.settings()?;
    let (client, losses) = config
        .server
        .nats
        .connect_watched("payledger-ingest")
        .await?;
    let js = async_nats::jetstream::new(client.clone());
    let recorded = ensure_stream(
        &js,
        &settings,
        &StreamOptions {
            replicas: config.stream_replicas,
            duplicate_window: config.duplicate_window,
            max_age: config.stream_max_age,
            max_message_bytes: config.max_message_bytes,
        },
    )
    .await?;
    if config.archive_store.is_none() {
        let current = stream_max_age(&js).await?;
        if current != config.stream_max_age {
            tracing::warn!(
                "stream {STREAM} keeps records for {}, --stream-max-age is {}: on an existing stream only the archiver \
                 (ingest with --archive-store) changes it, when it starts; without an archiver, run \
                 `nats stream edit {STREAM} --max-age={}` (without an archive, the log is the only history)",
                format_duration(current),
                format_duration(config.stream_max_age),
                format_duration(config.stream_max_age)
            );
        }
    }

    let probe_client = client.clone();
    let (stop_probe, stop_probe_rx) = tokio::sync::watch::channel(false);
    let local: SocketAddr = listener.local_addr()?;
    let mut registry = payledger_server_common::metrics::Registry::default();
    let metrics = metrics::IngestMetrics::register(&mut registry);
    // Follows the probe and every write of the publisher.
    let readiness =
        payledger_server_common::readiness::Readiness::with_interval(&config.server.readiness);
    let publisher = Arc::new(publisher::Publisher::new(
        client,
        losses,
        js.clone(),
        settings,
        &config,
        metrics.awaiting_ack.clone(),
        readiness.clone(),
    ));
    readiness.register(&mut registry);
    // Heartbeats stop first, so that the archiver's last cut holds everything
    // this process appended.
    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let (stop_archiver, archiver_stopped) = tokio::sync::watch::channel(false);
    let heartbeat = (!config.heartbeat_interval.is_zero()).then(|| {
        tokio::spawn(heartbeat::run(
            publisher.clone(),
            clock.clone(),
            config.heartbeat_interval,
            background_stopped,
        ))
    });
    let archive = match &config.archive_store {
        Some(location) => Some(payledger_storage::ArchiveStore::new(
            payledger_storage::open_store(location)?,
            recorded,
        )),
        None => None,
    };
    let dimensions =
        dimensions::DimensionIndex::new(js.clone(), archive.clone(), config.ack_timeout);
    let archiver = match archive {
        Some(archive) => {
            let tuning = archiver::ArchiverTuning {
                flush_interval: config.archive_flush_interval,
                max_cut_records: config.archive_cut_records.max(1),
                stall_timeout: config.server.nats.stall_timeout,
            };
            let (watermark, watermark_seen) = tokio::sync::watch::channel(None);
            let progress = archiver::Progress {
                metrics: metrics::ArchiverMetrics::register(&mut registry),
                watermark,
                lost_reported_through: Default::default(),
            };
            let retention = tokio::spawn(retention::watch(
                js.clone(),
                progress.metrics.clone(),
                watermark_seen,
                config.stream_max_age,
                archiver_stopped.clone(),
            ));
            let (js, stopped) = (js.clone(), archiver_stopped.clone());
            let partitions = settings.partitions;
            let archiver = tokio::spawn(async move {
                let mut stopped = stopped;
                loop {
                    match archiver::run(
                        js.clone(),
                        archive.clone(),
                        partitions,
                        tuning.clone(),
                        &progress,
                        stopped.clone(),
                    )
                    .await
                    {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(error = %e, "archiver failed; resuming from the archive's listing");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = stopped.changed() => return,
                            }
                        }
                    }
                }
            });
            Some((archiver, retention))
        }
        None => None,
    };
    tracing::info!(%local, partitions = settings.partitions, stream_fingerprint = %settings.fingerprint(), "ingest serving");
    let metrics_server = config
        .server
        .metrics
        .serve(registry, std::future::pending())
        .await?;
    let probe = readiness.spawn_probe(
        probe_client,
        Some(payledger_server_common::readiness::ProbeWriter::new(
            "ingest",
            config.stream_replicas,
        )),
        &config.server.readiness,
        stop_probe_rx,
    );
    let service = service::IngestApi::new(publisher, dimensions, clock, &config, metrics);
    let result = serve_grpc(
        Some(service.into_routes(config.max_request_bytes)),
        &["payledger.v1.IngestService"],
        listener,
        &ServerOptions {
            max_request_bytes: config.max_request_bytes,
            concurrency_per_connection: 256,
            tokens: config.server.access.tokens()?,
            tls: config.server.tls.clone(),
            serving_while: vec![("payledger.v1.IngestService", readiness.watch())],
        },
        shutdown,
    )
    .await;
    let _ = stop_probe.send(true);
    let _ = probe.await;
    let _ = stop_background.send(true);
    if let Some(task) = heartbeat {
        let _ = task.await;
    }
    let _ = stop_archiver.send(true);
    if let Some((archiver, retention)) = archiver {
        let _ = archiver.await;
        let _ = retention.await;
    }
    if let Some(task) = metrics_server {
        task.abort();
    }
    tracing::info!("ingest stopped");
    result
}
