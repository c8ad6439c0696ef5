//! The platform's object-storage layout (docs/storage.md) over any
//! `object_store` backend: projector checkpoints, the Parquet archive of the log, and the
//! authoritative table's snapshots and commit log: the local filesystem by default, S3 and friends by URL.
//!
//! Every object is written once under a name that is a function of its content's
//! position in the log, with put-if-absent, so a rewrite after a crash is
//! idempotent and a reader never sees a torn object.

mod archive;
mod checkpoints;
pub mod columns;
mod snapshots;
mod states;

use std::sync::Arc;

use object_store::aws::{AmazonS3ConfigKey, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreScheme};

pub use archive::{
    ArchiveStore, ArchivedDim, CutRange, DimRecord, SegmentInfo, TilingError, verify_tiling,
};
pub use checkpoints::{CheckpointStore, StoredCheckpoint};
pub use snapshots::{
    Commit, CommitDraft, ObjectRef, PartitionLineage, SnapshotStore, commit_for_day,
};
pub use states::{StateRef, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object store location '{location}': {message}")]
    Location { location: String, message: String },
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
    #[error("object {path} is unreadable: {message}")]
    Corrupt { path: String, message: String },
}

/// Opens a location: a local directory (`./data`, `/var/lib/payledger`,
/// `file:///…`) or any URL object_store understands (`s3://bucket/prefix`, with
/// credentials and endpoint from the usual environment variables: `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, …).
pub fn open_store(location: &str) -> Result<Arc<dyn ObjectStore>, StorageError> {
    open_store_with_env(location, std::env::vars())
}

/// [`open_store`] with the environment given rather than read from the process, so
/// that a caller (a test, say) can open a store exactly as a child process started with
/// `env` would.
///
/// Only the variables of the URL's own backend are read (`AWS_*` for S3, `GOOGLE_*`
/// for GCS, `AZURE_*` for Azure, as each object_store builder's `from_env` does): the
/// builders also accept bare names such as `endpoint`, `region`, `token` or
/// `timeout`, and an unrelated variable of that name must not configure, or break,
/// the store.
pub fn open_store_with_env(
    location: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Arc<dyn ObjectStore>, StorageError> {
    let err = |message: String| StorageError::Location {
        location: location.to_string(),
        message,
    };
    let local = match location.strip_prefix("file://") {
        Some(path) => Some(path),
        None if !location.contains("://") => Some(location),
        None => None,
    };
    if let Some(path) = local {
        std::fs::create_dir_all(path).map_err(|e| err(format!("cannot create directory: {e}")))?;
        let fs = LocalFileSystem::new_with_prefix(path).map_err(|e| err(e.to_string()))?;
        return Ok(Arc::new(fs));
    }
    let url = url::Url::parse(location).map_err(|e| err(e.to_string()))?;
    let (scheme, _) = ObjectStoreScheme::parse(&url).map_err(|e| err(e.to_string()))?;
    let env_prefix = match scheme {
        ObjectStoreScheme::AmazonS3 => Some("aws_"),
        ObjectStoreScheme::GoogleCloudStorage => Some("google_"),
        ObjectStoreScheme::MicrosoftAzure => Some("azure_"),
        _ => None,
    };
    let mut options: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| env_prefix.is_some_and(|prefix| k.starts_with(prefix)))
        .collect();
    if scheme == ObjectStoreScheme::AmazonS3 {
        // Commits, archive segments, snapshot parts and checkpoints are written with
        // put-if-absent (`PutMode::Create`), and the commit log is only correct if that
        // is atomic on the server. On S3 object_store does it with `If-None-Match: *`
        // (`aws_conditional_put=etag`) and maps the answer 412 (or 409, 304) to
        // `Error::AlreadyExists`; with conditional put disabled it refuses
        // `PutMode::Create` with `NotImplemented` instead. etag is object_store 0.14's
        // default; it is set here explicitly so that put-if-absent never rests on a
        // library default. A user's own `AWS_CONDITIONAL_PUT` wins.
        let conditional_put_set = options.iter().any(|(k, _)| {
            k.parse::<AmazonS3ConfigKey>()
                .is_ok_and(|key| key == AmazonS3ConfigKey::ConditionalPut)
        });
        if !conditional_put_set {
            options.push((
                AmazonS3ConfigKey::ConditionalPut.as_ref().to_string(),
                S3ConditionalPut::ETagMatch.to_string(),
            ));
        }
    }
    let (store, prefix) =
        object_store::parse_url_opts(&url, options).map_err(|e| err(e.to_string()))?;
    if prefix.as_ref().is_empty() {
        Ok(Arc::from(store))
    } else {
        Ok(Arc::new(PrefixStore::new(store, prefix)))
    }
}

#[cfg(test)]
mod tests {
    use object_store::path::Path;
    use object_store::{PutMode, PutOptions, PutPayload};

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn variables_of_other_backends_and_bare_names_are_ignored() {
        // object_store would read `timeout` and `region` as S3 settings and refuse
        // these values.
        let unrelated = env(&[
            ("TIMEOUT", "not a duration"),
            ("REGION", ""),
            ("GOOGLE_SERVICE_ACCOUNT", "/nowhere.json"),
            ("AWS_REGION", "eu-west-1"),
        ]);
        open_store_with_env("s3://bucket/prefix", unrelated).unwrap();
        let bad_aws = env(&[("AWS_CONDITIONAL_PUT", "sometimes")]);
        assert!(matches!(
            open_store_with_env("s3://bucket", bad_aws),
            Err(StorageError::Location { .. })
        ));
    }

    #[tokio::test]
    async fn conditional_put_set_by_the_user_wins() {
        // With conditional put disabled, object_store refuses put-if-absent before
        // sending anything: proof that the user's setting is the one in force.
        let store = open_store_with_env(
            "s3://bucket/prefix",
            env(&[
                ("AWS_CONDITIONAL_PUT", "disabled"),
                ("AWS_ENDPOINT", "http://127.0.0.1:9"),
                ("AWS_ALLOW_HTTP", "true"),
            ]),
        )
        .unwrap();
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let put = store
            .put_opts(&Path::from("k"), PutPayload::from_static(b"v"), options)
            .await;
        assert!(
            matches!(put, Err(object_store::Error::NotImplemented { .. })),
            "{put:?}"
        );
    }
}
