//! Replays by id: in memory for reads and watches, persisted to the NATS KV bucket
//! `replays` so that a restarted coordinator knows what it was doing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use payledger_proto::v1;
use payledger_server_common::topology::ensure_bucket;
use prost::Message;
use tokio::sync::watch;

use crate::lifecycle::{ReplayEvent, ReplayPhase, ShardEvent, advance, advance_shard};

pub const REPLAYS_BUCKET: &str = "replays";

/// Progress-only changes reach the KV bucket at most this often; state changes
/// are written at once.
const PERSIST_INTERVAL: Duration = Duration::from_millis(500);

struct Entry {
    current: watch::Sender<v1::Replay>,
    cancel: watch::Sender<bool>,
    persisted_at: Instant,
}

pub(crate) struct Registry {
    kv: kv::Store,
    entries: Mutex<HashMap<String, Entry>>,
    /// Orders KV writes: an older state must never overwrite a newer one.
    persist: tokio::sync::Mutex<()>,
}

pub(crate) fn is_terminal(replay: &v1::Replay) -> bool {
    ReplayPhase::of(replay).is_ok_and(ReplayPhase::is_terminal)
}

pub(crate) use payledger_server_common::clock::now_us;

impl Registry {
    /// Opens the bucket and loads every replay.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> anyhow::Result<Registry> {
        let kv = ensure_bucket(
            js,
            kv::Config {
                bucket: REPLAYS_BUCKET.to_string(),
                description: "Replay state of the replay coordinator".into(),
                history: 1,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let registry = Registry {
            kv,
            entries: Mutex::new(HashMap::new()),
            persist: tokio::sync::Mutex::new(()),
        };
        registry.reload().await?;
        Ok(registry)
    }

    /// Reads every replay from the bucket again (what another coordinator wrote
    /// while this one was not the leader), telling the watchers of those that
    /// changed; returns the ids of the unfinished ones.
    pub async fn reload(&self) -> anyhow::Result<Vec<String>> {
        let _order = self.persist.lock().await;
        let keys: Vec<String> = self.kv.keys().await?.try_collect().await?;
        let mut unfinished = Vec::new();
        for key in keys {
            let Some(bytes) = self.kv.get(&key).await? else {
                continue;
            };
            let replay = v1::Replay::decode(bytes.as_ref()).map_err(|e| {
                anyhow::anyhow!("replay '{key}' in bucket {REPLAYS_BUCKET} is unreadable: {e}")
            })?;
            if !is_terminal(&replay) {
                unfinished.push(replay.replay_id.clone());
            }
            let mut entries = self.entries.lock().expect("registry lock");
            match entries.get(&key) {
                Some(entry) => {
                    entry.current.send_if_modified(|current| {
                        let changed = *current != replay;
                        *current = replay;
                        changed
                    });
                }
                None => {
                    entries.insert(key, Entry::new(replay));
                }
            }
        }
        Ok(unfinished)
    }

    pub async fn insert(&self, replay: v1::Replay) -> anyhow::Result<()> {
        let _order = self.persist.lock().await;
        self.kv
            .put(&replay.replay_id, replay.encode_to_vec().into())
            .await?;
        self.entries
            .lock()
            .expect("registry lock")
            .insert(replay.replay_id.clone(), Entry::new(replay));
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<v1::Replay> {
        let entries = self.entries.lock().expect("registry lock");
        entries.get(id).map(|e| e.current.borrow().clone())
    }

    /// Every replay, newest first.
    pub fn list(&self) -> Vec<v1::Replay> {
        let entries = self.entries.lock().expect("registry lock");
        let mut all: Vec<_> = entries
            .values()
            .map(|e| e.current.borrow().clone())
            .collect();
        all.sort_by(|a, b| (b.created_at_us, &b.replay_id).cmp(&(a.created_at_us, &a.replay_id)));
        all
    }

    pub fn active(&self) -> usize {
        let entries = self.entries.lock().expect("registry lock");
        entries
            .values()
            .filter(|e| !is_terminal(&e.current.borrow()))
            .count()
    }

    pub fn watch(&self, id: &str) -> Option<watch::Receiver<v1::Replay>> {
        let entries = self.entries.lock().expect("registry lock");
        entries.get(id).map(|e| e.current.subscribe())
    }

    pub fn cancelled(&self, id: &str) -> Option<watch::Receiver<bool>> {
        let entries = self.entries.lock().expect("registry lock");
        entries.get(id).map(|e| e.cancel.subscribe())
    }

    pub fn request_cancel(&self, id: &str) {
        let entries = self.entries.lock().expect("registry lock");
        if let Some(e) = entries.get(id) {
            e.cancel.send_replace(true);
        }
    }

    /// Changes what a replay reports (shard progress, the archive watermark seen
    /// while waiting), never its state, cutoff or a shard's state, which change only
    /// through `advance` and `advance_shard`; tells its watchers, and persists it at
    /// most every PERSIST_INTERVAL.
    pub async fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut v1::Replay),
    ) -> anyhow::Result<v1::Replay> {
        self.change(id, |r| {
            let before = states(r);
            change(r);
            anyhow::ensure!(
                states(r) == before,
                "a state changed outside the lifecycle (a bug)"
            );
            Ok(())
        })
        .await
    }

