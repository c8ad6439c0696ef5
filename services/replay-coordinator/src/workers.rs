//! The replay workers the coordinator knows, with a per-worker limit on shards
//! running at once and a cooldown for a worker whose attempt just failed.
//!
//! The set is either the static `--workers` list or, in a cluster, what discovery
//! (`crate::discovery`) last saw ready; `set_workers` replaces it live. A removed
//! worker gets no new shard, while a shard already running on it keeps its
//! `Lease` (its claim on a slot; nothing to do with the Kubernetes Lease) until its
//! attempt ends: if the pod is gone the RPC fails and the
//! runner retries the shard elsewhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

struct Slot {
    /// Unique per slot ever made, so that a claim on a removed worker never
    /// touches a later slot of the same URL.
    id: u64,
    url: String,
    channel: Channel,
    running: usize,
    cooling_until: Option<Instant>,
}

pub(crate) struct Workers {
    slots: Mutex<Vec<Slot>>,
    per_worker: usize,
    cooldown: Duration,
    /// Bumped whenever a slot frees up or workers are added, so waiting replays
    /// look again.
    freed: watch::Sender<u64>,
}

/// A shard's claim on one worker slot, released on drop.
pub(crate) struct Lease {
    workers: Arc<Workers>,
    slot: u64,
    pub url: String,
    pub channel: Channel,
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut slots = self.workers.slots.lock().expect("workers lock");
            // The slot is gone when its worker was removed meanwhile: nothing to free.
            if let Some(slot) = slots.iter_mut().find(|s| s.id == self.slot) {
                slot.running -= 1;
            }
        }
        self.workers.freed.send_modify(|n| *n += 1);
    }
}

static NEXT_SLOT: AtomicU64 = AtomicU64::new(0);

fn slot(url: &str) -> anyhow::Result<Slot> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("--workers: '{url}' is not a URL: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    Ok(Slot {
        id: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
        url: url.to_string(),
        channel: endpoint.connect_lazy(),
        running: 0,
        cooling_until: None,
    })
}

