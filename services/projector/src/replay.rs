//! Replay: the same semantics folded over the archive instead of the live stream.
//!
//! A replay reads a partition's segments up to a cutoff — which must be a watermark,
//! so that only complete cuts are read — checks that they tile the sequence space,
//! and folds them in sequence order from the beginning of history. For the same log
//! prefix it yields exactly the stream projector's rows (DESIGN.md section 4).

use payledger_semantics::{DimensionBook, Exposure, SemanticsError, Settings};
use payledger_storage::{ArchiveStore, DimRecord, StorageError, TilingError, verify_tiling};

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
    Ok(
        fold_partitions_reading(archive, settings, partitions, cutoff)
            .await?
            .0,
    )
}

/// Like [`fold_partitions`], with the segments read (paths, rows, content hashes).
pub async fn fold_partitions_reading(
    archive: &ArchiveStore,
    settings: Settings,
    partitions: &[u32],
    cutoff: u64,
) -> Result<(Exposure, Vec<payledger_storage::ObjectRef>), ReplayError> {
    let watermarks = checked_watermarks(archive, cutoff).await?;
    let mut exposure = Exposure::new(settings);
    let mut read = Vec::new();
    for &partition in partitions {
        let segments = archive.event_segments(partition).await?;
        verify_tiling(&segments, &watermarks, cutoff)
            .map_err(|source| ReplayError::Tiling { partition, source })?;
        // Segment names sort by range, and each segment is sorted by sequence.
        for cut in segments.into_iter().filter(|s| s.last <= cutoff) {
            let (records, info) = archive.read_events_with_info(partition, cut).await?;
            for record in &records {
                exposure.apply(partition, record)?;
            }
            read.push(info.into());
        }
    }
    Ok((exposure, read))
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
    pub from_day: payledger_semantics::Day,
    pub to_day: payledger_semantics::Day,
    /// A watermark of the archive; None: the highest.
    pub cutoff: Option<u64>,
}

/// Replays every partition in this process and commits the snapshot: fold the
/// archive from its beginning through the cutoff (closing balances are cumulative),
/// keep the rows of the day range, write one part per partition, then commit.
pub async fn replay_and_commit(
    archive: &ArchiveStore,
    snapshots: &payledger_storage::SnapshotStore,
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
        let (folded, read) =
            fold_partitions_reading(archive, settings, &[partition], cutoff).await?;
        let rows: Vec<_> = folded
            .daily_rows()
            .into_iter()
            .filter(|r| request.from_day <= r.day && r.day <= request.to_day)
            .collect();
        parts.push(
            snapshots
                .put_part(&snapshot_id, partition, &rows)
                .await?
                .into(),
        );
        segments_read.extend(read);
        on_partition(partition);
    }
    let draft = payledger_storage::CommitDraft {
        snapshot_id,
        replay_id: request.replay_id.clone(),
        from_day: request.from_day,
        to_day: request.to_day,
        log_cutoff: cutoff,
        semantics_version: payledger_semantics::SEMANTICS_VERSION,
        settings_fingerprint: settings.fingerprint(),
        partitions: settings.partitions,
        parts,
        segments_read,
    };
    Ok(snapshots.commit(draft).await?)
}
