//! Day closure, lateness and restatement across three days, with ingest's clock
//! injected (docs/semantics.md R2, R3, R5, R6 and docs/failure-contract.md).
//!
//! Ingest runs in this process on a `ManualClock`, heartbeats on (every partition
//! quiet for 60 s of the injected clock gets one); projector and query are the real
//! binaries. One merchant, one currency, a scripted log. Every row served is
//! compared with values written out by hand below, not with an oracle fold, so
//! a mistake shared by the semantics crate and the services shows up here.
//!
//! Settings are the defaults: allowed lateness 1 h, horizon 35 d, 15-min buckets.
//! The script (ingest clock → events; amounts in minor units of USD):
//!
//! | clock     | event | kind                 | amount | event_time | notes |
//! |-----------|-------|----------------------|--------|------------|-------|
//! | D1 10:00  | E1    | PAYMENT_CAPTURED     | 10 000 | D1 09:50   | on time; repeated in the same call → Duplicate(E1) |
//! | D1 12:00  | E2    | REFUND_ISSUED        |  4 000 | D1 11:30   | on time |
//! | D2 00:50  | E3    | REFUND_ISSUED        |  5 000 | D1 23:50   | exactly 1 h old: not late; D1 still open |
//! | D2 01:00  | E4    | PAYMENT_CAPTURED     |  2 000 | D2 00:55   | partition clock reaches end(D1) + 1 h: D1 closes |
//! | D2 01:00  | E5    | CHARGEBACK_OPENED    |  1 500 | D1 20:00   | late; restates D1; D2 (open) moves, not restated |
//! | D2 01:00  | E6    | = E1, resent after JetStream's duplicate window: in the log, a duplicate on D1 |
//! | D2 01:00  | E7    | id of E4, amount 2 500 | | D2 00:55 | conflict on D2 |
//! | D3 01:00  | —     | heartbeat (no events for a day) | | | closes D2 |
//! | D3 01:00  | E8    | REFUND_ISSUED        |  3 000 | D2 22:00   | late; D2 restated because of the heartbeat |
//! | D3 01:00  | E9    | SETTLEMENT_RECEIVED  |  8 000 | D3 00:50   | on time |

use std::sync::Arc;
use std::time::{Duration, Instant};

use payledger_e2e::{Harness, query_client, read_log, wait_healthy};
use payledger_ingest::{IngestConfig, ManualClock};
use payledger_proto::v1::EventKind::{
    ChargebackOpened, PaymentCaptured, RefundIssued, SettlementReceived,
};
use payledger_proto::v1::{
    self, ingest_service_client::IngestServiceClient, publish_result::Outcome,
    query_service_client::QueryServiceClient,
};
use payledger_proto::{current_row_from_proto, daily_row_from_proto};
use payledger_semantics::{
    Currency, CurrentRow, DailyRow, Day, SEMANTICS_VERSION, Settings, partition_of,
};
use payledger_server_common::topology::event_subject;
use tonic::transport::Channel;

const MERCHANT: &str = "m-closure:1";
const MINUTE: i64 = 60_000_000;

fn d1() -> Day {
    Day::parse("2026-03-02").expect("a valid day")
}
fn d2() -> Day {
    Day(d1().0 + 1)
}
fn d3() -> Day {
    Day(d1().0 + 2)
}

/// `day` at hh:mm UTC, in microseconds.
fn at(day: Day, hh: i64, mm: i64) -> i64 {
    day.start_us() + (hh * 60 + mm) * MINUTE
}

fn event(id: &str, kind: v1::EventKind, amount: i64, event_time_us: i64) -> v1::Event {
    v1::Event {
        event_id: id.to_string(),
        merchant_id: MERCHANT.to_string(),
        kind: kind as i32,
        amount_minor: amount,
        currency: "USD".to_string(),
        event_time_us,
        corrects_event_id: String::new(),
    }
}

