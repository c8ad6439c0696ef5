//! `payledger replay start|status|list|cancel`: the coordinator's client, with a
//! progress bar per shard while waiting.

use std::collections::BTreeMap;

use crate::connect::Conn;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use payledger_proto::v1::{self, replay_coordinator_client::ReplayCoordinatorClient};

pub async fn client(url: &str) -> anyhow::Result<ReplayCoordinatorClient<Conn>> {
    Ok(ReplayCoordinatorClient::new(
        crate::connect::connect(url, "coordinator").await?,
    ))
}

pub fn state_name(state: i32) -> &'static str {
    match v1::ReplayState::try_from(state) {
        Ok(v1::ReplayState::Running) => "running",
        Ok(v1::ReplayState::Committing) => "committing",
        Ok(v1::ReplayState::Reconciling) => "reconciling",
        Ok(v1::ReplayState::Succeeded) => "succeeded",
        Ok(v1::ReplayState::Failed) => "failed",
        Ok(v1::ReplayState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn shard_state_name(state: i32) -> &'static str {
    match v1::ShardState::try_from(state) {
        Ok(v1::ShardState::Pending) => "pending",
        Ok(v1::ShardState::Running) => "running",
        Ok(v1::ShardState::Done) => "done",
        Ok(v1::ShardState::Failed) => "failed",
        _ => "unknown",
    }
}

pub fn is_finished(replay: &v1::Replay) -> bool {
    matches!(
        v1::ReplayState::try_from(replay.state),
        Ok(v1::ReplayState::Succeeded | v1::ReplayState::Failed | v1::ReplayState::Cancelled)
    )
}

/// The replay as JSON, with states by name.
pub fn to_json(r: &v1::Replay) -> serde_json::Value {
    serde_json::json!({
        "replay_id": r.replay_id, "state": state_name(r.state), "reason": r.reason,
        "from_day": r.from_day, "to_day": r.to_day, "cutoff": r.cutoff,
        "snapshot_id": r.snapshot_id, "commit_number": r.commit_number, "error": r.error,
        "created_at_us": r.created_at_us, "finished_at_us": r.finished_at_us,
        "shards": r.shards.iter().map(|s| serde_json::json!({
            "index": s.index, "partitions": s.partitions, "state": shard_state_name(s.state),
            "worker": s.worker, "attempts": s.attempts, "failed_workers": s.failed_workers,
            "last_error": s.last_error,
            "segments_done": s.progress.map_or(0, |p| p.segments_done),
            "segments_total": s.progress.map_or(0, |p| p.segments_total),
            "rows": s.result.as_ref().map_or(0, |x| x.parts.iter().map(|p| p.rows).sum::<u64>()),
        })).collect::<Vec<_>>(),
        "reconciliation": r.reconciliation.as_ref().map(|c| serde_json::json!({
            "rows_equal": c.rows_equal, "rows_stream_ahead": c.rows_stream_ahead,
            "rows_divergent": c.rows_divergent, "rows_missing": c.rows_missing,
            "report_path": c.report_path, "stream_caught_up": c.stream_caught_up,
        })),
    })
}

/// One line per replay, then one per shard with `shards`.
pub fn print(r: &v1::Replay, shards: bool) {
    let done = r
        .shards
        .iter()
        .filter(|s| s.state == i32::from(v1::ShardState::Done))
        .count();
    println!(
        "{}  {:<11} {} to {}  cutoff {}  shards {done}/{}  \"{}\"",
        r.replay_id,
        state_name(r.state),
        r.from_day,
        r.to_day,
        r.cutoff,
        r.shards.len(),
        r.reason
    );
    if r.commit_number > 0 {
        println!(
            "  committed #{} as snapshot {}",
            r.commit_number, r.snapshot_id
        );
    }
    if let Some(c) = &r.reconciliation {
        println!(
            "  reconciliation: {} equal, {} stream ahead, {} divergent, {} missing{} ({})",
            c.rows_equal,
            c.rows_stream_ahead,
            c.rows_divergent,
            c.rows_missing,
            if c.stream_caught_up {
                ""
            } else {
                "; the stream had not caught up with the cutoff"
            },
            c.report_path
        );
    }
    if !r.error.is_empty() {
        println!("  error: {}", r.error);
    }
    if shards {
        for s in &r.shards {
            let (seg_done, seg_total) = s
                .progress
                .map_or((0, 0), |p| (p.segments_done, p.segments_total));
            println!(
                "  shard {:>3} p{:?} {:<8} {}/{} segments  attempts {}  {}{}",
                s.index,
                s.partitions,
                shard_state_name(s.state),
                seg_done,
                seg_total,
                s.attempts,
                s.worker,
                if s.last_error.is_empty() {
                    String::new()
                } else {
                    format!("  last error: {}", s.last_error)
                }
            );
        }
    }
}

/// Follows a replay until it ends, with a bar per shard, and returns how it ended.
pub async fn wait(
    client: &mut ReplayCoordinatorClient<Conn>,
    replay_id: &str,
    show_bars: bool,
) -> anyhow::Result<v1::Replay> {
    let mut updates = client
        .watch_replay(v1::GetReplayRequest {
            replay_id: replay_id.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let bars = MultiProgress::new();
    if !show_bars {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style =
        ProgressStyle::with_template("shard {prefix:>3} [{bar:30}] {pos}/{len} segments {msg}")
            .expect("template")
            .progress_chars("=> ");
    let mut shard_bars: BTreeMap<u32, ProgressBar> = BTreeMap::new();
    let mut last = None;
    while let Some(replay) = updates.message().await.map_err(|s| {
        anyhow::anyhow!(
            "watching replay {replay_id}: {:?}: {}",
            s.code(),
            s.message()
        )
    })? {
        for s in &replay.shards {
            let bar = shard_bars.entry(s.index).or_insert_with(|| {
                let bar = bars.add(ProgressBar::new(0).with_style(style.clone()));
                bar.set_prefix(s.index.to_string());
                bar
            });
            if let Some(p) = s.progress {
                bar.set_length(p.segments_total.max(1));
                bar.set_position(p.segments_done);
            }
            let attempt = if s.attempts > 1 {
                format!(" attempt {}", s.attempts)
            } else {
                String::new()
            };
            bar.set_message(format!(
                "{} {}{attempt}",
                shard_state_name(s.state),
                s.worker
            ));
            if s.state == i32::from(v1::ShardState::Done) && !bar.is_finished() {
                bar.set_position(bar.length().unwrap_or(0));
                bar.finish();
            }
        }
        last = Some(replay);
    }
    for bar in shard_bars.values() {
        bar.finish();
    }
    last.ok_or_else(|| {
        anyhow::anyhow!("the coordinator ended the watch of {replay_id} without an answer")
    })
}
