//! The dimension records (FX rates, risk tiers) that reporting values are computed
//! with, and where they come from.
//!
//! The log keeps records for `max_age` only; the archive keeps every cut for good.
//! So the records through the archive's highest watermark come from the archive,
//! and only those after it from the log. Authoritative answers read the archive
//! alone: a committed snapshot's reporting values must not change when the log
//! drops old records, whatever the log still holds.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    stream::LastRawMessageErrorKind,
};
use futures::{StreamExt, TryStreamExt};
use payledger_proto::{fx_from_proto, risk_from_proto, v1};
use payledger_semantics::{DailyRow, DimensionBook, Reporting, to_reporting};
use payledger_server_common::topology::{DIMS_SUBJECTS, FX_SUBJECT, RISK_SUBJECT, STREAM};
use payledger_storage::{ArchiveStore, DimRecord, StorageError, TilingError, verify_tiling};
use prost::Message;

use crate::tables::Tables;

/// Dimension segments read from object storage at once while catching up.
const CONCURRENT_SEGMENT_READS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DimsError {
    #[error(
        "cutoff {cutoff} is past the archive's highest watermark {highest}: the archive listing is behind the commit log; try again shortly, and check that --archive-store names the archive the replays read"
    )]
    BeyondArchive { cutoff: u64, highest: u64 },
    #[error(
        "the archived dimension records are not whole ({0}); check the archive's dims segments and watermarks"
    )]
    Tiling(TilingError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The book of archived dimension records, through the highest watermark read so far.
struct Archived {
    book: DimensionBook,
    through: u64,
}

/// The archive's dimension records, read forward as far as answers need them.
///
/// One book serves every committed snapshot: it keeps each record's sequence and
/// `to_reporting` uses only the records at or below the cutoff it is given, so asking
/// it at a snapshot's cutoff answers exactly as a book folded through that cutoff
/// would (the first record of a (key, date, version) in the log wins in both), with
/// one copy in memory however many commits there are.
pub(crate) struct ArchivedDims {
    archive: ArchiveStore,
    state: RwLock<Archived>,
    // Two answers needing a newer cutoff at once read the new segments once.
    extending: tokio::sync::Mutex<()>,
}

impl ArchivedDims {
    pub fn new(archive: ArchiveStore) -> Self {
        Self {
            archive,
            state: RwLock::new(Archived {
                book: DimensionBook::default(),
                through: 0,
            }),
            extending: tokio::sync::Mutex::new(()),
        }
    }

    fn through(&self) -> u64 {
        self.state.read().expect("archived dims lock").through
    }

    /// Reads the dimension segments up to the archive's highest watermark, checking
    /// that they tile the sequence space; returns the watermark now read through.
    pub async fn catch_up(&self) -> Result<u64, DimsError> {
        let _one_at_a_time = self.extending.lock().await;
        let from = self.through();
        let watermarks = self.archive.watermarks().await?;
        let highest = watermarks.last().copied().unwrap_or(0);
        if highest <= from {
            return Ok(from);
        }
        let segments = self.archive.dim_segments().await?;
        verify_tiling(&segments, &watermarks, highest).map_err(DimsError::Tiling)?;
        // Whole cuts only, so no segment straddles `from` (a watermark, or 0).
        let new: Vec<_> = segments
            .into_iter()
            .filter(|s| s.first > from && s.last <= highest)
            .collect();
        let mut reads = futures::stream::iter(new)
            .map(|cut| self.archive.read_dims(cut))
            .buffered(CONCURRENT_SEGMENT_READS);
        // Applied segment by segment, so a long history is never all in memory twice.
        // Readers meanwhile ask at cutoffs ≤ `from`, which records past it never change;
        // after a failure, records applied again are ignored by the book.
        while let Some(dims) = reads.try_next().await? {
            let mut state = self.state.write().expect("archived dims lock");
            for dim in &dims {
                match &dim.record {
                    DimRecord::Fx(fx) => state.book.apply_fx(dim.seq, fx),
                    DimRecord::Risk(risk) => state.book.apply_risk(dim.seq, risk),
                };
            }
        }
        self.state.write().expect("archived dims lock").through = highest;
        Ok(highest)
    }

    /// The reporting values of a committed snapshot's rows, from the archived records
    /// at or below its cutoff (a watermark).
    pub async fn reporting(&self, rows: &[DailyRow], cutoff: u64) -> Result<Reporting, DimsError> {
        if self.through() < cutoff {
            self.catch_up().await?;
        }
        let state = self.state.read().expect("archived dims lock");
        if state.through < cutoff {
            return Err(DimsError::BeyondArchive {
                cutoff,
                highest: state.through,
            });
        }
        Ok(to_reporting(rows, &state.book, cutoff))
    }

    /// A copy of the book and the watermark it was read through: the start of the
    /// provisional book, which the log then continues.
    fn snapshot(&self) -> (DimensionBook, u64) {
        let state = self.state.read().expect("archived dims lock");
        (state.book.clone(), state.through)
    }

    async fn highest_watermark(&self) -> Result<u64, StorageError> {
        Ok(self
            .archive
            .watermarks()
            .await?
            .last()
            .copied()
            .unwrap_or(0))
    }
}

/// The book provisional answers use: the archive's records, then the log's after them.
pub(crate) struct ProvisionalDims {
    pub book: DimensionBook,
    /// Why the book may lack records the log once held, while it may; reporting
    /// values that depend on it are withheld meanwhile, with this as the reason.
    pub incomplete: Option<String>,
}

impl Default for ProvisionalDims {
    fn default() -> Self {
        Self {
            book: DimensionBook::default(),
            incomplete: Some(LOADING.to_string()),
        }
    }
}

impl ProvisionalDims {
    /// The reporting values of stream rows, or, while the book may be incomplete,
    /// only what needs no dimension record (a closing already in the reporting
    /// currency), with the reason.
    pub fn reporting(&self, rows: &[DailyRow]) -> (Reporting, Option<String>) {
        match &self.incomplete {
            None => (to_reporting(rows, &self.book, u64::MAX), None),
            Some(reason) => (
                to_reporting(rows, &DimensionBook::default(), 0),
                Some(reason.clone()),
            ),
        }
    }
}

const LOADING: &str = "the FX and risk records are still being read (the query service started moments ago); ask again shortly";

/// Where the log stopped holding every record after the archive's watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Gap {
    /// The archive's highest watermark: every record through it is in the book.
    after: u64,
    /// The last sequence the log may have lost a record at.
    through: u64,
}

