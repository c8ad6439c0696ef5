//! One replica plans replays: the holder of a coordination.k8s.io/v1 Lease
//! (`--lease-name`, holder identity `--pod-name`).
//!
//! Every `renew_interval` each replica reads the Lease and acts on it: the holder
//! renews it; another replica takes it when it has no holder (released) or has
//! expired; otherwise it follows. Every write is conditioned on the
//! resourceVersion just read, so when two replicas race, one write succeeds and
//! the other gets 409 Conflict, reads the Lease again and follows.
//!
//! Expiry is judged as client-go judges it: by this replica's own monotonic clock,
//! from the moment it first saw the current version of the Lease, plus the
//! `leaseDurationSeconds` written in it. The `renewTime` written by another
//! machine is never compared with local time, so clock skew between nodes does
//! not matter.
//!
//! The holder steps down by itself once it has gone two thirds of the lease
//! duration without a successful renewal (its last renewal counted from when the
//! request was *sent*). Any other replica needs the full duration without a change
//! before it takes over, so the old holder has stopped planning at least a third
//! of the duration before a new one starts (5 s with the defaults 15 s / 5 s).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub(crate) struct LeaseSettings {
    pub name: String,
    /// This replica's holder identity (its pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew_interval: Duration,
}

impl LeaseSettings {
    /// The holder steps down after this long without a renewal.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.identity.is_empty(),
            "--lease-name needs --pod-name (PAYLEDGER_POD_NAME): the holder identity, unique per replica"
        );
        anyhow::ensure!(
            self.duration >= Duration::from_secs(1) && self.duration.subsec_nanos() == 0,
            "--lease-duration must be a whole number of seconds, at least 1s (got {:?})",
            self.duration
        );
        anyhow::ensure!(
            !self.renew_interval.is_zero() && self.renew_interval * 3 <= self.duration,
            "--lease-renew-interval ({:?}) must be at most a third of --lease-duration ({:?}), so that a renewal can fail and be tried again before the holder steps down",
            self.renew_interval,
            self.duration
        );
        Ok(())
    }
}

/// Whether this replica plans replays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Leadership {
    Leading,
    /// `holder`: the replica that holds the Lease, when one does.
    Following {
        holder: Option<String>,
    },
}

pub(crate) struct LeaseElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The resourceVersion of the Lease last read and when this replica first saw it.
    observed: Option<(String, Instant)>,
}

