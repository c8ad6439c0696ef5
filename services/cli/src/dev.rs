//! `payledger dev`: the whole stack on one machine — a private nats-server that
//! fsyncs every write, plus ingest (with the archiver), projector and query in this
//! process, all keeping their objects under `<data>/store`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use payledger_ingest::{IngestConfig, SystemClock};
use payledger_projector::ProjectorConfig;
use payledger_query::QueryConfig;
use payledger_server_common::config::SemanticsArgs;
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
    /// Projector's gRPC (health) address.
    #[arg(long, default_value = "127.0.0.1:50053")]
    pub projector: SocketAddr,
    #[command(flatten)]
    pub semantics: SemanticsArgs,
}

pub struct DevStack {
    pub nats: LocalNats,
    pub ingest: SocketAddr,
    pub query: SocketAddr,
    pub projector: SocketAddr,
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
        ingest_config.semantics = args.semantics.clone();
        ingest_config.archive_store = Some(store.display().to_string());
        ingest_config.archive_flush_interval = std::time::Duration::from_secs(1);
        let projector_config =
            ProjectorConfig::new(&nats.url(), store.to_str().unwrap_or("./data"));
        let mut query_config = QueryConfig::new(&nats.url());
        query_config.store = Some(store.display().to_string());
        // Ingest first: it creates the stream the others wait for.
        let tasks = vec![
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
        ];
        Ok(DevStack {
            nats,
            ingest,
            query,
            projector,
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
