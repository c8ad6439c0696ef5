//! The authoritative table `merchant_exposure_daily`: immutable snapshot parts and a
//! commit log (docs/storage.md).
//!
//! `tables/merchant_exposure_daily/snapshots/{snapshot_id}/p{N}.parquet` are
//! written once under unique names; `…/_commits/{N:020}.json` publishes a snapshot
//! with put-if-absent. Two replays racing for commit N: exactly one writes it, the
//! other re-bases onto N+1. A commit publishes the rows of its day range only: for
//! each day the commit with the highest log cutoff covering it wins (the higher
//! commit number on ties), so the table is the union of commits. A commit log, not
//! one pointer swapped in place, because object_store's local filesystem offers
//! put-if-absent but not compare-and-swap.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, StringBuilder, TimestampMicrosecondBuilder,
    UInt32Builder, UInt64Builder,
};
use arrow_array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use payledger_semantics::{Currency, DailyRow, Day};
use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::archive::{
    ParquetObject, SegmentInfo, column, decode_object, encode_batch, footer_matches, put_verified,
};

const TABLE: &str = "tables/merchant_exposure_daily";

/// A snapshot part or archive segment a commit names, with its content hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub path: String,
    pub rows: u64,
    pub content_hash: String,
}

impl From<SegmentInfo> for ObjectRef {
    fn from(s: SegmentInfo) -> Self {
        ObjectRef {
            path: s.path,
            rows: s.rows,
            content_hash: s.content_hash,
        }
    }
}

/// What a replay asks to publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitDraft {
    pub snapshot_id: String,
    pub replay_id: String,
    pub from_day: Day,
    pub to_day: Day,
    pub log_cutoff: u64,
    pub semantics_version: u32,
    /// The version key the rows were folded under; a commit of the first releases
    /// holds the fingerprint of all its settings here instead.
    #[serde(alias = "settings_fingerprint")]
    pub version_key: String,
    pub partitions: u32,
    pub parts: Vec<ObjectRef>,
    pub segments_read: Vec<ObjectRef>,
    /// Per partition: the state it started from (none: genesis) and the state it
    /// wrote at the cutoff. Absent in the first releases' commits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<PartitionLineage>,
}

/// Where a partition's fold in a replay began and what it left for the next one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLineage {
    pub partition: u32,
    /// None: folded from the beginning of history.
    pub started_from: Option<crate::StateRef>,
    pub written: crate::StateRef,
}

/// A published commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub number: u64,
    #[serde(flatten)]
    pub draft: CommitDraft,
}

impl Commit {
    pub fn covers(&self, day: Day) -> bool {
        self.draft.from_day <= day && day <= self.draft.to_day
    }
}

/// The commit whose rows are authoritative for `day`: the highest log cutoff among
/// those covering it, the higher commit number on ties.
pub fn commit_for_day(commits: &[Commit], day: Day) -> Option<&Commit> {
    commits
        .iter()
        .filter(|c| c.covers(day))
        .max_by_key(|c| (c.draft.log_cutoff, c.number))
}

