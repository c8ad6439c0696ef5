//! The platform's object-storage layout (DESIGN.md section 5) over any
//! `object_store` backend: projector checkpoints, the Parquet archive of the log, and the
//! authoritative table's snapshots and commit log: the local filesystem by default, S3 and friends by URL.
//!
//! Every object is written once under a name that is a function of its content's
//! position in the log, with put-if-absent, so a rewrite after a crash is
//! idempotent and a reader never sees a torn object.

mod archive;
mod checkpoints;
mod snapshots;

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;

pub use archive::{
    ArchiveStore, ArchivedDim, CutRange, DimRecord, SegmentInfo, TilingError, verify_tiling,
};
pub use checkpoints::{CheckpointStore, StoredCheckpoint};
pub use snapshots::{Commit, CommitDraft, ObjectRef, SnapshotStore, commit_for_day};

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
/// credentials and endpoint from the usual environment variables).
pub fn open_store(location: &str) -> Result<Arc<dyn ObjectStore>, StorageError> {
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
    let (store, prefix) = object_store::parse_url_opts(
        &url,
        std::env::vars().map(|(k, v)| (k.to_ascii_lowercase(), v)),
    )
    .map_err(|e| err(e.to_string()))?;
    if prefix.as_ref().is_empty() {
        Ok(Arc::from(store))
    } else {
        Ok(Arc::new(PrefixStore::new(store, prefix)))
    }
}