impl Workers {
    /// A fixed list (`--workers`): at least one worker.
    pub fn new(urls: &[String], per_worker: usize, cooldown: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !urls.is_empty(),
            "no replay workers: pass --workers (projector gRPC URLs) or --workers-service (their headless Service, in a cluster)"
        );
        let workers = Self::discovered(per_worker, cooldown);
        workers.set_workers(urls)?;
        Ok(workers)
    }

    /// An empty set that discovery fills; shards wait until a worker appears.
    pub fn discovered(per_worker: usize, cooldown: Duration) -> Self {
        Self {
            slots: Mutex::new(Vec::new()),
            per_worker: per_worker.max(1),
            cooldown,
            freed: watch::channel(0).0,
        }
    }

    /// Makes `urls` the set of workers: a worker that stays keeps its slot (its
    /// running shards, its cooldown and its connection), a new one gets a fresh
    /// slot, a missing one is dropped. Refuses the whole change if a URL is bad.
    pub fn set_workers(&self, urls: &[String]) -> anyhow::Result<()> {
        let added = {
            let mut slots = self.slots.lock().expect("workers lock");
            // New slots first, so that a bad URL refuses the change before anything moved.
            let mut fresh: Vec<Slot> = Vec::new();
            for url in urls {
                if !slots.iter().chain(&fresh).any(|s| &s.url == url) {
                    fresh.push(slot(url)?);
                }
            }
            let added = !fresh.is_empty();
            let mut next: Vec<Slot> = Vec::with_capacity(urls.len());
            for url in urls {
                if next.iter().any(|s| &s.url == url) {
                    continue;
                }
                if let Some(i) = slots.iter().position(|s| &s.url == url) {
                    next.push(slots.swap_remove(i));
                } else if let Some(i) = fresh.iter().position(|s| &s.url == url) {
                    tracing::info!(worker = %url, "replay worker added");
                    next.push(fresh.swap_remove(i));
                }
            }
            // What is left was not in `urls`; its running shards keep their claims.
            for removed in slots.iter() {
                tracing::info!(worker = %removed.url, running = removed.running, "replay worker removed");
            }
            *slots = next;
            added
        };
        if added {
            self.freed.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// The workers' URLs, in the order they were given.
    #[cfg(test)]
    pub fn urls(&self) -> Vec<String> {
        let slots = self.slots.lock().expect("workers lock");
        slots.iter().map(|s| s.url.clone()).collect()
    }

    /// Claims a slot for a shard whose attempts failed on `avoid`: the least busy
    /// worker with a free slot, preferring one not avoided and not cooling down.
    /// None when every worker is full, or when only avoided or cooling workers have
    /// room while others exist that may free up.
    pub fn acquire(self: &Arc<Self>, avoid: &[String]) -> Option<Lease> {
        let now = Instant::now();
        let mut slots = self.slots.lock().expect("workers lock");
        let usable =
            |s: &Slot| !avoid.contains(&s.url) && s.cooling_until.is_none_or(|until| until <= now);
        let any_usable = slots.iter().any(usable);
        let slot = slots
            .iter_mut()
            .filter(|s| s.running < self.per_worker)
            .filter(|s| !any_usable || usable(s))
            .min_by_key(|s| s.running)?;
        slot.running += 1;
        Some(Lease {
            workers: self.clone(),
            slot: slot.id,
            url: slot.url.clone(),
            channel: slot.channel.clone(),
        })
    }

    /// A worker's attempt failed: give it no new shard for a while.
    pub fn cool_down(&self, url: &str) {
        let mut slots = self.slots.lock().expect("workers lock");
        if let Some(slot) = slots.iter_mut().find(|s| s.url == url) {
            slot.cooling_until = Some(Instant::now() + self.cooldown);
        }
    }

    pub fn on_freed(&self) -> watch::Receiver<u64> {
        self.freed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(per_worker: usize) -> Arc<Workers> {
        let urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"].map(String::from);
        Arc::new(Workers::new(&urls, per_worker, Duration::from_secs(60)).unwrap())
    }

    #[tokio::test]
    async fn slots_are_limited_per_worker_and_freed_on_drop() {
        let w = workers(1);
        let a = w.acquire(&[]).unwrap();
        let b = w.acquire(&[]).unwrap();
        assert_ne!(a.url, b.url);
        assert!(w.acquire(&[]).is_none());
        let freed = a.url.clone();
        drop(a);
        assert_eq!(w.acquire(&[]).unwrap().url, freed);
    }

    #[tokio::test]
    async fn a_retry_avoids_the_failed_worker_while_another_exists() {
        let w = workers(2);
        let failed = vec!["http://127.0.0.1:1".to_string()];
        let first = w.acquire(&failed).unwrap();
        let second = w.acquire(&failed).unwrap();
        assert_eq!(
            (first.url.as_str(), second.url.as_str()),
            ("http://127.0.0.1:2", "http://127.0.0.1:2")
        );
        // The other worker is full: wait for it rather than go back to the failed one.
        assert!(w.acquire(&failed).is_none());
        // With every worker avoided, any free slot will do.
        let all = vec![
            "http://127.0.0.1:1".to_string(),
            "http://127.0.0.1:2".to_string(),
        ];
        assert_eq!(w.acquire(&all).unwrap().url, "http://127.0.0.1:1");
    }

    #[tokio::test]
    async fn a_cooling_worker_gets_no_shard_while_another_has_room() {
        let w = workers(4);
        w.cool_down("http://127.0.0.1:1");
        let held: Vec<Lease> = (0..4).map(|_| w.acquire(&[]).unwrap()).collect();
        assert!(held.iter().all(|l| l.url == "http://127.0.0.1:2"));
        assert!(w.acquire(&[]).is_none());
    }

    #[tokio::test]
    async fn set_workers_keeps_the_slots_of_workers_that_stay() {
        let w = workers(1);
        let held = w.acquire(&[]).unwrap();
        let kept = held.url.clone();
        w.set_workers(&[kept.clone(), "http://127.0.0.1:3".into()])
            .unwrap();
        assert_eq!(w.urls(), [kept.clone(), "http://127.0.0.1:3".into()]);
        // The kept worker is still full (its running shard came along); the
        // removed one is never chosen.
        let next = w.acquire(&[]).unwrap();
        assert_eq!(next.url, "http://127.0.0.1:3");
        assert!(w.acquire(&[]).is_none());
        drop(held);
        assert_eq!(w.acquire(&[]).unwrap().url, kept);
    }

    #[tokio::test]
    async fn a_worker_removed_mid_shard_gets_no_new_shard_and_its_claim_drops_cleanly() {
        let w = workers(1);
        let on_1 = w.acquire(&[]).unwrap();
        let on_2 = w.acquire(&[]).unwrap();
        let (gone, stays) = if on_1.url.ends_with(":1") {
            (on_1, on_2)
        } else {
            (on_2, on_1)
        };
        // The pod behind :1 disappears while its shard runs.
        w.set_workers(&["http://127.0.0.1:2".into()]).unwrap();
        assert!(w.acquire(&[]).is_none(), ":2 is full and :1 is gone");
        drop(gone);
        assert!(
            w.acquire(&[]).is_none(),
            "freeing a removed slot frees nothing"
        );
        // It comes back under the same URL while an old claim is still held: the
        // old claim must not free a slot of the new one.
        let gone_again = {
            w.set_workers(&["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()])
                .unwrap();
            let back = w.acquire(&[]).unwrap();
            assert_eq!(back.url, "http://127.0.0.1:1");
            w.set_workers(&["http://127.0.0.1:2".into()]).unwrap();
            back
        };
        w.set_workers(&["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()])
            .unwrap();
        let fresh = w.acquire(&[]).unwrap();
        assert_eq!(fresh.url, "http://127.0.0.1:1");
        drop(gone_again);
        assert!(w.acquire(&[]).is_none(), "the stale claim freed nothing");
        drop(stays);
        assert_eq!(w.acquire(&[]).unwrap().url, "http://127.0.0.1:2");
    }

    #[tokio::test]
    async fn an_added_worker_wakes_replays_waiting_for_a_slot() {
        let w = Arc::new(Workers::discovered(1, Duration::from_secs(60)));
        let mut freed = w.on_freed();
        assert!(w.acquire(&[]).is_none(), "no worker yet");
        w.set_workers(&["http://127.0.0.1:1".into()]).unwrap();
        assert!(freed.has_changed().unwrap());
        freed.mark_unchanged();
        let _held = w.acquire(&[]).unwrap();
        // The same set again adds nothing and wakes nobody.
        w.set_workers(&["http://127.0.0.1:1".into()]).unwrap();
        assert!(!freed.has_changed().unwrap());
    }

    #[tokio::test]
    async fn a_bad_url_refuses_the_whole_change() {
        let w = workers(1);
        let err = w
            .set_workers(&["http://127.0.0.1:3".into(), "not a url".into()])
            .unwrap_err();
        assert!(err.to_string().contains("not a url"), "{err}");
        assert_eq!(w.urls(), ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    }

    #[test]
    fn no_workers_or_a_bad_url_is_refused() {
        assert!(Workers::new(&[], 1, Duration::ZERO).is_err());
        let err = Workers::new(&["not a url".into()], 1, Duration::ZERO)
            .err()
            .unwrap();
        assert!(err.to_string().contains("--workers"), "{err}");
    }
}
