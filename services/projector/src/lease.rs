//! Partition ownership leases in the NATS KV bucket `projector_leases` (docs/failure-contract.md).
//!
//! A partition has one writer. The StatefulSet ordinal says which projector
//! *should* own a partition, but during a rolling update or a scale-out an old
//! and a new pod may both believe they do. Before it applies a partition a
//! projector therefore holds the partition's lease: a key `p{N}` naming the
//! holder, created or taken over with a revision compare-and-swap and renewed
//! the same way every quarter of its time-to-live.
//!
//! Expiry is judged without comparing clocks across machines (as Kubernetes'
//! leader election does): a contender takes a lease over only after it has seen
//! the *same* revision for a whole time-to-live on its own monotonic clock. The
//! holder stops applying once it has not renewed for two thirds of the
//! time-to-live, so it has stopped before anyone can take over. A holder that
//! was paused past that point (a long stall, a frozen VM) still may write a few
//! rows when it wakes up; row writes are fenced by `log_position`, so those
//! never move a row backwards, and its next renewal fails and stops it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use payledger_server_common::connection::ConnectionLosses;

use crate::bootstrap::request;
use crate::metrics::ProjectorMetrics;
use crate::partition::now_us;

/// What the lease key holds. `holder` is unique per process; `pod` and
/// `started_at_us` let a restarted pod take its own lease back at once from its
/// previous incarnation (a StatefulSet runs one pod of a name at a time; should
/// two ever overlap, only the newer one takes over, so they cannot ping-pong).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct LeaseRecord {
    holder: String,
    pod: Option<String>,
    started_at_us: i64,
    ttl_ms: u64,
    renewed_at_us: i64,
}

pub(crate) fn lease_key(partition: u32) -> String {
    format!("p{partition}")
}

#[derive(Clone)]
pub(crate) struct PartitionLeases {
    kv: kv::Store,
    holder: String,
    pod: Option<String>,
    started_at_us: i64,
    ttl: Duration,
    metrics: Arc<ProjectorMetrics>,
    /// A lease read or written when the connection drops is given up at once.
    losses: ConnectionLosses,
    /// Hears how every renewal went.
    readiness: payledger_server_common::readiness::Readiness,
}

/// The stream of the lease bucket, as readiness names it.
const LEASE_STREAM: &str = "KV_projector_leases";

