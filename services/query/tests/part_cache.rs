//! The snapshot part cache over a real local object store: parts written and committed
//! with `SnapshotStore`, then read through the cache, with the objects deleted under it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use payledger_query::part_cache::{PartCacheError, merchant_day};
use payledger_query::{DiskTier, PartCache, PartCacheConfig, PartCacheCounters};
use payledger_semantics::{Currency, DailyRow, Day};
use payledger_storage::{CommitDraft, ObjectRef, SnapshotStore, open_store};

const MIB: u64 = 1 << 20;

fn row(merchant: usize, day: i32, currency: &str) -> DailyRow {
    DailyRow {
        merchant_id: format!("merchant-{merchant:05}"),
        day: Day(day),
        currency: Currency::parse(currency).expect("currency"),
        closing_minor: merchant as i128 * 1_000 - 7,
        peak_minor: i128::MAX - merchant as i128,
        peak_bucket_start_us: i64::from(day) * 86_400_000_000 + 900_000_000,
        applied: merchant as u64 + 3,
        duplicates: 1,
        conflicts: 2,
        late: 4,
        restated: merchant.is_multiple_of(3),
        log_position: 10_000 + merchant as u64,
        semantics_version: 1,
    }
}

/// `merchants` × 3 days × 2 currencies, shuffled out of order (put_part sorts them).
fn rows(merchants: usize) -> Vec<DailyRow> {
    let mut out = Vec::new();
    for day in (20_000..20_003).rev() {
        for m in (0..merchants).rev() {
            for currency in ["USD", "EUR"] {
                out.push(row(m, day, currency));
            }
        }
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    snapshots: SnapshotStore,
}

impl Fixture {
    /// Writes `parts` parts of snapshot `snap-1` of `merchants` merchants each, and
    /// commits it.
    async fn new(parts: u32, merchants: usize) -> anyhow::Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("store");
        let snapshots = SnapshotStore::new(open_store(&root.display().to_string())?);
        let mut refs = Vec::new();
        for p in 0..parts {
            refs.push(ObjectRef::from(
                snapshots.put_part("snap-1", p, &rows(merchants)).await?,
            ));
        }
        snapshots
            .commit(CommitDraft {
                snapshot_id: "snap-1".into(),
                replay_id: "replay-1".into(),
                from_day: Day(20_000),
                to_day: Day(20_002),
                log_cutoff: 99_999,
                semantics_version: 1,
                version_key: "test".into(),
                partitions: parts,
                parts: refs,
                segments_read: Vec::new(),
                states: Vec::new(),
            })
            .await?;
        Ok(Fixture {
            root,
            snapshots,
            _dir: dir,
        })
    }

    fn cache_dir(&self) -> PathBuf {
        self.root.with_file_name("cache")
    }

    fn delete_part(&self, partition: u32) -> anyhow::Result<()> {
        std::fs::remove_file(self.root.join(format!(
            "tables/merchant_exposure_daily/snapshots/snap-1/p{partition}.parquet"
        )))?;
        Ok(())
    }

    async fn cache(
        &self,
        memory_bytes: u64,
        disk: Option<&Path>,
    ) -> anyhow::Result<(PartCache, Arc<PartCacheCounters>)> {
        let counters = Arc::new(PartCacheCounters::default());
        let config = PartCacheConfig {
            memory_bytes,
            disk: disk.map(|dir| DiskTier {
                dir: dir.to_path_buf(),
                bytes: 16 * MIB,
            }),
        };
        let cache = PartCache::open(&config, self.snapshots.clone(), counters.clone()).await?;
        Ok((cache, counters))
    }
}

