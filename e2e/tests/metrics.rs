//! Prometheus metrics of every service, scraped over HTTP after real work: the
//! names the chart's alerts use exist and their values add up.

use std::time::{Duration, Instant};

use payledger_e2e::{
    AcceptedLog, Archive, Stack, daily_answer_from, ingest_client, now_us, query_client,
    stream_messages,
};
use payledger_proto::v1::{self, replay_coordinator_client::ReplayCoordinatorClient};
use payledger_semantics::Settings;
use payledger_server_common::local_nats::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

struct Scraped {
    address: String,
}

impl Scraped {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            address: format!("127.0.0.1:{}", free_port()?),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exports_its_metrics() -> anyhow::Result<()> {
    let (ingest_m, projector_m, query_m, coordinator_m) = (
        Scraped::new()?,
        Scraped::new()?,
        Scraped::new()?,
        Scraped::new()?,
    );
    let mut stack = Stack::builder()
        .archive(Archive::Fs)
        .ingest(&["--metrics-listen", &ingest_m.address])
        .projector(&[
            "--metrics-listen",
            &projector_m.address,
            "--checkpoint-interval",
            "200ms",
        ])
        .projector_reads_the_archive()
        .query(&[
            "--metrics-listen",
            &query_m.address,
            "--commit-poll-interval",
            "100ms",
        ])
        .start()
        .await?;
    let (store, worker) = (stack.store.clone(), stack.projector().url());
    let coordinator = stack
        .spawn(
            "payledger-replay-coordinator",
            &[
                "--metrics-listen",
                &coordinator_m.address,
                "--store",
                &store,
                "--workers",
                &worker,
            ],
        )
        .await?;
    let (h, ingest, query) = (&stack.h, &stack.ingest, stack.query());
    let mut client = ingest_client(&ingest.url()).await?;
    let event = |id: usize, amount: i64| v1::Event {
        event_id: format!("ev-{id}"),
        merchant_id: format!("m-{}", id % 7),
        kind: v1::EventKind::PaymentCaptured as i32,
        amount_minor: amount,
        currency: "EUR".into(),
        event_time_us: now_us() - 1_000_000,
        corrects_event_id: String::new(),
    };
    let events: Vec<v1::Event> = (0..50).map(|i| event(i, 100)).collect();
    let mut log = AcceptedLog::default();
    log.publish(&mut client, events.clone()).await?;
    // An exact resend (duplicates) and a zero amount (rejected).
    let again = events[..5].iter().cloned().chain([event(99, 0)]).collect();
    log.publish(&mut client, again).await?;

