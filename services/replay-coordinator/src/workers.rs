//! The replay workers the coordinator knows, with a per-worker limit on shards
//! running at once and a cooldown for a worker whose attempt just failed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

struct Slot {
    url: String,
    channel: Channel,
    running: usize,
    cooling_until: Option<Instant>,
}

pub(crate) struct Workers {
    slots: Mutex<Vec<Slot>>,
    per_worker: usize,
    cooldown: Duration,
    /// Bumped whenever a slot frees up, so waiting replays look again.
    freed: watch::Sender<u64>,
}

/// A shard's claim on one worker slot, released on drop.
pub(crate) struct Lease {
    workers: Arc<Workers>,
    pub url: String,
    pub channel: Channel,
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut slots = self.workers.slots.lock().expect("workers lock");
            if let Some(slot) = slots.iter_mut().find(|s| s.url == self.url) {
                slot.running -= 1;
            }
        }
        self.workers.freed.send_modify(|n| *n += 1);
    }
}

impl Workers {
    pub fn new(urls: &[String], per_worker: usize, cooldown: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !urls.is_empty(),
            "no replay workers: pass --workers (projector gRPC URLs)"
        );
        let mut slots = Vec::with_capacity(urls.len());
        for url in urls {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| anyhow::anyhow!("--workers: '{url}' is not a URL: {e}"))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            slots.push(Slot {
                url: url.clone(),
                channel: endpoint.connect_lazy(),
                running: 0,
                cooling_until: None,
            });
        }
        Ok(Self {
            slots: Mutex::new(slots),
            per_worker: per_worker.max(1),
            cooldown,
            freed: watch::channel(0).0,
        })
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

    #[test]
    fn no_workers_or_a_bad_url_is_refused() {
        assert!(Workers::new(&[], 1, Duration::ZERO).is_err());
        let err = Workers::new(&["not a url".into()], 1, Duration::ZERO)
            .err()
            .unwrap();
        assert!(err.to_string().contains("--workers"), "{err}");
    }
}
