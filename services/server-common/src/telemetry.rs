//! Structured logs to stderr; `RUST_LOG` filters, `PAYLEDGER_LOG_FORMAT=json` for machines.
//!
//! Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, the info-level spans of the payledger crates are also exported over
//! OTLP/gRPC, batched on a background thread (the standard `OTEL_BSP_*`,
//! `OTEL_TRACES_SAMPLER*`, `OTEL_RESOURCE_ATTRIBUTES` variables apply;
//! `OTEL_SERVICE_NAME` overrides the binary's name). `RUST_LOG` decides what is
//! logged, not what is exported. Without an endpoint nothing of OpenTelemetry is
//! set up and [`exporting`] is false, so the propagation in [`crate::trace_context`]
//! costs one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans of this process are exported: only then is trace context read
/// from and written into gRPC metadata and NATS headers.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the trace exporter of the process; dropping it (at the end of `main`,
/// after the service drained) exports the spans still buffered and shuts it down.
#[must_use = "dropping the guard shuts the trace exporter down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            // Blocks until the last batch is sent (5 s at most). The main future runs
            // on its own thread, so the runtime's workers still drive the export.
            if let Err(e) = provider.shutdown() {
                eprintln!("trace export: shutdown: {e}");
            }
        }
    }
}

/// Logging, and trace export when an endpoint is configured, for `service` (the
/// binary's name, `service.name` in traces). Call from inside the tokio runtime:
/// the OTLP exporter's connection lives on it.
pub fn init_tracing(service: &str) -> Telemetry {
    init_tracing_with_default(service, "info")
}

/// Like [`init_tracing`], with another filter when `RUST_LOG` is unset.
pub fn init_tracing_with_default(service: &str, default_filter: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("PAYLEDGER_LOG_FORMAT").is_ok_and(|v| v == "json");
    let logs = fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let logs = if json {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let provider = match otlp_provider(service) {
        Ok(provider) => provider,
        Err(e) => {
            eprintln!("trace export disabled: {e}");
            None
        }
    };
    let traces = provider.as_ref().map(|provider| {
        // Our own spans only: the exporter's own gRPC client (tonic, h2, hyper) must
        // not trace itself, whatever RUST_LOG says.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("payledger"))
            .with_filter(
                Targets::new()
                    .with_default(LevelFilter::OFF)
                    .with_target("payledger", LevelFilter::INFO),
            )
    });
    // A second init (tests running services in one process) is harmless.
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    match provider {
        Some(provider) if installed => {
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            EXPORTING.store(true, Ordering::Relaxed);
            Telemetry {
                provider: Some(provider),
            }
        }
        Some(provider) => {
            let _ = provider.shutdown();
            Telemetry { provider: None }
        }
        None => Telemetry { provider: None },
    }
}

fn configured(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.trim().is_empty())
}

/// The tracer provider exporting over OTLP/gRPC, when an endpoint is configured
/// (and `OTEL_SDK_DISABLED` is not `true`).
fn otlp_provider(service: &str) -> anyhow::Result<Option<SdkTracerProvider>> {
    let wanted = configured("OTEL_EXPORTER_OTLP_ENDPOINT")
        || configured("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    if !wanted || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    // The exporter reads the endpoint, headers, timeout and compression from the
    // standard variables; the connection is made lazily, so a collector that is
    // down delays nothing here.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !configured("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}
