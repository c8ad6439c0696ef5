//! The archive: the log written to object storage as Parquet, the long-term
//! history that replay reads (docs/storage.md).
//!
//! `archive/events/p{N}/{first:020}-{last:020}.parquet` and
//! `archive/dims/{first:020}-{last:020}.parquet` hold the records of one *cut*
//! (the sequence range `first..=last` of the whole stream, the same for every
//! partition that has records in it), and `archive/_watermarks/{last:020}` marks a
//! cut complete. A name is a function of the range, objects are put-if-absent, and a
//! rewrite is checked against the stored content hash, so completing a cut after a
//! crash is idempotent. The listing is the index: no mutable manifest.

use std::sync::Arc;

use arrow_array::builder::{
    Date32Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
    UInt32Builder, UInt64Builder,
};
use arrow_array::{
    Array, ArrayRef, Date32Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use payledger_semantics::{
    Currency, Day, EventKind, Fact, FxRecord, Rate, Record, RecordBody, RecordedStream, RiskRecord,
};

use crate::StorageError;
use crate::columns::{dims, events};

const ROWS_KEY: &str = "payledger.row_count";
const HASH_KEY: &str = "payledger.content_hash";
/// The stream settings the log was written under (docs/semantics.md R9): a replay
/// refuses an archive of another stream instead of mixing them.
const STREAM_KEY: &str = "payledger.stream_fingerprint";
/// What the first archivers wrote instead: the fingerprint of all five settings
/// under semantics 1, recognised through [`RecordedStream::accepts`].
const LEGACY_SETTINGS_KEY: &str = "payledger.settings_fingerprint";

/// The sequence range of one cut, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CutRange {
    pub first: u64,
    pub last: u64,
}

impl CutRange {
    fn file_name(&self) -> String {
        format!("{:020}-{:020}.parquet", self.first, self.last)
    }

    fn parse(name: &str) -> Option<CutRange> {
        let (first, last) = name.strip_suffix(".parquet")?.split_once('-')?;
        Some(CutRange {
            first: first.parse().ok()?,
            last: last.parse().ok()?,
        })
    }
}

/// A dimension record as archived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimRecord {
    Fx(FxRecord),
    Risk(RiskRecord),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedDim {
    pub seq: u64,
    pub ingest_time_us: i64,
    pub record: DimRecord,
}

/// A segment as written: where, how many rows, and the hash of its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: String,
    pub rows: u64,
    pub content_hash: String,
}

#[derive(Clone)]
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    stream: RecordedStream,
}

fn event_schema() -> SchemaRef {
    let utc = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new(events::SEQ, DataType::UInt64, false),
        Field::new(events::PARTITION, DataType::UInt32, false),
        Field::new(events::RECORD_TYPE, DataType::Utf8, false),
        Field::new(events::EVENT_ID, DataType::Utf8, true),
        Field::new(events::MERCHANT_ID, DataType::Utf8, true),
        Field::new(events::KIND, DataType::Utf8, true),
        Field::new(events::AMOUNT_MINOR, DataType::Int64, true),
        Field::new(events::CURRENCY, DataType::Utf8, true),
        Field::new(events::EVENT_TIME, utc(), true),
        Field::new(events::CORRECTS_EVENT_ID, DataType::Utf8, true),
        Field::new(events::INGEST_TIME, utc(), false),
    ]))
}

fn dim_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(dims::SEQ, DataType::UInt64, false),
        Field::new(dims::DIM_TYPE, DataType::Utf8, false),
        Field::new(dims::CURRENCY, DataType::Utf8, true),
        Field::new(dims::RATE, DataType::Utf8, true),
        Field::new(dims::MERCHANT_ID, DataType::Utf8, true),
        Field::new(dims::TIER, DataType::Utf8, true),
        Field::new(dims::RESERVE_BPS, DataType::Int32, true),
        Field::new(dims::EFFECTIVE_DATE, DataType::Date32, false),
        Field::new(dims::VERSION, DataType::Int32, false),
        Field::new(
            dims::INGEST_TIME,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Length-prefixed fields, so that no two contents hash the same bytes.
struct ContentHasher(Vec<u8>);

impl ContentHasher {
    fn field(&mut self, bytes: &[u8]) {
        self.0
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.0.extend_from_slice(bytes);
    }

    fn finish(&self) -> String {
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&self.0))
    }
}

