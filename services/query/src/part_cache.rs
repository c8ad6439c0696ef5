//! Committed snapshot parts, decoded, in a foyer hybrid cache (memory + local disk).
//!
//! A part (`tables/merchant_exposure_daily/snapshots/{snapshot_id}/p{N}.parquet`) is
//! immutable under a unique name (docs/storage.md), so a cached part is never
//! invalidated: its key names the same rows forever.
//!
//! * The memory tier holds the decoded rows behind an `Arc`, shared with the requests
//!   reading them; a merchant-day is found by binary search, since parts are sorted by
//!   (merchant_id, day, currency) (`SnapshotStore::put_part`).
//! * The disk tier, when a directory is configured, holds the same rows encoded
//!   (postcard, behind a format byte; foyer adds a checksum). A part is written there
//!   when it is first read from object storage (write on insertion, not on eviction),
//!   so neither a memory eviction nor a restart, even an unclean one, sends the next
//!   read back to object storage.
//!
//! The disk tier is a cache, best effort: foyer drops an entry it cannot queue at once
//! (more parts arriving together than its write buffer holds), and a part whose
//! encoding is larger than a disk block is kept in memory only (counted as
//! `parts_memory_only`). Either is simply read from object storage again when next
//! needed. Concurrent reads of one uncached part share a single object-storage read.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use foyer::{
    BlockEngineConfig, Code, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, HybridCacheProperties, Location, LruConfig, RecoverMode, Source,
    StorageFilter,
};
use payledger_semantics::{DailyRow, Day};
use payledger_storage::SnapshotStore;

const MIB: u64 = 1 << 20;
/// Smallest memory tier accepted: less would hold no realistic part.
pub const MIN_MEMORY_BYTES: u64 = MIB;
/// Smallest disk tier accepted: 16 blocks of the smallest block size.
pub const MIN_DISK_BYTES: u64 = 16 * MIB;
/// First byte of every encoded part; a disk tier written by another encoding reads
/// as a miss, never as wrong rows.
const ENCODING_V1: u8 = 1;
/// foyer's per-block index plus the entry header, taken off the block size to get the
/// largest entry a block can hold.
const BLOCK_OVERHEAD: usize = 8 * 1024;

/// How large each tier may grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartCacheConfig {
    /// Bytes of decoded rows kept in memory.
    pub memory_bytes: u64,
    /// The local disk tier; none keeps the cache in memory only.
    pub disk: Option<DiskTier>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskTier {
    /// A directory only this process uses (it is locked while the cache is open).
    pub dir: PathBuf,
    /// Bytes of local disk the tier may fill.
    pub bytes: u64,
}

impl DiskTier {
    /// The disk block: the unit foyer writes and evicts, and the largest entry it
    /// stores. 1/64 of the tier, between 1 MiB and 64 MiB; foyer keeps two buffers of
    /// this size in memory for writing.
    fn block_bytes(&self) -> usize {
        let block = (self.bytes / 64).clamp(MIB, 64 * MIB);
        usize::try_from(block).unwrap_or(usize::MAX)
    }
}

/// Checks a memory tier size (a flag value, or a config built in code).
pub fn check_memory_bytes(bytes: u64) -> Result<u64, String> {
    if bytes < MIN_MEMORY_BYTES {
        return Err(format!(
            "{bytes} bytes is below the minimum of 1MiB for the memory tier"
        ));
    }
    usize::try_from(bytes)
        .map(|_| bytes)
        .map_err(|_| format!("{bytes} bytes does not fit this machine's address space"))
}

/// Checks a disk tier size.
pub fn check_disk_bytes(bytes: u64) -> Result<u64, String> {
    if bytes < MIN_DISK_BYTES {
        return Err(format!(
            "{bytes} bytes is below the minimum of 16MiB for the disk tier"
        ));
    }
    usize::try_from(bytes)
        .map(|_| bytes)
        .map_err(|_| format!("{bytes} bytes does not fit this machine's address space"))
}

#[derive(Debug, thiserror::Error)]
pub enum PartCacheError {
    #[error("part cache: {0}")]
    Config(String),
    #[error("part cache disk directory {dir}: {message}")]
    Disk { dir: PathBuf, message: String },
    #[error("reading snapshot '{snapshot_id}' part p{partition}: {message}")]
    Read {
        snapshot_id: String,
        partition: u32,
        message: String,
    },
}

