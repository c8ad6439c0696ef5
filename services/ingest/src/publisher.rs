//! Appends records to JetStream: events in atomic batches, falling back to single
//! publishes when a batch holds an id JetStream has seen (so that every event still
//! gets its own answer), dimension records and heartbeats.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use payledger_proto::v1;
use payledger_semantics::{Fact, Settings};
use payledger_server_common::atomic_batch::{
    BatchError, BatchMessage, ERR_DUPLICATE_MSG_ID, MAX_BATCH_MESSAGES, publish_atomic,
};
use payledger_server_common::topology::event_subject;
use prost::Message;
use tonic::Status;

use crate::IngestConfig;

/// `Nats-Msg-Id`: a 128-bit hash of identity *and* content (DESIGN.md section 7),
/// so an exact resend is absorbed while a conflicting event still reaches the log.
pub fn message_id(fact: &Fact) -> String {
    let mut buf = Vec::with_capacity(160);
    let mut field = |bytes: &[u8]| {
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(bytes);
    };
    field(fact.merchant_id.as_bytes());
    field(fact.event_id.as_bytes());
    field(fact.kind.as_str().as_bytes());
    field(&fact.amount_minor.to_le_bytes());
    field(fact.currency.as_str().as_bytes());
    field(&fact.event_time_us.to_le_bytes());
    field(fact.corrects_event_id.as_deref().unwrap_or("").as_bytes());
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&buf))
}

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
    pub settings: Settings,
    ack_timeout: Duration,
    /// Per partition: ingest clock of the last record appended, for heartbeats.
    last_record_us: Vec<AtomicI64>,
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!(
        "JetStream did not confirm the write ({e}); nothing is lost by retrying the same call"
    ))
}

impl Publisher {
    pub fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        settings: Settings,
        config: &IngestConfig,
    ) -> Self {
        Self {
            client,
            js,
            settings,
            ack_timeout: config.ack_timeout,
            last_record_us: (0..settings.partitions)
                .map(|_| AtomicI64::new(i64::MIN))
                .collect(),
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

    /// Appends events, answering for each one, in order.
    pub async fn append_events(
        &self,
        events: &[Prepared],
        ingest_time_us: i64,
    ) -> Result<Vec<Appended>, Status> {
        let mut out = Vec::with_capacity(events.len());
        for chunk in events.chunks(MAX_BATCH_MESSAGES) {
            let messages = chunk
                .iter()
                .map(|e| {
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", e.msg_id.as_str());
                    BatchMessage {
                        subject: event_subject(e.partition),
                        headers,
                        payload: e.payload.clone(),
                    }
                })
                .collect();
            match publish_atomic(&self.client, messages, self.ack_timeout).await {
                Ok(ack) => {
                    out.extend((0..chunk.len()).map(|i| Appended::Stored(ack.sequence_of(i))));
                }
                Err(e) if e.err_code() == Some(ERR_DUPLICATE_MSG_ID) => {
                    // Some event of the batch is a resend: ask for each one singly.
                    out.extend(self.append_singly(chunk).await?);
                }
                Err(e @ BatchError::NoAck(_)) => return Err(unavailable(e)),
                Err(e) => return Err(Status::internal(e.to_string())),
            }
            for e in chunk {
                self.last_record_us[e.partition as usize]
                    .fetch_max(ingest_time_us, Ordering::Relaxed);
            }
        }
        Ok(out)
    }

    async fn append_singly(&self, events: &[Prepared]) -> Result<Vec<Appended>, Status> {
        // Pipelined: send all, then collect the acks in order.
        let mut pending = Vec::with_capacity(events.len());
        for e in events {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", e.msg_id.as_str());
            let ack = self
                .js
                .publish_with_headers(event_subject(e.partition), headers, e.payload.clone())
                .await
                .map_err(unavailable)?;
            pending.push(ack);
        }
        let mut out = Vec::with_capacity(events.len());
        for ack in pending {
            let ack = ack.await.map_err(unavailable)?;
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
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(if ack.duplicate {
            Appended::Duplicate(ack.sequence)
        } else {
            Appended::Stored(ack.sequence)
        })
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
        publish_atomic(&self.client, messages, self.ack_timeout).await?;
        for p in partitions {
            self.last_record_us[*p as usize].fetch_max(now_us, Ordering::Relaxed);
        }
        Ok(())
    }
}
