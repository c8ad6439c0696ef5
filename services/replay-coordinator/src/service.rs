//! The ReplayCoordinator gRPC API.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use payledger_proto::v1;
use payledger_proto::v1::replay_coordinator_server::{ReplayCoordinator, ReplayCoordinatorServer};
use payledger_semantics::Day;
use tonic::{Request, Response, Status};

use crate::leader::Leadership;
use crate::lifecycle::ReplayPhase;
use crate::registry::{is_terminal, now_us};
use crate::runner::{Context, plan_shards};

pub(crate) struct CoordinatorApi {
    pub ctx: Arc<Context>,
}

impl CoordinatorApi {
    pub fn into_service(self) -> ReplayCoordinatorServer<CoordinatorApi> {
        ReplayCoordinatorServer::new(self)
    }
}

/// Most characters of a replay's reason.
const MAX_REASON_CHARS: usize = 500;

/// A replay id: creation time (UTC) and a random suffix, e.g. `r20261125-153012-3fa9`.
/// Ids become KV keys and object names, so they keep to [a-z0-9-].
fn new_replay_id(now_us: i64) -> String {
    let day = Day::of_micros(now_us).to_string().replace('-', "");
    let secs = now_us.rem_euclid(86_400_000_000) / 1_000_000;
    format!(
        "r{day}-{:02}{:02}{:02}-{:04x}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        rand::random::<u16>()
    )
}

/// The snapshot a replay writes: its id and cutoff, so that two replays never
/// share staging parts.
pub(crate) fn snapshot_id(replay_id: &str, cutoff: u64) -> String {
    format!("{replay_id}-{cutoff:020}")
}

/// Refuses a replay all of whose days lie after the last day an event can have
/// now: ingest accepts an event_time at most `max_clock_skew_us` ahead of its clock
/// (docs/semantics.md R2), so no record of the log can fall on those days and the
/// replay would commit an empty "authoritative" snapshot of them. FAILED_PRECONDITION
/// rather than INVALID_ARGUMENT: the same request is valid once the days have come,
/// so what is wrong is the moment, not the argument.
fn refuse_future_days(
    from_day: Day,
    to_day: Day,
    now_us: i64,
    max_clock_skew_us: i64,
) -> Result<(), Status> {
    let last_possible = Day::of_micros(now_us.saturating_add(max_clock_skew_us));
    if from_day <= last_possible {
        return Ok(());
    }
    let days = if from_day == to_day {
        format!("{from_day} is")
    } else {
        format!("{from_day} to {to_day} are")
    };
    Err(Status::failed_precondition(format!(
        "{days} in the future (the latest day an event can have now is {last_possible} UTC): no record can fall on them yet, so there is nothing to replay; replay days up to {last_possible}"
    )))
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// UNAVAILABLE with `NOT_LEADER_METADATA`: the call was refused before anything
/// was done, so sending it again cannot start a replay twice.
fn refused_before_anything(message: String) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        payledger_proto::NOT_LEADER_METADATA,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Status::with_metadata(tonic::Code::Unavailable, message, metadata)
}

/// NATS did not answer before anything was written: a leader election or a
/// partition healing passes by itself, so this is UNAVAILABLE, and safe to send again.
fn nats_unavailable(e: impl std::fmt::Display) -> Status {
    refused_before_anything(format!(
        "NATS did not answer ({e}); nothing was started: try again"
    ))
}

/// The replay's record could not be written to NATS. When no stream answered,
/// nothing was stored and the call is safe to send again; after any other
/// failure (an acknowledgement that did not come) the record may be stored.
fn record_not_written(e: anyhow::Error) -> Status {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    let nothing_stored = e
        .chain()
        .filter_map(|cause| cause.downcast_ref::<PublishError>())
        .any(|p| p.kind() == PublishErrorKind::StreamNotFound);
    if nothing_stored {
        return nats_unavailable(format!("{e:#}"));
    }
    Status::unavailable(format!(
        "recording the replay in NATS failed ({e:#}); it may have been recorded: look for it with `payledger replay list` before starting it again"
    ))
}

type ReplayStream = Pin<Box<dyn Stream<Item = Result<v1::Replay, Status>> + Send>>;

