//! The product's promise: the stream path and a replay of the archive give the same
//! rows for the same log prefix, field for field.

use std::time::Duration;

use payledger_cli::generate::{GenConfig, Generator};
use payledger_e2e::{
    AcceptedLog, Harness, assert_converges, ingest_client, now_us, query_client, stream_messages,
};
use payledger_projector::replay::{fold_dimensions, fold_partitions, latest_cutoff};
use payledger_proto::v1;
use payledger_semantics::{Settings, to_reporting};
use payledger_storage::{ArchiveStore, open_store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_archive_equals_the_stream_rows() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let store = h.store();
    let mut ingest = h
        .spawn(
            "payledger-ingest",
            &[
                "--archive-store",
                store.as_str(),
                "--archive-flush-interval",
                "200ms",
                "--heartbeat-interval",
                "1s",
            ],
        )
        .await?;
    let projector_store = format!("{store}-projector");
    let _projector = h
        .spawn(
            "payledger-projector",
            &["--store", projector_store.as_str()],
        )
        .await?;
    let query = h.spawn("payledger-query", &[]).await?;

    let mut traffic = Generator::new(GenConfig {
        seed: 11,
        merchants: 120,
        duplicate_pct: 2.0,
        conflict_pct: 1.0,
        late_pct: 8.0,
        correction_pct: 3.0,
        ..GenConfig::default()
    });
    let mut client = ingest_client(&ingest.url()).await?;
    let day = payledger_semantics::Day::of_micros(now_us());
    for record in traffic
        .fx_records(&payledger_semantics::Day(day.0 - 1).to_string())
        .into_iter()
        .map(v1::publish_dimension_request::Record::Fx)
        .chain(
            traffic
                .risk_records(&day.to_string())
                .into_iter()
                .map(v1::publish_dimension_request::Record::Risk),
        )
    {
        client
            .publish_dimension(v1::PublishDimensionRequest {
                record: Some(record),
            })
            .await?;
    }
    let mut log = AcceptedLog::default();
    for _ in 0..40 {
        log.publish(&mut client, traffic.batch(500, now_us()))
            .await?;
    }
    // Quiet partitions get heartbeats; they are archived and replayed too.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A clean stop writes the cut in progress.
    ingest.terminate()?;

    let archive = ArchiveStore::new(open_store(&store)?);
    let cutoff = latest_cutoff(&archive).await?;
    assert_eq!(
        cutoff,
        stream_messages(&h.nats.url()).await?,
        "the archive holds the whole log"
    );
    let partitions: Vec<u32> = (0..Settings::default().partitions).collect();
    let replay = fold_partitions(&archive, Settings::default(), &partitions, cutoff).await?;
    assert!(replay.daily_rows().len() > 100);
    assert!(
        replay
            .daily_rows()
            .iter()
            .any(|r| r.conflicts > 0 && r.late > 0)
    );

    let mut query = query_client(&query.url()).await?;
    assert_converges(&mut query, &replay, Duration::from_secs(60)).await?;

    // Dimensions too: the reporting view of a merchant-day agrees.
    let book = fold_dimensions(&archive, cutoff).await?;
    let rows = replay.daily_rows();
    let first = &rows[0];
    let merchant_day: Vec<_> = rows
        .iter()
        .filter(|r| r.merchant_id == first.merchant_id && r.day == first.day)
        .cloned()
        .collect();
    let expected = to_reporting(&merchant_day, &book, cutoff);
    let served = query
        .get_daily_exposure(v1::GetDailyExposureRequest {
            merchant_id: first.merchant_id.clone(),
            day: first.day.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .reporting
        .expect("reporting");
    assert_eq!(
        served.closing_reporting_minor,
        expected.closing_reporting_minor.map(|v| v.to_string())
    );
    assert_eq!(
        served.reserve_minor,
        expected.reserve_minor.map(|v| v.to_string())
    );
    assert_eq!(served.risk_version, expected.risk_used.map(|r| r.version));
    Ok(())
}
