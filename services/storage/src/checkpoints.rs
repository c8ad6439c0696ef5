//! `checkpoints/{version_key}/p{N}/{seq:020}.bin`: the newest complete checkpoint of
//! a partition is the highest name. Objects are put atomically, so a crash leaves
//! either the whole checkpoint or none; older ones are pruned after a new one lands.
//! Checkpoints of the first releases lie under `checkpoints/projector/p{N}/`, named
//! by no version key: they are read when a partition has none of its own key yet,
//! and whether they are usable is the reader's decision (their content says).

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::StorageError;

pub struct StoredCheckpoint {
    pub seq: u64,
    pub bytes: Bytes,
    /// Where it was read from.
    pub path: String,
}

/// The directory of the first releases' checkpoints.
const LEGACY_DIR: &str = "projector";

#[derive(Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    /// How many of the newest checkpoints to keep per partition.
    keep: usize,
    version_key: String,
}

impl CheckpointStore {
    /// The checkpoints of projections under `version_key`.
    pub fn new(store: Arc<dyn ObjectStore>, keep: usize, version_key: impl Into<String>) -> Self {
        Self {
            store,
            keep: keep.max(1),
            version_key: version_key.into(),
        }
    }

    fn dir(&self, partition: u32) -> Path {
        Path::from(format!("checkpoints/{}/p{partition}", self.version_key))
    }

    fn path(&self, partition: u32, seq: u64) -> Path {
        Path::from(format!(
            "checkpoints/{}/p{partition}/{seq:020}.bin",
            self.version_key
        ))
    }

    fn legacy_path(partition: u32, seq: u64) -> Path {
        Path::from(format!(
            "checkpoints/{LEGACY_DIR}/p{partition}/{seq:020}.bin"
        ))
    }

    async fn list(&self, partition: u32) -> Result<Vec<u64>, StorageError> {
        self.list_dir(&self.dir(partition)).await
    }

    async fn list_dir(&self, dir: &Path) -> Result<Vec<u64>, StorageError> {
        let objects: Vec<_> = self.store.list(Some(dir)).try_collect().await?;
        let mut seqs: Vec<u64> = objects
            .iter()
            .filter_map(|o| o.location.filename()?.strip_suffix(".bin")?.parse().ok())
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Writes the checkpoint taken after reading `seq`, then prunes old ones. A
    /// checkpoint already present at `seq` (a rewrite after a crash) is kept.
    pub async fn put(&self, partition: u32, seq: u64, bytes: Bytes) -> Result<(), StorageError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(partition, seq), PutPayload::from(bytes), options)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let seqs = self.list(partition).await?;
        if seqs.len() > self.keep {
            for old in &seqs[..seqs.len() - self.keep] {
                match self.store.delete(&self.path(partition, *old)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(partition, seq = old, error = %e, "old checkpoint not deleted")
                    }
                }
            }
        }
        Ok(())
    }

    /// The newest checkpoint of `partition` under this version key, else the newest
    /// of the first releases' (see the module's comment), if any.
    pub async fn latest(&self, partition: u32) -> Result<Option<StoredCheckpoint>, StorageError> {
        let path = match self.list(partition).await?.last() {
            Some(&seq) => (seq, self.path(partition, seq)),
            None => {
                let legacy = Path::from(format!("checkpoints/{LEGACY_DIR}/p{partition}"));
                match self.list_dir(&legacy).await?.last() {
                    Some(&seq) => (seq, Self::legacy_path(partition, seq)),
                    None => return Ok(None),
                }
            }
        };
        let (seq, path) = path;
        let bytes = self.store.get(&path).await?.bytes().await?;
        Ok(Some(StoredCheckpoint {
            seq,
            bytes,
            path: path.to_string(),
        }))
    }
}
