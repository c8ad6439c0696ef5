//! Retention (docs/operations.md, "Retention"): the archiver gives an existing
//! stream the `--stream-max-age` it starts with, longer or shorter, while an
//! ingest that does not archive leaves it and says who changes it; and the
//! archiver's lag metrics show records that no cut holds yet, also while it
//! cannot cut, and return to 0 once it has caught up; records deleted before it
//! read them are counted as lost.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use payledger_e2e::{
    AcceptedLog, Harness, Service, ingest_client, metric_value, now_us, scrape_metrics,
    stream_messages,
};
use payledger_proto::v1;
use payledger_server_common::local_nats::free_port;
use payledger_server_common::topology::{STREAM, read_stream, stream_max_age};

const DAY: Duration = Duration::from_secs(86_400);

fn events(from: usize, count: usize) -> Vec<v1::Event> {
    (from..from + count)
        .map(|id| v1::Event {
            event_id: format!("ev-{id}"),
            merchant_id: format!("m-{}", id % 5),
            kind: v1::EventKind::PaymentCaptured as i32,
            amount_minor: 100,
            currency: "EUR".into(),
            event_time_us: now_us() - 1_000_000,
            corrects_event_id: String::new(),
        })
        .collect()
}

async fn jetstream(h: &Harness) -> anyhow::Result<async_nats::jetstream::Context> {
    Ok(async_nats::jetstream::new(
        async_nats::connect(h.nats.url()).await?,
    ))
}

