//! W3C trace context (`traceparent`, `tracestate`) across process boundaries: in
//! gRPC metadata (a tower layer opens a server span per call, child of the
//! caller's context) and in NATS message headers (ingest writes them beside
//! `Nats-Msg-Id`, the projector reads them back). Headers, not the record's
//! payload, are the contract: the payload, and the `Nats-Msg-Id` hashed from the
//! event, stay the same whatever the trace, so a retry is still a duplicate.
//!
//! Everything here is a no-op unless [`crate::telemetry::exporting`]: without an
//! OTLP endpoint no span is opened and no header is read or written.

use std::task::{Context as TaskContext, Poll};

use futures::future::Either;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry::exporting;

/// The trace context of one span, encoded once and then copied into any number
/// of outgoing messages or calls. Empty when traces are not exported.
#[derive(Clone, Debug, Default)]
pub struct TraceHeaders(Vec<(String, String)>);

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

impl TraceHeaders {
    /// The context of `span` (nothing when the span is not exported).
    pub fn of(span: &tracing::Span) -> TraceHeaders {
        let mut headers = TraceHeaders::default();
        if exporting() && !span.is_disabled() {
            let cx = span.context();
            if cx.span().span_context().is_valid() {
                TraceContextPropagator::new().inject_context(&cx, &mut headers);
            }
        }
        headers
    }

    /// The context of the current span.
    pub fn current() -> TraceHeaders {
        TraceHeaders::of(&tracing::Span::current())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn add_to_nats(&self, headers: &mut async_nats::HeaderMap) {
        for (key, value) in &self.0 {
            headers.insert(key.as_str(), value.as_str());
        }
    }

    pub fn add_to_grpc(&self, metadata: &mut tonic::metadata::MetadataMap) {
        for (key, value) in &self.0 {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                metadata.insert(key, value);
            }
        }
    }
}

struct NatsExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .map(|(k, _)| AsRef::<str>::as_ref(k))
            .collect()
    }
}

struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A remote parent, when traces are exported and `extractor` holds a valid one.
fn remote_parent(extractor: &dyn Extractor) -> Option<Context> {
    if !exporting() || extractor.get("traceparent").is_none() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), extractor);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The trace context a NATS message carries, when traces are exported.
pub fn from_nats(headers: Option<&async_nats::HeaderMap>) -> Option<Context> {
    headers.and_then(|h| remote_parent(&NatsExtractor(h)))
}

/// The trace context of an incoming HTTP/2 (gRPC) request, when traces are exported.
pub fn from_http(headers: &http::HeaderMap) -> Option<Context> {
    remote_parent(&HttpExtractor(headers))
}

/// The span `make` makes when traces are exported, else a disabled one: for spans
/// that exist for the trace alone and should cost (and log) nothing otherwise.
pub fn exported_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if exporting() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// A span made by `make` that continues the trace a NATS message carries; None,
/// and `make` not called, when the message carries none, its trace is not sampled
/// (sampling decided at the root costs the consumer nothing per record), or traces
/// are not exported.
pub fn span_from_nats(
    headers: Option<&async_nats::HeaderMap>,
    make: impl FnOnce() -> tracing::Span,
) -> Option<tracing::Span> {
    let parent = from_nats(headers).filter(|cx| cx.span().span_context().is_sampled())?;
    let span = make();
    let _ = span.set_parent(parent);
    Some(span)
}

/// What a later span, in another task, needs to join the trace of a span.
#[derive(Clone, Debug)]
pub struct SpanLink(SpanContext);

impl SpanLink {
    /// The link to `span`, when it is exported.
    pub fn of(span: &tracing::Span) -> Option<SpanLink> {
        if !exporting() {
            return None;
        }
        let sc = span.context().span().span_context().clone();
        sc.is_valid().then_some(SpanLink(sc))
    }
}

/// Makes `span` (not entered yet) a child of the first of `links` and links it to
/// the others: a span that does the work of several traces at once.
pub fn join_traces(span: &tracing::Span, links: &[SpanLink]) {
    let Some((first, others)) = links.split_first() else {
        return;
    };
    let _ = span.set_parent(Context::new().with_remote_span_context(first.0.clone()));
    for other in others {
        span.add_link(other.0.clone());
    }
}

/// Opens a server span per gRPC call, child of the caller's `traceparent` when it
/// sends one (else the root of a new trace), and runs the handler inside it, so
/// the handler's spans and the NATS messages or calls it makes join the trace.
/// Health checks and reflection are left out: probes would flood the traces.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> GrpcTrace<S> {
        GrpcTrace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<tracing::instrument::Instrumented<S::Future>, S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if !exporting()
            || path.starts_with("/grpc.health.")
            || path.starts_with("/grpc.reflection.")
        {
            return Either::Right(self.inner.call(request));
        }
        let name = path.trim_start_matches('/');
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        let span = tracing::info_span!(
            "grpc",
            otel.name = name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
        );
        if let Some(parent) = from_http(request.headers()) {
            let _ = span.set_parent(parent);
        }
        let future = span.in_scope(|| self.inner.call(request));
        Either::Left(future.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_read_or_written_when_traces_are_not_exported() {
        assert!(!exporting());
        assert!(TraceHeaders::current().is_empty());
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert!(from_http(&headers).is_none());
    }

    #[test]
    fn a_traceparent_reads_back_as_the_same_trace() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let cx = TraceContextPropagator::new()
            .extract_with_context(&Context::new(), &NatsExtractor(&headers));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = TraceHeaders::default();
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        let mut nats = async_nats::HeaderMap::new();
        out.add_to_nats(&mut nats);
        assert_eq!(
            nats.get("traceparent").map(|v| v.as_str()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
}