/// How often reads were answered from each tier. Plain atomic counters, so a metrics
/// exporter or a benchmark can read them while the service runs.
#[derive(Debug, Default)]
pub struct PartCacheCounters {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    parts_memory_only: AtomicU64,
}

/// A reading of [`PartCacheCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartCacheStats {
    /// Reads answered from decoded rows in memory (or from the disk tier's write
    /// queue, before the write completes).
    pub memory_hits: u64,
    /// Reads answered from the local disk tier (decoded again, then kept in memory).
    pub disk_hits: u64,
    /// Reads that went to object storage, failed ones included (and reads that
    /// waited on another read of the same part).
    pub misses: u64,
    /// Parts read from object storage whose encoding was too large for a disk block.
    pub parts_memory_only: u64,
}

impl PartCacheStats {
    /// Share of reads not sent to object storage; NaN before the first read.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.memory_hits + self.disk_hits;
        hits as f64 / (hits + self.misses) as f64
    }
}

impl PartCacheCounters {
    pub fn cache_stats(&self) -> PartCacheStats {
        PartCacheStats {
            memory_hits: self.memory_hits.load(Ordering::Relaxed),
            disk_hits: self.disk_hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            parts_memory_only: self.parts_memory_only.load(Ordering::Relaxed),
        }
    }
}

/// The cache key: one partition's part of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PartKey {
    snapshot_id: String,
    partition: u32,
}

fn io(e: std::io::Error) -> foyer::Error {
    foyer::Error::io_error(e)
}

impl Code for PartKey {
    fn encode(&self, writer: &mut impl std::io::Write) -> foyer::Result<()> {
        let id = self.snapshot_id.as_bytes();
        writer
            .write_all(&(id.len() as u32).to_le_bytes())
            .map_err(io)?;
        writer.write_all(id).map_err(io)?;
        writer.write_all(&self.partition.to_le_bytes()).map_err(io)
    }

    fn decode(reader: &mut impl std::io::Read) -> foyer::Result<Self> {
        let mut word = [0u8; 4];
        reader.read_exact(&mut word).map_err(io)?;
        let mut id = vec![0u8; u32::from_le_bytes(word) as usize];
        reader.read_exact(&mut id).map_err(io)?;
        reader.read_exact(&mut word).map_err(io)?;
        let snapshot_id = String::from_utf8(id).map_err(|e| {
            foyer::Error::new(foyer::ErrorKind::Parse, "snapshot id is not UTF-8").with_source(e)
        })?;
        Ok(PartKey {
            snapshot_id,
            partition: u32::from_le_bytes(word),
        })
    }

    fn estimated_size(&self) -> usize {
        8 + self.snapshot_id.len()
    }
}

/// A decoded part, as the memory tier holds it.
#[derive(Debug)]
struct CachedPart {
    rows: Arc<Vec<DailyRow>>,
    /// Bytes of memory the rows take (the memory tier's weight).
    memory_bytes: usize,
    /// Exact length of the encoding (format byte + postcard).
    encoded_bytes: usize,
}

impl CachedPart {
    fn new(rows: Vec<DailyRow>) -> Result<Self, postcard::Error> {
        let memory_bytes = std::mem::size_of::<Self>()
            + rows.capacity() * std::mem::size_of::<DailyRow>()
            + rows.iter().map(|r| r.merchant_id.capacity()).sum::<usize>();
        let encoded_bytes = 1 + postcard::serialize_with_flavor::<_, _, usize>(
            &rows,
            postcard::ser_flavors::Size::default(),
        )?;
        Ok(CachedPart {
            rows: Arc::new(rows),
            memory_bytes,
            encoded_bytes,
        })
    }
}

impl Code for CachedPart {
    fn encode(&self, writer: &mut impl std::io::Write) -> foyer::Result<()> {
        writer.write_all(&[ENCODING_V1]).map_err(io)?;
        postcard::to_io(self.rows.as_ref(), writer)
            .map(|_| ())
            .map_err(|e| match e {
                // foyer hands a bounded buffer; running out of it is how it learns
                // that the entry does not fit.
                postcard::Error::SerializeBufferFull => {
                    foyer::Error::new(foyer::ErrorKind::BufferSizeLimit, "part too large")
                }
                e => foyer::Error::new(foyer::ErrorKind::Parse, "encoding part").with_source(e),
            })
    }

