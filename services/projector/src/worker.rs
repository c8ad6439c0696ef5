//! Replay worker: `ProjectorService.RunShard`. The coordinator hands a shard (a set
//! of partitions, a cutoff, a day range); the worker folds it with the same
//! semantics as the stream path and writes the shard's snapshot parts, streaming
//! progress. A caller that goes away cancels the shard.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use payledger_proto::v1;
use payledger_proto::v1::projector_service_server::{ProjectorService, ProjectorServiceServer};
use payledger_semantics::{Day, Settings};
use payledger_storage::{ObjectRef, StateRef};
use tokio::sync::{Semaphore, mpsc};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::replay::{ReplayError, ReplayStores, Shard, ShardProgress, run_shard};

pub(crate) struct Worker {
    pub stores: ReplayStores,
    pub settings: Settings,
    /// Shards run at once; one more is refused rather than queued, so the
    /// coordinator can place it elsewhere.
    pub running: Arc<Semaphore>,
    pub max_concurrent_shards: usize,
    pub max_records_per_sec: Option<u64>,
    pub metrics: std::sync::Arc<crate::metrics::ProjectorMetrics>,
}

impl Worker {
    pub fn into_service(self) -> ProjectorServiceServer<Worker> {
        ProjectorServiceServer::new(self)
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<v1::RunShardUpdate, Status>> + Send>>;

fn progress_to_proto(p: ShardProgress) -> v1::ShardProgress {
    v1::ShardProgress {
        segments_done: p.segments_done,
        segments_total: p.segments_total,
        records_done: p.records_done,
    }
}

fn written(partition: u32, object: ObjectRef) -> v1::ObjectWritten {
    v1::ObjectWritten {
        path: object.path,
        rows: object.rows,
        content_hash: object.content_hash,
        partition,
    }
}

fn state_object(s: StateRef) -> v1::StateObject {
    v1::StateObject {
        path: s.path,
        partition: s.partition,
        cutoff: s.cutoff,
        bytes: s.bytes,
        content_hash: s.content_hash,
    }
}

fn replay_status(e: ReplayError) -> Status {
    match e {
        ReplayError::NotAWatermark { .. } => Status::failed_precondition(e.to_string()),
        ReplayError::Tiling { .. } | ReplayError::DimTiling(_) | ReplayError::Lost(_) => {
            Status::data_loss(e.to_string())
        }
        ReplayError::Storage(_) => Status::unavailable(e.to_string()),
        ReplayError::Semantics(_) => Status::internal(e.to_string()),
    }
}

/// Snapshot ids become object names: keep them to a safe alphabet.
fn valid_snapshot_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.')
}

impl Worker {
    fn check(&self, request: &v1::RunShardRequest) -> Result<Shard, Status> {
        let version_key = self.settings.version_key();
        if request.version_key != version_key {
            return Err(Status::failed_precondition(format!(
                "version_key: this worker folds under {version_key} ({}), the replay under '{}'; \
                 give the worker and the coordinator the same projection settings (allowed lateness, bucket width) and build",
                self.settings.version_canonical(),
                request.version_key
            )));
        }
        if !valid_snapshot_id(&request.snapshot_id) {
            return Err(Status::invalid_argument(
                "snapshot_id: 1 to 128 characters of [A-Za-z0-9._-], not starting with '.'",
            ));
        }
        if request.partitions.is_empty() {
            return Err(Status::invalid_argument("partitions: name at least one"));
        }
        if let Some(p) = request
            .partitions
            .iter()
            .find(|p| **p >= self.settings.partitions)
        {
            return Err(Status::invalid_argument(format!(
                "partitions: {p} is outside 0..{}",
                self.settings.partitions
            )));
        }
        if request.cutoff == 0 {
            return Err(Status::invalid_argument(
                "cutoff: name a watermark of the archive",
            ));
        }
        let day = |field: &str, value: &str| {
            Day::parse(value)
                .map_err(|e| Status::invalid_argument(format!("{field}: '{value}': {e}")))
        };
        let from_day = day("from_day", &request.from_day)?;
        let to_day = day("to_day", &request.to_day)?;
        if from_day > to_day {
            return Err(Status::invalid_argument(format!(
                "from_day {from_day} is after to_day {to_day}"
            )));
        }
        Ok(Shard {
            snapshot_id: request.snapshot_id.clone(),
            partitions: request.partitions.clone(),
            cutoff: request.cutoff,
            from_day,
            to_day,
            from_genesis: request.from_genesis,
        })
    }
}

#[tonic::async_trait]
impl ProjectorService for Worker {
    type RunShardStream = UpdateStream;

    async fn run_shard(
        &self,
        request: Request<v1::RunShardRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let request = request.into_inner();
        let shard = self.check(&request)?;
        let permit = self.running.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this worker already runs {} shards (--max-concurrent-shards); place the shard on another worker or retry later",
                self.max_concurrent_shards
            ))
        })?;
        let (tx, rx) = mpsc::channel(64);
        let (stores, settings, rate, metrics) = (
            self.stores.clone(),
            self.settings,
            self.max_records_per_sec,
            self.metrics.clone(),
        );
        // A child of this call's server span, which continues the coordinator's shard
        // attempt when traces are exported (serve_grpc's trace layer).
        let span = tracing::info_span!("run_shard", replay = %request.replay_id, snapshot = %shard.snapshot_id, partitions = ?shard.partitions, cutoff = shard.cutoff);
        tokio::spawn(
            async move {
                let _permit = permit;
                tracing::info!("shard started");
                let progress_tx = tx.clone();
                let on_progress = |p: ShardProgress| {
                    // Progress is advisory: when the caller reads slowly, skip a report.
                    let update = v1::RunShardUpdate {
                        update: Some(v1::run_shard_update::Update::Progress(progress_to_proto(p))),
                    };
                    let _ = progress_tx.try_send(Ok(update));
                };
                let outcome = tokio::select! {
                    outcome = run_shard(&stores, settings, &shard, rate, on_progress) => outcome,
                    _ = tx.closed() => {
                        metrics.shard("cancelled");
                        tracing::info!("caller went away; shard cancelled");
                        return;
                    }
                };
                let message = match outcome {
                    Ok(output) => {
                        metrics.shard("done");
                        let from_states = output
                            .states
                            .iter()
                            .filter(|l| l.started_from.is_some())
                            .count();
                        tracing::info!(
                            parts = output.parts.len(),
                            segments = output.segments_read.len(),
                            from_states,
                            "shard done"
                        );
                        Ok(v1::RunShardUpdate {
                            update: Some(v1::run_shard_update::Update::Result(v1::ShardResult {
                                parts: output
                                    .parts
                                    .into_iter()
                                    .map(|(p, o)| written(p, o))
                                    .collect(),
                                segments_read: output
                                    .segments_read
                                    .into_iter()
                                    .map(|(p, o)| written(p, o))
                                    .collect(),
                                states: output
                                    .states
                                    .into_iter()
                                    .map(|l| v1::PartitionLineage {
                                        partition: l.partition,
                                        started_from: l.started_from.map(state_object),
                                        written: Some(state_object(l.written)),
                                    })
                                    .collect(),
                            })),
                        })
                    }
                    Err(e) => {
                        metrics.shard("failed");
                        tracing::warn!(error = %e, "shard failed");
                        Err(replay_status(e))
                    }
                };
                let _ = tx.send(message).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
