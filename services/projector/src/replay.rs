//! Replay: the same semantics folded over the archive instead of the live stream.
//!
//! A replay reads a partition's segments up to a cutoff — which must be a watermark,
//! so that only complete cuts are read — checks that they tile the sequence space,
//! and folds them in sequence order from the beginning of history. For the same log
//! prefix it yields exactly the stream projector's rows (docs/semantics.md).

use payledger_semantics::{Day, DimensionBook, Exposure, SemanticsError, Settings};
use payledger_storage::{
    ArchiveStore, CutRange, DimRecord, ObjectRef, SnapshotStore, StorageError, TilingError,
    verify_tiling,
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

/// Folds `partitions` of the archive through `cutoff` into one [`Exposure`].
pub async fn fold_partitions(
    archive: &ArchiveStore,
    settings: Settings,
    partitions: &[u32],
    cutoff: u64,
) -> Result<Exposure, ReplayError> {
    let watermarks = checked_watermarks(archive, cutoff).await?;
    let mut exposure = Exposure::new(settings);
    for &partition in partitions {
        let segments = partition_segments(archive, partition, cutoff, &watermarks).await?;
        exposure = fold_segments(archive, exposure, partition, &segments, |_| {})
            .await?
            .0;
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

/// Applies `segments` of `partition` in order, calling `on_segment` with each
/// segment's record count. The fold runs on the blocking pool so that a long
/// replay never starves the server's other tasks (health checks, progress).
async fn fold_segments(
    archive: &ArchiveStore,
    mut exposure: Exposure,
    partition: u32,
    segments: &[CutRange],
    mut on_segment: impl FnMut(u64),
) -> Result<(Exposure, Vec<ObjectRef>), ReplayError> {
    let mut read = Vec::with_capacity(segments.len());
    for &cut in segments {
        let (records, info) = archive.read_events_with_info(partition, cut).await?;
        let count = records.len() as u64;
        exposure = tokio::task::spawn_blocking(move || {
            for record in &records {
                exposure.apply(partition, record)?;
            }
            Ok::<_, SemanticsError>(exposure)
        })
        .await
        .expect("the fold does not panic")?;
        read.push(info.into());
        on_segment(count);
    }
    Ok((exposure, read))
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
}

/// Where a shard stands, reported after every segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardProgress {
    pub segments_done: u64,
    pub segments_total: u64,
    pub records_done: u64,
}

/// What a shard wrote (one part per partition) and read.
#[derive(Clone, Debug, Default)]
pub struct ShardOutput {
    pub parts: Vec<(u32, ObjectRef)>,
    pub segments_read: Vec<(u32, ObjectRef)>,
}

/// Runs one shard: folds each partition from the beginning of history through the
/// cutoff (closing balances are cumulative), keeps the rows of the day range and
/// writes them as the partition's part of the staging snapshot. With
/// `max_records_per_sec`, reading is paced so that a backfill leaves the object
/// store and the cores to the live path.
pub async fn run_shard(
    archive: &ArchiveStore,
    snapshots: &SnapshotStore,
    settings: Settings,
    shard: &Shard,
    max_records_per_sec: Option<u64>,
    mut on_progress: impl FnMut(ShardProgress),
) -> Result<ShardOutput, ReplayError> {
    let watermarks = checked_watermarks(archive, shard.cutoff).await?;
    let mut plan = Vec::with_capacity(shard.partitions.len());
    for &partition in &shard.partitions {
        plan.push((
            partition,
            partition_segments(archive, partition, shard.cutoff, &watermarks).await?,
        ));
    }
    let mut progress = ShardProgress {
        segments_total: plan.iter().map(|(_, s)| s.len() as u64).sum(),
        ..ShardProgress::default()
    };
    on_progress(progress);
    let started = std::time::Instant::now();
    let mut output = ShardOutput::default();
    for (partition, segments) in plan {
        let mut exposure = Exposure::new(settings);
        for cut in segments {
            let (folded, read) = fold_segments(archive, exposure, partition, &[cut], |records| {
                progress.segments_done += 1;
                progress.records_done += records;
            })
            .await?;
            exposure = folded;
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
        let rows: Vec<_> = exposure
            .daily_rows()
            .into_iter()
            .filter(|r| shard.from_day <= r.day && r.day <= shard.to_day)
            .collect();
        let part = snapshots
            .put_part(&shard.snapshot_id, partition, &rows)
            .await?;
        output.parts.push((partition, part.into()));
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
}

/// Replays every partition in this process and commits the snapshot: fold the
/// archive from its beginning through the cutoff (closing balances are cumulative),
/// keep the rows of the day range, write one part per partition, then commit.
pub async fn replay_and_commit(
    archive: &ArchiveStore,
    snapshots: &SnapshotStore,
    settings: Settings,
    request: &ReplayRequest,
    mut on_partition: impl FnMut(u32),
) -> Result<payledger_storage::Commit, ReplayError> {
    let cutoff = match request.cutoff {
        Some(c) => c,
        None => latest_cutoff(archive).await?,
    };
    let snapshot_id = format!("{}-{cutoff:020}", request.replay_id);
    let mut parts = Vec::new();
    let mut segments_read = Vec::new();
    for partition in 0..settings.partitions {
        let shard = Shard {
            snapshot_id: snapshot_id.clone(),
            partitions: vec![partition],
            cutoff,
            from_day: request.from_day,
            to_day: request.to_day,
        };
        let output = run_shard(archive, snapshots, settings, &shard, None, |_| {}).await?;
        parts.extend(output.parts.into_iter().map(|(_, p)| p));
        segments_read.extend(output.segments_read.into_iter().map(|(_, s)| s));
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
    };
    Ok(snapshots.commit(draft).await?)
}
