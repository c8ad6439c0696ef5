//! Drives one replay: shards on workers (with retries elsewhere), verification of
//! every part, the commit, then reconciliation. Each phase starts from what the
//! persisted replay says, so a restarted coordinator resumes the same way.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{kv, stream::Stream as JsStream};
use payledger_proto::v1;
use payledger_proto::v1::projector_service_client::ProjectorServiceClient;
use payledger_semantics::{DailyRow, Day, SEMANTICS_VERSION, Settings};
use payledger_server_common::auth::{Role, TokenSource, Tokens};
use payledger_server_common::trace_context::{TraceHeaders, exported_span};
use payledger_storage::{
    ArchiveStore, CommitDraft, ObjectRef, PartitionLineage, SnapshotStore, StateRef, StateStore,
    StorageError,
};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::lifecycle::{ReplayEvent, ReplayPhase, ShardEvent, ShardPhase};
use crate::registry::{Registry, now_us};
use crate::service::snapshot_id;
use crate::workers::{Lease, Workers};

pub(crate) struct Limits {
    pub partitions_per_shard: u32,
    pub shard_attempts: u32,
    pub shard_stall_timeout: Duration,
    pub max_active_replays: usize,
    pub archive_wait: Duration,
    pub reconcile_wait: Duration,
    pub max_differences_stored: usize,
    /// How long a commit the object store fails is tried again before the replay
    /// fails.
    pub commit_retry_for: Duration,
}

pub(crate) struct Context {
    pub registry: Arc<Registry>,
    pub metrics: Arc<crate::metrics::CoordinatorMetrics>,
    pub workers: Arc<Workers>,
    pub archive: ArchiveStore,
    pub snapshots: SnapshotStore,
    pub states: StateStore,
    pub settings: Settings,
    pub stream: JsStream,
    pub daily: kv::Store,
    /// The stream behind `daily`, for fresh stream info.
    pub daily_stream: JsStream,
    pub progress: kv::Store,
    /// Whose internal token RunShard is called with, when the workers check tokens
    /// (read at each call, so a rotated token file is followed).
    pub tokens: Option<Arc<TokenSource>>,
    pub limits: Limits,
    /// The replays this coordinator drives, while it is the leader.
    pub drivers: Drivers,
    /// Who holds the Lease, when the coordinator runs with one (`--lease-name`).
    pub leadership: tokio::sync::watch::Receiver<crate::leader::Leadership>,
    pub lease: Option<crate::leader::LeaseSettings>,
    /// The rows of every part read back and verified, by replay and partition,
    /// kept for the reconciliation so that each part is read once. (The
    /// reconciliation holds them all at once anyway.) A replay resumed by a
    /// restarted coordinator reads the parts it has not verified itself.
    pub verified: VerifiedParts,
}

#[derive(Default)]
pub(crate) struct VerifiedParts(Mutex<HashMap<String, BTreeMap<u32, Vec<DailyRow>>>>);

impl VerifiedParts {
    fn keep(&self, replay_id: &str, parts: Vec<(u32, Vec<DailyRow>)>) {
        let mut all = self.0.lock().expect("verified parts lock");
        all.entry(replay_id.to_string()).or_default().extend(parts);
    }

    /// The verified rows of `replay_id`, taken out.
    pub fn take(&self, replay_id: &str) -> BTreeMap<u32, Vec<DailyRow>> {
        let mut all = self.0.lock().expect("verified parts lock");
        all.remove(replay_id).unwrap_or_default()
    }
}

/// Drops a replay's verified rows however its driver ends (finished, failed,
/// or aborted on losing the Lease).
struct ForgetVerified<'a>(&'a Context, &'a str);

impl Drop for ForgetVerified<'_> {
    fn drop(&mut self) {
        self.0.verified.take(self.1);
    }
}

