//! Appends records to JetStream: events in atomic batches, falling back to single
//! publishes when a batch holds an id JetStream has seen (so that every event still
//! gets its own answer), dimension records and heartbeats.

use std::collections::{HashMap, VecDeque};
use std::future::IntoFuture;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use payledger_proto::v1;
use payledger_semantics::StreamSettings;
use payledger_server_common::atomic_batch::{
    BatchError, BatchMessage, ERR_DUPLICATE_MSG_ID, MAX_BATCH_MESSAGES, publish_atomic_watched,
};
use payledger_server_common::connection::ConnectionLosses;
use payledger_server_common::metrics::Gauge;
use payledger_server_common::readiness::Readiness;
use payledger_server_common::topology::{STREAM, event_subject};
use payledger_server_common::trace_context::{TraceHeaders, exported_span};
use prost::Message;
use tonic::Status;
use tracing::Instrument;

use crate::IngestConfig;
use crate::publish_status::Failure;

/// Below this many events, pipelined single publishes beat one atomic batch: on
/// the server an atomic batch costs ≈2.9 ms whatever its size (it stages the batch
/// in a store of its own), a single fsynced publish ≈0.2 ms.
const ATOMIC_FROM_EVENTS: usize = 16;

/// An event that passed validation, ready to append.
pub(crate) struct Prepared {
    pub msg_id: String,
    pub partition: u32,
    pub payload: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    Stored(u64),
    /// Already in the log at this sequence.
    Duplicate(u64),
}

pub(crate) struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Calls waiting for an ack are answered at once when the connection drops.
    losses: ConnectionLosses,
    awaiting_ack: Gauge,
    pub settings: StreamSettings,
    ack_timeout: Duration,
    /// Per partition: ingest clock of the last record appended, for heartbeats.
    last_record_us: Vec<AtomicI64>,
    recent: Mutex<RecentIds>,
    /// Hears how every write went (docs/operations.md "JetStream cannot write").
    readiness: Readiness,
}

/// Counts a write in `payledger_ingest_writes_awaiting_ack` while it lives.
struct Awaiting<'a>(&'a Gauge);

