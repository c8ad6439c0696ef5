//! Another engine reads our files: DuckDB computes closing balances per merchant and
//! day straight from the archived Parquet, and they match the authoritative snapshot.

use std::path::PathBuf;
use std::process::Command;

use payledger_cli::generate::{GenConfig, Generator};
use payledger_e2e::{AcceptedLog, Archive, Stack, ingest_client, now_us};
use payledger_projector::replay::{ReplayRequest, replay_and_commit};
use payledger_semantics::{Day, Settings};
use payledger_storage::{ArchiveStore, SnapshotStore, open_store};

fn python() -> PathBuf {
    std::env::var_os("PAYLEDGER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_closing_balances_from_the_archive_match_the_snapshot() -> anyhow::Result<()> {
    let mut stack = Stack::builder()
        .archive(Archive::Fs)
        .archive_flush_interval("100ms")
        .start()
        .await?;
    let (store, ingest) = (stack.store.clone(), &mut stack.ingest);
    let mut traffic = Generator::new(GenConfig {
        seed: 21,
        merchants: 60,
        duplicate_pct: 3.0,
        conflict_pct: 2.0,
        late_pct: 15.0,
        correction_pct: 4.0,
        ..GenConfig::default()
    });
    let mut client = ingest_client(&ingest.url()).await?;
    let mut log = AcceptedLog::default();
    for _ in 0..10 {
        log.publish(&mut client, traffic.batch(500, now_us()))
            .await?;
    }
    ingest.terminate().await?;

    let objects = open_store(&store)?;
    let archive = ArchiveStore::new(
        objects.clone(),
        payledger_semantics::RecordedStream::new(payledger_semantics::StreamSettings::default()),
    );
    let snapshots = SnapshotStore::new(objects);
    let request = ReplayRequest {
        replay_id: "duckdb".into(),
        from_day: Day(0),
        to_day: Day(100_000),
        cutoff: None,
        from_genesis: false,
    };
    let settings = Settings::default();
    let commit = replay_and_commit(
        &payledger_projector::replay::ReplayStores::beside(archive.clone()),
        settings,
        &request,
        |_| {},
    )
    .await?;
    let mut ours = Vec::new();
    for p in 0..settings.partitions {
        for r in snapshots.read_part(&commit.draft.snapshot_id, p).await? {
            ours.push((
                r.merchant_id,
                i64::from(r.day.0),
                r.currency.to_string(),
                r.closing_minor.to_string(),
            ));
        }
    }
    ours.sort();
    assert!(ours.len() > 60, "several days of rows: {}", ours.len());

    let output = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sql/closing_balances.py"
        ))
        .arg(&store)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "running {}: {e}; `just setup` installs Python with duckdb",
                python().display()
            )
        })?;
    anyhow::ensure!(
        output.status.success(),
        "duckdb failed (`just setup` installs duckdb):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: Vec<(String, i64, String, String)> = serde_json::from_slice(&output.stdout)?;
    assert_eq!(
        theirs.len(),
        ours.len(),
        "DuckDB and the snapshot have the same merchant-days"
    );
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b, "closing balance differs");
    }
    Ok(())
}
