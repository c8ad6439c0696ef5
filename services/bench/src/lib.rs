//! The benchmark harness behind `payledger bench`, and the traffic generator it,
//! `payledger gen` and the end-to-end tests share: end-to-end figures, each beside
//! its baseline measured in the same run on the same machine, returned as a
//! [`BenchReport`] (Markdown or JSON).
//!
//! * ingest over gRPC vs bare async-nats atomic batches of the same payloads;
//! * stream projection vs a bare ordered consumer draining the same stream;
//! * freshness (ingest ack → row visible in query) at half the ingest rate;
//! * the semantics fold on one core, and memory per remembered identity;
//! * authoritative reads through the query service's part cache (`query`);
//! * over a history longer than the dedup horizon, replays and a bootstrap from
//!   committed replay states beside the same from the beginning of history, and
//!   the encoded state's size (`history`).
//!
//! Both JetStream settings are measured: `sync_interval: always` (what the
//! platform runs with) and nats-server's default flush.

pub mod generate;
pub mod history;
mod query;
mod replay;
mod report;

pub use report::BenchReport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use payledger_ingest::{IngestConfig, SystemClock, message_id};
use payledger_projector::ProjectorConfig;
use payledger_proto::v1::{
    self, ingest_service_client::IngestServiceClient, query_service_client::QueryServiceClient,
};
use payledger_proto::{fact_from_event, record_from_log};
use payledger_semantics::{PartitionState, Settings, partition_of};
use payledger_server_common::atomic_batch::{BatchMessage, publish_atomic};
use payledger_server_common::local_nats::{LocalNats, free_port};
use payledger_server_common::topology::{PROGRESS_BUCKET, STREAM, event_subject};
use prost::Message;
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::generate::{GenConfig, Generator};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Events per throughput run.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Concurrent publishers (gRPC clients, or bare NATS publishers for the baseline).
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Seconds of traffic for the freshness run.
    #[arg(long, default_value_t = 10)]
    pub freshness_secs: u64,
    /// Where to write the report.
    #[arg(long, default_value = "target/bench-report.md")]
    pub out: std::path::PathBuf,
    /// Events of the generated history the replay section archives and replays.
    #[arg(long, default_value_t = 5_000_000)]
    pub replay_events: usize,
    /// Days that history spans.
    #[arg(long, default_value_t = 30)]
    pub replay_days: u32,
    /// Python with duckdb for the replay section's baseline.
    #[arg(long, env = "PAYLEDGER_PYTHON", default_value = ".venv/bin/python")]
    pub python: std::path::PathBuf,
    /// Run only these sections (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
    #[command(flatten)]
    pub query: crate::query::QueryBenchArgs,
    #[command(flatten)]
    pub history: crate::history::HistoryBenchArgs,
}

/// The parts of the benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Ingest, stream projection and freshness against bare NATS.
    Stream,
    /// The semantics fold and memory per identity.
    Fold,
    /// GetDailyExposure AUTHORITATIVE through the snapshot part cache.
    Query,
    /// Replay on 1 and 2 workers beside DuckDB.
    Replay,
    /// Over a long history: the nightly replay and a bootstrap from committed
    /// states beside the same from genesis, and state bytes.
    History,
}

impl BenchArgs {
    fn runs(&self, section: Section) -> bool {
        self.only.is_empty() || self.only.contains(&section)
    }
}

pub(crate) use payledger_server_common::clock::now_us;

fn events(n: usize, seed: u64) -> Vec<v1::Event> {
    let mut generator = Generator::new(GenConfig {
        seed,
        merchants: 1000,
        events: n,
        duplicate_pct: 0.0,
        conflict_pct: 0.0,
        correction_pct: 1.0,
        late_pct: 3.0,
        ..GenConfig::default()
    });
    generator.batch(n, now_us())
}

