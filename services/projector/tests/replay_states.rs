//! Replays over a history longer than the dedup horizon, on a real object store
//! (the local filesystem): which committed state each partition starts from, and
//! that the rows equal a fold from the beginning whatever it started from.

use payledger_projector::replay::{
    ReplayRequest, ReplayStores, fold_partitions, replay_and_commit,
};
use payledger_semantics::{
    Currency, Day, EventKind, Fact, MICROS_PER_DAY, Record, RecordBody, RecordedStream, Settings,
    partition_of,
};
use payledger_storage::{CutRange, open_store};

const SETTINGS: Settings = Settings {
    partitions: 2,
    dedup_horizon_us: 35 * MICROS_PER_DAY,
    allowed_lateness_us: 3_600_000_000,
    max_clock_skew_us: 300_000_000,
    bucket_width_us: 900_000_000,
};
const DAY0: i32 = 20_000;
const DAYS: i32 = 60;

/// One event a day for each of a few merchants (some a day late), archived in
/// cuts of ten days: watermarks at the end of days 10, 20, … 60.
async fn archive_history(stores: &ReplayStores) -> Vec<u64> {
    let merchants = ["m-a", "m-b", "m-c", "m-d"];
    let mut seq = 0u64;
    let mut watermarks = Vec::new();
    for cut in 0..DAYS / 10 {
        let first = seq + 1;
        let mut by_partition: Vec<Vec<Record>> = vec![Vec::new(); 2];
        for d in cut * 10..(cut + 1) * 10 {
            let noon = Day(DAY0 + d).start_us() + MICROS_PER_DAY / 2;
            for (i, m) in merchants.iter().enumerate() {
                seq += 1;
                let late = if i == 3 { MICROS_PER_DAY } else { 0 };
                by_partition[partition_of(m, 2) as usize].push(Record {
                    seq,
                    ingest_time_us: noon,
                    body: RecordBody::Fact(Fact {
                        event_id: format!("{m}-{d}"),
                        merchant_id: m.to_string(),
                        kind: EventKind::PaymentCaptured,
                        amount_minor: 100 + i64::from(d),
                        currency: Currency::USD,
                        event_time_us: noon - late,
                        corrects_event_id: None,
                    }),
                });
            }
        }
        let range = CutRange { first, last: seq };
        for (p, records) in by_partition.iter().enumerate() {
            if !records.is_empty() {
                stores
                    .archive
                    .put_events(p as u32, range, records)
                    .await
                    .unwrap();
            }
        }
        stores.archive.put_watermark(seq).await.unwrap();
        watermarks.push(seq);
    }
    watermarks
}

#[tokio::test]
async fn a_replay_starts_from_the_newest_state_that_still_holds_its_first_day() {
    let dir = tempfile::tempdir().unwrap();
    let stores = ReplayStores::at(
        open_store(dir.path().to_str().unwrap()).unwrap(),
        RecordedStream::new(SETTINGS.stream()),
    );
    let watermarks = archive_history(&stores).await;
    let replay = |id: &str, from: i32, cutoff: u64| ReplayRequest {
        replay_id: id.into(),
        from_day: Day(DAY0 + from),
        to_day: Day(DAY0 + DAYS),
        cutoff: Some(cutoff),
        from_genesis: false,
    };
    let rows_of = |commit: &payledger_storage::Commit| {
        let stores = stores.clone();
        let commit = commit.clone();
        async move {
            let mut rows = Vec::new();
            for p in 0..2 {
                rows.extend(
                    stores
                        .snapshots
                        .read_part(&commit.draft.snapshot_id, p)
                        .await
                        .unwrap(),
                );
            }
            rows.sort_by(|a, b| (&a.merchant_id, a.day).cmp(&(&b.merchant_id, b.day)));
            rows
        }
    };
    let whole = fold_partitions(&stores.archive, SETTINGS, &[0, 1], watermarks[5])
        .await
        .unwrap()
        .daily_rows();

    // The nightly replay through day 50 writes the states at that cutoff.
    let first = replay_and_commit(&stores, SETTINGS, &replay("n50", 49, watermarks[4]), |_| {})
        .await
        .unwrap();
    assert!(first.draft.states.iter().all(|l| l.started_from.is_none()));

    // Day 55 is open in the day-50 states: the next night starts there and reads
    // only the last cut.
    let second = replay_and_commit(&stores, SETTINGS, &replay("n60", 55, watermarks[5]), |_| {})
        .await
        .unwrap();
    for l in &second.draft.states {
        assert_eq!(
            l.started_from.as_ref(),
            Some(&first.draft.states[l.partition as usize].written)
        );
    }
    assert!(
        second.draft.segments_read.len() <= 2,
        "{:?}",
        second.draft.segments_read
    );
    let want: Vec<_> = whole
        .iter()
        .filter(|r| r.day >= Day(DAY0 + 55))
        .cloned()
        .collect();
    assert_eq!(rows_of(&second).await, want);

    // Day 5 was final in both stored states (day 50 and 60 are past its end plus
    // 35 days and an hour): a correction from day 5 folds from the beginning.
    let correction = replay_and_commit(&stores, SETTINGS, &replay("c5", 5, watermarks[5]), |_| {})
        .await
        .unwrap();
    assert!(
        correction
            .draft
            .states
            .iter()
            .all(|l| l.started_from.is_none())
    );
    let want: Vec<_> = whole
        .iter()
        .filter(|r| r.day >= Day(DAY0 + 5))
        .cloned()
        .collect();
    assert_eq!(rows_of(&correction).await, want);
    // …and lands on the same state bytes as the incremental one.
    assert_eq!(
        correction.draft.states,
        second
            .draft
            .states
            .iter()
            .map(|l| payledger_storage::PartitionLineage {
                started_from: None,
                ..l.clone()
            })
            .collect::<Vec<_>>()
    );

    // Day 20 was still open at day 50 (20 + 35 > 50): it starts from there.
    let mid = replay_and_commit(&stores, SETTINGS, &replay("c20", 20, watermarks[5]), |_| {})
        .await
        .unwrap();
    for l in &mid.draft.states {
        assert_eq!(
            l.started_from.as_ref(),
            Some(&first.draft.states[l.partition as usize].written)
        );
    }
    let want: Vec<_> = whole
        .iter()
        .filter(|r| r.day >= Day(DAY0 + 20))
        .cloned()
        .collect();
    assert_eq!(rows_of(&mid).await, want);
}
