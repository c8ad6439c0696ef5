//! `payledger dev`: the whole stack on one machine — a private nats-server that
//! fsyncs every write, plus ingest (with the archiver), the stream projector, two
//! projector replay workers, the replay coordinator and query in this process, all
//! keeping their objects under `<data>/store`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use payledger_ingest::{IngestConfig, SystemClock};
use payledger_projector::{Mode, ProjectorConfig};
use payledger_query::QueryConfig;
use payledger_replay_coordinator::CoordinatorConfig;
use payledger_server_common::config::{ProjectionArgs, StreamArgs};
use payledger_server_common::local_nats::LocalNats;
use tokio::net::TcpListener;

#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Where NATS and the object store keep their data; a fresh temporary directory if omitted.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Ingest's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub ingest: SocketAddr,
    /// Query's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub query: SocketAddr,
    /// The stream projector's gRPC (health) address.
    #[arg(long, default_value = "127.0.0.1:50053")]
    pub projector: SocketAddr,
    /// The replay coordinator's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50054")]
    pub coordinator: SocketAddr,
    /// The replay workers' gRPC addresses (projectors in replay mode).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:50055,127.0.0.1:50056"
    )]
    pub workers: Vec<SocketAddr>,
    #[command(flatten)]
    pub stream: StreamArgs,
    #[command(flatten)]
    pub projection: ProjectionArgs,
}

pub struct DevStack {
    pub nats: LocalNats,
    pub ingest: SocketAddr,
    pub query: SocketAddr,
    pub projector: SocketAddr,
    pub coordinator: SocketAddr,
    pub data: PathBuf,
    _temp: Option<tempfile::TempDir>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl DevStack {
    pub async fn start(args: &DevArgs) -> anyhow::Result<DevStack> {
        let (temp, data) = match &args.data {
            Some(dir) => (None, dir.clone()),
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let nats = LocalNats::start(&data.join("nats"))?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = move || {
            let mut s = stopped.clone();
            async move {
                let _ = s.wait_for(|v| *v).await;
            }
        };
        let ingest_listener = TcpListener::bind(args.ingest).await?;
        let query_listener = TcpListener::bind(args.query).await?;
        let projector_listener = TcpListener::bind(args.projector).await?;
        let (ingest, query, projector) = (
            ingest_listener.local_addr()?,
            query_listener.local_addr()?,
            projector_listener.local_addr()?,
        );
        let store = data.join("store");
        let mut ingest_config = IngestConfig::new(&nats.url());
        ingest_config.stream = args.stream.clone();
        ingest_config.archive_store = Some(store.display().to_string());
        ingest_config.archive_flush_interval = std::time::Duration::from_secs(1);
        let store_location = store.display().to_string();
        let mut projector_config = ProjectorConfig::new(&nats.url(), &store_location);
        projector_config.mode = Mode::Stream;
        projector_config.projection = args.projection.clone();
        let mut query_config = QueryConfig::new(&nats.url());
        query_config.projection = args.projection.clone();
        query_config.store = Some(store_location.clone());
        let coordinator_listener = TcpListener::bind(args.coordinator).await?;
        let coordinator = coordinator_listener.local_addr()?;
        let mut worker_urls = Vec::new();
        let mut worker_tasks = Vec::new();
        for address in &args.workers {
            let listener = TcpListener::bind(address).await?;
            worker_urls.push(format!("http://{}", listener.local_addr()?));
            let mut config = ProjectorConfig::new(&nats.url(), &store_location);
            config.mode = Mode::Replay;
            config.projection = args.projection.clone();
            worker_tasks.push(tokio::spawn(payledger_projector::run(
                config,
                listener,
                until_stopped(),
            )));
        }
        let mut coordinator_config =
            CoordinatorConfig::new(&nats.url(), &store_location, worker_urls);
        coordinator_config.projection = args.projection.clone();
        // Ingest first: it creates the stream the others wait for.
        let mut tasks = vec![
            tokio::spawn(payledger_ingest::run(
                ingest_config,
                Arc::new(SystemClock),
                ingest_listener,
                until_stopped(),
            )),
            tokio::spawn(payledger_projector::run(
                projector_config,
                projector_listener,
                until_stopped(),
            )),
            tokio::spawn(payledger_query::run(
                query_config,
                query_listener,
                until_stopped(),
            )),
            tokio::spawn(payledger_replay_coordinator::run(
                coordinator_config,
                coordinator_listener,
                until_stopped(),
            )),
        ];
        tasks.extend(worker_tasks);
        Ok(DevStack {
            nats,
            ingest,
            query,
            projector,
            coordinator,
            data,
            _temp: temp,
            stop,
            tasks,
        })
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            task.await??;
        }
        self.nats.stop();
        Ok(())
    }
}
