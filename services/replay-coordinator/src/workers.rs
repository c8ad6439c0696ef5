//! The replay workers the coordinator knows, with a per-worker limit on shards
//! running at once and a cooldown for a worker whose attempt just failed.
//!
//! The set is either the static `--workers` list or, in a cluster, what discovery
//! (`crate::discovery`) last saw ready; `set_workers` replaces it live. A removed
//! worker gets no new shard, while a shard already running on it keeps its
//! `Lease` (its claim on a slot; nothing to do with the Kubernetes Lease) until its
//! attempt ends: if the pod is gone the RPC fails and the
//! runner retries the shard elsewhere.
//!
//! With `--worker-ca` the workers are called over TLS: every URL is https://, and
//! each certificate is checked against `--worker-tls-server-name` when given (for
//! discovered workers, reached by pod IP, the Service's name by default), else
//! against the URL's host. The TLS files are read again when they change; a slot
//! whose channel was built with older settings gets a new channel at its next
//! shard, while shards already running keep their connection.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use payledger_server_common::tls::ClientTlsFiles;
use tokio::sync::watch;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How the coordinator calls the workers' RunShard over TLS. Flags of their own,
/// apart from the --tls-* the coordinator serves with.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct WorkerTlsArgs {
    /// Call the replay workers over TLS, trusting this CA (PEM): worker URLs are
    /// then https:// (discovered ones too). Without it the workers are called in
    /// plaintext. Read again when it changes.
    #[arg(long, env = "PAYLEDGER_WORKER_CA")]
    pub worker_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to workers that require mutual TLS;
    /// with --worker-client-key. Read again when it changes.
    #[arg(
        long,
        env = "PAYLEDGER_WORKER_CLIENT_CERT",
        requires_all = ["worker_client_key", "worker_ca"]
    )]
    pub worker_client_cert: Option<PathBuf>,
    /// The private key of --worker-client-cert (PEM).
    #[arg(
        long,
        env = "PAYLEDGER_WORKER_CLIENT_KEY",
        requires = "worker_client_cert"
    )]
    pub worker_client_key: Option<PathBuf>,
    /// The name every worker's certificate must carry (also sent as SNI), instead
    /// of the host of its URL. Discovered workers are reached by pod IP, so with
    /// --workers-service it defaults to that Service's name (e.g.
    /// payledger-projector), which their certificate must then name.
    #[arg(long, env = "PAYLEDGER_WORKER_TLS_SERVER_NAME", requires = "worker_ca")]
    pub worker_tls_server_name: Option<String>,
}

impl WorkerTlsArgs {
    /// The TLS settings for calling workers, or None without --worker-ca.
    /// `workers_service`: the Service workers are discovered from, if any.
    pub(crate) fn load(&self, workers_service: Option<&str>) -> anyhow::Result<Option<WorkerTls>> {
        let Some(ca) = &self.worker_ca else {
            return Ok(None);
        };
        let identity = self
            .worker_client_cert
            .clone()
            .zip(self.worker_client_key.clone());
        let files = ClientTlsFiles::new(ca, identity)
            .map_err(|e| anyhow::anyhow!("--worker-ca / --worker-client-cert: {e:#}"))?;
        let server_name = self
            .worker_tls_server_name
            .clone()
            .or_else(|| workers_service.map(str::to_string));
        Ok(Some(WorkerTls {
            files,
            server_name,
            identity: self.worker_client_cert.is_some(),
        }))
    }
}

/// Loaded [`WorkerTlsArgs`].
pub(crate) struct WorkerTls {
    files: ClientTlsFiles,
    server_name: Option<String>,
    /// Whether a client certificate is presented.
    identity: bool,
}

impl WorkerTls {
    /// A channel to `url` with `config` (checked against the server name, if any).
    fn channel(&self, url: &str, config: &ClientTlsConfig) -> anyhow::Result<Channel> {
        let mut config = config.clone();
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        let endpoint = endpoint(url)?
            .tls_config(config)
            .map_err(|e| anyhow::anyhow!("TLS settings for worker '{url}': {}", error_chain(&e)))?;
        Ok(endpoint.connect_lazy())
    }
}

