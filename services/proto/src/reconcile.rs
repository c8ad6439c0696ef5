//! Reconciliation: one day of the authoritative snapshot beside the stream's
//! provisional rows, each difference classified. The query service's `Reconcile`
//! answers with it, and the coordinator stores it after every commit.

use std::collections::{BTreeMap, BTreeSet};

use payledger_semantics::{DailyRow, Day};

use crate::v1;

/// Most days one `Reconcile` call compares: a leap year and a day, so a year's
/// nightly audit fits in one call, while the rows a call holds stay bounded. A
/// longer range (a replay from genesis covers all history) is walked in chunks of
/// this size (`day_chunks`) whose reports `merge_report` adds up.
pub const MAX_RECONCILE_DAYS: i32 = 367;

/// `from..=to` cut into consecutive ranges of at most `max_days` days, in order.
pub fn day_chunks(from: Day, to: Day, max_days: i32) -> Vec<(Day, Day)> {
    let max_days = max_days.max(1);
    let mut chunks = Vec::new();
    let mut first = from.0;
    while first <= to.0 {
        let last = first.saturating_add(max_days - 1).min(to.0);
        chunks.push((Day(first), Day(last)));
        match last.checked_add(1) {
            Some(next) => first = next,
            None => break,
        }
    }
    chunks
}

/// Adds the report of the next chunk of days to `total`, listing at most
/// `max_differences` differences in all (the counts stay complete).
pub fn merge_report(
    total: &mut v1::ReconcileReport,
    next: v1::ReconcileReport,
    max_differences: usize,
) {
    for id in next.snapshot_ids {
        if !total.snapshot_ids.contains(&id) {
            total.snapshot_ids.push(id);
        }
    }
    total.uncovered_days.extend(next.uncovered_days);
    total.rows_equal += next.rows_equal;
    total.rows_stream_ahead += next.rows_stream_ahead;
    total.rows_divergent += next.rows_divergent;
    total.rows_missing += next.rows_missing;
    let room = max_differences.saturating_sub(total.differences.len());
    total
        .differences
        .extend(next.differences.into_iter().take(room));
}

/// One side's rows of a day by (merchant_id, currency).
pub type DayRows = BTreeMap<(String, String), DailyRow>;

/// The commit a day's snapshot rows come from.
pub struct SnapshotSide<'a> {
    pub snapshot_id: &'a str,
    pub log_cutoff: u64,
    pub rows: &'a DayRows,
}

/// Adds one day's comparison to `report`, listing at most `max_differences`
/// differences in all (the counts are always complete).
pub fn compare_day(
    report: &mut v1::ReconcileReport,
    max_differences: usize,
    day: Day,
    snapshot: SnapshotSide<'_>,
    stream: &DayRows,
) {
    let cutoff = snapshot.log_cutoff;
    if !report
        .snapshot_ids
        .iter()
        .any(|id| id == snapshot.snapshot_id)
    {
        report.snapshot_ids.push(snapshot.snapshot_id.to_string());
    }
    let keys: BTreeSet<_> = snapshot.rows.keys().chain(stream.keys()).collect();
    for key in keys {
        let (kind, detail) = match (stream.get(key), snapshot.rows.get(key)) {
            (Some(s), Some(a)) if s == a => {
                report.rows_equal += 1;
                continue;
            }
            (Some(s), Some(a)) if s.log_position > cutoff => {
                report.rows_stream_ahead += 1;
                let detail = format!(
                    "stream at log position {} > cutoff {cutoff}: {}",
                    s.log_position,
                    row_differences(s, a)
                );
                ("STREAM_AHEAD", detail)
            }
            (Some(s), Some(a)) => {
                report.rows_divergent += 1;
                ("DIVERGENT", row_differences(s, a))
            }
            (Some(s), None) if s.log_position > cutoff => {
                report.rows_stream_ahead += 1;
                let detail = format!(
                    "row created at log position {} after cutoff {cutoff}",
                    s.log_position
                );
                ("STREAM_AHEAD", detail)
            }
            (Some(_), None) => {
                report.rows_missing += 1;
                let detail = "the stream has the row at the same log prefix".to_string();
                ("MISSING_IN_SNAPSHOT", detail)
            }
            (None, _) => {
                report.rows_missing += 1;
                let detail = "the stream has not projected this row (behind, or a bug)".into();
                ("MISSING_IN_STREAM", detail)
            }
        };
        if report.differences.len() < max_differences {
            report.differences.push(v1::ReconcileDifference {
                merchant_id: key.0.clone(),
                day: day.to_string(),
                currency: key.1.clone(),
                kind: kind.to_string(),
                detail,
                snapshot_id: snapshot.snapshot_id.to_string(),
                log_cutoff: cutoff,
            });
        }
    }
}