fn sorted(mut rows: Vec<DailyRow>) -> Vec<DailyRow> {
    rows.sort_by(|a, b| {
        (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
    });
    rows
}

#[tokio::test]
async fn a_row_read_through_the_cache_equals_the_row_written() -> anyhow::Result<()> {
    let f = Fixture::new(1, 50).await?;
    let commits = f.snapshots.commits().await?;
    assert_eq!(commits.len(), 1);
    let (cache, counters) = f.cache(64 * MIB, None).await?;

    let part = cache.part(&commits[0].draft.snapshot_id, 0).await?;
    assert_eq!(*part, sorted(rows(50)));
    let found = merchant_day(&part, "merchant-00017", Day(20_001));
    assert_eq!(found, [row(17, 20_001, "EUR"), row(17, 20_001, "USD")]);
    assert!(merchant_day(&part, "merchant-00017", Day(20_003)).is_empty());
    assert!(merchant_day(&part, "merchant-00050", Day(20_001)).is_empty());

    let stats = counters.cache_stats();
    assert_eq!(
        (stats.memory_hits, stats.disk_hits, stats.misses),
        (0, 0, 1)
    );
    Ok(())
}

#[tokio::test]
async fn a_part_read_once_is_served_after_its_object_is_deleted() -> anyhow::Result<()> {
    let f = Fixture::new(2, 50).await?;
    let (cache, counters) = f.cache(64 * MIB, None).await?;
    let first = cache.part("snap-1", 0).await?;
    f.delete_part(0)?;
    f.delete_part(1)?;

    let again = cache.part("snap-1", 0).await?;
    assert_eq!(again, first);
    assert!(Arc::ptr_eq(&again, &first), "the decoded rows are shared");
    // The part never read is gone for good: the error names it.
    let err = cache
        .part("snap-1", 1)
        .await
        .expect_err("deleted, never cached");
    assert!(
        matches!(err, PartCacheError::Read { partition: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("p1"), "{err}");

    let stats = counters.cache_stats();
    assert_eq!(
        (stats.memory_hits, stats.disk_hits, stats.misses),
        (1, 0, 2)
    );
    Ok(())
}

#[tokio::test]
async fn a_part_evicted_from_memory_is_served_from_disk() -> anyhow::Result<()> {
    // 2 000 merchants × 6 rows: about 1.5 MiB decoded per part, so a 1 MiB memory tier
    // holds one part at a time, while the 1 MiB disk block holds either encoded part.
    let f = Fixture::new(2, 2_000).await?;
    let (cache, counters) = f.cache(MIB, Some(&f.cache_dir())).await?;
    let p0 = cache.part("snap-1", 0).await?;
    cache.part("snap-1", 1).await?; // evicts p0 from memory
    // Until written, p0 would be answered from foyer's write queue (a memory hit).
    cache.wait_for_disk_writes().await;
    f.delete_part(0)?;
    f.delete_part(1)?;

    let again = cache.part("snap-1", 0).await?;
    assert_eq!(again, p0);
    assert!(!Arc::ptr_eq(&again, &p0), "decoded afresh from disk");
    let stats = counters.cache_stats();
    assert_eq!(
        (stats.memory_hits, stats.disk_hits, stats.misses),
        (0, 1, 2)
    );
    assert_eq!(stats.parts_memory_only, 0);
    Ok(())
}

#[tokio::test]
async fn the_disk_tier_outlives_a_restart() -> anyhow::Result<()> {
    let f = Fixture::new(1, 200).await?;
    let written = {
        let (cache, _) = f.cache(64 * MIB, Some(&f.cache_dir())).await?;
        let part = cache.part("snap-1", 0).await?;
        cache.close().await?; // waits for the disk write
        part
    };
    f.delete_part(0)?;

    let (cache, counters) = f.cache(64 * MIB, Some(&f.cache_dir())).await?;
    assert_eq!(cache.part("snap-1", 0).await?, written);
    let stats = counters.cache_stats();
    assert_eq!(
        (stats.memory_hits, stats.disk_hits, stats.misses),
        (0, 1, 0)
    );
    Ok(())
}

#[tokio::test]
async fn a_part_larger_than_a_disk_block_is_kept_in_memory_only() -> anyhow::Result<()> {
    // 6 000 merchants × 6 rows encode to well over the 1 MiB block of a 16 MiB tier.
    let f = Fixture::new(1, 6_000).await?;
    {
        let (cache, counters) = f.cache(64 * MIB, Some(&f.cache_dir())).await?;
        let part = cache.part("snap-1", 0).await?;
        assert_eq!(part.len(), 36_000);
        assert_eq!(cache.part("snap-1", 0).await?, part);
        cache.close().await?;
        let stats = counters.cache_stats();
        assert_eq!(stats.parts_memory_only, 1);
        assert_eq!(
            (stats.memory_hits, stats.disk_hits, stats.misses),
            (1, 0, 1)
        );
    }
    // Not on disk: after a restart, the part has to come from object storage again.
    f.delete_part(0)?;
    let (cache, _) = f.cache(64 * MIB, Some(&f.cache_dir())).await?;
    assert!(cache.part("snap-1", 0).await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_disk_tier_resized_between_restarts_still_answers_correctly() -> anyhow::Result<()> {
    let f = Fixture::new(2, 200).await?;
    let open = |bytes: u64| {
        let config = PartCacheConfig {
            memory_bytes: 64 * MIB,
            disk: Some(DiskTier {
                dir: f.cache_dir(),
                bytes,
            }),
        };
        let snapshots = f.snapshots.clone();
        async move { PartCache::open(&config, snapshots, Arc::default()).await }
    };
    let written = {
        let cache = open(16 * MIB).await?;
        let parts = (
            cache.part("snap-1", 0).await?,
            cache.part("snap-1", 1).await?,
        );
        cache.close().await?;
        parts
    };
    // Other block sizes: what was written is either found intact or not at all.
    for bytes in [200 * MIB, 16 * MIB] {
        let cache = open(bytes).await?;
        assert_eq!(cache.part("snap-1", 0).await?, written.0);
        assert_eq!(cache.part("snap-1", 1).await?, written.1);
        cache.close().await?;
    }
    Ok(())
}

#[tokio::test]
async fn two_caches_cannot_share_a_disk_directory() -> anyhow::Result<()> {
    let f = Fixture::new(1, 10).await?;
    let _first = f.cache(64 * MIB, Some(&f.cache_dir())).await?;
    let Err(err) = f.cache(64 * MIB, Some(&f.cache_dir())).await else {
        panic!("a second cache opened the same directory");
    };
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn sizes_below_the_minimums_are_refused_with_the_reason() -> anyhow::Result<()> {
    let f = Fixture::new(1, 10).await?;
    let Err(err) = f.cache(MIB - 1, None).await else {
        panic!("a memory tier under 1MiB was accepted");
    };
    assert!(err.to_string().contains("minimum of 1MiB"), "{err}");
    let config = PartCacheConfig {
        memory_bytes: 64 * MIB,
        disk: Some(DiskTier {
            dir: f.cache_dir(),
            bytes: MIB,
        }),
    };
    let Err(err) = PartCache::open(&config, f.snapshots.clone(), Arc::default()).await else {
        panic!("a disk tier under 16MiB was accepted");
    };
    assert!(err.to_string().contains("minimum of 16MiB"), "{err}");
    Ok(())
}