/// A lease held by this process: renewed in the background until released or lost.
pub(crate) struct HeldLease {
    partition: u32,
    metrics: Arc<ProjectorMetrics>,
    lost: watch::Receiver<Option<String>>,
    release: Option<tokio::sync::oneshot::Sender<()>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl PartitionLeases {
    /// `pod`: the StatefulSet pod name when there is one.
    pub fn new(
        kv: kv::Store,
        pod: Option<String>,
        ttl: Duration,
        metrics: Arc<ProjectorMetrics>,
        losses: ConnectionLosses,
    ) -> Self {
        let host = pod.clone().unwrap_or_else(|| "projector".to_string());
        let started_at_us = now_us();
        let holder = format!("{host}/{}-{started_at_us:x}", std::process::id());
        Self {
            kv,
            holder,
            pod,
            started_at_us,
            ttl,
            metrics,
            losses,
            readiness: Default::default(),
        }
    }

    /// Renewals count for `readiness`'s `jetstream_write`.
    pub fn reporting_to(
        mut self,
        readiness: payledger_server_common::readiness::Readiness,
    ) -> Self {
        self.readiness = readiness;
        self
    }

    fn record(&self) -> bytes::Bytes {
        serde_json::to_vec(&LeaseRecord {
            holder: self.holder.clone(),
            pod: self.pod.clone(),
            started_at_us: self.started_at_us,
            ttl_ms: self.ttl.as_millis() as u64,
            renewed_at_us: now_us(),
        })
        .expect("a lease record serializes")
        .into()
    }

    fn poll_interval(&self) -> Duration {
        (self.ttl / 4).min(Duration::from_secs(1))
    }

    /// Waits until this process holds the partition's lease; `None` when `stop`
    /// turned true first.
    pub async fn acquire(
        &self,
        partition: u32,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<HeldLease>> {
        let key = lease_key(partition);
        // The revision a contender saw, and since when: expiry by its own clock.
        let mut observed: Option<(u64, Instant)> = None;
        let mut waiting_logged = false;
        loop {
            if *stop.borrow() {
                return Ok(None);
            }
            // A lease that cannot be read cannot be taken: counted as a failed
            // write (a bucket nats-server left unable to answer, say).
            let entry = match request(
                &self.losses,
                "reading the partition's lease",
                self.kv.entry(key.as_str()),
            )
            .await
            {
                Ok(entry) => entry,
                Err(e) => {
                    self.readiness.write_failed(LEASE_STREAM, e.as_ref());
                    return Err(e);
                }
            };
            let attempt = match &entry {
                None => Some((0, "free")),
                Some(e) if e.operation != Operation::Put => Some((e.revision, "released")),
                Some(e) => {
                    let other: Option<LeaseRecord> = serde_json::from_slice(&e.value).ok();
                    let ttl = other
                        .as_ref()
                        .map_or(self.ttl, |r| Duration::from_millis(r.ttl_ms));
                    let seen_since = match observed {
                        Some((revision, since)) if revision == e.revision => since,
                        _ => {
                            observed = Some((e.revision, Instant::now()));
                            Instant::now()
                        }
                    };
                    match other {
                        Some(r) if r.holder == self.holder => Some((e.revision, "ours")),
                        Some(r)
                            if self.pod.is_some()
                                && r.pod == self.pod
                                && r.started_at_us < self.started_at_us =>
                        {
                            Some((e.revision, "held by this pod before it restarted"))
                        }
                        _ if seen_since.elapsed() >= ttl => Some((e.revision, "expired")),
                        other => {
                            if !waiting_logged {
                                waiting_logged = true;
                                tracing::info!(
                                    partition,
                                    holder = other.map(|r| r.holder).unwrap_or_default(),
                                    "partition is leased by another projector; waiting until it is released or expires"
                                );
                            }
                            None
                        }
                    }
                }
            };
            if let Some((revision, why)) = attempt {
                let update = self
                    .losses
                    .since_now()
                    .or_lost(self.kv.update(key.as_str(), self.record(), revision))
                    .await
                    .map_err(|lost| anyhow::anyhow!("taking the partition's lease: {lost}"))?;
                match update {
                    Ok(revision) => {
                        self.readiness.write_stored(LEASE_STREAM);
                        tracing::info!(
                            partition,
                            revision,
                            lease = why,
                            "holding the partition's lease"
                        );
                        if why == "expired" {
                            self.metrics.lease_taken_over(partition);
                        }
                        return Ok(Some(self.hold(partition, revision)));
                    }
                    // Someone else moved first; look again.
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                        observed = None;
                        continue;
                    }
                    Err(e) => {
                        self.readiness.write_failed(LEASE_STREAM, &e);
                        return Err(e.into());
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll_interval()) => {}
                _ = stop.changed() => {}
            }
        }
    }

    fn hold(&self, partition: u32, revision: u64) -> HeldLease {
        let (lost_tx, lost) = watch::channel(None);
        let (release, mut released) = tokio::sync::oneshot::channel::<()>();
        let leases = self.clone();
        self.metrics.owned(partition, true);
        let renewer = tokio::spawn(async move {
            let key = lease_key(partition);
            let mut revision = revision;
            let mut renewed = Instant::now();
            let deadline = leases.ttl * 2 / 3;
            let reason = loop {
                tokio::select! {
                    _ = tokio::time::sleep(leases.ttl / 4) => {}
                    _ = &mut released => {
                        // Only our own revision is deleted: a lease taken over stays.
                        if let Err(e) = leases.kv.delete_expect_revision(&key, Some(revision)).await {
                            tracing::warn!(partition, error = %e, "could not release the partition's lease; it expires by itself");
                        }
                        leases.metrics.owned(partition, false);
                        return;
                    }
                }
                let attempt = Instant::now();
                let renewal = tokio::time::timeout(
                    deadline.saturating_sub(renewed.elapsed()),
                    leases.kv.update(&key, leases.record(), revision),
                )
                .await;
                match renewal {
                    Ok(Ok(next)) => {
                        leases.readiness.write_stored(LEASE_STREAM);
                        revision = next;
                        renewed = attempt;
                    }
                    Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                        break "another projector took the lease over".to_string();
                    }
                    Ok(Err(e)) => {
                        leases.readiness.write_failed(LEASE_STREAM, &e);
                        tracing::warn!(partition, error = %e, "renewing the partition's lease failed; retrying")
                    }
                    Err(_) => leases.readiness.write_not_stored(
                        LEASE_STREAM,
                        "a lease renewal got no acknowledgement in time",
                    ),
                }
                if renewed.elapsed() >= deadline {
                    break format!("not renewed for {:?}", renewed.elapsed());
                }
            };
            leases.metrics.owned(partition, false);
            leases.metrics.lease_lost(partition);
            let _ = lost_tx.send(Some(reason));
        });
        HeldLease {
            partition,
            metrics: self.metrics.clone(),
            lost,
            release: Some(release),
            renewer,
        }
    }
}

impl HeldLease {
    /// Resolves, with the reason, once the lease is lost: the partition must stop
    /// being applied at once.
    pub fn lost(&self) -> impl Future<Output = String> + use<> {
        let mut lost = self.lost.clone();
        async move {
            loop {
                if let Some(reason) = lost.borrow_and_update().clone() {
                    return reason;
                }
                if lost.changed().await.is_err() {
                    // The renewer ended without a reason: it was released.
                    return "released".to_string();
                }
            }
        }
    }

