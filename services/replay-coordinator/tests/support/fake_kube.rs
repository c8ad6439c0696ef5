//! A small stand-in for the Kubernetes API server, enough for the coordinator's
//! worker discovery and its Lease:
//!
//! - `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=…`
//!   lists with `metadata.resourceVersion`; with `watch=true&resourceVersion=N` it
//!   streams the ADDED / MODIFIED / DELETED events after N, then live ones, one JSON
//!   object per line.
//! - `GET`, `POST`, `PUT /apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]`:
//!   a create of an existing Lease is `409 AlreadyExists`; an update must carry the
//!   `resourceVersion` it read (422 without one, stricter than the real server, so
//!   that every write the coordinator makes is shown to be conditional) and gets
//!   `409 Conflict` when the Lease changed since.
//!
//! Objects are k8s-openapi types serialized with serde_json, as the real server
//! sends them, and errors are `Status` objects. Several listeners ("doors") can
//! share one state, each with a switch that makes it answer 503, for a replica
//! that cannot reach the API server while another can.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

type Body = BoxBody<Bytes, Infallible>;

/// One EndpointSlice change, as a watch streams it.
#[derive(Clone)]
struct SliceEvent {
    version: u64,
    kind: &'static str,
    slice: EndpointSlice,
}

#[derive(Default)]
struct State {
    /// The resourceVersion of the last write, over every kind of object.
    version: u64,
    slices: BTreeMap<(String, String), EndpointSlice>,
    /// Every slice change, for a watch that starts from an older resourceVersion.
    history: Vec<SliceEvent>,
    leases: BTreeMap<(String, String), Lease>,
    /// The holder after each accepted Lease write, in order.
    lease_holders: Vec<Option<String>>,
    /// Lease writes refused with 409.
    lease_conflicts: usize,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<SliceEvent>,
}

/// The fake API server; dropping it closes every door.
pub struct FakeKube {
    shared: Arc<Shared>,
    main: Door,
}

/// One listener on the fake API server.
pub struct Door {
    url: String,
    reachable: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Door {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Door {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// While false, every request through this door is answered 503.
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::SeqCst);
    }

    /// A kube client talking through this door.
    pub fn client(&self) -> kube::Client {
        client(&self.url)
    }
}

