//! One partition in stream mode: restore the newest checkpoint, read the partition
//! in sequence order from right after it, apply the semantics, write the changed
//! rows, checkpoint.
//!
//! Ordering and durability: rows are flushed to KV *before* a checkpoint is
//! written, so a checkpoint never claims rows that are not stored. After a kill,
//! the partition resumes from its checkpoint and re-derives the same rows; rows
//! already stored with an equal or higher log_position are left alone.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull, kv};
use futures::StreamExt;
use payledger_proto::{current_row_to_proto, daily_row_to_proto, record_from_log, v1};
use payledger_semantics::{Currency, Day, PartitionState, RecordBody, Settings, Status, Touched};
use payledger_server_common::stall::Stall;
use payledger_server_common::topology::{
    DAILY_BUCKET, STREAM, current_key, daily_key, event_subject, progress_key,
};
use payledger_server_common::trace_context::{self, SpanLink};
use payledger_storage::CheckpointStore;
use prost::Message;
use tokio::sync::watch;

use crate::bootstrap::{self, Refused, Source};
use crate::replay::ReplayStores;
use crate::rows::{RowSink, RowWrite, StoreTicket};

#[derive(Clone, Debug)]
pub struct Tuning {
    /// Flush once this many merchant-currencies have changed rows.
    pub flush_rows: usize,
    /// Flush at the latest this long after the first unflushed record.
    pub flush_interval: Duration,
    pub checkpoint_every_records: u64,
    pub checkpoint_interval: Duration,
    pub ack_timeout: Duration,
    /// `--nats-stall-timeout` (server_common::stall).
    pub stall_timeout: Duration,
}

#[derive(Clone)]
pub(crate) struct PartitionContext {
    pub partition: u32,
    pub settings: Settings,
    pub js: jetstream::Context,
    pub checkpoints: CheckpointStore,
    /// The archive, and the committed replay states a partition may start from.
    pub stores: ReplayStores,
    pub rows: RowSink,
    pub progress: kv::Store,
    /// Hears how every progress write went.
    pub readiness: payledger_server_common::readiness::Readiness,
    pub tuning: Arc<Tuning>,
    pub metrics: Arc<crate::metrics::ProjectorMetrics>,
    /// The NATS connection's losses: a starting partition gives up a request in
    /// flight when the connection drops.
    pub losses: payledger_server_common::connection::ConnectionLosses,
}

/// Changed rows since the last flush, per merchant and currency.
#[derive(Default)]
struct PendingRows {
    by_key: HashMap<(String, Currency), Changed>,
}

#[derive(Default)]
struct Changed {
    /// Earliest day whose balances moved: that row and every later one changed.
    balances_from: Option<Day>,
    /// Days whose counts alone changed.
    counted: BTreeSet<Day>,
}