    fn decode(reader: &mut impl std::io::Read) -> foyer::Result<Self> {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).map_err(io)?;
        let parse = |message: &'static str| foyer::Error::new(foyer::ErrorKind::Parse, message);
        let Some((&ENCODING_V1, body)) = bytes.split_first() else {
            return Err(parse("unknown part encoding"));
        };
        let mut rows: Vec<DailyRow> =
            postcard::from_bytes(body).map_err(|e| parse("decoding part").with_source(e))?;
        // Decoding grows the vector by doubling; the memory tier weighs what is kept.
        rows.shrink_to_fit();
        CachedPart::new(rows).map_err(|e| parse("sizing part").with_source(e))
    }

    fn estimated_size(&self) -> usize {
        self.encoded_bytes
    }
}

/// The rows of one merchant-day in a part sorted by (merchant_id, day, currency).
pub fn merchant_day<'a>(part: &'a [DailyRow], merchant_id: &str, day: Day) -> &'a [DailyRow] {
    let start = part.partition_point(|r| (r.merchant_id.as_str(), r.day) < (merchant_id, day));
    let len = part[start..].partition_point(|r| r.merchant_id == merchant_id && r.day == day);
    &part[start..start + len]
}

/// Snapshot parts read through the hybrid cache.
pub struct PartCache {
    cache: HybridCache<PartKey, CachedPart>,
    snapshots: SnapshotStore,
    counters: Arc<PartCacheCounters>,
    /// Largest entry (key and part, encoded) the disk tier stores; 0 without one.
    max_disk_entry: usize,
    /// Held for the cache's lifetime: two processes writing one directory would
    /// corrupt each other's entries.
    _dir_lock: Option<File>,
}

impl PartCache {
    /// Opens the cache; with a disk tier, recovers what an earlier process left in it.
    pub async fn open(
        config: &PartCacheConfig,
        snapshots: SnapshotStore,
        counters: Arc<PartCacheCounters>,
    ) -> Result<Self, PartCacheError> {
        let memory_bytes =
            check_memory_bytes(config.memory_bytes).map_err(PartCacheError::Config)? as usize;
        let memory = HybridCacheBuilder::<PartKey, CachedPart>::new()
            .with_name("payledger-query-parts")
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .with_flush_on_close(false)
            .memory(memory_bytes)
            // Parts are few and large: one shard, so the whole budget serves any part
            // (foyer splits the capacity evenly between shards).
            .with_shards(1)
            .with_eviction_config(LruConfig::default())
            .with_weighter(|_, part: &CachedPart| part.memory_bytes)
            .storage();
        let Some(disk) = &config.disk else {
            let cache = memory
                .build()
                .await
                .map_err(|e| PartCacheError::Config(e.to_string()))?;
            return Ok(PartCache {
                cache,
                snapshots,
                counters,
                max_disk_entry: 0,
                _dir_lock: None,
            });
        };
        let disk_bytes = check_disk_bytes(disk.bytes).map_err(PartCacheError::Config)? as usize;
        let disk_err = |message: String| PartCacheError::Disk {
            dir: disk.dir.clone(),
            message,
        };
        std::fs::create_dir_all(&disk.dir).map_err(|e| disk_err(format!("cannot create: {e}")))?;
        let lock = File::create(disk.dir.join("payledger-query.lock"))
            .map_err(|e| disk_err(format!("cannot write: {e}")))?;
        lock.try_lock().map_err(|e| {
            disk_err(format!(
                "in use by another process ({e}); give each query process its own directory"
            ))
        })?;
        let device = FsDeviceBuilder::new(&disk.dir)
            .with_capacity(disk_bytes)
            .build()
            .map_err(|e| disk_err(e.to_string()))?;
        let block = disk.block_bytes();
        let max_disk_entry = block - BLOCK_OVERHEAD;
        let engine = BlockEngineConfig::new(device)
            .with_block_size(block)
            // One flusher whose buffer holds a whole block, so any part that fits a
            // block can be queued.
            .with_flushers(1)
            .with_buffer_pool_size(block)
            .with_submit_queue_size_threshold(2 * block)
            .with_admission_filter(
                StorageFilter::new().with_condition(foyer::EstimatedSize::new(..=max_disk_entry)),
            );
        let cache = memory
            .with_engine_config(engine)
            .with_recover_mode(RecoverMode::Quiet)
            .build()
            .await
            .map_err(|e| disk_err(e.to_string()))?;
        tracing::info!(
            dir = %disk.dir.display(),
            disk_bytes,
            block_bytes = block,
            memory_bytes,
            "snapshot part cache on memory and disk"
        );
        Ok(PartCache {
            cache,
            snapshots,
            counters,
            max_disk_entry,
            _dir_lock: Some(lock),
        })
    }