impl Gap {
    fn reason(&self) -> String {
        format!(
            "FX and risk records between sequences {} and {} may be missing: the log no longer holds every record after the archive's highest watermark {}, and the archive does not reach {} yet; reporting values are withheld until the archiver's watermarks pass it (is the archiver running?)",
            self.after + 1,
            self.through,
            self.after,
            self.through
        )
    }
}

/// The first sequence range after `after` the log no longer wholly holds, if any:
/// records below the stream's first sequence are gone (`max_age`, a purge), and so
/// are deleted ones inside it (a purge by subject). Any record of it may have been
/// a dimension record, as nothing tells which.
async fn log_gap(
    stream: &mut jetstream::stream::Stream,
    after: u64,
) -> anyhow::Result<Option<Gap>> {
    let state = stream.info().await?.state.clone();
    if state.last_sequence <= after {
        return Ok(None);
    }
    let mut through = state.first_sequence.saturating_sub(1);
    let deleted_count = state.deleted_count.unwrap_or(0);
    if deleted_count > 0 {
        let deleted = match stream.info_builder().with_deleted(true).fetch().await {
            Ok(detailed) => detailed.info.state.deleted.unwrap_or_default(),
            // A long list of deletions may not fit a response: assume the worst.
            Err(e) => {
                tracing::warn!(error = %e, deleted_count, "the log's deleted sequences could not be listed; treating every sequence after the archive's watermark as possibly lost");
                Vec::new()
            }
        };
        if (deleted.len() as u64) < deleted_count {
            // Not every deletion is listed, so any sequence may be one.
            through = through.max(state.last_sequence);
        }
        through = through.max(deleted.into_iter().max().unwrap_or(0));
    }
    Ok((through > after).then_some(Gap { after, through }))
}