impl PendingRows {
    fn add(&mut self, merchant_id: &str, touched: Touched) {
        let changed = self
            .by_key
            .entry((merchant_id.to_string(), touched.currency))
            .or_default();
        if touched.balances_changed {
            changed.balances_from = Some(
                changed
                    .balances_from
                    .map_or(touched.day, |d| d.min(touched.day)),
            );
        } else {
            changed.counted.insert(touched.day);
        }
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Builds and encodes every changed row, daily and current.
    fn take_rows(&mut self, state: &PartitionState) -> (Vec<RowWrite>, Vec<RowWrite>) {
        let mut daily = Vec::new();
        let mut current = Vec::new();
        for ((merchant_id, currency), changed) in self.by_key.drain() {
            let mut rows = Vec::new();
            if let Some(day) = changed.balances_from {
                rows.extend(state.daily_rows_touched(
                    &merchant_id,
                    &Touched {
                        currency,
                        day,
                        balances_changed: true,
                    },
                ));
            }
            for day in changed
                .counted
                .iter()
                .filter(|d| changed.balances_from.is_none_or(|from| **d < from))
            {
                rows.extend(state.daily_rows_touched(
                    &merchant_id,
                    &Touched {
                        currency,
                        day: *day,
                        balances_changed: false,
                    },
                ));
            }
            daily.extend(rows.iter().map(|r| RowWrite {
                key: daily_key(&r.merchant_id, r.day, r.currency),
                log_position: r.log_position,
                value: daily_row_to_proto(r).encode_to_vec().into(),
            }));
            if let Some(r) = state.current_row(&merchant_id, currency) {
                current.push(RowWrite {
                    key: current_key(&r.merchant_id, r.currency),
                    log_position: r.log_position,
                    value: current_row_to_proto(&r).encode_to_vec().into(),
                });
            }
        }
        (daily, current)
    }
}

pub(crate) use payledger_server_common::clock::now_us;

struct Projection {
    ctx: PartitionContext,
    state: PartitionState,
    pending: PendingRows,
    pending_records: u64,
    records_since_checkpoint: u64,
    last_checkpoint: Instant,
    last_progress: Instant,
    reported_seq: u64,
    /// Rows handed to the writer after reading through this sequence (with the
    /// ingest time of that record), not yet durable.
    in_flight: Option<(u64, i64, StoreTicket)>,
    /// Ingest time of the newest record applied.
    last_ingest_time_us: i64,
    /// Every record through this sequence has its rows stored.
    durable_seq: u64,
    /// The apply spans of traced records whose rows wait for the next flush: the
    /// row write joins their traces.
    traced: Vec<SpanLink>,
    /// The checkpoint being written in the background: its sequence, the records
    /// it covers since the one before, and the write.
    checkpoint_in_flight: Option<CheckpointWrite>,
}

struct CheckpointWrite {
    seq: u64,
    records: u64,
    started: Instant,
    write: tokio::task::JoinHandle<Result<(), payledger_storage::StorageError>>,
}

/// How often a partition looks whether its checkpoint in flight has landed.
const CHECKPOINT_POLL: Duration = Duration::from_millis(250);

/// Traces a flush joins at most (the rest of its records are not linked): bounds
/// the memory a backlog of traced records takes and the links of a write span.
const MAX_TRACES_PER_FLUSH: usize = 32;

/// The stream of the progress bucket, as readiness names it.
const PROGRESS_STREAM: &str = "KV_projector_progress";

/// Progress is reported at most this often (each report is a fsynced KV write).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

impl Projection {
    /// Hands the changed rows to the writer without waiting for them (the previous
    /// flush is waited for first, so at most one is in flight), then reports progress
    /// and checkpoints when due. Reading goes on while rows are being written.
    async fn flush(&mut self) -> anyhow::Result<()> {
        let (daily, current) = self.pending.take_rows(&self.state);
        let seq = self.state.last_seq();
        tracing::trace!(
            partition = self.ctx.partition,
            seq,
            pending_records = self.pending_records,
            daily = daily.len(),
            current = current.len(),
            "flush"
        );
        self.settle().await?;
        let traced = std::mem::take(&mut self.traced);
        match self.ctx.rows.submit(daily, current, traced).await? {
            Some(ticket) => self.in_flight = Some((seq, self.last_ingest_time_us, ticket)),
            None => self.durable_seq = seq,
        }
        if self.last_progress.elapsed() >= PROGRESS_INTERVAL
            && self.reported_seq != self.durable_seq
        {
            self.write_progress().await?;
        }
        self.reap_checkpoint().await;
        if self.checkpoint_in_flight.is_none()
            && (self.records_since_checkpoint >= self.ctx.tuning.checkpoint_every_records
                || (self.records_since_checkpoint > 0
                    && self.last_checkpoint.elapsed() >= self.ctx.tuning.checkpoint_interval))
        {
            // A checkpoint may only claim rows that are stored.
            self.settle().await?;
            self.start_checkpoint();
        }
        Ok(())
    }

    /// Starts writing a checkpoint of the state in the background: the partition
    /// goes on applying records and writing rows (they are in NATS) while the
    /// object store is slow or away. One is in flight at a time.
    fn start_checkpoint(&mut self) {
        let bytes = bytes::Bytes::from(self.state.encode());
        let seq = self.state.last_seq();
        let checkpoints = self.ctx.checkpoints.clone();
        let partition = self.ctx.partition;
        self.checkpoint_in_flight = Some(CheckpointWrite {
            seq,
            records: self.records_since_checkpoint,
            started: Instant::now(),
            write: tokio::spawn(async move { checkpoints.put(partition, seq, bytes).await }),
        });
        self.records_since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
    }

