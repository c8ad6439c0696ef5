//! Harness for end-to-end tests: a private nats-server, the real service binaries
//! as child processes (killable with SIGKILL), gRPC clients, and the oracle that
//! folds accepted events with the semantics crate.
//!
//! Every process and directory belongs to a [`Harness`]; dropping it (also when a
//! test fails) kills the processes and removes the directories. [`Stack`] starts
//! the services the tests share on one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use payledger_proto::v1::{
    self, ingest_service_client::IngestServiceClient, query_service_client::QueryServiceClient,
};
use payledger_proto::{current_row_from_proto, daily_row_from_proto, event_from_fact};
use payledger_semantics::{CurrentRow, DailyRow, Exposure, Fact, Record, RecordBody, Settings};
use payledger_server_common::local_nats::{LocalNats, free_port};
use tonic::transport::Channel;

pub mod cluster;
pub mod convergence;
pub mod faults;
pub mod seaweed;
pub mod stack;

pub use stack::{Archive, Stack};

/// The workspace's debug binaries; `just test` builds them before the tests run.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: run `cargo build --bins` first (`just test` does)",
        path.display()
    );
    Ok(path)
}

/// A service binary running as a child process, its stderr captured to a file.
pub struct Service {
    pub name: String,
    pub addr: String,
    child: Child,
    log: PathBuf,
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP: the process freezes mid-work (a long stall, a frozen VM) until
    /// `resume`.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        payledger_server_common::local_nats::send_signal(self.child.id(), signal, &self.name)
    }

    /// SIGKILL: no flush, no final checkpoint.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit. Async, so that the test's own clients
    /// of the service can answer its drain while it stops.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        self.signal("-TERM")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "{} exited with {status} on SIGTERM",
                    self.name
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("{} did not stop within 20 s of SIGTERM", self.name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the process has ended, None while it runs.
    pub fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub nats: LocalNats,
    services: usize,
}

impl Harness {
    pub fn start() -> anyhow::Result<Harness> {
        let dir = tempfile::tempdir()?;
        let nats = LocalNats::start(&dir.path().join("nats"))?;
        Ok(Harness {
            dir,
            nats,
            services: 0,
        })
    }

    /// Starts on a copy of `fixture` (its `nats/` a nats-server's store
    /// directory, its `store/` an object store), as a machine that ran the
    /// stack and was stopped would be found.
    pub fn start_from(fixture: &Path) -> anyhow::Result<Harness> {
        let dir = tempfile::tempdir()?;
        payledger_bench::history::copy_dir(fixture, dir.path())?;
        let nats = LocalNats::start(&dir.path().join("nats"))?;
        Ok(Harness {
            dir,
            nats,
            services: 0,
        })
    }

    pub fn store(&self) -> String {
        self.dir.path().join("store").display().to_string()
    }

    /// SIGKILLs nats-server and starts it again on the same port and JetStream
    /// store, as a crashed node comes back: clients reconnect to the same address.
    pub fn restart_nats_hard(&mut self) -> anyhow::Result<()> {
        self.restart_nats(false)
    }

    /// [`Harness::restart_nats_hard`] with the JetStream store deleted in between:
    /// a node replaced by an empty one at the same address.
    pub fn restart_nats_wiped(&mut self) -> anyhow::Result<()> {
        self.restart_nats(true)
    }

    fn restart_nats(&mut self, wipe: bool) -> anyhow::Result<()> {
        let port = self.nats.port();
        let dir = self.dir.path().join("nats");
        self.nats.stop();
        if wipe {
            std::fs::remove_dir_all(dir.join("jetstream"))?;
        }
        self.nats = LocalNats::start_on(&dir, port)?;
        Ok(())
    }

    /// Starts `binary` with `args` plus `--listen` and `--nats-url`, and waits for
    /// its gRPC health service to answer SERVING.
    pub async fn spawn(&mut self, binary_name: &str, args: &[&str]) -> anyhow::Result<Service> {
        self.spawn_with_env(binary_name, args, &[]).await
    }

