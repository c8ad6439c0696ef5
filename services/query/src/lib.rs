//! The query service: point and range reads of merchant exposure over gRPC.
//!
//! Current rows and provisional daily rows live in memory, kept by watches of the
//! KV buckets the stream projector writes; dimension records are read from the log
//! itself. Every answer names its source and how far the stream has read.

mod api;
mod authoritative;
mod tables;

use std::future::Future;
use std::sync::Arc;

use payledger_server_common::config::{AccessArgs, NatsArgs};
use payledger_server_common::serve::{ServerLimits, serve_grpc};
use payledger_server_common::topology::{
    CURRENT_BUCKET, DAILY_BUCKET, PROGRESS_BUCKET, ensure_buckets, read_settings,
};
use tokio::net::TcpListener;

#[derive(clap::Args, Clone, Debug)]
pub struct QueryConfig {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub access: AccessArgs,
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
    /// How often the commit log is read for new commits.
    #[arg(long, env = "PAYLEDGER_COMMIT_POLL_INTERVAL", default_value = "2s", value_parser = payledger_server_common::config::parse_duration)]
    pub commit_poll_interval: std::time::Duration,
    /// Snapshot parts kept in memory.
    #[arg(long, env = "PAYLEDGER_CACHED_PARTS", default_value_t = 256)]
    pub cached_parts: usize,
    /// KV bucket replicas if the query service has to create the buckets.
    #[arg(long, env = "PAYLEDGER_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
}

impl QueryConfig {
    pub fn new(nats_url: &str) -> Self {
        Self {
            nats: NatsArgs::new(nats_url),
            access: AccessArgs::default(),
            max_watch_merchants: 1000,
            max_concurrent_requests: 256,
            store: None,
            commit_poll_interval: std::time::Duration::from_secs(2),
            cached_parts: 256,
            kv_replicas: 1,
        }
    }
}

pub async fn run(
    config: QueryConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let client = config.nats.connect("payledger-query").await?;
    let js = async_nats::jetstream::new(client);
    let settings = loop {
        match read_settings(&js).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::info!(error = %e, "waiting for the stream");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    ensure_buckets(&js, config.kv_replicas).await?;
    let tables = Arc::new(tables::Tables::default());
    let (changes, _) = tokio::sync::broadcast::channel(4096);

    let authoritative = match &config.store {
        Some(location) => {
            let snapshots =
                payledger_storage::SnapshotStore::new(payledger_storage::open_store(location)?);
            let auth = Arc::new(authoritative::Authoritative::new(
                snapshots,
                config.cached_parts,
            ));
            auth.refresh().await?;
            Some(auth)
        }
        None => None,
    };
    let mut followers = vec![
        tokio::spawn(tables::follow_bucket(
            js.get_key_value(CURRENT_BUCKET).await?,
            tables::current_applier(tables.clone(), changes.clone()),
        )),
        tokio::spawn(tables::follow_bucket(
            js.get_key_value(DAILY_BUCKET).await?,
            tables::daily_applier(tables.clone()),
        )),
        tokio::spawn(tables::follow_bucket(
            js.get_key_value(PROGRESS_BUCKET).await?,
            tables::progress_applier(tables.clone()),
        )),
        tokio::spawn(tables::follow_dimensions(js.clone(), tables.clone())),
    ];
    if let Some(auth) = &authoritative {
        followers.push(tokio::spawn(authoritative::follow_commits(
            auth.clone(),
            config.commit_poll_interval,
        )));
    }
    let api = api::QueryApi {
        authoritative,
        tables,
        settings,
        changes,
        max_watch_merchants: config.max_watch_merchants,
    };
    tracing::info!(local = %listener.local_addr()?, "query serving");
    let limits = ServerLimits {
        max_request_bytes: 1 << 20,
        concurrency_per_connection: config.max_concurrent_requests,
        tokens: config.access.tokens()?,
    };
    let follower_failed = async {
        let (result, _, _) = futures::future::select_all(followers).await;
        match result {
            Ok(Err(e)) => tracing::error!(error = %e, "a table follower stopped; shutting down"),
            other => tracing::error!(?other, "a table follower stopped; shutting down"),
        }
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
    .await?;
    tracing::info!("query stopped");
    Ok(())
}
