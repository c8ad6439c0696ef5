//! Traces end to end: the services export spans over OTLP/gRPC to a receiver in
//! this test (opentelemetry-proto's TraceService on a loopback port). One event
//! published with the test's own `traceparent` is one trace: ingest's Publish call
//! and JetStream publish, then, through the NATS message headers, the projector's
//! apply and KV row write. A replay is one trace too, with a span per shard that
//! the worker's RunShard continues. And spans still buffered when a service gets
//! SIGTERM are exported before it exits.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use payledger_e2e::{Harness, Service, ingest_client, now_us, query_client};
use payledger_proto::v1::{self, EventKind};
use tonic::{Request, Response, Status};

/// One span as the receiver got it (ids hex-encoded).
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    links: Vec<String>,
}

/// The OTLP/gRPC trace receiver: keeps every span exported to it.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("spans lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        links: span.links.iter().map(|l| hex(&l.span_id)).collect(),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on a free loopback port until the test ends; returns the endpoint.
    async fn start(&self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(endpoint)
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans
            .lock()
            .expect("spans lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Polls until `done` holds for the spans of `trace_id`.
    async fn wait_for(
        &self,
        trace_id: &str,
        within: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.of_trace(trace_id);
            if done(&spans) {
                return Ok(spans);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "trace {trace_id} incomplete after {within:?}: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The one span of `trace` named `name` from `service`.
fn one<'a>(spans: &'a [Received], service: &str, name: &str) -> anyhow::Result<&'a Received> {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    anyhow::ensure!(
        found.len() == 1,
        "{} spans '{name}' of {service} in {spans:#?}",
        found.len()
    );
    Ok(found[0])
}

fn has(spans: &[Received], service: &str, name: &str) -> bool {
    spans.iter().any(|s| s.service == service && s.name == name)
}

/// A trace id and a span id of the test's own, and their `traceparent`.
fn client_context(salt: u64) -> (String, String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let trace_id = format!(
        "{:032x}",
        nanos ^ (u128::from(std::process::id()) << 64) | 1
    );
    let span_id = format!("{:016x}", salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let traceparent = format!("00-{trace_id}-{span_id}-01");
    (trace_id, span_id, traceparent)
}

fn with_traceparent<T>(message: T, traceparent: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse()?);
    Ok(request)
}

/// What every traced service gets: the receiver, and a short export delay.
fn otel_env(endpoint: &str, schedule_delay_ms: u64) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.into()),
        (
            "OTEL_BSP_SCHEDULE_DELAY".into(),
            schedule_delay_ms.to_string(),
        ),
    ]
}

fn event(event_id: &str, merchant_id: &str) -> v1::Event {
    v1::Event {
        event_id: event_id.into(),
        merchant_id: merchant_id.into(),
        kind: EventKind::PaymentCaptured as i32,
        amount_minor: 12_345,
        currency: "EUR".into(),
        event_time_us: now_us() - 60_000_000,
        corrects_event_id: String::new(),
    }
}

/// Publishes one event in the trace of `traceparent`; returns its sequence.
async fn publish_traced(
    ingest: &Service,
    event: v1::Event,
    traceparent: &str,
) -> anyhow::Result<u64> {
    let mut client = ingest_client(&ingest.url()).await?;
    let response = client
        .publish(with_traceparent(
            v1::PublishRequest {
                events: vec![event],
            },
            traceparent,
        )?)
        .await?
        .into_inner();
    match response.results.first().and_then(|r| r.outcome.clone()) {
        Some(v1::publish_result::Outcome::Accepted(a)) => Ok(a.sequence),
        other => anyhow::bail!("the event was not accepted: {other:?}"),
    }
}

