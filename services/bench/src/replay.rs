//! `payledger bench` replay section: a generated history archived to Parquet,
//! replayed through the coordinator on 1 and 2 in-process workers, beside DuckDB
//! computing the same dedup and daily closing balances from the same files with the
//! same thread count.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use payledger_projector::{Mode, ProjectorConfig};
use payledger_proto::v1;
use payledger_replay_coordinator::CoordinatorConfig;
use payledger_semantics::{Day, Record, RecordBody, RecordedStream, Settings, partition_of};
use payledger_server_common::local_nats::{LocalNats, free_port};
use payledger_storage::{ArchiveStore, CutRange, open_store};
use tokio::net::TcpListener;

use crate::BenchReport;
use crate::generate::{GenConfig, Generator};

/// Records per cut of the generated archive (the archiver's default).
const CUT_RECORDS: usize = 200_000;

/// What was archived.
pub(crate) struct History {
    pub last_seq: u64,
    pub first_day: Day,
    pub last_day: Day,
    /// With cuts at midnight: each day of ingest and the watermark that closes it.
    pub day_ends: Vec<(Day, u64)>,
}

/// How a generated history is laid out in the archive.
pub(crate) struct HistoryPlan {
    pub events: usize,
    pub merchants: usize,
    /// Ingest time of the first events; the history spans `days` days from it.
    pub start_us: i64,
    pub days: u32,
    /// Events generated at one ingest time.
    pub batch: usize,
    /// Also close a cut where ingest time passes midnight UTC, so that every day
    /// ends at a watermark as a nightly replay's cutoff does.
    pub cut_at_midnight: bool,
}

/// Writes `events` generated events spread over `days` days straight to the
/// archive, in cuts as the archiver writes them, with a watermark after each.
async fn write_history(store: &str, events: usize, days: u32) -> anyhow::Result<History> {
    let span_us = i64::from(days) * 86_400_000_000;
    write_history_as(
        store,
        &HistoryPlan {
            events,
            merchants: 20_000,
            start_us: crate::now_us() - span_us,
            days,
            batch: 10_000,
            cut_at_midnight: false,
        },
    )
    .await
}

/// Writes the history of `plan` straight to the archive: cuts of at most
/// [`CUT_RECORDS`] records, each closed by a watermark.
pub(crate) async fn write_history_as(store: &str, plan: &HistoryPlan) -> anyhow::Result<History> {
    let settings = Settings::default();
    let archive = ArchiveStore::new(open_store(store)?, RecordedStream::new(settings.stream()));
    let mut generator = Generator::new(GenConfig {
        seed: 5,
        merchants: plan.merchants,
        duplicate_pct: 1.0,
        conflict_pct: 0.5,
        correction_pct: 1.0,
        late_pct: 3.0,
        ..GenConfig::default()
    });
    let (events, start_us) = (plan.events, plan.start_us);
    let span_us = i64::from(plan.days) * 86_400_000_000;
    let mut buffers: Vec<Vec<Record>> = vec![Vec::new(); settings.partitions as usize];
    let (mut seq, mut cut_after, mut buffered) = (0u64, 0u64, 0usize);
    let mut day_ends = Vec::new();
    let mut cut_day = None;
    let bar = indicatif::ProgressBar::new(events as u64);
    for first in (0..events).step_by(plan.batch) {
        let now = start_us + (span_us as f64 * first as f64 / events as f64) as i64;
        let today = Day::of_micros(now);
        if let Some(day) = cut_day.filter(|d| plan.cut_at_midnight && *d != today)
            && buffered > 0
        {
            close_cut(&archive, &mut buffers, cut_after, seq).await?;
            day_ends.push((day, seq));
            (cut_after, buffered) = (seq, 0);
        }
        cut_day = Some(today);
        for event in generator.batch(plan.batch.min(events - first), now) {
            // Ingest would refuse what the generator gets wrong now and then (a
            // conflicting copy of a -1 correction is a zero correction): skip it.
            let Ok(fact) = payledger_proto::fact_from_event(&event) else {
                continue;
            };
            seq += 1;
            let p = partition_of(&fact.merchant_id, settings.partitions);
            buffers[p as usize].push(Record {
                seq,
                ingest_time_us: now,
                body: RecordBody::Fact(fact),
            });
            buffered += 1;
        }
        bar.inc(plan.batch as u64);
        if buffered >= CUT_RECORDS || first + plan.batch >= events {
            close_cut(&archive, &mut buffers, cut_after, seq).await?;
            (cut_after, buffered) = (seq, 0);
        }
    }
    if plan.cut_at_midnight
        && let Some(day) = cut_day
    {
        day_ends.push((day, seq));
    }
    bar.finish_and_clear();
    Ok(History {
        last_seq: seq,
        first_day: Day::of_micros(start_us - 3 * 86_400_000_000),
        last_day: Day::of_micros(crate::now_us()),
        day_ends,
    })
}