/// The highest sequence of a dimension record in the log, 0 if there is none.
async fn last_dimension_seq(stream: &jetstream::stream::Stream) -> anyhow::Result<u64> {
    let mut last = 0;
    for subject in [FX_SUBJECT, RISK_SUBJECT] {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => last = last.max(message.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(anyhow::anyhow!("the last record of {subject}: {e}")),
        }
    }
    Ok(last)
}

fn set_incomplete(tables: &Tables, reason: String) {
    tables
        .dimensions
        .write()
        .expect("dimension lock")
        .incomplete = Some(reason);
}

/// Keeps the provisional book: the archive's records through its highest watermark
/// (when there is an archive), then the log's after it, in log order. When the log
/// no longer holds every record after that watermark, reporting values are withheld
/// until the archive reaches past the gap, then the book is read again from there.
pub(crate) async fn follow_dimensions(
    js: jetstream::Context,
    tables: Arc<Tables>,
    archived: Option<Arc<ArchivedDims>>,
    poll: Duration,
) -> anyhow::Result<()> {
    let mut stream = js.get_stream(STREAM).await?;
    if archived.is_none() {
        tracing::warn!(
            "no archive (--archive-store or --store): the FX and risk records come from the log alone, so reporting values depend on its retention (max_age); records it has dropped are missing from them"
        );
    }
    loop {
        let (book, after) = match &archived {
            Some(archived) => match archived.catch_up().await {
                Ok(_) => archived.snapshot(),
                Err(e) => {
                    tracing::error!(error = %e, "the archived FX and risk records are not readable; reporting values are withheld, trying again");
                    set_incomplete(
                        &tables,
                        format!("the archived FX and risk records are not readable: {e}"),
                    );
                    tokio::time::sleep(poll).await;
                    continue;
                }
            },
            None => (DimensionBook::default(), 0),
        };
        // Created before the log is checked, so that what the check saw is still
        // there to read.
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: DIMS_SUBJECTS.to_string(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await?;
        match (log_gap(&mut stream, after).await?, &archived) {
            (Some(gap), Some(archived)) => {
                tracing::error!(
                    archive_watermark = gap.after,
                    missing_through = gap.through,
                    "{}",
                    gap.reason()
                );
                set_incomplete(&tables, gap.reason());
                drop(consumer);
                wait_for_archive(archived, gap.through, poll).await;
                tracing::info!(
                    watermark_past = gap.through,
                    "the archive now reaches past the records the log lost; reading the FX and risk records again"
                );
                continue;
            }
            (Some(gap), None) => tracing::warn!(
                first_held = gap.through + 1,
                "the log no longer holds every record before sequence {}; without an archive, FX and risk records among them are missing from reporting values",
                gap.through + 1
            ),
            (None, _) => {}
        }
        let target = last_dimension_seq(&stream).await?;
        {
            let mut dims = tables.dimensions.write().expect("dimension lock");
            dims.book = book;
            dims.incomplete = (target > after).then(|| LOADING.to_string());
        }
        if target <= after {
            tracing::info!(
                archive_watermark = after,
                "FX and risk records read (every one from the archive); following the log"
            );
        }
        return follow_log(consumer, &tables, after, target).await;
    }
}

/// [`follow_dimensions`], started again — the archive's records first, then the
/// log's after its watermark — whenever the log's consumer is lost (a restart of
/// nats-server, say), with the followers' backoff.
pub(crate) async fn follow_dimensions_riding_out_restarts(
    js: jetstream::Context,
    tables: Arc<Tables>,
    archived: Option<Arc<ArchivedDims>>,
    poll: Duration,
) -> anyhow::Result<()> {
    let mut backoff = crate::tables::Backoff::new();
    loop {
        if let Err(e) = follow_dimensions(js.clone(), tables.clone(), archived.clone(), poll).await
        {
            tracing::warn!(error = %e, attempt = backoff.attempt + 1, "dimension consumer lost; reading the FX and risk records again");
        }
        backoff.wait().await;
    }
}

/// Polls the archive until its highest watermark reaches `through`.
async fn wait_for_archive(archived: &ArchivedDims, through: u64, poll: Duration) {
    loop {
        tokio::time::sleep(poll).await;
        match archived.highest_watermark().await {
            Ok(highest) if highest >= through => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the archive's watermarks are not readable; trying again")
            }
        }
    }
}

