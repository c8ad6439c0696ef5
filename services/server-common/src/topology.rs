//! The NATS side of the contract: one stream of facts, dimension records and
//! heartbeats; KV buckets of derived rows; and how ids become KV keys.
//!
//! The stream settings (partitions, horizon, skew bound) are recorded in the
//! stream's metadata when ingest creates it. Projector, replay and query read them
//! from there, so every process agrees on the partitions and horizons of the log
//! they read; the projection's own settings come from each process's flags.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use base64::Engine;
use payledger_semantics::{
    Currency, Day, ProjectionSettings, RecordedStream, Settings, StreamSettings,
};

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

const META_STREAM_SETTINGS: &str = "payledger.stream_settings";
const META_STREAM_FINGERPRINT: &str = "payledger.stream_fingerprint";
/// Where the first streams recorded all five settings at once (see [`recorded_stream`]).
const META_LEGACY_SETTINGS: &str = "payledger.settings";

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

/// The id [`encode_id`] encoded; an error for text it cannot have written.
pub fn decode_id(encoded: &str) -> anyhow::Result<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| anyhow::anyhow!("'{encoded}' is not an encoded id: {e}"))?;
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("'{encoded}' does not encode a UTF-8 id"))
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

/// How the stream is created (only when missing; of an existing stream's config
/// only `max_age` is ever changed, by the archiver: see [`set_stream_max_age`]).
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub max_age: Duration,
    pub max_message_bytes: i32,
}

/// Creates the stream if missing, with its settings in its metadata; if it exists,
/// checks that it was created under the same stream settings. The projection's
/// settings are no concern of the stream: every projector names its own in its
/// version key.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    options: &StreamOptions,
) -> anyhow::Result<RecordedStream> {
    let mut metadata = std::collections::HashMap::new();
    metadata.insert(META_STREAM_SETTINGS.to_string(), settings.canonical());
    metadata.insert(META_STREAM_FINGERPRINT.to_string(), settings.fingerprint());
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
    js.get_or_create_stream(config).await?;
    let recorded = read_stream(js).await?;
    if recorded.settings != *settings {
        anyhow::bail!(
            "stream {STREAM} was created with settings [{}], but this process is configured with [{}]; \
             use the stream's settings or create a new stream",
            recorded.settings.canonical(),
            settings.canonical()
        );
    }
    Ok(recorded)
}

/// How long the stream keeps records (`max_age`; zero keeps them until deleted
/// otherwise).
pub async fn stream_max_age(js: &jetstream::Context) -> anyhow::Result<Duration> {
    let stream = js.get_stream(STREAM).await?;
    Ok(stream.cached_info().config.max_age)
}

/// Makes the stream keep records for `max_age`, the rest of its config as it is.
/// JetStream deletes the records older than a shorter `max_age` at once.
pub async fn set_stream_max_age(js: &jetstream::Context, max_age: Duration) -> anyhow::Result<()> {
    let stream = js.get_stream(STREAM).await?;
    let mut config = stream.cached_info().config.clone();
    config.max_age = max_age;
    js.update_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("updating the max_age of stream {STREAM}: {e}"))?;
    Ok(())
}

/// The settings the stream was created with.
pub async fn read_stream(js: &jetstream::Context) -> anyhow::Result<RecordedStream> {
    let mut stream = js.get_stream(STREAM).await.map_err(|e| {
        anyhow::anyhow!(
            "stream {STREAM} not found ({e}); start ingest first, it creates the stream"
        )
    })?;
    let info = stream.info().await?;
    recorded_stream(&info.config.metadata)
}

/// Reads the stream's metadata: the stream settings of today's streams, or the
/// five settings the first streams recorded under semantics 1, whose stream part
/// is taken and whose whole is kept to recognise the archive segments of that time.
fn recorded_stream(
    metadata: &std::collections::HashMap<String, String>,
) -> anyhow::Result<RecordedStream> {
    if let Some(canonical) = metadata.get(META_STREAM_SETTINGS) {
        return Ok(RecordedStream::new(StreamSettings::parse(canonical)?));
    }
    let canonical = metadata.get(META_LEGACY_SETTINGS).ok_or_else(|| {
        anyhow::anyhow!(
            "stream {STREAM} has neither '{META_STREAM_SETTINGS}' nor '{META_LEGACY_SETTINGS}' metadata; it was not created by payledger ingest"
        )
    })?;
    let legacy = parse_legacy(canonical)?;
    Ok(RecordedStream {
        settings: legacy.stream(),
        legacy: Some(legacy),
    })
}

