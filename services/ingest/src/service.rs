//! The `IngestService` gRPC API: validation, admission control, and one answer per event.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use payledger_proto::v1::ingest_service_server::{IngestService, IngestServiceServer};
use payledger_proto::v1::{self, publish_result::Outcome};
use payledger_proto::{
    FieldViolation, event_from_fact, fact_from_event, fx_from_proto, risk_from_proto,
};
use payledger_semantics::{Held, check_event_time, message_id, partition_of};
use payledger_server_common::request_errors::RequestErrors;
use payledger_server_common::topology::{FX_SUBJECT, RISK_SUBJECT};
use payledger_storage::DimRecord;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::IngestConfig;
use crate::clock::Clock;
use crate::dimensions::DimensionIndex;
use crate::publisher::{Appended, Prepared, Publisher};

pub(crate) struct IngestApi {
    publisher: Arc<Publisher>,
    dimensions: DimensionIndex,
    clock: Arc<dyn Clock>,
    admission: Arc<Semaphore>,
    admission_timeout: Duration,
    limits: AdmissionLimits,
    /// Calls waiting for a slot now.
    queued: Arc<AtomicUsize>,
    max_batch_events: usize,
    metrics: Arc<crate::metrics::IngestMetrics>,
}

impl IngestApi {
    pub fn new(
        publisher: Arc<Publisher>,
        dimensions: DimensionIndex,
        clock: Arc<dyn Clock>,
        config: &IngestConfig,
        metrics: Arc<crate::metrics::IngestMetrics>,
    ) -> Self {
        Self {
            metrics,
            publisher,
            dimensions,
            clock,
            admission: Arc::new(Semaphore::new(config.max_concurrent_batches)),
            admission_timeout: config.admission_timeout,
            limits: AdmissionLimits {
                in_flight: config.max_concurrent_batches,
                queued: config.max_queued_batches,
            },
            queued: Arc::new(AtomicUsize::new(0)),
            max_batch_events: config.max_batch_events,
        }
    }

    pub fn into_routes(self, max_request_bytes: usize) -> Routes {
        let service = IngestServiceServer::new(self).max_decoding_message_size(max_request_bytes);
        Routes::new(RequestErrors::new(service, Some("--max-request-bytes")))
    }

    /// Sheds load instead of queueing without bound: a call gets a slot, or
    /// waits for one among at most `--max-queued-batches` others for at most
    /// `--admission-timeout`, or is refused at once.
    async fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        match self.admission.clone().try_acquire_owned() {
            Ok(permit) => return Ok(permit),
            Err(tokio::sync::TryAcquireError::Closed) => {
                return Err(Status::unavailable("ingest is shutting down"));
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        let queue = QueueSlot::take(&self.queued, self.limits.queued)
            .ok_or_else(|| self.limits.refusal("none may wait"))?;
        let waited = tokio::time::timeout(
            self.admission_timeout,
            self.admission.clone().acquire_owned(),
        )
        .await;
        drop(queue);
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Status::unavailable("ingest is shutting down")),
            Err(_) => Err(self.limits.refusal(&format!(
                "none freed within --admission-timeout {}",
                payledger_server_common::config::format_duration(self.admission_timeout)
            ))),
        }
    }
}

/// The limits a Publish call is admitted under, named in its refusal.
#[derive(Clone, Copy, Debug)]
struct AdmissionLimits {
    in_flight: usize,
    queued: usize,
}

impl AdmissionLimits {
    fn refusal(&self, why: &str) -> Status {
        Status::resource_exhausted(format!(
            "ingest is at its limit: {} publish calls in flight (--max-concurrent-batches) and \
             {} waiting (--max-queued-batches), {why}; nothing of this call was written, \
             retry with backoff",
            self.in_flight, self.queued
        ))
    }
}

/// One of the queue's places, given back when dropped.
struct QueueSlot<'a>(&'a AtomicUsize);