/// Applies the log's dimension records to the provisional book, in order; the book is
/// complete once the last record the log held at the start is applied.
async fn follow_log(
    consumer: jetstream::consumer::Consumer<pull::OrderedConfig>,
    tables: &Tables,
    after: u64,
    target: u64,
) -> anyhow::Result<()> {
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let seq = message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        let record = v1::LogRecord::decode(message.payload.as_ref());
        let mut dims = tables.dimensions.write().expect("dimension lock");
        match record.map(|r| r.body) {
            Ok(Some(v1::log_record::Body::Fx(fx))) => match fx_from_proto(&fx) {
                Ok(fx) => {
                    dims.book.apply_fx(seq, &fx);
                }
                Err(e) => tracing::warn!(seq, error = %e, "invalid fx record skipped"),
            },
            Ok(Some(v1::log_record::Body::Risk(risk))) => match risk_from_proto(&risk) {
                Ok(risk) => {
                    dims.book.apply_risk(seq, &risk);
                }
                Err(e) => tracing::warn!(seq, error = %e, "invalid risk record skipped"),
            },
            Ok(_) => tracing::warn!(seq, "non-dimension record on a dimension subject skipped"),
            Err(_) => tracing::warn!(seq, "unreadable dimension record skipped"),
        }
        if dims.incomplete.is_some() && seq >= target {
            dims.incomplete = None;
            tracing::info!(
                archive_watermark = after,
                log_through = seq,
                "FX and risk records read (the archive's, then the log's after its watermark); following the log"
            );
        }
    }
    anyhow::bail!("the dimension consumer ended")
}

#[cfg(test)]
mod tests {
    use payledger_semantics::{Currency, Day, FxRecord, Rate, RiskRecord};
    use payledger_storage::{ArchivedDim, CutRange, open_store};

    use super::*;

    const DAY: Day = Day(20_000);

    fn fx(seq: u64, rate: &str, version: i32) -> ArchivedDim {
        ArchivedDim {
            seq,
            ingest_time_us: 1,
            record: DimRecord::Fx(FxRecord {
                currency: Currency::parse("EUR").expect("a currency"),
                rate: Rate::parse(rate).expect("a rate"),
                effective_day: DAY,
                version,
            }),
        }
    }

    fn risk(seq: u64, reserve_bps: i32, version: i32) -> ArchivedDim {
        ArchivedDim {
            seq,
            ingest_time_us: 1,
            record: DimRecord::Risk(RiskRecord {
                merchant_id: "m1".into(),
                tier: format!("tier-{version}"),
                reserve_bps,
                effective_day: DAY,
                version,
            }),
        }
    }

    fn row(currency: &str, closing_minor: i128) -> DailyRow {
        DailyRow {
            merchant_id: "m1".into(),
            day: DAY,
            currency: Currency::parse(currency).expect("a currency"),
            closing_minor,
            peak_minor: closing_minor,
            peak_bucket_start_us: 0,
            applied: 1,
            duplicates: 0,
            conflicts: 0,
            late: 0,
            restated: false,
            log_position: 1,
            semantics_version: 1,
        }
    }

    /// A book folded from `dims` through `cutoff` only, as a replay would.
    fn folded(dims: &[ArchivedDim], cutoff: u64) -> DimensionBook {
        let mut book = DimensionBook::default();
        for dim in dims.iter().filter(|d| d.seq <= cutoff) {
            match &dim.record {
                DimRecord::Fx(fx) => book.apply_fx(dim.seq, fx),
                DimRecord::Risk(risk) => book.apply_risk(dim.seq, risk),
            };
        }
        book
    }

