//! `payledger replay start|cancel` against a coordinator that does not take the
//! call yet: a stand-in ReplayCoordinator served over real gRPC refuses as a
//! standby does (UNAVAILABLE marked `payledger-not-leader`) a few times, then
//! answers as the new leader. The client retries that refusal, and a refused
//! connection, but never a StartReplay that failed UNAVAILABLE without the mark.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use payledger_cli::replay::{Call, RetryArgs, send_with_retry};
use payledger_proto::v1::{self, replay_coordinator_server::ReplayCoordinator};
use payledger_server_common::serve::{ServerOptions, serve_grpc};
use tonic::{Request, Response, Status};

/// How the stand-in answers StartReplay and CancelReplay.
#[derive(Clone, Copy)]
enum Refusal {
    /// As a standby: UNAVAILABLE with the not-leader mark, before doing anything.
    NotLeader,
    /// UNAVAILABLE without the mark: what a broken connection or a proxy gives,
    /// possibly after the call took effect.
    Unmarked,
}

struct StandIn {
    /// Calls refused before the stand-in answers as the leader.
    refusals: usize,
    refusal: Refusal,
    calls: Arc<AtomicUsize>,
}

impl StandIn {
    fn answer(&self) -> Result<Response<v1::Replay>, Status> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.refusals {
            return Err(match self.refusal {
                Refusal::NotLeader => {
                    let mut metadata = tonic::metadata::MetadataMap::new();
                    metadata.insert(
                        payledger_proto::NOT_LEADER_METADATA,
                        tonic::metadata::MetadataValue::from_static("true"),
                    );
                    Status::with_metadata(
                        tonic::Code::Unavailable,
                        "this coordinator (b) is a standby: a holds the Lease",
                        metadata,
                    )
                }
                Refusal::Unmarked => Status::unavailable("upstream connection reset"),
            });
        }
        Ok(Response::new(v1::Replay {
            replay_id: format!("r-after-{call}-refusals"),
            ..Default::default()
        }))
    }
}

type ReplayStream =
    Pin<Box<dyn futures::Stream<Item = Result<v1::Replay, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ReplayCoordinator for StandIn {
    async fn start_replay(
        &self,
        _: Request<v1::StartReplayRequest>,
    ) -> Result<Response<v1::Replay>, Status> {
        self.answer()
    }

    async fn get_replay(
        &self,
        _: Request<v1::GetReplayRequest>,
    ) -> Result<Response<v1::Replay>, Status> {
        Err(Status::unimplemented("not here"))
    }

    async fn list_replays(
        &self,
        _: Request<v1::ListReplaysRequest>,
    ) -> Result<Response<v1::ListReplaysResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }

    type WatchReplayStream = ReplayStream;

    async fn watch_replay(
        &self,
        _: Request<v1::GetReplayRequest>,
    ) -> Result<Response<ReplayStream>, Status> {
        Err(Status::unimplemented("not here"))
    }

    async fn cancel_replay(
        &self,
        _: Request<v1::CancelReplayRequest>,
    ) -> Result<Response<v1::Replay>, Status> {
        self.answer()
    }
}

/// Serves a stand-in on `listener`; returns the count of StartReplay and
/// CancelReplay calls it received.
fn serve(listener: tokio::net::TcpListener, refusals: usize, refusal: Refusal) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let api = StandIn {
        refusals,
        refusal,
        calls: calls.clone(),
    };
    let routes = tonic::service::Routes::new(
        v1::replay_coordinator_server::ReplayCoordinatorServer::new(api),
    );
    tokio::spawn(async move {
        let options = ServerOptions {
            max_request_bytes: 64 << 10,
            concurrency_per_connection: 8,
            tokens: None,
            tls: Default::default(),
            serving_while: Vec::new(),
        };
        serve_grpc(
            Some(routes),
            &["payledger.v1.ReplayCoordinator"],
            listener,
            &options,
            std::future::pending(),
        )
        .await
    });
    calls
}

async fn stand_in(refusals: usize, refusal: Refusal) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (url, serve(listener, refusals, refusal))
}

fn retry_for(d: Duration) -> RetryArgs {
    RetryArgs { retry_for: d }
}

async fn start(url: &str, retry: &RetryArgs) -> anyhow::Result<v1::Replay> {
    let request = v1::StartReplayRequest::default();
    let (replay, _) = send_with_retry(url, retry, Call::Start, |mut client| {
        let request = request.clone();
        async move { client.start_replay(request).await }
    })
    .await?;
    Ok(replay)
}

async fn cancel(url: &str, retry: &RetryArgs) -> anyhow::Result<v1::Replay> {
    let (replay, _) = send_with_retry(url, retry, Call::Cancel, |mut client| async move {
        client
            .cancel_replay(v1::CancelReplayRequest::default())
            .await
    })
    .await?;
    Ok(replay)
}

#[tokio::test]
async fn start_waits_out_a_standby_until_it_leads() {
    let (url, calls) = stand_in(2, Refusal::NotLeader).await;
    let replay = start(&url, &retry_for(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(replay.replay_id, "r-after-2-refusals");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one start answered, after two refusals"
    );
}

#[tokio::test]
async fn start_gives_up_after_retry_for_and_says_why() {
    let (url, calls) = stand_in(usize::MAX, Refusal::NotLeader).await;
    let began = Instant::now();
    let error = start(&url, &retry_for(Duration::from_millis(1200)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert!(
        error.contains("is a standby") && error.contains("--retry-for 1s 200ms"),
        "{error}"
    );
    // Attempts at 0, 0.5 s and 1.2 s (the last wait cut short to end at
    // --retry-for); two if an attempt was slow enough to use up the time.
    assert!((2..=3).contains(&calls.load(Ordering::SeqCst)), "{calls:?}");
}

#[tokio::test]
async fn with_retry_for_zero_start_tries_once() {
    let (url, calls) = stand_in(1, Refusal::NotLeader).await;
    assert!(start(&url, &retry_for(Duration::ZERO)).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unmarked_unavailable_start_is_not_sent_twice_but_a_cancel_is() {
    // The first StartReplay may have started a replay: sending it again could
    // start a second one.
    let (url, calls) = stand_in(1, Refusal::Unmarked).await;
    let error = start(&url, &retry_for(Duration::from_secs(20)))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("Unavailable"), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Cancelling twice is harmless.
    let (url, calls) = stand_in(1, Refusal::Unmarked).await;
    cancel(&url, &retry_for(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn start_waits_for_a_coordinator_that_is_not_listening_yet() {
    // Nothing listens on the port at first: connecting fails, nothing is sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let comes_up = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        serve(
            tokio::net::TcpListener::bind(addr).await.unwrap(),
            0,
            Refusal::NotLeader,
        )
    });
    let replay = start(
        &format!("http://{addr}"),
        &retry_for(Duration::from_secs(20)),
    )
    .await
    .unwrap();
    assert_eq!(replay.replay_id, "r-after-0-refusals");
    assert_eq!(comes_up.await.unwrap().load(Ordering::SeqCst), 1);
}