/// An error and its sources, `: `-separated (tonic's and hyper's errors say little
/// without their sources: "transport error").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = e.source();
    }
    text
}

struct Slot {
    /// Unique per slot ever made, so that a claim on a removed worker never
    /// touches a later slot of the same URL.
    id: u64,
    url: String,
    channel: Channel,
    running: usize,
    cooling_until: Option<Instant>,
    /// The TLS settings `channel` was built with.
    tls: Option<Arc<ClientTlsConfig>>,
}

pub(crate) struct Workers {
    slots: Mutex<Vec<Slot>>,
    per_worker: usize,
    cooldown: Duration,
    tls: Option<WorkerTls>,
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

fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("--workers: '{url}' is not a URL: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

fn slot(url: &str, tls: Option<&WorkerTls>) -> anyhow::Result<Slot> {
    // tonic would call an http:// URL in plaintext even with TLS settings, and
    // fail every call to an https:// one without: refuse both here.
    match (tls.is_some(), url.starts_with("https://")) {
        (true, false) => anyhow::bail!(
            "worker '{url}' is not an https:// URL, but --worker-ca says the workers are called over TLS"
        ),
        (false, true) => anyhow::bail!(
            "worker '{url}' is an https:// URL: pass --worker-ca, the CA that signed the workers' certificates"
        ),
        _ => {}
    }
    let (channel, config) = match tls {
        Some(tls) => {
            let config = tls.files.current();
            (tls.channel(url, &config)?, Some(config))
        }
        None => (endpoint(url)?.connect_lazy(), None),
    };
    Ok(Slot {
        id: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
        url: url.to_string(),
        channel,
        running: 0,
        cooling_until: None,
        tls: config,
    })
}

impl Workers {
    /// A fixed list (`--workers`): at least one worker.
    pub fn new(
        urls: &[String],
        per_worker: usize,
        cooldown: Duration,
        tls: Option<WorkerTls>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !urls.is_empty(),
            "no replay workers: pass --workers (projector gRPC URLs) or --workers-service (their headless Service, in a cluster)"
        );
        let workers = Self::discovered(per_worker, cooldown, tls);
        workers.set_workers(urls)?;
        Ok(workers)
    }

    /// An empty set that discovery fills; shards wait until a worker appears.
    pub fn discovered(per_worker: usize, cooldown: Duration, tls: Option<WorkerTls>) -> Self {
        Self {
            slots: Mutex::new(Vec::new()),
            per_worker: per_worker.max(1),
            cooldown,
            tls,
            freed: watch::channel(0).0,
        }
    }

    /// The URL scheme of workers: https with --worker-ca.
    pub fn scheme(&self) -> &'static str {
        match self.tls {
            Some(_) => "https",
            None => "http",
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
                    fresh.push(slot(url, self.tls.as_ref())?);
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
        if let Some(tls) = &self.tls {
            let current = tls.files.current();
            if !slot.tls.as_ref().is_some_and(|c| Arc::ptr_eq(c, &current)) {
                match tls.channel(&slot.url, &current) {
                    Ok(channel) => {
                        tracing::info!(worker = %slot.url, "TLS files changed: new connections to the worker use them");
                        slot.channel = channel;
                    }
                    Err(error) => {
                        tracing::warn!(worker = %slot.url, %error, "TLS files changed but do not make a channel; keeping the previous one")
                    }
                }
                slot.tls = Some(current);
            }
        }
        Some(Lease {
            workers: self.clone(),
            slot: slot.id,
            url: slot.url.clone(),
            channel: slot.channel.clone(),
        })
    }

    /// What to check after a call to a worker failed below gRPC. A TLS mismatch
    /// shows as an obscure transport error: plaintext to a TLS server reads its
    /// alert as an oversized HTTP/2 frame, and a server that requires a client
    /// certificate closes the connection after the handshake. A worker that is
    /// not reachable at all (UNAVAILABLE) gets no hint.
    pub fn hint(&self, status: &tonic::Status) -> Option<&'static str> {
        std::error::Error::source(status)?;
        if status.code() == tonic::Code::Unavailable {
            return None;
        }
        match &self.tls {
            None => {
                Some("the workers are called in plaintext: if they serve TLS, pass --worker-ca")
            }
            Some(tls) if !tls.identity => Some(
                "no client certificate is presented: if the workers require one (mutual TLS), pass --worker-client-cert and --worker-client-key",
            ),
            Some(_) => None,
        }
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
        Arc::new(Workers::new(&urls, per_worker, Duration::from_secs(60), None).unwrap())
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
        let w = Arc::new(Workers::discovered(1, Duration::from_secs(60), None));
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
        assert!(Workers::new(&[], 1, Duration::ZERO, None).is_err());
        let err = Workers::new(&["not a url".into()], 1, Duration::ZERO, None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("--workers"), "{err}");
    }