    /// Stops renewing and deletes the lease (if it is still ours), so that the
    /// next owner need not wait for it to expire.
    pub async fn release(mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
        if let Err(e) = (&mut self.renewer).await {
            tracing::warn!(partition = self.partition, error = %e, "lease renewer failed");
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        // Dropped without release (the task was aborted): stop renewing; the lease
        // expires by itself.
        if self.release.is_some() {
            self.renewer.abort();
            self.metrics.owned(self.partition, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payledger_server_common::local_nats::LocalNats;

    const TTL: Duration = Duration::from_millis(800);

    /// A private nats-server (and its store directory) with the lease bucket.
    async fn nats_with_bucket() -> (tempfile::TempDir, LocalNats, kv::Store) {
        let dir = tempfile::tempdir().unwrap();
        let nats = LocalNats::start(dir.path()).unwrap();
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        payledger_server_common::topology::ensure_buckets(&js, 1)
            .await
            .unwrap();
        let kv = js
            .get_key_value(payledger_server_common::topology::LEASE_BUCKET)
            .await
            .unwrap();
        (dir, nats, kv)
    }

    fn leases(kv: &kv::Store, pod: Option<&str>) -> PartitionLeases {
        let metrics = ProjectorMetrics::register(&mut Default::default());
        PartitionLeases::new(
            kv.clone(),
            pod.map(String::from),
            TTL,
            metrics,
            ConnectionLosses::none(),
        )
    }

    fn running() -> watch::Receiver<bool> {
        let (stop, stopped) = watch::channel(false);
        std::mem::forget(stop);
        stopped
    }

    async fn holder(kv: &kv::Store, partition: u32) -> Option<String> {
        let entry = kv.entry(lease_key(partition)).await.unwrap()?;
        (entry.operation == Operation::Put).then(|| {
            serde_json::from_slice::<LeaseRecord>(&entry.value)
                .unwrap()
                .holder
        })
    }

    /// A lease read in flight when nats-server goes away is given up as soon as
    /// the connection drops, not when the request times out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acquiring_fails_at_once_when_the_connection_drops() {
        let (_dir, mut nats, _) = nats_with_bucket().await;
        let mut args = payledger_server_common::config::NatsArgs::new(nats.url());
        args.ping_interval = Duration::from_secs(60);
        let (client, losses) = args.connect_watched("test").await.unwrap();
        let kv = async_nats::jetstream::new(client)
            .get_key_value(payledger_server_common::topology::LEASE_BUCKET)
            .await
            .unwrap();
        let metrics = ProjectorMetrics::register(&mut Default::default());
        let leases = PartitionLeases::new(kv, None, TTL, metrics, losses);
        let mut stop = running();
        nats.pause().unwrap();
        let acquire = leases.acquire(3, &mut stop);
        tokio::pin!(acquire);
        assert!(
            futures::poll!(&mut acquire).is_pending(),
            "waits on nats-server"
        );
        nats.stop();
        let error = match acquire.await {
            Ok(_) => panic!("a lease acquired without nats-server"),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains("the connection to NATS was lost") && !error.contains("timed out"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_renewed_lease_keeps_others_out_until_it_is_released() {
        let (_dir, _nats, kv) = nats_with_bucket().await;
        let (a, b) = (leases(&kv, None), leases(&kv, None));
        let held = a.acquire(3, &mut running()).await.unwrap().unwrap();
        let waiting = tokio::spawn(async move { b.acquire(3, &mut running()).await });
        tokio::time::sleep(TTL * 3).await;
        assert!(!waiting.is_finished(), "a renewed lease was taken over");
        assert_eq!(holder(&kv, 3).await, Some(a.holder.clone()));
        let released = Instant::now();
        held.release().await;
        let taken = tokio::time::timeout(TTL, waiting).await.unwrap().unwrap();
        assert!(taken.unwrap().is_some());
        assert!(released.elapsed() < TTL, "a released lease is free at once");
        assert_ne!(holder(&kv, 3).await, Some(a.holder));
    }

    #[tokio::test]
    async fn an_abandoned_lease_is_taken_over_only_after_its_ttl() {
        let (_dir, _nats, kv) = nats_with_bucket().await;
        let (a, b) = (leases(&kv, None), leases(&kv, None));
        drop(a.acquire(0, &mut running()).await.unwrap().unwrap());
        let abandoned = Instant::now();
        let _held = b.acquire(0, &mut running()).await.unwrap().unwrap();
        let waited = abandoned.elapsed();
        assert!(
            waited >= TTL && waited < TTL * 3,
            "taken over after {waited:?}"
        );
        assert_eq!(holder(&kv, 0).await, Some(b.holder));
    }

    #[tokio::test]
    async fn a_holder_learns_at_its_next_renewal_that_its_lease_was_taken() {
        let (_dir, _nats, kv) = nats_with_bucket().await;
        let held = leases(&kv, None)
            .acquire(1, &mut running())
            .await
            .unwrap()
            .unwrap();
        // What a contender does once it thinks the lease expired (this holder was
        // paused, say): a revision compare-and-swap over the holder's last renewal.
        let entry = kv.entry(lease_key(1)).await.unwrap().unwrap();
        let other = leases(&kv, None);
        kv.update(lease_key(1), other.record(), entry.revision)
            .await
            .unwrap();
        let reason = tokio::time::timeout(TTL, held.lost()).await.unwrap();
        assert!(reason.contains("took the lease over"), "{reason}");
        assert_eq!(holder(&kv, 1).await, Some(other.holder));
    }

    #[tokio::test]
    async fn a_holder_that_cannot_renew_stops_before_anyone_may_take_over() {
        let (_dir, mut nats, kv) = nats_with_bucket().await;
        let held = leases(&kv, None)
            .acquire(2, &mut running())
            .await
            .unwrap()
            .unwrap();
        let cut_off = Instant::now();
        nats.stop();
        let reason = tokio::time::timeout(TTL * 2, held.lost()).await.unwrap();
        assert!(reason.contains("not renewed"), "{reason}");
        assert!(
            cut_off.elapsed() < TTL,
            "the holder stopped {:?} after its last renewal could have been, past the TTL",
            cut_off.elapsed()
        );
    }

    #[tokio::test]
    async fn lease_renewals_and_reads_jetstream_does_not_answer_count_against_readiness() {
        let (_dir, mut nats, kv) = nats_with_bucket().await;
        let readiness = payledger_server_common::readiness::Readiness::new();
        let leases = leases(&kv, None).reporting_to(readiness.clone());
        let held = leases.acquire(2, &mut running()).await.unwrap().unwrap();
        assert!(readiness.is_ready());
        nats.stop();
        tokio::time::timeout(TTL * 2, held.lost()).await.unwrap();
        assert!(
            !readiness.is_ready(),
            "renewals failed, and readiness holds"
        );
        // A lease that cannot be read cannot be taken either: a bucket nats-server
        // left unable to answer keeps the projector not ready.
        let readiness = payledger_server_common::readiness::Readiness::new();
        let leases = leases.reporting_to(readiness.clone());
        assert!(leases.acquire(3, &mut running()).await.is_err());
        assert!(
            !readiness.is_ready(),
            "the lease read failed, and readiness holds"
        );
    }

    #[tokio::test]
    async fn a_restarted_pod_takes_its_own_lease_back_at_once() {
        let (_dir, _nats, kv) = nats_with_bucket().await;
        let before = leases(&kv, Some("payledger-projector-1"));
        drop(before.acquire(5, &mut running()).await.unwrap().unwrap());
        let after = leases(&kv, Some("payledger-projector-1"));
        let restarted = Instant::now();
        let _held = after.acquire(5, &mut running()).await.unwrap().unwrap();
        assert!(restarted.elapsed() < TTL / 2);
        assert_eq!(holder(&kv, 5).await, Some(after.holder));
        // Another pod still has to wait.
        let other = leases(&kv, Some("payledger-projector-2"));
        let (stop, mut stopped) = watch::channel(false);
        let waiting = tokio::spawn(async move { other.acquire(5, &mut stopped).await });
        tokio::time::sleep(TTL * 2).await;
        stop.send(true).unwrap();
        assert!(waiting.await.unwrap().unwrap().is_none());
    }
}