impl<'a> QueueSlot<'a> {
    fn take(queued: &'a AtomicUsize, limit: usize) -> Option<QueueSlot<'a>> {
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(queued))
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn rejected(v: FieldViolation) -> v1::PublishResult {
    v1::PublishResult {
        outcome: Some(Outcome::Rejected(v1::Rejected {
            code: v.code as i32,
            field: v.field.to_string(),
            message: v.message,
        })),
    }
}

fn outcome(appended: Appended, ingest_time_us: i64, partition: u32) -> v1::PublishResult {
    v1::PublishResult {
        outcome: Some(match appended {
            Appended::Stored(sequence) => Outcome::Accepted(v1::Accepted {
                sequence,
                ingest_time_us,
                partition,
            }),
            Appended::Duplicate(sequence) => Outcome::Duplicate(v1::Duplicate { sequence }),
        }),
    }
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn publish(
        &self,
        request: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        let started = std::time::Instant::now();
        let events = request.into_inner().events;
        if events.len() > self.max_batch_events {
            return Err(Status::invalid_argument(format!(
                "events: {} in one call, the limit is {} (--max-batch-events); split the batch",
                events.len(),
                self.max_batch_events
            )));
        }
        let _permit = self.admit().await?;
        let now = self.clock.now_us();
        let settings = self.publisher.settings;

        let mut results: Vec<Option<v1::PublishResult>> = vec![None; events.len()];
        let mut prepared = Vec::new();
        // For each prepared event, the request index it answers.
        let mut answers = Vec::new();
        // Repeats of an event earlier in the same call answer as its duplicates.
        let mut first_by_id: HashMap<String, usize> = HashMap::new();
        let mut repeats = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let fact = match fact_from_event(event).and_then(|f| {
                f.validate_new()?;
                check_event_time(f.event_time_us, now, &settings)?;
                Ok(f)
            }) {
                Ok(fact) => fact,
                Err(v) => {
                    results[i] = Some(rejected(v));
                    continue;
                }
            };
            let msg_id = message_id(&fact);
            if let Some(&k) = first_by_id.get(&msg_id) {
                repeats.push((i, k));
                continue;
            }
            first_by_id.insert(msg_id.clone(), prepared.len());
            let partition = partition_of(&fact.merchant_id, settings.partitions);
            prepared.push(Prepared {
                msg_id,
                partition,
                payload: Publisher::encode(now, v1::log_record::Body::Fact(event_from_fact(&fact))),
            });
            answers.push(i);
        }

        if !prepared.is_empty() {
            let appended = self.publisher.append_events(&prepared, now).await?;
            for (k, a) in appended.iter().enumerate() {
                results[answers[k]] = Some(outcome(*a, now, prepared[k].partition));
            }
            for (i, k) in repeats {
                let (Appended::Stored(seq) | Appended::Duplicate(seq)) = appended[k];
                results[i] = Some(outcome(
                    Appended::Duplicate(seq),
                    now,
                    prepared[k].partition,
                ));
            }
        }
        let results: Vec<_> = results
            .into_iter()
            .map(|r| r.expect("every event answered"))
            .collect();
        let count = |wanted: fn(&Outcome) -> bool| {
            results
                .iter()
                .filter(|r| r.outcome.as_ref().is_some_and(wanted))
                .count() as u64
        };
        self.metrics
            .answered("accepted", count(|o| matches!(o, Outcome::Accepted(_))));
        self.metrics
            .answered("duplicate", count(|o| matches!(o, Outcome::Duplicate(_))));
        self.metrics
            .answered("rejected", count(|o| matches!(o, Outcome::Rejected(_))));
        self.metrics.published(started);
        Ok(Response::new(v1::PublishResponse { results }))
    }

    async fn publish_dimension(
        &self,
        request: Request<v1::PublishDimensionRequest>,
    ) -> Result<Response<v1::PublishDimensionResponse>, Status> {
        let record = request
            .into_inner()
            .record
            .ok_or_else(|| Status::invalid_argument("record: required (fx or risk)"))?;
        let (subject, parsed, body) = match record {
            v1::publish_dimension_request::Record::Fx(fx) => {
                let parsed = fx_from_proto(&fx).map_err(|v| v.to_status())?;
                parsed
                    .validate()
                    .map_err(|e| FieldViolation::from(e).to_status())?;
                (
                    FX_SUBJECT,
                    DimRecord::Fx(parsed),
                    v1::log_record::Body::Fx(fx),
                )
            }
            v1::publish_dimension_request::Record::Risk(risk) => {
                let parsed = risk_from_proto(&risk).map_err(|v| v.to_status())?;
                parsed
                    .validate()
                    .map_err(|e| FieldViolation::from(e).to_status())?;
                (
                    RISK_SUBJECT,
                    DimRecord::Risk(parsed),
                    v1::log_record::Body::Risk(risk),
                )
            }
        };
        let _permit = self.admit().await?;
        let now = self.clock.now_us();
        let logged = self.dimensions.caught_up().await?;
        let held = match &parsed {
            DimRecord::Fx(fx) => logged.book.held_fx(fx),
            DimRecord::Risk(risk) => logged.book.held_risk(risk),
        };
        let (sequence, duplicate) = match held {
            // Answered from the log, also after JetStream's duplicate window.
            Held::Same(sequence) => (sequence, true),
            Held::Other(sequence) => {
                return Err(Status::already_exists(format!(
                    "{} is already in the log at sequence {sequence} with other content, and stays in force (a key, date and version is never replaced); publish a higher version to supersede it",
                    describe(&parsed)
                )));
            }
            Held::Nothing => {
                // The record's own content is its identity: a resend is absorbed.
                let msg_id = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&body_bytes(&body)));
                match self
                    .publisher
                    .append_dimension(subject, &msg_id, Publisher::encode(now, body))
                    .await?
                {
                    Appended::Stored(s) => (s, false),
                    Appended::Duplicate(s) => (s, true),
                }
            }
        };
        drop(logged);
        Ok(Response::new(v1::PublishDimensionResponse {
            sequence,
            ingest_time_us: now,
            duplicate,
        }))
    }
}

fn describe(record: &DimRecord) -> String {
    match record {
        DimRecord::Fx(fx) => format!(
            "the {} rate effective {} version {}",
            fx.currency, fx.effective_day, fx.version
        ),
        DimRecord::Risk(risk) => format!(
            "the risk tier of merchant '{}' effective {} version {}",
            risk.merchant_id, risk.effective_day, risk.version
        ),
    }
}

fn body_bytes(body: &v1::log_record::Body) -> Vec<u8> {
    v1::LogRecord {
        ingest_time_us: 0,
        body: Some(body.clone()),
        traceparent: String::new(),
    }
    .encode_to_vec()
}