/// A hand-written daily row of the merchant in USD.
#[allow(clippy::too_many_arguments)]
fn row(
    day: Day,
    closing: i128,
    peak: i128,
    peak_bucket_start_us: i64,
    (applied, duplicates, conflicts, late): (u64, u64, u64, u64),
    restated: bool,
    log_position: u64,
) -> DailyRow {
    DailyRow {
        merchant_id: MERCHANT.to_string(),
        day,
        currency: Currency::USD,
        closing_minor: closing,
        peak_minor: peak,
        peak_bucket_start_us,
        applied,
        duplicates,
        conflicts,
        late,
        restated,
        log_position,
        semantics_version: SEMANTICS_VERSION,
    }
}

/// Publishes one call and returns its results, checked to be one per event.
async fn publish(
    client: &mut IngestServiceClient<Channel>,
    events: Vec<v1::Event>,
) -> anyhow::Result<Vec<Outcome>> {
    let n = events.len();
    let results = client
        .publish(v1::PublishRequest { events })
        .await?
        .into_inner()
        .results;
    anyhow::ensure!(
        results.len() == n,
        "{} results for {n} events",
        results.len()
    );
    results
        .into_iter()
        .map(|r| {
            r.outcome
                .ok_or_else(|| anyhow::anyhow!("result without outcome"))
        })
        .collect()
}

/// The sequence of an Accepted answer stamped with `clock_us` in `partition`.
fn accepted(what: &str, outcome: &Outcome, clock_us: i64, partition: u32) -> anyhow::Result<u64> {
    match outcome {
        Outcome::Accepted(a) => {
            anyhow::ensure!(
                a.ingest_time_us == clock_us,
                "{what}: ingest_time {} is not the injected clock {clock_us}",
                a.ingest_time_us
            );
            anyhow::ensure!(
                a.partition == partition,
                "{what}: partition {} instead of {partition}",
                a.partition
            );
            Ok(a.sequence)
        }
        other => anyhow::bail!("{what}: expected Accepted, got {other:?}"),
    }
}

async fn served_daily(
    q: &mut QueryServiceClient<Channel>,
    day: Day,
) -> anyhow::Result<Option<v1::DailyExposure>> {
    match q
        .get_daily_exposure(v1::GetDailyExposureRequest {
            merchant_id: MERCHANT.to_string(),
            day: day.to_string(),
            consistency: v1::Consistency::Auto as i32,
            snapshot_id: String::new(),
        })
        .await
    {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(anyhow::anyhow!("GetDailyExposure({day}): {s}")),
    }
}