/// The tasks driving replays. Only the leader drives any: on losing the Lease
/// they are all aborted, and their replays stay as the KV bucket has them for the
/// next leader to resume (see `lib.rs` for why abandoning is the safe choice).
#[derive(Default)]
pub(crate) struct Drivers {
    state: Mutex<DriversState>,
    /// `state.leading`, for whoever follows it: the health status of the
    /// ReplayCoordinator service, SERVING only on the leader.
    leading: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct DriversState {
    leading: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl Drivers {
    /// Drives replay `id`, unless this coordinator does not lead (false then).
    pub fn start(&self, ctx: &Arc<Context>, id: String) -> bool {
        let mut state = self.state.lock().expect("drivers lock");
        if !state.leading {
            return false;
        }
        state.tasks.retain(|t| !t.is_finished());
        state.tasks.push(tokio::spawn(drive(ctx.clone(), id)));
        true
    }

    pub fn leading(&self) -> bool {
        self.state.lock().expect("drivers lock").leading
    }

    pub fn lead(&self) {
        self.state.lock().expect("drivers lock").leading = true;
        self.leading.send_replace(true);
    }

    /// Whether this coordinator leads, now and as it changes.
    pub fn on_leading(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// Stops leading: no replay starts any more, and every running one is aborted.
    /// Returns the aborted tasks, to wait for.
    pub fn stand_down(&self) -> Vec<JoinHandle<()>> {
        let mut state = self.state.lock().expect("drivers lock");
        state.leading = false;
        self.leading.send_replace(false);
        let mut tasks = std::mem::take(&mut state.tasks);
        tasks.retain(|t| !t.is_finished());
        for task in &tasks {
            task.abort();
        }
        tasks
    }
}

/// Why a replay stopped before it succeeded.
pub(crate) enum Stop {
    Cancelled,
    Failed(String),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Stop::Failed(format!("{e:#}"))
    }
}

/// The shards of a replay: consecutive partitions, `per_shard` at a time.
pub(crate) fn plan_shards(partitions: u32, per_shard: u32) -> Vec<v1::ShardStatus> {
    let per_shard = per_shard.max(1);
    (0..partitions)
        .step_by(per_shard as usize)
        .enumerate()
        .map(|(index, first)| v1::ShardStatus {
            index: index as u32,
            partitions: (first..(first + per_shard).min(partitions)).collect(),
            state: v1::ShardState::Pending.into(),
            ..Default::default()
        })
        .collect()
}

/// Drives replay `id` to its end. When traces are exported the replay is one span,
/// made here, so a child of the caller's span (StartReplay's call, whose trace it
/// joins), with a child span per shard attempt that the worker's RunShard continues.
pub(crate) fn drive(ctx: Arc<Context>, id: String) -> impl Future<Output = ()> + Send + 'static {
    let span = exported_span(|| tracing::info_span!("replay", replay = %id));
    drive_traced(ctx, id).instrument(span)
}

async fn drive_traced(ctx: Arc<Context>, id: String) {
    let _forget = ForgetVerified(&ctx, &id);
    let outcome = drive_phases(&ctx, &id).await;
    let finished = now_us();
    let result = match outcome {
        Ok(()) => return,
        Err(Stop::Cancelled) => {
            tracing::info!(replay = %id, "replay cancelled");
            ctx.registry
                .advance(&id, ReplayEvent::Cancel, |r| r.finished_at_us = finished)
                .await
        }
        Err(Stop::Failed(error)) => {
            tracing::error!(replay = %id, %error, "replay failed");
            ctx.registry
                .advance(&id, ReplayEvent::Fail, |r| {
                    r.error = error;
                    r.finished_at_us = finished;
                })
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(replay = %id, error = %e, "could not record how the replay ended");
    }
}

async fn drive_phases(ctx: &Arc<Context>, id: &str) -> Result<(), Stop> {
    let phase = |ctx: &Context| -> Result<(ReplayPhase, v1::Replay), Stop> {
        let replay = ctx
            .registry
            .get(id)
            .ok_or_else(|| Stop::Failed(format!("replay {id} vanished")))?;
        Ok((
            ReplayPhase::of(&replay).map_err(anyhow::Error::from)?,
            replay,
        ))
    };
    if phase(ctx)?.0 == ReplayPhase::WaitingForArchive {
        wait_for_archive(ctx, id).await?;
    }
    if phase(ctx)?.0 == ReplayPhase::Running {
        run_shards(ctx, id).await?;
        ctx.registry
            .advance(id, ReplayEvent::ShardsVerified, |_| {})
            .await?;
    }
    let (now, replay) = phase(ctx)?;
    let commit = if now == ReplayPhase::Committing {
        let commit = commit(ctx, &replay).await?;
        tracing::info!(replay = %id, number = commit.number, snapshot = %commit.draft.snapshot_id, "snapshot committed");
        ctx.registry
            .advance(id, ReplayEvent::Committed, |r| {
                r.commit_number = commit.number
            })
            .await?;
        commit
    } else {
        let commits = ctx.snapshots.commits().await.map_err(anyhow::Error::from)?;
        commits
            .into_iter()
            .find(|c| c.number == replay.commit_number)
            .ok_or_else(|| {
                Stop::Failed(format!(
                    "commit {} is not in the commit log",
                    replay.commit_number
                ))
            })?
    };
    let summary = crate::reconcile::reconcile(ctx, &replay, &commit).await?;
    ctx.metrics.reconciled(&summary, now_us());
    tracing::info!(replay = %id, equal = summary.rows_equal, ahead = summary.rows_stream_ahead, divergent = summary.rows_divergent, missing = summary.rows_missing, "reconciled");
    ctx.registry
        .advance(id, ReplayEvent::Reconciled, |r| {
            r.reconciliation = Some(summary);
            r.finished_at_us = now_us();
        })
        .await?;
    Ok(())
}

/// How often a replay waiting for the archive reads its watermarks.
const ARCHIVE_POLL: Duration = Duration::from_millis(500);

/// Waits until the archive's highest watermark reaches the replay's awaited
/// sequence, then takes that watermark as the cutoff (docs/operations.md,
/// "Read-your-writes"). The wait is bounded from the request, so a replay resumed
/// by another coordinator does not start it again.
async fn wait_for_archive(ctx: &Context, id: &str) -> Result<(), Stop> {
    let mut cancelled = ctx.registry.cancelled(id).expect("known replay");
    let replay = ctx.registry.get(id).expect("known replay");
    let awaited = replay.awaited_sequence;
    let wait = ctx.limits.archive_wait;
    let deadline_us = replay
        .created_at_us
        .saturating_add(i64::try_from(wait.as_micros()).unwrap_or(i64::MAX));
    let mut seen = replay.archive_watermark;
    loop {
        if *cancelled.borrow() {
            return Err(Stop::Cancelled);
        }
        let highest = ctx
            .archive
            .watermarks()
            .await
            .map_err(anyhow::Error::from)?
            .last()
            .copied()
            .unwrap_or(0);
        if highest >= awaited && highest > 0 {
            ctx.registry
                .advance(id, ReplayEvent::ArchiveReached, |r| {
                    r.cutoff = highest;
                    r.snapshot_id = snapshot_id(id, highest);
                    r.archive_watermark = highest;
                })
                .await?;
            tracing::info!(replay = %id, awaited, cutoff = highest, "the archive reached the stream's last sequence of the request");
            return Ok(());
        }
        if highest != seen {
            ctx.registry
                .update(id, |r| r.archive_watermark = highest)
                .await?;
            seen = highest;
        }
        if now_us() >= deadline_us {
            let instead = match highest {
                0 => String::new(),
                h => format!(", or pass --cutoff {h} to replay what is archived"),
            };
            return Err(Stop::Failed(format!(
                "the archive did not reach sequence {awaited} (the stream's last when the replay was asked for) within --archive-wait ({wait:?}): its highest watermark is {highest}. The archiver (payledger-ingest --archive-store) is behind or not running: check the alert PayLedgerArchiveLag and the archiver's log{instead}"
            )));
        }
        tokio::select! {
            () = tokio::time::sleep(ARCHIVE_POLL) => {}
            _ = cancelled.changed() => {}
        }
    }
}

/// What one attempt of a shard came back with.
struct Attempt {
    index: usize,
    worker: String,
    outcome: Result<v1::ShardResult, String>,
}

async fn run_shards(ctx: &Arc<Context>, id: &str) -> Result<(), Stop> {
    let mut cancelled = ctx.registry.cancelled(id).expect("known replay");
    let mut replay = ctx.registry.get(id).expect("known replay");
    for index in 0..replay.shards.len() {
        replay = ctx
            .registry
            .advance_shard(id, index, ShardEvent::Resumed, |_| {})
            .await?;
    }
    let mut pending: VecDeque<usize> = replay
        .shards
        .iter()
        .enumerate()
        .filter(|(_, s)| ShardPhase::of(s) == Ok(ShardPhase::Pending))
        .map(|(i, _)| i)
        .collect();
    let mut running = JoinSet::new();
    let mut freed = ctx.workers.on_freed();
    loop {
        if *cancelled.borrow() {
            running.abort_all();
            return Err(Stop::Cancelled);
        }
        if pending.is_empty() && running.is_empty() {
            return Ok(());
        }
        while let Some(&index) = pending.front() {
            let avoid = ctx.registry.get(id).expect("known replay").shards[index]
                .failed_workers
                .clone();
            let Some(lease) = ctx.workers.acquire(&avoid) else {
                break;
            };
            pending.pop_front();
            let replay = ctx
                .registry
                .advance_shard(id, index, ShardEvent::Placed, |shard| {
                    shard.worker = lease.url.clone();
                    shard.attempts += 1;
                    shard.progress = None;
                })
                .await?;
            tracing::info!(replay = %id, shard = index, worker = %lease.url, attempt = replay.shards[index].attempts, "shard placed");
            let attempts = replay.shards[index].attempts;
            let span = exported_span(
                || tracing::info_span!("shard", shard = index, worker = %lease.url, attempt = attempts),
            );
            running.spawn(attempt(ctx.clone(), replay, index, lease).instrument(span));
        }
        tokio::select! {
            Some(joined) = running.join_next() => {
                let Attempt { index, worker, outcome } = joined.map_err(|e| Stop::Failed(format!("a shard task failed: {e}")))?;
                match outcome {
                    Ok(result) => {
                        ctx.registry.advance_shard(id, index, ShardEvent::Verified, |shard| {
                            shard.result = Some(result);
                            shard.last_error.clear();
                        }).await?;
                    }
                    Err(error) => {
                        tracing::warn!(replay = %id, shard = index, %worker, %error, "shard attempt failed");
                        ctx.workers.cool_down(&worker);
                        let attempts = ctx.registry.get(id).expect("known replay").shards[index].attempts;
                        let last = attempts >= ctx.limits.shard_attempts;
                        let event = if last { ShardEvent::GaveUp } else { ShardEvent::AttemptFailed };
                        let replay = ctx.registry.advance_shard(id, index, event, |shard| {
                            shard.last_error = error.clone();
                            if !shard.failed_workers.contains(&worker) {
                                shard.failed_workers.push(worker.clone());
                            }
                        }).await?;
                        let shard = &replay.shards[index];
                        if last {
                            running.abort_all();
                            return Err(Stop::Failed(format!(
                                "shard {index} (partitions {:?}) failed {} times (--shard-attempts), last on {worker}: {error}. \
                                 Nothing of this replay is served. Check that worker's log and that its stores (--store, --archive-store) are reachable, then run the replay again",
                                shard.partitions, shard.attempts
                            )));
                        }
                        pending.push_back(index);
                    }
                }
            }
            _ = freed.changed() => {}
            _ = cancelled.changed() => {}
        }
    }
}

/// Runs one shard on a worker and verifies what it wrote.
async fn attempt(ctx: Arc<Context>, replay: v1::Replay, index: usize, lease: Lease) -> Attempt {
    let worker = lease.url.clone();
    let shard = &replay.shards[index];
    let request = v1::RunShardRequest {
        replay_id: replay.replay_id.clone(),
        snapshot_id: replay.snapshot_id.clone(),
        partitions: shard.partitions.clone(),
        cutoff: replay.cutoff,
        from_day: replay.from_day.clone(),
        to_day: replay.to_day.clone(),
        version_key: replay.version_key.clone(),
        from_genesis: replay.from_genesis,
    };
    let outcome = async {
        let result = call_worker(&ctx, &replay.replay_id, index, lease, request).await?;
        let parts = verify(
            &ctx.snapshots,
            &replay.snapshot_id,
            &shard.partitions,
            &result,
        )
        .await?;
        verify_states(&ctx.states, &shard.partitions, replay.cutoff, &result).await?;
        ctx.verified.keep(&replay.replay_id, parts);
        Ok(result)
    }
    .await;
    Attempt {
        index,
        worker,
        outcome,
    }
}

/// `Bearer <the first internal token>`: what RunShard is called with.
pub(crate) fn internal_bearer(
    tokens: &Tokens,
) -> anyhow::Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let token = tokens.token_of(Role::Internal).ok_or_else(|| {
        anyhow::anyhow!(
            "no internal token (file 'internal' in --tokens-dir, or PAYLEDGER_INTERNAL_TOKENS): the coordinator needs it to call the workers' RunShard"
        )
    })?;
    format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow::anyhow!("the internal token is not a valid header value"))
}

