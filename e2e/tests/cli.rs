//! The `payledger` binary against real services: `ingest` streams a file line by
//! line (a pipe's lines are sent while it is open, a quiet pipe's partial batch
//! too, and a file many times the process's memory goes through), rejects a bad
//! line on its own (with its number, exit 4) or, with `--all-or-nothing`, sends
//! nothing; FX rates and risk tiers from CSV and JSON lines reach the query
//! service's reporting values; and `reconcile` exits 3 on missing rows with
//! `--json` as without.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use payledger_e2e::{Stack, binary, deref_to_stack, now_us, query_client, read_log};
use payledger_proto::lines::{event_to_json, format_time_us};
use payledger_proto::v1::{self, query_service_client::QueryServiceClient};
use payledger_semantics::{
    Currency, DailyRow, Day, RecordedStream, SEMANTICS_VERSION, Settings, partition_of,
};
use payledger_storage::{ArchiveStore, CommitDraft, ObjectRef, SnapshotStore, open_store};
use tonic::transport::Channel;

const WITHIN: Duration = Duration::from_secs(60);

/// The shared stack (ingest without heartbeats, so the log holds exactly what was
/// accepted; the stream projector; query) and the CLI pointed at it.
struct Cli {
    stack: Stack,
}

deref_to_stack!(Cli);

async fn stack(query_args: &[&str]) -> anyhow::Result<Cli> {
    let stack = Stack::builder()
        .projector(&[])
        .query(query_args)
        .start()
        .await?;
    Ok(Cli { stack })
}

impl Cli {
    fn query_url(&self) -> String {
        self.query.as_ref().expect("the stack runs query").url()
    }

    fn payledger(&self) -> anyhow::Result<Command> {
        let mut command = Command::new(binary("payledger")?);
        command.env("PAYLEDGER_INGEST_URL", self.ingest.url());
        command.env("PAYLEDGER_QUERY_URL", self.query_url());
        Ok(command)
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self.payledger()?.args(args).output()?)
    }

    fn file(&self, name: &str, text: &str) -> anyhow::Result<String> {
        let path = self.h.dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    }
}

