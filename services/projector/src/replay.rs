//! Replay: the same semantics folded over the archive instead of the live stream.
//!
//! A replay reads a partition's segments up to a cutoff — which must be a watermark,
//! so that only complete cuts are read — checks that they tile the sequence space,
//! and folds them in sequence order from the beginning of history. For the same log
//! prefix it yields exactly the stream projector's rows (docs/semantics.md).

use payledger_semantics::{
    Day, DimensionBook, Exposure, PartitionState, RecordedStream, SemanticsError, Settings,
};
use payledger_storage::{
    ArchiveStore, CutRange, DimRecord, ObjectRef, PartitionLineage, SnapshotStore, StateRef,
    StateStore, StorageError, TilingError, verify_tiling,
};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "cutoff {cutoff} is not a watermark of the archive (the highest is {highest}); replay only complete cuts"
    )]
    NotAWatermark { cutoff: u64, highest: u64 },
    #[error("the archive of partition {partition} is not whole: {source}")]
    Tiling { partition: u32, source: TilingError },
    #[error("the archived dimension records are not whole: {0}")]
    DimTiling(TilingError),
    #[error(
        "records {} to {} were deleted from the stream before the archiver read them: the archive does not hold \
         the whole history there; replay from a state committed after {}, or from a cutoff before {}",
        .0.first, .0.last, .0.last, .0.first
    )]
    Lost(CutRange),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Semantics(#[from] SemanticsError),
}

/// The highest watermark: the default cutoff of a replay.
pub async fn latest_cutoff(archive: &ArchiveStore) -> Result<u64, ReplayError> {
    Ok(archive.watermarks().await?.last().copied().unwrap_or(0))
}

async fn checked_watermarks(archive: &ArchiveStore, cutoff: u64) -> Result<Vec<u64>, ReplayError> {
    let watermarks = archive.watermarks().await?;
    if cutoff != 0 && watermarks.binary_search(&cutoff).is_err() {
        let highest = watermarks.last().copied().unwrap_or(0);
        return Err(ReplayError::NotAWatermark { cutoff, highest });
    }
    Ok(watermarks)
}

/// Folds `partitions` of the archive through `cutoff` into one [`Exposure`], from
/// the beginning of history.
pub async fn fold_partitions(
    archive: &ArchiveStore,
    settings: Settings,
    partitions: &[u32],
    cutoff: u64,
) -> Result<Exposure, ReplayError> {
    let watermarks = checked_watermarks(archive, cutoff).await?;
    if let Some(lost) = archive.gap_within(0, cutoff).await? {
        return Err(ReplayError::Lost(lost));
    }
    let mut exposure = Exposure::new(settings);
    for &partition in partitions {
        let segments = partition_segments(archive, partition, cutoff, &watermarks).await?;
        let state = PartitionState::new(partition, settings);
        let (state, _) = fold_segments(archive, state, &segments, |_| {}).await?;
        exposure.insert(state)?;
    }
    Ok(exposure)
}

/// A partition's segments through `cutoff`, checked to tile the sequence space.
async fn partition_segments(
    archive: &ArchiveStore,
    partition: u32,
    cutoff: u64,
    watermarks: &[u64],
) -> Result<Vec<CutRange>, ReplayError> {
    let segments = archive.event_segments(partition).await?;
    verify_tiling(&segments, watermarks, cutoff)
        .map_err(|source| ReplayError::Tiling { partition, source })?;
    // Segment names sort by range, and each segment is sorted by sequence.
    Ok(segments.into_iter().filter(|s| s.last <= cutoff).collect())
}

/// Applies `segments` of the state's partition in order, calling `on_segment`
/// with each segment's record count. The fold runs on the blocking pool so that a
/// long replay never starves the server's other tasks (health checks, progress).
/// Public so that a measurement of a replay or a bootstrap folds exactly as they do.
pub async fn fold_segments(
    archive: &ArchiveStore,
    mut state: PartitionState,
    segments: &[CutRange],
    mut on_segment: impl FnMut(u64),
) -> Result<(PartitionState, Vec<ObjectRef>), ReplayError> {
    let partition = state.partition();
    let mut read = Vec::with_capacity(segments.len());
    for &cut in segments {
        let (records, info) = archive.read_events_with_info(partition, cut).await?;
        let count = records.len() as u64;
        state = tokio::task::spawn_blocking(move || {
            for record in &records {
                state.apply(record)?;
            }
            Ok::<_, SemanticsError>(state)
        })
        .await
        .expect("the fold does not panic")?;
        read.push(info.into());
        on_segment(count);
    }
    Ok((state, read))
}