/// A kube client for the API server at `url`, without credentials.
pub fn client(url: &str) -> kube::Client {
    // As the coordinator does before it builds its client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new(url.parse().expect("fake API URL"));
    kube::Client::try_from(config).expect("kube client")
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            events: broadcast::channel(1024).0,
        });
        let main = open_door(shared.clone()).await;
        FakeKube { shared, main }
    }

    pub fn url(&self) -> &str {
        self.main.url()
    }

    pub fn client(&self) -> kube::Client {
        self.main.client()
    }

    /// Another listener on the same state.
    pub async fn door(&self) -> Door {
        open_door(self.shared.clone()).await
    }

    /// Creates or replaces an EndpointSlice (ADDED or MODIFIED to watchers).
    pub fn apply_slice(&self, namespace: &str, mut slice: EndpointSlice) {
        let name = slice.metadata.name.clone().expect("slice name");
        let mut state = self.shared.state.lock().unwrap();
        state.version += 1;
        let version = state.version;
        slice.metadata.namespace = Some(namespace.to_string());
        slice.metadata.resource_version = Some(version.to_string());
        let kind = match state
            .slices
            .insert((namespace.to_string(), name), slice.clone())
        {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        self.record(
            &mut state,
            SliceEvent {
                version,
                kind,
                slice,
            },
        );
    }

    /// Deletes an EndpointSlice (DELETED to watchers).
    pub fn delete_slice(&self, namespace: &str, name: &str) {
        let mut state = self.shared.state.lock().unwrap();
        let Some(mut slice) = state
            .slices
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            return;
        };
        state.version += 1;
        let version = state.version;
        slice.metadata.resource_version = Some(version.to_string());
        self.record(
            &mut state,
            SliceEvent {
                version,
                kind: "DELETED",
                slice,
            },
        );
    }

    fn record(&self, state: &mut State, event: SliceEvent) {
        state.history.push(event.clone());
        // Sent under the lock, so a watch that subscribes under it misses nothing.
        let _ = self.shared.events.send(event);
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Lease> {
        let state = self.shared.state.lock().unwrap();
        state
            .leases
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The holder after each accepted Lease write, oldest first.
    pub fn lease_holders(&self) -> Vec<Option<String>> {
        self.shared.state.lock().unwrap().lease_holders.clone()
    }

    pub fn lease_conflicts(&self) -> usize {
        self.shared.state.lock().unwrap().lease_conflicts
    }
}

/// An EndpointSlice of `service` as the EndpointSlice controller writes it: the
/// port named `grpc`, one address per endpoint with its ready condition.
pub fn slice(name: &str, service: &str, port: i32, endpoints: &[(&str, bool)]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: endpoints
            .iter()
            .map(|(address, ready)| Endpoint {
                addresses: vec![address.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    serving: Some(*ready),
                    terminating: Some(false),
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("grpc".into()),
            port: Some(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

async fn open_door(shared: Arc<Shared>) -> Door {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().unwrap();
    let reachable = Arc::new(AtomicBool::new(true));
    let open = reachable.clone();
    let task = tokio::spawn(async move {
        // Dropped with the accept task, which aborts every connection.
        let mut connections = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            let open = open.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let shared = shared.clone();
                    let open = open.load(Ordering::SeqCst);
                    async move {
                        Ok::<_, Infallible>(if open {
                            handle(&shared, request).await
                        } else {
                            status(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "ServiceUnavailable",
                                "unreachable",
                            )
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    });
    Door {
        url: format!("http://{addr}"),
        reachable,
        task,
    }
}

fn full(code: StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn ok(code: StatusCode, object: &impl serde::Serialize) -> Response<Body> {
    full(code, serde_json::to_value(object).unwrap())
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (
            Method::GET,
            [
                "apis",
                "discovery.k8s.io",
                "v1",
                "namespaces",
                ns,
                "endpointslices",
            ],
        ) => {
            let selector = query.get("labelSelector").cloned().unwrap_or_default();
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                watch_slices(shared, ns, &selector, from)
            } else {
                list_slices(shared, ns, &selector)
            }
        }
        (
            Method::GET,
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
                name,
            ],
        ) => {
            let state = shared.state.lock().unwrap();
            match state.leases.get(&(ns.to_string(), name.to_string())) {
                Some(lease) => ok(StatusCode::OK, lease),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("leases.coordination.k8s.io \"{name}\" not found"),
                ),
            }
        }
        (
            Method::POST,
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
            ],
        ) => {
            let Ok(mut lease) = serde_json::from_slice::<Lease>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not a Lease");
            };
            let name = lease.metadata.name.clone().unwrap_or_default();
            let mut state = shared.state.lock().unwrap();
            let key = (ns.to_string(), name.clone());
            if state.leases.contains_key(&key) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                );
            }
            state.version += 1;
            lease.metadata.namespace = Some(ns.to_string());
            lease.metadata.resource_version = Some(state.version.to_string());
            lease.metadata.uid = Some(format!("uid-{}", state.version));
            let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
            state.lease_holders.push(holder);
            state.leases.insert(key, lease.clone());
            ok(StatusCode::CREATED, &lease)
        }
        (
            Method::PUT,
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
                name,
            ],
        ) => {
            let Ok(mut lease) = serde_json::from_slice::<Lease>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not a Lease");
            };
            let mut guard = shared.state.lock().unwrap();
            let state = &mut *guard;
            let key = (ns.to_string(), name.to_string());
            let Some(current) = state.leases.get(&key).cloned() else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("leases.coordination.k8s.io \"{name}\" not found"),
                );
            };
            let Some(read) = lease.metadata.resource_version.clone() else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.resourceVersion: Invalid value: 0: must be specified for an update",
                );
            };
            if Some(&read) != current.metadata.resource_version.as_ref() {
                state.lease_conflicts += 1;
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            state.version += 1;
            lease.metadata.namespace = Some(ns.to_string());
            lease.metadata.resource_version = Some(state.version.to_string());
            lease.metadata.uid = current.metadata.uid.clone();
            let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
            state.lease_holders.push(holder);
            state.leases.insert(key, lease.clone());
            ok(StatusCode::OK, &lease)
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// `k=v[,k=v…]` (`==` too): the only selectors the coordinator sends.
fn selects(selector: &str, slice: &EndpointSlice) -> bool {
    let labels = slice.metadata.labels.clone().unwrap_or_default();
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (key, value) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .unwrap_or((term, ""));
        labels.get(key.trim()).map(String::as_str) == Some(value.trim())
    })
}

fn list_slices(shared: &Shared, ns: &str, selector: &str) -> Response<Body> {
    let state = shared.state.lock().unwrap();
    let items: Vec<serde_json::Value> = state
        .slices
        .iter()
        .filter(|((n, _), s)| n == ns && selects(selector, s))
        .map(|(_, s)| serde_json::to_value(s).unwrap())
        .collect();
    full(
        StatusCode::OK,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": state.version.to_string()},
            "items": items,
        }),
    )
}

fn watch_slices(shared: &Shared, ns: &str, selector: &str, from: u64) -> Response<Body> {
    let wanted = {
        let ns = ns.to_string();
        let selector = selector.to_string();
        move |e: &SliceEvent| {
            e.version > from
                && e.slice.metadata.namespace.as_deref() == Some(ns.as_str())
                && selects(&selector, &e.slice)
        }
    };
    let line = |e: &SliceEvent| {
        let mut text = json!({"type": e.kind, "object": e.slice}).to_string();
        text.push('\n');
        Bytes::from(text)
    };
    let (backlog, mut live) = {
        let state = shared.state.lock().unwrap();
        let backlog: Vec<Bytes> = state
            .history
            .iter()
            .filter(|e| wanted(e))
            .map(line)
            .collect();
        (backlog, shared.events.subscribe())
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for bytes in backlog {
            if tx.send(bytes).await.is_err() {
                return;
            }
        }
        while let Ok(event) = live.recv().await {
            if wanted(&event) && tx.send(line(&event)).await.is_err() {
                return;
            }
        }
    });
    let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap()
}
