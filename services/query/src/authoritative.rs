//! The authoritative side: committed replay snapshots, read through the commit log.
//!
//! The commit log is polled, so a new commit is picked up without a restart. Parts
//! are immutable under unique names, so they are read through the part cache
//! (`part_cache`) and never invalidated.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use payledger_semantics::{DailyRow, Day};
use payledger_storage::{Commit, SnapshotStore, commit_for_day};
use tonic::Status;

use crate::dims::ArchivedDims;
use crate::part_cache::{PartCache, PartCacheStats, merchant_day};

pub(crate) struct Authoritative {
    snapshots: SnapshotStore,
    commits: RwLock<Vec<Commit>>,
    parts: PartCache,
    dims: Arc<ArchivedDims>,
}

impl Authoritative {
    pub fn new(snapshots: SnapshotStore, parts: PartCache, dims: Arc<ArchivedDims>) -> Self {
        Self {
            snapshots,
            commits: RwLock::default(),
            parts,
            dims,
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
        self.parts
            .part(&commit.draft.snapshot_id, partition)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
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
        Ok(merchant_day(&part, merchant_id, day).to_vec())
    }

    /// The reporting values of a commit's rows: the archived dimension records up to
    /// its cutoff, never the log's, so they do not change once committed.
    pub async fn reporting(
        &self,
        commit: &Commit,
        rows: &[DailyRow],
    ) -> Result<payledger_semantics::Reporting, Status> {
        self.dims
            .reporting(rows, commit.draft.log_cutoff)
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "the FX and risk records of snapshot '{}' (through sequence {}) are not readable from the archive: {e}",
                    commit.draft.snapshot_id, commit.draft.log_cutoff
                ))
            })
    }

    pub fn cache_stats(&self) -> PartCacheStats {
        self.parts.cache_stats()
    }

    /// Lets parts queued for the disk tier finish writing.
    pub async fn close(&self) {
        if let Err(e) = self.parts.close().await {
            tracing::warn!(error = %e, "part cache did not close cleanly");
        }
    }
}

/// How often the part cache's counters are logged, when they moved.
const STATS_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Polls the commit log every `every`, and logs the part cache's counters now and then.
pub(crate) async fn follow_commits(
    auth: Arc<Authoritative>,
    every: Duration,
) -> anyhow::Result<()> {
    let mut logged = (std::time::Instant::now(), auth.cache_stats());
    loop {
        if let Err(e) = auth.refresh().await {
            tracing::warn!(error = %e, "commit log not readable; keeping the last one read");
        }
        let stats = auth.cache_stats();
        if logged.0.elapsed() >= STATS_LOG_INTERVAL && stats != logged.1 {
            log_cache_stats(&stats);
            logged = (std::time::Instant::now(), stats);
        }
        tokio::time::sleep(every).await;
    }
}

pub(crate) fn log_cache_stats(stats: &PartCacheStats) {
    tracing::info!(
        memory_hits = stats.memory_hits,
        disk_hits = stats.disk_hits,
        misses = stats.misses,
        parts_memory_only = stats.parts_memory_only,
        hit_ratio = stats.hit_ratio(),
        "snapshot part cache"
    );
}