/// Bare async-nats: atomic batches of 1000 of the payloads ingest would write.
async fn bare_publish(
    nats: &LocalNats,
    events: &[v1::Event],
    publishers: usize,
) -> anyhow::Result<f64> {
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let settings = Settings::default();
    payledger_server_common::topology::ensure_stream(&js, &settings.stream(), &stream_options())
        .await?;
    let now = now_us();
    let messages: Vec<(String, String, Bytes)> = events
        .iter()
        .map(|e| {
            let fact = fact_from_event(e).expect("generated events are valid");
            let record = v1::LogRecord {
                ingest_time_us: now,
                body: Some(v1::log_record::Body::Fact(e.clone())),
                traceparent: String::new(),
            };
            (
                event_subject(partition_of(&fact.merchant_id, settings.partitions)),
                message_id(&fact),
                Bytes::from(record.encode_to_vec()),
            )
        })
        .collect();
    let messages = Arc::new(messages);
    let started = Instant::now();
    let per = messages.len().div_ceil(publishers);
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (client, messages) = (client.clone(), messages.clone());
        tasks.push(tokio::spawn(async move {
            let mine =
                &messages[(p * per).min(messages.len())..((p + 1) * per).min(messages.len())];
            for chunk in mine.chunks(1000) {
                let batch = chunk
                    .iter()
                    .map(|(subject, id, payload)| {
                        let mut headers = HeaderMap::new();
                        headers.insert("Nats-Msg-Id", id.as_str());
                        BatchMessage {
                            subject: subject.clone(),
                            headers,
                            payload: payload.clone(),
                        }
                    })
                    .collect();
                publish_atomic(&client, batch, Duration::from_secs(30)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(messages.len() as f64 / started.elapsed().as_secs_f64())
}

pub(crate) fn stream_options() -> payledger_server_common::topology::StreamOptions {
    payledger_server_common::topology::StreamOptions {
        replicas: 1,
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(36 * 86_400),
        max_message_bytes: 64 * 1024,
    }
}

struct Stack {
    ingest: std::net::SocketAddr,
    query: Option<std::net::SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Stack {
    fn until_stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }

    async fn start_ingest(nats: &LocalNats) -> anyhow::Result<Stack> {
        let (stop, _) = tokio::sync::watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let ingest = listener.local_addr()?;
        let mut stack = Stack {
            ingest,
            query: None,
            stop,
            tasks: Vec::new(),
        };
        let mut config = IngestConfig::new(&nats.url());
        config.heartbeat_interval = Duration::ZERO;
        let shutdown = stack.until_stopped();
        stack.tasks.push(tokio::spawn(payledger_ingest::run(
            config,
            Arc::new(SystemClock),
            listener,
            shutdown,
        )));
        Ok(stack)
    }

    async fn start_projector(
        &mut self,
        nats: &LocalNats,
        store: &std::path::Path,
    ) -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let config = ProjectorConfig::new(&nats.url(), store.to_str().expect("utf-8 path"));
        let shutdown = self.until_stopped();
        self.tasks.push(tokio::spawn(payledger_projector::run(
            config, listener, shutdown,
        )));
        Ok(())
    }

    async fn start_query(&mut self, nats: &LocalNats) -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        self.query = Some(listener.local_addr()?);
        let shutdown = self.until_stopped();
        self.tasks.push(tokio::spawn(payledger_query::run(
            payledger_query::QueryConfig::new(&nats.url()),
            listener,
            shutdown,
        )));
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

pub(crate) async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if let Ok(c) = Channel::from_shared(url.clone())?.connect().await {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{url} did not come up")
}

/// Ingest over gRPC: `publishers` clients sending Publish calls of 1000 events.
async fn grpc_publish(
    ingest: std::net::SocketAddr,
    events: &[v1::Event],
    publishers: usize,
) -> anyhow::Result<f64> {
    let channel = connect(ingest).await?;
    let events = Arc::new(events.to_vec());
    let per = events.len().div_ceil(publishers);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (events, mut client) = (events.clone(), IngestServiceClient::new(channel.clone()));
        tasks.push(tokio::spawn(async move {
            let mine = &events[(p * per).min(events.len())..((p + 1) * per).min(events.len())];
            for chunk in mine.chunks(1000) {
                let response = client
                    .publish(v1::PublishRequest {
                        events: chunk.to_vec(),
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    response.results.iter().all(|r| matches!(
                        r.outcome,
                        Some(v1::publish_result::Outcome::Accepted(_))
                    )),
                    "every benchmark event is new and valid"
                );
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(events.len() as f64 / started.elapsed().as_secs_f64())
}

/// The last sequence of every partition subject.
async fn last_sequences(
    js: &async_nats::jetstream::Context,
    partitions: u32,
) -> anyhow::Result<HashMap<u32, u64>> {
    let stream = js.get_stream(STREAM).await?;
    let mut out = HashMap::new();
    for p in 0..partitions {
        if let Ok(m) = stream
            .get_last_raw_message_by_subject(&event_subject(p))
            .await
        {
            out.insert(p, m.sequence);
        }
    }
    Ok(out)
}

/// A bare ordered consumer per partition draining it, decoding each record.
async fn bare_drain(nats: &LocalNats, partitions: u32) -> anyhow::Result<f64> {
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let last = last_sequences(&js, partitions).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (p, last) in last {
        let js = js.clone();
        tasks.push(tokio::spawn(async move {
            let stream = js.get_stream(STREAM).await?;
            let consumer = stream
                .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                    filter_subject: event_subject(p),
                    ..Default::default()
                })
                .await?;
            let mut messages = consumer.messages().await?;
            let mut n = 0u64;
            while let Some(m) = messages.next().await {
                let m = m?;
                let seq = m
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                std::hint::black_box(record_from_log(seq, &m.payload).ok());
                n += 1;
                if seq >= last {
                    break;
                }
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Time for the projector to apply every record and store the rows.
async fn project(
    nats: &LocalNats,
    stack: &mut Stack,
    store: &std::path::Path,
    events: usize,
) -> anyhow::Result<f64> {
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let last = last_sequences(&js, Settings::default().partitions).await?;
    let started = Instant::now();
    stack.start_projector(nats, store).await?;
    let progress = loop {
        if let Ok(kv) = js.get_key_value(PROGRESS_BUCKET).await {
            break kv;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    loop {
        let mut done = true;
        for (p, last) in &last {
            let applied = match progress.get(format!("p{p}")).await? {
                Some(b) => v1::PartitionProgress::decode(b.as_ref())?.applied_sequence,
                None => 0,
            };
            done &= applied >= *last;
        }
        if done {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "projection did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Ack → visible latencies (µs) while `publishers` clients together offer `rate`
/// events/s for `secs` seconds, in calls of `batch` events; and the rate achieved.
async fn freshness(
    stack: &Stack,
    rate: f64,
    publishers: usize,
    batch: usize,
    secs: u64,
) -> anyhow::Result<(Vec<i64>, f64)> {
    let merchants = 200;
    let make_generator = |seed: u64| {
        Generator::new(GenConfig {
            seed,
            merchants,
            duplicate_pct: 0.0,
            conflict_pct: 0.0,
            correction_pct: 0.0,
            late_pct: 0.0,
            spread_secs: 60,
            ..GenConfig::default()
        })
    };
    let mut query = QueryServiceClient::new(connect(stack.query.expect("query runs")).await?);
    let ids: Vec<String> = (0..merchants)
        .map(|i| make_generator(0).merchant(i))
        .collect();
    let mut watch = query
        .watch_current_exposure(v1::WatchCurrentExposureRequest { merchant_ids: ids })
        .await?
        .into_inner();
    // Per merchant, in sequence order: (seq, ack instant) awaiting visibility.
    type Waiting = HashMap<String, std::collections::BTreeMap<u64, Instant>>;
    let waiting: Arc<std::sync::Mutex<Waiting>> = Arc::default();
    let latencies: Arc<std::sync::Mutex<Vec<i64>>> = Arc::default();
    let (w, l) = (waiting.clone(), latencies.clone());
    let watcher = tokio::spawn(async move {
        while let Ok(Some(e)) = watch.message().await {
            let position = e.rows.iter().map(|r| r.log_position).max().unwrap_or(0);
            let seen = Instant::now();
            let mut waiting = w.lock().expect("lock");
            let Some(queue) = waiting.get_mut(&e.merchant_id) else {
                continue;
            };
            let visible: Vec<u64> = queue.range(..=position).map(|(seq, _)| *seq).collect();
            let mut lat = l.lock().expect("lock");
            for seq in visible {
                let acked = queue.remove(&seq).expect("listed");
                lat.push(seen.saturating_duration_since(acked).as_micros() as i64);
            }
        }
    });
    let channel = connect(stack.ingest).await?;
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (waiting, accepted) = (waiting.clone(), accepted.clone());
        let mut ingest = IngestServiceClient::new(channel.clone());
        let mut generator = make_generator(100 + p as u64);
        let interval = Duration::from_secs_f64(batch as f64 * publishers as f64 / rate);
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let deadline = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < deadline {
                ticker.tick().await;
                let events = generator.batch(batch, now_us());
                let response = ingest
                    .publish(v1::PublishRequest {
                        events: events.clone(),
                    })
                    .await?
                    .into_inner();
                let acked = Instant::now();
                let mut waiting = waiting.lock().expect("lock");
                for (e, r) in events.iter().zip(response.results) {
                    if let Some(v1::publish_result::Outcome::Accepted(a)) = r.outcome {
                        waiting
                            .entry(e.merchant_id.clone())
                            .or_default()
                            .insert(a.sequence, acked);
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let achieved = accepted.load(std::sync::atomic::Ordering::Relaxed) as f64
        / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher.abort();
    let mut latencies = latencies.lock().expect("lock").clone();
    latencies.sort_unstable();
    Ok((latencies, achieved))
}

pub(crate) fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Single-core fold of `n` events, and resident bytes per remembered identity.
fn fold_and_memory(n: usize) -> (f64, f64, usize) {
    let settings = Settings {
        partitions: 1,
        ..Settings::default()
    };
    let records: Vec<_> = events(n, 5)
        .into_iter()
        .enumerate()
        .map(|(i, e)| payledger_semantics::Record {
            seq: i as u64 + 1,
            ingest_time_us: e.event_time_us + 1_000_000,
            body: payledger_semantics::RecordBody::Fact(fact_from_event(&e).expect("valid")),
        })
        .collect();
    let before = rss_bytes();
    let mut state = PartitionState::new(0, settings);
    let started = Instant::now();
    for r in &records {
        state.apply(r).expect("fold");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let identities = state.identities_remembered();
    let grown = rss_bytes().saturating_sub(before) as f64;
    std::hint::black_box(&state);
    (rate, grown / identities.max(1) as f64, identities)
}

/// Runs the sections `args` asks for and writes the report's Markdown to `args.out`.
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let mut report = BenchReport::default();
    report.text("# payledger bench\n");
    report.text(format!("{} events per throughput run, {} publishers, batches of 1000; {} cores; nats-server 2.15.1 on loopback.\n", args.events, args.publishers, std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)));
    if [Section::Stream, Section::Fold, Section::Query]
        .into_iter()
        .any(|s| args.runs(s))
    {
        report.table([
            String::from("figure"),
            String::from("payledger"),
            String::from("baseline"),
            String::from("ratio"),
            String::from("target"),
        ]);
    }
    for fsync_always in [true, false]
        .into_iter()
        .filter(|_| args.runs(Section::Stream))
    {
        let label = if fsync_always {
            "sync_interval: always"
        } else {
            "server default flush"
        };
        eprintln!("ingest, {label}: bare publish baseline…");
        let base_dir = tempfile::tempdir()?;
        let base_nats = LocalNats::start_with(base_dir.path(), free_port()?, fsync_always)?;
        let bare = bare_publish(&base_nats, &events(args.events, 1), args.publishers).await?;
        drop(base_nats);

        eprintln!("ingest, {label}: over gRPC…");
        let dir = tempfile::tempdir()?;
        let nats = LocalNats::start_with(&dir.path().join("nats"), free_port()?, fsync_always)?;
        let mut stack = Stack::start_ingest(&nats).await?;
        let grpc = grpc_publish(stack.ingest, &events(args.events, 1), args.publishers).await?;
        report.row([
            format!("ingest events/s ({label})"),
            format!("{grpc:.0}"),
            format!("{bare:.0} (bare async-nats atomic batches)"),
            format!("{:.2}", grpc / bare),
            String::from("≥ 0.7"),
        ]);

        eprintln!("projection, {label}…");
        let drained = bare_drain(&nats, Settings::default().partitions).await?;
        let projected = project(&nats, &mut stack, &dir.path().join("store"), args.events).await?;
        report.row([
            format!("stream projection events/s ({label})"),
            format!("{projected:.0}"),
            format!("{drained:.0} (bare ordered consumers)"),
            format!("{:.2}", projected / drained),
            String::from("≥ 0.8"),
        ]);
        if fsync_always {
            stack.start_query(&nats).await?;
            for (rate, publishers, batch) in [(grpc / 2.0, args.publishers, 1000), (1000.0, 1, 10)]
            {
                eprintln!("freshness at {rate:.0} events/s offered…");
                let (lat, achieved) =
                    freshness(&stack, rate, publishers, batch, args.freshness_secs).await?;
                report.row([format!("freshness ack → visible, p50 / p99 ms ({rate:.0}/s offered by {publishers} clients in calls of {batch}, {achieved:.0}/s achieved, {} events)", lat.len()), format!("{:.1} / {:.1}", percentile(&lat, 0.5), percentile(&lat, 0.99)), String::new(), String::new(), String::from("< 10 / < 50")]);
            }
        }
        stack.stop().await?;
    }
    if args.runs(Section::Fold) {
        eprintln!("fold and memory…");
        let (fold_rate, per_identity, identities) = fold_and_memory(1_000_000);
        report.row([String::from("semantics fold events/s, one core, one partition of 1 000 merchants × 1 000 events each (criterion `fold` is the reference)"), format!("{fold_rate:.0}"), String::new(), String::new(), String::from("≥ 5 000 000")]);
        report.row([
            format!("resident bytes per remembered identity ({identities} identities)"),
            format!("{per_identity:.1}"),
            String::new(),
            String::new(),
            String::from("≤ 48"),
        ]);
    }
    if args.runs(Section::Query) {
        crate::query::write_rows(&args.query, &mut report).await?;
    }
    if args.runs(Section::Replay) {
        crate::replay::run(
            &mut report,
            args.replay_events,
            args.replay_days,
            args.python.clone(),
        )
        .await?;
    }
    if args.runs(Section::History) {
        crate::history::run(&mut report, &args.history).await?;
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, report.markdown())?;
    eprintln!("written to {}", args.out.display());
    Ok(report)
}