    /// Moves replay `id` on by `event` (`lifecycle`), with `change` made in the same
    /// write; refuses an illegal transition and then changes nothing.
    pub async fn advance(
        &self,
        id: &str,
        event: ReplayEvent,
        change: impl FnOnce(&mut v1::Replay),
    ) -> anyhow::Result<v1::Replay> {
        self.change(id, |r| {
            advance(r, event)?;
            change(r);
            Ok(())
        })
        .await
    }

    /// Moves shard `index` of replay `id` on by `event`, with `change` made to it in
    /// the same write; refuses an illegal transition and then changes nothing.
    pub async fn advance_shard(
        &self,
        id: &str,
        index: usize,
        event: ShardEvent,
        change: impl FnOnce(&mut v1::ShardStatus),
    ) -> anyhow::Result<v1::Replay> {
        self.change(id, |r| {
            let shard = &mut r.shards[index];
            advance_shard(shard, event)?;
            change(shard);
            Ok(())
        })
        .await
    }

    /// Applies `change` to a copy of the replay; when it succeeds, tells the
    /// watchers and persists: at once when its state or a shard's state changed,
    /// else at most every PERSIST_INTERVAL.
    async fn change(
        &self,
        id: &str,
        change: impl FnOnce(&mut v1::Replay) -> anyhow::Result<()>,
    ) -> anyhow::Result<v1::Replay> {
        let _order = self.persist.lock().await;
        let (replay, persist) = {
            let mut entries = self.entries.lock().expect("registry lock");
            let entry = entries
                .get_mut(id)
                .ok_or_else(|| anyhow::anyhow!("replay {id} is not known"))?;
            let mut replay = entry.current.borrow().clone();
            let before = states(&replay);
            change(&mut replay).map_err(|e| e.context(format!("replay {id}")))?;
            replay.updated_at_us = now_us();
            let persist =
                states(&replay) != before || entry.persisted_at.elapsed() >= PERSIST_INTERVAL;
            if persist {
                entry.persisted_at = Instant::now();
            }
            entry.current.send_replace(replay.clone());
            (replay, persist)
        };
        if persist {
            self.kv.put(id, replay.encode_to_vec().into()).await?;
        }
        Ok(replay)
    }
}

/// A replay's state and its shards', as persisted: what `update` must not change.
fn states(r: &v1::Replay) -> (i32, u64, Vec<i32>) {
    (
        r.state,
        r.cutoff,
        r.shards.iter().map(|s| s.state).collect(),
    )
}

impl Entry {
    fn new(replay: v1::Replay) -> Self {
        Entry {
            current: watch::channel(replay).0,
            cancel: watch::channel(false).0,
            persisted_at: Instant::now(),
        }
    }
}