    let ingest_text = payledger_e2e::scrape_metrics(&ingest_m.address).await?;
    assert_eq!(
        payledger_e2e::metric_value(
            &ingest_text,
            "payledger_ingest_events_total{outcome=\"accepted\"}"
        ),
        Some(50.0),
        "{ingest_text}"
    );
    assert_eq!(
        payledger_e2e::metric_value(
            &ingest_text,
            "payledger_ingest_events_total{outcome=\"duplicate\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        payledger_e2e::metric_value(
            &ingest_text,
            "payledger_ingest_events_total{outcome=\"rejected\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        payledger_e2e::metric_value(&ingest_text, "payledger_ingest_publish_seconds_count"),
        Some(2.0)
    );

    // The projector catches up: no lag, a checkpoint, freshness observed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let projector_text = loop {
        let text = payledger_e2e::scrape_metrics(&projector_m.address).await?;
        let applied: f64 = text
            .lines()
            .filter(|l| l.starts_with("payledger_projector_applied_sequence{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, f64::max);
        if applied >= 50.0 && text.contains("payledger_projector_checkpoint_timestamp_seconds{") {
            break text;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "projector metrics never caught up:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for line in projector_text
        .lines()
        .filter(|l| l.starts_with("payledger_projector_lag_records{"))
    {
        assert!(line.ends_with(" 0"), "caught up means no lag: {line}");
    }
    // The only projector holds every partition's lease.
    let owned: Vec<&str> = projector_text
        .lines()
        .filter(|l| l.starts_with("payledger_projector_partition_owned{"))
        .collect();
    assert_eq!(
        owned.len(),
        Settings::default().partitions as usize,
        "{projector_text}"
    );
    assert!(owned.iter().all(|l| l.ends_with(" 1")), "{owned:?}");
    let checkpoint = payledger_e2e::metric_value(
        &projector_text,
        "payledger_projector_checkpoint_timestamp_seconds{",
    )
    .expect("a checkpoint");
    assert!(
        (checkpoint - now_us() as f64 / 1e6).abs() < 60.0,
        "checkpoint time is now: {checkpoint}"
    );
    let fresh_count = payledger_e2e::metric_value(
        &projector_text,
        "payledger_projector_freshness_seconds_count",
    )
    .expect("freshness");
    let fresh_sum =
        payledger_e2e::metric_value(&projector_text, "payledger_projector_freshness_seconds_sum")
            .expect("freshness");
    assert!(
        fresh_count >= 1.0 && fresh_sum / fresh_count < 10.0,
        "{fresh_sum} / {fresh_count}"
    );

    // A replay: the worker counts its shards, the coordinator its replay and the
    // reconciliation, the query service its answers by source and its part reads.
    let mut replays =
        ReplayCoordinatorClient::new(Channel::from_shared(coordinator.url())?.connect().await?);
    let today = payledger_semantics::Day::of_micros(now_us()).to_string();
    // Once the archive holds the whole log, one replay of it.
    let messages = stream_messages(&h.nats.url()).await?;
    let archive = payledger_storage::ArchiveStore::new(
        payledger_storage::open_store(&store)?,
        payledger_semantics::RecordedStream::new(payledger_semantics::StreamSettings::default()),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while payledger_projector::replay::latest_cutoff(&archive).await? < messages {
        anyhow::ensure!(Instant::now() < deadline, "the archive did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = v1::StartReplayRequest {
        from_day: today.clone(),
        to_day: today.clone(),
        reason: "metrics".into(),
        cutoff: 0,
        from_genesis: false,
    };
    let started = replays.start_replay(request).await?.into_inner();
    assert_eq!(started.cutoff, messages);
    let deadline = Instant::now() + Duration::from_secs(60);
    while replays
        .get_replay(v1::GetReplayRequest {
            replay_id: started.replay_id.clone(),
        })
        .await?
        .into_inner()
        .state
        != i32::from(v1::ReplayState::Succeeded)
    {
        anyhow::ensure!(Instant::now() < deadline, "the replay did not succeed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = replays
        .get_replay(v1::GetReplayRequest {
            replay_id: started.replay_id.clone(),
        })
        .await?
        .into_inner();
    // Seven merchant-days, equal on both sides (the coordinator started before any
    // row existed, so this also checks that it reads the stream rows afresh).
    assert_eq!(done.reconciliation.map(|r| r.rows_equal), Some(7));
    let coordinator_text = payledger_e2e::scrape_metrics(&coordinator_m.address).await?;
    assert!(
        payledger_e2e::metric_value(
            &coordinator_text,
            "payledger_replays{state=\"REPLAY_STATE_SUCCEEDED\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{coordinator_text}"
    );
    assert_eq!(
        payledger_e2e::metric_value(
            &coordinator_text,
            "payledger_reconciliation_differences{kind=\"divergent\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        payledger_e2e::metric_value(
            &coordinator_text,
            "payledger_reconciliation_differences{kind=\"missing\"}"
        ),
        Some(0.0)
    );
    assert!(
        payledger_e2e::metric_value(
            &coordinator_text,
            "payledger_replay_last_commit_timestamp_seconds"
        )
        .unwrap_or(0.0)
            > 1.7e9
    );
    let projector_text = payledger_e2e::scrape_metrics(&projector_m.address).await?;
    assert!(
        payledger_e2e::metric_value(
            &projector_text,
            "payledger_replay_shards_total{outcome=\"done\"}"
        )
        .unwrap_or(0.0)
            >= 16.0,
        "{projector_text}"
    );

    let mut reads = query_client(&query.url()).await?;
    let ask = v1::GetDailyExposureRequest {
        merchant_id: "m-1".into(),
        day: today.clone(),
        ..Default::default()
    };
    daily_answer_from(&mut reads, ask, v1::Source::Replay, Duration::from_secs(10)).await?;
    reads
        .get_daily_exposure(v1::GetDailyExposureRequest {
            merchant_id: "m-1".into(),
            day: today.clone(),
            ..Default::default()
        })
        .await?;
    let query_text = payledger_e2e::scrape_metrics(&query_m.address).await?;
    assert!(
        payledger_e2e::metric_value(
            &query_text,
            "payledger_query_seconds_count{method=\"GetDailyExposure\",source=\"replay\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{query_text}"
    );
    let memory = payledger_e2e::metric_value(
        &query_text,
        "payledger_query_part_cache_reads_total{tier=\"memory\"}",
    )
    .unwrap_or(0.0);
    let object_store = payledger_e2e::metric_value(
        &query_text,
        "payledger_query_part_cache_reads_total{tier=\"object_store\"}",
    )
    .unwrap_or(0.0);
    assert!(
        object_store >= 1.0 && memory >= 1.0,
        "the first read misses, the next hits: {query_text}"
    );

    // Anything but /metrics is not found.
    let mut stream = tokio::net::TcpStream::connect(&query_m.address).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    Ok(())
}