async fn call_worker(
    ctx: &Context,
    replay_id: &str,
    index: usize,
    lease: Lease,
    request: v1::RunShardRequest,
) -> Result<v1::ShardResult, String> {
    let stall = ctx.limits.shard_stall_timeout;
    let mut client = ProjectorServiceClient::new(lease.channel.clone());
    let mut request = tonic::Request::new(request);
    if let Some(tokens) = &ctx.tokens {
        let bearer = internal_bearer(&tokens.current()).map_err(|e| e.to_string())?;
        request.metadata_mut().insert("authorization", bearer);
    }
    // The worker's RunShard span continues this shard attempt's trace.
    TraceHeaders::current().add_to_grpc(request.metadata_mut());
    let mut updates = tokio::time::timeout(stall, client.run_shard(request))
        .await
        .map_err(|_| format!("the worker did not answer within {stall:?}"))?
        // Failing before any answer: where a TLS mismatch shows.
        .map_err(|s| status_text(&s, ctx.workers.hint(&s)))?
        .into_inner();
    loop {
        let update = tokio::time::timeout(stall, updates.message())
            .await
            .map_err(|_| format!("no progress for {stall:?}"))?
            .map_err(|s| status_text(&s, None))?;
        match update.and_then(|u| u.update) {
            None => return Err("the worker ended the shard without a result".into()),
            Some(v1::run_shard_update::Update::Progress(progress)) => {
                let _ = ctx
                    .registry
                    .update(replay_id, |r| r.shards[index].progress = Some(progress))
                    .await;
            }
            Some(v1::run_shard_update::Update::Result(result)) => return Ok(result),
        }
    }
}