fn snapshot_schema() -> SchemaRef {
    let minor = || DataType::Decimal128(38, 0);
    Arc::new(Schema::new(vec![
        Field::new("merchant_id", DataType::Utf8, false),
        Field::new("day", DataType::Date32, false),
        Field::new("currency", DataType::Utf8, false),
        Field::new("closing_minor", minor(), false),
        Field::new("peak_minor", minor(), false),
        Field::new(
            "peak_bucket_start",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("applied", DataType::UInt64, false),
        Field::new("duplicates", DataType::UInt64, false),
        Field::new("conflicts", DataType::UInt64, false),
        Field::new("late", DataType::UInt64, false),
        Field::new("restated", DataType::Boolean, false),
        Field::new("log_position", DataType::UInt64, false),
        Field::new("semantics_version", DataType::UInt32, false),
    ]))
}

fn rows_batch(rows: &[DailyRow]) -> Result<(RecordBatch, String), StorageError> {
    let bad = |e: arrow_schema::ArrowError| StorageError::Corrupt {
        path: "snapshot batch".into(),
        message: e.to_string(),
    };
    let mut merchant = StringBuilder::new();
    let mut day = Date32Builder::new();
    let mut currency = StringBuilder::new();
    let mut closing = Decimal128Builder::new()
        .with_precision_and_scale(38, 0)
        .map_err(bad)?;
    let mut peak = Decimal128Builder::new()
        .with_precision_and_scale(38, 0)
        .map_err(bad)?;
    let mut peak_at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let (mut applied, mut duplicates, mut conflicts, mut late, mut position) = (
        UInt64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
    );
    let mut restated = BooleanBuilder::new();
    let mut version = UInt32Builder::new();
    let mut hash = Vec::with_capacity(rows.len() * 96);
    for r in rows {
        merchant.append_value(&r.merchant_id);
        day.append_value(r.day.0);
        currency.append_value(r.currency.as_str());
        closing.append_value(r.closing_minor);
        peak.append_value(r.peak_minor);
        peak_at.append_value(r.peak_bucket_start_us);
        applied.append_value(r.applied);
        duplicates.append_value(r.duplicates);
        conflicts.append_value(r.conflicts);
        late.append_value(r.late);
        restated.append_value(r.restated);
        position.append_value(r.log_position);
        version.append_value(r.semantics_version);
        hash.extend_from_slice(&(r.merchant_id.len() as u32).to_le_bytes());
        hash.extend_from_slice(r.merchant_id.as_bytes());
        hash.extend_from_slice(&r.day.0.to_le_bytes());
        hash.extend_from_slice(r.currency.as_str().as_bytes());
        for v in [r.closing_minor, r.peak_minor] {
            hash.extend_from_slice(&v.to_le_bytes());
        }
        hash.extend_from_slice(&r.peak_bucket_start_us.to_le_bytes());
        for v in [r.applied, r.duplicates, r.conflicts, r.late, r.log_position] {
            hash.extend_from_slice(&v.to_le_bytes());
        }
        hash.push(u8::from(r.restated));
        hash.extend_from_slice(&r.semantics_version.to_le_bytes());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(merchant.finish()),
        Arc::new(day.finish()),
        Arc::new(currency.finish()),
        Arc::new(closing.finish()),
        Arc::new(peak.finish()),
        Arc::new(peak_at.finish()),
        Arc::new(applied.finish()),
        Arc::new(duplicates.finish()),
        Arc::new(conflicts.finish()),
        Arc::new(late.finish()),
        Arc::new(restated.finish()),
        Arc::new(position.finish()),
        Arc::new(version.finish()),
    ];
    let batch = RecordBatch::try_new(snapshot_schema(), columns).map_err(bad)?;
    Ok((
        batch,
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&hash)),
    ))
}

#[derive(Clone)]
pub struct SnapshotStore {
    store: Arc<dyn ObjectStore>,
}

fn part_path(snapshot_id: &str, partition: u32) -> Path {
    Path::from(format!(
        "{TABLE}/snapshots/{snapshot_id}/p{partition}.parquet"
    ))
}

fn reconciliation_path(number: u64) -> Path {
    Path::from(format!("{TABLE}/_reconciliation/{number:020}.json"))
}

fn commit_path(number: u64) -> Path {
    Path::from(format!("{TABLE}/_commits/{number:020}.json"))
}