impl CoordinatorApi {
    /// Only the leader starts or cancels replays. Another replica answers
    /// UNAVAILABLE, the code for a condition that passes by itself and a call
    /// worth trying again (each call through the Service may reach another
    /// replica, and a new leader is chosen within a lease duration), rather than
    /// FAILED_PRECONDITION, which tells the caller to change something first.
    /// The refusal carries `NOT_LEADER_METADATA`: it comes before anything is
    /// done, so the caller knows that sending the call again cannot start a
    /// replay twice.
    fn must_lead(&self) -> Result<(), Status> {
        let ctx = &self.ctx;
        if ctx.drivers.leading() {
            return Ok(());
        }
        let refuse = |message: String| Err(refused_before_anything(message));
        let Some(lease) = &ctx.lease else {
            return refuse("the coordinator is starting; try again".into());
        };
        let leadership = ctx.leadership.borrow().clone();
        refuse(match leadership {
            Leadership::Following {
                holder: Some(holder),
            } if holder != lease.identity => format!(
                "this coordinator ({}) is a standby: {holder} holds the Lease '{}' and plans the replays; try again (a call may reach another replica)",
                lease.identity, lease.name
            ),
            Leadership::Leading => format!(
                "this coordinator ({}) is taking over the replays as the new holder of the Lease '{}'; try again in a moment",
                lease.identity, lease.name
            ),
            Leadership::Following { .. } => format!(
                "no coordinator holds the Lease '{}' at the moment (one takes it within {:?}); try again shortly",
                lease.name, lease.duration
            ),
        })
    }

    fn known(&self, id: &str) -> Result<v1::Replay, Status> {
        self.ctx.registry.get(id).ok_or_else(|| {
            Status::not_found(format!(
                "replay '{id}' is not known; `payledger replay list` shows the replays"
            ))
        })
    }
}

#[tonic::async_trait]
impl ReplayCoordinator for CoordinatorApi {
    async fn start_replay(
        &self,
        request: Request<v1::StartReplayRequest>,
    ) -> Result<Response<v1::Replay>, Status> {
        let request = request.into_inner();
        let day = |field: &str, value: &str| {
            Day::parse(value).map_err(|e| {
                Status::invalid_argument(format!(
                    "{field}: '{value}' is not a day (YYYY-MM-DD): {e}"
                ))
            })
        };
        let from_day = day("from_day", &request.from_day)?;
        let to_day = day("to_day", &request.to_day)?;
        if from_day > to_day {
            return Err(Status::invalid_argument(format!(
                "from_day {from_day} is after to_day {to_day}"
            )));
        }
        refuse_future_days(
            from_day,
            to_day,
            now_us(),
            self.ctx.settings.max_clock_skew_us,
        )?;
        let reason = request.reason.trim();
        if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS {
            return Err(Status::invalid_argument(format!(
                "reason: say why, in 1 to {MAX_REASON_CHARS} characters (e.g. 'nightly', 'late settlement file of 2026-11-20')"
            )));
        }
        // Before anything is written: a refusal here is safe for the caller to retry.
        self.must_lead()?;
        let ctx = &self.ctx;
        if ctx.registry.active() >= ctx.limits.max_active_replays {
            return Err(Status::resource_exhausted(format!(
                "{} replays are running (--max-active-replays); wait for one to end or cancel one",
                ctx.limits.max_active_replays
            )));
        }
        let watermarks = ctx.archive.watermarks().await.map_err(internal)?;
        let highest = watermarks.last().copied();
        // Without a cutoff the replay covers what the stream holds now, so that
        // every event acknowledged before this call is in it (docs/operations.md,
        // "Read-your-writes"): when the archive is not there yet, the driver waits.
        let (cutoff, awaited_sequence) = match request.cutoff {
            0 => {
                let last = ctx
                    .stream
                    .get_info()
                    .await
                    .map_err(nats_unavailable)?
                    .state
                    .last_sequence;
                match highest {
                    Some(h) if h >= last => (h, 0),
                    None if last == 0 => {
                        return Err(Status::failed_precondition(
                            "the stream and the archive are empty, so there is nothing to replay; is the archiver running (payledger-ingest --archive-store) against the same store?",
                        ));
                    }
                    _ => (0, last),
                }
            }
            c if watermarks.binary_search(&c).is_ok() => (c, 0),
            c => {
                return Err(Status::invalid_argument(format!(
                    "cutoff: {c} is not a watermark of the archive (the highest is {}); replay only complete cuts, or pass 0 for the highest",
                    highest.unwrap_or(0)
                )));
            }
        };
        let created = now_us();
        let replay_id = new_replay_id(created);
        let replay = v1::Replay {
            snapshot_id: match cutoff {
                0 => String::new(),
                c => snapshot_id(&replay_id, c),
            },
            replay_id: replay_id.clone(),
            from_day: from_day.to_string(),
            to_day: to_day.to_string(),
            reason: reason.to_string(),
            cutoff,
            state: v1::ReplayState::Running.into(),
            shards: plan_shards(ctx.settings.partitions, ctx.limits.partitions_per_shard),
            created_at_us: created,
            updated_at_us: created,
            version_key: ctx.settings.version_key(),
            from_genesis: request.from_genesis,
            awaited_sequence,
            archive_watermark: highest.unwrap_or(0),
            ..Default::default()
        };
        ctx.registry
            .insert(replay.clone())
            .await
            .map_err(record_not_written)?;
        tracing::info!(replay = %replay_id, %from_day, %to_day, cutoff, awaited_sequence, reason, shards = replay.shards.len(), from_genesis = request.from_genesis, "replay started");
        if !ctx.drivers.start(ctx, replay_id.clone()) {
            // The Lease was lost since the check above: the replay is in the KV
            // bucket as RUNNING, and the next leader resumes it.
            tracing::warn!(replay = %replay_id, "lost the Lease while starting the replay; the next leader runs it");
        }
        Ok(Response::new(replay))
    }

