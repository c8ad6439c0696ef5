//! Replay workers found through the Kubernetes API (`--workers-service`): the ready
//! endpoints of the projectors' headless Service, read from its EndpointSlices
//! (label `kubernetes.io/service-name=<service>`). kube's `watcher` lists them, then
//! watches from the list's resourceVersion (listing again when the server says the
//! version is too old), with backoff while the API server is unreachable. After
//! every change the union of ready endpoints over all slices replaces the
//! `Workers` set; while the API cannot be read, the last set stays.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};

use crate::workers::Workers;

/// The label the EndpointSlice controller puts on the slices of a Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// The Service port the workers serve RunShard on (the chart names it so).
const GRPC_PORT: &str = "grpc";

/// The worker URLs of one EndpointSlice: `<scheme>://<address>:<port>` for every
/// ready endpoint, with the port named `grpc` (or the slice's only port). The
/// address is the pod's IP: with TLS the certificate is checked against the
/// Service's name instead (`--worker-tls-server-name`, see `workers`).
///
/// An endpoint with no `ready` condition counts as ready, as the API documents
/// ("a nil value should be interpreted as true"); the EndpointSlice controller
/// always sets it. Only the first address is used: the controller writes exactly
/// one, and the API gives the others no meaning.
pub(crate) fn ready_workers(slice: &EndpointSlice, scheme: &str) -> Vec<String> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(GRPC_PORT))
        .or(match ports {
            [only] => Some(only),
            _ => None,
        })
        .and_then(|p| p.port);
    let Some(port) = port else {
        tracing::warn!(slice = %slice.name_any(), "EndpointSlice has no port named '{GRPC_PORT}' (nor a single port): its endpoints are skipped");
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.addresses.first())
        .map(|address| match address.contains(':') {
            true => format!("{scheme}://[{address}]:{port}"),
            false => format!("{scheme}://{address}:{port}"),
        })
        .collect()
}