/// Where a replay reads and writes: the archive, the table's snapshots and commit
/// log, and the replay states.
#[derive(Clone)]
pub struct ReplayStores {
    pub archive: ArchiveStore,
    pub snapshots: SnapshotStore,
    pub states: StateStore,
}

impl ReplayStores {
    /// All three in one object store, as deployed.
    pub fn at(
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        stream: RecordedStream,
    ) -> Self {
        Self::beside(ArchiveStore::new(store, stream))
    }

    /// The tables and states in the archive's object store.
    pub fn beside(archive: ArchiveStore) -> Self {
        let store = archive.object_store();
        Self {
            snapshots: SnapshotStore::new(store.clone()),
            states: StateStore::new(store),
            archive,
        }
    }
}

/// One shard of a replay: the partitions it folds and where their rows go.
#[derive(Clone, Debug)]
pub struct Shard {
    pub snapshot_id: String,
    pub partitions: Vec<u32>,
    /// A watermark of the archive.
    pub cutoff: u64,
    pub from_day: Day,
    pub to_day: Day,
    /// Fold from the beginning of history even where a committed state could serve.
    pub from_genesis: bool,
}

/// Where a shard stands, reported after every segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardProgress {
    pub segments_done: u64,
    pub segments_total: u64,
    pub records_done: u64,
}

/// What a shard wrote (one part and one state per partition) and read.
#[derive(Clone, Debug, Default)]
pub struct ShardOutput {
    pub parts: Vec<(u32, ObjectRef)>,
    pub segments_read: Vec<(u32, ObjectRef)>,
    pub states: Vec<PartitionLineage>,
}

