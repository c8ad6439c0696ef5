//! The archiver: writes the log to object storage as Parquet, cut by cut
//! (docs/storage.md).
//!
//! A cut covers the sequence range `(w, c]` of the whole stream, where `w` is the
//! previous watermark: one segment per partition with records in it, one for the
//! dimension records, then the watermark `c`. Where to resume is read from the
//! archive's own listing, never from a consumer position: after a crash, segments
//! past the highest watermark name the cut that was cut short, and that same cut is
//! completed first (same ranges, same names, put-if-absent with hashes compared).
//! So the segments of each partition tile the sequence space with no gap and no
//! overlap.
//!
//! Records the stream drops (`max_age`) before a cut holds them are lost for good,
//! so the archiver reports its watermark and when it last completed a cut, and
//! retention.rs how many records trail behind it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use futures::StreamExt;
use payledger_proto::{fx_from_proto, record_from_log, risk_from_proto, v1};
use payledger_semantics::Record;
use payledger_server_common::stall::Stall;
use payledger_server_common::topology::{STREAM, partition_of_subject};
use payledger_storage::{ArchiveStore, ArchivedDim, CutRange, DimRecord};
use prost::Message;
use tokio::sync::watch;

use crate::metrics::ArchiverMetrics;

#[derive(Clone, Debug)]
pub struct ArchiverTuning {
    /// A cut is written at the latest this long after its first record.
    pub flush_interval: Duration,
    /// ...or once it holds this many records.
    pub max_cut_records: usize,
    /// `--nats-stall-timeout` (server_common::stall).
    pub stall_timeout: Duration,
}

/// What the archiver tells the rest of the process as it goes.
pub(crate) struct Progress {
    pub metrics: Arc<ArchiverMetrics>,
    /// The highest watermark, once the archive's listing was read.
    pub watermark: watch::Sender<Option<u64>>,
    /// Through which sequence lost records were reported: a retry after a failed
    /// cut reads the same gap again.
    pub lost_reported_through: AtomicU64,
}

impl Progress {
    /// The archive's listing says `watermark`; the cut ending there was written
    /// by this or an earlier process, at the time its object carries.
    async fn resumed(&self, archive: &ArchiveStore, watermark: u64) {
        self.metrics.watermark(watermark);
        if watermark > 0 {
            match archive.watermark_written(watermark).await {
                Ok(at) => self.metrics.cut_completed_at(at),
                Err(e) => {
                    tracing::debug!(watermark, error = %e, "when the last cut was written is unknown")
                }
            }
        }
        // A resume after a failure reads the same watermark again: no news.
        self.watermark.send_if_modified(|known| {
            let changed = *known != Some(watermark);
            *known = Some(watermark);
            changed
        });
    }

    /// Sequences `first..=last` were gone from the stream when the archiver came to
    /// them: deleted before any cut held them.
    fn lost(&self, first: u64, last: u64) {
        let first = first.max(
            self.lost_reported_through
                .fetch_max(last, Ordering::Relaxed)
                + 1,
        );
        if first > last {
            return;
        }
        self.metrics.lost(last - first + 1);
        tracing::error!(
            first,
            last,
            "records were deleted from the stream (max_age, a purge) before they were archived: they are lost for good; \
             the archive records the gap (archive/_gaps/), and replays and projectors refuse to fold across it"
        );
    }

    fn cut(&self, watermark: u64) {
        self.metrics.watermark(watermark);
        self.metrics.cut_completed_at(SystemTime::now());
        self.watermark.send_replace(Some(watermark));
    }
}

/// How long a stopping archiver goes on reading what the stream holds.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One cut being collected.
#[derive(Default)]
struct Cut {
    events: BTreeMap<u32, Vec<Record>>,
    dims: Vec<ArchivedDim>,
    /// Sequences inside the cut that the stream had deleted before they were read.
    lost: Vec<CutRange>,
    last: u64,
    records: usize,
}

impl Cut {
    fn add(&mut self, seq: u64, subject: &str, payload: &[u8]) {
        self.last = seq;
        self.records += 1;
        if let Some(partition) = partition_of_subject(subject) {
            match record_from_log(seq, payload) {
                Ok(record) => self.events.entry(partition).or_default().push(record),
                // The stream projector and replay skip the same records.
                Err(e) => {
                    tracing::warn!(seq, error = %e, "unreadable record left out of the archive")
                }
            }
            return;
        }
        let Ok(log) = v1::LogRecord::decode(payload) else {
            tracing::warn!(seq, "unreadable dimension record left out of the archive");
            return;
        };
        let record = match &log.body {
            Some(v1::log_record::Body::Fx(fx)) => fx_from_proto(fx).map(DimRecord::Fx),
            Some(v1::log_record::Body::Risk(risk)) => risk_from_proto(risk).map(DimRecord::Risk),
            _ => return,
        };
        match record {
            Ok(record) => self.dims.push(ArchivedDim {
                seq,
                ingest_time_us: log.ingest_time_us,
                record,
            }),
            Err(e) => {
                tracing::warn!(seq, error = %e, "invalid dimension record left out of the archive")
            }
        }
    }

    /// Writes every segment of the cut `(after, self.last]`, then its watermark.
    async fn write(self, archive: &ArchiveStore, after: u64) -> anyhow::Result<u64> {
        let range = CutRange {
            first: after + 1,
            last: self.last,
        };
        // Before the cut that spans them is complete: a reader must never take
        // the cut for the whole history of its range.
        for lost in &self.lost {
            archive.put_gap(*lost).await?;
        }
        let mut writes = Vec::new();
        for (partition, records) in &self.events {
            writes.push(futures::future::Either::Left(
                archive.put_events(*partition, range, records),
            ));
        }
        if !self.dims.is_empty() {
            writes.push(futures::future::Either::Right(
                archive.put_dims(range, &self.dims),
            ));
        }
        for result in futures::future::join_all(writes).await {
            result?;
        }
        // Only now is the cut complete.
        archive.put_watermark(range.last).await?;
        tracing::debug!(
            first = range.first,
            last = range.last,
            records = self.records,
            "cut archived"
        );
        Ok(range.last)
    }
}

