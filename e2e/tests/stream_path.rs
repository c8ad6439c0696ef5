//! The stream path end to end: generated traffic through real ingest, projector
//! and query processes against a real nats-server; the served rows must equal the
//! oracle's fold of the accepted events, field for field — also when the
//! projector is killed with SIGKILL in the middle of ingest.

use std::time::Duration;

use payledger_cli::generate::{GenConfig, Generator};
use payledger_e2e::{
    AcceptedLog, Harness, assert_converges, ingest_client, now_us, query_client, stream_messages,
};
use payledger_semantics::Settings;

const EVENTS: usize = 50_000;
const BATCH: usize = 500;

fn generator() -> Generator {
    Generator::new(GenConfig {
        seed: 42,
        merchants: 200,
        events: EVENTS,
        duplicate_pct: 2.0,
        conflict_pct: 0.5,
        late_pct: 5.0,
        correction_pct: 2.0,
        ..GenConfig::default()
    })
}

/// Ingest without heartbeats, so that the log holds exactly the accepted events.
const INGEST_ARGS: [&str; 2] = ["--heartbeat-interval", "0s"];

fn projector_args(store: &str) -> Vec<String> {
    [
        "--store",
        store,
        "--checkpoint-interval",
        "200ms",
        "--checkpoint-every",
        "2000",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_events_served_rows_equal_the_oracle() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let ingest = h.spawn("payledger-ingest", &INGEST_ARGS).await?;
    let store = h.store();
    let args = projector_args(&store);
    let _projector = h
        .spawn(
            "payledger-projector",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await?;
    let query = h.spawn("payledger-query", &[]).await?;

    let mut traffic = generator();
    let mut client = ingest_client(&ingest.url()).await?;
    for fx in traffic.fx_records("2026-01-01") {
        client
            .publish_dimension(payledger_proto::v1::PublishDimensionRequest {
                record: Some(payledger_proto::v1::publish_dimension_request::Record::Fx(
                    fx,
                )),
            })
            .await?;
    }
    let mut log = AcceptedLog::default();
    let started = std::time::Instant::now();
    for _ in 0..EVENTS / BATCH {
        log.publish(&mut client, traffic.batch(BATCH, now_us()))
            .await?;
    }
    eprintln!("ingested {EVENTS} events in {:?}", started.elapsed());
    assert_eq!(log.rejected, 0);
    assert!(log.duplicates > 0, "the workload resends events");
    let facts = log.records.len() as u64;
    let oracle = log.fold(Settings::default())?;
    let conflicts: u64 = oracle.daily_rows().iter().map(|r| r.conflicts).sum();
    let late: u64 = oracle.daily_rows().iter().map(|r| r.late).sum();
    assert!(
        conflicts > 0 && late > 0,
        "the workload has conflicts ({conflicts}) and late events ({late})"
    );

    // The log holds the accepted events plus the FX records, nothing else.
    assert_eq!(stream_messages(&h.nats.url()).await?, facts + 9);
    let mut query_client = query_client(&query.url()).await?;
    assert_converges(&mut query_client, &oracle, Duration::from_secs(120)).await?;
    eprintln!(
        "converged {:?} after the start of ingest",
        started.elapsed()
    );
    Ok(())
}

/// Extracts `key=value` from a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_killed_three_times_mid_ingest_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let ingest = h.spawn("payledger-ingest", &INGEST_ARGS).await?;
    let store = h.store();
    let args = projector_args(&store);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut projector = h.spawn("payledger-projector", &args).await?;
    let query = h.spawn("payledger-query", &[]).await?;

    let mut traffic = generator();
    let mut client = ingest_client(&ingest.url()).await?;
    let mut log = AcceptedLog::default();
    let batches = EVENTS / BATCH;
    let kill_at = [batches / 5, batches / 2, batches * 4 / 5];
    let mut restarts = 0;
    for batch in 0..batches {
        if kill_at.contains(&batch) {
            // Let the projector make some progress and checkpoint before the kill.
            tokio::time::sleep(Duration::from_millis(600)).await;
            projector.kill_hard();
            projector = h.spawn("payledger-projector", &args).await?;
            restarts += 1;
            // Wait for the restarted projector to report where it resumed.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !projector.log().contains("resumed partition") {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "no resume line:\n{}",
                    projector.log()
                );
                log.publish(&mut client, traffic.batch(1, now_us())).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let resumed: Vec<(u64, u64)> = projector
                .log()
                .lines()
                .filter(|l| l.contains("resumed partition"))
                .filter_map(|l| Some((field(l, "restored_seq")?, field(l, "first_applied_seq")?)))
                .collect();
            assert!(!resumed.is_empty());
            assert!(
                resumed.iter().any(|(restored, _)| *restored > 0),
                "restart {restarts} resumed no partition from a checkpoint: {resumed:?}"
            );
            for (restored, first) in &resumed {
                assert!(
                    first > restored && *first > 1,
                    "restart {restarts}: first applied {first} after checkpoint {restored}"
                );
            }
        }
        log.publish(&mut client, traffic.batch(BATCH, now_us()))
            .await?;
    }
    assert_eq!(restarts, 3);
    let oracle = log.fold(Settings::default())?;
    let mut query_client = query_client(&query.url()).await?;
    assert_converges(&mut query_client, &oracle, Duration::from_secs(120)).await?;

    // A clean stop writes a final checkpoint; a restart then re-applies nothing.
    projector.terminate()?;
    let projector = h.spawn("payledger-projector", &args).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !projector.log().contains("resumed partition"),
        "nothing left to apply:\n{}",
        projector.log()
    );
    assert_converges(&mut query_client, &oracle, Duration::from_secs(10)).await
}