    /// Takes the outcome of the checkpoint in flight once it has one. A failed
    /// checkpoint is logged and tried again after `--checkpoint-interval`; the
    /// partition does not stop for it.
    async fn reap_checkpoint(&mut self) {
        if !self
            .checkpoint_in_flight
            .as_ref()
            .is_some_and(|c| c.write.is_finished())
        {
            return;
        }
        let Some(c) = self.checkpoint_in_flight.take() else {
            return;
        };
        let error = match c.write.await {
            Ok(Ok(())) => {
                tracing::debug!(
                    partition = self.ctx.partition,
                    seq = c.seq,
                    "checkpoint written"
                );
                self.ctx.metrics.checkpointed(self.ctx.partition, now_us());
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the write task ended: {e}"),
        };
        // Due again: the records it would have covered are still uncovered.
        self.records_since_checkpoint += c.records;
        self.ctx.metrics.checkpoint_failed(self.ctx.partition);
        tracing::warn!(
            partition = self.ctx.partition,
            seq = c.seq,
            after = ?c.started.elapsed(),
            error = %error,
            retry_in = ?self.ctx.tuning.checkpoint_interval,
            "checkpoint not written; the partition goes on applying records and tries again. \
             Rows are unaffected; a restart resumes from the previous checkpoint and reads more of the log. \
             Check that the projector's --store is reachable"
        );
    }

    /// Waits for the rows in flight to be durable.
    async fn settle(&mut self) -> anyhow::Result<()> {
        if let Some((seq, ingest_time_us, ticket)) = self.in_flight.take() {
            ticket.stored().await?;
            self.durable_seq = seq;
            self.ctx.metrics.stored(ingest_time_us, now_us());
        }
        Ok(())
    }

    /// When to flush again although no record arrives: to settle rows in flight,
    /// report progress, and write a checkpoint that is due (or see one land).
    fn next_due(&self) -> Option<tokio::time::Instant> {
        let checkpoint = if self.checkpoint_in_flight.is_some() {
            Some(tokio::time::Instant::now() + CHECKPOINT_POLL)
        } else if self.records_since_checkpoint > 0 {
            Some(tokio::time::Instant::from_std(
                self.last_checkpoint + self.ctx.tuning.checkpoint_interval,
            ))
        } else {
            None
        };
        let rows = self.rows_due();
        match (rows, checkpoint) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn rows_due(&self) -> Option<tokio::time::Instant> {
        if self.in_flight.is_some() {
            // Caught up: settle soon, so that progress reflects the stored rows. With a
            // backlog the next records trigger the next flush anyway.
            let wait = if self.pending_records == 0 {
                Duration::from_millis(1)
            } else {
                self.ctx.tuning.flush_interval
            };
            return Some(tokio::time::Instant::now() + wait);
        }
        (self.reported_seq != self.durable_seq)
            .then(|| tokio::time::Instant::from_std(self.last_progress + PROGRESS_INTERVAL))
    }

    async fn write_progress(&mut self) -> anyhow::Result<()> {
        let progress = v1::PartitionProgress {
            partition: self.ctx.partition,
            applied_sequence: self.durable_seq,
            pending_records: self.pending_records,
            written_at_us: now_us(),
            version_key: self.ctx.settings.version_key(),
            refused: String::new(),
        };
        let put = self
            .ctx
            .progress
            .put(
                progress_key(self.ctx.partition),
                progress.encode_to_vec().into(),
            )
            .await;
        match &put {
            Ok(_) => self.ctx.readiness.write_stored(PROGRESS_STREAM),
            Err(e) => self.ctx.readiness.write_failed(PROGRESS_STREAM, e),
        }
        put?;
        self.last_progress = Instant::now();
        self.reported_seq = self.durable_seq;
        self.ctx
            .metrics
            .progress(self.ctx.partition, self.durable_seq, self.pending_records);
        Ok(())
    }

    async fn checkpoint(&mut self) -> anyhow::Result<()> {
        let bytes = bytes::Bytes::from(self.state.encode());
        let size = bytes.len();
        self.ctx
            .checkpoints
            .put(self.ctx.partition, self.state.last_seq(), bytes)
            .await?;
        tracing::debug!(
            partition = self.ctx.partition,
            seq = self.state.last_seq(),
            bytes = size,
            "checkpoint written"
        );
        self.records_since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.ctx.metrics.checkpointed(self.ctx.partition, now_us());
        Ok(())
    }
}

/// Fails when the log no longer holds the record right after `covered`: then the
/// partition starts again, reading the archive further.
async fn hand_over_holds(
    ctx: &PartitionContext,
    stream: &mut jetstream::stream::Stream,
    covered: u64,
) -> anyhow::Result<()> {
    let partition = ctx.partition;
    let log_first = bootstrap::request(&ctx.losses, "reading the log's head", stream.info())
        .await?
        .state
        .first_sequence;
    anyhow::ensure!(
        log_first <= covered + 1,
        "the log's head moved to {log_first} while partition {partition} was handed over after {covered}; starting it again"
    );
    Ok(())
}

async fn rows_are_empty(ctx: &PartitionContext) -> anyhow::Result<bool> {
    let what = "reading the row bucket";
    let stream = format!("KV_{DAILY_BUCKET}");
    let mut daily = bootstrap::request(&ctx.losses, what, ctx.js.get_stream(stream)).await?;
    Ok(bootstrap::request(&ctx.losses, what, daily.info())
        .await?
        .state
        .messages
        == 0)
}

/// Writes every row of the state (fenced: a stored row with a higher log
/// position stays) and waits until they are stored.
async fn write_every_row(ctx: &PartitionContext, state: &PartitionState) -> anyhow::Result<()> {
    let daily: Vec<RowWrite> = state
        .daily_rows()
        .iter()
        .map(|r| RowWrite {
            key: daily_key(&r.merchant_id, r.day, r.currency),
            log_position: r.log_position,
            value: daily_row_to_proto(r).encode_to_vec().into(),
        })
        .collect();
    let current: Vec<RowWrite> = state
        .current_rows()
        .iter()
        .map(|r| RowWrite {
            key: current_key(&r.merchant_id, r.currency),
            log_position: r.log_position,
            value: current_row_to_proto(r).encode_to_vec().into(),
        })
        .collect();
    let (daily_rows, current_rows) = (daily.len(), current.len());
    if let Some(ticket) = ctx.rows.submit(daily, current, Vec::new()).await? {
        ticket.stored().await?;
    }
    tracing::info!(
        partition = ctx.partition,
        daily_rows,
        current_rows,
        "wrote every row the state holds"
    );
    Ok(())
}

/// Tells the query service (through the progress bucket) that the partition is
/// refused and why; best effort, the log line and the metric say it anyway.
async fn report_refused(ctx: &PartitionContext, refused: &Refused) {
    let progress = v1::PartitionProgress {
        partition: ctx.partition,
        written_at_us: now_us(),
        version_key: ctx.settings.version_key(),
        refused: refused.to_string(),
        ..Default::default()
    };
    if let Err(e) = ctx
        .progress
        .put(progress_key(ctx.partition), progress.encode_to_vec().into())
        .await
    {
        tracing::warn!(partition = ctx.partition, error = %e, "could not report the refusal to the progress bucket");
    }
}

/// Runs until `stop` turns true (then flushes and checkpoints) or an error occurs.
pub(crate) async fn run(
    ctx: PartitionContext,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let partition = ctx.partition;
    ctx.metrics.bootstrapping(partition, true);
    let (mut state, source, covered) =
        bootstrap::restore(partition, &ctx.settings, &ctx.checkpoints, &ctx.stores).await?;
    // Rows are written as they change, so no final day need stay in memory.
    state.keep_final_days_from(Day(i32::MAX));
    let restored_seq = state.last_seq();
    tracing::info!(
        partition,
        from = %source,
        seq = restored_seq,
        identities = state.identities_remembered(),
        "restored partition"
    );
    let mut stream =
        bootstrap::request(&ctx.losses, "opening the stream", ctx.js.get_stream(STREAM)).await?;
    let (state, covered) = match bootstrap::catch_up(
        state,
        &source,
        covered,
        &mut stream,
        &ctx.stores,
        &ctx.metrics,
        &ctx.losses,
    )
    .await
    {
        Ok(caught_up) => caught_up,
        Err(e) => {
            if let Some(refused) = e.downcast_ref::<Refused>() {
                tracing::error!(partition, error = %refused, "partition refused");
                ctx.metrics.refused(partition, true);
                report_refused(&ctx, refused).await;
            }
            return Err(e);
        }
    };
    ctx.metrics.refused(partition, false);
    // Rows the state holds that the tables may lack: every row after a start from
    // anything but its own checkpoint, after reading the archive, or into empty
    // row buckets (checkpoints only claim rows that were stored).
    let own_checkpoint = matches!(source, Source::Checkpoint(_));
    if !own_checkpoint || covered > restored_seq || rows_are_empty(&ctx).await? {
        write_every_row(&ctx, &state).await?;
    }
    let deliver_policy = if covered == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: covered + 1,
        }
    };
    let consumer = bootstrap::request(
        &ctx.losses,
        "creating the partition's consumer",
        stream.create_consumer(pull::OrderedConfig {
            filter_subject: event_subject(partition),
            deliver_policy,
            ..Default::default()
        }),
    )
    .await?;
    hand_over_holds(&ctx, &mut stream, covered).await?;
    let mut messages = consumer.messages().await?;
    ctx.metrics.bootstrapping(partition, false);
    tracing::info!(partition, hand_over_after = covered, "reading the log");

