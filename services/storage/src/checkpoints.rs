//! `checkpoints/projector/p{N}/{seq:020}.bin`: the newest complete checkpoint of a
//! partition is the highest name. Objects are put atomically, so a crash leaves
//! either the whole checkpoint or none; older ones are pruned after a new one lands.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::StorageError;

pub struct StoredCheckpoint {
    pub seq: u64,
    pub bytes: Bytes,
}

#[derive(Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    /// How many of the newest checkpoints to keep per partition.
    keep: usize,
}

impl CheckpointStore {
    pub fn new(store: Arc<dyn ObjectStore>, keep: usize) -> Self {
        Self {
            store,
            keep: keep.max(1),
        }
    }

    fn dir(partition: u32) -> Path {
        Path::from(format!("checkpoints/projector/p{partition}"))
    }

    fn path(partition: u32, seq: u64) -> Path {
        Path::from(format!("checkpoints/projector/p{partition}/{seq:020}.bin"))
    }

    async fn list(&self, partition: u32) -> Result<Vec<u64>, StorageError> {
        let dir = Self::dir(partition);
        let objects: Vec<_> = self.store.list(Some(&dir)).try_collect().await?;
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
            .put_opts(
                &Self::path(partition, seq),
                PutPayload::from(bytes),
                options,
            )
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let seqs = self.list(partition).await?;
        if seqs.len() > self.keep {
            for old in &seqs[..seqs.len() - self.keep] {
                match self.store.delete(&Self::path(partition, *old)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(partition, seq = old, error = %e, "old checkpoint not deleted")
                    }
                }
            }
        }
        Ok(())
    }

    /// The newest checkpoint of `partition`, if any.
    pub async fn latest(&self, partition: u32) -> Result<Option<StoredCheckpoint>, StorageError> {
        let Some(&seq) = self.list(partition).await?.last() else {
            return Ok(None);
        };
        let bytes = self
            .store
            .get(&Self::path(partition, seq))
            .await?
            .bytes()
            .await?;
        Ok(Some(StoredCheckpoint { seq, bytes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newest_checkpoint_wins_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            CheckpointStore::new(crate::open_store(dir.path().to_str().unwrap()).unwrap(), 2);
        assert!(store.latest(3).await.unwrap().is_none());
        for seq in [5, 17, 120] {
            store
                .put(3, seq, Bytes::from(format!("state@{seq}")))
                .await
                .unwrap();
        }
        // A rewrite of an existing checkpoint is a no-op, not an error.
        store.put(3, 120, Bytes::from("state@120")).await.unwrap();
        let latest = store.latest(3).await.unwrap().unwrap();
        assert_eq!(
            (latest.seq, latest.bytes.as_ref()),
            (120, b"state@120".as_ref())
        );
        assert_eq!(store.list(3).await.unwrap(), vec![17, 120]);
        assert!(store.latest(4).await.unwrap().is_none());
    }
}
