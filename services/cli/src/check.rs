//! `payledger check`: is a service up? gRPC health answers SERVING and reflection
//! lists its services. What the Helm test hook and operators run.

use std::time::Duration;

use anyhow::Context;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// The services `url` lists through reflection, once its health says SERVING.
pub async fn check(url: &str) -> anyhow::Result<Vec<String>> {
    let channel = crate::connect::endpoint(url, "checked")?
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .with_context(|| format!("{url}: health check"))?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == ServingStatus::Serving as i32,
        "{url}: health answered {:?}, not SERVING",
        ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown)
    );
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let response = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .with_context(|| format!("{url}: reflection"))?
        .into_inner()
        .message()
        .await?
        .and_then(|r| r.message_response);
    match response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("{url}: reflection answered {other:?}"),
    }
}
