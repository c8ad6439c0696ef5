//! What every PayLedger service shares: the NATS topology (stream, subjects, KV
//! buckets, key encoding), gRPC serving with health and reflection, telemetry,
//! the wall clock and shutdown on SIGTERM.

pub mod atomic_batch;
pub mod auth;
pub mod clock;
pub mod config;
pub mod connection;
pub mod local_nats;
pub mod metrics;
pub mod readiness;
mod reload;
pub mod request_errors;
pub mod serve;
pub mod shutdown;
pub mod stall;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod trace_context;
