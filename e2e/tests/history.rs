//! History longer than the log: the head of the stream is purged (what `max_age`
//! does to old records), the projector's checkpoints and the row buckets are
//! gone, and a new projector still serves the rows of all history — starting from
//! a committed replay state, or from the archive alone — because the archive
//! fills in what the log lost. Where neither holds the records, it refuses.

use std::time::{Duration, Instant};

use payledger_cli::generate::GenConfig;
use payledger_e2e::convergence::{history_config, publish_history};
use payledger_e2e::{
    AcceptedLog, Archive, Service, Stack, assert_converges, ingest_client, metric_value, now_us,
    query_client, scrape_metrics, wait_until_archived,
};
use payledger_projector::replay::{ReplayRequest, ReplayStores, replay_and_commit};
use payledger_proto::v1;
use payledger_semantics::{Day, RecordedStream, Settings, StreamSettings};
use payledger_server_common::local_nats::free_port;
use payledger_server_common::topology::{CURRENT_BUCKET, DAILY_BUCKET, PROGRESS_BUCKET, STREAM};
use payledger_storage::open_store;

const WITHIN: Duration = Duration::from_secs(90);

/// The stack, and what ingest accepted.
struct History {
    stack: Stack,
    log: AcceptedLog,
}

payledger_e2e::deref_to_stack!(History);

fn stores(store: &str) -> anyhow::Result<ReplayStores> {
    Ok(ReplayStores::at(
        open_store(store)?,
        RecordedStream::new(StreamSettings::default()),
    ))
}

async fn stack() -> anyhow::Result<History> {
    Ok(History {
        stack: Stack::builder()
            .archive(Archive::Fs)
            .query(&[])
            .start()
            .await?,
        log: AcceptedLog::default(),
    })
}

impl History {
    /// Publishes generated batches and waits until the archive holds all of them.
    async fn publish(&mut self, seed: u64, batches: usize) -> anyhow::Result<u64> {
        let mut client = ingest_client(&self.ingest.url()).await?;
        let history = GenConfig {
            seed,
            merchants: 60,
            late_pct: 8.0,
            spread_secs: 30 * 3600,
            ..history_config()
        };
        let more =
            publish_history(&mut client, history, batches, Duration::from_millis(100)).await?;
        self.log.records.extend(more.records);
        self.archived().await
    }

    async fn archived(&self) -> anyhow::Result<u64> {
        let last = stream_messages_last(&self.h.nats.url()).await?;
        wait_until_archived(&stores(&self.store)?.archive, last).await?;
        Ok(last)
    }

    async fn projector(&mut self, own: &str, metrics: &str) -> anyhow::Result<Service> {
        let own_store = format!("{}-{own}", self.store);
        self.stack
            .h
            .spawn(
                "payledger-projector",
                &[
                    "--mode",
                    "stream",
                    "--store",
                    &own_store,
                    "--archive-store",
                    &self.stack.store,
                    "--checkpoint-interval",
                    "500ms",
                    "--metrics-listen",
                    metrics,
                ],
            )
            .await
    }

    /// Purges the stream's records below `keep_from` (the head `max_age` drops)
    /// and every row, progress record and lease: a new deployment's buckets.
    /// Purges the stream's records below `keep_from`, what `max_age` drops.
    async fn purge_head(&self, keep_from: u64) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(async_nats::connect(self.h.nats.url()).await?);
        js.get_stream(STREAM)
            .await?
            .purge()
            .sequence(keep_from)
            .await?;
        Ok(())
    }

    async fn forget(&self, keep_from: u64) -> anyhow::Result<()> {
        self.purge_head(keep_from).await?;
        let js = async_nats::jetstream::new(async_nats::connect(self.h.nats.url()).await?);
        for bucket in [DAILY_BUCKET, CURRENT_BUCKET, PROGRESS_BUCKET] {
            js.get_stream(format!("KV_{bucket}")).await?.purge().await?;
        }
        let mut stream = js.get_stream(STREAM).await?;
        anyhow::ensure!(stream.info().await?.state.first_sequence == keep_from);
        Ok(())
    }
}

/// The sequence of the newest record in the stream.
async fn stream_messages_last(nats_url: &str) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    Ok(js
        .get_stream(STREAM)
        .await?
        .info()
        .await?
        .state
        .last_sequence)
}

