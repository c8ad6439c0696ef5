//! The NATS side of the contract: one stream of facts, dimension records and
//! heartbeats; KV buckets of derived rows; and how ids become KV keys.
//!
//! The semantics settings are recorded in the stream's metadata when ingest creates
//! it. Projector and query read them from there, so every process agrees on the
//! partitions and horizons of the log they read.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use base64::Engine;
use payledger_semantics::{Currency, Day, Settings};

pub const STREAM: &str = "PAYLEDGER_EVENTS";
pub const EVENT_SUBJECT_PREFIX: &str = "payledger.events.p";
pub const FX_SUBJECT: &str = "payledger.dims.fx";
pub const RISK_SUBJECT: &str = "payledger.dims.risk";
pub const DIMS_SUBJECTS: &str = "payledger.dims.>";

pub const CURRENT_BUCKET: &str = "exposure_current";
pub const DAILY_BUCKET: &str = "exposure_daily";
pub const PROGRESS_BUCKET: &str = "projector_progress";
/// Partition ownership leases (docs/failure-contract.md), one key `p{N}` per partition.
pub const LEASE_BUCKET: &str = "projector_leases";

const META_SETTINGS: &str = "payledger.settings";
const META_FINGERPRINT: &str = "payledger.settings_fingerprint";

pub fn event_subject(partition: u32) -> String {
    format!("{EVENT_SUBJECT_PREFIX}{partition}")
}

/// The partition named by an event subject, if it is one.
pub fn partition_of_subject(subject: &str) -> Option<u32> {
    subject.strip_prefix(EVENT_SUBJECT_PREFIX)?.parse().ok()
}

/// KV keys allow only `[-/_=.a-zA-Z0-9]` without empty tokens, while ids may hold
/// `:` and `..`: ids are encoded as base64url without padding.
pub fn encode_id(id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())
}

pub fn current_key(merchant_id: &str, currency: Currency) -> String {
    format!("{}.{}", encode_id(merchant_id), currency)
}

pub fn daily_key(merchant_id: &str, day: Day, currency: Currency) -> String {
    format!("{}.{}.{}", encode_id(merchant_id), day, currency)
}

pub fn progress_key(partition: u32) -> String {
    format!("p{partition}")
}

/// How the stream is created (only when missing).
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub max_age: Duration,
    pub max_message_bytes: i32,
}

/// Creates the stream if missing, with the settings in its metadata; if it exists,
/// checks that it was created under the same settings.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &Settings,
    options: &StreamOptions,
) -> anyhow::Result<stream::Stream> {
    let mut metadata = std::collections::HashMap::new();
    metadata.insert(META_SETTINGS.to_string(), settings.canonical());
    metadata.insert(META_FINGERPRINT.to_string(), settings.fingerprint());
    let config = stream::Config {
        name: STREAM.to_string(),
        // A wildcard is a whole token: `payledger.events.*`, not `…p*`.
        subjects: vec!["payledger.events.*".to_string(), DIMS_SUBJECTS.to_string()],
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        duplicate_window: options.duplicate_window,
        max_age: options.max_age,
        max_message_size: options.max_message_bytes,
        allow_atomic_publish: true,
        allow_direct: true,
        metadata,
        ..Default::default()
    };
    let stream = js.get_or_create_stream(config).await?;
    let recorded = read_settings(js).await?;
    if recorded != *settings {
        anyhow::bail!(
            "stream {STREAM} was created with settings [{}], but this process is configured with [{}]; \
             use the stream's settings or create a new stream",
            recorded.canonical(),
            settings.canonical()
        );
    }
    Ok(stream)
}

/// The semantics settings the stream was created with.
pub async fn read_settings(js: &jetstream::Context) -> anyhow::Result<Settings> {
    let mut stream = js.get_stream(STREAM).await.map_err(|e| {
        anyhow::anyhow!(
            "stream {STREAM} not found ({e}); start ingest first, it creates the stream"
        )
    })?;
    let info = stream.info().await?;
    let canonical = info.config.metadata.get(META_SETTINGS).ok_or_else(|| {
        anyhow::anyhow!("stream {STREAM} has no '{META_SETTINGS}' metadata; it was not created by payledger ingest")
    })?;
    parse_canonical(canonical)
}

fn parse_canonical(text: &str) -> anyhow::Result<Settings> {
    let mut settings = Settings::default();
    for pair in text.split(';') {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("malformed settings metadata '{text}'"))?;
        match key {
            "semantics_version" => {
                let v: u32 = value.parse()?;
                anyhow::ensure!(
                    v == payledger_semantics::SEMANTICS_VERSION,
                    "the stream was written under semantics version {v}, this binary implements {}",
                    payledger_semantics::SEMANTICS_VERSION
                );
            }
            "partitions" => settings.partitions = value.parse()?,
            "dedup_horizon_us" => settings.dedup_horizon_us = value.parse()?,
            "allowed_lateness_us" => settings.allowed_lateness_us = value.parse()?,
            "max_clock_skew_us" => settings.max_clock_skew_us = value.parse()?,
            "bucket_width_us" => settings.bucket_width_us = value.parse()?,
            other => anyhow::bail!("unknown setting '{other}' in stream metadata"),
        }
    }
    settings.validate()?;
    Ok(settings)
}

/// The semantics settings of the stream, waiting (and saying so) until ingest has
/// created it: services start in any order.
pub async fn wait_for_settings(js: &jetstream::Context) -> Settings {
    loop {
        match read_settings(js).await {
            Ok(settings) => return settings,
            Err(e) => {
                tracing::info!(error = %e, "waiting for the stream");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// The bucket `config` names, created if missing. Services start together, so
/// another process may create it between our look and our create (its stream
/// then differs, e.g. already allows atomic batches, and ours is refused): look
/// again before giving up.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(created) => js
            .get_key_value(&bucket)
            .await
            .map_err(|_| anyhow::anyhow!("cannot create KV bucket {bucket}: {created}")),
    }
}

/// Creates the row buckets if missing. Their streams allow atomic batches, which
/// the projector uses for fenced, coalesced row writes.
pub async fn ensure_buckets(js: &jetstream::Context, replicas: usize) -> anyhow::Result<()> {
    for bucket in [CURRENT_BUCKET, DAILY_BUCKET, PROGRESS_BUCKET, LEASE_BUCKET] {
        let config = kv::Config {
            bucket: bucket.to_string(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let store = ensure_bucket(js, config).await?;
        let stream_name = format!("KV_{}", store.name);
        let mut stream = js.get_stream(&stream_name).await?;
        let mut config = stream.info().await?.config.clone();
        if !config.allow_atomic_publish {
            config.allow_atomic_publish = true;
            js.update_stream(config).await?;
        }
    }
    Ok(())
}

/// The subject under which a KV bucket stores `key`.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_the_metadata_round_trip() {
        let s = Settings {
            partitions: 7,
            ..Settings::default()
        };
        assert_eq!(parse_canonical(&s.canonical()).unwrap(), s);
    }

    #[test]
    fn ids_with_colons_and_dots_become_valid_keys() {
        let key = daily_key("m:1..x", Day(20_000), Currency::USD);
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
        );
        assert!(!key.split('.').any(str::is_empty), "{key}");
    }
}
