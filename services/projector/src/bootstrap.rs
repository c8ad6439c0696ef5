//! Where a partition starts, and how the archive fills in what the log no longer
//! holds (docs/operations.md, "History longer than the log").
//!
//! A partition starts from its newest usable checkpoint, else from the newest
//! committed replay state of its version key, else from nothing. If the log's
//! head has moved past that point (`max_age`, a purge), the records in between are
//! read from the archive, cut by cut, until the archive reaches what the log
//! still holds; the same sequence numbers on both sides, so there is nothing to
//! align. The head is looked at again after every cut, since it may move
//! meanwhile. When the archive does not reach the log's head either, the records
//! in between are gone: the partition is refused, never folded from a partial
//! history.

use std::future::Future;

use async_nats::jetstream;
use payledger_semantics::{PartitionState, Settings};
use payledger_server_common::connection::ConnectionLosses;
use payledger_storage::{CheckpointStore, verify_tiling};

use crate::metrics::ProjectorMetrics;
use crate::replay::{ReplayStores, fold_segments, starting_state};

/// What a partition started from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// Its own checkpoint (its path).
    Checkpoint(String),
    /// A committed replay state (its path).
    ReplayState(String),
    /// Nothing: the beginning of history.
    Genesis,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Checkpoint(path) => write!(f, "checkpoint {path}"),
            Source::ReplayState(path) => write!(f, "replay state {path}"),
            Source::Genesis => write!(f, "the beginning of history"),
        }
    }
}

/// A request of a starting partition to NATS, given up as soon as the connection
/// is lost: its answer was due on that connection and cannot come. The partition
/// then starts again (its next requests go out once the client has reconnected)
/// instead of waiting out the request timeout after NATS is back.
pub(crate) async fn request<T, E: Into<anyhow::Error>>(
    losses: &ConnectionLosses,
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match losses.since_now().or_lost(fut).await {
        Ok(answer) => answer.map_err(Into::into),
        Err(lost) => Err(anyhow::anyhow!(
            "{what}: {lost} while waiting for the answer; the partition starts again once it is back"
        )),
    }
}

/// Records the partition needs that neither the log nor the archive holds.
#[derive(Debug, thiserror::Error)]
#[error(
    "partition {partition} cannot be projected: it needs records {from} to {to}, which the log no longer holds \
     (its first sequence is {log_first}) and the archive does not hold either (its highest watermark is {watermark}; \
     records deleted from the stream before they were archived are listed under archive/_gaps/); \
     started from {started_from}. Nothing of it is served as current. Restore the archive's segments through {to}, \
     or start from a checkpoint or committed replay state at or after {to} (see docs/operations.md)"
)]
pub(crate) struct Refused {
    pub partition: u32,
    pub from: u64,
    pub to: u64,
    pub log_first: u64,
    pub watermark: u64,
    pub started_from: Source,
}

/// The newest checkpoint of the partition that decodes under `settings`, else
/// the newest committed replay state that does, else an empty state.
/// Returns the state, where it came from, and the sequence through which it holds
/// the partition's records (a replay state's cutoff may lie past its last record).
pub(crate) async fn restore(
    partition: u32,
    settings: &Settings,
    checkpoints: &CheckpointStore,
    stores: &ReplayStores,
) -> anyhow::Result<(PartitionState, Source, u64)> {
    if let Some(stored) = checkpoints.latest(partition).await? {
        match PartitionState::decode(&stored.bytes, settings, partition) {
            Ok(state) => {
                let covered = state.last_seq();
                return Ok((state, Source::Checkpoint(stored.path), covered));
            }
            Err(e) => tracing::warn!(
                partition,
                checkpoint = %stored.path,
                error = %e,
                "checkpoint not usable; starting from a committed replay state or the archive instead"
            ),
        }
    }
    // Any day will do: the stream writes rows as they change.
    match starting_state(stores, settings, partition, u64::MAX, None).await? {
        Some((from, state)) => Ok((state, Source::ReplayState(from.path), from.cutoff)),
        None => Ok((
            PartitionState::new(partition, *settings),
            Source::Genesis,
            0,
        )),
    }
}

