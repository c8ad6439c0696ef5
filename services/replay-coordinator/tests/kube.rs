//! Two coordinators in a (fake) cluster, run in-process with a real NATS server:
//! exactly one holds the Lease and plans; the standby answers StartReplay
//! UNAVAILABLE, reads the replays from KV and is not ready (its ReplayCoordinator
//! health is NOT_SERVING); the workers are the ready endpoints of the projectors'
//! Service; when the leader stops, the standby takes over, turns ready and
//! resumes its unfinished replay on a worker that turned ready since.

#[path = "support/fake_kube.rs"]
mod fake_kube;

use std::time::{Duration, Instant};

use fake_kube::{FakeKube, slice};
use payledger_proto::v1::{self, replay_coordinator_client::ReplayCoordinatorClient};
use payledger_replay_coordinator::{CoordinatorConfig, SERVICE_NAME, run};
use payledger_semantics::Settings;
use payledger_server_common::local_nats::{LocalNats, free_port};
use payledger_server_common::topology::{StreamOptions, ensure_stream};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const NS: &str = "payledger";
const SERVICE: &str = "payledger-projector";
const LEASE: &str = "payledger-replay-coordinator";

struct Coordinator {
    name: String,
    client: ReplayCoordinatorClient<Channel>,
    health: HealthClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn coordinator(nats: &str, store: &str, kube: &str, name: &str) -> Coordinator {
    let mut config = CoordinatorConfig::new(nats, store, Vec::new());
    config.workers_service = Some(SERVICE.into());
    config.namespace = Some(NS.into());
    config.lease_name = Some(LEASE.into());
    config.pod_name = Some(name.into());
    config.lease_duration = Duration::from_secs(1);
    config.lease_renew_interval = Duration::from_millis(300);
    config.kube_api = Some(kube.into());
    config.shard_attempts = 1;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(config, listener, async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(url).unwrap().connect_lazy();
    Coordinator {
        name: name.into(),
        client: ReplayCoordinatorClient::new(channel.clone()),
        health: HealthClient::new(channel),
        stop: Some(stop),
        task,
    }
}

fn start_request() -> v1::StartReplayRequest {
    v1::StartReplayRequest {
        from_day: "2026-01-01".into(),
        to_day: "2026-01-01".into(),
        reason: "kube test".into(),
        ..Default::default()
    }
}

/// Polls `check` until it returns Some, for at most `within`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The health status of `service` ("" for the server as a whole).
async fn health(c: &Coordinator, service: &str) -> ServingStatus {
    let request = HealthCheckRequest {
        service: service.into(),
    };
    let status = c.health.clone().check(request).await.unwrap();
    ServingStatus::try_from(status.into_inner().status).unwrap()
}

/// Waits until `c`'s health for `service` is `want`.
async fn until_health(c: &Coordinator, service: &str, want: ServingStatus) {
    let what = format!("{}'s {service:?} health to be {want:?}", c.name);
    eventually(Duration::from_secs(5), &what, || async {
        (health(c, service).await == want).then_some(())
    })
    .await;
}

async fn replay(c: &Coordinator, id: &str) -> Option<v1::Replay> {
    let request = v1::GetReplayRequest {
        replay_id: id.into(),
    };
    c.client
        .clone()
        .get_replay(request)
        .await
        .ok()
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_coordinator_plans_and_a_standby_takes_over_on_discovered_workers() {
    let dir = tempfile::tempdir().unwrap();
    let nats = LocalNats::start(&dir.path().join("nats")).unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let options = StreamOptions {
        replicas: 1,
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(36 * 86_400),
        max_message_bytes: 1 << 20,
    };
    ensure_stream(&js, &Settings::default().stream(), &options)
        .await
        .unwrap();
    // An archive with one complete cut (and nothing in it): enough to start a replay.
    let store = dir.path().join("store");
    std::fs::create_dir_all(store.join("archive/_watermarks")).unwrap();
    std::fs::write(store.join("archive/_watermarks/00000000000000000010"), b"").unwrap();
    let store = store.to_str().unwrap();

    // The one projector pod is not ready yet: no worker.
    let kube = FakeKube::start().await;
    let worker_port = free_port().unwrap() as i32;
    let worker = format!("http://127.0.0.1:{worker_port}");
    let pod = |ready| {
        slice(
            "projector-abc",
            SERVICE,
            worker_port,
            &[("127.0.0.1", ready)],
        )
    };
    kube.apply_slice(NS, pod(false));

    let a = coordinator(&nats.url(), store, kube.url(), "coordinator-a").await;
    let b = coordinator(&nats.url(), store, kube.url(), "coordinator-b").await;
    let holder = eventually(Duration::from_secs(10), "a Lease holder", || async {
        kube.lease(NS, LEASE)?.spec?.holder_identity
    })
    .await;
    let (mut leader, mut standby) = match holder.as_str() {
        "coordinator-a" => (a, b),
        _ => (b, a),
    };

    // The standby refuses to plan and, once it has read the Lease, names the leader.
    eventually(
        Duration::from_secs(5),
        "the standby to name the leader",
        || {
            let mut client = standby.client.clone();
            let leader = leader.name.clone();
            async move {
                let refused = client.start_replay(start_request()).await.unwrap_err();
                assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
                // Marked as refused before anything was done: safe to retry.
                assert!(
                    refused
                        .metadata()
                        .contains_key(payledger_proto::NOT_LEADER_METADATA),
                    "{refused:?}"
                );
                refused.message().contains(&leader).then_some(())
            }
        },
    )
    .await;

    // The leader plans (once it has read the replays left in KV).
    let started = eventually(Duration::from_secs(10), "the leader to plan", || {
        let mut client = leader.client.clone();
        async move {
            match client.start_replay(start_request()).await {
                Ok(replay) => Some(replay.into_inner()),
                Err(s) if s.code() == Code::Unavailable => None,
                Err(s) => panic!("the leader refused to plan: {s:?}"),
            }
        }
    })
    .await;
    let id = started.replay_id.clone();
    // Readiness: the leader's ReplayCoordinator is SERVING, the standby's is not,
    // while both servers as a whole are (liveness).
    until_health(&leader, SERVICE_NAME, ServingStatus::Serving).await;
    assert_eq!(
        health(&standby, SERVICE_NAME).await,
        ServingStatus::NotServing
    );
    assert_eq!(health(&standby, "").await, ServingStatus::Serving);
    assert_eq!(health(&leader, "").await, ServingStatus::Serving);
    // No worker is ready, so every shard waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = replay(&leader, &id).await.unwrap();
    assert_eq!(waiting.state, i32::from(v1::ReplayState::Running));
    assert!(
        waiting
            .shards
            .iter()
            .all(|s| s.state == i32::from(v1::ShardState::Pending) && s.attempts == 0),
        "{waiting:?}"
    );
    // The standby reads what the leader wrote to KV.
    eventually(
        Duration::from_secs(5),
        "the standby to see the replay",
        || replay(&standby, &id),
    )
    .await;

    // The leader shuts down: it abandons the replay, releases the Lease, and the
    // standby takes over and resumes the replay.
    leader.stop.take().unwrap().send(()).unwrap();
    leader.task.await.unwrap().unwrap();
    eventually(Duration::from_secs(5), "the standby to lead", || async {
        let holder = kube.lease(NS, LEASE)?.spec?.holder_identity?;
        (holder == standby.name).then_some(())
    })
    .await;
    // The new leader turns ready.
    until_health(&standby, SERVICE_NAME, ServingStatus::Serving).await;

    // The pod turns ready: discovery hands it to the new leader, which places a
    // shard on it. Nothing listens there, so the attempt fails and (one attempt
    // per shard here) the replay fails, naming the discovered worker.
    kube.apply_slice(NS, pod(true));
    let ended = eventually(Duration::from_secs(15), "the resumed replay to end", || {
        let standby = &standby;
        let id = &id;
        async move {
            let r = replay(standby, id).await?;
            (r.state != i32::from(v1::ReplayState::Running)).then_some(r)
        }
    })
    .await;
    assert_eq!(ended.state, i32::from(v1::ReplayState::Failed), "{ended:?}");
    assert!(ended.error.contains(&worker), "{}", ended.error);
    assert!(ended.shards.iter().any(|s| s.worker == worker), "{ended:?}");

    // And it plans new replays now.
    standby.client.start_replay(start_request()).await.unwrap();
    standby.stop.take().unwrap().send(()).unwrap();
    standby.task.await.unwrap().unwrap();
}
