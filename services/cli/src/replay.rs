//! `payledger replay start|status|list|cancel`: the coordinator's client, with a
//! progress bar per shard while waiting, and retries while no coordinator takes
//! the call (a standby, a failover, a rollout); and the query service's side of a
//! replay: its commit being served, and `reconcile` over ranges of any length.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::connect::Conn;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use payledger_proto::v1::{
    self, query_service_client::QueryServiceClient,
    replay_coordinator_client::ReplayCoordinatorClient,
};
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

/// What `replay start --wait` waits for after the commit.
#[derive(clap::Args, Debug, Clone)]
pub struct ServedArgs {
    /// With --wait: the query service whose authoritative reads and reconcile must
    /// show the commit before the command reports it (docs/query-routing.md,
    /// "Read-your-writes").
    #[arg(
        long,
        env = "PAYLEDGER_QUERY_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub query_url: String,
    /// With --wait: how long to wait for the query service to read the commit
    /// (it polls the commit log every --commit-poll-interval); 0s does not wait.
    #[arg(long, env = "PAYLEDGER_SERVED_WITHIN", default_value = "30s", value_parser = parse_duration)]
    pub served_within: Duration,
}

/// How often the query service is asked whether it serves the commit.
const SERVED_POLL: Duration = Duration::from_millis(250);

/// Waits until the query service at `args.query_url` answers the first day of a
/// replay that succeeded from its snapshot, i.e. has read the commit, for at most
/// `args.served_within`; says on stderr when it has not, or could not be asked
/// (the replay's outcome stands either way). Reconcile names the snapshots that
/// answer, so it is the read that shows it. (A later commit covering the same day
/// with a higher cutoff would answer instead: the wait then ends at the bound.)
pub async fn wait_until_served(replay: &v1::Replay, args: &ServedArgs) {
    if args.served_within.is_zero() || replay.state != i32::from(v1::ReplayState::Succeeded) {
        return;
    }
    let not_yet = match served(replay, args).await {
        Ok(true) => return,
        Ok(false) => format!(
            "has not read it within --served-within {}",
            humantime::format_duration(args.served_within)
        ),
        Err(e) => format!("could not be asked whether it serves it: {e:#}"),
    };
    eprintln!(
        "commit #{} (snapshot {}): the query service at {} {not_yet}; its reads of {} may not show it yet",
        replay.commit_number, replay.snapshot_id, args.query_url, replay.from_day
    );
}

async fn served(replay: &v1::Replay, args: &ServedArgs) -> anyhow::Result<bool> {
    let deadline = Instant::now() + args.served_within;
    let mut client =
        QueryServiceClient::new(crate::connect::connect(&args.query_url, "query").await?);
    loop {
        let report = client
            .reconcile(v1::ReconcileRequest {
                from_day: replay.from_day.clone(),
                to_day: replay.from_day.clone(),
                max_differences: 1,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        if report.snapshot_ids.contains(&replay.snapshot_id) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(SERVED_POLL).await;
    }
}

/// `Reconcile` over `from..=to` of any length: the query service compares at most
/// `MAX_RECONCILE_DAYS` per call, so a longer range (a replay from genesis covers
/// all history) is asked for in consecutive chunks and their reports added up,
/// listing at most `max_differences` differences in all.
pub async fn reconcile_range(
    query_url: &str,
    from: &str,
    to: &str,
    max_differences: u32,
) -> anyhow::Result<v1::ReconcileReport> {
    use payledger_proto::reconcile::{MAX_RECONCILE_DAYS, day_chunks, merge_report};
    let day = |flag: &str, text: &str| {
        payledger_semantics::Day::parse(text).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    let (from, to) = (day("from", from)?, day("to", to)?);
    anyhow::ensure!(from <= to, "--from {from} is after --to {to}");
    let mut client = QueryServiceClient::new(crate::connect::connect(query_url, "query").await?);
    let mut total = v1::ReconcileReport::default();
    for (first, last) in day_chunks(from, to, MAX_RECONCILE_DAYS) {
        let listed = total.differences.len() as u32;
        let report = client
            .reconcile(v1::ReconcileRequest {
                from_day: first.to_string(),
                to_day: last.to_string(),
                // 0 would mean the server's default: ask for one, and drop it.
                max_differences: max_differences.saturating_sub(listed).max(1),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        merge_report(&mut total, report, max_differences as usize);
    }
    Ok(total)
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
        "awaited_sequence": r.awaited_sequence, "archive_watermark": r.archive_watermark,
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

/// What a replay waits for before it folds, if it does: the archive reaching the
/// stream's last sequence of the request.
pub fn archive_wait_line(r: &v1::Replay) -> Option<String> {
    (r.cutoff == 0 && r.awaited_sequence > 0).then(|| {
        format!(
            "waiting for the archive to reach sequence {} (at {})",
            r.awaited_sequence, r.archive_watermark
        )
    })
}

/// The line `replay start` prints once the coordinator took the replay.
pub fn started_line(r: &v1::Replay) -> String {
    match archive_wait_line(r) {
        Some(waiting) => format!(
            "replay {} of {} to {}: {waiting}",
            r.replay_id, r.from_day, r.to_day
        ),
        None => format!(
            "replay {} of {} to {} through log position {}",
            r.replay_id, r.from_day, r.to_day, r.cutoff
        ),
    }
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
    if let Some(waiting) = archive_wait_line(r) {
        writeln!(out, "  {waiting}")?;
    }
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
    // Without a terminal the bars are not drawn: the wait for the archive, which
    // may be long, is still said on stderr, once per change.
    let plain = show_bars && bars.is_hidden();
    let mut archive: Option<ProgressBar> = None;
    let mut last: Option<v1::Replay> = None;
    while let Some(replay) = updates.message().await.map_err(|s| {
        anyhow::anyhow!(
            "watching replay {replay_id}: {:?}: {}",
            s.code(),
            s.message()
        )
    })? {
        let waiting = archive_wait_line(&replay);
        if plain && waiting.is_some() && waiting != last.as_ref().and_then(archive_wait_line) {
            eprintln!("{}", waiting.as_deref().unwrap_or_default());
        }
        if let Some(waiting) = waiting {
            archive
                .get_or_insert_with(|| bars.insert(0, ProgressBar::new_spinner()))
                .set_message(waiting);
        } else if let Some(bar) = archive.as_ref().filter(|b| !b.is_finished()) {
            bar.finish_with_message(format!(
                "the archive reached sequence {}: replaying through log position {}",
                replay.awaited_sequence, replay.cutoff
            ));
        }
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
    if let Some(bar) = &archive {
        bar.finish();
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
