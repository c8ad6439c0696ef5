//! Snapshot parts and the commit log against a real object store (local filesystem).

use std::sync::Arc;

use payledger_semantics::{Currency, DailyRow, Day};
use payledger_storage::{CommitDraft, SnapshotStore, commit_for_day, open_store};

fn store() -> (tempfile::TempDir, SnapshotStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::new(open_store(dir.path().to_str().unwrap()).unwrap());
    (dir, store)
}

fn row(merchant: &str, day: i32, currency: &str, closing: i128) -> DailyRow {
    DailyRow {
        merchant_id: merchant.to_string(),
        day: Day(day),
        currency: Currency::parse(currency).unwrap(),
        closing_minor: closing,
        peak_minor: closing.max(0),
        peak_bucket_start_us: i64::from(day) * 86_400_000_000,
        applied: 3,
        duplicates: 1,
        conflicts: 0,
        late: 1,
        restated: day % 2 == 0,
        log_position: 77,
        semantics_version: 1,
    }
}

fn draft(snapshot: &str, from: i32, to: i32, cutoff: u64) -> CommitDraft {
    CommitDraft {
        snapshot_id: snapshot.to_string(),
        replay_id: format!("replay-{snapshot}"),
        from_day: Day(from),
        to_day: Day(to),
        log_cutoff: cutoff,
        semantics_version: 1,
        version_key: "f".into(),
        partitions: 16,
        parts: Vec::new(),
        segments_read: Vec::new(),
        states: Vec::new(),
    }
}

#[tokio::test]
async fn parts_round_trip_sorted_with_exact_decimals() {
    let (_dir, snapshots) = store();
    // Beyond i64: DECIMAL(38,0) keeps it exact.
    let big = 10_i128.pow(30) + 7;
    let rows = vec![
        row("m:2", 20_000, "EUR", -5),
        row("m:1", 20_001, "USD", big),
        row("m:1", 20_000, "USD", 10),
    ];
    let info = snapshots.put_part("s1", 4, &rows).await.unwrap();
    assert_eq!(
        info.path,
        "tables/merchant_exposure_daily/snapshots/s1/p4.parquet"
    );
    let mut sorted = rows.clone();
    sorted.sort_by(|a, b| {
        (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
    });
    assert_eq!(snapshots.read_part("s1", 4).await.unwrap(), sorted);
    // Same content again: fine; other content under the same name: refused.
    snapshots.put_part("s1", 4, &rows).await.unwrap();
    assert!(snapshots.put_part("s1", 4, &rows[..1]).await.is_err());
}

#[tokio::test]
async fn racing_commits_take_distinct_numbers_and_a_retry_finds_its_own() {
    let (_dir, snapshots) = store();
    let snapshots = Arc::new(snapshots);
    let (a, b) = tokio::join!(
        {
            let s = snapshots.clone();
            async move { s.commit(draft("a", 0, 10, 100)).await.unwrap() }
        },
        {
            let s = snapshots.clone();
            async move { s.commit(draft("b", 0, 10, 120)).await.unwrap() }
        },
    );
    let mut numbers = [a.number, b.number];
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        [1, 2],
        "exactly one took commit 1, the other re-based"
    );
    // A retry after a lost response finds its commit instead of writing another.
    assert_eq!(snapshots.commit(draft("a", 0, 10, 100)).await.unwrap(), a);
    let all = snapshots.commits().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all.iter().map(|c| c.number).collect::<Vec<_>>(), vec![1, 2]);
}

#[tokio::test]
async fn the_table_is_the_union_of_commits_highest_cutoff_per_day() {
    let (_dir, snapshots) = store();
    let full = snapshots.commit(draft("full", 0, 29, 500)).await.unwrap();
    // The nightly replay of one day, later in the log, wins that day only.
    let nightly = snapshots
        .commit(draft("nightly", 29, 29, 900))
        .await
        .unwrap();
    // An older cutoff committed later does not win.
    let stale = snapshots.commit(draft("stale", 10, 10, 100)).await.unwrap();
    let commits = snapshots.commits().await.unwrap();
    assert_eq!(commit_for_day(&commits, Day(29)), Some(&nightly));
    assert_eq!(commit_for_day(&commits, Day(28)), Some(&full));
    assert_eq!(commit_for_day(&commits, Day(10)), Some(&full));
    assert_eq!(commit_for_day(&commits, Day(30)), None);
    // Equal cutoffs: the higher commit number wins.
    let again = snapshots.commit(draft("again", 10, 10, 500)).await.unwrap();
    let commits = snapshots.commits().await.unwrap();
    assert_eq!(commit_for_day(&commits, Day(10)), Some(&again));
    assert_ne!(stale.number, again.number);
}