/// Keeps `workers` equal to the ready endpoints of `service` in `namespace`, until
/// the task is dropped.
pub(crate) async fn follow_workers(
    client: kube::Client,
    namespace: String,
    service: String,
    workers: Arc<Workers>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let scheme = workers.scheme();
    let config = watcher::Config::default().labels(&format!("{SERVICE_LABEL}={service}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    // Ready worker URLs by slice name.
    let mut slices: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // A (re)list in progress: it replaces `slices` whole once complete, so that
    // a slice deleted while the watch was down goes away too.
    let mut listing: Option<BTreeMap<String, Vec<String>>> = None;
    let mut current: Option<Vec<String>> = None;
    while let Some(event) = events.next().await {
        match event {
            Err(error) => {
                tracing::warn!(%namespace, %service, %error, "reading the replay workers' EndpointSlices failed; keeping the workers last seen");
                continue;
            }
            Ok(Event::Init) => {
                listing = Some(BTreeMap::new());
                continue;
            }
            Ok(Event::InitApply(slice)) => {
                listing
                    .get_or_insert_default()
                    .insert(slice.name_any(), ready_workers(&slice, scheme));
                continue;
            }
            Ok(Event::InitDone) => slices = listing.take().unwrap_or_default(),
            Ok(Event::Apply(slice)) => {
                slices.insert(slice.name_any(), ready_workers(&slice, scheme));
            }
            Ok(Event::Delete(slice)) => {
                slices.remove(&slice.name_any());
            }
        }
        let mut urls: Vec<String> = slices.values().flatten().cloned().collect();
        urls.sort();
        urls.dedup();
        if current.as_ref() == Some(&urls) {
            continue;
        }
        match workers.set_workers(&urls) {
            Ok(()) => {
                tracing::info!(%service, workers = ?urls, "replay workers discovered");
                current = Some(urls);
            }
            Err(error) => {
                tracing::warn!(%service, %error, "discovered replay workers refused")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::discovery::v1::EndpointPort;

    use super::*;
    use crate::fake_kube::{FakeKube, slice};

    const NS: &str = "payledger";
    const SERVICE: &str = "payledger-projector";

    #[test]
    fn ready_endpoints_on_the_grpc_port_become_workers() {
        let mut s = slice(
            "a",
            SERVICE,
            50053,
            &[("10.0.0.1", true), ("10.0.0.2", false), ("fd00::3", true)],
        );
        s.endpoints[0].conditions.as_mut().unwrap().ready = None;
        assert_eq!(
            ready_workers(&s, "http"),
            ["http://10.0.0.1:50053", "http://[fd00::3]:50053"]
        );
        assert_eq!(
            ready_workers(&s, "https"),
            ["https://10.0.0.1:50053", "https://[fd00::3]:50053"]
        );
        // The port named grpc among several; then no name to go by.
        let metrics = EndpointPort {
            name: Some("metrics".into()),
            port: Some(9090),
            ..Default::default()
        };
        s.ports.as_mut().unwrap().insert(0, metrics.clone());
        assert_eq!(ready_workers(&s, "http")[0], "http://10.0.0.1:50053");
        s.ports.as_mut().unwrap()[1].name = Some("other".into());
        assert!(ready_workers(&s, "http").is_empty());
        s.ports = Some(vec![EndpointPort {
            name: None,
            ..metrics
        }]);
        assert_eq!(ready_workers(&s, "http")[0], "http://10.0.0.1:9090");
    }

    /// Waits until the worker set is `want`.
    async fn until_workers(workers: &Workers, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if workers.urls() == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "workers are {:?}, expected {want:?}",
                workers.urls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn discovery_follows_readiness_and_endpoints_coming_and_going() {
        let kube = FakeKube::start().await;
        let three = [("10.0.0.1", true), ("10.0.0.2", true), ("10.0.0.3", true)];
        kube.apply_slice(NS, slice("projector-abc", SERVICE, 50053, &three));
        // Another Service's slice and the same name in another namespace are not ours.
        kube.apply_slice(NS, slice("query-x", "payledger-query", 50052, &three));
        kube.apply_slice("elsewhere", slice("projector-abc", SERVICE, 1, &three));
        let workers = Arc::new(Workers::discovered(1, Duration::from_secs(60), None));
        let task = tokio::spawn(follow_workers(
            kube.client(),
            NS.into(),
            SERVICE.into(),
            workers.clone(),
        ));
        until_workers(
            &workers,
            &[
                "http://10.0.0.1:50053",
                "http://10.0.0.2:50053",
                "http://10.0.0.3:50053",
            ],
        )
        .await;

        // One endpoint turns not-ready (a watch MODIFIED event): it is dropped.
        let two_ready = [("10.0.0.1", true), ("10.0.0.2", false), ("10.0.0.3", true)];
        kube.apply_slice(NS, slice("projector-abc", SERVICE, 50053, &two_ready));
        until_workers(
            &workers,
            &["http://10.0.0.1:50053", "http://10.0.0.3:50053"],
        )
        .await;

        // A new pod shows up in a second slice (ADDED): it is added.
        kube.apply_slice(
            NS,
            slice("projector-def", SERVICE, 50053, &[("10.0.0.4", true)]),
        );
        until_workers(
            &workers,
            &[
                "http://10.0.0.1:50053",
                "http://10.0.0.3:50053",
                "http://10.0.0.4:50053",
            ],
        )
        .await;

        // The first slice goes away (DELETED): only the new pod is left.
        kube.delete_slice(NS, "projector-abc");
        until_workers(&workers, &["http://10.0.0.4:50053"]).await;
        task.abort();
    }

    #[tokio::test]
    async fn a_pod_disappearing_mid_shard_gets_no_new_shard_and_its_claim_drops_cleanly() {
        let kube = FakeKube::start().await;
        let pods = [("10.0.0.1", true), ("10.0.0.2", true)];
        kube.apply_slice(NS, slice("projector-abc", SERVICE, 50053, &pods));
        let workers = Arc::new(Workers::discovered(1, Duration::from_secs(60), None));
        let task = tokio::spawn(follow_workers(
            kube.client(),
            NS.into(),
            SERVICE.into(),
            workers.clone(),
        ));
        until_workers(
            &workers,
            &["http://10.0.0.1:50053", "http://10.0.0.2:50053"],
        )
        .await;
        let first = workers.acquire(&[]).unwrap();
        let second = workers.acquire(&[]).unwrap();
        let (doomed, other) = match first.url.as_str() {
            "http://10.0.0.1:50053" => (first, second),
            _ => (second, first),
        };
        // The pod of 10.0.0.1 is deleted mid-shard: its endpoint leaves the slice.
        kube.apply_slice(
            NS,
            slice("projector-abc", SERVICE, 50053, &[("10.0.0.2", true)]),
        );
        until_workers(&workers, &["http://10.0.0.2:50053"]).await;
        // Its shard's RPC fails and the runner drops the claim: no panic, no slot
        // freed, and the retry may only go to the pod that is left.
        drop(doomed);
        assert!(workers.acquire(&[]).is_none());
        drop(other);
        let retry = workers
            .acquire(&["http://10.0.0.1:50053".to_string()])
            .unwrap();
        assert_eq!(retry.url, "http://10.0.0.2:50053");
        task.abort();
    }
}
