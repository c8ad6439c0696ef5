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
    let watermarks = checked_watermarks(archive, cutoff).await?;
    let mut exposure = Exposure::new(settings);
    for &partition in partitions {
        let segments = archive.event_segments(partition).await?;
        verify_tiling(&segments, &watermarks, cutoff)
            .map_err(|source| ReplayError::Tiling { partition, source })?;
        // Segment names sort by range, and each segment is sorted by sequence.
        for cut in segments.into_iter().filter(|s| s.last <= cutoff) {
            for record in archive.read_events(partition, cut).await? {
                exposure.apply(partition, &record)?;
            }
        }
    }
    Ok(exposure)
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
