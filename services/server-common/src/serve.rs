//! Serves a service's gRPC routes beside health and reflection, on a listener the
//! caller bound (so tests bind 127.0.0.1:0 and run the real server).

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;

/// Limits every server shares; each service exposes them as flags.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Largest decoded request message, in bytes.
    pub max_request_bytes: usize,
    /// Requests handled at once per connection.
    pub concurrency_per_connection: usize,
}

/// Serves `routes` plus `grpc.health.v1` (SERVING for each name in `served`, and for
/// the server as a whole) and reflection of the payledger protos, until `shutdown`.
pub async fn serve_grpc(
    routes: Option<Routes>,
    served: &[&'static str],
    listener: TcpListener,
    limits: &ServerLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in served {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(payledger_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = match routes {
        Some(routes) => routes.add_service(health_service),
        None => Routes::new(health_service),
    }
    .add_service(reflection);
    Server::builder()
        .concurrency_limit_per_connection(limits.concurrency_per_connection)
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