    /// [`Harness::spawn`] with extra environment variables (object store credentials
    /// and endpoint, say), set over those the test process has.
    pub async fn spawn_with_env(
        &mut self,
        binary_name: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Service> {
        let nats_url = self.nats.url();
        self.spawn_with_nats_url(binary_name, &nats_url, args, env)
            .await
    }

    /// [`Harness::spawn_with_env`] with `--nats-url nats_url` instead of this
    /// harness's nats-server (a list of servers, say).
    pub async fn spawn_with_nats_url(
        &mut self,
        binary_name: &str,
        nats_url: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Service> {
        self.services += 1;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let log = self
            .dir
            .path()
            .join(format!("{binary_name}-{}.log", self.services));
        let child = Command::new(binary(binary_name)?)
            .args(["--listen", &addr, "--nats-url", nats_url])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut service = Service {
            name: binary_name.to_string(),
            addr,
            child,
            log,
        };
        // A TLS server answers health in plaintext on --health-listen only.
        let health = match args.windows(2).find(|w| w[0] == "--health-listen") {
            Some(w) => format!("http://{}", w[1]),
            None => service.url(),
        };
        wait_serving(&mut service, &health).await?;
        Ok(service)
    }
}

/// Waits until the gRPC server at `url` answers health checks with SERVING (for
/// services not started through [`Harness::spawn`], e.g. in-process ones).
pub async fn wait_healthy(url: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let last = match Channel::from_shared(url.to_string())?.connect().await {
            Ok(channel) => {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let request = tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                };
                match health.check(request).await {
                    Ok(r)
                        if r.get_ref().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                                as i32 =>
                    {
                        return Ok(());
                    }
                    Ok(r) => format!("status {:?}", r.get_ref().status),
                    Err(s) => format!("{s}"),
                }
            }
            Err(e) => format!("connect: {e}"),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} not serving within {within:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_serving(service: &mut Service, health_url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = service.child.try_wait()? {
            anyhow::bail!("{} exited with {status}:\n{}", service.name, service.log());
        }
        if let Ok(channel) = Channel::from_shared(health_url.to_string())?
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let request = tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(r) = health.check(request).await
                && r.get_ref().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} not serving within 60 s:\n{}",
            service.name,
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn ingest_client(url: &str) -> anyhow::Result<IngestServiceClient<Channel>> {
    Ok(IngestServiceClient::new(
        Channel::from_shared(url.to_string())?.connect().await?,
    ))
}

pub async fn query_client(url: &str) -> anyhow::Result<QueryServiceClient<Channel>> {
    Ok(QueryServiceClient::new(
        Channel::from_shared(url.to_string())?.connect().await?,
    ))
}

/// Every event ingest accepted, with the sequence and ingest_time it answered:
/// exactly what the log holds when heartbeats are off.
#[derive(Default)]
pub struct AcceptedLog {
    pub records: BTreeMap<u64, Record>,
    pub duplicates: usize,
    pub rejected: usize,
}

impl AcceptedLog {
    /// Publishes `events` and records what was accepted.
    pub async fn publish(
        &mut self,
        client: &mut IngestServiceClient<Channel>,
        events: Vec<v1::Event>,
    ) -> anyhow::Result<()> {
        let response = client
            .publish(v1::PublishRequest {
                events: events.clone(),
            })
            .await?
            .into_inner();
        self.record(&events, &response.results)
    }

    /// Records the answers of one Publish call of `events`.
    pub fn record(
        &mut self,
        events: &[v1::Event],
        results: &[v1::PublishResult],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(results.len() == events.len(), "one result per event");
        for (event, result) in events.iter().zip(results.iter().cloned()) {
            match result.outcome {
                Some(v1::publish_result::Outcome::Accepted(a)) => {
                    let fact = payledger_proto::fact_from_event(event)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let record = Record {
                        seq: a.sequence,
                        ingest_time_us: a.ingest_time_us,
                        body: RecordBody::Fact(fact),
                    };
                    anyhow::ensure!(
                        self.records.insert(a.sequence, record).is_none(),
                        "sequence {} answered twice",
                        a.sequence
                    );
                }
                Some(v1::publish_result::Outcome::Duplicate(d)) => {
                    anyhow::ensure!(
                        self.records.contains_key(&d.sequence),
                        "duplicate of unknown sequence {}",
                        d.sequence
                    );
                    self.duplicates += 1;
                }
                Some(v1::publish_result::Outcome::Rejected(_)) => self.rejected += 1,
                None => anyhow::bail!("result without outcome"),
            }
        }
        Ok(())
    }

    /// The oracle: the accepted events folded, in log order, by the semantics crate.
    pub fn fold(&self, settings: Settings) -> anyhow::Result<Exposure> {
        let mut exposure = Exposure::new(settings);
        for record in self.records.values() {
            exposure.apply_fact(record)?;
        }
        Ok(exposure)
    }

    pub fn facts(&self) -> impl Iterator<Item = &Fact> {
        self.records.values().filter_map(|r| match &r.body {
            RecordBody::Fact(f) => Some(f),
            RecordBody::Heartbeat => None,
        })
    }
}

/// Re-encodes a fact as the wire event it came from.
pub fn event_of(fact: &Fact) -> v1::Event {
    event_from_fact(fact)
}

/// Every daily row the query service serves, through ListDailyExposure pages.
pub async fn served_daily_rows(
    client: &mut QueryServiceClient<Channel>,
) -> anyhow::Result<Vec<DailyRow>> {
    let mut rows = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_daily_exposure(v1::ListDailyExposureRequest {
                merchant_id: String::new(),
                from_day: "1970-01-01".into(),
                to_day: "2200-01-01".into(),
                consistency: v1::Consistency::Provisional as i32,
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        for item in &page.items {
            for row in &item.rows {
                rows.push(daily_row_from_proto(row).map_err(|e| anyhow::anyhow!("{e}"))?);
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    rows.sort_by(|a, b| {
        (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
    });
    Ok(rows)
}

/// The current rows of `merchants` as the query service serves them.
pub async fn served_current_rows(
    client: &mut QueryServiceClient<Channel>,
    merchants: impl IntoIterator<Item = String>,
) -> anyhow::Result<Vec<CurrentRow>> {
    let mut rows = Vec::new();
    for merchant_id in merchants {
        match client
            .get_current_exposure(v1::GetCurrentExposureRequest { merchant_id })
            .await
        {
            Ok(e) => {
                for r in &e.get_ref().rows {
                    rows.push(current_row_from_proto(r).map_err(|e| anyhow::anyhow!("{e}"))?);
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(s.into()),
        }
    }
    rows.sort_by(|a, b| (&a.merchant_id, a.currency).cmp(&(&b.merchant_id, b.currency)));
    Ok(rows)
}

/// Polls until the served rows equal the oracle's, or fails with the first difference.
pub async fn assert_converges(
    client: &mut QueryServiceClient<Channel>,
    oracle: &Exposure,
    within: Duration,
) -> anyhow::Result<()> {
    let want_daily = oracle.daily_rows();
    let want_current = oracle.current_rows();
    let mut merchants: Vec<String> = want_current.iter().map(|r| r.merchant_id.clone()).collect();
    merchants.dedup();
    let deadline = Instant::now() + within;
    loop {
        let daily = served_daily_rows(client).await?;
        let current = served_current_rows(client, merchants.clone()).await?;
        if daily == want_daily && current == want_current {
            return Ok(());
        }
        if Instant::now() > deadline {
            let first_daily = want_daily.iter().zip(&daily).find(|(a, b)| a != b);
            let first_current = want_current.iter().zip(&current).find(|(a, b)| a != b);
            anyhow::bail!(
                "served rows differ from the oracle after {within:?}: daily {} served vs {} expected, first difference {first_daily:#?}; \
                 current {} served vs {} expected, first difference {first_current:#?}",
                daily.len(),
                want_daily.len(),
                current.len(),
                want_current.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asks for a merchant-day until the answer comes from `source`, within `within`
/// (a new commit or a later event takes the query service a moment to see).
pub async fn daily_answer_from(
    query: &mut QueryServiceClient<Channel>,
    request: v1::GetDailyExposureRequest,
    source: v1::Source,
    within: Duration,
) -> anyhow::Result<v1::DailyExposure> {
    let deadline = Instant::now() + within;
    loop {
        let answer = query
            .get_daily_exposure(request.clone())
            .await?
            .into_inner();
        if answer
            .provenance
            .as_ref()
            .is_some_and(|p| p.source == source as i32)
        {
            return Ok(answer);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{request:?} never answered from {source:?} within {within:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages in the stream right now.
pub async fn stream_messages(nats_url: &str) -> anyhow::Result<u64> {
    let client = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(payledger_server_common::topology::STREAM)
        .await?;
    Ok(stream.info().await?.state.messages)
}

/// One message of the stream, decoded.
#[derive(Clone, Debug)]
pub struct LogEntry {
    pub seq: u64,
    pub subject: String,
    pub record: v1::LogRecord,
}

impl LogEntry {
    /// The partition of an event subject (`payledger.events.p{N}`), if it is one.
    pub fn partition(&self) -> Option<u32> {
        payledger_server_common::topology::partition_of_subject(&self.subject)
    }

    pub fn is_heartbeat(&self) -> bool {
        matches!(self.record.body, Some(v1::log_record::Body::Heartbeat(_)))
    }

    /// The record as the semantics reads it (facts and heartbeats only).
    pub fn to_record(&self) -> anyhow::Result<Record> {
        use prost::Message;
        payledger_proto::record_from_log(self.seq, &self.record.encode_to_vec())
            .map_err(|e| anyhow::anyhow!("sequence {} ({}): {e}", self.seq, self.subject))
    }
}

/// Every message in the stream right now, in sequence order (the tests never
/// delete messages, so the sequences from first to last are all present).
pub async fn read_log(nats_url: &str) -> anyhow::Result<Vec<LogEntry>> {
    use prost::Message;
    let client = connect_nats(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(payledger_server_common::topology::STREAM)
        .await?;
    let state = stream.info().await?.state.clone();
    let mut entries = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return Ok(entries);
    }
    for seq in state.first_sequence..=state.last_sequence {
        // A cluster that has just healed may answer "temporarily unavailable"
        // for a few seconds: asked again, for at most 30 s.
        let deadline = Instant::now() + Duration::from_secs(30);
        let message = loop {
            match stream.get_raw_message(seq).await {
                Ok(message) => break message,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("reading sequence {seq} of the stream: {e}; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => anyhow::bail!("reading sequence {seq} of the stream: {e}"),
            }
        };
        let record = v1::LogRecord::decode(message.payload.as_ref())
            .map_err(|e| anyhow::anyhow!("sequence {seq} is not a LogRecord: {e}"))?;
        entries.push(LogEntry {
            seq,
            subject: message.subject.to_string(),
            record,
        });
    }
    Ok(entries)
}

/// The archive at `store` (a local path or an object-store URL), for a stream of
/// the default settings.
pub fn archive_at(store: &str) -> anyhow::Result<payledger_storage::ArchiveStore> {
    Ok(payledger_storage::ArchiveStore::new(
        payledger_storage::open_store(store)?,
        payledger_semantics::RecordedStream::new(payledger_semantics::StreamSettings::default()),
    ))
}

/// A NATS client on `urls`, one server or a comma-separated list of a cluster's.
pub async fn connect_nats(urls: &str) -> anyhow::Result<async_nats::Client> {
    let servers = urls
        .split(',')
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(async_nats::connect(servers).await?)
}

pub use payledger_server_common::clock::now_us;

/// The Prometheus text a service serves on its --metrics-listen address.
pub async fn scrape_metrics(address: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    anyhow::ensure!(response.starts_with("HTTP/1.1 200"), "{response}");
    Ok(response)
}

/// The value of the sample whose name and labels start with `prefix`.
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until the archive's highest watermark reaches `through` (the archiver
/// cuts on its own flush interval), for at most 30 s.
pub async fn wait_until_archived(
    archive: &payledger_storage::ArchiveStore,
    through: u64,
) -> anyhow::Result<()> {
    wait_until_archived_within(archive, through, Duration::from_secs(30)).await?;
    Ok(())
}

/// [`wait_until_archived`] for at most `within`; how long it took. A listing
/// that fails (a store taken away) is read again, and named if it is the last.
pub async fn wait_until_archived_within(
    archive: &payledger_storage::ArchiveStore,
    through: u64,
    within: Duration,
) -> anyhow::Result<Duration> {
    let began = Instant::now();
    loop {
        let (watermark, failed) = match payledger_projector::replay::latest_cutoff(archive).await {
            Ok(w) => (w, String::new()),
            Err(e) => (0, format!(" (the last listing failed: {e})")),
        };
        if watermark >= through {
            return Ok(began.elapsed());
        }
        anyhow::ensure!(
            began.elapsed() < within,
            "the archive reached {watermark}, not {through}, within {within:?}{failed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `lines` lines of `text` (a process's log).
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
