//! Reconciliation: one day of the authoritative snapshot beside the stream's
//! provisional rows, each difference classified. The query service's `Reconcile`
//! answers with it, and the coordinator stores it after every commit.

use std::collections::{BTreeMap, BTreeSet};

use payledger_semantics::{DailyRow, Day};

use crate::v1;

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
