//! The SQL other engines run over the archive (`e2e/sql/`) against segments the
//! archive writer wrote: DuckDB sees exactly the columns of
//! `payledger_storage::columns`, and each query runs and gives the closing balances
//! the records imply (docs/storage.md, "Column contract").

use std::path::{Path, PathBuf};
use std::process::Command;

use payledger_semantics::{
    Currency, Day, EventKind, Fact, FxRecord, Rate, Record, RecordBody, RecordedStream, RiskRecord,
    StreamSettings,
};
use payledger_storage::columns::{dims, events};
use payledger_storage::{ArchiveStore, ArchivedDim, CutRange, DimRecord, open_store};

fn python() -> PathBuf {
    std::env::var_os("PAYLEDGER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// Runs `e2e/sql/{script}` with `args`; its standard output.
fn run_sql(script: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sql")
        .join(script);
    let output = Command::new(python())
        .arg(&path)
        .args(args)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "running {}: {e}; `just setup` installs Python with duckdb",
                python().display()
            )
        })?;
    anyhow::ensure!(
        output.status.success(),
        "{script} failed (`just setup` installs duckdb):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output.stdout)
}

const DAY: i64 = 86_400_000_000;
const D: Day = Day(20_500);

fn fact(seq: u64, id: &str, merchant: &str, kind: EventKind, amount: i64, day: Day) -> Record {
    let event_time_us = i64::from(day.0) * DAY + 3_600_000_000;
    Record {
        seq,
        ingest_time_us: event_time_us + 1_000,
        body: RecordBody::Fact(Fact {
            event_id: id.to_string(),
            merchant_id: merchant.to_string(),
            kind,
            amount_minor: amount,
            currency: Currency::parse(if merchant == "m-2" { "USD" } else { "EUR" })
                .expect("currency"),
            event_time_us,
            corrects_event_id: None,
        }),
    }
}

#[tokio::test]
async fn the_archive_sql_reads_the_columns_the_writer_writes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().to_str().expect("utf-8 path").to_string();
    let archive = ArchiveStore::new(
        open_store(&store)?,
        RecordedStream::new(StreamSettings::default()),
    );
    let next = Day(D.0 + 1);
    // Partition 0: m-1 over two days, with a resend of ev-1 (a duplicate: the first
    // by sequence counts) and a heartbeat; partition 1: m-2.
    let p0 = vec![
        fact(1, "ev-1", "m-1", EventKind::PaymentCaptured, 1_000, D),
        fact(3, "ev-2", "m-1", EventKind::RefundIssued, 300, D),
        Record {
            seq: 4,
            ingest_time_us: i64::from(D.0) * DAY + 7_200_000_000,
            body: RecordBody::Heartbeat,
        },
        fact(5, "ev-1", "m-1", EventKind::PaymentCaptured, 1_000, D),
        fact(6, "ev-3", "m-1", EventKind::PaymentCaptured, 50, next),
    ];
    let p1 = vec![fact(2, "ev-4", "m-2", EventKind::ChargebackOpened, 200, D)];
    let cut = CutRange { first: 1, last: 8 };
    archive.put_events(0, cut, &p0).await?;
    archive.put_events(1, cut, &p1).await?;
    let effective_day = D;
    archive
        .put_dims(
            cut,
            &[
                ArchivedDim {
                    seq: 7,
                    ingest_time_us: i64::from(D.0) * DAY,
                    record: DimRecord::Fx(FxRecord {
                        currency: Currency::parse("EUR")?,
                        rate: Rate::parse("1.08")?,
                        effective_day,
                        version: 1,
                    }),
                },
                ArchivedDim {
                    seq: 8,
                    ingest_time_us: i64::from(D.0) * DAY,
                    record: DimRecord::Risk(RiskRecord {
                        merchant_id: "m-1".into(),
                        tier: "standard".into(),
                        reserve_bps: 500,
                        effective_day,
                        version: 1,
                    }),
                },
            ],
        )
        .await?;
    archive.put_watermark(cut.last).await?;

    let seen: serde_json::Value =
        serde_json::from_slice(&run_sql("archive_columns.py", &[&store])?)?;
    assert_eq!(
        seen["events"],
        serde_json::json!(events::ALL),
        "archive/events columns"
    );
    assert_eq!(
        seen["dims"],
        serde_json::json!(dims::ALL),
        "archive/dims columns"
    );

    let closing: Vec<(String, i64, String, String)> =
        serde_json::from_slice(&run_sql("closing_balances.py", &[&store])?)?;
    let row = |m: &str, day: Day, c: &str, v: &str| {
        (
            m.to_string(),
            i64::from(day.0),
            c.to_string(),
            v.to_string(),
        )
    };
    assert_eq!(
        closing,
        [
            row("m-1", D, "EUR", "700"),
            row("m-1", next, "EUR", "750"),
            row("m-2", D, "USD", "200"),
        ]
    );

    let out = dir.path().join("duckdb-closing.parquet");
    let bench: serde_json::Value = serde_json::from_slice(&run_sql(
        "bench_closing_balances.py",
        &[&store, "1", out.to_str().expect("utf-8 path")],
    )?)?;
    assert_eq!(bench["rows"], 3, "{bench}");
    Ok(())
}