/// The newest committed state of `partition` under the settings' version key at
/// or below `cutoff` that reads back as recorded and still holds `from_day`, if
/// given (a stored state keeps no final day, R11); a state that does not read back (its
/// hash, its decoding) is skipped with a warning for the next older one. None:
/// start from the beginning of history.
pub async fn starting_state(
    stores: &ReplayStores,
    settings: &Settings,
    partition: u32,
    cutoff: u64,
    from_day: Option<Day>,
) -> Result<Option<(StateRef, PartitionState)>, ReplayError> {
    let version_key = settings.version_key();
    let mut candidates: Vec<StateRef> = stores
        .snapshots
        .commits()
        .await?
        .into_iter()
        .filter(|c| c.draft.version_key == version_key)
        .flat_map(|c| c.draft.states)
        .filter(|l| l.partition == partition && l.written.cutoff <= cutoff)
        .map(|l| l.written)
        .collect();
    candidates.sort_by_key(|s| std::cmp::Reverse(s.cutoff));
    candidates.dedup_by(|a, b| a.path == b.path);
    for candidate in candidates {
        let decoded = match stores.states.read(&candidate).await {
            Ok(bytes) => {
                PartitionState::decode(&bytes, settings, partition).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match decoded {
            // Older states hold more days: one of them, or genesis, has it.
            Ok(state) if from_day.is_some_and(|d| state.is_final(d)) => continue,
            Ok(state) => return Ok(Some((candidate, state))),
            Err(error) => tracing::warn!(
                partition,
                state = %candidate.path,
                %error,
                "committed replay state skipped; trying an older one"
            ),
        }
    }
    Ok(None)
}

/// Runs one shard: folds each partition through the cutoff — from the newest
/// committed state at or below it, reading only the archive after that state, or
/// from the beginning of history (closing balances are cumulative) — keeps the
/// rows of the day range and writes them as the partition's part of the staging
/// snapshot, and writes the partition's state at the cutoff for later replays.
/// With `max_records_per_sec`, reading is paced so that a backfill leaves the
/// object store and the cores to the live path.
pub async fn run_shard(
    stores: &ReplayStores,
    settings: Settings,
    shard: &Shard,
    max_records_per_sec: Option<u64>,
    mut on_progress: impl FnMut(ShardProgress),
) -> Result<ShardOutput, ReplayError> {
    let archive = &stores.archive;
    let watermarks = checked_watermarks(archive, shard.cutoff).await?;
    let mut plan = Vec::with_capacity(shard.partitions.len());
    for &partition in &shard.partitions {
        let start = if shard.from_genesis {
            None
        } else {
            starting_state(
                stores,
                &settings,
                partition,
                shard.cutoff,
                Some(shard.from_day),
            )
            .await?
        };
        let after = start.as_ref().map_or(0, |(s, _)| s.cutoff);
        if let Some(lost) = archive.gap_within(after, shard.cutoff).await? {
            return Err(ReplayError::Lost(lost));
        }
        let segments: Vec<CutRange> =
            partition_segments(archive, partition, shard.cutoff, &watermarks)
                .await?
                .into_iter()
                .filter(|s| s.first > after)
                .collect();
        plan.push((partition, start, segments));
    }
    let mut progress = ShardProgress {
        segments_total: plan.iter().map(|(_, _, s)| s.len() as u64).sum(),
        ..ShardProgress::default()
    };
    on_progress(progress);
    let started = std::time::Instant::now();
    let mut output = ShardOutput::default();
    let version_key = settings.version_key();
    for (partition, start, segments) in plan {
        let (started_from, mut state) = match start {
            Some((from, state)) => (Some(from), state),
            None => (None, PartitionState::new(partition, settings)),
        };
        // The days this shard publishes stay in memory even once final.
        state.keep_final_days_from(shard.from_day);
        for cut in segments {
            let (folded, read) = fold_segments(archive, state, &[cut], |records| {
                progress.segments_done += 1;
                progress.records_done += records;
            })
            .await?;
            state = folded;
            output
                .segments_read
                .extend(read.into_iter().map(|r| (partition, r)));
            on_progress(progress);
            if let Some(rate) = max_records_per_sec.filter(|r| *r > 0) {
                let due =
                    std::time::Duration::from_secs_f64(progress.records_done as f64 / rate as f64);
                tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
            }
        }
        let rows = state.daily_rows_between(shard.from_day, shard.to_day);
        let part = stores
            .snapshots
            .put_part(&shard.snapshot_id, partition, &rows)
            .await?;
        output.parts.push((partition, part.into()));
        let written = stores
            .states
            .put(&version_key, partition, shard.cutoff, state.encode().into())
            .await?;
        output.states.push(PartitionLineage {
            partition,
            started_from,
            written,
        });
    }
    Ok(output)
}

/// Every dimension record of the archive through `cutoff`.
pub async fn fold_dimensions(
    archive: &ArchiveStore,
    cutoff: u64,
) -> Result<DimensionBook, ReplayError> {
    let watermarks = checked_watermarks(archive, cutoff).await?;
    let segments = archive.dim_segments().await?;
    verify_tiling(&segments, &watermarks, cutoff).map_err(ReplayError::DimTiling)?;
    let mut book = DimensionBook::default();
    for cut in segments.into_iter().filter(|s| s.last <= cutoff) {
        for dim in archive.read_dims(cut).await? {
            match &dim.record {
                DimRecord::Fx(fx) => book.apply_fx(dim.seq, fx),
                DimRecord::Risk(risk) => book.apply_risk(dim.seq, risk),
            };
        }
    }
    Ok(book)
}

/// What a replay publishes and why.
#[derive(Clone, Debug)]
pub struct ReplayRequest {
    pub replay_id: String,
    pub from_day: Day,
    pub to_day: Day,
    /// A watermark of the archive; None: the highest.
    pub cutoff: Option<u64>,
    /// Fold from the beginning of history even where a committed state could serve.
    pub from_genesis: bool,
}

/// Replays every partition in this process and commits the snapshot: fold each
/// partition through the cutoff as [`run_shard`] does, keep the rows of the day
/// range, write one part and one state per partition, then commit.
pub async fn replay_and_commit(
    stores: &ReplayStores,
    settings: Settings,
    request: &ReplayRequest,
    mut on_partition: impl FnMut(u32),
) -> Result<payledger_storage::Commit, ReplayError> {
    let cutoff = match request.cutoff {
        Some(c) => c,
        None => latest_cutoff(&stores.archive).await?,
    };
    let snapshot_id = format!("{}-{cutoff:020}", request.replay_id);
    let mut parts = Vec::new();
    let mut segments_read = Vec::new();
    let mut states = Vec::new();
    for partition in 0..settings.partitions {
        let shard = Shard {
            snapshot_id: snapshot_id.clone(),
            partitions: vec![partition],
            cutoff,
            from_day: request.from_day,
            to_day: request.to_day,
            from_genesis: request.from_genesis,
        };
        let output = run_shard(stores, settings, &shard, None, |_| {}).await?;
        parts.extend(output.parts.into_iter().map(|(_, p)| p));
        segments_read.extend(output.segments_read.into_iter().map(|(_, s)| s));
        states.extend(output.states);
        on_partition(partition);
    }
    let draft = payledger_storage::CommitDraft {
        snapshot_id,
        replay_id: request.replay_id.clone(),
        from_day: request.from_day,
        to_day: request.to_day,
        log_cutoff: cutoff,
        semantics_version: payledger_semantics::SEMANTICS_VERSION,
        version_key: settings.version_key(),
        partitions: settings.partitions,
        parts,
        segments_read,
        states,
    };
    Ok(stores.snapshots.commit(draft).await?)
}
