//! `payledger`: run the stack locally, generate traffic, ingest files, query exposure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use payledger_cli::connect::Conn;
use payledger_cli::dev::{DevArgs, DevStack};
use payledger_cli::events_file::{EventLine, format_time_us};
use payledger_cli::generate::{GenConfig, Generator};
use payledger_cli::replay;
use payledger_proto::v1::{
    self, ingest_service_client::IngestServiceClient, query_service_client::QueryServiceClient,
};
use payledger_server_common::clock::now_us;

/// PayLedger: merchant exposure from one canonical log of payment facts.
///
/// Start a local stack with `payledger dev`, send traffic with `payledger gen
/// --send`, and read exposure with `payledger query current m-00001`.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Bearer token sent with every call (the role the command needs: producer for
    /// ingest and gen --send, reader for query, operator for replay and reconcile).
    #[arg(long, env = "PAYLEDGER_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: payledger_server_common::tls::ClientTlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct Endpoints {
    /// Ingest service URL.
    #[arg(
        long,
        env = "PAYLEDGER_INGEST_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    ingest_url: String,
    /// Query service URL.
    #[arg(
        long,
        env = "PAYLEDGER_QUERY_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    query_url: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run nats-server, ingest, projector and query on this machine until Ctrl-C or SIGTERM.
    Dev(DevArgs),
    /// Run the stack, send a short generated workload, print a few merchants' exposure, stop.
    Demo {
        #[command(flatten)]
        dev: DevArgs,
        /// Events to send.
        #[arg(long, default_value_t = 5000)]
        events: usize,
    },
    /// Generate realistic traffic: to a JSON-lines file, or straight to ingest with --send.
    Gen {
        #[command(flatten)]
        config: GenConfig,
        /// Write events as JSON lines to this file ("-" for stdout).
        #[arg(long, conflicts_with = "send")]
        out: Option<PathBuf>,
        /// Send to the ingest service instead of writing a file.
        #[arg(long)]
        send: bool,
        /// Events per Publish call.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Events per second at most (0: as fast as ingest answers).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Send a JSON-lines file of events to the ingest service.
    Ingest {
        /// The file ("-" for stdin).
        file: PathBuf,
        /// Events per Publish call.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Read exposure from the query service.
    #[command(subcommand)]
    Query(QueryCommand),
    /// Compare the committed snapshots with the stream's rows and say why they differ.
    Reconcile {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Most differences listed.
        #[arg(long, default_value_t = 50)]
        max: u32,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Replay archived history and commit the authoritative daily table: through the
    /// replay coordinator (start, status, list, cancel) or in this process (run).
    #[command(subcommand)]
    Replay(ReplayCommand),
    /// Check that services are up: gRPC health answers SERVING and reflection lists
    /// their services. Exits 1 naming the first that is not (the Helm test hook runs it).
    Check {
        /// Service URLs, e.g. http://payledger-query:50052.
        #[arg(required = true)]
        urls: Vec<String>,
    },
    /// Measure ingest, projection, freshness and the fold against baselines (use a release build).
    Bench(payledger_cli::bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum QueryCommand {
    /// Current open exposure of a merchant, per currency.
    Current {
        merchant: String,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// One merchant-day (YYYY-MM-DD), all currencies, with FX and reserve applied.
    Daily {
        merchant: String,
        day: String,
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Auto)]
        consistency: ConsistencyArg,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Merchant-days in a range, page by page.
    List {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "")]
        merchant: String,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Follow merchants' current exposure as it changes (Ctrl-C to stop).
    Watch {
        merchants: Vec<String>,
        #[command(flatten)]
        endpoints: Endpoints,
    },
}

/// The days a replay publishes.
#[derive(clap::Args, Debug)]
struct DayRange {
    /// First day to publish (YYYY-MM-DD).
    #[arg(long, required_unless_present = "yesterday")]
    from: Option<String>,
    /// Last day to publish (YYYY-MM-DD).
    #[arg(long, required_unless_present = "yesterday")]
    to: Option<String>,
    /// Publish yesterday (UTC) only: the nightly replay.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    yesterday: bool,
}

impl DayRange {
    fn days(&self) -> anyhow::Result<(payledger_semantics::Day, payledger_semantics::Day)> {
        use payledger_semantics::Day;
        let day = |flag: &str, text: &Option<String>| {
            Day::parse(text.as_deref().unwrap_or_default())
                .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
        };
        let (from, to) = if self.yesterday {
            let y = Day(Day::of_micros(now_us()).0 - 1);
            (y, y)
        } else {
            (day("from", &self.from)?, day("to", &self.to)?)
        };
        anyhow::ensure!(from <= to, "--from {from} is after --to {to}");
        Ok((from, to))
    }
}

#[derive(clap::Args, Debug, Clone)]
struct CoordinatorUrl {
    /// Replay coordinator URL.
    #[arg(
        long,
        env = "PAYLEDGER_COORDINATOR_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    coordinator_url: String,
}

#[derive(Subcommand, Debug)]
enum ReplayCommand {
    /// Ask the replay coordinator to replay the archive on the projector workers and
    /// commit the rows of the day range; with --wait, follow it with a bar per shard
    /// and end once the query service (--query-url) reads the commit.
    ///
    /// Exit status with --wait: 0 committed and reconciled without divergence, 2 the
    /// replay failed or was cancelled, 3 committed but reconciliation found divergent
    /// or missing rows.
    Start {
        #[command(flatten)]
        days: DayRange,
        /// Why (kept with the replay): "nightly", "late settlement file of 2026-11-20", ...
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Log cutoff: an archive watermark. By default the replay covers every
        /// record the stream holds now: the coordinator waits (at most its
        /// --archive-wait) until the archive reaches them.
        #[arg(long, default_value_t = 0)]
        cutoff: u64,
        /// Fold every partition from the beginning of history (an audit of the
        /// stored replay states), not from the newest committed state at or below
        /// the cutoff.
        #[arg(long)]
        from_genesis: bool,
        /// Wait until the replay ends, showing progress per shard.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        coordinator: CoordinatorUrl,
        #[command(flatten)]
        retry: replay::RetryArgs,
        #[command(flatten)]
        served: replay::ServedArgs,
    },
    /// Show one replay, shard by shard.
    Status {
        replay_id: String,
        #[command(flatten)]
        coordinator: CoordinatorUrl,
    },
    /// The latest replays, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        coordinator: CoordinatorUrl,
    },
    /// Stop a replay that has not committed yet.
    Cancel {
        replay_id: String,
        #[command(flatten)]
        coordinator: CoordinatorUrl,
        #[command(flatten)]
        retry: replay::RetryArgs,
    },
    /// Fold the archive from its beginning through the cutoff in this process (no
    /// coordinator or workers needed) and commit the rows of the day range as the
    /// authoritative snapshot.
    Run {
        #[command(flatten)]
        days: DayRange,
        /// Log cutoff: an archive watermark; the highest by default.
        #[arg(long)]
        cutoff: Option<u64>,
        /// Names the replay in the commit log.
        #[arg(long, default_value = "manual")]
        replay_id: String,
        /// Fold from the beginning of history, not from committed replay states.
        #[arg(long)]
        from_genesis: bool,
        /// Object storage holding the archive and the tables.
        #[arg(long, env = "PAYLEDGER_STORE", default_value = "./data/store")]
        store: String,
        #[command(flatten)]
        nats: payledger_server_common::config::NatsArgs,
        #[command(flatten)]
        projection: payledger_server_common::config::ProjectionArgs,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ConsistencyArg {
    Auto,
    Provisional,
    Authoritative,
}

impl ConsistencyArg {
    fn to_proto(self) -> v1::Consistency {
        match self {
            ConsistencyArg::Auto => v1::Consistency::Auto,
            ConsistencyArg::Provisional => v1::Consistency::Provisional,
            ConsistencyArg::Authoritative => v1::Consistency::Authoritative,
        }
    }
}

async fn channel(url: &str, what: &str) -> anyhow::Result<Conn> {
    payledger_cli::connect::connect(url, what).await
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

#[derive(Default, Debug, serde::Serialize)]
struct Tally {
    accepted: u64,
    duplicate: u64,
    rejected: u64,
    /// Highest accepted sequence per merchant, to know when rows have caught up.
    #[serde(skip)]
    last_seq: HashMap<String, u64>,
}

async fn publish(
    client: &mut IngestServiceClient<Conn>,
    events: Vec<v1::Event>,
    tally: &mut Tally,
    mut on_reject: impl FnMut(&v1::Event, &v1::Rejected),
) -> anyhow::Result<()> {
    let response = client
        .publish(v1::PublishRequest {
            events: events.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    for (event, result) in events.iter().zip(response.results) {
        match result.outcome {
            Some(v1::publish_result::Outcome::Accepted(a)) => {
                tally.accepted += 1;
                let seq = tally.last_seq.entry(event.merchant_id.clone()).or_default();
                *seq = (*seq).max(a.sequence);
            }
            Some(v1::publish_result::Outcome::Duplicate(_)) => tally.duplicate += 1,
            Some(v1::publish_result::Outcome::Rejected(r)) => {
                tally.rejected += 1;
                on_reject(event, &r);
            }
            None => anyhow::bail!("ingest answered an event without an outcome"),
        }
    }
    Ok(())
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

async fn send_generated(
    generator: &mut Generator,
    count: usize,
    batch: usize,
    rate: u64,
    ingest_url: &str,
) -> anyhow::Result<Tally> {
    let mut client = IngestServiceClient::new(channel(ingest_url, "ingest").await?);
    let today = payledger_semantics::Day::of_micros(now_us()).to_string();
    let yesterday =
        payledger_semantics::Day(payledger_semantics::Day::of_micros(now_us()).0 - 1).to_string();
    for fx in generator.fx_records(&yesterday) {
        client
            .publish_dimension(v1::PublishDimensionRequest {
                record: Some(v1::publish_dimension_request::Record::Fx(fx)),
            })
            .await
            .map_err(status_error)?;
    }
    for risk in generator.risk_records(&today) {
        client
            .publish_dimension(v1::PublishDimensionRequest {
                record: Some(v1::publish_dimension_request::Record::Risk(risk)),
            })
            .await
            .map_err(status_error)?;
    }
    let bar = progress(count as u64, "sending");
    let mut tally = Tally::default();
    let started = std::time::Instant::now();
    let mut sent = 0usize;
    while sent < count {
        let n = batch.max(1).min(count - sent);
        let events = generator.batch(n, now_us());
        publish(&mut client, events, &mut tally, |e, r| {
            bar.suspend(|| eprintln!("rejected {}: {}", e.event_id, r.message));
        })
        .await?;
        sent += n;
        bar.set_position(sent as u64);
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    bar.finish_and_clear();
    Ok(tally)
}

fn print_current(e: &v1::CurrentExposure) {
    println!("merchant {}", e.merchant_id);
    println!(
        "  {:<4} {:>18} {:>8} {:>6} {:>6} {:>6} {:>7} {:>10}  last event",
        "cur", "balance_minor", "applied", "dup", "confl", "late", "too_old", "log_pos"
    );
    for r in &e.rows {
        println!(
            "  {:<4} {:>18} {:>8} {:>6} {:>6} {:>6} {:>7} {:>10}  {}",
            r.currency,
            r.balance_minor,
            r.applied,
            r.duplicates,
            r.conflicts,
            r.late,
            r.too_old,
            r.log_position,
            format_time_us(r.last_event_time_us)
        );
    }
    print_provenance(e.provenance.as_ref());
}

fn print_provenance(p: Option<&v1::Provenance>) {
    let Some(p) = p else { return };
    let source = v1::Source::try_from(p.source)
        .map(|s| s.as_str_name())
        .unwrap_or("?");
    let lag = p.stream_lag.as_ref().map_or("unknown".to_string(), |l| {
        if !l.refused.is_empty() {
            format!("p{} NOT CURRENT: {}", l.partition, l.refused)
        } else if l.known {
            format!(
                "p{} applied through seq {}, {} pending, reported {} ms ago",
                l.partition,
                l.applied_sequence,
                l.pending_records,
                l.report_age_us / 1000
            )
        } else {
            format!("p{} not reported yet", l.partition)
        }
    });
    println!(
        "  source {source}{} restated={} log_position={} semantics v{} version key {}\n  stream: {lag}",
        if p.provisional { " (provisional)" } else { "" },
        p.restated,
        p.log_position,
        p.semantics_version,
        p.version_key
    );
}

fn print_daily(e: &v1::DailyExposure) {
    println!("merchant {} day {}", e.merchant_id, e.day);
    println!(
        "  {:<4} {:>18} {:>18} {:>8} {:>8} {:>6} {:>6} {:>6} {:>9} {:>10}",
        "cur",
        "closing_minor",
        "peak_minor",
        "peak at",
        "applied",
        "dup",
        "confl",
        "late",
        "restated",
        "log_pos"
    );
    for r in &e.rows {
        let peak_at = format_time_us(r.peak_bucket_start_us);
        println!(
            "  {:<4} {:>18} {:>18} {:>8} {:>8} {:>6} {:>6} {:>6} {:>9} {:>10}",
            r.currency,
            r.closing_minor,
            r.peak_minor,
            &peak_at[11..16],
            r.applied,
            r.duplicates,
            r.conflicts,
            r.late,
            r.restated,
            r.log_position
        );
    }
    if let Some(rep) = &e.reporting {
        let fx: Vec<String> = rep
            .fx_versions
            .iter()
            .map(|f| {
                format!(
                    "{}@{} v{} ({})",
                    f.currency, f.effective_date, f.version, f.rate
                )
            })
            .collect();
        println!(
            "  in {}: closing {} reserve {} (tier '{}', {} bps){}{}",
            rep.reporting_currency,
            rep.closing_reporting_minor.as_deref().unwrap_or("n/a"),
            rep.reserve_minor.as_deref().unwrap_or("n/a"),
            rep.risk_tier,
            rep.reserve_bps,
            if fx.is_empty() {
                String::new()
            } else {
                format!("; fx {}", fx.join(", "))
            },
            if rep.missing_rates.is_empty() {
                String::new()
            } else {
                format!("; missing rates: {}", rep.missing_rates.join(", "))
            },
        );
    }
    print_provenance(e.provenance.as_ref());
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

async fn query_client(url: &str) -> anyhow::Result<QueryServiceClient<Conn>> {
    Ok(QueryServiceClient::new(channel(url, "query").await?))
}

async fn run_query(command: QueryCommand, json: bool) -> anyhow::Result<()> {
    match command {
        QueryCommand::Current {
            merchant,
            endpoints,
        } => {
            let mut client = query_client(&endpoints.query_url).await?;
            let e = client
                .get_current_exposure(v1::GetCurrentExposureRequest {
                    merchant_id: merchant,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                print_json(&json_current(&e))?
            } else {
                print_current(&e)
            }
        }
        QueryCommand::Daily {
            merchant,
            day,
            consistency,
            endpoints,
        } => {
            let mut client = query_client(&endpoints.query_url).await?;
            let response = client
                .get_daily_exposure(v1::GetDailyExposureRequest {
                    merchant_id: merchant,
                    day,
                    consistency: consistency.to_proto() as i32,
                    snapshot_id: String::new(),
                })
                .await
                .map_err(status_error)?;
            warn_reporting_incomplete(response.metadata());
            let e = response.into_inner();
            if json {
                print_json(&json_daily(&e))?
            } else {
                print_daily(&e)
            }
        }
        QueryCommand::List {
            from,
            to,
            merchant,
            page_size,
            endpoints,
        } => {
            let mut client = query_client(&endpoints.query_url).await?;
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_daily_exposure(v1::ListDailyExposureRequest {
                        merchant_id: merchant.clone(),
                        from_day: from.clone(),
                        to_day: to.clone(),
                        consistency: v1::Consistency::Auto as i32,
                        page_size,
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(status_error)?;
                warn_reporting_incomplete(page.metadata());
                let page = page.into_inner();
                for e in &page.items {
                    if json {
                        print_json(&json_daily(e))?
                    } else {
                        print_daily(e)
                    }
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        QueryCommand::Watch {
            merchants,
            endpoints,
        } => {
            let mut client = query_client(&endpoints.query_url).await?;
            let mut stream = client
                .watch_current_exposure(v1::WatchCurrentExposureRequest {
                    merchant_ids: merchants,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(status_error)? {
                if json {
                    print_json(&json_current(&e))?
                } else {
                    print_current(&e)
                }
            }
        }
    }
    Ok(())
}

/// Says on stderr (stdout stays the answer, JSON or not) why stream answers carry
/// no reporting values, when the query service says so.
fn warn_reporting_incomplete(metadata: &tonic::metadata::MetadataMap) {
    if let Some(reason) = metadata
        .get(payledger_query::REPORTING_INCOMPLETE)
        .and_then(|v| v.to_str().ok())
    {
        eprintln!("warning: reporting values withheld from stream answers: {reason}");
    }
}

fn json_rows<T>(rows: &[T], f: impl Fn(&T) -> serde_json::Value) -> serde_json::Value {
    serde_json::Value::Array(rows.iter().map(f).collect())
}

fn json_provenance(p: Option<&v1::Provenance>) -> serde_json::Value {
    let Some(p) = p else {
        return serde_json::Value::Null;
    };
    let lag = p.stream_lag.clone().unwrap_or_default();
    serde_json::json!({
        "source": v1::Source::try_from(p.source).map(|s| s.as_str_name()).unwrap_or("?"),
        "provisional": p.provisional, "restated": p.restated, "snapshot_id": p.snapshot_id,
        "log_position": p.log_position, "semantics_version": p.semantics_version,
        "version_key": p.version_key,
        "stream_lag": {"partition": lag.partition, "known": lag.known, "applied_sequence": lag.applied_sequence,
                        "pending_records": lag.pending_records, "report_age_us": lag.report_age_us,
                        "refused": lag.refused},
    })
}

fn json_current(e: &v1::CurrentExposure) -> serde_json::Value {
    serde_json::json!({
        "merchant_id": e.merchant_id,
        "rows": json_rows(&e.rows, |r| serde_json::json!({
            "currency": r.currency, "balance_minor": r.balance_minor, "last_event_time_us": r.last_event_time_us,
            "applied": r.applied, "duplicates": r.duplicates, "conflicts": r.conflicts, "late": r.late,
            "too_old": r.too_old, "log_position": r.log_position, "semantics_version": r.semantics_version})),
        "provenance": json_provenance(e.provenance.as_ref()),
    })
}

fn json_daily(e: &v1::DailyExposure) -> serde_json::Value {
    let rep = e.reporting.clone().unwrap_or_default();
    serde_json::json!({
        "merchant_id": e.merchant_id, "day": e.day,
        "rows": json_rows(&e.rows, |r| serde_json::json!({
            "currency": r.currency, "closing_minor": r.closing_minor, "peak_minor": r.peak_minor,
            "peak_bucket_start_us": r.peak_bucket_start_us, "applied": r.applied, "duplicates": r.duplicates,
            "conflicts": r.conflicts, "late": r.late, "restated": r.restated, "log_position": r.log_position,
            "semantics_version": r.semantics_version})),
        "reporting": {"currency": rep.reporting_currency, "closing_reporting_minor": rep.closing_reporting_minor,
                      "reserve_minor": rep.reserve_minor, "risk_tier": rep.risk_tier, "risk_version": rep.risk_version,
                      "reserve_bps": rep.reserve_bps, "missing_rates": rep.missing_rates,
                      "fx_versions": json_rows(&rep.fx_versions, |f| serde_json::json!({
                          "currency": f.currency, "effective_date": f.effective_date, "version": f.version, "rate": f.rate}))},
        "provenance": json_provenance(e.provenance.as_ref()),
    })
}

async fn ingest_file(
    file: PathBuf,
    batch: usize,
    endpoints: Endpoints,
    json: bool,
) -> anyhow::Result<()> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
    };
    // Every line is checked before anything is sent: a malformed file changes nothing.
    let mut events = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parsed: EventLine =
            serde_json::from_str(line).with_context(|| format!("line {}: not an event", n + 1))?;
        events.push(
            parsed
                .to_event()
                .map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))?,
        );
    }
    let mut client = IngestServiceClient::new(channel(&endpoints.ingest_url, "ingest").await?);
    let bar = progress(events.len() as u64, "ingesting");
    let mut tally = Tally::default();
    for chunk in events.chunks(batch.max(1)) {
        publish(&mut client, chunk.to_vec(), &mut tally, |e, r| {
            bar.suspend(|| eprintln!("rejected {}: {} (field {})", e.event_id, r.message, r.field));
        })
        .await?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if json {
        print_json(&tally)?;
    } else {
        println!(
            "{} accepted, {} duplicate, {} rejected",
            tally.accepted, tally.duplicate, tally.rejected
        );
    }
    Ok(())
}

async fn demo(dev: DevArgs, events: usize) -> anyhow::Result<()> {
    let stack = DevStack::start(&dev).await?;
    println!(
        "stack up: nats {}  ingest {}  query {}  projector {}  coordinator {}",
        stack.nats.url(),
        stack.ingest,
        stack.query,
        stack.projector,
        stack.coordinator
    );
    let config = GenConfig {
        events,
        merchants: 20,
        ..GenConfig::default()
    };
    let mut generator = Generator::new(config);
    let ingest_url = format!("http://{}", stack.ingest);
    let tally = send_generated(&mut generator, events, 500, 0, &ingest_url).await?;
    println!(
        "sent {events} events: {} accepted, {} duplicate (absorbed by ingest), {} rejected",
        tally.accepted, tally.duplicate, tally.rejected
    );
    let mut client = query_client(&format!("http://{}", stack.query)).await?;
    let mut merchants: Vec<_> = tally.last_seq.iter().collect();
    merchants.sort();
    for (merchant, last) in merchants.iter().take(3) {
        // Wait until the stream tables have caught up with what ingest acknowledged.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let exposure = loop {
            match client
                .get_current_exposure(v1::GetCurrentExposureRequest {
                    merchant_id: merchant.to_string(),
                })
                .await
            {
                Ok(e) if e.get_ref().rows.iter().map(|r| r.log_position).max() >= Some(**last) => {
                    break e.into_inner();
                }
                _ if std::time::Instant::now() > deadline => {
                    anyhow::bail!("rows of {merchant} did not catch up within 30 s")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        println!();
        print_current(&exposure);
        let today = payledger_semantics::Day::of_micros(now_us()).to_string();
        if let Ok(daily) = client
            .get_daily_exposure(v1::GetDailyExposureRequest {
                merchant_id: merchant.to_string(),
                day: today,
                ..Default::default()
            })
            .await
        {
            println!();
            print_daily(daily.get_ref());
        }
    }
    // The authoritative side: replay the archive and commit today's rows.
    let objects = payledger_storage::open_store(&stack.data.join("store").display().to_string())?;
    let archive = payledger_storage::ArchiveStore::new(
        objects.clone(),
        payledger_semantics::RecordedStream::new(dev.stream.settings()?),
    );
    let last = tally.last_seq.values().copied().max().unwrap_or(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while payledger_projector::replay::latest_cutoff(&archive).await? < last {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the archive did not catch up within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The nightly job, run now: the coordinator shards the replay over the two
    // workers and commits the snapshot.
    let today = payledger_semantics::Day::of_micros(now_us());
    let mut coordinator = replay::client(&format!("http://{}", stack.coordinator)).await?;
    let started = coordinator
        .start_replay(v1::StartReplayRequest {
            from_day: payledger_semantics::Day(today.0 - 1).to_string(),
            to_day: today.to_string(),
            reason: "demo".into(),
            cutoff: 0,
            from_genesis: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("\n{} on the replay workers", replay::started_line(&started));
    let ended = replay::wait(&mut coordinator, &started.replay_id, true).await?;
    replay::print(&ended, false);
    anyhow::ensure!(
        ended.state == i32::from(v1::ReplayState::Succeeded),
        "the replay did not succeed"
    );
    if let Some((merchant, _)) = merchants.first() {
        let ask = v1::GetDailyExposureRequest {
            merchant_id: merchant.to_string(),
            day: today.to_string(),
            ..Default::default()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let answer = client
                .get_daily_exposure(ask.clone())
                .await
                .map_err(status_error)?
                .into_inner();
            let from_replay = answer
                .provenance
                .as_ref()
                .is_some_and(|p| p.source == v1::Source::Replay as i32);
            if from_replay || std::time::Instant::now() > deadline {
                println!();
                print_daily(&answer);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    stack.stop().await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    payledger_cli::connect::set_token(cli.token.as_deref())?;
    payledger_cli::connect::set_tls(&cli.tls)?;
    // Services log warnings only, to keep the output readable; RUST_LOG overrides.
    // Dropped when main returns: spans still buffered are exported then.
    let _telemetry = matches!(
        cli.command,
        Command::Dev(_) | Command::Demo { .. } | Command::Bench(_)
    )
    .then(|| payledger_server_common::telemetry::init_tracing_with_default("payledger", "warn"));
    match cli.command {
        Command::Dev(args) => {
            let stack = DevStack::start(&args).await?;
            println!("payledger dev is up (Ctrl-C or SIGTERM to stop)");
            println!("  nats      {}", stack.nats.url());
            println!("  ingest    http://{}", stack.ingest);
            println!("  query     http://{}", stack.query);
            println!("  projector http://{} (health)", stack.projector);
            println!(
                "  replay coordinator http://{} (workers {:?})",
                stack.coordinator, args.workers
            );
            println!("  data      {}", stack.data.display());
            println!("try: payledger gen --send --events 5000 && payledger query current m-00001");
            println!(
                "then: payledger replay start --from $(date -u +%F) --to $(date -u +%F) --wait"
            );
            // SIGTERM as well as Ctrl-C: a supervisor, a terminal closing or `kill`
            // must not leave the private nats-server running.
            payledger_server_common::shutdown::next_signal().await;
            tracing::info!("shutdown requested; draining (signal again to exit at once)");
            // A second signal cuts the drain short, but only once the drain, and
            // with it `stack`, is dropped, since that stops nats-server.
            let drained = tokio::select! {
                stopped = stack.stop() => Some(stopped),
                _ = payledger_server_common::shutdown::next_signal() => None,
            };
            match drained {
                Some(stopped) => stopped?,
                None => {
                    tracing::warn!("second signal; exiting without draining");
                    std::process::exit(130);
                }
            }
        }
        Command::Demo { dev, events } => {
            // Interrupted, the demo is dropped, and its stack with it, which
            // stops the stack's nats-server.
            let finished = tokio::select! {
                finished = demo(dev, events) => Some(finished),
                _ = payledger_server_common::shutdown::next_signal() => None,
            };
            match finished {
                Some(finished) => finished?,
                None => {
                    eprintln!("interrupted; the demo's stack is stopped");
                    std::process::exit(130);
                }
            }
        }
        Command::Gen {
            config,
            out,
            send,
            batch,
            rate,
            endpoints,
        } => {
            let count = config.events;
            let mut generator = Generator::new(config);
            if send {
                let tally =
                    send_generated(&mut generator, count, batch, rate, &endpoints.ingest_url)
                        .await?;
                if cli.json {
                    print_json(&tally)?;
                } else {
                    println!(
                        "{} accepted, {} duplicate, {} rejected",
                        tally.accepted, tally.duplicate, tally.rejected
                    );
                }
            } else {
                use std::io::Write;
                let mut writer: Box<dyn Write> = match out.as_deref() {
                    None => Box::new(std::io::stdout().lock()),
                    Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdout().lock()),
                    Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
                };
                let now = now_us();
                for _ in 0..count {
                    let event = generator.next_event(now);
                    writeln!(
                        writer,
                        "{}",
                        serde_json::to_string(&EventLine::from_event(&event))?
                    )?;
                }
                writer.flush()?;
            }
        }
        Command::Ingest {
            file,
            batch,
            endpoints,
        } => ingest_file(file, batch, endpoints, cli.json).await?,
        Command::Query(command) => run_query(command, cli.json).await?,
        Command::Bench(args) => payledger_cli::bench::run(args).await?,
        Command::Check { urls } => {
            for url in urls {
                let services = payledger_cli::check::check(&url).await?;
                println!("{url}: SERVING; {}", services.join(", "));
            }
        }
        Command::Reconcile {
            from,
            to,
            max,
            endpoints,
        } => {
            let report = replay::reconcile_range(&endpoints.query_url, &from, &to, max).await?;
            if cli.json {
                print_json(&report)?;
            } else {
                println!(
                    "{} equal, {} stream ahead of the snapshot, {} divergent, {} missing on one side (snapshots: {}{})",
                    report.rows_equal,
                    report.rows_stream_ahead,
                    report.rows_divergent,
                    report.rows_missing,
                    report.snapshot_ids.join(", "),
                    if report.uncovered_days.is_empty() {
                        String::new()
                    } else {
                        format!("; no commit for {}", report.uncovered_days.join(", "))
                    }
                );
                for d in &report.differences {
                    println!(
                        "  {:<20} {} {} {}: {}",
                        d.kind, d.merchant_id, d.day, d.currency, d.detail
                    );
                }
                if report.rows_divergent + report.rows_missing > 0 {
                    std::process::exit(3);
                }
            }
        }
        Command::Replay(ReplayCommand::Start {
            days,
            reason,
            cutoff,
            from_genesis,
            wait,
            coordinator,
            retry,
            served,
        }) => {
            let (from_day, to_day) = days.days()?;
            let request = v1::StartReplayRequest {
                from_day: from_day.to_string(),
                to_day: to_day.to_string(),
                reason,
                cutoff,
                from_genesis,
            };
            // Sent again only after a refusal made before anything was done (or no
            // connection at all), never after one that may have started a replay:
            // see `replay::retryable`.
            let (started, mut client) = replay::send_with_retry(
                &coordinator.coordinator_url,
                &retry,
                replay::Call::Start,
                |mut client| {
                    let request = request.clone();
                    async move { client.start_replay(request).await }
                },
            )
            .await?;
            if !wait {
                if cli.json {
                    print_json(&replay::to_json(&started))?;
                } else {
                    replay::print(&started, false);
                }
                return Ok(());
            }
            if !cli.json {
                println!("{}", replay::started_line(&started));
            }
            let ended = replay::wait(&mut client, &started.replay_id, !cli.json).await?;
            replay::wait_until_served(&ended, &served).await;
            if cli.json {
                print_json(&replay::to_json(&ended))?;
            } else {
                replay::print(&ended, false);
            }
            if ended.state != i32::from(v1::ReplayState::Succeeded) {
                std::process::exit(2);
            }
            if ended
                .reconciliation
                .is_some_and(|c| c.rows_divergent + c.rows_missing > 0)
            {
                std::process::exit(3);
            }
        }
        Command::Replay(ReplayCommand::Status {
            replay_id,
            coordinator,
        }) => {
            let mut client = replay::client(&coordinator.coordinator_url).await?;
            let found = client
                .get_replay(v1::GetReplayRequest { replay_id })
                .await
                .map_err(status_error)?
                .into_inner();
            if cli.json {
                print_json(&replay::to_json(&found))?;
            } else {
                replay::print(&found, true);
            }
        }
        Command::Replay(ReplayCommand::List { limit, coordinator }) => {
            let mut client = replay::client(&coordinator.coordinator_url).await?;
            let replays = client
                .list_replays(v1::ListReplaysRequest { limit })
                .await
                .map_err(status_error)?
                .into_inner()
                .replays;
            if cli.json {
                print_json(&replays.iter().map(replay::to_json).collect::<Vec<_>>())?;
            } else if replays.is_empty() {
                println!(
                    "no replays yet; start one with `payledger replay start --yesterday --wait`"
                );
            } else {
                for r in &replays {
                    replay::print(r, false);
                }
            }
        }
        Command::Replay(ReplayCommand::Cancel {
            replay_id,
            coordinator,
            retry,
        }) => {
            let (stopped, _) = replay::send_with_retry(
                &coordinator.coordinator_url,
                &retry,
                replay::Call::Cancel,
                |mut client| {
                    let replay_id = replay_id.clone();
                    async move {
                        client
                            .cancel_replay(v1::CancelReplayRequest { replay_id })
                            .await
                    }
                },
            )
            .await?;
            if cli.json {
                print_json(&replay::to_json(&stopped))?;
            } else {
                replay::print(&stopped, false);
            }
        }
        Command::Replay(ReplayCommand::Run {
            days,
            cutoff,
            replay_id,
            from_genesis,
            store,
            nats,
            projection,
        }) => {
            let (from_day, to_day) = days.days()?;
            // The stream's settings are recorded with the stream; the projection's
            // are this command's.
            let client = nats.connect("payledger-replay").await?;
            let recorded =
                payledger_server_common::topology::read_stream(&async_nats::jetstream::new(client))
                    .await?;
            let settings =
                payledger_semantics::Settings::of(recorded.settings, projection.settings()?);
            settings.validate()?;
            let stores = payledger_projector::replay::ReplayStores::at(
                payledger_storage::open_store(&store)?,
                recorded,
            );
            let request = payledger_projector::replay::ReplayRequest {
                replay_id,
                from_day,
                to_day,
                cutoff,
                from_genesis,
            };
            let bar = ProgressBar::new(u64::from(settings.partitions));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} replaying [{bar:40}] {pos}/{len} partitions ({elapsed})",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            let commit =
                payledger_projector::replay::replay_and_commit(&stores, settings, &request, |_| {
                    bar.inc(1)
                })
                .await?;
            bar.finish_and_clear();
            if cli.json {
                print_json(&commit)?;
            } else {
                println!(
                    "committed #{}: snapshot {} for {} to {}, log cutoff {}, {} rows",
                    commit.number,
                    commit.draft.snapshot_id,
                    commit.draft.from_day,
                    commit.draft.to_day,
                    commit.draft.log_cutoff,
                    commit.draft.parts.iter().map(|p| p.rows).sum::<u64>()
                );
            }
        }
    }
    Ok(())
}