fn parse_legacy(text: &str) -> anyhow::Result<Settings> {
    let mut settings = Settings::default();
    for pair in text.split(';') {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("malformed settings metadata '{text}'"))?;
        match key {
            // Every stream that recorded settings this way was written under 1.
            "semantics_version" => anyhow::ensure!(
                value == "1",
                "stream metadata '{text}' names semantics version {value}; only 1 was ever recorded this way"
            ),
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

/// The stream's settings, waiting (and saying so) until ingest has created it:
/// services start in any order.
pub async fn wait_for_stream(js: &jetstream::Context) -> RecordedStream {
    loop {
        match read_stream(js).await {
            Ok(recorded) => return recorded,
            Err(e) => {
                tracing::info!(error = %e, "waiting for the stream");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// The settings a projection folds under: the stream's, read from the stream,
/// with its own projection settings. Refuses a combination the semantics cannot
/// fold (a bucket width that does not divide a day, say).
pub async fn wait_for_settings(
    js: &jetstream::Context,
    projection: ProjectionSettings,
) -> anyhow::Result<(RecordedStream, Settings)> {
    let recorded = wait_for_stream(js).await;
    let settings = Settings::of(recorded.settings, projection);
    settings.validate()?;
    Ok((recorded, settings))
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
    fn stream_settings_survive_the_metadata_round_trip() {
        let s = StreamSettings {
            partitions: 7,
            ..StreamSettings::default()
        };
        let metadata = [(META_STREAM_SETTINGS.to_string(), s.canonical())].into();
        assert_eq!(recorded_stream(&metadata).unwrap(), RecordedStream::new(s));
    }

    /// What a stream created by the first release holds, byte for byte.
    #[test]
    fn a_legacy_stream_gives_its_stream_settings_and_keeps_the_whole() {
        let metadata = [
            (
                META_LEGACY_SETTINGS.to_string(),
                "semantics_version=1;partitions=8;dedup_horizon_us=3024000000000;\
                 allowed_lateness_us=7200000000;max_clock_skew_us=300000000;bucket_width_us=900000000"
                    .to_string(),
            ),
            (
                "payledger.settings_fingerprint".to_string(),
                "ignored".to_string(),
            ),
        ]
        .into();
        let recorded = recorded_stream(&metadata).unwrap();
        assert_eq!(
            recorded.settings,
            StreamSettings {
                partitions: 8,
                ..StreamSettings::default()
            }
        );
        let legacy = recorded.legacy.unwrap();
        assert_eq!(legacy.allowed_lateness_us, 7_200_000_000);
        assert!(recorded.accepts(None, Some(&legacy.legacy_fingerprint())));
        assert!(!recorded.accepts(None, Some("24d5f4baa8093b62")));
        assert!(recorded.accepts(Some(&recorded.settings.fingerprint()), None));
    }

    #[test]
    fn unknown_or_missing_metadata_is_refused_with_the_reason() {
        let none = std::collections::HashMap::new();
        let err = recorded_stream(&none).unwrap_err().to_string();
        assert!(err.contains("not created by payledger ingest"), "{err}");
        let metadata = [(META_STREAM_SETTINGS.to_string(), "partitions=8".to_string())].into();
        let err = recorded_stream(&metadata).unwrap_err().to_string();
        assert!(err.contains("malformed stream settings"), "{err}");
    }

    #[test]
    fn ids_decode_back_from_their_encoding() {
        // Lengths 1 to 6 cover every base64 remainder; then ids with the characters
        // keys cannot hold, multi-byte ones, and the longest merchant id.
        let longest = "m".repeat(payledger_semantics::MAX_MERCHANT_ID_BYTES);
        let ids = [
            "a",
            "ab",
            "abc",
            "abcd",
            "abcde",
            "abcdef",
            "m:1..x",
            "m.1/2=3",
            "händler-ü€",
            "\u{1F4B6}",
        ];
        for id in ids.iter().copied().chain([longest.as_str()]) {
            let encoded = encode_id(id);
            assert_eq!(decode_id(&encoded).unwrap(), id, "{encoded}");
            assert!(!encoded.contains('.'), "{encoded}");
        }
    }

    #[test]
    fn text_no_encoding_gives_is_refused() {
        for (text, reason) in [
            ("a", "not an encoded id"),
            ("ab=", "not an encoded id"),
            ("a.b", "not an encoded id"),
            ("a+b/", "not an encoded id"),
            // 0xff 0xfe: valid base64url, not UTF-8.
            ("__4", "UTF-8"),
        ] {
            let err = decode_id(text).unwrap_err().to_string();
            assert!(err.contains(reason), "{text}: {err}");
        }
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
