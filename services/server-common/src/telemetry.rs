//! Structured logs to stderr; `RUST_LOG` filters, `PAYLEDGER_LOG_FORMAT=json` for machines.

use tracing_subscriber::EnvFilter;

pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// Like [`init_tracing`], with another filter when `RUST_LOG` is unset.
pub fn init_tracing_with_default(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("PAYLEDGER_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests running services in one process) is harmless.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
