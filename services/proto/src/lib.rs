//! The public gRPC contract (`package payledger.v1`), generated once for every
//! service and client; conversions between wire messages and semantics types; and
//! the one place where a rejected field becomes a gRPC status.

pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::derive_partial_eq_without_eq)]
    tonic::include_proto!("payledger.v1");
}

mod convert;
pub mod lines;
pub mod page_token;
pub mod reconcile;

pub use convert::{
    FieldViolation, current_row_from_proto, current_row_to_proto, daily_row_from_proto,
    daily_row_to_proto, event_from_fact, fact_from_event, fx_from_proto, kind_from_proto,
    kind_to_proto, record_from_log, risk_from_proto,
};

/// Metadata key on the UNAVAILABLE with which a replay coordinator refuses
/// StartReplay and CancelReplay before doing anything: it does not lead, or NATS
/// did not answer before the replay was recorded. A call refused with this key is
/// safe to send again (to it or another replica);
/// an UNAVAILABLE without it (a broken connection, a proxy) may come after the
/// call took effect.
pub const NOT_LEADER_METADATA: &str = "payledger-not-leader";

/// The encoded `FileDescriptorSet` of every payledger proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/payledger_descriptor.bin"));
