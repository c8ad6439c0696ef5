//! The query service: point and range reads of merchant exposure over gRPC.
//!
//! Current rows and provisional daily rows live in memory, kept by watches of the
//! KV buckets the stream projector writes; dimension records are read from the log
//! itself. Every answer names its source and how far the stream has read.

mod api;
mod tables;

use std::future::Future;
use std::sync::Arc;

use payledger_server_common::config::NatsArgs;
use payledger_server_common::serve::{ServerLimits, serve_grpc};
use payledger_server_common::topology::{
    CURRENT_BUCKET, DAILY_BUCKET, PROGRESS_BUCKET, ensure_buckets, read_settings,
};
use tokio::net::TcpListener;

#[derive(clap::Args, Clone, Debug)]
pub struct QueryConfig {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Most merchants one WatchCurrentExposure call may follow.
    #[arg(long, env = "PAYLEDGER_MAX_WATCH_MERCHANTS", default_value_t = 1000)]
    pub max_watch_merchants: usize,
    /// Requests handled at once per connection.
    #[arg(long, env = "PAYLEDGER_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// KV bucket replicas if the query service has to create the buckets.
    #[arg(long, env = "PAYLEDGER_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
}

impl QueryConfig {
    pub fn new(nats_url: &str) -> Self {
        Self {
            nats: NatsArgs::new(nats_url),
            max_watch_merchants: 1000,
            max_concurrent_requests: 256,
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

    let followers = vec![
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
    let api = api::QueryApi {
        tables,
        settings,
        changes,
        max_watch_merchants: config.max_watch_merchants,
    };
    tracing::info!(local = %listener.local_addr()?, "query serving");
    let limits = ServerLimits {
        max_request_bytes: 1 << 20,
        concurrency_per_connection: config.max_concurrent_requests,
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