fn capture(id: &str, merchant_id: &str, amount_minor: i64, currency: &str) -> v1::Event {
    v1::Event {
        event_id: id.into(),
        merchant_id: merchant_id.into(),
        kind: v1::EventKind::PaymentCaptured as i32,
        amount_minor,
        currency: currency.into(),
        event_time_us: now_us() - 60_000_000,
        corrects_event_id: String::new(),
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The merchant's applied events per currency once they reach `applied`.
async fn wait_applied(
    query: &mut QueryServiceClient<Channel>,
    merchant_id: &str,
    applied: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let seen: u64 = match query
            .get_current_exposure(v1::GetCurrentExposureRequest {
                merchant_id: merchant_id.into(),
            })
            .await
        {
            Ok(e) => e.get_ref().rows.iter().map(|r| r.applied).sum(),
            Err(_) => 0,
        };
        if seen >= applied {
            anyhow::ensure!(
                seen == applied,
                "{merchant_id}: {seen} applied, not {applied}"
            );
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{merchant_id}: {seen} of {applied} events applied after {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Event ids in the log.
async fn logged_ids(nats_url: &str) -> anyhow::Result<Vec<String>> {
    Ok(read_log(nats_url)
        .await?
        .into_iter()
        .filter_map(|e| match e.record.body {
            Some(v1::log_record::Body::Fact(f)) => Some(f.event_id),
            _ => None,
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_sends_the_good_lines_and_names_the_bad_one() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let mut query = query_client(&s.query_url()).await?;
    let mut lines: Vec<String> = (1..=9)
        .map(|i| event_to_json(&capture(&format!("ev-{i}"), "m-file", 100 * i, "EUR")))
        .collect();
    // Line 5: the amount as a string. Line 8: a field ingest does not know.
    lines.insert(
        4,
        r#"{"event_id":"ev-bad","merchant_id":"m-file","kind":"PAYMENT_CAPTURED","amount_minor":"12","currency":"EUR","event_time":"2026-11-25T09:30:00Z"}"#.into(),
    );
    lines.insert(
        7,
        lines[0].replace("\"event_id\"", "\"note\":\"x\",\"event_id\""),
    );
    // Line 12: longer than --max-line-bytes, skipped without being held whole.
    lines.push(format!("{{\"event_id\":\"{}\"}}", "x".repeat(5_000)));
    let path = s.file("events.jsonl", &(lines.join("\n") + "\n"))?;

    let sent = s.run(&[
        "--json",
        "ingest",
        "--batch",
        "4",
        "--max-line-bytes",
        "1000",
        &path,
    ])?;
    assert_eq!(sent.status.code(), Some(4), "{}", stderr(&sent));
    let errors = stderr(&sent);
    assert!(
        errors.contains("line 5: amount_minor: must be an integer"),
        "{errors}"
    );
    assert!(
        errors.contains("line 8: note: not a field of events"),
        "{errors}"
    );
    assert!(
        errors.contains("line 12: longer than --max-line-bytes 1000"),
        "{errors}"
    );
    assert_eq!(errors.matches("line ").count(), 3, "{errors}");
    let summary: serde_json::Value = serde_json::from_str(&stdout(&sent))?;
    assert_eq!(summary["lines"], 12);
    assert_eq!(summary["sent"], 9);
    assert_eq!(summary["accepted"], 9);
    assert_eq!(summary["rejected"], 3);
    assert_eq!(summary["rejections"][0]["line"], 5);
    assert_eq!(summary["rejections"][0]["field"], "amount_minor");
    assert_eq!(summary["rejections"][1]["line"], 8);
    wait_applied(&mut query, "m-file", 9).await?;

    // Sent again: every event is a duplicate, the bad lines still rejected (the
    // long one, within the default limit, for its missing fields).
    let again = s.run(&["ingest", &path])?;
    assert_eq!(again.status.code(), Some(4), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("9 events sent: 0 accepted, 9 duplicate, 3 rejected"),
        "{}",
        stdout(&again)
    );

    // All or nothing: a bad line anywhere, and no line of the file is sent.
    let mut whole: Vec<String> = (1..=6)
        .map(|i| event_to_json(&capture(&format!("aon-{i}"), "m-file", 7, "EUR")))
        .collect();
    whole[5] = whole[5].replace("\"EUR\"", "\"eur\"");
    let path = s.file("whole.jsonl", &whole.join("\n"))?;
    let refused = s.run(&[
        "--json",
        "ingest",
        "--all-or-nothing",
        "--list-rejections",
        "0",
        &path,
    ])?;
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("line 6: currency:"),
        "{}",
        stderr(&refused)
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout(&refused))?;
    assert_eq!(summary["sent"], 0);
    assert_eq!(summary["all_or_nothing_refused"], true);
    assert_eq!(summary["rejected"], 1);
    assert_eq!(summary["rejections"], serde_json::json!([]));
    // Ingest answers only once JetStream stored a record, and the command has
    // exited: whatever it sent is in the log now.
    let ids = logged_ids(&s.h.nats.url()).await?;
    assert_eq!(ids.len(), 9, "{ids:?}");
    assert!(!ids.iter().any(|id| id.starts_with("aon-")), "{ids:?}");

    // The same file repaired goes through whole, exit 0.
    whole[5] = whole[5].replace("\"eur\"", "\"EUR\"");
    let path = s.file("whole.jsonl", &whole.join("\n"))?;
    let loaded = s.run(&["ingest", "--all-or-nothing", &path])?;
    assert_eq!(loaded.status.code(), Some(0), "{}", stderr(&loaded));
    wait_applied(&mut query, "m-file", 15).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_sends_lines_from_a_pipe_as_they_come() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let mut query = query_client(&s.query_url()).await?;
    let fifo = s.h.dir.path().join("events.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status()?;
    anyhow::ensure!(made.success(), "mkfifo failed");
    let mut child = s
        .payledger()?
        .args(["ingest", "--batch", "5", "--flush-after", "200ms"])
        .arg(&fifo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Opening blocks until the reader has the pipe open.
    let fifo_path = fifo.clone();
    let mut writer = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new().write(true).open(fifo_path)
    })
    .await??;
    let line = |i: i64| event_to_json(&capture(&format!("pipe-{i}"), "m-pipe", i, "USD")) + "\n";
    for i in 1..=5 {
        writer.write_all(line(i).as_bytes())?;
    }
    writer.flush()?;
    // The first batch is applied while the pipe is still open: the file is sent
    // as it is read, not once it ends.
    wait_applied(&mut query, "m-pipe", 5).await?;
    assert!(child.try_wait()?.is_none(), "ingest ended before its input");
    // Two lines, less than a batch, and the pipe goes quiet: they are sent too.
    for i in 6..=7 {
        writer.write_all(line(i).as_bytes())?;
    }
    writer.flush()?;
    wait_applied(&mut query, "m-pipe", 7).await?;
    assert!(child.try_wait()?.is_none(), "ingest ended before its input");
    writer.write_all(line(8).as_bytes())?;
    drop(writer);
    let done = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
    assert!(
        stdout(&done).contains("8 events sent: 8 accepted"),
        "{}",
        stdout(&done)
    );
    wait_applied(&mut query, "m-pipe", 8).await?;
    Ok(())
}

/// The high-water mark of a process's resident memory, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_memory_stays_bounded_by_a_line_and_a_batch_not_the_file() -> anyhow::Result<()> {
    const EVENTS: i64 = 3_000;
    const PAD: usize = 40_000;
    const BOUND: u64 = 48 << 20;
    let s = stack(&[]).await?;
    // Each line padded with blanks after its object: 120 MB of file, 3 000 events;
    // the process itself, a debug build with its gRPC client, takes about 35 MB.
    let path = s.h.dir.path().join("large.jsonl");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let pad = " ".repeat(PAD);
        for i in 1..=EVENTS {
            let line = event_to_json(&capture(&format!("big-{i}"), "m-big", 1, "USD"));
            writeln!(file, "{line}{pad}")?;
        }
        file.flush()?;
    }
    let size = std::fs::metadata(&path)?.len();
    assert!(
        size > 2 * BOUND,
        "the file ({size} bytes) must dwarf the bound"
    );
    let mut child = s
        .payledger()?
        .args(["ingest", "--batch", "100"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut peak = None;
    while child.try_wait()?.is_none() {
        if let Some(bytes) = peak_rss(pid) {
            peak = Some(bytes);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = child.wait_with_output()?;
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
    assert!(
        stdout(&done).contains("3000 events sent: 3000 accepted"),
        "{}",
        stdout(&done)
    );
    let peak = peak.ok_or_else(|| anyhow::anyhow!("no memory reading while ingest ran"))?;
    assert!(
        peak < BOUND,
        "peak resident memory {peak} bytes for a {size}-byte file"
    );
    Ok(())
}

/// The reporting values of a merchant's day once the query service has them.
async fn reporting(
    query: &mut QueryServiceClient<Channel>,
    merchant_id: &str,
    day: Day,
) -> anyhow::Result<v1::Reporting> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let answer = query
            .get_daily_exposure(v1::GetDailyExposureRequest {
                merchant_id: merchant_id.into(),
                day: day.to_string(),
                ..Default::default()
            })
            .await
            .map(|a| a.into_inner().reporting);
        if let Ok(Some(r)) = &answer
            && r.reserve_minor.is_some()
            && !r.risk_tier.is_empty()
        {
            return Ok(r.clone());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{merchant_id} {day}: no reporting values after {WITHIN:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fx_rates_and_risk_tiers_from_csv_and_json_lines_reach_query() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let mut query = query_client(&s.query_url()).await?;
    let today = Day::of_micros(now_us());
    let yesterday = Day(today.0 - 1);
    let fx_csv = s.file(
        "fx.csv",
        &format!("currency,rate,effective_date,version\nEUR,1.1000,{yesterday},1\n"),
    )?;
    let fx_jsonl = s.file(
        "fx.jsonl",
        &format!(
            "{{\"currency\":\"GBP\",\"rate\":\"1.25\",\"effective_date\":\"{yesterday}\",\"version\":1}}\n"
        ),
    )?;
    let risk_csv = s.file(
        "risk.csv",
        &format!(
            "merchant_id,tier,reserve_bps,effective_date,version\n\"m-eur\",high,500,{yesterday},1\n"
        ),
    )?;
    let risk_jsonl = s.file(
        "risk.jsonl",
        &format!(
            "{{\"merchant_id\":\"m-gbp\",\"tier\":\"low\",\"reserve_bps\":100,\"effective_date\":\"{yesterday}\",\"version\":1}}\n"
        ),
    )?;
    let at = format_time_us(now_us() - 60_000_000);
    let events_csv = s.file(
        "events.csv",
        &format!(
            "merchant_id,event_id,kind,amount_minor,currency,event_time\nm-eur,e-1,PAYMENT_CAPTURED,10000,EUR,{at}\n"
        ),
    )?;
    let events_jsonl = s.file(
        "events.jsonl",
        &event_to_json(&capture("g-1", "m-gbp", 20000, "GBP")),
    )?;
    for (kind, path) in [
        ("fx", &fx_csv),
        ("fx", &fx_jsonl),
        ("risk", &risk_csv),
        ("risk", &risk_jsonl),
        ("events", &events_csv),
        ("events", &events_jsonl),
    ] {
        let sent = s.run(&["--json", "ingest", "--kind", kind, path])?;
        assert_eq!(sent.status.code(), Some(0), "{path}: {}", stderr(&sent));
        let summary: serde_json::Value = serde_json::from_str(&stdout(&sent))?;
        assert_eq!(summary["accepted"], 1, "{path}: {summary}");
    }
    // 10000 EUR minor at 1.1 is 11000 USD minor, 5 % held; 20000 GBP at 1.25, 1 %.
    let eur = reporting(&mut query, "m-eur", today).await?;
    assert_eq!(eur.closing_reporting_minor.as_deref(), Some("11000"));
    assert_eq!(eur.reserve_minor.as_deref(), Some("550"));
    assert_eq!((eur.risk_tier.as_str(), eur.reserve_bps), ("high", 500));
    let gbp = reporting(&mut query, "m-gbp", today).await?;
    assert_eq!(gbp.closing_reporting_minor.as_deref(), Some("25000"));
    assert_eq!(gbp.reserve_minor.as_deref(), Some("250"));
    assert_eq!((gbp.risk_tier.as_str(), gbp.reserve_bps), ("low", 100));

    // A column ingest does not know refuses the whole CSV file at its header.
    let unknown = s.file(
        "bad.csv",
        &format!("currency,rate,effective_date,version,desk\nEUR,1.2,{today},2,x\n"),
    )?;
    let refused = s.run(&["ingest", "--kind", "fx", &unknown])?;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("line 1: the CSV header: desk: not a field of FX rates"),
        "{}",
        stderr(&refused)
    );
    Ok(())
}

/// Commits a snapshot holding one row the stream has never seen (a "lost" row),
/// with the archive watermark its cutoff needs.
async fn commit_row_the_stream_lacks(store: &str, day: Day) -> anyhow::Result<()> {
    const CUTOFF: u64 = 1_000;
    let settings = Settings::default();
    let objects = open_store(store)?;
    ArchiveStore::new(objects.clone(), RecordedStream::new(settings.stream()))
        .put_watermark(CUTOFF)
        .await?;
    let merchant_id = "m-lost".to_string();
    let partition = partition_of(&merchant_id, settings.partitions);
    let row = DailyRow {
        merchant_id,
        day,
        currency: Currency::parse("EUR").expect("ISO code"),
        closing_minor: 500,
        peak_minor: 500,
        peak_bucket_start_us: day.start_us(),
        applied: 1,
        duplicates: 0,
        conflicts: 0,
        late: 0,
        restated: false,
        log_position: 1,
        semantics_version: SEMANTICS_VERSION,
    };
    let snapshots = SnapshotStore::new(objects);
    let mut parts = Vec::new();
    for p in 0..settings.partitions {
        let rows = if p == partition {
            vec![row.clone()]
        } else {
            Vec::new()
        };
        parts.push(ObjectRef::from(snapshots.put_part("lost", p, &rows).await?));
    }
    snapshots
        .commit(CommitDraft {
            snapshot_id: "lost".into(),
            replay_id: "lost".into(),
            from_day: day,
            to_day: day,
            log_cutoff: CUTOFF,
            semantics_version: SEMANTICS_VERSION,
            version_key: settings.version_key(),
            partitions: settings.partitions,
            parts,
            segments_read: Vec::new(),
            states: Vec::new(),
        })
        .await?;
    Ok(())
}

fn reconcile(s: &Cli, json: bool, day: Day) -> anyhow::Result<Output> {
    let day = day.to_string();
    let mut args = vec!["reconcile", "--from", &day, "--to", &day];
    if json {
        args.insert(0, "--json");
    }
    s.run(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_exits_3_on_missing_rows_with_json_as_without() -> anyhow::Result<()> {
    let store_dir = tempfile::tempdir()?;
    let store = store_dir.path().display().to_string();
    let s = stack(&["--store", &store]).await?;
    let day = Day(Day::of_micros(now_us()).0 - 1);
    let clean = reconcile(&s, true, day)?;
    assert_eq!(clean.status.code(), Some(0), "{}", stderr(&clean));

    commit_row_the_stream_lacks(&store, day).await?;
    let deadline = Instant::now() + WITHIN;
    let found = loop {
        let answer = reconcile(&s, true, day)?;
        let report: serde_json::Value = serde_json::from_str(&stdout(&answer))
            .map_err(|e| anyhow::anyhow!("{e}: {}{}", stdout(&answer), stderr(&answer)))?;
        if report["rows_missing"] == 1 {
            break answer;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the commit was not reconciled after {WITHIN:?}: {report}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(found.status.code(), Some(3), "{}", stderr(&found));
    let text = reconcile(&s, false, day)?;
    assert_eq!(text.status.code(), Some(3), "{}", stderr(&text));
    assert!(
        stdout(&text).contains("MISSING_IN_STREAM") && stdout(&text).contains("m-lost"),
        "{}",
        stdout(&text)
    );
    Ok(())
}

#[test]
fn a_file_that_cannot_be_read_is_an_error_not_a_rejection() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("none.jsonl");
    let out = Command::new(binary("payledger")?)
        .args(["ingest", "--all-or-nothing"])
        .arg(&missing)
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains(&missing.display().to_string()),
        "{out:?}"
    );
    Ok(())
}
