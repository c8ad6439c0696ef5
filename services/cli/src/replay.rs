//! `payledger replay start|status|list|cancel`: the coordinator's client, with a
//! progress bar per shard while waiting, and retries while no coordinator takes
//! the call (a standby, a failover, a rollout).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::connect::Conn;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use payledger_proto::v1::{self, replay_coordinator_client::ReplayCoordinatorClient};
use payledger_server_common::config::parse_duration;

pub async fn client(url: &str) -> anyhow::Result<ReplayCoordinatorClient<Conn>> {
    Ok(ReplayCoordinatorClient::new(
        crate::connect::connect(url, "coordinator").await?,
    ))
}

/// How long `replay start` and `replay cancel` keep trying.
#[derive(clap::Args, Debug, Clone)]
pub struct RetryArgs {
    /// Keep trying for this long, with backoff, while the coordinator cannot be
    /// reached or answers that it does not lead (a standby replica, or a failover
    /// or rollout in progress), saying on stderr what it waits for; 0s tries once.
    #[arg(long, env = "PAYLEDGER_RETRY_FOR", default_value = "30s", value_parser = parse_duration)]
    pub retry_for: Duration,
}

/// The waits between attempts: from `FIRST_WAIT`, doubling up to `MAX_WAIT`, for
/// as long as `retry_for` lasts since the first attempt.
#[derive(Debug)]
pub struct Backoff {
    retry_for: Duration,
    next: Duration,
}

const FIRST_WAIT: Duration = Duration::from_millis(500);
const MAX_WAIT: Duration = Duration::from_secs(5);

impl Backoff {
    pub fn new(retry_for: Duration) -> Self {
        Self {
            retry_for,
            next: FIRST_WAIT,
        }
    }

    /// The wait before the next attempt, `elapsed` after the first one began; None
    /// once `retry_for` is spent. The last wait is cut to end at `retry_for`.
    pub fn next_wait(&mut self, elapsed: Duration) -> Option<Duration> {
        let left = self
            .retry_for
            .checked_sub(elapsed)
            .filter(|l| !l.is_zero())?;
        let wait = self.next.min(left);
        self.next = (self.next * 2).min(MAX_WAIT);
        Some(wait)
    }
}

/// The coordinator calls that retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Start,
    Cancel,
}

/// Whether a `call` that failed with `status` may be sent again.
///
/// StartReplay is not idempotent: had a leader started the replay and the answer
/// been lost (the connection broke, or a proxy answered UNAVAILABLE after passing
/// the call on), sending it again would start a second replay. So it is retried
/// only on the refusal a coordinator that does not lead sends before doing
/// anything, which carries `NOT_LEADER_METADATA`. CancelReplay may be sent again
/// after any UNAVAILABLE: cancelling a replay that is already stopping or stopped
/// answers the replay as it is.
pub fn retryable(call: Call, status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && match call {
            Call::Start => status
                .metadata()
                .contains_key(payledger_proto::NOT_LEADER_METADATA),
            Call::Cancel => true,
        }
}

/// Sends `call` (made by `send` on a connection) to the coordinator at `url` until
/// it is answered, fails in a way `retryable` does not retry, or `retry` is spent.
/// Every attempt connects afresh, so that a call through a Service may reach
/// another replica (the Service balances connections, not calls). Not connecting
/// at all is always retried: nothing was sent. Returns the answer and the
/// connection that gave it.
pub async fn send_with_retry<T, F, Fut>(
    url: &str,
    retry: &RetryArgs,
    call: Call,
    mut send: F,
) -> anyhow::Result<(T, ReplayCoordinatorClient<Conn>)>
where
    F: FnMut(ReplayCoordinatorClient<Conn>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    let mut backoff = Backoff::new(retry.retry_for);
    loop {
        let waiting_for = match client(url).await {
            Ok(connection) => match send(connection.clone()).await {
                Ok(answer) => return Ok((answer.into_inner(), connection)),
                Err(status) if retryable(call, &status) => {
                    format!("the coordinator at {url} answered: {}", status.message())
                }
                Err(status) => anyhow::bail!("{:?}: {}", status.code(), status.message()),
            },
            Err(error) => format!("{error:#}"),
        };
        let Some(wait) = backoff.next_wait(started.elapsed()) else {
            anyhow::bail!(
                "{waiting_for} (gave up after --retry-for {})",
                humantime::format_duration(retry.retry_for)
            );
        };
        let shown = Duration::from_millis(wait.as_millis() as u64);
        eprintln!(
            "{waiting_for}; trying again in {}",
            humantime::format_duration(shown)
        );
        tokio::time::sleep(wait).await;
    }
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
pub fn write(out: &mut dyn std::io::Write, r: &v1::Replay, shards: bool) -> std::io::Result<()> {
    let done = r
        .shards
        .iter()
        .filter(|s| s.state == i32::from(v1::ShardState::Done))
        .count();
    writeln!(
        out,
        "{}  {:<11} {} to {}  cutoff {}  shards {done}/{}  \"{}\"",
        r.replay_id,
        state_name(r.state),
        r.from_day,
        r.to_day,
        r.cutoff,
        r.shards.len(),
        r.reason
    )?;
    if r.commit_number > 0 {
        writeln!(
            out,
            "  committed #{} as snapshot {}",
            r.commit_number, r.snapshot_id
        )?;
    }
    if let Some(c) = &r.reconciliation {
        writeln!(
            out,
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
        )?;
    }
    if !r.error.is_empty() {
        writeln!(out, "  error: {}", r.error)?;
    }
    if shards {
        for s in &r.shards {
            let (seg_done, seg_total) = s
                .progress
                .map_or((0, 0), |p| (p.segments_done, p.segments_total));
            writeln!(
                out,
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
            )?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds_and_ends_at_retry_for() {
        let mut backoff = Backoff::new(Duration::from_secs(30));
        let mut elapsed = Duration::ZERO;
        let mut waits = Vec::new();
        while let Some(wait) = backoff.next_wait(elapsed) {
            waits.push(wait.as_millis());
            elapsed += wait;
        }
        assert_eq!(waits, [500, 1000, 2000, 4000, 5000, 5000, 5000, 5000, 2500]);
        assert_eq!(elapsed, Duration::from_secs(30));
        assert_eq!(Backoff::new(Duration::ZERO).next_wait(Duration::ZERO), None);
        // Time spent in the attempts counts too.
        let mut backoff = Backoff::new(Duration::from_secs(3));
        assert_eq!(
            backoff.next_wait(Duration::from_millis(2800)),
            Some(Duration::from_millis(200))
        );
        assert_eq!(backoff.next_wait(Duration::from_secs(3)), None);
    }

    #[test]
    fn start_retries_only_the_refusal_of_a_coordinator_that_does_not_lead() {
        let mut not_leader = tonic::metadata::MetadataMap::new();
        not_leader.insert(
            payledger_proto::NOT_LEADER_METADATA,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let refused =
            tonic::Status::with_metadata(tonic::Code::Unavailable, "standby", not_leader.clone());
        let unmarked = tonic::Status::unavailable("connection reset");
        let other =
            tonic::Status::with_metadata(tonic::Code::ResourceExhausted, "full", not_leader);
        assert!(retryable(Call::Start, &refused));
        assert!(!retryable(Call::Start, &unmarked));
        assert!(!retryable(Call::Start, &other));
        assert!(retryable(Call::Cancel, &refused));
        assert!(retryable(Call::Cancel, &unmarked));
        assert!(!retryable(Call::Cancel, &other));
    }
}
