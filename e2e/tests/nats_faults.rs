//! NATS going away under the services, against the real binaries: a nats-server
//! that crashes and comes back on the same port and store, and a server list whose
//! first node is down.

use std::time::{Duration, Instant};

use payledger_e2e::{Harness, assert_converges, ingest_client, now_us, query_client, read_log};
use payledger_proto::v1::{self, EventKind, ingest_service_client::IngestServiceClient};
use payledger_semantics::{Exposure, Settings};
use payledger_server_common::local_nats::free_port;
use tonic::transport::Channel;

const MINUTE_US: i64 = 60_000_000;

/// Ingest without heartbeats, so that the log holds only the test's events.
const INGEST_ARGS: [&str; 2] = ["--heartbeat-interval", "0s"];

/// 20 valid events of round `round` (enough to go as one atomic batch).
fn round_events(round: usize) -> Vec<v1::Event> {
    let now = now_us();
    (0..20)
        .map(|i| v1::Event {
            event_id: format!("ev-{round}-{i}"),
            merchant_id: format!("m-{}", i % 4),
            kind: EventKind::PaymentCaptured as i32,
            amount_minor: 100 + i as i64,
            currency: "EUR".to_string(),
            event_time_us: now - MINUTE_US,
            corrects_event_id: String::new(),
        })
        .collect()
}

/// Publishes one round; Ok only when every event was accepted or absorbed.
async fn publish_round(
    client: &mut IngestServiceClient<Channel>,
    round: usize,
) -> anyhow::Result<()> {
    let call = client.publish(v1::PublishRequest {
        events: round_events(round),
    });
    let results = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??
        .into_inner()
        .results;
    for r in &results {
        anyhow::ensure!(
            !matches!(
                r.outcome,
                Some(v1::publish_result::Outcome::Rejected(_)) | None
            ),
            "round {round}: {r:?}"
        );
    }
    Ok(())
}

/// The oracle from the log itself: a call whose answer was lost in the restart
/// may still have stored its events, and the projector folds what the log holds.
async fn oracle_of_log(nats_url: &str) -> anyhow::Result<Exposure> {
    let mut exposure = Exposure::new(Settings::default());
    for entry in read_log(nats_url).await? {
        if let Some(partition) = entry.partition() {
            exposure.apply(partition, &entry.to_record()?)?;
        }
    }
    Ok(exposure)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_rides_out_a_nats_server_crash_and_serves_what_follows() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let ingest = h.spawn("payledger-ingest", &INGEST_ARGS).await?;
    let store = h.store();
    let mut projector = h
        .spawn(
            "payledger-projector",
            &["--store", &store, "--checkpoint-interval", "500ms"],
        )
        .await?;
    let mut query = h.spawn("payledger-query", &[]).await?;
    let mut client = ingest_client(&ingest.url()).await?;
    let mut q = query_client(&query.url()).await?;

    publish_round(&mut client, 0).await?;
    assert_converges(
        &mut q,
        &oracle_of_log(&h.nats.url()).await?,
        Duration::from_secs(30),
    )
    .await?;

    h.restart_nats_hard()?;

    // Keep writing until the query service says it re-created what the crash took
    // from it, and rounds written after the restart were accepted.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut round = 1;
    let mut accepted_after_restart = 0;
    loop {
        if let Some(status) = query.exited()? {
            anyhow::bail!(
                "query exited with {status} after nats-server restarted:\n{}",
                query.log()
            );
        }
        if let Some(status) = projector.exited()? {
            anyhow::bail!(
                "the projector exited with {status} after nats-server restarted:\n{}",
                projector.log()
            );
        }
        match publish_round(&mut client, round).await {
            Ok(()) => accepted_after_restart += 1,
            Err(e) => eprintln!("round {round} after the restart: {e}"),
        }
        round += 1;
        let resumed = query.log().contains("re-created");
        if resumed && accepted_after_restart >= 3 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "within 120 s of the restart: {accepted_after_restart} rounds accepted, \
             followers re-created: {resumed}; query log:\n{}",
            query.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{round} rounds written; {accepted_after_restart} accepted after the restart");
    for line in query
        .log()
        .lines()
        .filter(|l| l.contains("lost") || l.contains("re-created"))
    {
        eprintln!("query: {line}");
    }

    // Rows written after the restart are served, equal to the log's fold.
    assert_converges(
        &mut q,
        &oracle_of_log(&h.nats.url()).await?,
        Duration::from_secs(30),
    )
    .await?;
    anyhow::ensure!(query.exited()?.is_none(), "query exited:\n{}", query.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_stops_cleanly_when_its_buckets_come_back_empty() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let ingest = h.spawn("payledger-ingest", &INGEST_ARGS).await?;
    let store = h.store();
    let _projector = h
        .spawn(
            "payledger-projector",
            &["--store", &store, "--checkpoint-interval", "500ms"],
        )
        .await?;
    let mut query = h.spawn("payledger-query", &[]).await?;
    let mut client = ingest_client(&ingest.url()).await?;
    let mut q = query_client(&query.url()).await?;
    publish_round(&mut client, 0).await?;
    assert_converges(
        &mut q,
        &oracle_of_log(&h.nats.url()).await?,
        Duration::from_secs(30),
    )
    .await?;

    // The node comes back empty: the rows the query service holds are in no bucket.
    h.restart_nats_wiped()?;
    // Buckets again, but from revision 0: following them from where it was would
    // miss every row until their revisions pass it.
    let js = async_nats::jetstream::new(async_nats::connect(h.nats.url()).await?);
    payledger_server_common::topology::ensure_buckets(&js, 1).await?;

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = query.exited()? {
            break status;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "query kept serving tables its buckets no longer hold:\n{}",
            query.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = query.log();
    anyhow::ensure!(
        status.code() == Some(1) && !log.contains("panicked"),
        "query should stop with an error, not a panic; it exited with {status}:\n{log}"
    );
    anyhow::ensure!(log.contains("was reset"), "the log says why:\n{log}");
    eprintln!("query stopped with {status}:");
    for line in log.lines().skip_while(|l| !l.contains("ERROR")).take(8) {
        eprintln!("  {line}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_list_whose_first_node_is_down_connects_to_the_next() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    // Nothing listens on `down`: bound once to find it free, then released.
    let down = format!("nats://127.0.0.1:{}", free_port()?);
    let servers = format!("{down},{}", h.nats.url());
    let ingest = h
        .spawn_with_nats_url("payledger-ingest", &servers, &INGEST_ARGS, &[])
        .await?;
    let mut client = ingest_client(&ingest.url()).await?;
    // Accepted means stored by JetStream, so the list reached the live node.
    publish_round(&mut client, 0).await?;
    let stored = read_log(&h.nats.url()).await?;
    anyhow::ensure!(
        stored.len() == round_events(0).len(),
        "{} messages in the stream of the live node, expected {}",
        stored.len(),
        round_events(0).len()
    );
    Ok(())
}
