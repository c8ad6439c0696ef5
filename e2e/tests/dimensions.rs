//! FX rates and risk tiers outlive the log's retention. The query service reads the
//! archived ones (through the archive's highest watermark) and only the later ones
//! from the log, and authoritative answers use the archive alone. So when the
//! dimension records leave the stream (a purge here, `max_age` in time) a restarted
//! query service answers the same reporting values, field for field; and when the
//! log has lost records the archive does not hold yet, it withholds them and says
//! why rather than answer wrong numbers.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use payledger_e2e::{
    AcceptedLog, Archive, Service, Stack, assert_converges, ingest_client, now_us, query_client,
};
use payledger_projector::replay::{
    ReplayRequest, fold_dimensions, latest_cutoff, replay_and_commit,
};
use payledger_proto::v1::{
    self, ingest_service_client::IngestServiceClient, publish_dimension_request::Record,
    query_service_client::QueryServiceClient,
};
use payledger_semantics::{Day, Settings, to_reporting};
use payledger_server_common::topology::{DIMS_SUBJECTS, FX_SUBJECT, RISK_SUBJECT, STREAM};
use payledger_storage::{ArchiveStore, Commit};
use prost::Message;
use tonic::transport::Channel;

/// The response metadata a stream answer carries while it withholds reporting values.
const REPORTING_INCOMPLETE: &str = "payledger-reporting-incomplete";
const WITHIN: Duration = Duration::from_secs(60);

fn fx(currency: &str, rate: &str, day: Day, version: i32) -> Record {
    Record::Fx(v1::FxRate {
        currency: currency.into(),
        rate: rate.into(),
        effective_date: day.to_string(),
        version,
    })
}

fn risk(merchant_id: &str, tier: &str, reserve_bps: i32, day: Day, version: i32) -> Record {
    Record::Risk(v1::RiskTier {
        merchant_id: merchant_id.into(),
        tier: tier.into(),
        reserve_bps,
        effective_date: day.to_string(),
        version,
    })
}

fn capture(id: &str, merchant_id: &str, amount_minor: i64, currency: &str, at: i64) -> v1::Event {
    v1::Event {
        event_id: id.into(),
        merchant_id: merchant_id.into(),
        kind: v1::EventKind::PaymentCaptured as i32,
        amount_minor,
        currency: currency.into(),
        event_time_us: at,
        corrects_event_id: String::new(),
    }
}

async fn publish_dims(
    client: &mut IngestServiceClient<Channel>,
    records: Vec<Record>,
) -> anyhow::Result<()> {
    for record in records {
        let response = client
            .publish_dimension(v1::PublishDimensionRequest {
                record: Some(record),
            })
            .await?
            .into_inner();
        anyhow::ensure!(!response.duplicate, "every record here is new");
    }
    Ok(())
}

async fn stream(nats_url: &str) -> anyhow::Result<jetstream::stream::Stream> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    Ok(js.get_stream(STREAM).await?)
}

