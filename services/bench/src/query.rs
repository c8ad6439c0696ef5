//! `payledger bench`, authoritative reads: `GetDailyExposure` AUTHORITATIVE through the
//! query service's snapshot part cache (memory + local disk).
//!
//! A committed snapshot of `merchants` × `days` rows is written straight into a
//! temporary local store with `SnapshotStore`; the query service runs in this
//! process on a private nats-server (it needs the stream only for its settings). One
//! gRPC client then measures:
//!
//! * the cold read of each part (object store read, Parquet decode, hash check);
//! * `calls` reads of random merchant-days on the warm cache, one at a time;
//! * after a restart with a 1 MiB memory tier, reads answered from the disk tier.

use std::sync::Arc;
use std::time::Instant;

use payledger_proto::v1::{self, query_service_client::QueryServiceClient};
use payledger_query::{PartCacheCounters, PartCacheStats, QueryConfig};
use payledger_semantics::{Currency, DailyRow, Day, SEMANTICS_VERSION, Settings, partition_of};
use payledger_server_common::local_nats::LocalNats;
use payledger_storage::{CommitDraft, ObjectRef, SnapshotStore, open_store};
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::{BenchReport, connect, percentile, stream_options};

#[derive(clap::Args, Debug, Clone)]
pub struct QueryBenchArgs {
    /// Merchants in the authoritative-read snapshot.
    #[arg(long, default_value_t = 20_000)]
    pub query_merchants: usize,
    /// Days in the authoritative-read snapshot (one row per merchant-day).
    #[arg(long, default_value_t = 30)]
    pub query_days: i32,
    /// GetDailyExposure AUTHORITATIVE calls timed on the warm cache.
    #[arg(long, default_value_t = 20_000)]
    pub query_calls: usize,
}

fn merchant(i: usize) -> String {
    format!("m-{i:06}")
}

fn snapshot_row(m: usize, day: Day) -> DailyRow {
    DailyRow {
        merchant_id: merchant(m),
        day,
        currency: Currency::parse(["USD", "EUR", "GBP"][m % 3]).expect("ISO code"),
        closing_minor: (m as i128 + 1) * 10_000 + i128::from(day.0),
        peak_minor: (m as i128 + 1) * 12_000,
        peak_bucket_start_us: i64::from(day.0) * 86_400_000_000,
        applied: 40,
        duplicates: 1,
        conflicts: 0,
        late: 2,
        restated: false,
        log_position: 1_000_000 + m as u64,
        semantics_version: SEMANTICS_VERSION,
    }
}

/// The log cutoff of the benchmark's commit.
const BENCH_CUTOFF: u64 = 10_000_000;

/// Writes and commits the benchmark snapshot; returns its days.
async fn write_snapshot(
    store: &str,
    settings: &Settings,
    merchants: usize,
    days: i32,
) -> anyhow::Result<(Day, Day)> {
    let today = Day::of_micros(crate::now_us());
    let (from, to) = (Day(today.0 - days), Day(today.0 - 1));
    let mut parts: Vec<Vec<DailyRow>> = vec![Vec::new(); settings.partitions as usize];
    for m in 0..merchants {
        let p = partition_of(&merchant(m), settings.partitions) as usize;
        parts[p].extend((from.0..=to.0).map(|d| snapshot_row(m, Day(d))));
    }
    let objects = open_store(store)?;
    // The query service answers a commit only once the archive (its FX and risk
    // records) reaches its cutoff: an archive of that one empty cut.
    payledger_storage::ArchiveStore::new(
        objects.clone(),
        payledger_semantics::RecordedStream::new(settings.stream()),
    )
    .put_watermark(BENCH_CUTOFF)
    .await?;
    let snapshots = SnapshotStore::new(objects);
    let mut refs = Vec::new();
    for (p, rows) in parts.iter().enumerate() {
        refs.push(ObjectRef::from(
            snapshots.put_part("bench", p as u32, rows).await?,
        ));
    }
    snapshots
        .commit(CommitDraft {
            snapshot_id: "bench".into(),
            replay_id: "bench".into(),
            from_day: from,
            to_day: to,
            log_cutoff: BENCH_CUTOFF,
            semantics_version: SEMANTICS_VERSION,
            version_key: settings.version_key(),
            partitions: settings.partitions,
            parts: refs,
            segments_read: Vec::new(),
            states: Vec::new(),
        })
        .await?;
    Ok((from, to))
}

/// A query service running in this process until `stop` is sent.
struct Query {
    addr: std::net::SocketAddr,
    counters: Arc<PartCacheCounters>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Query {
    async fn start(config: QueryConfig) -> anyhow::Result<Query> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(PartCacheCounters::default());
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(payledger_query::run_with_counters(
            config,
            listener,
            async move {
                let _ = stopped.wait_for(|v| *v).await;
            },
            counters.clone(),
        ));
        Ok(Query {
            addr,
            counters,
            stop,
            task,
        })
    }

    async fn client(&self) -> anyhow::Result<QueryServiceClient<Channel>> {
        Ok(QueryServiceClient::new(connect(self.addr).await?))
    }

    async fn stop(self) -> anyhow::Result<PartCacheStats> {
        let _ = self.stop.send(true);
        self.task.await??;
        Ok(self.counters.cache_stats())
    }
}

