//! The authoritative side: committed replay snapshots, read through the commit log.
//!
//! The commit log is polled, so a new commit is picked up without a restart. Parts
//! are immutable under unique names, so a part read once is cached (a bounded
//! number of them) and never invalidated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use payledger_semantics::{DailyRow, Day};
use payledger_storage::{Commit, SnapshotStore, commit_for_day};
use tonic::Status;

/// Parsed snapshot parts by (snapshot_id, partition).
type PartCache = HashMap<(String, u32), Arc<Vec<DailyRow>>>;

pub(crate) struct Authoritative {
    snapshots: SnapshotStore,
    commits: RwLock<Vec<Commit>>,
    parts: Mutex<PartCache>,
    max_cached_parts: usize,
}

impl Authoritative {
    pub fn new(snapshots: SnapshotStore, max_cached_parts: usize) -> Self {
        Self {
            snapshots,
            commits: RwLock::default(),
            parts: Mutex::default(),
            max_cached_parts: max_cached_parts.max(1),
        }
    }

    pub async fn refresh(&self) -> anyhow::Result<()> {
        let commits = self.snapshots.commits().await?;
        let mut known = self.commits.write().expect("commits lock");
        if commits.len() != known.len() {
            tracing::info!(commits = commits.len(), "commit log changed");
        }
        *known = commits;
        Ok(())
    }

    /// The commit that answers for `day`: the named snapshot, or the union rule.
    pub fn commit_for(
        &self,
        day: Day,
        snapshot_id: Option<&str>,
    ) -> Result<Option<Commit>, Status> {
        let commits = self.commits.read().expect("commits lock");
        let Some(id) = snapshot_id else {
            return Ok(commit_for_day(&commits, day).cloned());
        };
        let commit = commits
            .iter()
            .find(|c| c.draft.snapshot_id == id)
            .ok_or_else(|| {
                Status::not_found(format!("snapshot '{id}' is not in the commit log"))
            })?;
        if !commit.covers(day) {
            return Err(Status::failed_precondition(format!(
                "snapshot '{id}' covers {} to {}, not {day}",
                commit.draft.from_day, commit.draft.to_day
            )));
        }
        Ok(Some(commit.clone()))
    }

    /// One partition's part of a committed snapshot, cached.
    pub async fn part(
        &self,
        commit: &Commit,
        partition: u32,
    ) -> Result<Arc<Vec<DailyRow>>, Status> {
        let key = (commit.draft.snapshot_id.clone(), partition);
        if let Some(part) = self.parts.lock().expect("parts lock").get(&key).cloned() {
            return Ok(part);
        }
        let rows = self
            .snapshots
            .read_part(&key.0, partition)
            .await
            .map_err(|e| Status::unavailable(format!("reading snapshot part: {e}")))?;
        let part = Arc::new(rows);
        let mut parts = self.parts.lock().expect("parts lock");
        if parts.len() >= self.max_cached_parts {
            parts.clear();
        }
        parts.insert(key, part.clone());
        Ok(part)
    }

    /// The committed rows of one merchant-day.
    pub async fn rows(
        &self,
        commit: &Commit,
        partition: u32,
        merchant_id: &str,
        day: Day,
    ) -> Result<Vec<DailyRow>, Status> {
        let part = self.part(commit, partition).await?;
        // Parts are sorted by (merchant_id, day, currency).
        let start = part.partition_point(|r| (r.merchant_id.as_str(), r.day) < (merchant_id, day));
        Ok(part[start..]
            .iter()
            .take_while(|r| r.merchant_id == merchant_id && r.day == day)
            .cloned()
            .collect())
    }
}

/// Polls the commit log every `every`.
pub(crate) async fn follow_commits(
    auth: Arc<Authoritative>,
    every: Duration,
) -> anyhow::Result<()> {
    loop {
        if let Err(e) = auth.refresh().await {
            tracing::warn!(error = %e, "commit log not readable; keeping the last one read");
        }
        tokio::time::sleep(every).await;
    }
}