/// Polls GetDailyExposure until the day's rows are exactly `[want]`.
async fn expect_daily(
    q: &mut QueryServiceClient<Channel>,
    step: &str,
    want: &DailyRow,
) -> anyhow::Result<v1::DailyExposure> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let served = served_daily(q, want.day).await?;
        let rows = match &served {
            Some(e) => e
                .rows
                .iter()
                .map(daily_row_from_proto)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            None => Vec::new(),
        };
        if rows.len() == 1 && rows[0] == *want {
            return Ok(served.expect("rows were served"));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{step}: the {} row served is not the hand-written one after 20 s\n  served:   {rows:?}\n  expected: {want:?}",
            want.day
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn expect_current(
    q: &mut QueryServiceClient<Channel>,
    want: &CurrentRow,
) -> anyhow::Result<v1::CurrentExposure> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let served = q
            .get_current_exposure(v1::GetCurrentExposureRequest {
                merchant_id: MERCHANT.to_string(),
            })
            .await;
        let rows = match &served {
            Ok(e) => e
                .get_ref()
                .rows
                .iter()
                .map(current_row_from_proto)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
            Err(s) => anyhow::bail!("GetCurrentExposure: {s}"),
        };
        if rows.len() == 1 && rows[0] == *want {
            return Ok(served.expect("rows were served").into_inner());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the current row served is not the hand-written one after 20 s\n  served:   {rows:?}\n  expected: {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn days_close_late_events_restate_and_heartbeats_close_quiet_days() -> anyhow::Result<()> {
    let settings = Settings::default();
    assert_eq!(
        settings.allowed_lateness_us,
        60 * MINUTE,
        "default lateness"
    );
    assert_eq!(
        settings.bucket_width_us,
        15 * MINUTE,
        "default bucket width"
    );
    let p = partition_of(MERCHANT, settings.partitions);
    let (d1, d2, d3) = (d1(), d2(), d3());

    let mut h = Harness::start()?;
    let nats_url = h.nats.url();

    // Ingest in process, on the injected clock.
    let clock = Arc::new(ManualClock::new(at(d1, 10, 0)));
    let mut config = IngestConfig::new(&nats_url);
    config.heartbeat_interval = Duration::from_secs(60);
    config.duplicate_window = Duration::from_secs(1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ingest_url = format!("http://{}", listener.local_addr()?);
    let (stop_ingest, ingest_stopped) = tokio::sync::oneshot::channel::<()>();
    let ingest = tokio::spawn(payledger_ingest::run(
        config,
        clock.clone(),
        listener,
        async move {
            let _ = ingest_stopped.await;
        },
    ));
    wait_healthy(&ingest_url, Duration::from_secs(30)).await?;

    let store = h.store();
    let _projector = h
        .spawn(
            "payledger-projector",
            &["--store", &store, "--checkpoint-interval", "500ms"],
        )
        .await?;
    let query = h.spawn("payledger-query", &[]).await?;
    let mut client = IngestServiceClient::new(Channel::from_shared(ingest_url)?.connect().await?);
    let mut q = query_client(&query.url()).await?;

    // D1 10:00 — E1 on time, and an exact repeat in the same call.
    let t1 = at(d1, 10, 0);
    let e1 = event("ev-1", PaymentCaptured, 10_000, at(d1, 9, 50));
    let r = publish(&mut client, vec![e1.clone(), e1.clone()]).await?;
    let s1 = accepted("E1", &r[0], t1, p)?;
    assert_eq!(
        r[1],
        Outcome::Duplicate(v1::Duplicate { sequence: s1 }),
        "a repeat within the call answers as a duplicate of E1"
    );

    // D1 12:00 — E2 on time.
    let t2 = at(d1, 12, 0);
    clock.set(t2);
    let r = publish(
        &mut client,
        vec![event("ev-2", RefundIssued, 4_000, at(d1, 11, 30))],
    )
    .await?;
    let s2 = accepted("E2", &r[0], t2, p)?;

    // D2 00:50 — E3 for D1, exactly the allowed lateness old: not late, D1 open.
    let t3 = at(d2, 0, 50);
    clock.set(t3);
    let r = publish(
        &mut client,
        vec![event("ev-3", RefundIssued, 5_000, at(d1, 23, 50))],
    )
    .await?;
    let s3 = accepted("E3", &r[0], t3, p)?;
    assert!(s1 < s2 && s2 < s3, "sequences grow: {s1} {s2} {s3}");
    // Balances of D1 at bucket ends: 10 000 from 09:45, 6 000 from 11:30, 1 000 from 23:45.
    expect_daily(
        &mut q,
        "after E3",
        &row(d1, 1_000, 10_000, at(d1, 9, 45), (3, 0, 0, 0), false, s3),
    )
    .await?;

    // D2 01:00 = end(D1) + 1 h — E4 on time for D2 brings the partition's clock
    // there, so D1 is closed when E5, late for D1, is read right after it.
    let t4 = at(d2, 1, 0);
    clock.set(t4);
    let r = publish(
        &mut client,
        vec![
            event("ev-4", PaymentCaptured, 2_000, at(d2, 0, 55)),
            event("ev-5", ChargebackOpened, 1_500, at(d1, 20, 0)),
        ],
    )
    .await?;
    let s4 = accepted("E4", &r[0], t4, p)?;
    let s5 = accepted("E5", &r[1], t4, p)?;
    assert_eq!(s5, s4 + 1, "one atomic batch, stored contiguously");
    // D1: 10 000 (09:45), 6 000 (11:30), 7 500 (20:00), 2 500 (23:45): late and restated.
    expect_daily(
        &mut q,
        "after E5",
        &row(d1, 2_500, 10_000, at(d1, 9, 45), (4, 0, 0, 1), true, s5),
    )
    .await?;
    // D2 opens at D1's closing 2 500 (E5 included), 4 500 from 00:45; open, so not restated.
    expect_daily(
        &mut q,
        "after E5",
        &row(d2, 4_500, 4_500, at(d2, 0, 45), (1, 0, 0, 0), false, s5),
    )
    .await?;

    // E6: E1 resent unchanged once JetStream's 1 s duplicate window has passed.
    // JetStream now stores it; the semantics counts it as a duplicate on D1.
    let resend_deadline = Instant::now() + Duration::from_secs(20);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s6 = loop {
        let r = publish(&mut client, vec![e1.clone()]).await?;
        match &r[0] {
            Outcome::Accepted(_) => break accepted("E6", &r[0], t4, p)?,
            Outcome::Duplicate(d) if d.sequence == s1 => {
                // JetStream purges expired ids lazily: try again a little later.
                anyhow::ensure!(
                    Instant::now() < resend_deadline,
                    "E1 resent 20 s after a 1 s duplicate window is still absorbed by JetStream"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => anyhow::bail!("E6 (resend of E1): unexpected {other:?}"),
        }
    };
    // E7: E4's id with another amount: reaches the log, counted as a conflict on D2.
    let r = publish(
        &mut client,
        vec![event("ev-4", PaymentCaptured, 2_500, at(d2, 0, 55))],
    )
    .await?;
    let s7 = accepted("E7", &r[0], t4, p)?;
    assert!(s5 < s6 && s6 < s7, "sequences grow: {s5} {s6} {s7}");
    expect_daily(
        &mut q,
        "after E6",
        &row(d1, 2_500, 10_000, at(d1, 9, 45), (4, 1, 0, 1), true, s6),
    )
    .await?;
    expect_daily(
        &mut q,
        "after E7",
        &row(d2, 4_500, 4_500, at(d2, 0, 45), (1, 0, 1, 0), false, s7),
    )
    .await?;

    // A day passes without events: D3 01:00 = end(D2) + 1 h. Only a heartbeat can
    // move the partition's clock there; wait until it is in the log and applied.
    let t5 = at(d3, 1, 0);
    clock.set(t5);
    let heartbeat_deadline = Instant::now() + Duration::from_secs(20);
    let heartbeat = loop {
        let log = read_log(&nats_url).await?;
        if let Some(hb) = log.iter().find(|e| {
            e.subject == event_subject(p) && e.is_heartbeat() && e.record.ingest_time_us == t5
        }) {
            break hb.seq;
        }
        anyhow::ensure!(
            Instant::now() < heartbeat_deadline,
            "no heartbeat at the injected clock {t5} in partition {p} within 20 s; the partition's last records: {:?}",
            log.iter()
                .filter(|e| e.partition() == Some(p))
                .rev()
                .take(3)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        heartbeat > s7,
        "the heartbeat {heartbeat} follows the last event {s7}"
    );
    let applied_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lag = q
            .get_current_exposure(v1::GetCurrentExposureRequest {
                merchant_id: MERCHANT.to_string(),
            })
            .await?
            .into_inner()
            .provenance
            .and_then(|p| p.stream_lag)
            .unwrap_or_default();
        assert_eq!(
            lag.partition, p,
            "stream lag names the merchant's partition"
        );
        if lag.known && lag.applied_sequence >= heartbeat {
            break;
        }
        anyhow::ensure!(
            Instant::now() < applied_deadline,
            "the projector did not report the heartbeat {heartbeat} applied within 20 s: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // E8, late for D2: the last event read before it was at D2 01:00, so only the
    // heartbeat closed D2; it is restated. E9 on time for D3.
    let r = publish(
        &mut client,
        vec![event("ev-8", RefundIssued, 3_000, at(d2, 22, 0))],
    )
    .await?;
    let s8 = accepted("E8", &r[0], t5, p)?;
    let r = publish(
        &mut client,
        vec![event("ev-9", SettlementReceived, 8_000, at(d3, 0, 50))],
    )
    .await?;
    let s9 = accepted("E9", &r[0], t5, p)?;
    assert!(
        heartbeat < s8 && s8 < s9,
        "sequences grow: {heartbeat} {s8} {s9}"
    );

    // The final rows, every field by hand.
    let day1 = expect_daily(
        &mut q,
        "final",
        &row(d1, 2_500, 10_000, at(d1, 9, 45), (4, 1, 0, 1), true, s6),
    )
    .await?;
    // D2: opens at 2 500, 4 500 from 00:45, 1 500 from 22:00.
    let day2 = expect_daily(
        &mut q,
        "final",
        &row(d2, 1_500, 4_500, at(d2, 0, 45), (2, 0, 1, 1), true, s8),
    )
    .await?;
    // D3: opens at 1 500 (the peak, at bucket 0), −6 500 from 00:45.
    let day3 = expect_daily(
        &mut q,
        "final",
        &row(d3, -6_500, 1_500, at(d3, 0, 0), (1, 0, 0, 0), false, s9),
    )
    .await?;
    let current = expect_current(
        &mut q,
        &CurrentRow {
            merchant_id: MERCHANT.to_string(),
            currency: Currency::USD,
            balance_minor: -6_500,
            last_event_time_us: at(d3, 0, 50),
            applied: 7,
            duplicates: 1,
            conflicts: 1,
            late: 2,
            too_old: 0,
            log_position: s9,
            semantics_version: SEMANTICS_VERSION,
        },
    )
    .await?;

    // Provenance: stream rows, provisional, restated as the rows say.
    for (exposure, restated, position) in [(&day1, true, s6), (&day2, true, s8), (&day3, false, s9)]
    {
        let provenance = exposure.provenance.clone().unwrap_or_default();
        assert_eq!(
            provenance.source,
            v1::Source::Stream as i32,
            "{}",
            exposure.day
        );
        assert!(provenance.provisional, "{}: provisional", exposure.day);
        assert_eq!(provenance.restated, restated, "{}: restated", exposure.day);
        assert_eq!(provenance.log_position, position, "{}", exposure.day);
        assert_eq!(provenance.semantics_version, SEMANTICS_VERSION);
    }
    let provenance = current.provenance.unwrap_or_default();
    assert_eq!(provenance.log_position, s9);
    assert_eq!(provenance.version_key, settings.version_key());

    // The log holds exactly the nine facts of the merchant, in this order, besides heartbeats.
    let log = read_log(&nats_url).await?;
    let facts: Vec<u64> = log
        .iter()
        .filter(|e| !e.is_heartbeat())
        .map(|e| e.seq)
        .collect();
    assert_eq!(facts, vec![s1, s2, s3, s4, s5, s6, s7, s8, s9]);
    assert!(
        log.iter().all(|e| e.partition().is_some()),
        "only partition subjects"
    );

    // A clean stop of the in-process ingest.
    drop(client);
    let _ = stop_ingest.send(());
    tokio::time::timeout(Duration::from_secs(20), ingest)
        .await
        .map_err(|_| anyhow::anyhow!("ingest did not stop within 20 s"))??
        .map_err(|e| anyhow::anyhow!("ingest stopped with an error: {e:#}"))?;
    Ok(())
}