/// Waits until the stream keeps records for `want`.
async fn wait_max_age(
    js: &async_nats::jetstream::Context,
    want: Duration,
    service: &Service,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let current = stream_max_age(js).await?;
        if current == want {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the stream's max_age is still {current:?}, not {want:?}:\n{}",
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The line of `service`'s log saying it changed the stream's max_age.
fn change_logged(service: &Service) -> Option<String> {
    service
        .log()
        .lines()
        .find(|l| l.contains("changed the stream's max_age"))
        .map(str::to_string)
}

/// Scrapes `address` until `ready` holds for the text, and returns that text.
async fn wait_metrics(
    address: &str,
    what: &str,
    service: &Service,
    ready: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape_metrics(address).await?;
        if ready(&text) {
            return Ok(text);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} within 30 s; last scrape:\n{text}\nlog:\n{}",
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn args(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    metric_value(text, &format!("{name} "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archiver_gives_an_existing_stream_its_max_age() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let store = h.store();
    let js = jetstream(&h).await?;
    let archiver = |max_age: &str| -> Vec<String> {
        [
            "--archive-store",
            &store,
            "--archive-flush-interval",
            "200ms",
            "--heartbeat-interval",
            "0s",
            "--stream-max-age",
            max_age,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let mut ingest = h.spawn("payledger-ingest", &args(&archiver("3d"))).await?;
    assert_eq!(
        stream_max_age(&js).await?,
        3 * DAY,
        "created with the flag's value"
    );
    let mut log = AcceptedLog::default();
    log.publish(&mut ingest_client(&ingest.url()).await?, events(0, 20))
        .await?;
    assert_eq!(log.records.len(), 20);
    ingest.terminate().await?;
    let before = read_stream(&js).await?;

    // Ingest that does not archive leaves it as it is, and says what changes it.
    let mut plain = h
        .spawn(
            "payledger-ingest",
            &["--heartbeat-interval", "0s", "--stream-max-age", "5d"],
        )
        .await?;
    assert_eq!(stream_max_age(&js).await?, 3 * DAY);
    let plain_log = plain.log();
    assert!(
        plain_log.contains("keeps records for 3d, --stream-max-age is 5d")
            && plain_log.contains(&format!("nats stream edit {STREAM} --max-age=5d")),
        "{plain_log}"
    );
    plain.terminate().await?;

    // The archiver makes it longer...
    let mut ingest = h.spawn("payledger-ingest", &args(&archiver("5d"))).await?;
    wait_max_age(&js, 5 * DAY, &ingest).await?;
    let line = change_logged(&ingest).expect("the change is logged once it is made");
    assert!(line.contains("old=3d") && line.contains("new=5d"), "{line}");
    ingest.terminate().await?;

    // ...and shorter, every record being archived.
    let ingest = h.spawn("payledger-ingest", &args(&archiver("2d"))).await?;
    wait_max_age(&js, 2 * DAY, &ingest).await?;
    let line = change_logged(&ingest).expect("the change is logged once it is made");
    assert!(
        line.contains("old=5d") && line.contains("new=2d") && line.contains("WARN"),
        "{line}"
    );

    // Nothing else of the stream changed, and records younger than 2d are kept.
    let mut stream = js.get_stream(STREAM).await?;
    let config = stream.info().await?.config.clone();
    assert_eq!(read_stream(&js).await?, before);
    assert!(config.allow_atomic_publish && config.allow_direct);
    assert_eq!(config.duplicate_window, Duration::from_secs(120));
    assert_eq!(config.num_replicas, 1);
    assert_eq!(stream_messages(&h.nats.url()).await?, 20);
    Ok(())
}

/// Two segments after `watermark` that end at different sequences: the archiver
/// cannot tell which cut was cut short and stops at that watermark, retrying,
/// until they are looked at (docs/operations.md, "The archive falls behind").
fn plant_disagreeing_segments(
    store: &str,
    watermark: u64,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut planted = Vec::new();
    for (partition, last) in [(0, watermark + 3), (1, watermark + 5)] {
        let dir = Path::new(store).join(format!("archive/events/p{partition}"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{:020}-{last:020}.parquet", watermark + 1));
        std::fs::write(&path, b"")?;
        planted.push(path);
    }
    Ok(planted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_lag_grows_while_the_archiver_cannot_cut_and_returns_to_zero() -> anyhow::Result<()>
{
    let mut h = Harness::start()?;
    let store = h.store();
    let archiver_metrics = format!("127.0.0.1:{}", free_port()?);
    let producer_metrics = format!("127.0.0.1:{}", free_port()?);
    let archiver_args = [
        "--archive-store",
        store.as_str(),
        "--archive-flush-interval",
        "200ms",
        "--heartbeat-interval",
        "0s",
        "--metrics-listen",
        archiver_metrics.as_str(),
    ];
    // As the chart runs them: ingest for the producers, and one archiver.
    let mut archiver = h.spawn("payledger-ingest", &archiver_args).await?;
    let producer = h
        .spawn(
            "payledger-ingest",
            &[
                "--heartbeat-interval",
                "0s",
                "--metrics-listen",
                producer_metrics.as_str(),
            ],
        )
        .await?;
    let mut client = ingest_client(&producer.url()).await?;
    let mut log = AcceptedLog::default();

    log.publish(&mut client, events(0, 10)).await?;
    let text = wait_metrics(
        &archiver_metrics,
        "the first cut archived",
        &archiver,
        |t| {
            gauge(t, "payledger_archive_watermark_sequence") == Some(10.0)
                && gauge(t, "payledger_archive_lag_records") == Some(0.0)
        },
    )
    .await?;
    let first_cut = gauge(&text, "payledger_archive_last_cut_timestamp_seconds").unwrap_or(0.0);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(first_cut > now - 60.0 && first_cut <= now + 1.0, "{text}");
    assert_eq!(
        gauge(&text, "payledger_archive_oldest_unarchived_age_seconds"),
        Some(0.0)
    );
    assert_eq!(
        gauge(&text, "payledger_archive_lost_records_total"),
        Some(0.0)
    );
    let producer_text = scrape_metrics(&producer_metrics).await?;
    assert!(
        !producer_text.contains("payledger_archive_"),
        "only the archiver reports on the archive:\n{producer_text}"
    );

    // The archiver stops; records keep coming through the producers' ingest.
    archiver.terminate().await?;
    log.publish(&mut client, events(10, 20)).await?;
    let planted = plant_disagreeing_segments(&store, 10)?;
    let archiver = h.spawn("payledger-ingest", &archiver_args).await?;
    let text = wait_metrics(
        &archiver_metrics,
        "the lag of the 20 records published while the archiver was down",
        &archiver,
        |t| gauge(t, "payledger_archive_lag_records") == Some(20.0),
    )
    .await?;
    assert_eq!(
        gauge(&text, "payledger_archive_watermark_sequence"),
        Some(10.0)
    );
    assert!(
        archiver.log().contains("disagree on where their cut ends"),
        "{}",
        archiver.log()
    );
    let age = gauge(&text, "payledger_archive_oldest_unarchived_age_seconds").unwrap_or(0.0);
    assert!(age > 0.0 && age < 60.0, "{text}");
    // The last cut is the one written before the restart, dated by its watermark.
    let last_cut = gauge(&text, "payledger_archive_last_cut_timestamp_seconds").unwrap_or(0.0);
    assert!(
        (last_cut - first_cut).abs() < 2.0,
        "{last_cut} vs {first_cut}"
    );

    // Idle or not, the lag follows the stream while no cut is made.
    log.publish(&mut client, events(30, 5)).await?;
    wait_metrics(&archiver_metrics, "a lag of 25", &archiver, |t| {
        gauge(t, "payledger_archive_lag_records") == Some(25.0)
            && gauge(t, "payledger_archive_watermark_sequence") == Some(10.0)
    })
    .await?;

    // Records that leave the stream unarchived (max_age in time, a purge here) are
    // counted as lost once the archiver comes to them.
    let js = async_nats::jetstream::new(async_nats::connect(h.nats.url()).await?);
    js.get_stream(STREAM).await?.purge().sequence(16).await?;

    // Once the stray segments are gone the archiver catches up.
    for path in planted {
        std::fs::remove_file(path)?;
    }
    let text = wait_metrics(&archiver_metrics, "the archive caught up", &archiver, |t| {
        gauge(t, "payledger_archive_watermark_sequence") == Some(35.0)
            && gauge(t, "payledger_archive_lag_records") == Some(0.0)
    })
    .await?;
    assert_eq!(
        gauge(&text, "payledger_archive_lost_records_total"),
        Some(5.0),
        "{text}"
    );
    let lost = archiver
        .log()
        .lines()
        .find(|l| l.contains("before they were archived: they are lost for good"))
        .map(str::to_string)
        .unwrap_or_else(|| archiver.log());
    assert!(lost.contains("first=11 last=15"), "{lost}");
    assert!(
        gauge(&text, "payledger_archive_last_cut_timestamp_seconds").unwrap_or(0.0) > last_cut,
        "{text}"
    );
    assert_eq!(
        gauge(&text, "payledger_archive_oldest_unarchived_age_seconds"),
        Some(0.0)
    );
    assert_eq!(log.records.len(), 35);
    Ok(())
}