    let mut p = Projection {
        ctx,
        state,
        pending: PendingRows::default(),
        pending_records: 0,
        records_since_checkpoint: 0,
        last_checkpoint: Instant::now(),
        last_progress: Instant::now(),
        reported_seq: 0,
        in_flight: None,
        last_ingest_time_us: 0,
        durable_seq: covered,
        traced: Vec::new(),
        checkpoint_in_flight: None,
    };
    let mut first_applied: Option<u64> = None;
    let mut flush_at: Option<tokio::time::Instant> = None;
    let mut stall = Stall::new(p.ctx.tuning.stall_timeout);
    let mut stall_checks = stall.checks();
    let subject = event_subject(partition);
    loop {
        let deadline =
            flush_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let next = tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(deadline), if flush_at.is_some() => {
                p.flush().await?;
                flush_at = p.next_due();
                continue;
            }
            _ = stall_checks.tick() => {
                // The stream's end could not be read: NATS is away, which the
                // consumer reports itself.
                if let Ok(end) = stream.get_last_raw_message_by_subject(&subject).await {
                    stall.judge(&format!("the consumer of partition {partition}"), p.state.last_seq(), end.sequence)?;
                }
                continue;
            }
            next = messages.next() => next,
        };
        stall.delivered();
        let message = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(anyhow::anyhow!("reading partition {partition}: {e}")),
            None => anyhow::bail!("the consumer of partition {partition} ended"),
        };
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("message without metadata: {e}"))?;
        let seq = info.stream_sequence;
        if first_applied.is_none() && seq > covered + 1 {
            // The head may have moved past the hand-over point since it was checked.
            hand_over_holds(&p.ctx, &mut stream, covered).await?;
        }
        p.pending_records = info.pending;
        {
            // A record that ingest published inside a trace is applied in a span of that
            // trace (nothing is made when traces are not exported).
            let span = trace_context::span_from_nats(message.headers.as_ref(), || {
                tracing::info_span!(
                    "apply",
                    otel.kind = "consumer",
                    partition,
                    seq,
                    outcome = tracing::field::Empty
                )
            });
            // No await while the span is entered; it closes at the end of this block.
            let _entered = span.as_ref().map(tracing::Span::enter);
            match record_from_log(seq, &message.payload) {
                Ok(record) => {
                    p.last_ingest_time_us = record.ingest_time_us;
                    let outcome = p.state.apply(&record)?;
                    if let Some(span) = &span {
                        span.record("outcome", tracing::field::debug(outcome.status));
                        if outcome.touched.is_some() && p.traced.len() < MAX_TRACES_PER_FLUSH {
                            p.traced.extend(SpanLink::of(span));
                        }
                    }
                    if outcome.status != Status::AlreadyRead && first_applied.is_none() {
                        first_applied = Some(seq);
                        tracing::info!(
                            partition,
                            restored_seq,
                            first_applied_seq = seq,
                            "resumed partition"
                        );
                    }
                    if let (Some(touched), RecordBody::Fact(fact)) = (outcome.touched, &record.body)
                    {
                        p.pending.add(&fact.merchant_id, touched);
                    }
                }
                Err(e) => tracing::warn!(partition, seq, error = %e, "unreadable record skipped"),
            }
        }
        p.records_since_checkpoint += 1;
        flush_at.get_or_insert_with(|| tokio::time::Instant::now() + p.ctx.tuning.flush_interval);
        if p.pending_records == 0 || p.pending.len() >= p.ctx.tuning.flush_rows {
            p.flush().await?;
            flush_at = p.next_due();
        }
    }
    p.flush().await?;
    p.settle().await?;
    if let Some(c) = p.checkpoint_in_flight.take() {
        match c.write.await {
            Ok(Ok(())) => {}
            // The final checkpoint below covers its records too.
            _ => p.records_since_checkpoint += c.records,
        }
    }
    if p.records_since_checkpoint > 0 {
        p.checkpoint().await?;
    }
    if p.reported_seq != p.durable_seq {
        p.write_progress().await?;
    }
    tracing::info!(
        partition,
        seq = p.state.last_seq(),
        "partition stopped after a final checkpoint"
    );
    Ok(())
}