    async fn put_cut(archive: &ArchiveStore, first: u64, last: u64, dims: &[ArchivedDim]) {
        archive
            .put_dims(CutRange { first, last }, dims)
            .await
            .expect("segment written");
        archive
            .put_watermark(last)
            .await
            .expect("watermark written");
    }

    #[tokio::test]
    async fn one_book_answers_each_cutoff_as_a_book_folded_through_it() {
        let dir = tempfile::tempdir().expect("a directory");
        let store = open_store(&dir.path().display().to_string()).expect("a store");
        let archive = ArchiveStore::new(
            store,
            payledger_semantics::RecordedStream::new(Default::default()),
        );
        let first = [fx(2, "1.10", 1), risk(3, 500, 1)];
        // Version 1 again (ignored: the first in the log wins), then version 2 of both.
        let second = [fx(12, "1.30", 1), fx(14, "1.20", 2), risk(15, 1000, 2)];
        put_cut(&archive, 1, 10, &first).await;
        archive.put_watermark(11).await.expect("a cut without dims");
        put_cut(&archive, 12, 20, &second).await;
        let mut all: Vec<ArchivedDim> = first.iter().chain(&second).cloned().collect();

        let dims = ArchivedDims::new(archive.clone());
        let rows = [row("EUR", 10_000), row("USD", 500)];
        for cutoff in [0, 10, 11, 20] {
            assert_eq!(
                dims.reporting(&rows, cutoff).await.expect("archived"),
                to_reporting(&rows, &folded(&all, cutoff), cutoff),
                "cutoff {cutoff}"
            );
        }
        let at_20 = dims.reporting(&rows, 20).await.expect("archived");
        assert_eq!(at_20.closing_reporting_minor, Some(12_500));
        assert_eq!(at_20.reserve_minor, Some(1_250));
        assert_eq!(dims.through(), 20);

        // A later commit's cutoff reads the new cut; the earlier answers stay.
        let third = [fx(25, "2.00", 3)];
        put_cut(&archive, 21, 30, &third).await;
        all.extend(third);
        let at_30 = dims.reporting(&rows, 30).await.expect("archived");
        assert_eq!(at_30, to_reporting(&rows, &folded(&all, 30), 30));
        assert_eq!(at_30.closing_reporting_minor, Some(20_500));
        assert_eq!(dims.reporting(&rows, 20).await.expect("archived"), at_20);
        let err = dims.reporting(&rows, 40).await.unwrap_err();
        assert!(
            matches!(
                err,
                DimsError::BeyondArchive {
                    cutoff: 40,
                    highest: 30
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn an_incomplete_book_withholds_what_depends_on_it() {
        let mut dims = ProvisionalDims::default();
        dims.book.apply_fx(
            1,
            &FxRecord {
                currency: Currency::parse("EUR").expect("a currency"),
                rate: Rate::parse("1.10").expect("a rate"),
                effective_day: DAY,
                version: 1,
            },
        );
        let mixed = [row("EUR", 1000), row("USD", 500)];
        let (reporting, reason) = dims.reporting(&mixed);
        assert_eq!(reason.as_deref(), Some(LOADING));
        assert_eq!(reporting.closing_reporting_minor, None);
        assert_eq!(reporting.reserve_minor, None);
        assert!(reporting.fx_used.is_empty());
        assert_eq!(reporting.missing_rates, vec![mixed[0].currency]);
        // A closing in the reporting currency needs no record.
        let (usd, _) = dims.reporting(&[row("USD", 500)]);
        assert_eq!(usd.closing_reporting_minor, Some(500));

        dims.incomplete = None;
        let (reporting, reason) = dims.reporting(&mixed);
        assert_eq!(reason, None);
        assert_eq!(reporting.closing_reporting_minor, Some(1_600));
    }
}
