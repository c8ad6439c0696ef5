//! Settings that change what rows mean, and the partition function.

use serde::{Deserialize, Serialize};

use crate::SEMANTICS_VERSION;
use crate::time::MICROS_PER_DAY;

const MICROS_PER_MINUTE: i64 = 60_000_000;

/// Every setting here is part of the semantics (docs/semantics.md R9): state, archives and
/// snapshots written under one fingerprint are never mixed with another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Fixed when the stream is created; a merchant's partition depends on it.
    pub partitions: u32,
    /// `H`: how long an identity is remembered, and the oldest event ingest accepts.
    pub dedup_horizon_us: i64,
    /// An applied event older than this at ingest is counted late; days close this long after they end.
    pub allowed_lateness_us: i64,
    /// How far in the future of ingest's clock an event_time may lie.
    pub max_clock_skew_us: i64,
    /// Width of the event-time buckets of the peak; divides a day.
    pub bucket_width_us: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            partitions: 16,
            dedup_horizon_us: 35 * MICROS_PER_DAY,
            allowed_lateness_us: 60 * MICROS_PER_MINUTE,
            max_clock_skew_us: 5 * MICROS_PER_MINUTE,
            bucket_width_us: 15 * MICROS_PER_MINUTE,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("partitions must be between 1 and 4096, got {0}")]
    Partitions(u32),
    #[error("{name} must be positive, got {value} µs")]
    NotPositive { name: &'static str, value: i64 },
    #[error("bucket width must divide a day into whole buckets, got {0} µs")]
    BucketWidth(i64),
}

impl Settings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=4096).contains(&self.partitions) {
            return Err(SettingsError::Partitions(self.partitions));
        }
        for (name, value) in [
            ("dedup horizon", self.dedup_horizon_us),
            ("allowed lateness", self.allowed_lateness_us),
            ("max clock skew", self.max_clock_skew_us),
            ("bucket width", self.bucket_width_us),
        ] {
            if value <= 0 {
                return Err(SettingsError::NotPositive { name, value });
            }
        }
        if MICROS_PER_DAY % self.bucket_width_us != 0 {
            return Err(SettingsError::BucketWidth(self.bucket_width_us));
        }
        Ok(())
    }

    pub fn buckets_per_day(&self) -> i64 {
        MICROS_PER_DAY / self.bucket_width_us
    }

    /// The settings and the semantics version, spelled out; its hash is the fingerprint.
    pub fn canonical(&self) -> String {
        format!(
            "semantics_version={};partitions={};dedup_horizon_us={};allowed_lateness_us={};max_clock_skew_us={};bucket_width_us={}",
            SEMANTICS_VERSION,
            self.partitions,
            self.dedup_horizon_us,
            self.allowed_lateness_us,
            self.max_clock_skew_us,
            self.bucket_width_us
        )
    }

    /// 16 hex digits naming these settings under this semantics version.
    pub fn fingerprint(&self) -> String {
        format!("{:016x}", fnv1a_64(self.canonical().as_bytes()))
    }
}

/// FNV-1a 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition that owns a merchant: `fnv1a_64(merchant_id) % partitions`.
pub fn partition_of(merchant_id: &str, partitions: u32) -> u32 {
    (fnv1a_64(merchant_id.as_bytes()) % u64::from(partitions)) as u32
}