/// Waits until the archive's highest watermark is the log's last sequence.
async fn wait_archived(archive: &ArchiveStore, nats_url: &str) -> anyhow::Result<u64> {
    let mut stream = stream(nats_url).await?;
    let deadline = Instant::now() + WITHIN;
    loop {
        let last = stream.info().await?.state.last_sequence;
        let archived = latest_cutoff(archive).await?;
        if archived == last {
            return Ok(archived);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the archive reached {archived}, the log {last}, after {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes every dimension record from the stream, as `max_age` would in time;
/// returns how many there were.
async fn purge_dimensions(nats_url: &str) -> anyhow::Result<u64> {
    let stream = stream(nats_url).await?;
    let purged = stream.purge().filter(DIMS_SUBJECTS).await?;
    for subject in [FX_SUBJECT, RISK_SUBJECT] {
        anyhow::ensure!(
            stream
                .get_last_raw_message_by_subject(subject)
                .await
                .is_err(),
            "{subject} still has records after the purge"
        );
    }
    Ok(purged.purged)
}

fn request(
    merchant_id: &str,
    day: Day,
    consistency: v1::Consistency,
    snapshot_id: &str,
) -> v1::GetDailyExposureRequest {
    v1::GetDailyExposureRequest {
        merchant_id: merchant_id.into(),
        day: day.to_string(),
        consistency: consistency as i32,
        snapshot_id: snapshot_id.into(),
    }
}

/// An answer without what changes from one call to the next (how long ago the
/// projector last reported its progress).
fn comparable(mut answer: v1::DailyExposure) -> v1::DailyExposure {
    if let Some(p) = answer.provenance.as_mut() {
        p.stream_lag = None;
    }
    answer
}

/// One call: the answer, and the reason reporting values are withheld, if they are.
async fn ask(
    query: &mut QueryServiceClient<Channel>,
    request: &v1::GetDailyExposureRequest,
) -> Result<(v1::DailyExposure, Option<String>), tonic::Status> {
    let response = query.get_daily_exposure(request.clone()).await?;
    let incomplete = response
        .metadata()
        .get(REPORTING_INCOMPLETE)
        .map(|v| v.to_str().unwrap_or("(not text)").to_string());
    Ok((comparable(response.into_inner()), incomplete))
}

/// Asks until the answer holds every reporting value it can (nothing withheld);
/// a commit, a restart's tables, take the service a moment.
async fn complete_answer(
    query: &mut QueryServiceClient<Channel>,
    request: &v1::GetDailyExposureRequest,
    done: impl Fn(&v1::DailyExposure) -> bool,
) -> anyhow::Result<v1::DailyExposure> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let last = match ask(query, request).await {
            Ok((answer, None)) if done(&answer) => return Ok(answer),
            Ok(other) => format!("{other:?}"),
            Err(s) if matches!(s.code(), tonic::Code::NotFound) => format!("{s}"),
            Err(s) => return Err(s.into()),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "{request:?} had no complete answer within {WITHIN:?}; the last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const M1: &str = "m-dims:1";
const M2: &str = "m-dims:2";
const M3: &str = "m-dims:3";
const M4: &str = "m-dims:4";

/// What a merchant-day answered before anything was dropped from the log.
struct Recorded {
    merchant_id: String,
    day: Day,
    provisional: v1::DailyExposure,
    authoritative: v1::DailyExposure,
}

/// The stack with a committed replay, and the answers recorded before.
struct Committed {
    stack: Stack,
    query: Service,
    commit: Commit,
    recorded: Vec<Recorded>,
    today: Day,
    /// Dimension records stored in the log.
    dims: u64,
}

payledger_e2e::deref_to_stack!(Committed);

impl Committed {
    async fn restart_query(&mut self) -> anyhow::Result<QueryServiceClient<Channel>> {
        self.query.terminate().await?;
        self.query = self.stack.spawn_query(&[]).await?;
        query_client(&self.query.url()).await
    }

    /// Asks for every recorded merchant-day until the answers equal the recorded
    /// ones, field for field: the provisional ones when `provisional`, and always
    /// the authoritative ones by snapshot id.
    async fn assert_recorded_answers(
        &self,
        query: &mut QueryServiceClient<Channel>,
        provisional: bool,
    ) -> anyhow::Result<()> {
        for r in &self.recorded {
            let by_snapshot = request(
                &r.merchant_id,
                r.day,
                v1::Consistency::Authoritative,
                &self.commit.draft.snapshot_id,
            );
            let answer = complete_answer(query, &by_snapshot, |a| {
                a.rows.len() == r.authoritative.rows.len()
            })
            .await?;
            assert_eq!(
                answer, r.authoritative,
                "{} {}: authoritative",
                r.merchant_id, r.day
            );
            if provisional {
                let stream = request(&r.merchant_id, r.day, v1::Consistency::Provisional, "");
                let answer = complete_answer(query, &stream, |a| *a == r.provisional)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "{} {}: provisional, recorded {:?}: {e}",
                            r.merchant_id,
                            r.day,
                            r.provisional
                        )
                    })?;
                assert_eq!(answer, r.provisional);
            }
        }
        Ok(())
    }
}

/// Ingests events and several FX and risk versions over two archive cuts, commits a
/// replay at the archive's highest watermark (the end of the log) and records every
/// merchant-day's provisional and authoritative answers, checked against the
/// archive's dimension records and, for one merchant-day, against values worked out
/// by hand.
async fn committed_stack() -> anyhow::Result<Committed> {
    let mut stack = Stack::builder()
        .archive(Archive::Fs)
        .projector(&[])
        .query(&["--commit-poll-interval", "100ms"])
        .start()
        .await?;
    let query = stack.query.take().expect("query");
    let archive = stack.archive()?;
    let nats_url = stack.h.nats.url();

    let at = now_us() - 60_000_000;
    let today = Day::of_micros(at);
    let yesterday = Day(today.0 - 1);
    let mut client = stack.ingest_client().await?;
    let mut log = AcceptedLog::default();
    let first = vec![
        fx("EUR", "1.08", yesterday, 1),
        fx("GBP", "1.27", yesterday, 1),
        fx("JPY", "0.0067", yesterday, 1),
        risk(M1, "low", 500, yesterday, 1),
        risk(M3, "low", 500, yesterday, 1),
        risk(M4, "high", 2500, today, 1),
    ];
    let mut dims = first.len() as u64;
    publish_dims(&mut client, first).await?;
    log.publish(
        &mut client,
        vec![
            capture("e1", M1, 10_000, "EUR", at),
            capture("e2", M1, 2_500, "USD", at),
            capture("e3", M2, 7_000, "GBP", at),
            capture("e4", M3, 3_000, "EUR", yesterday.start_us() + 3_600_000_000),
            capture("e5", M3, 1_500_000, "JPY", at),
            capture("e6", M4, 9_000, "USD", at),
        ],
    )
    .await?;
    let first_cut = wait_archived(&archive, &nats_url).await?;
    // New versions in a second cut.
    let second = vec![
        fx("EUR", "1.09", today, 1),
        fx("EUR", "1.10", today, 2),
        fx("GBP", "1.26", today, 1),
        risk(M1, "medium", 1000, today, 2),
        risk(M2, "high", 2500, today, 1),
        risk(M3, "medium", 1000, yesterday, 2),
    ];
    dims += second.len() as u64;
    publish_dims(&mut client, second).await?;
    // (EUR, today, 2) again with another rate: ingest refuses it, but a log may hold
    // it all the same (written before ingest refused such records, or by two ingest
    // processes at once), and there the first in the log wins.
    let Record::Fx(again) = fx("EUR", "1.50", today, 2) else {
        unreachable!("an FX record")
    };
    let refused = client
        .publish_dimension(v1::PublishDimensionRequest {
            record: Some(Record::Fx(again.clone())),
        })
        .await
        .expect_err("a key the log holds, with other content");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    let record = v1::LogRecord {
        ingest_time_us: now_us(),
        body: Some(v1::log_record::Body::Fx(again)),
        traceparent: String::new(),
    };
    jetstream::new(async_nats::connect(&nats_url).await?)
        .publish(FX_SUBJECT, record.encode_to_vec().into())
        .await?
        .await?;
    dims += 1;
    log.publish(
        &mut client,
        vec![
            capture("e7", M1, 500, "USD", at),
            capture("e8", M2, 1_000, "GBP", at),
        ],
    )
    .await?;
    let cutoff = wait_archived(&archive, &nats_url).await?;
    assert!(cutoff > first_cut);
    assert!(archive.dim_segments().await?.len() >= 2, "dims in two cuts");

    let oracle = log.fold(Settings::default())?;
    let mut query_api = query_client(&query.url()).await?;
    assert_converges(&mut query_api, &oracle, WITHIN).await?;

    let rows = oracle.daily_rows();
    let commit = replay_and_commit(
        &payledger_projector::replay::ReplayStores::beside(archive.clone()),
        Settings::default(),
        &ReplayRequest {
            replay_id: "dims".into(),
            from_day: rows.iter().map(|r| r.day).min().expect("rows"),
            to_day: today,
            cutoff: Some(cutoff),
            from_genesis: false,
        },
        |_| {},
    )
    .await?;

    let book = fold_dimensions(&archive, cutoff).await?;
    let mut days: Vec<(String, Day)> = rows
        .iter()
        .map(|r| (r.merchant_id.clone(), r.day))
        .collect();
    days.dedup();
    let mut recorded = Vec::new();
    for (merchant_id, day) in days {
        let provisional = complete_answer(
            &mut query_api,
            &request(&merchant_id, day, v1::Consistency::Provisional, ""),
            |_| true,
        )
        .await?;
        let authoritative = complete_answer(
            &mut query_api,
            &request(
                &merchant_id,
                day,
                v1::Consistency::Authoritative,
                &commit.draft.snapshot_id,
            ),
            |_| true,
        )
        .await?;
        let merchant_day: Vec<_> = rows
            .iter()
            .filter(|r| r.merchant_id == merchant_id && r.day == day)
            .cloned()
            .collect();
        let expected = to_reporting(&merchant_day, &book, cutoff);
        for answer in [&provisional, &authoritative] {
            let reporting = answer.reporting.as_ref().expect("reporting values");
            assert_eq!(
                reporting.closing_reporting_minor,
                expected.closing_reporting_minor.map(|v| v.to_string()),
                "{merchant_id} {day}"
            );
            assert_eq!(
                reporting.reserve_minor,
                expected.reserve_minor.map(|v| v.to_string())
            );
            assert_eq!(
                reporting.risk_version,
                expected.risk_used.as_ref().map(|r| r.version)
            );
            assert!(
                reporting.missing_rates.is_empty(),
                "{merchant_id} {day}: {reporting:?}"
            );
        }
        assert_eq!(
            provisional.reporting, authoritative.reporting,
            "{merchant_id} {day}"
        );
        recorded.push(Recorded {
            merchant_id,
            day,
            provisional,
            authoritative,
        });
    }
    // By hand: EUR 100.00 at version 2 of today's rate (1.10, not the repeated 1.50)
    // is USD 110.00, plus USD 30.00; reserve 10 % (M1's tier of today, version 2).
    let m1 = recorded
        .iter()
        .find(|r| r.merchant_id == M1 && r.day == today)
        .expect("M1 today");
    let reporting = m1.provisional.reporting.clone().expect("reporting values");
    assert_eq!(reporting.closing_reporting_minor.as_deref(), Some("14000"));
    assert_eq!(reporting.reserve_minor.as_deref(), Some("1400"));
    assert_eq!(
        reporting
            .fx_versions
            .iter()
            .map(|f| (f.currency.as_str(), f.version, f.rate.as_str()))
            .collect::<Vec<_>>(),
        vec![("EUR", 2, "1.10")]
    );
    assert_eq!(
        (reporting.risk_tier.as_str(), reporting.risk_version),
        ("medium", Some(2))
    );
    Ok(Committed {
        stack,
        query,
        commit,
        recorded,
        today,
        dims,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporting_values_outlive_the_dimension_records_in_the_log() -> anyhow::Result<()> {
    let mut stack = committed_stack().await?;
    assert_eq!(purge_dimensions(&stack.h.nats.url()).await?, stack.dims);
    let mut query = stack.restart_query().await?;
    stack.assert_recorded_answers(&mut query, true).await?;
    assert!(
        stack.query.log().contains("every one from the archive"),
        "{}",
        stack.query.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_lost_past_the_archive_withhold_reporting_values() -> anyhow::Result<()> {
    let mut stack = committed_stack().await?;
    let today = stack.today;
    // Ingest without its archiver: the next records reach the log only.
    stack.ingest.terminate().await?;
    let ingest = stack
        .h
        .spawn("payledger-ingest", &["--heartbeat-interval", "0s"])
        .await?;
    let mut client = ingest_client(&ingest.url()).await?;
    publish_dims(
        &mut client,
        vec![
            fx("EUR", "2.00", today, 3),
            risk(M1, "high", 2500, today, 3),
        ],
    )
    .await?;
    let mut query = query_client(&stack.query.url()).await?;
    let m1_today = request(M1, today, v1::Consistency::Provisional, "");
    let fresh = complete_answer(&mut query, &m1_today, |a| {
        a.reporting.as_ref().and_then(|r| r.risk_version) == Some(3)
    })
    .await?;
    assert_eq!(
        fresh
            .reporting
            .as_ref()
            .and_then(|r| r.closing_reporting_minor.as_deref()),
        Some("23000")
    );

    // Those two leave the log before the archive has them.
    assert_eq!(purge_dimensions(&stack.h.nats.url()).await?, stack.dims + 2);
    let mut query = stack.restart_query().await?;
    let recorded_m1 = stack
        .recorded
        .iter()
        .find(|r| r.merchant_id == M1 && r.day == today)
        .expect("M1 today");
    let deadline = Instant::now() + WITHIN;
    let (answer, reason) = loop {
        match ask(&mut query, &m1_today).await {
            Ok((answer, Some(reason)))
                if reason.contains("may be missing")
                    && answer.rows == recorded_m1.provisional.rows =>
            {
                break (answer, reason);
            }
            other => anyhow::ensure!(
                Instant::now() < deadline,
                "never flagged within {WITHIN:?}; the last answer: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reason.contains("is the archiver running?"), "{reason}");
    // Neither the old values nor the lost ones: none that needs a rate or a tier.
    let reporting = answer.reporting.expect("reporting");
    assert_eq!(reporting.closing_reporting_minor, None);
    assert_eq!(reporting.reserve_minor, None);
    assert!(reporting.fx_versions.is_empty());
    assert_eq!(reporting.risk_version, None);
    assert_eq!(reporting.missing_rates, vec!["EUR".to_string()]);
    // A closing already in the reporting currency needs no record; its reserve does.
    let (usd_only, reason) = ask(
        &mut query,
        &request(M4, today, v1::Consistency::Provisional, ""),
    )
    .await?;
    assert!(reason.is_some());
    let usd_reporting = usd_only.reporting.expect("reporting");
    assert_eq!(
        usd_reporting.closing_reporting_minor.as_deref(),
        Some("9000")
    );
    assert_eq!(usd_reporting.reserve_minor, None);
    let list = query
        .list_daily_exposure(v1::ListDailyExposureRequest {
            merchant_id: M1.into(),
            from_day: today.to_string(),
            to_day: today.to_string(),
            consistency: v1::Consistency::Provisional as i32,
            page_size: 0,
            page_token: String::new(),
        })
        .await?;
    assert!(list.metadata().get(REPORTING_INCOMPLETE).is_some());
    // Authoritative answers come from the archive: unchanged.
    stack.assert_recorded_answers(&mut query, false).await?;
    let log = stack.query.log();
    assert!(
        log.contains("may be missing") && log.contains("ERROR"),
        "{log}"
    );

    // Once the archiver has cut past the gap, the book is the archive's again: the
    // two lost records are lost to replays too, so the values are those recorded.
    let mut ingest = ingest;
    ingest.terminate().await?;
    stack.ingest = stack.spawn_ingest(&[]).await?;
    let mut client = ingest_client(&stack.ingest.url()).await?;
    AcceptedLog::default()
        .publish(
            &mut client,
            vec![capture("e9", "m-dims:5", 100, "USD", now_us())],
        )
        .await?;
    wait_archived(&stack.archive()?, &stack.h.nats.url()).await?;
    stack.assert_recorded_answers(&mut query, true).await?;
    assert!(
        stack
            .query
            .log()
            .contains("the archive now reaches past the records the log lost"),
        "{}",
        stack.query.log()
    );
    Ok(())
}

/// A closing whose exact conversion leaves 128 bits has no reporting value, and
/// the answer says why instead of leaving it absent without a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_conversion_is_answered_with_its_reason() -> anyhow::Result<()> {
    let stack = Stack::builder().projector(&[]).query(&[]).start().await?;
    let mut client = stack.ingest_client().await?;
    let now = now_us();
    let today = Day::of_micros(now);
    // i64::MAX cents at a rate of 30 digits: about 9.2 × 10^48, past i128's 1.7 × 10^38.
    publish_dims(
        &mut client,
        vec![
            fx("EUR", "999999999999999999999999999999", today, 1),
            risk(M1, "gold", 100, today, 1),
        ],
    )
    .await?;
    let mut log = AcceptedLog::default();
    log.publish(
        &mut client,
        vec![capture("e-huge", M1, i64::MAX, "EUR", now - 60_000_000)],
    )
    .await?;
    let mut query = query_client(&stack.query.as_ref().expect("query").url()).await?;
    let answer = complete_answer(
        &mut query,
        &request(M1, today, v1::Consistency::Provisional, ""),
        |a| {
            !a.rows.is_empty()
                && a.reporting
                    .as_ref()
                    .is_some_and(|r| !r.fx_versions.is_empty())
        },
    )
    .await?;
    assert_eq!(answer.rows[0].closing_minor, i64::MAX.to_string());
    let reporting = answer.reporting.expect("reporting");
    assert_eq!(reporting.closing_reporting_minor, None);
    assert_eq!(reporting.reserve_minor, None);
    assert!(reporting.missing_rates.is_empty(), "{reporting:?}");
    assert_eq!(
        reporting.overflow,
        "converting the EUR closing to USD leaves 128 bits"
    );
    Ok(())
}