/// Waits until the query service serves the merchant's current row.
async fn wait_served(query: &Service, merchant_id: &str) -> anyhow::Result<()> {
    let mut client = query_client(&query.url()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let served = client
            .get_current_exposure(v1::GetCurrentExposureRequest {
                merchant_id: merchant_id.into(),
            })
            .await;
        if served.is_ok_and(|e| !e.get_ref().rows.is_empty()) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{merchant_id} not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const INGEST: &str = "payledger-ingest";
const PROJECTOR: &str = "payledger-projector";
const COORDINATOR: &str = "payledger-replay-coordinator";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_one_trace_from_publish_to_the_kv_write() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let env = otel_env(&receiver.start().await?, 100);
    let mut h = Harness::start()?;
    let store = h.store();
    let ingest = h
        .spawn_with_env(INGEST, &["--heartbeat-interval", "0s"], &env)
        .await?;
    let projector = h
        .spawn_with_env(PROJECTOR, &["--mode", "stream", "--store", &store], &env)
        .await?;
    let query = h.spawn("payledger-query", &[]).await?;

    let (trace_id, client_span, traceparent) = client_context(1);
    let traced = event("e-traced-1", "m-traced");
    publish_traced(&ingest, traced.clone(), &traceparent).await?;
    wait_served(&query, "m-traced").await?;

    let spans = receiver
        .wait_for(&trace_id, Duration::from_secs(30), |spans| {
            // Each process exports on its own schedule: wait for both.
            has(spans, INGEST, "payledger.v1.IngestService/Publish")
                && has(spans, PROJECTOR, "kv write")
        })
        .await
        .map_err(|e| e.context(format!("projector log:\n{}", projector.log())))?;
    // ingest: the call, child of the client's span, and the publish inside it
    let call = one(&spans, INGEST, "payledger.v1.IngestService/Publish")?;
    assert_eq!(call.parent_span_id, client_span);
    let publish = one(&spans, INGEST, "jetstream publish")?;
    assert_eq!(publish.parent_span_id, call.span_id);
    // projector: the apply continues the publish (through the NATS headers), the
    // row write continues the apply
    let apply = one(&spans, PROJECTOR, "apply")?;
    assert_eq!(apply.parent_span_id, publish.span_id);
    let write = one(&spans, PROJECTOR, "kv write")?;
    assert_eq!(write.parent_span_id, apply.span_id);
    assert!(
        write.links.is_empty(),
        "one traced record, no link: {write:?}"
    );

    // A resend (same event, another trace) is still a duplicate: tracing changes
    // neither the Nats-Msg-Id nor the payload.
    let (_, _, other) = client_context(2);
    let mut client = ingest_client(&ingest.url()).await?;
    let resent = client
        .publish(with_traceparent(
            v1::PublishRequest {
                events: vec![traced],
            },
            &other,
        )?)
        .await?
        .into_inner();
    assert!(
        matches!(
            resent.results[0].outcome,
            Some(v1::publish_result::Outcome::Duplicate(_))
        ),
        "{resent:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_one_trace_with_a_span_per_shard() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let env = otel_env(&receiver.start().await?, 100);
    let mut h = Harness::start()?;
    let store = h.store();
    let ingest = h
        .spawn_with_env(
            INGEST,
            &[
                "--heartbeat-interval",
                "0s",
                "--archive-store",
                &store,
                "--archive-flush-interval",
                "100ms",
            ],
            &env,
        )
        .await?;
    // Stream projection and replay worker in one process.
    let projector = h
        .spawn_with_env(PROJECTOR, &["--store", &store], &env)
        .await?;
    let (_, _, traceparent) = client_context(3);
    let replayed = event("e-replayed-1", "m-replayed");
    let day = payledger_semantics::Day::of_micros(replayed.event_time_us).to_string();
    let seq = publish_traced(&ingest, replayed, &traceparent).await?;
    let archive = payledger_storage::ArchiveStore::new(
        payledger_storage::open_store(&store)?,
        payledger_semantics::RecordedStream::new(payledger_semantics::StreamSettings::default()),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while payledger_projector::replay::latest_cutoff(&archive).await? < seq {
        anyhow::ensure!(Instant::now() < deadline, "the archive did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let coordinator = h
        .spawn_with_env(
            COORDINATOR,
            &["--store", &store, "--workers", &projector.url()],
            &env,
        )
        .await?;

    let (trace_id, client_span, traceparent) = client_context(4);
    let mut client = v1::replay_coordinator_client::ReplayCoordinatorClient::new(
        tonic::transport::Channel::from_shared(coordinator.url())?
            .connect()
            .await?,
    );
    let started = client
        .start_replay(with_traceparent(
            v1::StartReplayRequest {
                from_day: day.clone(),
                to_day: day,
                reason: "tracing test".into(),
                cutoff: 0,
                from_genesis: false,
            },
            &traceparent,
        )?)
        .await?
        .into_inner();
    let shards = started.shards.len();
    assert!(shards > 1, "{started:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replay = client
            .get_replay(v1::GetReplayRequest {
                replay_id: started.replay_id.clone(),
            })
            .await?
            .into_inner();
        if replay.state >= i32::from(v1::ReplayState::Succeeded) {
            anyhow::ensure!(
                replay.state == i32::from(v1::ReplayState::Succeeded),
                "{replay:?}"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "replay not done: {replay:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let spans = receiver
        .wait_for(&trace_id, Duration::from_secs(30), |spans| {
            has(spans, COORDINATOR, "replay")
                && spans.iter().filter(|s| s.name == "run_shard").count() >= shards
        })
        .await
        .map_err(|e| e.context(format!("coordinator log:\n{}", coordinator.log())))?;
    let call = one(
        &spans,
        COORDINATOR,
        "payledger.v1.ReplayCoordinator/StartReplay",
    )?;
    assert_eq!(call.parent_span_id, client_span);
    let replay = one(&spans, COORDINATOR, "replay")?;
    assert_eq!(replay.parent_span_id, call.span_id);
    let attempts: Vec<&Received> = spans
        .iter()
        .filter(|s| s.service == COORDINATOR && s.name == "shard")
        .collect();
    assert_eq!(attempts.len(), shards, "one attempt per shard");
    assert!(attempts.iter().all(|a| a.parent_span_id == replay.span_id));
    // Each RunShard call on the worker continues one shard attempt.
    let calls: Vec<&Received> = spans
        .iter()
        .filter(|s| s.service == PROJECTOR && s.name == "payledger.v1.ProjectorService/RunShard")
        .collect();
    assert_eq!(calls.len(), shards);
    for call in &calls {
        assert!(
            attempts.iter().any(|a| a.span_id == call.parent_span_id),
            "{call:?} continues no shard attempt"
        );
        assert!(
            spans.iter().any(|s| s.service == PROJECTOR
                && s.name == "run_shard"
                && s.parent_span_id == call.span_id),
            "no run_shard span under {call:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_buffered_at_sigterm_are_exported_before_exit() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    // Ten minutes between exports: only the shutdown can send these spans.
    let endpoint = receiver.start().await?;
    let env = otel_env(&endpoint, 600_000);
    let mut h = Harness::start()?;
    let mut ingest = h
        .spawn_with_env(INGEST, &["--heartbeat-interval", "0s"], &env)
        .await?;
    let (trace_id, _, traceparent) = client_context(5);
    publish_traced(&ingest, event("e-flushed-1", "m-flushed"), &traceparent).await?;
    // Evidence that spans ended by now have had time to arrive: a second ingest,
    // exporting every 50 ms, gets the spans of a later call to the receiver.
    let eager = h
        .spawn_with_env(
            INGEST,
            &["--heartbeat-interval", "0s"],
            &otel_env(&endpoint, 50),
        )
        .await?;
    let (eager_trace, _, eager_parent) = client_context(6);
    publish_traced(&eager, event("e-flushed-2", "m-flushed"), &eager_parent).await?;
    receiver
        .wait_for(&eager_trace, Duration::from_secs(10), |spans| {
            has(spans, INGEST, "payledger.v1.IngestService/Publish")
        })
        .await?;
    assert!(
        receiver.of_trace(&trace_id).is_empty(),
        "exported before the shutdown"
    );
    ingest.terminate().await?;
    let spans = receiver
        .wait_for(&trace_id, Duration::from_secs(5), |spans| {
            has(spans, INGEST, "jetstream publish")
                && has(spans, INGEST, "payledger.v1.IngestService/Publish")
        })
        .await?;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    Ok(())
}