impl LeaseElector {
    pub fn new(client: kube::Client, namespace: &str, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            settings,
            observed: None,
        }
    }

    /// One round: reads the Lease, then creates, renews or takes it when this
    /// replica may.
    pub async fn round(&mut self) -> Result<Leadership, kube::Error> {
        let current = self.api.get_opt(&self.settings.name).await?;
        self.claim(current).await
    }

    /// Acts on `current`, the Lease as just read (None: there is none yet).
    pub async fn claim(&mut self, current: Option<Lease>) -> Result<Leadership, kube::Error> {
        let now = Instant::now();
        let written = match current {
            None => {
                let lease = self.record(None);
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(lease) => {
                let version = lease.resource_version().unwrap_or_default();
                if self
                    .observed
                    .as_ref()
                    .is_none_or(|(seen, _)| *seen != version)
                {
                    self.observed = Some((version, now));
                }
                let spec = lease.spec.clone().unwrap_or_default();
                let holder = spec.holder_identity.filter(|h| !h.is_empty());
                let duration = spec
                    .lease_duration_seconds
                    .filter(|s| *s > 0)
                    .map_or(self.settings.duration, |s| Duration::from_secs(s as u64));
                let expired = self
                    .observed
                    .as_ref()
                    .is_some_and(|(_, seen)| now >= *seen + duration);
                let mine = holder.as_deref() == Some(self.settings.identity.as_str());
                if !(mine || holder.is_none() || expired) {
                    return Ok(Leadership::Following { holder });
                }
                if !mine {
                    tracing::info!(lease = %self.settings.name, previous = ?holder, expired, "taking the Lease");
                }
                let lease = self.record(Some(lease));
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                self.observed = Some((lease.resource_version().unwrap_or_default(), now));
                Ok(Leadership::Leading)
            }
            // Another replica wrote first (created it, or changed it since we read it).
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                tracing::debug!(lease = %self.settings.name, reason = %status.reason, "another replica wrote the Lease first; reading it again");
                let current = self.api.get_opt(&self.settings.name).await?;
                let holder = current
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity)
                    .filter(|h| !h.is_empty());
                Ok(Leadership::Following { holder })
            }
            Err(e) => Err(e),
        }
    }

    /// The Lease to write: `current` (keeping its resourceVersion, which makes the
    /// update conditional) held by this replica and renewed now.
    fn record(&self, current: Option<Lease>) -> Lease {
        let now = MicroTime(Timestamp::now());
        let existed = current.is_some();
        let mut lease = current.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.name.clone()),
                ..Default::default()
            },
            spec: None,
        });
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            spec.holder_identity = Some(self.settings.identity.clone());
            spec.acquire_time = Some(now.clone());
            if existed {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        spec.lease_duration_seconds = Some(self.settings.duration.as_secs() as i32);
        spec.renew_time = Some(now);
        lease
    }

    /// Gives the Lease up (when this replica holds it), so that another replica
    /// takes it at its next round instead of after the lease duration.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Changed since we read it: it is no longer ours to release.
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Runs rounds every `renew_interval` and publishes the outcome on `leadership`
/// until `shutdown`, then releases the Lease if this replica holds it.
pub(crate) async fn hold(
    mut elector: LeaseElector,
    leadership: watch::Sender<Leadership>,
    shutdown: impl Future<Output = ()>,
) {
    let settings = elector.settings.clone();
    let deadline = settings.renew_deadline();
    tokio::pin!(shutdown);
    // When the last renewal that counts was sent; Some only while leading.
    let mut renewed: Option<Instant> = None;
    let publish = |state: Leadership| {
        leadership.send_if_modified(|current| {
            if *current == state {
                return false;
            }
            match &state {
                Leadership::Leading => {
                    tracing::info!(lease = %settings.name, identity = %settings.identity, "holding the Lease: this replica plans replays")
                }
                Leadership::Following { holder } => {
                    tracing::info!(lease = %settings.name, ?holder, "not holding the Lease: this replica plans no replay")
                }
            }
            *current = state;
            true
        })
    };
    let step_down = async |renewed: Option<Instant>| match renewed {
        Some(at) => tokio::time::sleep_until(at + deadline).await,
        None => std::future::pending().await,
    };
    loop {
        let sent = Instant::now();
        tokio::select! {
            () = &mut shutdown => break,
            () = step_down(renewed) => {
                tracing::warn!(lease = %settings.name, "could not renew the Lease in time: stepping down");
                renewed = None;
                publish(Leadership::Following { holder: None });
            }
            outcome = tokio::time::timeout(settings.renew_interval, elector.round()) => match outcome {
                Ok(Ok(Leadership::Leading)) => {
                    renewed = Some(sent);
                    publish(Leadership::Leading);
                }
                Ok(Ok(following)) => {
                    renewed = None;
                    publish(following);
                }
                Ok(Err(error)) => {
                    tracing::warn!(lease = %settings.name, %error, "reading or writing the Lease failed")
                }
                Err(_) => {
                    tracing::warn!(lease = %settings.name, "the Kubernetes API did not answer within the renew interval")
                }
            },
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = step_down(renewed) => {
                tracing::warn!(lease = %settings.name, "could not renew the Lease in time: stepping down");
                renewed = None;
                publish(Leadership::Following { holder: None });
            }
            () = tokio::time::sleep_until(sent + settings.renew_interval) => {}
        }
    }
    if renewed.is_some() {
        publish(Leadership::Following { holder: None });
        match tokio::time::timeout(settings.renew_interval, elector.release()).await {
            Ok(Ok(())) => tracing::info!(lease = %settings.name, "Lease released"),
            Ok(Err(error)) => {
                tracing::warn!(lease = %settings.name, %error, "could not release the Lease; another replica takes it once it expires")
            }
            Err(_) => {
                tracing::warn!(lease = %settings.name, "could not release the Lease in time; another replica takes it once it expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::fake_kube::FakeKube;

    const NS: &str = "payledger";
    const LEASE: &str = "payledger-replay-coordinator";

    fn settings(identity: &str) -> LeaseSettings {
        LeaseSettings {
            name: LEASE.into(),
            identity: identity.into(),
            duration: Duration::from_secs(1),
            renew_interval: Duration::from_millis(300),
        }
    }

    fn holder(lease: &Lease) -> Option<String> {
        lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
    }

    /// A replica's leader loop, stopped by `stop`.
    struct Replica {
        leadership: watch::Receiver<Leadership>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Replica {
        fn start(client: kube::Client, identity: &str) -> Replica {
            let (tx, leadership) = watch::channel(Leadership::Following { holder: None });
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let elector = LeaseElector::new(client, NS, settings(identity));
            let task = tokio::spawn(hold(elector, tx, async move {
                let _ = stopped.await;
            }));
            Replica {
                leadership,
                stop: Some(stop),
                task,
            }
        }

        fn leads(&self) -> bool {
            *self.leadership.borrow() == Leadership::Leading
        }

        async fn until_leading(&mut self, within: Duration) {
            tokio::time::timeout(
                within,
                self.leadership.wait_for(|l| *l == Leadership::Leading),
            )
            .await
            .expect("became leader in time")
            .unwrap();
        }
    }

    #[test]
    fn lease_settings_are_checked() {
        assert!(settings("a").validate().is_ok());
        assert!(settings("").validate().is_err());
        let mut s = settings("a");
        s.renew_interval = Duration::from_millis(400);
        assert!(s.validate().is_err(), "more than a third of the duration");
        s.duration = Duration::from_millis(1500);
        assert!(s.validate().is_err(), "not whole seconds");
    }

    #[tokio::test]
    async fn of_two_coordinators_exactly_one_leads_and_the_other_takes_over() {
        let kube = FakeKube::start().await;
        let (door_a, door_b) = (kube.door().await, kube.door().await);
        let a = Replica::start(door_a.client(), "coordinator-a");
        let b = Replica::start(door_b.client(), "coordinator-b");
        // Never both leading, sampled throughout.
        let both = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (a, b, both) = (a.leadership.clone(), b.leadership.clone(), both.clone());
            tokio::spawn(async move {
                loop {
                    if *a.borrow() == Leadership::Leading && *b.borrow() == Leadership::Leading {
                        both.store(true, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while !(a.leads() ^ b.leads()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("one leader");
        // Settle for a few rounds: the leader stays, the other follows it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(a.leads() ^ b.leads());
        let (mut leader, leader_door, mut other) = match a.leads() {
            true => (a, door_a, b),
            false => (b, door_b, a),
        };
        let leader_name = holder(&kube.lease(NS, LEASE).unwrap()).unwrap();
        assert_eq!(
            *other.leadership.borrow(),
            Leadership::Following {
                holder: Some(leader_name.clone())
            }
        );

        // The leader stops renewing (it cannot reach the API server): it steps down
        // by itself, and the other takes over only once the Lease has expired.
        let cut = Instant::now();
        leader_door.set_reachable(false);
        other.until_leading(Duration::from_secs(5)).await;
        let took = cut.elapsed();
        assert!(!leader.leads());
        assert!(
            took >= Duration::from_millis(600),
            "took over after {took:?}, before the Lease could have expired"
        );

        // Reachable again, the old leader finds the Lease taken and follows.
        leader_door.set_reachable(true);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!leader.leads());
        assert!(other.leads());

        // The new leader shuts down: it releases the Lease (the holder sequence
        // below shows the release) and the first takes it at its next round.
        other.stop.take().unwrap().send(()).unwrap();
        other.task.await.unwrap();
        leader.until_leading(Duration::from_secs(5)).await;

        sampler.abort();
        assert!(
            !both.load(Ordering::SeqCst),
            "two coordinators led at the same time"
        );
        // Every write of the Lease named one holder, never a stolen one between:
        // a-or-b, then the other, then (released) none, then the first.
        let holders = kube.lease_holders();
        let changes: Vec<_> = holders.windows(2).filter(|w| w[0] != w[1]).collect();
        assert_eq!(changes.len(), 3, "{holders:?}");
        leader.task.abort();
    }

    #[tokio::test]
    async fn a_stale_update_gets_409_and_does_not_steal_the_lease() {
        let kube = FakeKube::start().await;
        let mut a = LeaseElector::new(kube.client(), NS, settings("coordinator-a"));
        let mut b = LeaseElector::new(kube.client(), NS, settings("coordinator-b"));
        assert_eq!(a.round().await.unwrap(), Leadership::Leading);
        let stale = kube.lease(NS, LEASE).unwrap();
        assert_eq!(a.round().await.unwrap(), Leadership::Leading);

        // A plain update from the version before the renewal is refused.
        let api: Api<Lease> = Api::namespaced(kube.client(), NS);
        let mut steal = stale.clone();
        steal.spec.as_mut().unwrap().holder_identity = Some("coordinator-b".into());
        match api.replace(LEASE, &PostParams::default(), &steal).await {
            Err(kube::Error::Api(status)) => assert!(status.is_conflict(), "{status:?}"),
            other => panic!("a stale update went through: {other:?}"),
        }

        // B acting on what it read before A renewed (as if it saw the Lease free or
        // expired then): its write gets 409, it reads again and follows A.
        let mut free = stale.clone();
        free.spec.as_mut().unwrap().holder_identity = None;
        assert_eq!(
            b.claim(Some(free)).await.unwrap(),
            Leadership::Following {
                holder: Some("coordinator-a".into())
            }
        );
        assert_eq!(
            holder(&kube.lease(NS, LEASE).unwrap()).as_deref(),
            Some("coordinator-a")
        );

        // Both read the released Lease and race for it: exactly one wins.
        a.release().await.unwrap();
        let released = kube.lease(NS, LEASE).unwrap();
        assert_eq!(holder(&released), None);
        assert_eq!(
            b.claim(Some(released.clone())).await.unwrap(),
            Leadership::Leading
        );
        assert_eq!(
            a.claim(Some(released)).await.unwrap(),
            Leadership::Following {
                holder: Some("coordinator-b".into())
            }
        );
        assert_eq!(kube.lease_conflicts(), 3);
        assert_eq!(
            kube.lease_holders(),
            [
                Some("coordinator-a".to_string()),
                Some("coordinator-a".to_string()),
                None,
                Some("coordinator-b".to_string()),
            ]
        );
        let lease = kube.lease(NS, LEASE).unwrap();
        assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));
    }

    #[tokio::test]
    async fn a_second_create_gets_409_and_follows() {
        let kube = FakeKube::start().await;
        let mut a = LeaseElector::new(kube.client(), NS, settings("coordinator-a"));
        let mut b = LeaseElector::new(kube.client(), NS, settings("coordinator-b"));
        // Both saw no Lease; A creates it first.
        assert_eq!(a.claim(None).await.unwrap(), Leadership::Leading);
        assert_eq!(
            b.claim(None).await.unwrap(),
            Leadership::Following {
                holder: Some("coordinator-a".into())
            }
        );
        // A live holder's Lease is not taken before it expires…
        assert_eq!(
            b.round().await.unwrap(),
            Leadership::Following {
                holder: Some("coordinator-a".into())
            }
        );
        // …and is once it has not changed for its duration.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(b.round().await.unwrap(), Leadership::Leading);
        assert_eq!(
            a.round().await.unwrap(),
            Leadership::Following {
                holder: Some("coordinator-b".into())
            }
        );
    }
}
