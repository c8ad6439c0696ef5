//! TLS for every gRPC server (rustls): certificate, key and an optional client CA
//! read from files and read again when they change, so a rotated certificate (a
//! renewed Kubernetes Secret) is served without a restart. And the client side:
//! a CA to trust and an optional client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::reload::Reloading;

/// TLS handshakes in progress at once per server; more wait to be accepted.
const MAX_HANDSHAKES: usize = 256;
/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Serve gRPC over TLS with this certificate chain (PEM); with --tls-key.
    /// Both files are read again when they change.
    #[arg(long, env = "PAYLEDGER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "PAYLEDGER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "PAYLEDGER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// With TLS, also serve gRPC health (only) in plaintext here, for probes that
    /// cannot speak TLS (the kubelet's gRPC probes).
    #[arg(long, env = "PAYLEDGER_HEALTH_LISTEN", requires = "tls_cert")]
    pub health_listen: Option<std::net::SocketAddr>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("certificate file {}: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "certificate file {} holds no certificate",
        path.display()
    );
    Ok(certs)
}

fn load_key(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("key file {}: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow::anyhow!("key file: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

fn load_verifier(ca: &Path) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("client CA {}: {e}", ca.display()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| anyhow::anyhow!("client CA {}: {e}", ca.display()))
}

#[derive(Debug)]
struct CertResolver(Reloading<Arc<CertifiedKey>>);

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

#[derive(Debug)]
struct ClientVerifier(Reloading<Arc<dyn ClientCertVerifier>>);

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; the CA may change under us.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .get()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().supported_verify_schemes()
    }
}

impl TlsArgs {
    /// The server configuration, or None without --tls-cert.
    pub fn server_config(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let resolver = CertResolver(Reloading::new(
            "TLS files",
            vec![cert.clone(), key.clone()],
            |f| load_key(&f[0], &f[1]),
        )?);
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.tls_client_ca {
            Some(ca) => builder.with_client_cert_verifier(Arc::new(ClientVerifier(
                Reloading::new("TLS files", vec![ca.clone()], |f| load_verifier(&f[0]))?,
            ))),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// Accepted TLS connections of `listener`: handshakes run concurrently (at most
/// MAX_HANDSHAKES, each within HANDSHAKE_TIMEOUT); a failed one is logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, connections) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = connections.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// What a client trusts and presents.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientTlsArgs {
    /// Trust this CA (PEM) for https:// service URLs (default: the system's roots
    /// are not used; name the CA that signed the services' certificates).
    #[arg(long = "ca", env = "PAYLEDGER_TLS_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require mutual TLS; with --client-key.
    #[arg(
        long,
        env = "PAYLEDGER_TLS_CLIENT_CERT",
        requires = "client_key",
        global = true
    )]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(
        long,
        env = "PAYLEDGER_TLS_CLIENT_KEY",
        requires = "client_cert",
        global = true
    )]
    pub client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// tonic's client TLS settings, or None without --ca.
    pub fn config(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let identity = self.client_cert.clone().zip(self.client_key.clone());
        Ok(Some(load_client_config(&client_files(ca, identity))?))
    }
}

/// The files of a client's TLS settings: the CA, then the certificate and key if any.
fn client_files(ca: &Path, identity: Option<(PathBuf, PathBuf)>) -> Vec<PathBuf> {
    let mut files = vec![ca.to_path_buf()];
    files.extend(identity.into_iter().flat_map(|(cert, key)| [cert, key]));
    files
}

/// tonic's client TLS settings from `[ca]` or `[ca, cert, key]`. The files are
/// parsed here, so a CA without a certificate or a broken key is an error now
/// rather than a failed handshake later (tonic skips what it cannot parse).
fn load_client_config(files: &[PathBuf]) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    let ca = &files[0];
    read_certs(ca)?;
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    if let [_, cert, key] = files {
        load_key(cert, key)?;
        config = config.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    Ok(config)
}

/// A long-running client's TLS settings (the coordinator calling workers), loaded
/// again when a file changes, so that a rotated client certificate or CA is used
/// for new connections without a restart. Files that do not load keep the previous
/// settings, with a warning.
#[derive(Debug)]
pub struct ClientTlsFiles(Reloading<Arc<tonic::transport::ClientTlsConfig>>);

impl ClientTlsFiles {
    /// Trust `ca` (PEM) and, with `identity` (certificate and key, PEM), present it.
    pub fn new(ca: &Path, identity: Option<(PathBuf, PathBuf)>) -> anyhow::Result<Self> {
        Ok(Self(Reloading::new(
            "TLS files",
            client_files(ca, identity),
            |files| load_client_config(files).map(Arc::new),
        )?))
    }

    /// The current settings: the same `Arc` until a file changes.
    pub fn current(&self) -> Arc<tonic::transport::ClientTlsConfig> {
        self.0.get()
    }
}