/// A failed call's status, with the transport error behind it, if any (a refused
/// certificate, say, which the status message alone does not tell), and what to
/// check.
fn status_text(status: &tonic::Status, hint: Option<&str>) -> String {
    let mut text = format!("{}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text = format!("{text}: {}", crate::workers::error_chain(source));
    }
    if let Some(hint) = hint {
        text = format!("{text} ({hint})");
    }
    text
}

/// A shard counts only when every part it reports is in storage with the row
/// count and content hash it reported, one part per partition of the shard.
/// Returns the rows read, by partition.
async fn verify(
    snapshots: &SnapshotStore,
    snapshot_id: &str,
    partitions: &[u32],
    result: &v1::ShardResult,
) -> Result<Vec<(u32, Vec<DailyRow>)>, String> {
    let mut reported: Vec<u32> = result.parts.iter().map(|p| p.partition).collect();
    reported.sort_unstable();
    if reported != partitions {
        return Err(format!(
            "the worker reported parts for partitions {reported:?}, the shard has {partitions:?}"
        ));
    }
    let mut verified = Vec::with_capacity(result.parts.len());
    for part in &result.parts {
        let (rows, stored) = snapshots
            .read_part_with_info(snapshot_id, part.partition)
            .await
            .map_err(|e| format!("part of partition {} does not verify: {e}", part.partition))?;
        if (
            stored.rows,
            stored.content_hash.as_str(),
            stored.path.as_str(),
        ) != (part.rows, part.content_hash.as_str(), part.path.as_str())
        {
            return Err(format!(
                "part {} holds {} rows with hash {}, the worker reported {} rows with hash {}",
                stored.path, stored.rows, stored.content_hash, part.rows, part.content_hash
            ));
        }
        verified.push((part.partition, rows));
    }
    Ok(verified)
}

