//! The stream path end to end: generated traffic through real ingest, projector
//! and query processes against a real nats-server; the served rows must equal the
//! oracle's fold of the accepted events, field for field — also when the
//! projector is killed with SIGKILL in the middle of ingest.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use payledger_cli::generate::{GenConfig, Generator};
use payledger_e2e::{
    AcceptedLog, Stack, assert_converges, ingest_client, now_us, query_client, stream_messages,
};
use payledger_proto::v1;
use payledger_semantics::{Settings, partition_of};

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

/// Checkpoints often, so that a restarted projector resumes from one.
const PROJECTOR_ARGS: [&str; 4] = [
    "--checkpoint-interval",
    "200ms",
    "--checkpoint-every",
    "2000",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_events_served_rows_equal_the_oracle() -> anyhow::Result<()> {
    let stack = Stack::builder()
        .projector(&PROJECTOR_ARGS)
        .query(&[])
        .start()
        .await?;
    let (h, ingest, query) = (&stack.h, &stack.ingest, stack.query());

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
    // The container restarts inside its pod: the same pod name, so the new process
    // takes the partition leases of its killed predecessor back at once.
    let mut args = PROJECTOR_ARGS.to_vec();
    args.extend(["--pod-name", "payledger-projector-0", "--replicas", "1"]);
    let mut stack = Stack::builder().projector(&args).query(&[]).start().await?;
    let mut projector = stack.projector.take().expect("a projector");
    let query = stack.query.take().expect("query");

    let mut traffic = generator();
    let mut client = stack.ingest_client().await?;
    let mut log = AcceptedLog::default();
    let batches = EVENTS / BATCH;
    let kill_at = [batches / 5, batches / 2, batches * 4 / 5];
    let mut restarts = 0;
    for batch in 0..batches {
        if kill_at.contains(&batch) {
            // Let the projector make some progress and checkpoint before the kill.
            tokio::time::sleep(Duration::from_millis(600)).await;
            projector.kill_hard();
            projector = stack.spawn_projector(&[]).await?;
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
    // One new event per partition: each partition's first applied record after
    // the restart must be that event (a partition applies its records in log
    // order, so any record re-applied would come first).
    projector.terminate().await?;
    let projector = stack.spawn_projector(&[]).await?;
    let partitions = Settings::default().partitions;
    let fresh = one_event_per_partition(partitions);
    let before = log.records.len();
    log.publish(&mut client, fresh).await?;
    assert_eq!(log.records.len(), before + partitions as usize);
    let new_seqs: BTreeSet<u64> = log
        .records
        .keys()
        .rev()
        .take(partitions as usize)
        .copied()
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let first_applied = loop {
        let first_applied: BTreeSet<u64> = projector
            .log()
            .lines()
            .filter(|l| l.contains("resumed partition"))
            .filter_map(|l| field(l, "first_applied_seq"))
            .collect();
        if first_applied.len() >= partitions as usize {
            break first_applied;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "not every partition applied its new event within 30 s:\n{}",
            projector.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        first_applied,
        new_seqs,
        "after a clean restart each partition's first applied record is the new one:\n{}",
        projector.log()
    );
    let oracle = log.fold(Settings::default())?;
    assert_converges(&mut query_client, &oracle, Duration::from_secs(10)).await
}

/// One captured event for each of `partitions` partitions.
fn one_event_per_partition(partitions: u32) -> Vec<v1::Event> {
    let mut by_partition = BTreeMap::new();
    for i in 0.. {
        let merchant_id = format!("m-after-restart-{i}");
        by_partition
            .entry(partition_of(&merchant_id, partitions))
            .or_insert(merchant_id);
        if by_partition.len() == partitions as usize {
            break;
        }
    }
    by_partition
        .into_values()
        .map(|merchant_id| v1::Event {
            event_id: format!("ev-{merchant_id}"),
            merchant_id,
            kind: v1::EventKind::PaymentCaptured as i32,
            amount_minor: 100,
            currency: "EUR".into(),
            event_time_us: now_us() - 1_000_000,
            corrects_event_id: String::new(),
        })
        .collect()
}

/// Watches every update of the two row buckets and records any that carries a
/// lower `log_position` than the key already had: a row moving backwards.
async fn watch_for_rows_moving_backwards(
    nats_url: String,
    backwards: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use prost::Message;
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    let mut watches = Vec::new();
    for bucket in ["exposure_daily", "exposure_current"] {
        let kv = loop {
            match js.get_key_value(bucket).await {
                Ok(kv) => break kv,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        watches.push(kv.watch_all().await?.map(move |e| (bucket, e)));
    }
    let mut updates = futures::stream::select_all(watches);
    let mut positions = std::collections::HashMap::new();
    while let Some((bucket, entry)) = updates.next().await {
        let entry = entry?;
        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let position = if bucket == "exposure_daily" {
            payledger_proto::v1::DailyRow::decode(entry.value.as_ref())?.log_position
        } else {
            payledger_proto::v1::CurrentRow::decode(entry.value.as_ref())?.log_position
        };
        let previous = positions.insert((bucket, entry.key.clone()), position);
        if previous.is_some_and(|p| p > position) {
            backwards.lock().expect("lock").push(format!(
                "{bucket} {}: {previous:?} -> {position}",
                entry.key
            ));
        }
    }
    Ok(())
}

/// Who holds each partition's lease (holders start with "projector/<pid>-").
async fn lease_holders(
    nats_url: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    let kv = js.get_key_value("projector_leases").await?;
    let mut keys = kv.keys().await?;
    let mut holders = std::collections::BTreeMap::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if let Some(value) = kv.get(&key).await? {
            let record: serde_json::Value = serde_json::from_slice(&value)?;
            holders.insert(
                key,
                record["holder"].as_str().unwrap_or_default().to_string(),
            );
        }
    }
    Ok(holders)
}

/// Publishes a batch at a time until every partition's lease is held by `pid`.
async fn publish_until_leased_by(
    pid: u32,
    nats_url: &str,
    publish: &mut (impl AsyncFnMut() -> anyhow::Result<()> + ?Sized),
    within: Duration,
) -> anyhow::Result<()> {
    let partitions = Settings::default().partitions as usize;
    let prefix = format!("projector/{pid}-");
    let deadline = std::time::Instant::now() + within;
    loop {
        let holders = lease_holders(nats_url).await?;
        if holders.len() == partitions && holders.values().all(|h| h.starts_with(&prefix)) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "after {within:?} the leases are not all held by {pid}: {holders:?}"
        );
        publish().await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A rolling update with a stalled pod: the old projector holds every
/// partition's lease while the new one waits; the old one freezes (SIGSTOP) with
/// work in flight, the new one takes the leases over only after they expire, and
/// when the old one wakes up (SIGCONT) it finds its leases gone and stops applying
/// — what it still had in flight may reach the row buckets, fenced. Then the new
/// one is SIGKILLed and the old one takes everything back. Rows never move
/// backwards, and they end equal to the oracle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_in_a_stalled_rolling_update_never_move_a_row_backwards()
-> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(2);
    let ttl = format!("{}s", TTL.as_secs());
    let mut args = PROJECTOR_ARGS.to_vec();
    args.extend(["--partition-lease-ttl", &ttl]);
    let mut stack = Stack::builder().projector(&args).query(&[]).start().await?;
    let old = stack.projector.take().expect("a projector");
    let query = stack.query.take().expect("query");
    let nats_url = stack.h.nats.url();
    let backwards = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = tokio::spawn(watch_for_rows_moving_backwards(
        nats_url.clone(),
        backwards.clone(),
        seen.clone(),
    ));

    let mut traffic = generator();
    let mut client = stack.ingest_client().await?;
    let mut log = AcceptedLog::default();
    let mut publish = async || -> anyhow::Result<()> {
        log.publish(&mut client, traffic.batch(BATCH, now_us()))
            .await
    };
    publish_until_leased_by(old.pid(), &nats_url, &mut publish, Duration::from_secs(20)).await?;
    for _ in 0..10 {
        publish().await?;
    }
    let mut new = stack.spawn_projector(&[]).await?;
    for _ in 0..10 {
        publish().await?;
    }
    let holders = lease_holders(&nats_url).await?;
    assert!(
        holders
            .values()
            .all(|h| h.starts_with(&format!("projector/{}-", old.pid()))),
        "the new projector took a lease the old one renews: {holders:?}"
    );

    old.pause()?;
    let paused = std::time::Instant::now();
    publish_until_leased_by(new.pid(), &nats_url, &mut publish, Duration::from_secs(20)).await?;
    let taken_after = paused.elapsed();
    assert!(
        taken_after >= TTL * 3 / 4,
        "leases taken over {taken_after:?} after the holder froze, before they expired"
    );
    old.resume()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !old.log().contains("lost the partition's lease") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the woken projector did not notice that its leases are gone:\n{}",
            old.log()
        );
        publish().await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        publish().await?;
    }
    new.kill_hard();
    publish_until_leased_by(old.pid(), &nats_url, &mut publish, Duration::from_secs(20)).await?;
    for _ in 0..10 {
        publish().await?;
    }

    let oracle = log.fold(Settings::default())?;
    let mut query_client = query_client(&query.url()).await?;
    assert_converges(&mut query_client, &oracle, Duration::from_secs(120)).await?;
    drop(old);
    assert!(
        !watcher.is_finished(),
        "the watch of the row buckets ended early: {:?}",
        watcher.await
    );
    watcher.abort();
    let seen = seen.load(std::sync::atomic::Ordering::Relaxed);
    assert!(seen > 1000, "the watch saw only {seen} row updates");
    let backwards = backwards.lock().expect("lock");
    assert!(
        backwards.is_empty(),
        "{} row updates moved backwards, e.g. {:?}",
        backwards.len(),
        &backwards[..backwards.len().min(5)]
    );
    Ok(())
}