    /// A self-signed CA certificate (PEM).
    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    fn worker_tls(ca: &std::path::Path, server_name: Option<&str>) -> Option<WorkerTls> {
        let args = WorkerTlsArgs {
            worker_ca: Some(ca.to_path_buf()),
            worker_tls_server_name: server_name.map(String::from),
            ..Default::default()
        };
        args.load(Some("payledger-projector")).unwrap()
    }

    #[tokio::test]
    async fn with_a_worker_ca_workers_are_https_and_without_one_http() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, ca_pem()).unwrap();
        let http = ["http://10.0.0.1:50053".to_string()];
        let https = ["https://10.0.0.1:50053".to_string()];
        let err = Workers::new(&http, 1, Duration::ZERO, worker_tls(&ca, None))
            .err()
            .unwrap();
        assert!(err.to_string().contains("--worker-ca"), "{err}");
        let err = Workers::new(&https, 1, Duration::ZERO, None).err().unwrap();
        assert!(err.to_string().contains("pass --worker-ca"), "{err}");
        let w = Workers::new(&https, 1, Duration::ZERO, worker_tls(&ca, None)).unwrap();
        assert_eq!(w.scheme(), "https");
        assert_eq!(workers(1).scheme(), "http");
        // Discovered pod IPs are checked against the Service's name unless told otherwise.
        let tls = worker_tls(&ca, None).unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("payledger-projector"));
        let tls = worker_tls(&ca, Some("workers.example")).unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("workers.example"));
    }

    #[test]
    fn a_worker_ca_without_a_certificate_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "not a certificate").unwrap();
        let args = WorkerTlsArgs {
            worker_ca: Some(ca),
            ..Default::default()
        };
        let err = args.load(None).err().unwrap();
        assert!(err.to_string().contains("--worker-ca"), "{err}");
    }

    #[tokio::test]
    async fn changed_tls_files_give_the_next_shard_a_new_channel() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, ca_pem()).unwrap();
        let urls = ["https://10.0.0.1:50053".to_string()];
        let w = Arc::new(Workers::new(&urls, 1, Duration::ZERO, worker_tls(&ca, None)).unwrap());
        let settings = |w: &Workers| w.slots.lock().unwrap()[0].tls.clone().unwrap();
        let first = settings(&w);
        drop(w.acquire(&[]).unwrap());
        assert!(Arc::ptr_eq(&first, &settings(&w)), "nothing changed");
        // A rotated CA (written through a rename, as a Secret update is), after the
        // reload check interval (and in another tick of the file system's clock).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let temp = dir.path().join("ca.new");
        std::fs::write(&temp, ca_pem()).unwrap();
        std::fs::rename(&temp, &ca).unwrap();
        drop(w.acquire(&[]).unwrap());
        assert!(!Arc::ptr_eq(&first, &settings(&w)), "the new CA is used");
    }
}
