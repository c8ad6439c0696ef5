//! The product's promise as a scenario that runs over any object store: the stream
//! path and a replay of the archive give the same rows for the same log prefix, field
//! for field, and a committed replay becomes what the query service answers.
//!
//! `tests/convergence.rs` runs it on the local filesystem and on a real
//! S3-compatible server.

use std::time::Duration;

use payledger_cli::generate::{GenConfig, Generator};
use payledger_projector::replay::{fold_dimensions, fold_partitions, latest_cutoff};
use payledger_proto::v1;
use payledger_semantics::{Day, Settings, to_reporting};
use payledger_storage::Commit;

use crate::{
    AcceptedLog, Archive, Stack, assert_converges, daily_answer_from, now_us, query_client,
    stream_messages,
};

/// Generated traffic with every kind of trouble: duplicates, conflicts, late
/// events and corrections (seed, merchants and lateness to be set by the test).
pub fn history_config() -> GenConfig {
    GenConfig {
        duplicate_pct: 2.0,
        conflict_pct: 1.0,
        correction_pct: 3.0,
        ..GenConfig::default()
    }
}

/// Publishes FX rates of yesterday and risk tiers of today for every merchant, then
/// `batches` generated batches of 500 events, `pause` apart (so that the archiver
/// cuts between them); returns what ingest accepted.
pub async fn publish_history(
    client: &mut payledger_proto::v1::ingest_service_client::IngestServiceClient<
        tonic::transport::Channel,
    >,
    config: GenConfig,
    batches: usize,
    pause: Duration,
) -> anyhow::Result<AcceptedLog> {
    let mut traffic = Generator::new(config);
    let day = Day::of_micros(now_us());
    for record in traffic
        .fx_records(&Day(day.0 - 1).to_string())
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
    for _ in 0..batches {
        log.publish(client, traffic.batch(500, now_us())).await?;
        tokio::time::sleep(pause).await;
    }
    Ok(log)
}

/// What the scenario published and committed, for further checks.
pub struct Outcome {
    pub cutoff: u64,
    pub commit: Commit,
    /// Daily rows of the replay at the cutoff.
    pub rows: usize,
}

/// Publishes `batches` batches of 500 generated events (plus FX and risk records)
/// through ingest archiving to `archive`, stops ingest cleanly, replays the
/// archive at its highest watermark and checks that:
/// - the archive holds the whole log;
/// - the stream rows the query service serves equal the replay's, field for field,
///   and so does the reporting view of a merchant-day (dimensions replayed too);
/// - once the replay is committed, AUTO answers from it with the same rows,
///   AUTHORITATIVE answers from it by snapshot id, PROVISIONAL still from the
///   stream, and reconciliation finds every row equal;
/// - an event past the cutoff makes AUTO answer from the stream again.
pub async fn replay_of_the_archive_equals_the_stream_rows(
    archive: Archive,
    batches: usize,
) -> anyhow::Result<(Stack, Outcome)> {
    let mut stack = Stack::builder()
        .archive(archive)
        .heartbeats("1s")
        .projector(&[])
        .query(&["--commit-poll-interval", "100ms"])
        .start()
        .await?;
    let outcome = converge(&mut stack, batches).await?;
    Ok((stack, outcome))
}

