//! Prometheus metrics: each service registers its own in a [`Registry`] and serves
//! them as text on `GET /metrics` at `--metrics-listen`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The families every server exports for its readiness (see `crate::readiness`);
/// named here with the rest, where the dashboard's metric list is checked against.
pub(crate) const READY: &str = "payledger_ready";
pub(crate) const READINESS_FAILING: &str = "payledger_readiness_failing";

/// Label sets as (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Latency buckets from 0.1 ms to about 6.5 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

#[derive(clap::Args, Clone, Debug, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on this address (GET /metrics), e.g. 0.0.0.0:9090;
    /// not served when unset.
    #[arg(long, env = "PAYLEDGER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl MetricsArgs {
    /// Starts serving `registry` when an address is set; the task ends with `shutdown`.
    pub async fn serve(
        &self,
        registry: Registry,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        let Some(address) = self.metrics_listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-listen {address}: {e}"))?;
        tracing::info!(local = %listener.local_addr()?, "metrics at /metrics");
        Ok(Some(tokio::spawn(serve_metrics(
            listener,
            Arc::new(registry),
            shutdown,
        ))))
    }
}

/// Answers `GET /metrics` with the registry in the Prometheus text format (404
/// elsewhere) until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(answer(request.uri().path(), &registry)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(path: &str, registry: &Registry) -> hyper::Response<Full<Bytes>> {
    let mut text = String::new();
    if path != "/metrics" || prometheus_client::encoding::text::encode(&mut text, registry).is_err()
    {
        return hyper::Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
            .expect("a static response");
    }
    hyper::Response::builder()
        .header(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}
