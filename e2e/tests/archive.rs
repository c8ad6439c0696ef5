//! The archiver end to end: the real ingest binary archives the log to Parquet on
//! the local object store; killed with SIGKILL mid-ingest and restarted, it leaves
//! every record of the stream in the archive exactly once, tiled without gap or
//! overlap.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use payledger_cli::generate::{GenConfig, Generator};
use payledger_e2e::{AcceptedLog, Archive, Stack, ingest_client, now_us, stream_messages};
use payledger_proto::v1;
use payledger_storage::{ArchiveStore, open_store, verify_tiling};

const PARTITIONS: u32 = 16;

/// Every sequence in the archive up to its highest watermark, checking tiling.
async fn archived_sequences(archive: &ArchiveStore) -> anyhow::Result<(u64, Vec<u64>)> {
    let watermarks = archive.watermarks().await?;
    let top = watermarks.last().copied().unwrap_or(0);
    let mut seqs = Vec::new();
    for p in 0..PARTITIONS {
        let segments = archive.event_segments(p).await?;
        verify_tiling(&segments, &watermarks, top)
            .map_err(|e| anyhow::anyhow!("partition {p}: {e}"))?;
        for cut in segments.into_iter().filter(|s| s.last <= top) {
            let records = archive.read_events(p, cut).await?;
            anyhow::ensure!(
                records
                    .iter()
                    .all(|r| r.seq >= cut.first && r.seq <= cut.last),
                "p{p} {cut:?} holds a record outside its range"
            );
            seqs.extend(records.iter().map(|r| r.seq));
        }
    }
    let dims = archive.dim_segments().await?;
    verify_tiling(&dims, &watermarks, top).map_err(|e| anyhow::anyhow!("dims: {e}"))?;
    for cut in dims.into_iter().filter(|s| s.last <= top) {
        seqs.extend(archive.read_dims(cut).await?.iter().map(|d| d.seq));
    }
    seqs.sort_unstable();
    Ok((top, seqs))
}

/// Publishes, retrying while ingest restarts (a retry is safe: Nats-Msg-Id).
async fn publish_retrying(
    url: &str,
    log: &mut AcceptedLog,
    events: Vec<v1::Event>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ingest_client(url).await {
            Ok(mut client) => match log.publish(&mut client, events.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => eprintln!("retrying a publish: {e}"),
                Err(e) => return Err(e),
            },
            Err(e) if Instant::now() < deadline => eprintln!("retrying a connect: {e}"),
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiver_killed_mid_ingest_archives_every_record_exactly_once() -> anyhow::Result<()> {
    let mut stack = Stack::builder()
        .archive(Archive::Fs)
        .archive_flush_interval("150ms")
        .ingest(&["--archive-cut-records", "2500"])
        .start()
        .await?;
    let mut url = stack.ingest.url();
    let mut traffic = Generator::new(GenConfig {
        seed: 5,
        merchants: 100,
        ..GenConfig::default()
    });
    let mut client = ingest_client(&url).await?;
    for fx in traffic.fx_records("2026-01-01") {
        client
            .publish_dimension(v1::PublishDimensionRequest {
                record: Some(v1::publish_dimension_request::Record::Fx(fx)),
            })
            .await?;
    }
    let mut log = AcceptedLog::default();
    let batches = 60;
    for batch in 0..batches {
        if batch == 20 || batch == 40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stack.ingest.kill_hard();
            stack.ingest = stack.spawn_ingest(&[]).await?;
            url = stack.ingest.url();
        }
        let events = traffic.batch(500, now_us());
        publish_retrying(&url, &mut log, events).await?;
    }
    let total = stream_messages(&stack.h.nats.url()).await?;
    let archive = stack.archive()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (top, seqs) = loop {
        let (top, seqs) = archived_sequences(&archive).await?;
        if top >= total || Instant::now() > deadline {
            break (top, seqs);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        top, total,
        "the archive's watermark reached the end of the stream"
    );
    // The stream holds sequences 1..=total: each archived exactly once.
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "a record was archived twice");
    assert_eq!(
        unique,
        (1..=total).collect::<BTreeSet<u64>>(),
        "a record is missing from the archive"
    );
    for seq in log.records.keys() {
        assert!(unique.contains(seq), "accepted event {seq} not archived");
    }
    let restarts = stack
        .ingest
        .log()
        .matches("archiver resuming after the highest watermark")
        .count();
    assert_eq!(restarts, 1, "this process started its archiver once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_short_is_completed_with_the_same_range() -> anyhow::Result<()> {
    // First, a log without an archiver.
    let Stack {
        ingest: plain,
        mut h,
        store,
        ..
    } = Stack::builder().start().await?;
    let mut traffic = Generator::new(GenConfig {
        seed: 8,
        merchants: 40,
        duplicate_pct: 0.0,
        ..GenConfig::default()
    });
    let mut client = ingest_client(&plain.url()).await?;
    let mut log = AcceptedLog::default();
    log.publish(&mut client, traffic.batch(400, now_us()))
        .await?;
    drop(plain);
    // A crash left one partition's segment of the cut (0, 400] and no watermark.
    let archive = ArchiveStore::new(
        open_store(&store)?,
        payledger_semantics::RecordedStream::new(payledger_semantics::StreamSettings::default()),
    );
    let p = payledger_semantics::partition_of(
        &log.facts().next().expect("events").merchant_id,
        PARTITIONS,
    );
    let first_cut = payledger_storage::CutRange {
        first: 1,
        last: 400,
    };
    let records: Vec<_> = log
        .records
        .values()
        .filter(|r| match &r.body {
            payledger_semantics::RecordBody::Fact(f) => {
                payledger_semantics::partition_of(&f.merchant_id, PARTITIONS) == p
            }
            payledger_semantics::RecordBody::Heartbeat => false,
        })
        .cloned()
        .collect();
    archive.put_events(p, first_cut, &records).await?;

    let ingest = h
        .spawn(
            "payledger-ingest",
            &[
                "--heartbeat-interval",
                "0s",
                "--archive-store",
                store.as_str(),
                "--archive-flush-interval",
                "100ms",
            ],
        )
        .await?;
    let mut client = ingest_client(&ingest.url()).await?;
    log.publish(&mut client, traffic.batch(300, now_us()))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while archive.watermarks().await?.last().copied().unwrap_or(0) < 700 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "archive did not reach 700:\n{}",
            ingest.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watermarks = archive.watermarks().await?;
    assert_eq!(
        watermarks[0], 400,
        "the interrupted cut was completed with its own range: {watermarks:?}"
    );
    assert!(ingest.log().contains("completing a cut that was cut short"));
    let (top, seqs) = archived_sequences(&archive).await?;
    assert_eq!(seqs, (1..=top).collect::<Vec<u64>>());
    Ok(())
}
