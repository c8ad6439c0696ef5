//! Row writes to NATS KV: coalesced per flush, fenced, idempotent.
//!
//! A row is written with `Nats-Expected-Last-Subject-Sequence` set to the key's
//! revision as last seen, in one atomic batch per bucket. If another writer moved
//! any key (two projectors briefly owning a partition), the whole batch is refused
//! (err_code 10071); the writer re-reads those keys and drops every row whose
//! stored `log_position` is already at or above its own. So rows never move
//! backwards, and re-deriving after a restart rewrites nothing that is newer.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use payledger_server_common::atomic_batch::{
    BatchMessage, ERR_WRONG_LAST_SEQUENCE, MAX_BATCH_MESSAGES, publish_atomic,
};
use payledger_server_common::topology::kv_subject;

/// One encoded row ready to write.
pub(crate) struct RowWrite {
    pub key: String,
    pub log_position: u64,
    pub value: Bytes,
}

#[derive(Clone, Copy)]
struct Known {
    revision: u64,
    log_position: u64,
}

pub(crate) struct RowWriter {
    client: async_nats::Client,
    store: kv::Store,
    bucket: String,
    known: HashMap<String, Known>,
    /// Reads the stored row's log_position from its value.
    position_of: fn(&[u8]) -> Option<u64>,
    ack_timeout: Duration,
}

const MAX_FENCE_RETRIES: usize = 8;

impl RowWriter {
    pub fn new(
        client: async_nats::Client,
        store: kv::Store,
        bucket: &str,
        position_of: fn(&[u8]) -> Option<u64>,
        ack_timeout: Duration,
    ) -> Self {
        Self {
            client,
            store,
            bucket: bucket.to_string(),
            known: HashMap::new(),
            position_of,
            ack_timeout,
        }
    }

    async fn learn(&mut self, keys: Vec<String>) -> anyhow::Result<()> {
        let store = &self.store;
        let position_of = self.position_of;
        let fetched: Vec<(String, anyhow::Result<Option<kv::Entry>>)> = futures::stream::iter(keys)
            .map(|key| async move {
                let entry = store.entry(key.as_str()).await.map_err(anyhow::Error::from);
                (key, entry)
            })
            .buffer_unordered(64)
            .collect()
            .await;
        for (key, entry) in fetched {
            let known = match entry? {
                Some(e) if matches!(e.operation, kv::Operation::Put) => Known {
                    revision: e.revision,
                    log_position: position_of(&e.value).unwrap_or(0),
                },
                Some(e) => Known {
                    revision: e.revision,
                    log_position: 0,
                },
                None => Known {
                    revision: 0,
                    log_position: 0,
                },
            };
            self.known.insert(key, known);
        }
        Ok(())
    }

    /// Writes `rows` (one per key), skipping any whose stored row is at least as new.
    /// Returns how many rows were written.
    pub async fn write(&mut self, rows: Vec<RowWrite>) -> anyhow::Result<usize> {
        let mut written = 0;
        let mut pending: BTreeMap<String, RowWrite> =
            rows.into_iter().map(|r| (r.key.clone(), r)).collect();
        for attempt in 0.. {
            let unknown: Vec<String> = pending
                .keys()
                .filter(|k| !self.known.contains_key(*k))
                .cloned()
                .collect();
            self.learn(unknown).await?;
            pending.retain(|k, r| self.known[k].log_position < r.log_position);
            if pending.is_empty() {
                return Ok(written);
            }
            let keys: Vec<String> = pending.keys().cloned().collect();
            let mut refused = Vec::new();
            for chunk in keys.chunks(MAX_BATCH_MESSAGES) {
                let messages = chunk
                    .iter()
                    .map(|k| {
                        let mut headers = HeaderMap::new();
                        headers.insert(
                            "Nats-Expected-Last-Subject-Sequence",
                            self.known[k].revision.to_string().as_str(),
                        );
                        BatchMessage {
                            subject: kv_subject(&self.bucket, k),
                            headers,
                            payload: pending[k].value.clone(),
                        }
                    })
                    .collect();
                match publish_atomic(&self.client, messages, self.ack_timeout).await {
                    Ok(ack) => {
                        for (i, k) in chunk.iter().enumerate() {
                            let row = pending.remove(k).expect("pending key");
                            self.known.insert(
                                k.clone(),
                                Known {
                                    revision: ack.sequence_of(i),
                                    log_position: row.log_position,
                                },
                            );
                            written += 1;
                        }
                    }
                    Err(e) if e.err_code() == Some(ERR_WRONG_LAST_SEQUENCE) => {
                        refused.extend(chunk.iter().cloned());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if refused.is_empty() {
                return Ok(written);
            }
            if attempt >= MAX_FENCE_RETRIES {
                anyhow::bail!(
                    "rows of bucket {} kept moving under another writer after {MAX_FENCE_RETRIES} retries",
                    self.bucket
                );
            }
            tracing::info!(bucket = %self.bucket, keys = refused.len(), "another writer moved rows; re-reading them");
            for k in refused {
                self.known.remove(&k);
            }
        }
        unreachable!("the retry loop returns")
    }
}
