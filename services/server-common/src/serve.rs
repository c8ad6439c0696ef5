//! Serves a service's gRPC routes beside health and reflection, on a listener the
//! caller bound (so tests bind 127.0.0.1:0 and run the real server).

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;

/// Limits and access rules every server shares; each service exposes them as flags.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest decoded request message, in bytes.
    pub max_request_bytes: usize,
    /// Requests handled at once per connection.
    pub concurrency_per_connection: usize,
    /// Accepted bearer tokens per role; None: calls are not checked.
    pub tokens: Option<std::sync::Arc<crate::auth::TokenSource>>,
    /// TLS settings (see [`crate::tls::TlsArgs`]).
    pub tls: crate::tls::TlsArgs,
    /// Names in `served` whose health status follows a flag instead of being
    /// SERVING throughout: SERVING while it is true, NOT_SERVING while false (the
    /// replay coordinator's service on a standby replica, so that readiness routes
    /// calls to the leader only). The server as a whole ("") stays SERVING.
    pub serving_while: Vec<(&'static str, tokio::sync::watch::Receiver<bool>)>,
}

/// Serves `routes` plus `grpc.health.v1` (SERVING for each name in `served`, or as
/// `limits.serving_while` says, and for the server as a whole) and reflection of
/// the payledger protos (listing the services in `served` plus health and
/// reflection), until `shutdown`.
pub async fn serve_grpc(
    routes: Option<Routes>,
    served: &[&'static str],
    listener: TcpListener,
    limits: &ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in served {
        if limits.serving_while.iter().any(|(gated, _)| gated == name) {
            continue;
        }
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // Each flag is followed until this function returns and drops `followers`.
    let mut followers = tokio::task::JoinSet::new();
    for (name, flag) in &limits.serving_while {
        let (name, mut flag, health) = (*name, flag.clone(), health.clone());
        // Set before serving starts, so that no check sees it unknown.
        let serving = *flag.borrow_and_update();
        health.set_service_status(name, status_of(serving)).await;
        followers.spawn(async move {
            while flag.changed().await.is_ok() {
                let serving = *flag.borrow_and_update();
                health.set_service_status(name, status_of(serving)).await;
            }
        });
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    // Advertise only the services this server runs: the descriptor set holds every
    // payledger service, and listing one that answers UNIMPLEMENTED misleads.
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(payledger_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection");
    for name in served {
        reflection = reflection.with_service_name(*name);
    }
    let reflection = reflection.build_v1()?;
    let routes = match routes {
        Some(routes) => routes.add_service(health_service.clone()),
        None => Routes::new(health_service.clone()),
    }
    .add_service(reflection);
    let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopped_tx.send(true);
    };
    let router = Server::builder()
        .concurrency_limit_per_connection(limits.concurrency_per_connection)
        .layer(crate::trace_context::GrpcTraceLayer)
        .layer(crate::auth::AuthLayer::new(limits.tokens.clone()))
        .layer(crate::request_errors::RequestErrorsLayer::default())
        .add_routes(routes);
    match limits.tls.server_config()? {
        Some(config) => {
            if let Some(address) = limits.tls.health_listen {
                // Probes that cannot speak TLS get health, and nothing else, in plaintext.
                let plain = TcpListener::bind(address)
                    .await
                    .map_err(|e| anyhow::anyhow!("--health-listen {address}: {e}"))?;
                let mut stopped = stopped.clone();
                tokio::spawn(
                    Server::builder()
                        .add_service(health_service)
                        .serve_with_incoming_shutdown(TcpListenerStream::new(plain), async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        }),
                );
            }
            router
                .serve_with_incoming_shutdown(crate::tls::incoming(listener, config), shutdown)
                .await?;
        }
        None => {
            // Small responses must not wait for Nagle's algorithm: no delay on every connection.
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                if let Ok(stream) = &conn {
                    let _ = stream.set_nodelay(true);
                }
                conn
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
    }
    Ok(())
}

fn status_of(serving: bool) -> tonic_health::ServingStatus {
    match serving {
        true => tonic_health::ServingStatus::Serving,
        false => tonic_health::ServingStatus::NotServing,
    }
}
