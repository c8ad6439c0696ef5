//! Replay states: `state/{version_key}/p{N}/{cutoff:020}.bin`, a partition's
//! semantic state after folding the archive through a replay's cutoff
//! (docs/storage.md, "Replay states"). A later replay of the same version key
//! starts from the newest committed one at or below its cutoff and reads only the
//! archive after it.
//!
//! The same fold gives the same bytes (the state's encoding is canonical), so a
//! name is a function of its content: objects are put-if-absent and a rewrite must
//! match the stored hash. Only a state a commit lists is ever started from, and its
//! hash is checked against the commit's on every read.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::StorageError;

/// A stored state, as a commit records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRef {
    pub path: String,
    pub partition: u32,
    /// The archive watermark the state was folded through.
    pub cutoff: u64,
    pub bytes: u64,
    /// xxh3-128 of the bytes, 32 hex digits.
    pub content_hash: String,
}

fn content_hash(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

#[derive(Clone)]
pub struct StateStore {
    store: Arc<dyn ObjectStore>,
}

impl StateStore {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self { store }
    }

    fn dir(version_key: &str, partition: u32) -> Path {
        Path::from(format!("state/{version_key}/p{partition}"))
    }

    fn path(version_key: &str, partition: u32, cutoff: u64) -> Path {
        Path::from(format!("state/{version_key}/p{partition}/{cutoff:020}.bin"))
    }

    /// Stores the state of `partition` at `cutoff`. One already there (another
    /// replay of the same cutoff, or a retried shard) must hold the same bytes.
    pub async fn put(
        &self,
        version_key: &str,
        partition: u32,
        cutoff: u64,
        bytes: Bytes,
    ) -> Result<StateRef, StorageError> {
        let path = Self::path(version_key, partition, cutoff);
        let written = StateRef {
            path: path.to_string(),
            partition,
            cutoff,
            bytes: bytes.len() as u64,
            content_hash: content_hash(&bytes),
        };
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(written),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let stored = self.store.get(&path).await?.bytes().await?;
                let hash = content_hash(&stored);
                if hash != written.content_hash {
                    return Err(StorageError::Corrupt {
                        path: written.path,
                        message: format!(
                            "already holds a state with hash {hash}, the same fold gave {}",
                            written.content_hash
                        ),
                    });
                }
                Ok(written)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a state back, refusing it unless it has the recorded size and hash.
    pub async fn read(&self, state: &StateRef) -> Result<Bytes, StorageError> {
        let bytes = self
            .store
            .get(&Path::from(state.path.as_str()))
            .await?
            .bytes()
            .await?;
        let hash = content_hash(&bytes);
        if (bytes.len() as u64, hash.as_str()) != (state.bytes, state.content_hash.as_str()) {
            return Err(StorageError::Corrupt {
                path: state.path.clone(),
                message: format!(
                    "holds {} bytes with hash {hash}, the commit recorded {} bytes with hash {}",
                    bytes.len(),
                    state.bytes,
                    state.content_hash
                ),
            });
        }
        Ok(bytes)
    }

    /// The cutoffs of the states stored for `partition` under `version_key`, ascending.
    pub async fn cutoffs(
        &self,
        version_key: &str,
        partition: u32,
    ) -> Result<Vec<u64>, StorageError> {
        let dir = Self::dir(version_key, partition);
        let objects: Vec<_> = self.store.list(Some(&dir)).try_collect().await?;
        let mut cutoffs: Vec<u64> = objects
            .iter()
            .filter_map(|o| o.location.filename()?.strip_suffix(".bin")?.parse().ok())
            .collect();
        cutoffs.sort_unstable();
        Ok(cutoffs)
    }

    /// Deletes the states of `partition` under `version_key` that no commit lists
    /// (`listed`) and that lie below `below`: what a failed or cancelled replay
    /// left. A state a commit lists is never deleted. Returns how many went.
    pub async fn prune_unlisted(
        &self,
        version_key: &str,
        partition: u32,
        listed: &[u64],
        below: u64,
    ) -> Result<usize, StorageError> {
        let mut deleted = 0;
        for cutoff in self.cutoffs(version_key, partition).await? {
            if cutoff < below && !listed.contains(&cutoff) {
                match self
                    .store
                    .delete(&Self::path(version_key, partition, cutoff))
                    .await
                {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(deleted)
    }
}