    async fn get_replay(
        &self,
        request: Request<v1::GetReplayRequest>,
    ) -> Result<Response<v1::Replay>, Status> {
        Ok(Response::new(self.known(&request.into_inner().replay_id)?))
    }

    async fn list_replays(
        &self,
        request: Request<v1::ListReplaysRequest>,
    ) -> Result<Response<v1::ListReplaysResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 20,
            n => n as usize,
        };
        let mut replays = self.ctx.registry.list();
        replays.truncate(limit);
        Ok(Response::new(v1::ListReplaysResponse { replays }))
    }

    type WatchReplayStream = ReplayStream;

    async fn watch_replay(
        &self,
        request: Request<v1::GetReplayRequest>,
    ) -> Result<Response<ReplayStream>, Status> {
        let id = request.into_inner().replay_id;
        self.known(&id)?;
        let mut changes = self.ctx.registry.watch(&id).expect("known replay");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let replay = changes.borrow_and_update().clone();
                let done = is_terminal(&replay);
                if tx.send(Ok(replay)).await.is_err() || done {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_replay(
        &self,
        request: Request<v1::CancelReplayRequest>,
    ) -> Result<Response<v1::Replay>, Status> {
        let id = request.into_inner().replay_id;
        self.must_lead()?;
        let replay = self.known(&id)?;
        let phase = ReplayPhase::of(&replay).map_err(internal)?;
        if phase.has_committed() {
            return Err(Status::failed_precondition(format!(
                "replay {id} has committed (or is committing) its snapshot; a commit is never taken back: start a new replay to supersede it"
            )));
        }
        if phase.is_terminal() {
            return Ok(Response::new(replay));
        }
        self.ctx.registry.request_cancel(&id);
        let mut changes = self.ctx.registry.watch(&id).expect("known replay");
        let ended = changes
            .wait_for(|r| ReplayPhase::of(r).is_ok_and(|p| p.is_terminal() || p.has_committed()));
        let replay = tokio::time::timeout(std::time::Duration::from_secs(30), ended)
            .await
            .map_err(|_| Status::deadline_exceeded("the replay did not stop within 30 s; `payledger replay status` shows where it is"))?
            .map_err(internal)?
            .clone();
        Ok(Response::new(replay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ranges_wholly_after_the_last_possible_event_day_are_refused() {
        let d = |s: &str| Day::parse(s).unwrap();
        let skew = 5 * 60 * 1_000_000;
        // 2026-11-25T23:57:00Z: events may already lie on 2026-11-26.
        let late = 1_795_651_020_000_000;
        assert_eq!(Day::of_micros(late), d("2026-11-25"));
        assert!(refuse_future_days(d("2026-11-25"), d("2026-11-25"), late, skew).is_ok());
        assert!(refuse_future_days(d("2026-11-26"), d("2026-11-26"), late, skew).is_ok());
        assert!(refuse_future_days(d("2016-01-01"), d("2027-01-01"), late, skew).is_ok());
        let refused = refuse_future_days(d("2026-11-27"), d("2026-11-30"), late, skew)
            .expect_err("all in the future");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused
                .message()
                .starts_with("2026-11-27 to 2026-11-30 are in the future"),
            "{}",
            refused.message()
        );
        // 2026-11-25T12:00:00Z: tomorrow is out of reach.
        let noon = 1_795_608_000_000_000;
        let refused =
            refuse_future_days(d("2026-11-26"), d("2026-11-26"), noon, skew).expect_err("tomorrow");
        assert!(
            refused.message().contains("2026-11-26 is in the future")
                && refused.message().contains("up to 2026-11-25"),
            "{}",
            refused.message()
        );
    }

    #[test]
    fn replay_ids_are_readable_and_safe_as_keys() {
        // 2026-11-25T15:30:12Z
        let id = new_replay_id(1_795_620_612_000_000);
        assert!(id.starts_with("r20261125-153012-"), "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