fn events_batch(partition: u32, records: &[Record]) -> Result<(RecordBatch, String), StorageError> {
    let n = records.len();
    let mut seq = UInt64Builder::with_capacity(n);
    let mut part = UInt32Builder::with_capacity(n);
    let mut record_type = StringBuilder::new();
    let mut event_id = StringBuilder::new();
    let mut merchant_id = StringBuilder::new();
    let mut kind = StringBuilder::new();
    let mut amount = Int64Builder::with_capacity(n);
    let mut currency = StringBuilder::new();
    let mut event_time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut corrects = StringBuilder::new();
    let mut ingest_time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut hash = ContentHasher(Vec::with_capacity(n * 96));
    for r in records {
        seq.append_value(r.seq);
        part.append_value(partition);
        ingest_time.append_value(r.ingest_time_us);
        hash.field(&r.seq.to_le_bytes());
        hash.field(&r.ingest_time_us.to_le_bytes());
        match &r.body {
            RecordBody::Fact(f) => {
                record_type.append_value(events::FACT);
                event_id.append_value(&f.event_id);
                merchant_id.append_value(&f.merchant_id);
                kind.append_value(f.kind.as_str());
                amount.append_value(f.amount_minor);
                currency.append_value(f.currency.as_str());
                event_time.append_value(f.event_time_us);
                corrects.append_option(f.corrects_event_id.as_deref());
                for field in [
                    f.event_id.as_bytes(),
                    f.merchant_id.as_bytes(),
                    f.kind.as_str().as_bytes(),
                ] {
                    hash.field(field);
                }
                hash.field(&f.amount_minor.to_le_bytes());
                hash.field(f.currency.as_str().as_bytes());
                hash.field(&f.event_time_us.to_le_bytes());
                hash.field(f.corrects_event_id.as_deref().unwrap_or("").as_bytes());
            }
            RecordBody::Heartbeat => {
                record_type.append_value(events::HEARTBEAT);
                event_id.append_null();
                merchant_id.append_null();
                kind.append_null();
                amount.append_null();
                currency.append_null();
                event_time.append_null();
                corrects.append_null();
                hash.field(b"heartbeat");
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(seq.finish()),
        Arc::new(part.finish()),
        Arc::new(record_type.finish()),
        Arc::new(event_id.finish()),
        Arc::new(merchant_id.finish()),
        Arc::new(kind.finish()),
        Arc::new(amount.finish()),
        Arc::new(currency.finish()),
        Arc::new(event_time.finish()),
        Arc::new(corrects.finish()),
        Arc::new(ingest_time.finish()),
    ];
    let batch = RecordBatch::try_new(event_schema(), columns).map_err(corrupt("events batch"))?;
    Ok((batch, hash.finish()))
}

fn dims_batch(records: &[ArchivedDim]) -> Result<(RecordBatch, String), StorageError> {
    let n = records.len();
    let mut seq = UInt64Builder::with_capacity(n);
    let mut dim_type = StringBuilder::new();
    let mut currency = StringBuilder::new();
    let mut rate = StringBuilder::new();
    let mut merchant_id = StringBuilder::new();
    let mut tier = StringBuilder::new();
    let mut reserve_bps = Int32Builder::with_capacity(n);
    let mut effective = Date32Builder::with_capacity(n);
    let mut version = Int32Builder::with_capacity(n);
    let mut ingest_time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut hash = ContentHasher(Vec::with_capacity(n * 64));
    for d in records {
        seq.append_value(d.seq);
        ingest_time.append_value(d.ingest_time_us);
        hash.field(&d.seq.to_le_bytes());
        hash.field(&d.ingest_time_us.to_le_bytes());
        match &d.record {
            DimRecord::Fx(fx) => {
                dim_type.append_value(dims::FX);
                currency.append_value(fx.currency.as_str());
                rate.append_value(fx.rate.as_str());
                merchant_id.append_null();
                tier.append_null();
                reserve_bps.append_null();
                effective.append_value(fx.effective_day.0);
                version.append_value(fx.version);
                for field in [
                    b"fx".as_slice(),
                    fx.currency.as_str().as_bytes(),
                    fx.rate.as_str().as_bytes(),
                ] {
                    hash.field(field);
                }
                hash.field(&fx.effective_day.0.to_le_bytes());
                hash.field(&fx.version.to_le_bytes());
            }
            DimRecord::Risk(r) => {
                dim_type.append_value(dims::RISK);
                currency.append_null();
                rate.append_null();
                merchant_id.append_value(&r.merchant_id);
                tier.append_value(&r.tier);
                reserve_bps.append_value(r.reserve_bps);
                effective.append_value(r.effective_day.0);
                version.append_value(r.version);
                for field in [
                    b"risk".as_slice(),
                    r.merchant_id.as_bytes(),
                    r.tier.as_bytes(),
                ] {
                    hash.field(field);
                }
                hash.field(&r.reserve_bps.to_le_bytes());
                hash.field(&r.effective_day.0.to_le_bytes());
                hash.field(&r.version.to_le_bytes());
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(seq.finish()),
        Arc::new(dim_type.finish()),
        Arc::new(currency.finish()),
        Arc::new(rate.finish()),
        Arc::new(merchant_id.finish()),
        Arc::new(tier.finish()),
        Arc::new(reserve_bps.finish()),
        Arc::new(effective.finish()),
        Arc::new(version.finish()),
        Arc::new(ingest_time.finish()),
    ];
    let batch = RecordBatch::try_new(dim_schema(), columns).map_err(corrupt("dims batch"))?;
    Ok((batch, hash.finish()))
}

fn corrupt<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> StorageError {
    move |e| StorageError::Corrupt {
        path: what.to_string(),
        message: e.to_string(),
    }
}

pub(crate) fn encode_batch(
    batch: &RecordBatch,
    hash: &str,
    stream_fingerprint: Option<&str>,
) -> Result<Bytes, StorageError> {
    let mut metadata = vec![
        KeyValue::new(ROWS_KEY.to_string(), batch.num_rows().to_string()),
        KeyValue::new(HASH_KEY.to_string(), hash.to_string()),
    ];
    if let Some(fingerprint) = stream_fingerprint {
        metadata.push(KeyValue::new(
            STREAM_KEY.to_string(),
            fingerprint.to_string(),
        ));
    }
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(metadata))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
        .map_err(corrupt("parquet writer"))?;
    writer.write(batch).map_err(corrupt("parquet write"))?;
    writer.close().map_err(corrupt("parquet close"))?;
    Ok(Bytes::from(out))
}

/// Checks what an object's footer claims (`rows`, `hash`) against what was read
/// from its data, and describes the object.
pub(crate) fn footer_matches(
    path: &Path,
    rows: u64,
    hash: String,
    rows_read: usize,
    hash_read: String,
) -> Result<SegmentInfo, StorageError> {
    if rows_read as u64 != rows || hash_read != hash {
        return Err(StorageError::Corrupt {
            path: path.to_string(),
            message: format!(
                "footer says {rows} rows with hash {hash}, the data has {rows_read} rows with hash {hash_read}"
            ),
        });
    }
    Ok(SegmentInfo {
        path: path.to_string(),
        rows,
        content_hash: hash,
    })
}

/// A Parquet object as written by this crate: its batches and its footer's claims.
pub(crate) struct ParquetObject {
    pub batches: Vec<RecordBatch>,
    pub rows: u64,
    pub hash: String,
    pub stream_fingerprint: Option<String>,
    pub legacy_fingerprint: Option<String>,
}

/// Parses an object's footer once, then its batches.
pub(crate) fn decode_object(path: &str, bytes: Bytes) -> Result<ParquetObject, StorageError> {
    // The parquet and arrow readers panic on some malformed input (found by the
    // archive fuzz targets, README "Fuzzing") instead of returning an error. An
    // object is outside input, so such a panic is the object's corruption; the
    // decode owns everything it touches, so nothing is left half-changed.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_parquet(path, bytes)))
        .unwrap_or_else(|panic| {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(StorageError::Corrupt {
                path: path.to_string(),
                message: format!("the Parquet reader failed on it: {reason}"),
            })
        })
}

fn decode_parquet(path: &str, bytes: Bytes) -> Result<ParquetObject, StorageError> {
    let bad = |message: String| StorageError::Corrupt {
        path: path.to_string(),
        message,
    };
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| bad(e.to_string()))?;
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    let get = |key: &str| {
        kv.iter()
            .find(|k| k.key == key)
            .and_then(|k| k.value.clone())
    };
    let missing = |key: &str| bad(format!("no {key} in the footer"));
    let rows = get(ROWS_KEY)
        .ok_or_else(|| missing(ROWS_KEY))?
        .parse()
        .map_err(|_| missing(ROWS_KEY))?;
    let hash = get(HASH_KEY).ok_or_else(|| missing(HASH_KEY))?;
    let stream_fingerprint = get(STREAM_KEY);
    let legacy_fingerprint = get(LEGACY_SETTINGS_KEY);
    let batches = builder
        .build()
        .and_then(|reader| reader.collect::<Result<Vec<_>, _>>().map_err(Into::into))
        .map_err(|e| bad(e.to_string()))?;
    Ok(ParquetObject {
        batches,
        rows,
        hash,
        stream_fingerprint,
        legacy_fingerprint,
    })
}

/// Writes an encoded Parquet object put-if-absent. An object already there (a
/// rewrite after a crash) must hold the same rows and content hash, or the write is
/// refused: names are functions of content, so a difference is corruption.
pub(crate) async fn put_verified(
    store: &Arc<dyn ObjectStore>,
    path: Path,
    bytes: Bytes,
    rows: u64,
    hash: String,
) -> Result<SegmentInfo, StorageError> {
    let options = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store
        .put_opts(&path, PutPayload::from(bytes), options)
        .await
    {
        Ok(_) => {}
        Err(object_store::Error::AlreadyExists { .. }) => {
            let stored = store.get(&path).await?.bytes().await?;
            let ParquetObject {
                rows: stored_rows,
                hash: stored_hash,
                ..
            } = decode_object(path.as_ref(), stored)?;
            if (stored_rows, &stored_hash) != (rows, &hash) {
                return Err(StorageError::Corrupt {
                    path: path.to_string(),
                    message: format!(
                        "already holds {stored_rows} rows with hash {stored_hash}, the rewrite has {rows} rows with hash {hash}"
                    ),
                });
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(SegmentInfo {
        path: path.to_string(),
        rows,
        content_hash: hash,
    })
}

fn string_at(a: &StringArray, i: usize) -> Option<String> {
    (!a.is_null(i)).then(|| a.value(i).to_string())
}

/// A column of `batch` as the array type of the column contract.
pub(crate) fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a T, StorageError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| StorageError::Corrupt {
            path: path.to_string(),
            message: format!("column {name} is missing or not of its contract type"),
        })
}

impl ArchiveStore {
    /// The archive of `stream`'s log.
    pub fn new(store: Arc<dyn ObjectStore>, stream: RecordedStream) -> Self {
        Self { store, stream }
    }

    pub fn stream(&self) -> &RecordedStream {
        &self.stream
    }

    /// The object store the archive lies in (the tables and states lie there too).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    fn events_dir(partition: u32) -> Path {
        Path::from(format!("archive/events/p{partition}"))
    }

    /// Archives one partition's records of a cut (sorted by sequence, inside the range).
    pub async fn put_events(
        &self,
        partition: u32,
        cut: CutRange,
        records: &[Record],
    ) -> Result<SegmentInfo, StorageError> {
        let path = Path::from(format!("archive/events/p{partition}/{}", cut.file_name()));
        let (batch, hash) = events_batch(partition, records)?;
        put_verified(
            &self.store,
            path,
            encode_batch(&batch, &hash, Some(&self.stream.fingerprint()))?,
            records.len() as u64,
            hash,
        )
        .await
    }

    pub async fn put_dims(
        &self,
        cut: CutRange,
        records: &[ArchivedDim],
    ) -> Result<SegmentInfo, StorageError> {
        let path = Path::from(format!("archive/dims/{}", cut.file_name()));
        let (batch, hash) = dims_batch(records)?;
        put_verified(
            &self.store,
            path,
            encode_batch(&batch, &hash, Some(&self.stream.fingerprint()))?,
            records.len() as u64,
            hash,
        )
        .await
    }

    /// Marks the cut ending at `last` complete; written after all its segments.
    pub async fn put_watermark(&self, last: u64) -> Result<(), StorageError> {
        self.put_marker(Path::from(format!("archive/_watermarks/{last:020}")))
            .await
    }

    /// An empty object whose name is the fact: put-if-absent, so a rewrite after a
    /// crash is a no-op.
    async fn put_marker(&self, path: Path) -> Result<(), StorageError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from_static(b""), options)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// When the watermark `last` was written: the end of the last cut, as the
    /// object store dated it.
    pub async fn watermark_written(
        &self,
        last: u64,
    ) -> Result<std::time::SystemTime, StorageError> {
        let path = Path::from(format!("archive/_watermarks/{last:020}"));
        Ok(self.store.head(&path).await?.last_modified.into())
    }

    async fn names(&self, dir: &Path) -> Result<Vec<String>, StorageError> {
        let objects: Vec<_> = self.store.list(Some(dir)).try_collect().await?;
        let mut names: Vec<String> = objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Records that the stream had deleted before the archiver read them: the cut
    /// spanning them is not the whole history of its range (docs/storage.md).
    pub async fn put_gap(&self, lost: CutRange) -> Result<(), StorageError> {
        self.put_marker(Path::from(format!(
            "archive/_gaps/{:020}-{:020}",
            lost.first, lost.last
        )))
        .await
    }

    /// The recorded gaps (see [`ArchiveStore::put_gap`]), ascending.
    pub async fn gaps(&self) -> Result<Vec<CutRange>, StorageError> {
        Ok(self
            .names(&Path::from("archive/_gaps"))
            .await?
            .iter()
            .filter_map(|n| {
                let (first, last) = n.split_once('-')?;
                Some(CutRange {
                    first: first.parse().ok()?,
                    last: last.parse().ok()?,
                })
            })
            .collect())
    }

    /// The first recorded gap inside `after + 1..=through`: records of that range
    /// are in neither the log nor the archive.
    pub async fn gap_within(
        &self,
        after: u64,
        through: u64,
    ) -> Result<Option<CutRange>, StorageError> {
        Ok(self
            .gaps()
            .await?
            .into_iter()
            .find(|g| g.last > after && g.first <= through))
    }

    /// Every complete cut's end, ascending.
    pub async fn watermarks(&self) -> Result<Vec<u64>, StorageError> {
        Ok(self
            .names(&Path::from("archive/_watermarks"))
            .await?
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect())
    }

    /// A partition's segments, by range.
    pub async fn event_segments(&self, partition: u32) -> Result<Vec<CutRange>, StorageError> {
        Ok(self
            .names(&Self::events_dir(partition))
            .await?
            .iter()
            .filter_map(|n| CutRange::parse(n))
            .collect())
    }

    pub async fn dim_segments(&self) -> Result<Vec<CutRange>, StorageError> {
        Ok(self
            .names(&Path::from("archive/dims"))
            .await?
            .iter()
            .filter_map(|n| CutRange::parse(n))
            .collect())
    }

    async fn read(&self, path: &Path) -> Result<(Vec<RecordBatch>, u64, String), StorageError> {
        let bytes = self.store.get(path).await?.bytes().await?;
        let object = decode_object(path.as_ref(), bytes)?;
        let (stream, legacy) = (
            object.stream_fingerprint.as_deref(),
            object.legacy_fingerprint.as_deref(),
        );
        if !self.stream.accepts(stream, legacy) {
            return Err(StorageError::Corrupt {
                path: path.to_string(),
                message: format!(
                    "written for stream settings {}, this reader's stream is {} ({}); read it against the stream it was archived from",
                    stream
                        .map(str::to_string)
                        .or(legacy.map(|l| format!("{l} (a legacy fingerprint)")))
                        .unwrap_or_else(|| "(none recorded)".to_string()),
                    self.stream.fingerprint(),
                    self.stream.settings.canonical()
                ),
            });
        }
        Ok((object.batches, object.rows, object.hash))
    }

    /// Reads a partition's segment back, verifying row count and content hash.
    pub async fn read_events(
        &self,
        partition: u32,
        cut: CutRange,
    ) -> Result<Vec<Record>, StorageError> {
        Ok(self.read_events_with_info(partition, cut).await?.0)
    }

    /// Like [`ArchiveStore::read_events`], with what a commit records of the segment.
    pub async fn read_events_with_info(
        &self,
        partition: u32,
        cut: CutRange,
    ) -> Result<(Vec<Record>, SegmentInfo), StorageError> {
        let path = Path::from(format!("archive/events/p{partition}/{}", cut.file_name()));
        let bad = |message: String| StorageError::Corrupt {
            path: path.to_string(),
            message,
        };
        let (batches, rows, hash) = self.read(&path).await?;
        let mut records = Vec::with_capacity(rows as usize);
        for batch in &batches {
            let seq = column::<UInt64Array>(batch, events::SEQ, &path)?;
            let rtype = column::<StringArray>(batch, events::RECORD_TYPE, &path)?;
            let ingest = column::<TimestampMicrosecondArray>(batch, events::INGEST_TIME, &path)?;
            let event_id = column::<StringArray>(batch, events::EVENT_ID, &path)?;
            let merchant_id = column::<StringArray>(batch, events::MERCHANT_ID, &path)?;
            let kind = column::<StringArray>(batch, events::KIND, &path)?;
            let amount = column::<Int64Array>(batch, events::AMOUNT_MINOR, &path)?;
            let currency = column::<StringArray>(batch, events::CURRENCY, &path)?;
            let event_time = column::<TimestampMicrosecondArray>(batch, events::EVENT_TIME, &path)?;
            let corrects = column::<StringArray>(batch, events::CORRECTS_EVENT_ID, &path)?;
            for i in 0..batch.num_rows() {
                let body = match string_at(rtype, i).as_deref() {
                    Some(events::HEARTBEAT) => RecordBody::Heartbeat,
                    Some(events::FACT) => {
                        let text = |a: &StringArray, what: &str| {
                            string_at(a, i).ok_or_else(|| bad(format!("row {i}: no {what}")))
                        };
                        let kind_text = text(kind, events::KIND)?;
                        RecordBody::Fact(Fact {
                            event_id: text(event_id, events::EVENT_ID)?,
                            merchant_id: text(merchant_id, events::MERCHANT_ID)?,
                            kind: EventKind::parse(&kind_text)
                                .ok_or_else(|| bad(format!("row {i}: kind {kind_text}")))?,
                            amount_minor: amount.value(i),
                            currency: Currency::parse(&text(currency, events::CURRENCY)?)
                                .map_err(|e| bad(e.to_string()))?,
                            event_time_us: event_time.value(i),
                            corrects_event_id: string_at(corrects, i),
                        })
                    }
                    other => {
                        return Err(bad(format!("row {i}: {} {other:?}", events::RECORD_TYPE)));
                    }
                };
                records.push(Record {
                    seq: seq.value(i),
                    ingest_time_us: ingest.value(i),
                    body,
                });
            }
        }
        let (_, recomputed) = events_batch(partition, &records)?;
        let info = footer_matches(&path, rows, hash, records.len(), recomputed)?;
        Ok((records, info))
    }

    pub async fn read_dims(&self, cut: CutRange) -> Result<Vec<ArchivedDim>, StorageError> {
        let path = Path::from(format!("archive/dims/{}", cut.file_name()));
        let bad = |message: String| StorageError::Corrupt {
            path: path.to_string(),
            message,
        };
        let (batches, rows, hash) = self.read(&path).await?;
        let mut records = Vec::with_capacity(rows as usize);
        for batch in &batches {
            let seq = column::<UInt64Array>(batch, dims::SEQ, &path)?;
            let ingest = column::<TimestampMicrosecondArray>(batch, dims::INGEST_TIME, &path)?;
            let effective = column::<Date32Array>(batch, dims::EFFECTIVE_DATE, &path)?;
            let version = column::<Int32Array>(batch, dims::VERSION, &path)?;
            let bps = column::<Int32Array>(batch, dims::RESERVE_BPS, &path)?;
            let dim_type = column::<StringArray>(batch, dims::DIM_TYPE, &path)?;
            let currency = column::<StringArray>(batch, dims::CURRENCY, &path)?;
            let rate = column::<StringArray>(batch, dims::RATE, &path)?;
            let merchant_id = column::<StringArray>(batch, dims::MERCHANT_ID, &path)?;
            let tier = column::<StringArray>(batch, dims::TIER, &path)?;
            for i in 0..batch.num_rows() {
                let text = |a: &StringArray, what: &str| {
                    string_at(a, i).ok_or_else(|| bad(format!("row {i}: no {what}")))
                };
                let effective_day = Day(effective.value(i));
                let record = match text(dim_type, dims::DIM_TYPE)?.as_str() {
                    dims::FX => DimRecord::Fx(FxRecord {
                        currency: Currency::parse(&text(currency, dims::CURRENCY)?)
                            .map_err(|e| bad(e.to_string()))?,
                        rate: Rate::parse(&text(rate, dims::RATE)?)
                            .map_err(|e| bad(e.to_string()))?,
                        effective_day,
                        version: version.value(i),
                    }),
                    dims::RISK => DimRecord::Risk(RiskRecord {
                        merchant_id: text(merchant_id, dims::MERCHANT_ID)?,
                        tier: text(tier, dims::TIER)?,
                        reserve_bps: bps.value(i),
                        effective_day,
                        version: version.value(i),
                    }),
                    other => return Err(bad(format!("row {i}: {} {other}", dims::DIM_TYPE))),
                };
                records.push(ArchivedDim {
                    seq: seq.value(i),
                    ingest_time_us: ingest.value(i),
                    record,
                });
            }
        }
        let (_, recomputed) = dims_batch(&records)?;
        footer_matches(&path, rows, hash, records.len(), recomputed)?;
        Ok(records)
    }
}

/// Why the archive cannot be trusted up to a watermark.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TilingError {
    #[error("segment {0:?} does not end at a watermark")]
    NotACut(CutRange),
    #[error("segments {0:?} and {1:?} overlap")]
    Overlap(CutRange, CutRange),
    #[error("segment {0:?} does not start right after a watermark (the previous cut ended at {1})")]
    Gap(CutRange, u64),
}

/// Checks that segments tile the sequence space up to `up_to`: every segment is a
/// whole cut (starts right after one watermark, ends at the next), and none overlap.
/// A partition without records in a cut simply has no segment for it.
pub fn verify_tiling(
    segments: &[CutRange],
    watermarks: &[u64],
    up_to: u64,
) -> Result<(), TilingError> {
    let mut sorted: Vec<CutRange> = segments
        .iter()
        .copied()
        .filter(|s| s.last <= up_to)
        .collect();
    sorted.sort();
    for pair in sorted.windows(2) {
        if pair[1].first <= pair[0].last {
            return Err(TilingError::Overlap(pair[0], pair[1]));
        }
    }
    for s in &sorted {
        let Ok(at) = watermarks.binary_search(&s.last) else {
            return Err(TilingError::NotACut(*s));
        };
        let previous = if at == 0 { 0 } else { watermarks[at - 1] };
        if s.first != previous + 1 {
            return Err(TilingError::Gap(*s, previous));
        }
    }
    Ok(())
}