/// The fields two versions of a row disagree on, e.g. "closing_minor 100 (stream)
/// vs 90 (snapshot)"; a differing `restated` says the day was restated on one side.
fn row_differences(stream: &DailyRow, snapshot: &DailyRow) -> String {
    let mut out = Vec::new();
    macro_rules! field {
        ($name:ident) => {
            if stream.$name != snapshot.$name {
                out.push(format!(
                    "{} {} (stream) vs {} (snapshot)",
                    stringify!($name),
                    stream.$name,
                    snapshot.$name
                ));
            }
        };
    }
    field!(closing_minor);
    field!(peak_minor);
    field!(peak_bucket_start_us);
    field!(applied);
    field!(duplicates);
    field!(conflicts);
    field!(late);
    field!(restated);
    field!(log_position);
    field!(semantics_version);
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use payledger_semantics::Currency;

    fn row(merchant: &str, closing: i128, position: u64) -> DailyRow {
        DailyRow {
            merchant_id: merchant.into(),
            day: Day(20_000),
            currency: Currency::parse("EUR").unwrap(),
            closing_minor: closing,
            peak_minor: closing,
            peak_bucket_start_us: 0,
            applied: 1,
            duplicates: 0,
            conflicts: 0,
            late: 0,
            restated: false,
            log_position: position,
            semantics_version: 1,
        }
    }

    fn side(rows: &[DailyRow]) -> DayRows {
        rows.iter()
            .map(|r| ((r.merchant_id.clone(), r.currency.to_string()), r.clone()))
            .collect()
    }

    #[test]
    fn day_chunks_tile_the_range_in_order() {
        let d = |s: &str| Day::parse(s).unwrap();
        assert_eq!(
            day_chunks(d("2026-01-01"), d("2026-01-01"), MAX_RECONCILE_DAYS),
            [(d("2026-01-01"), d("2026-01-01"))]
        );
        // Ten years: 3653 days in chunks of 367.
        let (from, to) = (d("2016-12-01"), d("2026-11-30"));
        let chunks = day_chunks(from, to, MAX_RECONCILE_DAYS);
        assert_eq!(chunks.len(), 10);
        assert_eq!(chunks.first().unwrap().0, from);
        assert_eq!(chunks.last().unwrap().1, to);
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].1.0 + 1, pair[1].0.0);
        }
        assert!(chunks.iter().all(|(a, b)| b.0 - a.0 < MAX_RECONCILE_DAYS));
        assert_eq!(
            day_chunks(d("2026-01-01"), d("2026-01-03"), 2),
            [
                (d("2026-01-01"), d("2026-01-02")),
                (d("2026-01-03"), d("2026-01-03"))
            ]
        );
        assert!(day_chunks(d("2026-01-02"), d("2026-01-01"), 2).is_empty());
    }

    #[test]
    fn merged_reports_add_up_and_keep_the_difference_bound() {
        let difference = |day: &str| v1::ReconcileDifference {
            day: day.into(),
            ..Default::default()
        };
        let first = v1::ReconcileReport {
            snapshot_ids: vec!["a".into()],
            uncovered_days: vec!["2025-01-01".into()],
            rows_equal: 3,
            rows_stream_ahead: 1,
            differences: vec![difference("2025-01-02")],
            ..Default::default()
        };
        let second = v1::ReconcileReport {
            snapshot_ids: vec!["a".into(), "b".into()],
            uncovered_days: vec!["2026-01-01".into()],
            rows_equal: 2,
            rows_divergent: 4,
            rows_missing: 5,
            differences: vec![difference("2026-01-02"), difference("2026-01-03")],
            ..Default::default()
        };
        let mut total = v1::ReconcileReport::default();
        merge_report(&mut total, first, 2);
        merge_report(&mut total, second, 2);
        assert_eq!(total.snapshot_ids, ["a", "b"]);
        assert_eq!(total.uncovered_days, ["2025-01-01", "2026-01-01"]);
        assert_eq!(
            (
                total.rows_equal,
                total.rows_stream_ahead,
                total.rows_divergent,
                total.rows_missing
            ),
            (5, 1, 4, 5)
        );
        let days: Vec<_> = total.differences.iter().map(|d| d.day.as_str()).collect();
        assert_eq!(days, ["2025-01-02", "2026-01-02"]);
    }

    #[test]
    fn each_difference_is_classified_and_counted() {
        let snapshot = side(&[
            row("equal", 5, 3),
            row("ahead", 5, 4),
            row("bug", 5, 6),
            row("lost", 1, 2),
        ]);
        let stream = side(&[
            row("equal", 5, 3),
            row("ahead", 9, 12),
            row("bug", 7, 6),
            row("new", 1, 11),
            row("extra", 1, 9),
        ]);
        let mut report = v1::ReconcileReport::default();
        let snapshot = SnapshotSide {
            snapshot_id: "s1",
            log_cutoff: 10,
            rows: &snapshot,
        };
        compare_day(&mut report, 10, Day(20_000), snapshot, &stream);
        assert_eq!(
            (
                report.rows_equal,
                report.rows_stream_ahead,
                report.rows_divergent,
                report.rows_missing
            ),
            (1, 2, 1, 2)
        );
        let kinds: Vec<_> = report
            .differences
            .iter()
            .map(|d| (d.merchant_id.as_str(), d.kind.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("ahead", "STREAM_AHEAD"),
                ("bug", "DIVERGENT"),
                ("extra", "MISSING_IN_SNAPSHOT"),
                ("lost", "MISSING_IN_STREAM"),
                ("new", "STREAM_AHEAD"),
            ]
        );
        assert_eq!(
            report.differences[1].detail,
            "closing_minor 7 (stream) vs 5 (snapshot), peak_minor 7 (stream) vs 5 (snapshot)"
        );
        assert_eq!(report.snapshot_ids, ["s1"]);
    }

    #[test]
    fn the_list_is_capped_but_the_counts_are_not() {
        let snapshot = side(&[row("a", 1, 1), row("b", 1, 1), row("c", 1, 1)]);
        let mut report = v1::ReconcileReport::default();
        let snapshot = SnapshotSide {
            snapshot_id: "s1",
            log_cutoff: 10,
            rows: &snapshot,
        };
        compare_day(&mut report, 2, Day(20_000), snapshot, &DayRows::new());
        assert_eq!(report.rows_missing, 3);
        assert_eq!(report.differences.len(), 2);
    }
}