/// A shard counts only when it wrote one state per partition at the cutoff, each
/// in storage with the size and hash it reported: a later replay starts from it.
async fn verify_states(
    states: &StateStore,
    partitions: &[u32],
    cutoff: u64,
    result: &v1::ShardResult,
) -> Result<(), String> {
    let mut reported: Vec<u32> = result.states.iter().map(|s| s.partition).collect();
    reported.sort_unstable();
    if reported != partitions {
        return Err(format!(
            "the worker reported states for partitions {reported:?}, the shard has {partitions:?}"
        ));
    }
    for lineage in &result.states {
        let written = lineage
            .written
            .as_ref()
            .map(state_ref)
            .ok_or_else(|| format!("no state written for partition {}", lineage.partition))?;
        if (written.partition, written.cutoff) != (lineage.partition, cutoff) {
            return Err(format!(
                "the state {} is of partition {} at {}, the shard's is partition {} at {cutoff}",
                written.path, written.partition, written.cutoff, lineage.partition
            ));
        }
        states.read(&written).await.map_err(|e| {
            format!(
                "state of partition {} does not verify: {e}",
                lineage.partition
            )
        })?;
    }
    Ok(())
}

pub(crate) fn state_ref(o: &v1::StateObject) -> StateRef {
    StateRef {
        path: o.path.clone(),
        partition: o.partition,
        cutoff: o.cutoff,
        bytes: o.bytes,
        content_hash: o.content_hash.clone(),
    }
}