impl SnapshotStore {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self { store }
    }

    /// Writes one partition's rows into a staging snapshot (rows sorted by
    /// merchant_id, day, currency). A rewrite must hold the same content.
    pub async fn put_part(
        &self,
        snapshot_id: &str,
        partition: u32,
        rows: &[DailyRow],
    ) -> Result<SegmentInfo, StorageError> {
        let mut sorted = rows.to_vec();
        sorted.sort_by(|a, b| {
            (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
        });
        let (batch, hash) = rows_batch(&sorted)?;
        let bytes = encode_batch(&batch, &hash, None)?;
        put_verified(
            &self.store,
            part_path(snapshot_id, partition),
            bytes,
            sorted.len() as u64,
            hash,
        )
        .await
    }

    /// Reads a part back, verifying its footer.
    pub async fn read_part(
        &self,
        snapshot_id: &str,
        partition: u32,
    ) -> Result<Vec<DailyRow>, StorageError> {
        Ok(self.read_part_with_info(snapshot_id, partition).await?.0)
    }

    /// Reads a part back, verifying its footer against its data, with its path, row
    /// count and content hash: how a coordinator checks a worker's report.
    pub async fn read_part_with_info(
        &self,
        snapshot_id: &str,
        partition: u32,
    ) -> Result<(Vec<DailyRow>, SegmentInfo), StorageError> {
        let path = part_path(snapshot_id, partition);
        let bad = |message: String| StorageError::Corrupt {
            path: path.to_string(),
            message,
        };
        let bytes = self.store.get(&path).await?.bytes().await?;
        let ParquetObject {
            batches,
            rows,
            hash,
            ..
        } = decode_object(path.as_ref(), bytes)?;
        let mut out = Vec::with_capacity(rows as usize);
        for batch in batches {
            let merchant = column::<StringArray>(&batch, "merchant_id", &path)?;
            let day = column::<Date32Array>(&batch, "day", &path)?;
            let currency = column::<StringArray>(&batch, "currency", &path)?;
            let closing = column::<Decimal128Array>(&batch, "closing_minor", &path)?;
            let peak = column::<Decimal128Array>(&batch, "peak_minor", &path)?;
            let peak_at = column::<TimestampMicrosecondArray>(&batch, "peak_bucket_start", &path)?;
            let applied = column::<UInt64Array>(&batch, "applied", &path)?;
            let duplicates = column::<UInt64Array>(&batch, "duplicates", &path)?;
            let conflicts = column::<UInt64Array>(&batch, "conflicts", &path)?;
            let late = column::<UInt64Array>(&batch, "late", &path)?;
            let restated = column::<BooleanArray>(&batch, "restated", &path)?;
            let position = column::<UInt64Array>(&batch, "log_position", &path)?;
            let version = column::<UInt32Array>(&batch, "semantics_version", &path)?;
            for i in 0..batch.num_rows() {
                out.push(DailyRow {
                    merchant_id: merchant.value(i).to_string(),
                    day: Day(day.value(i)),
                    currency: Currency::parse(currency.value(i)).map_err(|e| bad(e.to_string()))?,
                    closing_minor: closing.value(i),
                    peak_minor: peak.value(i),
                    peak_bucket_start_us: peak_at.value(i),
                    applied: applied.value(i),
                    duplicates: duplicates.value(i),
                    conflicts: conflicts.value(i),
                    late: late.value(i),
                    restated: restated.value(i),
                    log_position: position.value(i),
                    semantics_version: version.value(i),
                });
            }
        }
        let (_, recomputed) = rows_batch(&out)?;
        let info = footer_matches(&path, rows, hash, out.len(), recomputed)?;
        Ok((out, info))
    }

    /// Stores the reconciliation report of commit `number` (JSON), replacing an
    /// earlier one: a report is recomputed, never merged.
    pub async fn put_reconciliation(
        &self,
        number: u64,
        report: Vec<u8>,
    ) -> Result<String, StorageError> {
        let path = reconciliation_path(number);
        self.store.put(&path, PutPayload::from(report)).await?;
        Ok(path.to_string())
    }

    /// The stored reconciliation report of commit `number`, if any.
    pub async fn reconciliation(&self, number: u64) -> Result<Option<Vec<u8>>, StorageError> {
        match self.store.get(&reconciliation_path(number)).await {
            Ok(object) => Ok(Some(object.bytes().await?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every commit, by number.
    pub async fn commits(&self) -> Result<Vec<Commit>, StorageError> {
        let dir = Path::from(format!("{TABLE}/_commits"));
        let objects: Vec<_> = self.store.list(Some(&dir)).try_collect().await?;
        let mut numbers: Vec<u64> = objects
            .iter()
            .filter_map(|o| o.location.filename()?.strip_suffix(".json")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        let mut commits = Vec::with_capacity(numbers.len());
        for n in numbers {
            commits.push(self.read_commit(n).await?);
        }
        Ok(commits)
    }

    async fn read_commit(&self, number: u64) -> Result<Commit, StorageError> {
        let path = commit_path(number);
        let bytes = self.store.get(&path).await?.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| StorageError::Corrupt {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Publishes `draft` as the next commit. Losing the race for a number re-bases
    /// onto the next one; finding the same snapshot already committed (a retry after
    /// a lost response) returns that commit.
    pub async fn commit(&self, draft: CommitDraft) -> Result<Commit, StorageError> {
        let existing = self.commits().await?;
        if let Some(done) = existing
            .iter()
            .find(|c| c.draft.snapshot_id == draft.snapshot_id)
        {
            return Ok(done.clone());
        }
        let mut number = existing.last().map_or(1, |c| c.number + 1);
        loop {
            let commit = Commit {
                number,
                draft: draft.clone(),
            };
            let body = serde_json::to_vec_pretty(&commit).map_err(|e| StorageError::Corrupt {
                path: "commit".into(),
                message: e.to_string(),
            })?;
            let options = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&commit_path(number), PutPayload::from(body), options)
                .await
            {
                Ok(_) => return Ok(commit),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let other = self.read_commit(number).await?;
                    if other.draft.snapshot_id == draft.snapshot_id {
                        return Ok(other);
                    }
                    tracing::info!(number, snapshot = %draft.snapshot_id, "commit number taken by another replay; re-basing");
                    number += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
