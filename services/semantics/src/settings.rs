//! Settings that change what rows mean, and the partition function.

use serde::{Deserialize, Serialize};

use crate::time::MICROS_PER_DAY;
use crate::{SEMANTICS_VERSION, STATE_FORMAT};

const MICROS_PER_MINUTE: i64 = 60_000_000;

/// Every setting here is part of the semantics (docs/semantics.md R9). The stream's
/// share ([`StreamSettings`]) is fixed when the stream is created; the projection's
/// share ([`ProjectionSettings`]) is each projector's own, named with the semantics
/// version in the [`Settings::version_key`]. State of one version key is never
/// mixed with another's.
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
    #[error(
        "malformed stream settings '{0}' (expected partitions=…;dedup_horizon_us=…;max_clock_skew_us=…)"
    )]
    Malformed(String),
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

    /// What ingest enforces and the log was written under: fixed per stream.
    pub fn stream(&self) -> StreamSettings {
        StreamSettings {
            partitions: self.partitions,
            dedup_horizon_us: self.dedup_horizon_us,
            max_clock_skew_us: self.max_clock_skew_us,
        }
    }

    /// The stream's settings with a projection's own.
    pub fn of(stream: StreamSettings, projection: ProjectionSettings) -> Self {
        Self {
            partitions: stream.partitions,
            dedup_horizon_us: stream.dedup_horizon_us,
            max_clock_skew_us: stream.max_clock_skew_us,
            allowed_lateness_us: projection.allowed_lateness_us,
            bucket_width_us: projection.bucket_width_us,
        }
    }

    pub fn projection(&self) -> ProjectionSettings {
        ProjectionSettings {
            allowed_lateness_us: self.allowed_lateness_us,
            bucket_width_us: self.bucket_width_us,
        }
    }

    /// What the version key hashes, spelled out: the semantics and state format
    /// versions, the projection's own settings and the stream's fingerprint.
    pub fn version_canonical(&self) -> String {
        format!(
            "semantics_version={SEMANTICS_VERSION};state_format={STATE_FORMAT};allowed_lateness_us={};bucket_width_us={};stream={}",
            self.allowed_lateness_us,
            self.bucket_width_us,
            self.stream().fingerprint()
        )
    }

    /// Names everything derived under these settings by this build's semantics
    /// (docs/semantics.md R9): checkpoints, replay states, progress and commits.
    /// `v{SEMANTICS_VERSION}-` then 16 hex digits, so an operator sees the version.
    pub fn version_key(&self) -> String {
        format!(
            "v{SEMANTICS_VERSION}-{:016x}",
            fnv1a_64(self.version_canonical().as_bytes())
        )
    }

    /// How the first streams, archive footers and checkpoints named all five
    /// settings at once, under semantics version 1. Kept only to recognise data
    /// written that way; nothing new is written under it.
    pub fn legacy_canonical(&self) -> String {
        format!(
            "semantics_version=1;partitions={};dedup_horizon_us={};allowed_lateness_us={};max_clock_skew_us={};bucket_width_us={}",
            self.partitions,
            self.dedup_horizon_us,
            self.allowed_lateness_us,
            self.max_clock_skew_us,
            self.bucket_width_us
        )
    }

    /// The hash of [`Settings::legacy_canonical`], as those footers and checkpoints hold it.
    pub fn legacy_fingerprint(&self) -> String {
        format!("{:016x}", fnv1a_64(self.legacy_canonical().as_bytes()))
    }
}

/// The settings a stream is created with and ingest enforces (docs/semantics.md
/// R9): changing any of them needs a new stream, since a merchant's partition and
/// which events were refused depend on them, and the fold reads the horizon too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSettings {
    pub partitions: u32,
    pub dedup_horizon_us: i64,
    pub max_clock_skew_us: i64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Settings::default().stream()
    }
}

impl StreamSettings {
    pub fn canonical(&self) -> String {
        format!(
            "partitions={};dedup_horizon_us={};max_clock_skew_us={}",
            self.partitions, self.dedup_horizon_us, self.max_clock_skew_us
        )
    }

    /// 16 hex digits, written on the stream and in every archive footer.
    pub fn fingerprint(&self) -> String {
        format!("{:016x}", fnv1a_64(self.canonical().as_bytes()))
    }

    /// Parses [`StreamSettings::canonical`].
    pub fn parse(text: &str) -> Result<Self, SettingsError> {
        let mut settings = Self::default();
        let mut seen = 0;
        for pair in text.split(';') {
            let bad = || SettingsError::Malformed(text.to_string());
            let (key, value) = pair.split_once('=').ok_or_else(bad)?;
            match key {
                "partitions" => settings.partitions = value.parse().map_err(|_| bad())?,
                "dedup_horizon_us" => {
                    settings.dedup_horizon_us = value.parse().map_err(|_| bad())?
                }
                "max_clock_skew_us" => {
                    settings.max_clock_skew_us = value.parse().map_err(|_| bad())?
                }
                _ => return Err(bad()),
            }
            seen += 1;
        }
        if seen != 3 {
            return Err(SettingsError::Malformed(text.to_string()));
        }
        Settings::of(settings, ProjectionSettings::default()).validate()?;
        Ok(settings)
    }
}

/// The stream settings as a stream recorded them. The first streams recorded all
/// five settings under semantics 1 (`legacy`), and archive segments of that time
/// carry the fingerprint of those: they stay readable as facts of this stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedStream {
    pub settings: StreamSettings,
    pub legacy: Option<Settings>,
}

impl RecordedStream {
    /// A stream created with only its own settings recorded.
    pub fn new(settings: StreamSettings) -> Self {
        Self {
            settings,
            legacy: None,
        }
    }

    pub fn fingerprint(&self) -> String {
        self.settings.fingerprint()
    }

    /// Whether an archive footer's recorded fingerprints (stream, legacy) name this
    /// stream. A legacy fingerprint matches when it is the one recomputed from the
    /// settings the stream itself recorded.
    pub fn accepts(
        &self,
        stream_fingerprint: Option<&str>,
        legacy_fingerprint: Option<&str>,
    ) -> bool {
        match (stream_fingerprint, legacy_fingerprint) {
            (Some(fingerprint), _) => fingerprint == self.fingerprint(),
            (None, Some(legacy)) => self
                .legacy
                .is_some_and(|s| s.legacy_fingerprint() == legacy),
            (None, None) => false,
        }
    }
}

/// The settings only the fold reads: a projector, replay worker or coordinator
/// takes them from its own configuration, and they are part of its version key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionSettings {
    /// An applied event older than this at ingest is counted late; days close this long after they end.
    pub allowed_lateness_us: i64,
    /// Width of the event-time buckets of the peak; divides a day.
    pub bucket_width_us: i64,
}

impl Default for ProjectionSettings {
    fn default() -> Self {
        Settings::default().projection()
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