fn object_ref(o: &v1::ObjectWritten) -> ObjectRef {
    ObjectRef {
        path: o.path.clone(),
        rows: o.rows,
        content_hash: o.content_hash.clone(),
    }
}

/// Publishes the snapshot as the next commit (re-basing when another replay took
/// the number; a retry finds its own commit by snapshot id).
async fn commit(ctx: &Context, replay: &v1::Replay) -> Result<payledger_storage::Commit, Stop> {
    let day = |d: &str| Day::parse(d).map_err(|e| Stop::Failed(format!("day '{d}': {e}")));
    let mut parts: Vec<(u32, ObjectRef)> = Vec::new();
    let mut segments: Vec<(u32, ObjectRef)> = Vec::new();
    let mut states: Vec<PartitionLineage> = Vec::new();
    for shard in &replay.shards {
        let result = shard
            .result
            .as_ref()
            .ok_or_else(|| Stop::Failed(format!("shard {} has no result", shard.index)))?;
        parts.extend(result.parts.iter().map(|p| (p.partition, object_ref(p))));
        for lineage in &result.states {
            let written = lineage.written.as_ref().ok_or_else(|| {
                Stop::Failed(format!(
                    "no state written for partition {}",
                    lineage.partition
                ))
            })?;
            states.push(PartitionLineage {
                partition: lineage.partition,
                started_from: lineage.started_from.as_ref().map(state_ref),
                written: state_ref(written),
            });
        }
        segments.extend(
            result
                .segments_read
                .iter()
                .map(|s| (s.partition, object_ref(s))),
        );
    }
    parts.sort_by_key(|(p, _)| *p);
    states.sort_by_key(|l| l.partition);
    segments.sort_by(|a, b| (a.0, &a.1.path).cmp(&(b.0, &b.1.path)));
    let draft = CommitDraft {
        snapshot_id: replay.snapshot_id.clone(),
        replay_id: replay.replay_id.clone(),
        from_day: day(&replay.from_day)?,
        to_day: day(&replay.to_day)?,
        log_cutoff: replay.cutoff,
        semantics_version: SEMANTICS_VERSION,
        version_key: replay.version_key.clone(),
        partitions: ctx.settings.partitions,
        parts: parts.into_iter().map(|(_, p)| p).collect(),
        segments_read: segments.into_iter().map(|(_, s)| s).collect(),
        states,
    };
    let committed = commit_draft(ctx, draft, ctx.limits.commit_retry_for).await?;
    // States of replays still running may be unlisted yet: keep everything at or
    // above the lowest cutoff among them.
    let below = ctx
        .registry
        .list()
        .iter()
        // A replay still waiting for the archive gets a cutoff at or above today's
        // highest watermark, so above this one's: it needs no state below.
        .filter(|r| {
            ReplayPhase::of(r) == Ok(ReplayPhase::Running) && r.replay_id != replay.replay_id
        })
        .map(|r| r.cutoff)
        .fold(replay.cutoff, u64::min);
    if let Err(e) = prune_states(ctx, below).await {
        tracing::warn!(error = %e, "replay states left by failed replays were not pruned");
    }
    Ok(committed)
}

