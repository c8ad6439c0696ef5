//! Connections to the services, carrying the caller's bearer token (`--token`,
//! `PAYLEDGER_TOKEN`) on every call.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A connection whose calls carry the token.
pub type Conn = InterceptedService<Channel, Bearer>;

static TOKEN: OnceLock<Option<MetadataValue<Ascii>>> = OnceLock::new();
static TLS: OnceLock<Option<tonic::transport::ClientTlsConfig>> = OnceLock::new();

/// Sets the TLS settings every later connection uses (with https:// URLs).
pub fn set_tls(tls: &payledger_server_common::tls::ClientTlsArgs) -> anyhow::Result<()> {
    let _ = TLS.set(tls.config()?);
    Ok(())
}

/// Sets the token every later connection sends; call once, before connecting.
pub fn set_token(token: Option<&str>) -> anyhow::Result<()> {
    // A token file (or Secret key) may list several tokens for rotation: the first is ours.
    let first = token.and_then(|t| t.lines().map(str::trim).find(|l| !l.is_empty()));
    let value = first
        .map(|t| {
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| {
                    anyhow::anyhow!("--token: not a valid header value (printable ASCII only)")
                })
        })
        .transpose()?;
    let _ = TOKEN.set(value);
    Ok(())
}

#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An endpoint for `url` with the TLS settings, if any.
pub fn endpoint(url: &str, what: &str) -> anyhow::Result<Endpoint> {
    let mut endpoint = Channel::from_shared(url.to_string())
        .with_context(|| format!("{what} URL '{url}' is not a valid URI"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = TLS.get().cloned().flatten() {
        endpoint = endpoint
            .tls_config(tls)
            .with_context(|| format!("TLS settings for {url}"))?;
    }
    Ok(endpoint)
}

/// Connects to the `what` service (named in errors, with its `--{what}-url` flag).
pub async fn connect(url: &str, what: &str) -> anyhow::Result<Conn> {
    let channel = endpoint(url, what)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the {what} service at {url}; is `payledger dev` running, or is --{what}-url right?"))?;
    let token = TOKEN.get().cloned().flatten();
    Ok(InterceptedService::new(channel, Bearer(token)))
}