/// Waits for a metric of the projector to reach `want`.
async fn metric_reaches(
    address: &str,
    name: &str,
    want: impl Fn(f64) -> bool,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let text = scrape_metrics(address).await?;
        let sum: f64 = text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if want(sum) {
            return Ok(sum);
        }
        anyhow::ensure!(Instant::now() < deadline, "{name} is {sum}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new projector after the head of the log, the checkpoints and the rows are
/// gone, starting from `from_state` (a committed replay state) or the archive
/// alone, serves exactly the rows of a fold of all history; a second purge once
/// it runs changes nothing.
async fn bootstraps_to_the_whole_history(from_state: bool) -> anyhow::Result<()> {
    let mut s = stack().await?;
    let first_metrics = format!("127.0.0.1:{}", free_port()?);
    let mut first = s.projector("first", &first_metrics).await?;
    let early = s.publish(41, 6).await?;
    if from_state {
        let today = Day::of_micros(now_us());
        let commit = replay_and_commit(
            &stores(&s.store)?,
            Settings::default(),
            &ReplayRequest {
                replay_id: "nightly".into(),
                from_day: Day(today.0 - 2),
                to_day: today,
                cutoff: Some(early),
                from_genesis: false,
            },
            |_| {},
        )
        .await?;
        assert_eq!(commit.draft.states.len(), 16);
    }
    let late = s.publish(43, 6).await?;
    let mut query = query_client(&s.query().url()).await?;
    assert_converges(&mut query, &s.log.fold(Settings::default())?, WITHIN).await?;

    // A new deployment: the old projector and its checkpoints gone, the rows and
    // the oldest records of the log too (all but the last quarter of it).
    first.kill_hard();
    let keep_from = late - (late - early) / 4;
    s.forget(keep_from).await?;

    // One killed in the middle of its bootstrap leaves nothing the next one minds.
    let mut killed = s
        .projector("killed", &format!("127.0.0.1:{}", free_port()?))
        .await?;
    killed.kill_hard();
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let second = s.projector("second", &metrics).await?;
    // A further purge as it starts (still within what the archive holds).
    s.purge_head(keep_from + 50).await?;
    s.publish(47, 2).await?;
    assert_converges(&mut query, &s.log.fold(Settings::default())?, WITHIN).await?;

    let log = second.log();
    let from = if from_state {
        "from=replay state state/"
    } else {
        "from=the beginning of history"
    };
    assert_eq!(log.matches("restored partition").count(), 16, "{log}");
    assert!(log.contains(from), "{log}");
    assert!(log.contains("filled in from the archive"), "{log}");
    assert!(log.contains("wrote every row the state holds"), "{log}");
    let segments = metric_reaches(
        &metrics,
        "payledger_projector_bootstrap_segments_read",
        |v| v > 0.0,
    )
    .await?;
    let refused = metric_value(
        &scrape_metrics(&metrics).await?,
        "payledger_projector_partition_refused",
    );
    assert_eq!(refused, Some(0.0));
    eprintln!(
        "bootstrap from {}: {segments} archive segments read",
        if from_state {
            "a replay state"
        } else {
            "the archive alone"
        }
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_projector_starts_from_a_replay_state_and_the_archive_fills_in_the_log()
-> anyhow::Result<()> {
    bootstraps_to_the_whole_history(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_projector_without_any_state_folds_the_archive_then_the_log() -> anyhow::Result<()> {
    bootstraps_to_the_whole_history(false).await
}

/// Records in neither the log nor the archive (the archiver stopped, the log
/// purged past its last watermark): every partition is refused with a log line
/// and a metric, and query serves none of its rows as current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_in_neither_the_log_nor_the_archive_refuse_the_partitions() -> anyhow::Result<()> {
    let mut s = stack().await?;
    let archived = s.publish(53, 3).await?;
    // The archiver stops; ingest goes on without it.
    s.ingest.terminate().await?;
    s.ingest =
        s.h.spawn("payledger-ingest", &["--heartbeat-interval", "0s"])
            .await?;
    let mut client = ingest_client(&s.ingest.url()).await?;
    let more = publish_history(
        &mut client,
        GenConfig {
            seed: 59,
            merchants: 60,
            ..history_config()
        },
        2,
        Duration::ZERO,
    )
    .await?;
    s.log.records.extend(more.records);
    let last = stream_messages_last(&s.h.nats.url()).await?;
    assert!(last > archived + 100);
    s.forget(archived + 50).await?;

    let metrics = format!("127.0.0.1:{}", free_port()?);
    let mut projector = s.projector("refusing", &metrics).await?;
    metric_reaches(&metrics, "payledger_projector_partition_refused", |v| {
        v == 16.0
    })
    .await?;
    let log = projector.log();
    assert!(log.contains("partition refused"), "{log}");
    assert!(
        log.contains(&format!(
            "it needs records {} to {}",
            archived + 1,
            archived + 49
        )),
        "{log}"
    );
    assert!(log.contains("Restore the archive"), "{log}");

    // No partial rows: none written, and the stream side of query refuses.
    let mut query = query_client(&s.query().url()).await?;
    let merchant = s.log.facts().next().expect("a fact").merchant_id.clone();
    let deadline = Instant::now() + WITHIN;
    let refused = loop {
        match query
            .get_current_exposure(v1::GetCurrentExposureRequest {
                merchant_id: merchant.clone(),
            })
            .await
        {
            Err(status) if status.code() == tonic::Code::FailedPrecondition => break status,
            other => {
                anyhow::ensure!(Instant::now() < deadline, "never refused: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(refused.message().contains("not current"), "{refused:?}");
    assert!(
        payledger_e2e::served_daily_rows(&mut query)
            .await?
            .is_empty()
    );

    // The archiver back: it records the records it can no longer read as a gap and
    // cuts past them. The archive now reaches the log, but not across the gap: a
    // new projector refuses as well, and so does a replay through it.
    s.ingest.terminate().await?;
    s.ingest = s.spawn_ingest(&[]).await?;
    let stores = stores(&s.store)?;
    wait_until_archived(&stores.archive, last).await?;
    let gaps = stores.archive.gaps().await?;
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!((gaps[0].first, gaps[0].last), (archived + 1, archived + 49));
    // The refusing projector holds the leases; a clean stop releases them.
    projector.terminate().await?;
    let again = format!("127.0.0.1:{}", free_port()?);
    let later = s.projector("after-the-gap", &again).await?;
    metric_reaches(&again, "payledger_projector_partition_refused", |v| {
        v == 16.0
    })
    .await?;
    assert!(later.log().contains("archive/_gaps/"), "{}", later.log());
    let replay = payledger_projector::replay::fold_partitions(
        &stores.archive,
        Settings::default(),
        &[0],
        last,
    )
    .await;
    assert!(
        matches!(
            replay,
            Err(payledger_projector::replay::ReplayError::Lost(_))
        ),
        "{replay:?}"
    );
    Ok(())
}