/// One timed AUTHORITATIVE read, checked for its one row from the snapshot.
async fn read(
    client: &mut QueryServiceClient<Channel>,
    merchant_id: String,
    day: Day,
) -> anyhow::Result<i64> {
    let started = Instant::now();
    let answer = client
        .get_daily_exposure(v1::GetDailyExposureRequest {
            merchant_id,
            day: day.to_string(),
            consistency: v1::Consistency::Authoritative as i32,
            snapshot_id: String::new(),
        })
        .await?
        .into_inner();
    let took = started.elapsed().as_micros() as i64;
    let source = answer.provenance.as_ref().map(|p| p.source);
    anyhow::ensure!(
        answer.rows.len() == 1 && source == Some(v1::Source::Replay as i32),
        "an authoritative answer of one snapshot row, got {answer:?}"
    );
    Ok(took)
}

fn difference(after: PartCacheStats, before: PartCacheStats) -> PartCacheStats {
    PartCacheStats {
        memory_hits: after.memory_hits - before.memory_hits,
        disk_hits: after.disk_hits - before.disk_hits,
        misses: after.misses - before.misses,
        parts_memory_only: after.parts_memory_only - before.parts_memory_only,
    }
}

/// Appends this section's rows to the report's table.
pub async fn write_rows(args: &QueryBenchArgs, report: &mut BenchReport) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = Settings::default();
    let mut nats = LocalNats::start(&dir.path().join("nats"))?;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    payledger_server_common::topology::ensure_stream(&js, &settings.stream(), &stream_options())
        .await?;

    let store = dir.path().join("store").display().to_string();
    eprintln!(
        "authoritative reads: writing a snapshot of {} merchants × {} days…",
        args.query_merchants, args.query_days
    );
    let written = Instant::now();
    let (from, to) =
        write_snapshot(&store, &settings, args.query_merchants, args.query_days).await?;
    let rows = args.query_merchants * args.query_days as usize;
    eprintln!("  {rows} rows in {:.1} s", written.elapsed().as_secs_f64());

    let mut config = QueryConfig::new(&nats.url());
    config.store = Some(store.clone());
    config.cache_disk_dir = Some(dir.path().join("cache"));
    let query = Query::start(config.clone()).await?;
    let mut client = query.client().await?;

    // Cold: the first read of each part. A merchant of each partition, found by id.
    let mut first_of_partition = vec![None; settings.partitions as usize];
    for m in 0..args.query_merchants {
        let slot =
            &mut first_of_partition[partition_of(&merchant(m), settings.partitions) as usize];
        slot.get_or_insert(m);
    }
    let mut cold = Vec::new();
    for m in first_of_partition.into_iter().flatten() {
        cold.push(read(&mut client, merchant(m), to).await?);
    }
    let first_cold = cold[0];
    cold.sort_unstable();

    eprintln!("authoritative reads: {} warm calls…", args.query_calls);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let before = query.counters.cache_stats();
    let mut warm = Vec::with_capacity(args.query_calls);
    let started = Instant::now();
    for _ in 0..args.query_calls {
        let m = rng.gen_range(0..args.query_merchants);
        let day = Day(rng.gen_range(from.0..=to.0));
        warm.push(read(&mut client, merchant(m), day).await?);
    }
    let rate = args.query_calls as f64 / started.elapsed().as_secs_f64();
    let warm_stats = difference(query.counters.cache_stats(), before);
    warm.sort_unstable();
    drop(client);
    query.stop().await?;

    // Restart with a memory tier too small for any part: reads come from local disk.
    eprintln!("authoritative reads: restarted with a 1 MiB memory tier…");
    config.cache_memory_bytes = 1 << 20;
    let query = Query::start(config).await?;
    let mut client = query.client().await?;
    let mut disk = Vec::new();
    for _ in 0..(args.query_calls / 20).max(50) {
        let m = rng.gen_range(0..args.query_merchants);
        let day = Day(rng.gen_range(from.0..=to.0));
        disk.push(read(&mut client, merchant(m), day).await?);
    }
    drop(client);
    let disk_stats = query.stop().await?;
    disk.sort_unstable();
    nats.stop();

    let ms = |us: i64| us as f64 / 1000.0;
    report.row([format!("GetDailyExposure AUTHORITATIVE, cold: first read of a part, ms (object store read, Parquet decode, hash check; {} rows per part on average; first call / median / max of {} parts)", rows / settings.partitions as usize, cold.len()), format!("{:.1} / {:.1} / {:.1}", ms(first_cold), percentile(&cold, 0.5), percentile(&cold, 1.0)), String::new(), String::new(), String::new()]);
    report.row([format!("GetDailyExposure AUTHORITATIVE, warm cache, p50 / p99 / max ms ({} sequential calls over gRPC from one client, random merchant-days of {} merchants × {} days, {rate:.0} calls/s)", args.query_calls, args.query_merchants, args.query_days), format!("{:.3} / {:.3} / {:.3}", percentile(&warm, 0.5), percentile(&warm, 0.99), percentile(&warm, 1.0)), String::new(), String::new(), String::from("p99 < 2")]);
    report.row([
        String::from("part cache hit ratio over the warm calls (memory / disk / object store)"),
        format!(
            "{:.4} ({} / {} / {})",
            warm_stats.hit_ratio(),
            warm_stats.memory_hits,
            warm_stats.disk_hits,
            warm_stats.misses
        ),
        String::new(),
        String::new(),
        String::new(),
    ]);
    report.row([format!("GetDailyExposure AUTHORITATIVE after a restart, 1 MiB memory tier: p50 / p99 ms ({} calls; memory / disk / object store {} / {} / {})", disk.len(), disk_stats.memory_hits, disk_stats.disk_hits, disk_stats.misses), format!("{:.2} / {:.2}", percentile(&disk, 0.5), percentile(&disk, 0.99)), String::new(), String::new(), String::new()]);
    Ok(())
}