    /// One partition's part of a committed snapshot: from memory, else the disk tier,
    /// else object storage.
    pub async fn part(
        &self,
        snapshot_id: &str,
        partition: u32,
    ) -> Result<Arc<Vec<DailyRow>>, PartCacheError> {
        let key = PartKey {
            snapshot_id: snapshot_id.to_string(),
            partition,
        };
        // Memory first, outside `get_or_fetch`: foyer 0.22.6 queues an entry for the
        // disk tier again on every `get_or_fetch` that finds it in memory under
        // write-on-insertion (foyer-rs/foyer#1351), re-encoding the part on each read.
        if let Some(entry) = self.cache.memory().get(&key) {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(entry.rows.clone());
        }
        let fetch = {
            let snapshots = self.snapshots.clone();
            let counters = self.counters.clone();
            let snapshot_id = key.snapshot_id.clone();
            let max_disk_entry = self.max_disk_entry;
            let key_bytes = key.estimated_size();
            move || async move {
                let rows = snapshots.read_part(&snapshot_id, partition).await?;
                let part = CachedPart::new(rows)?;
                let mut properties = HybridCacheProperties::default();
                if max_disk_entry > 0 && key_bytes + part.encoded_bytes > max_disk_entry {
                    counters.parts_memory_only.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        snapshot = %snapshot_id,
                        partition,
                        encoded_bytes = part.encoded_bytes,
                        max_disk_entry,
                        "snapshot part larger than a disk block; cached in memory only (raise --cache-disk-bytes)"
                    );
                    properties = properties.with_location(Location::InMem);
                }
                anyhow::Ok((part, properties))
            }
        };
        let entry = self
            .cache
            .get_or_fetch(&key, fetch)
            .await
            .inspect_err(|_| {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            })
            .map_err(|e| PartCacheError::Read {
                snapshot_id: snapshot_id.to_string(),
                partition,
                message: match e.source() {
                    Some(source) => format!("{source:#}"),
                    None => e.to_string(),
                },
            })?;
        let counter = match entry.source() {
            Source::Memory => &self.counters.memory_hits,
            Source::Disk => &self.counters.disk_hits,
            Source::Outer => &self.counters.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(entry.rows.clone())
    }

    pub fn cache_stats(&self) -> PartCacheStats {
        self.counters.cache_stats()
    }

    /// Waits until the parts queued for the disk tier so far are written. Until then
    /// a read of such a part is answered from the write queue, which counts as a
    /// memory hit; tests and benchmarks wait here to see the disk tier alone.
    pub async fn wait_for_disk_writes(&self) {
        self.cache.storage().wait().await;
    }