/// The pause between two tries of a commit the object store failed.
const COMMIT_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Publishes `draft`, trying again every [`COMMIT_RETRY_PAUSE`] for `retry_for`
/// while the object store fails (a commit is one put-if-absent object, and a
/// retry finds its own commit by snapshot id, so trying again is safe). Then the
/// replay fails with what to do.
async fn commit_draft(
    ctx: &Context,
    draft: CommitDraft,
    retry_for: Duration,
) -> Result<payledger_storage::Commit, Stop> {
    let began = std::time::Instant::now();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let error = match ctx.snapshots.commit(draft.clone()).await {
            Ok(commit) => {
                if tries > 1 {
                    tracing::info!(snapshot = %draft.snapshot_id, tries, "commit written once the object store answered again");
                }
                return Ok(commit);
            }
            // What the store holds does not decode: trying again will not help.
            Err(e @ StorageError::Corrupt { .. }) => {
                return Err(Stop::Failed(format!(
                    "the commit of snapshot {} was not written: {e}. Inspect the commit log (tables/…/_commits/) before running the replay again",
                    draft.snapshot_id
                )));
            }
            Err(e) => e,
        };
        if began.elapsed() + COMMIT_RETRY_PAUSE >= retry_for {
            return Err(Stop::Failed(format!(
                "the commit of snapshot {} could not be written within --commit-retry-for ({retry_for:?}, {tries} tries): {error}. \
                 Nothing of this replay is served: a commit is one object, published whole or not at all. \
                 Check that the object store (--store) is reachable, then run the replay again",
                draft.snapshot_id
            )));
        }
        tracing::warn!(
            snapshot = %draft.snapshot_id,
            tries,
            error = %error,
            retry_for = ?retry_for,
            "the commit could not be written; trying again (check that the object store is reachable)"
        );
        tokio::time::sleep(COMMIT_RETRY_PAUSE).await;
    }
}

/// Deletes the replay states below `cutoff` that no commit lists (what failed or
/// cancelled replays left); every state a commit lists, as written or as started
/// from, is kept (docs/storage.md, "Replay states").
async fn prune_states(ctx: &Context, cutoff: u64) -> anyhow::Result<()> {
    let version_key = ctx.settings.version_key();
    let commits = ctx.snapshots.commits().await?;
    for partition in 0..ctx.settings.partitions {
        let listed: Vec<u64> = commits
            .iter()
            .filter(|c| c.draft.version_key == version_key)
            .flat_map(|c| &c.draft.states)
            .filter(|l| l.partition == partition)
            .flat_map(|l| {
                std::iter::once(l.written.cutoff).chain(l.started_from.as_ref().map(|s| s.cutoff))
            })
            .collect();
        let deleted = ctx
            .states
            .prune_unlisted(&version_key, partition, &listed, cutoff)
            .await?;
        if deleted > 0 {
            tracing::info!(partition, deleted, "pruned replay states no commit lists");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_partition_once() {
        for (partitions, per_shard, shards) in [(16, 1, 16), (16, 3, 6), (5, 8, 1), (1, 1, 1)] {
            let plan = plan_shards(partitions, per_shard);
            assert_eq!(plan.len(), shards);
            let all: Vec<u32> = plan.iter().flat_map(|s| s.partitions.clone()).collect();
            assert_eq!(all, (0..partitions).collect::<Vec<_>>());
            assert!(plan.iter().enumerate().all(|(i, s)| s.index as usize == i));
        }
    }
}