/// Writes the buffered records as the cut `(after, last]` and its watermark.
async fn close_cut(
    archive: &ArchiveStore,
    buffers: &mut [Vec<Record>],
    after: u64,
    last: u64,
) -> anyhow::Result<()> {
    let cut = CutRange {
        first: after + 1,
        last,
    };
    for (p, records) in buffers.iter_mut().enumerate() {
        if !records.is_empty() {
            archive.put_events(p as u32, cut, records).await?;
            records.clear();
        }
    }
    archive.put_watermark(last).await?;
    Ok(())
}

/// Coordinator plus `workers` replay workers in this process; returns the time
/// from StartReplay until the snapshot was committed (parts written, verified,
/// commit published), and until the whole replay ended (with reconciliation).
async fn replay_on(
    nats: &LocalNats,
    store: &str,
    workers: usize,
    history: &History,
) -> anyhow::Result<(Duration, Duration)> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = || {
        let mut s = stopped.clone();
        async move {
            let _ = s.wait_for(|v| *v).await;
        }
    };
    let mut tasks = Vec::new();
    let mut urls = Vec::new();
    for i in 0..workers {
        let listener = TcpListener::bind(("127.0.0.1", free_port()?)).await?;
        urls.push(format!("http://{}", listener.local_addr()?));
        let mut config = ProjectorConfig::new(&nats.url(), &format!("{store}-worker-{i}"));
        config.mode = Mode::Replay;
        config.archive_store = Some(store.to_string());
        config.max_concurrent_shards = 1;
        tasks.push(tokio::spawn(payledger_projector::run(
            config,
            listener,
            until_stopped(),
        )));
    }
    let listener = TcpListener::bind(("127.0.0.1", free_port()?)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut config = CoordinatorConfig::new(&nats.url(), store, urls.clone());
    config.shard_stall_timeout = Duration::from_secs(600);
    tasks.push(tokio::spawn(payledger_replay_coordinator::run(
        config,
        listener,
        until_stopped(),
    )));
    for u in urls.iter().chain([&url]) {
        wait_serving(u).await?;
    }
    let mut client =
        v1::replay_coordinator_client::ReplayCoordinatorClient::connect(url.clone()).await?;
    let started = Instant::now();
    let replay = client
        .start_replay(v1::StartReplayRequest {
            from_day: history.first_day.to_string(),
            to_day: history.last_day.to_string(),
            reason: "bench".into(),
            cutoff: history.last_seq,
            // The whole fold, as DuckDB's side does: never from an earlier run's state.
            from_genesis: true,
        })
        .await?
        .into_inner();
    let mut updates = client
        .watch_replay(v1::GetReplayRequest {
            replay_id: replay.replay_id.clone(),
        })
        .await?
        .into_inner();
    let mut committed = None;
    let mut last = None;
    while let Some(r) = updates.message().await? {
        if committed.is_none() && r.commit_number > 0 {
            committed = Some(started.elapsed());
        }
        last = Some(r);
    }
    let total = started.elapsed();
    let last = last.expect("a replay update");
    anyhow::ensure!(
        last.state == i32::from(v1::ReplayState::Succeeded),
        "bench replay ended {}: {}",
        v1::ReplayState::try_from(last.state).map_or("unknown", |s| s.as_str_name()),
        last.error
    );
    let _ = stop.send(true);
    for task in tasks {
        task.await??;
    }
    Ok((committed.unwrap_or(total), total))
}

