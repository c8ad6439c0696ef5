//! The public gRPC contract (`package payledger.v1`), generated once for every
//! service and client, plus the encoded descriptor set that gRPC reflection serves.

pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::derive_partial_eq_without_eq)]
    tonic::include_proto!("payledger.v1");
}

/// The encoded `FileDescriptorSet` of every payledger proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/payledger_descriptor.bin"));
