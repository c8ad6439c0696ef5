//! After a commit: the snapshot beside the stream's provisional rows for the same
//! log prefix, stored as a report next to the commit.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::DirectGetErrorKind;
use futures::StreamExt;
use payledger_proto::reconcile::{DayRows, SnapshotSide, compare_day};
use payledger_proto::{daily_row_from_proto, v1};
use payledger_semantics::Day;
use payledger_server_common::topology::{event_subject, progress_key};
use payledger_storage::Commit;
use prost::Message;

use crate::registry::now_us;
use crate::runner::{Context, Stop};

/// The report as stored: `tables/merchant_exposure_daily/_reconciliation/{N}.json`.
#[derive(serde::Serialize)]
struct StoredReport<'a> {
    commit_number: u64,
    snapshot_id: &'a str,
    replay_id: &'a str,
    log_cutoff: u64,
    stream_caught_up: bool,
    created_at_us: i64,
    #[serde(flatten)]
    report: &'a v1::ReconcileReport,
}

pub(crate) async fn reconcile(
    ctx: &Context,
    replay: &v1::Replay,
    commit: &Commit,
) -> Result<v1::ReconciliationSummary, Stop> {
    let cutoff = commit.draft.log_cutoff;
    let caught_up = wait_for_stream(ctx, cutoff).await?;
    if !caught_up {
        tracing::warn!(replay = %replay.replay_id, cutoff, wait = ?ctx.limits.reconcile_wait, "the stream has not applied the log through the cutoff; reconciling anyway");
    }
    let (from, to) = (commit.draft.from_day, commit.draft.to_day);
    let mut snapshot: BTreeMap<Day, DayRows> = BTreeMap::new();
    let mut verified = ctx.verified.take(&replay.replay_id);
    for partition in 0..commit.draft.partitions {
        let rows = match verified.remove(&partition) {
            Some(rows) => rows,
            None => ctx
                .snapshots
                .read_part(&commit.draft.snapshot_id, partition)
                .await
                .map_err(anyhow::Error::from)?,
        };
        for row in rows {
            let key = (row.merchant_id.clone(), row.currency.to_string());
            snapshot.entry(row.day).or_default().insert(key, row);
        }
    }
    let stream = stream_rows(&ctx.daily, ctx.daily_stream.clone(), from, to).await?;
    let mut report = v1::ReconcileReport::default();
    let empty = DayRows::new();
    for d in from.0..=to.0 {
        let day = Day(d);
        let side = SnapshotSide {
            snapshot_id: &commit.draft.snapshot_id,
            log_cutoff: cutoff,
            rows: snapshot.get(&day).unwrap_or(&empty),
        };
        compare_day(
            &mut report,
            ctx.limits.max_differences_stored,
            day,
            side,
            stream.get(&day).unwrap_or(&empty),
        );
    }
    let stored = StoredReport {
        commit_number: commit.number,
        snapshot_id: &commit.draft.snapshot_id,
        replay_id: &replay.replay_id,
        log_cutoff: cutoff,
        stream_caught_up: caught_up,
        created_at_us: now_us(),
        report: &report,
    };
    let body = serde_json::to_vec_pretty(&stored).map_err(anyhow::Error::from)?;
    let report_path = ctx
        .snapshots
        .put_reconciliation(commit.number, body)
        .await
        .map_err(anyhow::Error::from)?;
    Ok(v1::ReconciliationSummary {
        rows_equal: report.rows_equal,
        rows_stream_ahead: report.rows_stream_ahead,
        rows_divergent: report.rows_divergent,
        rows_missing: report.rows_missing,
        report_path,
        stream_caught_up: caught_up,
    })
}

/// Waits until every partition's projector has applied each of its records through
/// `cutoff` (its reported position has no record of the partition after it up to
/// the cutoff), or until the wait is over. True when caught up.
async fn wait_for_stream(ctx: &Context, cutoff: u64) -> anyhow::Result<bool> {
    let deadline = Instant::now() + ctx.limits.reconcile_wait;
    for partition in 0..ctx.settings.partitions {
        loop {
            let applied = match ctx.progress.get(progress_key(partition)).await? {
                Some(bytes) => v1::PartitionProgress::decode(bytes.as_ref())?.applied_sequence,
                None => 0,
            };
            let next = ctx
                .stream
                .direct_get_next_for_subject(event_subject(partition), Some(applied + 1))
                .await;
            let behind = match next {
                Ok(message) => message.sequence <= cutoff,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => false,
                Err(e) => return Err(e.into()),
            };
            if !behind {
                break;
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(true)
}

/// The stream's provisional daily rows of days `from..=to`, read from the KV
/// bucket's latest values in one pass.
async fn stream_rows(
    daily: &kv::Store,
    mut daily_stream: async_nats::jetstream::stream::Stream,
    from: Day,
    to: Day,
) -> anyhow::Result<BTreeMap<Day, DayRows>> {
    let mut out: BTreeMap<Day, DayRows> = BTreeMap::new();
    // An empty bucket's watch would wait for a first value forever. (The store's own
    // status() is the stream info of when it was opened, so ask the stream.)
    if daily_stream.info().await?.state.messages == 0 {
        return Ok(out);
    }
    let mut watch = daily.watch_with_history(">").await?;
    while let Some(entry) = watch.next().await {
        let entry = entry?;
        if matches!(entry.operation, kv::Operation::Put) {
            let row = daily_row_from_proto(&v1::DailyRow::decode(entry.value.as_ref())?).map_err(
                |e| anyhow::anyhow!("stream row {}: {}: {}", entry.key, e.field, e.message),
            )?;
            if from <= row.day && row.day <= to {
                let key = (row.merchant_id.clone(), row.currency.to_string());
                out.entry(row.day).or_default().insert(key, row);
            }
        }
        // The watch delivers the latest value of every key first; delta counts
        // what is still to come of those.
        if entry.delta == 0 {
            break;
        }
    }
    Ok(out)
}