/// The end of a cut that was cut short after watermark `w`, if any segment says so.
async fn unfinished_cut(
    archive: &ArchiveStore,
    partitions: u32,
    w: u64,
) -> anyhow::Result<Option<u64>> {
    let mut ends: Vec<u64> = archive
        .dim_segments()
        .await?
        .iter()
        .filter(|s| s.first == w + 1)
        .map(|s| s.last)
        .collect();
    for p in 0..partitions {
        ends.extend(
            archive
                .event_segments(p)
                .await?
                .iter()
                .filter(|s| s.first == w + 1)
                .map(|s| s.last),
        );
    }
    ends.sort_unstable();
    ends.dedup();
    anyhow::ensure!(
        ends.len() <= 1,
        "segments after watermark {w} disagree on where their cut ends: {ends:?}"
    );
    Ok(ends.first().copied())
}

/// Archives the stream until `stop` turns true; the cut in progress is written first.
pub async fn run(
    js: jetstream::Context,
    archive: ArchiveStore,
    partitions: u32,
    tuning: ArchiverTuning,
    progress: &Progress,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut watermark = archive.watermarks().await?.last().copied().unwrap_or(0);
    progress.resumed(&archive, watermark).await;
    let resume_cut = unfinished_cut(&archive, partitions, watermark).await?;
    if let Some(end) = resume_cut {
        tracing::info!(
            watermark,
            cut_end = end,
            "completing a cut that was cut short"
        );
    }
    tracing::info!(watermark, "archiver resuming after the highest watermark");

    let mut stream = js.get_stream(STREAM).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            // Every subject of the stream: partitions and dimensions.
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: watermark + 1,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    // JetStream's sequences have no holes of their own: a jump is records deleted
    // before they were read.
    let mut next_seq = watermark + 1;
    let mut cut = Cut::default();
    let mut flush_at: Option<tokio::time::Instant> = None;
    // Once asked to stop: read through the stream's last sequence at that moment
    // (what this process appended included), for at most DRAIN_TIMEOUT.
    let mut drain: Option<(u64, tokio::time::Instant)> = None;
    let mut stall = Stall::new(tuning.stall_timeout);
    let mut stall_checks = stall.checks();
    loop {
        // A cut that was cut short is completed with exactly its old range.
        let forced_end = resume_cut.filter(|end| *end > watermark);
        let deadline =
            flush_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let drained_by = drain.map_or_else(tokio::time::Instant::now, |(_, by)| by);
        let next = tokio::select! {
            biased;
            _ = stop.changed(), if drain.is_none() => {
                let last = stream.info().await.map(|i| i.state.last_sequence).unwrap_or(0);
                if last < next_seq {
                    break;
                }
                drain = Some((last, tokio::time::Instant::now() + DRAIN_TIMEOUT));
                continue;
            }
            _ = tokio::time::sleep_until(drained_by), if drain.is_some() => {
                tracing::warn!(read_through = next_seq - 1, "stopping before the stream's last record was read; the next archiver archives the rest");
                break;
            }
            _ = tokio::time::sleep_until(deadline), if flush_at.is_some() && forced_end.is_none() => None,
            _ = stall_checks.tick(), if drain.is_none() => {
                // The stream's end could not be read: NATS is away, which the
                // consumer reports itself.
                if let Ok(info) = stream.info().await {
                    stall.judge("the archiver's consumer", next_seq - 1, info.state.last_sequence)?;
                }
                continue;
            }
            next = messages.next() => Some(next),
        };
        if matches!(next, Some(Some(_))) {
            stall.delivered();
        }
        match next {
            None => {}
            Some(Some(Ok(message))) => {
                let info = message
                    .info()
                    .map_err(|e| anyhow::anyhow!("message without metadata: {e}"))?;
                if info.stream_sequence > next_seq {
                    progress.lost(next_seq, info.stream_sequence - 1);
                    cut.lost.push(CutRange {
                        first: next_seq,
                        last: info.stream_sequence - 1,
                    });
                }
                next_seq = info.stream_sequence + 1;
                cut.add(
                    info.stream_sequence,
                    message.subject.as_str(),
                    &message.payload,
                );
                flush_at.get_or_insert_with(|| tokio::time::Instant::now() + tuning.flush_interval);
                if drain.is_some_and(|(last, _)| info.stream_sequence >= last)
                    && forced_end.is_none()
                {
                    break;
                }
                let complete = match forced_end {
                    Some(end) => cut.last >= end,
                    None => cut.records >= tuning.max_cut_records,
                };
                if !complete {
                    continue;
                }
            }
            Some(Some(Err(e))) => return Err(anyhow::anyhow!("reading the stream: {e}")),
            Some(None) => anyhow::bail!("the archiver's consumer ended"),
        }
        if cut.records > 0 {
            watermark = std::mem::take(&mut cut).write(&archive, watermark).await?;
            progress.cut(watermark);
        }
        flush_at = None;
    }
    if cut.records > 0 && resume_cut.is_none_or(|end| end <= watermark || cut.last == end) {
        watermark = cut.write(&archive, watermark).await?;
        progress.cut(watermark);
    }
    tracing::info!(watermark, "archiver stopped");
    Ok(())
}