/// Reads from the archive what the log lost after the state, until the log's
/// head is within reach. Returns the state and the sequence the log takes over
/// after (records of the partition through it are in the state).
pub(crate) async fn catch_up(
    mut state: PartitionState,
    source: &Source,
    mut covered: u64,
    stream: &mut jetstream::stream::Stream,
    stores: &ReplayStores,
    metrics: &ProjectorMetrics,
    losses: &ConnectionLosses,
) -> Result<(PartitionState, u64), anyhow::Error> {
    let partition = state.partition();
    // Records of the partition through `covered` are in the state.
    let mut segments_read = 0u64;
    loop {
        let log_first = request(losses, "reading the log's head", stream.info())
            .await?
            .state
            .first_sequence;
        if log_first <= covered + 1 {
            if segments_read > 0 {
                tracing::info!(
                    partition,
                    segments_read,
                    hand_over_after = covered,
                    log_first,
                    "filled in from the archive what the log no longer holds"
                );
            }
            return Ok((state, covered));
        }
        let watermarks = stores.archive.watermarks().await?;
        let watermark = watermarks.last().copied().unwrap_or(0);
        if watermark <= covered {
            return Err(Refused {
                partition,
                from: covered + 1,
                to: log_first - 1,
                log_first,
                watermark,
                started_from: source.clone(),
            }
            .into());
        }
        if let Some(lost) = stores.archive.gap_within(covered, watermark).await? {
            // The archive spans them, but the records were gone before it read them.
            return Err(Refused {
                partition,
                from: lost.first.max(covered + 1),
                to: lost.last,
                log_first,
                watermark,
                started_from: source.clone(),
            }
            .into());
        }
        let segments = stores.archive.event_segments(partition).await?;
        verify_tiling(&segments, &watermarks, watermark).map_err(|e| {
            anyhow::anyhow!("the archive of partition {partition} is not whole: {e}")
        })?;
        let due: Vec<_> = segments
            .into_iter()
            .filter(|s| s.last > covered && s.last <= watermark)
            .collect();
        let (folded, read) = fold_segments(&stores.archive, state, &due, |_| {
            metrics.bootstrap_segment_read(partition)
        })
        .await?;
        state = folded;
        segments_read += read.len() as u64;
        covered = watermark;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use payledger_semantics::{RecordedStream, StreamSettings};
    use payledger_server_common::config::NatsArgs;
    use payledger_server_common::local_nats::LocalNats;
    use payledger_server_common::topology::STREAM;

    use super::*;

    /// A partition starting while nats-server goes away: the request it waits on
    /// (the log's head) is given up as soon as the connection drops, with the
    /// reason, instead of when the request times out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_waiting_on_nats_fails_at_once_when_the_connection_drops() {
        let dir = tempfile::tempdir().unwrap();
        let mut nats = LocalNats::start(&dir.path().join("nats")).unwrap();
        // Pings a minute apart: only the connection closing ends the wait early.
        let mut args = NatsArgs::new(nats.url());
        args.ping_interval = Duration::from_secs(60);
        let (client, losses) = args.connect_watched("test").await.unwrap();
        let js = jetstream::new(client);
        js.create_stream(jetstream::stream::Config {
            name: STREAM.to_string(),
            subjects: vec!["payledger.events.>".to_string()],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = js.get_stream(STREAM).await.unwrap();
        let stores = ReplayStores::at(
            payledger_storage::open_store(dir.path().join("store").to_str().unwrap()).unwrap(),
            RecordedStream::new(StreamSettings::default()),
        );
        let metrics = ProjectorMetrics::register(&mut Default::default());
        let settings = Settings::default();

        // Frozen: the request reaches the server's socket, no answer can come.
        nats.pause().unwrap();
        let start = catch_up(
            PartitionState::new(0, settings),
            &Source::Genesis,
            0,
            &mut stream,
            &stores,
            &metrics,
            &losses,
        );
        tokio::pin!(start);
        assert!(
            futures::poll!(&mut start).is_pending(),
            "waits on nats-server"
        );
        // SIGKILL: the connection closes.
        nats.stop();
        let error = match start.await {
            Ok(_) => panic!("the partition started without nats-server"),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains("the connection to NATS was lost") && !error.contains("timed out"),
            "{error}"
        );
    }
}
