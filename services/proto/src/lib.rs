//! The public gRPC contract (`package payledger.v1`), generated once for every
//! service and client; conversions between wire messages and semantics types; and
//! the one place where a rejected field becomes a gRPC status.

pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::derive_partial_eq_without_eq)]
    tonic::include_proto!("payledger.v1");
}

mod convert;
pub mod reconcile;

pub use convert::{
    FieldViolation, current_row_from_proto, current_row_to_proto, daily_row_from_proto,
    daily_row_to_proto, event_from_fact, fact_from_event, fx_from_proto, kind_from_proto,
    kind_to_proto, record_from_log, risk_from_proto,
};

/// The encoded `FileDescriptorSet` of every payledger proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/payledger_descriptor.bin"));