    /// Waits for parts queued for the disk tier to be written, and stops it.
    pub async fn close(&self) -> Result<(), PartCacheError> {
        self.cache
            .close()
            .await
            .map_err(|e| PartCacheError::Config(format!("closing: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use payledger_semantics::Currency;

    use super::*;

    fn row(merchant: &str, day: i32, currency: &str) -> DailyRow {
        DailyRow {
            merchant_id: merchant.into(),
            day: Day(day),
            currency: Currency::parse(currency).expect("currency"),
            closing_minor: -170_141_183_460_469_231_731_687_303_715_884_105_728,
            peak_minor: 12,
            peak_bucket_start_us: 3,
            applied: 4,
            duplicates: 5,
            conflicts: 6,
            late: 7,
            restated: true,
            log_position: u64::MAX,
            semantics_version: 1,
        }
    }

    #[test]
    fn merchant_day_finds_every_currency_and_nothing_else() {
        let part = vec![
            row("a", 1, "EUR"),
            row("a", 2, "EUR"),
            row("a", 2, "USD"),
            row("ab", 2, "EUR"),
            row("b", 1, "GBP"),
        ];
        assert_eq!(merchant_day(&part, "a", Day(2)), &part[1..3]);
        assert_eq!(merchant_day(&part, "ab", Day(2)), &part[3..4]);
        assert_eq!(merchant_day(&part, "b", Day(1)), &part[4..5]);
        assert!(merchant_day(&part, "a", Day(3)).is_empty());
        assert!(merchant_day(&part, "", Day(1)).is_empty());
        assert!(merchant_day(&part, "c", Day(1)).is_empty());
        assert!(merchant_day(&[], "a", Day(1)).is_empty());
    }

    #[test]
    fn encoding_round_trips_and_states_its_length() {
        let part =
            CachedPart::new(vec![row("m-1", 19_000, "EUR"), row("m:2", -5, "JPY")]).expect("part");
        let mut bytes = Vec::new();
        part.encode(&mut bytes).expect("encode");
        assert_eq!(bytes.len(), part.estimated_size());
        let back = CachedPart::decode(&mut bytes.as_slice()).expect("decode");
        assert_eq!(back.rows, part.rows);
        assert_eq!(back.memory_bytes, part.memory_bytes);

        let key = PartKey {
            snapshot_id: "replay-7".into(),
            partition: 15,
        };
        let mut bytes = Vec::new();
        key.encode(&mut bytes).expect("encode key");
        assert_eq!(bytes.len(), key.estimated_size());
        assert_eq!(PartKey::decode(&mut bytes.as_slice()).expect("key"), key);
    }

    #[test]
    fn another_encoding_is_refused_not_misread() {
        let part = CachedPart::new(vec![row("m", 1, "EUR")]).expect("part");
        let mut bytes = Vec::new();
        part.encode(&mut bytes).expect("encode");
        bytes[0] = ENCODING_V1 + 1;
        assert!(CachedPart::decode(&mut bytes.as_slice()).is_err());
    }

    #[test]
    fn a_too_small_buffer_is_reported_as_such() {
        let part = CachedPart::new(vec![row("m", 1, "EUR"); 100]).expect("part");
        let mut buffer = [0u8; 64];
        let e = part
            .encode(&mut buffer.as_mut_slice())
            .expect_err("too small");
        assert_eq!(e.kind(), foyer::ErrorKind::BufferSizeLimit);
    }

    #[tokio::test]
    async fn reads_from_memory_do_not_write_the_part_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = payledger_storage::open_store(&dir.path().join("store").display().to_string())
            .expect("store");
        let snapshots = SnapshotStore::new(store);
        let rows: Vec<DailyRow> = (0..1000)
            .map(|i| row(&format!("m{i:04}"), 1, "EUR"))
            .collect();
        snapshots.put_part("s1", 0, &rows).await.expect("put");
        let cache = PartCache::open(
            &PartCacheConfig {
                memory_bytes: 64 * MIB,
                disk: Some(DiskTier {
                    dir: dir.path().join("cache"),
                    bytes: 16 * MIB,
                }),
            },
            snapshots,
            Arc::default(),
        )
        .await
        .expect("open");
        let written = || cache.cache.statistics().disk_write_bytes();
        cache.part("s1", 0).await.expect("first read");
        cache.wait_for_disk_writes().await;
        let after_first = written();
        assert!(after_first > 0, "the first read queues the part for disk");
        for _ in 0..20 {
            cache.part("s1", 0).await.expect("read");
        }
        cache.wait_for_disk_writes().await;
        assert_eq!(written(), after_first, "memory hits wrote to disk");
        assert_eq!(cache.cache_stats().memory_hits, 20);
        assert_eq!(cache.cache_stats().misses, 1);
    }

    #[test]
    fn sizes_below_the_minimums_are_refused() {
        assert!(check_memory_bytes(MIB - 1).is_err());
        assert_eq!(check_memory_bytes(MIB), Ok(MIB));
        assert!(check_disk_bytes(16 * MIB - 1).is_err());
        assert_eq!(check_disk_bytes(1 << 30), Ok(1 << 30));
    }

    #[test]
    fn blocks_are_a_64th_of_the_disk_tier_within_bounds() {
        let tier = |bytes| DiskTier {
            dir: PathBuf::new(),
            bytes,
        };
        assert_eq!(tier(16 * MIB).block_bytes(), MIB as usize);
        assert_eq!(tier(1 << 30).block_bytes(), 16 * MIB as usize);
        assert_eq!(tier(1 << 40).block_bytes(), 64 * MIB as usize);
    }
}