impl<'a> Awaiting<'a> {
    fn ack(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Ids acked within the duplicate window, bounded in count. Only a shortcut:
/// JetStream's own deduplication remains the guarantee.
struct RecentIds {
    by_id: HashMap<String, u64>,
    order: VecDeque<(Instant, String)>,
    window: Duration,
    capacity: usize,
}

impl RecentIds {
    fn expire(&mut self) {
        while let Some((at, _)) = self.order.front() {
            if at.elapsed() < self.window && self.order.len() <= self.capacity {
                break;
            }
            let (_, id) = self.order.pop_front().expect("front exists");
            self.by_id.remove(&id);
        }
    }

    fn get(&mut self, id: &str) -> Option<u64> {
        self.expire();
        self.by_id.get(id).copied()
    }

    fn insert(&mut self, id: &str, seq: u64) {
        if self.capacity == 0 {
            return;
        }
        self.by_id.insert(id.to_string(), seq);
        self.order.push_back((Instant::now(), id.to_string()));
        self.expire();
    }
}

impl Publisher {
    pub fn new(
        client: async_nats::Client,
        losses: ConnectionLosses,
        js: jetstream::Context,
        settings: StreamSettings,
        config: &IngestConfig,
        awaiting_ack: Gauge,
        readiness: Readiness,
    ) -> Self {
        // Single publishes wait --ack-timeout for their acks too (the context's
        // default is 5 s).
        let mut js = js;
        js.set_timeout(config.ack_timeout);
        Self {
            client,
            js,
            losses,
            awaiting_ack,
            settings,
            ack_timeout: config.ack_timeout,
            last_record_us: (0..settings.partitions)
                .map(|_| AtomicI64::new(i64::MIN))
                .collect(),
            recent: Mutex::new(RecentIds {
                by_id: HashMap::new(),
                order: VecDeque::new(),
                // Shorter than JetStream's window, so a shortcut never outlives the guarantee.
                window: config.duplicate_window.mul_f64(0.9),
                capacity: config.recent_ids_capacity,
            }),
            readiness,
        }
    }

    pub fn encode(ingest_time_us: i64, body: v1::log_record::Body) -> Bytes {
        let record = v1::LogRecord {
            ingest_time_us,
            body: Some(body),
            traceparent: String::new(),
        };
        Bytes::from(record.encode_to_vec())
    }

    /// Appends events, answering for each one, in order. Resends known to have
    /// been acked within the duplicate window are answered without a round trip.
    ///
    /// When traces are exported, the append is a span of the Publish call's trace
    /// and every message carries its `traceparent` header, so the projector's
    /// spans for these events join the same trace. The header never enters the
    /// `Nats-Msg-Id` or the payload: a retry in another trace is still a duplicate
    /// (and the log keeps the headers of the first).
    pub async fn append_events(
        &self,
        events: &[Prepared],
        ingest_time_us: i64,
    ) -> Result<Vec<Appended>, Status> {
        let span = exported_span(|| {
            tracing::info_span!(
                "append",
                otel.name = "jetstream publish",
                otel.kind = "producer",
                events = events.len()
            )
        });
        let trace = TraceHeaders::of(&span);
        self.append_traced(events, ingest_time_us, &trace)
            .instrument(span)
            .await
    }

    async fn append_traced(
        &self,
        events: &[Prepared],
        ingest_time_us: i64,
        trace: &TraceHeaders,
    ) -> Result<Vec<Appended>, Status> {
        let mut out: Vec<Option<Appended>> = vec![None; events.len()];
        let mut to_send = Vec::with_capacity(events.len());
        {
            let mut recent = self.recent.lock().expect("recent ids lock");
            for (i, e) in events.iter().enumerate() {
                match recent.get(&e.msg_id) {
                    Some(seq) => out[i] = Some(Appended::Duplicate(seq)),
                    None => to_send.push(i),
                }
            }
        }
        for chunk in to_send.chunks(MAX_BATCH_MESSAGES) {
            self.append_batch(events, chunk, trace, &mut out).await?;
            for &i in chunk {
                self.last_record_us[events[i].partition as usize]
                    .fetch_max(ingest_time_us, Ordering::Relaxed);
            }
        }
        let mut recent = self.recent.lock().expect("recent ids lock");
        for &i in &to_send {
            if let Some(Appended::Stored(seq)) = out[i] {
                recent.insert(&events[i].msg_id, seq);
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.expect("every event answered"))
            .collect())
    }

    /// Appends `indices` of `events` as atomic batches. A batch JetStream refuses
    /// because it holds an id already in the log is split in halves; small parts go
    /// as single publishes, whose acks tell resends apart, so every event still gets
    /// its own answer.
    async fn append_batch(
        &self,
        events: &[Prepared],
        indices: &[usize],
        trace: &TraceHeaders,
        out: &mut [Option<Appended>],
    ) -> Result<(), Status> {
        let mut parts = vec![indices.to_vec()];
        while let Some(part) = parts.pop() {
            if part.len() < ATOMIC_FROM_EVENTS {
                let appended = self
                    .append_singly(part.iter().map(|&i| &events[i]), trace)
                    .await?;
                for (&i, a) in part.iter().zip(appended) {
                    out[i] = Some(a);
                }
                continue;
            }
            let messages = part
                .iter()
                .map(|&i| {
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", events[i].msg_id.as_str());
                    trace.add_to_nats(&mut headers);
                    BatchMessage {
                        subject: event_subject(events[i].partition),
                        headers,
                        payload: events[i].payload.clone(),
                    }
                })
                .collect();
            let mut lost = self.losses.since_now();
            let _awaiting = Awaiting::ack(&self.awaiting_ack);
            match publish_atomic_watched(&self.client, messages, self.ack_timeout, &mut lost).await
            {
                Ok(ack) => {
                    self.readiness.write_stored(STREAM);
                    for (k, &i) in part.iter().enumerate() {
                        out[i] = Some(Appended::Stored(ack.sequence_of(k)));
                    }
                }
                Err(e) if e.err_code() == Some(ERR_DUPLICATE_MSG_ID) => {
                    let (a, b) = part.split_at(part.len() / 2);
                    parts.push(b.to_vec());
                    parts.push(a.to_vec());
                }
                Err(e) => return Err(self.status_of(Failure::of_batch(&e)).await),
            }
        }
        Ok(())
    }

    /// Pipelined plain publishes; each ack says whether JetStream already had the id.
    async fn append_singly(
        &self,
        events: impl Iterator<Item = &Prepared>,
        trace: &TraceHeaders,
    ) -> Result<Vec<Appended>, Status> {
        let mut lost = self.losses.since_now();
        let _awaiting = Awaiting::ack(&self.awaiting_ack);
        let mut acks = Vec::new();
        for event in events {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.msg_id.as_str());
            trace.add_to_nats(&mut headers);
            acks.push(
                match self
                    .js
                    .publish_with_headers(
                        event_subject(event.partition),
                        headers,
                        event.payload.clone(),
                    )
                    .await
                    .map_err(|e| Failure::of_publish(&e))
                {
                    Ok(ack) => ack,
                    Err(failure) => return Err(self.status_of(failure).await),
                },
            );
        }
        let mut out = Vec::with_capacity(acks.len());
        for ack in acks {
            let ack = match lost.or_lost(ack.into_future()).await {
                Ok(Ok(ack)) => ack,
                Ok(Err(e)) => return Err(self.status_of(Failure::of_publish(&e)).await),
                Err(_) => return Err(self.status_of(Failure::ConnectionLost).await),
            };
            self.readiness.write_stored(STREAM);
            out.push(if ack.duplicate {
                Appended::Duplicate(ack.sequence)
            } else {
                Appended::Stored(ack.sequence)
            });
        }
        Ok(out)
    }

    /// Appends one dimension record; `msg_id` makes a resend a no-op.
    pub async fn append_dimension(
        &self,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<Appended, Status> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        TraceHeaders::current().add_to_nats(&mut headers);
        let mut lost = self.losses.since_now();
        let _awaiting = Awaiting::ack(&self.awaiting_ack);
        let acked = match self
            .js
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
        {
            Ok(ack) => lost.or_lost(ack.into_future()).await,
            Err(e) => Ok(Err(e)),
        };
        let ack = match acked {
            Ok(Ok(ack)) => ack,
            Ok(Err(e)) => return Err(self.status_of(Failure::of_publish(&e)).await),
            Err(_) => return Err(self.status_of(Failure::ConnectionLost).await),
        };
        self.readiness.write_stored(STREAM);
        Ok(if ack.duplicate {
            Appended::Duplicate(ack.sequence)
        } else {
            Appended::Stored(ack.sequence)
        })
    }

    /// The status of a failed write. "Nothing listens" is told apart by asking
    /// JetStream whether the stream exists: in a cluster it also happens for a
    /// moment while the stream's replicas elect a new leader. A failure that
    /// means JetStream cannot store counts against readiness.
    async fn status_of(&self, failure: Failure) -> Status {
        let failure = match failure {
            Failure::NoStream(_) => failure.given_stream_exists(self.stream_exists().await),
            other => other,
        };
        let status = failure.to_status();
        if failure.means_cannot_store() {
            self.readiness.write_not_stored(STREAM, status.message());
        }
        status
    }

    /// Whether JetStream has the stream; None when it does not answer within
    /// a second (it answers only once a leader is elected).
    async fn stream_exists(&self) -> Option<bool> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        match tokio::time::timeout(Duration::from_secs(1), self.js.get_stream(STREAM)).await {
            Ok(Ok(_)) => Some(true),
            Ok(Err(e)) => match e.kind() {
                GetStreamErrorKind::JetStream(api)
                    if api.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Some(false)
                }
                _ => None,
            },
            Err(_) => None,
        }
    }

    /// Partitions with no record since `quiet_since_us` (ingest clock).
    pub fn quiet_partitions(&self, quiet_since_us: i64) -> Vec<u32> {
        (0..self.settings.partitions)
            .filter(|p| self.last_record_us[*p as usize].load(Ordering::Relaxed) <= quiet_since_us)
            .collect()
    }

    /// One heartbeat to each of `partitions`, in one atomic batch.
    pub async fn append_heartbeats(
        &self,
        partitions: &[u32],
        now_us: i64,
    ) -> Result<(), BatchError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let messages = partitions
            .iter()
            .map(|p| BatchMessage {
                subject: event_subject(*p),
                headers: HeaderMap::new(),
                payload: Self::encode(
                    now_us,
                    v1::log_record::Body::Heartbeat(v1::Heartbeat { partition: *p }),
                ),
            })
            .collect();
        let mut lost = self.losses.since_now();
        if let Err(e) =
            publish_atomic_watched(&self.client, messages, self.ack_timeout, &mut lost).await
        {
            self.readiness.write_failed(STREAM, &e);
            return Err(e);
        }
        self.readiness.write_stored(STREAM);
        for p in partitions {
            self.last_record_us[*p as usize].fetch_max(now_us, Ordering::Relaxed);
        }
        Ok(())
    }
}