/// Waits until the gRPC server at `url` answers health checks with SERVING.
async fn wait_serving(url: &str) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(url.to_string())?
            .connect()
            .await
            && let Ok(r) = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
            && r.get_ref().status == ServingStatus::Serving as i32
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} did not start serving within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn duckdb(python: &Path, store: &str, threads: usize, out: &Path) -> anyhow::Result<(f64, u64)> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../e2e/sql/bench_closing_balances.py");
    let output = std::process::Command::new(python)
        .arg(script)
        .arg(store)
        .arg(threads.to_string())
        .arg(out)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "DuckDB run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok((
        answer["seconds"].as_f64().unwrap_or(f64::NAN),
        answer["rows"].as_u64().unwrap_or(0),
    ))
}

/// Single-threaded split of a replay: Parquet reading and decoding alone, then the
/// whole fold with part writing, over every partition.
async fn profile(store: &str, cutoff: u64, history: &History) -> anyhow::Result<(f64, f64)> {
    let settings = Settings::default();
    let objects = open_store(store)?;
    let archive = ArchiveStore::new(objects.clone(), RecordedStream::new(settings.stream()));
    let started = Instant::now();
    for p in 0..settings.partitions {
        for cut in archive.event_segments(p).await? {
            std::hint::black_box(archive.read_events(p, cut).await?);
        }
    }
    let decode = started.elapsed().as_secs_f64();
    let stores = payledger_projector::replay::ReplayStores::at(
        objects,
        RecordedStream::new(settings.stream()),
    );
    let started = Instant::now();
    for p in 0..settings.partitions {
        let shard = payledger_projector::replay::Shard {
            snapshot_id: "profile".into(),
            partitions: vec![p],
            cutoff,
            from_day: history.first_day,
            to_day: history.last_day,
            from_genesis: true,
        };
        payledger_projector::replay::run_shard(&stores, settings, &shard, None, |_| {}).await?;
    }
    Ok((decode, started.elapsed().as_secs_f64()))
}

/// Runs the section and appends its rows to `report`.
pub async fn run(
    report: &mut BenchReport,
    events: usize,
    days: u32,
    python: PathBuf,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store").display().to_string();
    eprintln!("replay: archiving {events} generated events over {days} days…");
    let started = Instant::now();
    let history = write_history(&store, events, days).await?;
    let archived = started.elapsed().as_secs_f64();
    let nats = LocalNats::start_with(&dir.path().join("nats"), free_port()?, false)?;
    {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
        payledger_server_common::topology::ensure_stream(
            &js,
            &Settings::default().stream(),
            &crate::stream_options(),
        )
        .await?;
    }
    report.text(format!("\n## Replay beside DuckDB\n\n{events} events over {days} days ({} records with duplicates, conflicts, corrections and late events), 16 partitions, archived in cuts of {CUT_RECORDS} records ({archived:.1} s to generate and write). Replay: StartReplay → every shard folded, its part written and verified, commit published; one shard per partition, one shard at a time per worker, workers in this process. DuckDB: `e2e/sql/bench_closing_balances.py` (first occurrence by sequence, daily closing balances by window sum, written to Parquet), `SET threads` as stated.\n", history.last_seq));
    report.table([
        String::from("threads"),
        String::from("replay s (events/s)"),
        String::from("replay incl. reconciliation s"),
        String::from("DuckDB s (rows)"),
        String::from("DuckDB / replay"),
    ]);
    for threads in [1usize, 2] {
        eprintln!("replay: {threads} worker(s)…");
        let (commit, total) = replay_on(&nats, &store, threads, &history).await?;
        eprintln!("replay: DuckDB with {threads} thread(s)…");
        let out = dir.path().join(format!("duckdb-{threads}.parquet"));
        let (duck, rows) = duckdb(&python, &store, threads, &out)?;
        let ours = commit.as_secs_f64();
        report.row([
            format!("{threads}"),
            format!("{ours:.1} ({:.0})", history.last_seq as f64 / ours),
            format!("{:.1}", total.as_secs_f64()),
            format!("{duck:.1} ({rows})"),
            format!("{:.2}", duck / ours),
        ]);
    }
    eprintln!("replay: single-thread profile…");
    let (decode, whole) = profile(&store, history.last_seq, &history).await?;
    report.text(format!("\nProfile, one thread, all partitions in turn: reading and decoding the Parquet segments {decode:.1} s; reading, decoding, folding with every rule and writing the parts {whole:.1} s, so the fold and the part writing take {:.1} s ({:.0} % of the replay).", whole - decode, 100.0 * (whole - decode) / whole));
    Ok(())
}