async fn converge(stack: &mut Stack, batches: usize) -> anyhow::Result<Outcome> {
    let query = stack.query().url();
    let mut client = stack.ingest_client().await?;
    let history = GenConfig {
        seed: 11,
        merchants: 120,
        late_pct: 8.0,
        ..history_config()
    };
    let mut log = publish_history(&mut client, history, batches, Duration::ZERO).await?;
    // Quiet partitions get heartbeats; they are archived and replayed too.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A clean stop writes the cut in progress.
    stack.ingest.terminate().await?;

    let archive = stack.archive()?;
    let cutoff = latest_cutoff(&archive).await?;
    assert_eq!(
        cutoff,
        stream_messages(&stack.h.nats.url()).await?,
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

    let mut query = query_client(&query).await?;
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

    // Commit the replay as the authoritative table; AUTO now answers from it, with
    // the same rows, while PROVISIONAL still answers from the stream.
    let today = Day::of_micros(now_us());
    let request = payledger_projector::replay::ReplayRequest {
        replay_id: "convergence".into(),
        from_day: rows.iter().map(|r| r.day).min().expect("rows"),
        to_day: today,
        cutoff: Some(cutoff),
        from_genesis: false,
    };
    let mut replayed = Vec::new();
    let commit = payledger_projector::replay::replay_and_commit(
        &payledger_projector::replay::ReplayStores::beside(archive.clone()),
        Settings::default(),
        &request,
        |p| replayed.push(p),
    )
    .await?;
    assert_eq!(replayed.len(), 16);
    assert_eq!(commit.number, 1);
    let target = rows
        .iter()
        .find(|r| r.day == today)
        .expect("a row of today")
        .clone();
    let ask = |consistency: v1::Consistency, snapshot_id: &str| v1::GetDailyExposureRequest {
        merchant_id: target.merchant_id.clone(),
        day: today.to_string(),
        consistency: consistency as i32,
        snapshot_id: snapshot_id.to_string(),
    };
    let auto = daily_answer_from(
        &mut query,
        ask(v1::Consistency::Auto, ""),
        v1::Source::Replay,
        Duration::from_secs(10),
    )
    .await?;
    let provenance = auto.provenance.clone().expect("provenance");
    assert!(!provenance.provisional);
    assert_eq!(provenance.snapshot_id, commit.draft.snapshot_id);
    let provisional = query
        .get_daily_exposure(ask(v1::Consistency::Provisional, ""))
        .await?
        .into_inner();
    assert_eq!(
        provisional.provenance.as_ref().map(|p| p.source),
        Some(v1::Source::Stream as i32)
    );
    assert_eq!(
        auto.rows, provisional.rows,
        "replay and stream rows are the same rows"
    );
    let as_of = query
        .get_daily_exposure(ask(
            v1::Consistency::Authoritative,
            &commit.draft.snapshot_id,
        ))
        .await?
        .into_inner();
    assert_eq!(as_of.rows, auto.rows);
    let as_of_provenance = as_of.provenance.expect("provenance");
    assert_eq!(as_of_provenance.source, v1::Source::Replay as i32);
    assert_eq!(as_of_provenance.snapshot_id, commit.draft.snapshot_id);
    let unknown = query
        .get_daily_exposure(ask(v1::Consistency::Authoritative, "no-such-snapshot"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Reconciliation over the committed range: every row equal.
    let reconcile = v1::ReconcileRequest {
        from_day: request.from_day.to_string(),
        to_day: today.to_string(),
        max_differences: 0,
    };
    let report = query.reconcile(reconcile.clone()).await?.into_inner();
    assert_eq!(report.rows_equal as usize, rows.len(), "{report:?}");
    assert_eq!(
        (
            report.rows_stream_ahead,
            report.rows_divergent,
            report.rows_missing
        ),
        (0, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.snapshot_ids, vec![commit.draft.snapshot_id.clone()]);

    // New events after the cutoff: the stream has moved on, AUTO answers from it.
    stack.ingest = stack
        .spawn("payledger-ingest", &["--heartbeat-interval", "0s"])
        .await?;
    let mut client = stack.ingest_client().await?;
    let late = v1::Event {
        event_id: "after-the-cutoff".into(),
        merchant_id: target.merchant_id.clone(),
        kind: v1::EventKind::PaymentCaptured as i32,
        amount_minor: 4200,
        currency: target.currency.to_string(),
        event_time_us: now_us() - 1_000_000,
        corrects_event_id: String::new(),
    };
    log.publish(&mut client, vec![late]).await?;
    // The stream has moved past the commit there: AUTO answers from it.
    let answer = daily_answer_from(
        &mut query,
        ask(v1::Consistency::Auto, ""),
        v1::Source::Stream,
        Duration::from_secs(10),
    )
    .await?;
    assert!(answer.rows.iter().any(|r| r.log_position > cutoff));
    Ok(Outcome {
        cutoff,
        commit,
        rows: rows.len(),
    })
}
