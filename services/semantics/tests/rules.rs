//! Hand-written checks of the rules R1-R10 of docs/semantics.md, one or more per rule.
//!
//! Every expected row below is a literal worked out by hand from the rules, never
//! produced by the crate: the crate cannot be its own oracle. Times are built from
//! `T0` = 2024-03-01T00:00:00Z (`Day(19_783)`) for readability; the expected
//! `peak_bucket_start_us` values are spelled out as literal microseconds.

use payledger_semantics::{Currency, MICROS_PER_DAY};
use payledger_semantics::{
    CurrencyError, CurrentRow, DailyRow, Day, DayParseError, DimOutcome, DimensionBook,
    DimensionError, EventKind, Exposure, Fact, FactError, FxRecord, FxUsed, Held, KINDS,
    MAX_EFFECTIVE_DAY, Overflow, PartitionState, Rate, RateError, Record, RecordBody, Reporting,
    RiskRecord, RiskUsed, SEMANTICS_VERSION, STATE_FORMAT, SemanticsError, Settings, SettingsError,
    Status, StreamSettings, Touched, check_event_time, fnv1a_64, partition_of, to_reporting,
};

use EventKind::{
    ChargebackOpened, ChargebackReversed, Correction, PaymentCaptured, RefundIssued,
    SettlementReceived,
};

// ---------------------------------------------------------------------------
// Helpers: building records and rows. None of them computes an expectation.

/// 2024-03-01T00:00:00Z.
const T0: i64 = 1_709_251_200_000_000;
const D0: i32 = 19_783;
const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
/// The default dedup horizon H: 35 days.
const H: i64 = 35 * DAY;

/// `T0 + d days + h hours + m minutes`.
fn at(d: i64, h: i64, m: i64) -> i64 {
    T0 + d * DAY + h * HOUR + m * MIN
}

fn cur(code: &str) -> Currency {
    Currency::parse(code).unwrap()
}

fn fact(id: &str, merchant: &str, kind: EventKind, amount: i64, currency: &str, t: i64) -> Fact {
    Fact {
        event_id: id.to_string(),
        merchant_id: merchant.to_string(),
        kind,
        amount_minor: amount,
        currency: cur(currency),
        event_time_us: t,
        corrects_event_id: None,
    }
}

fn correction(id: &str, merchant: &str, amount: i64, currency: &str, t: i64, target: &str) -> Fact {
    Fact {
        corrects_event_id: Some(target.to_string()),
        ..fact(id, merchant, Correction, amount, currency, t)
    }
}

fn pay(id: &str, merchant: &str, amount: i64, currency: &str, t: i64) -> Fact {
    fact(id, merchant, PaymentCaptured, amount, currency, t)
}

fn rec(seq: u64, ingest_time_us: i64, fact: Fact) -> Record {
    Record {
        seq,
        ingest_time_us,
        body: RecordBody::Fact(fact),
    }
}

fn heartbeat(seq: u64, ingest_time_us: i64) -> Record {
    Record {
        seq,
        ingest_time_us,
        body: RecordBody::Heartbeat,
    }
}

/// The partition state owning `merchant`.
struct Part {
    st: PartitionState,
}

impl Part {
    fn of(merchant: &str) -> Part {
        Part::with(Settings::default(), merchant)
    }

    fn with(settings: Settings, merchant: &str) -> Part {
        let p = partition_of(merchant, settings.partitions);
        Part {
            st: PartitionState::new(p, settings),
        }
    }

    fn fact(&mut self, seq: u64, ingest: i64, fact: Fact) -> Status {
        self.st.apply(&rec(seq, ingest, fact)).unwrap().status
    }

    fn heartbeat(&mut self, seq: u64, ingest: i64) -> Status {
        self.st.apply(&heartbeat(seq, ingest)).unwrap().status
    }

    fn row(&self, merchant: &str, day: i32, currency: &str) -> DailyRow {
        self.st
            .daily_rows()
            .into_iter()
            .find(|r| r.merchant_id == merchant && r.day == Day(day) && r.currency == cur(currency))
            .unwrap_or_else(|| panic!("no row ({merchant}, {day}, {currency})"))
    }

    fn current(&self, merchant: &str, currency: &str) -> CurrentRow {
        self.st.current_row(merchant, cur(currency)).unwrap()
    }
}

/// Counts on a row: applied, duplicates, conflicts, late.
#[derive(Clone, Copy)]
struct Counts(u64, u64, u64, u64);

#[allow(clippy::too_many_arguments)]
fn daily(
    merchant: &str,
    day: i32,
    currency: &str,
    closing_minor: i128,
    peak_minor: i128,
    peak_bucket_start_us: i64,
    counts: Counts,
    restated: bool,
    log_position: u64,
) -> DailyRow {
    DailyRow {
        merchant_id: merchant.to_string(),
        day: Day(day),
        currency: cur(currency),
        closing_minor,
        peak_minor,
        peak_bucket_start_us,
        applied: counts.0,
        duplicates: counts.1,
        conflicts: counts.2,
        late: counts.3,
        restated,
        log_position,
        semantics_version: SEMANTICS_VERSION,
    }
}

fn current(
    merchant: &str,
    currency: &str,
    balance_minor: i128,
    last_event_time_us: i64,
    counts: Counts,
    log_position: u64,
) -> CurrentRow {
    CurrentRow {
        merchant_id: merchant.to_string(),
        currency: cur(currency),
        balance_minor,
        last_event_time_us,
        applied: counts.0,
        duplicates: counts.1,
        conflicts: counts.2,
        late: counts.3,
        too_old: 0,
        log_position,
        semantics_version: SEMANTICS_VERSION,
    }
}

// ---------------------------------------------------------------------------
// Rule 1: identity.

#[test]
fn rule1_identity_first_applied_wins() {
    let mut p = Part::of("m1");
    assert_eq!(
        p.fact(1, at(0, 10, 1), pay("e1", "m1", 1000, "USD", at(0, 10, 0))),
        Status::Applied
    );
    assert_eq!(
        p.fact(2, at(0, 10, 2), pay("e1", "m1", 5000, "USD", at(0, 10, 0))),
        Status::Conflict
    );
    // Compared with the first applied event, not with the last one read.
    assert_eq!(
        p.fact(
            3,
            at(0, 10, 3),
            fact("e1", "m1", RefundIssued, 1000, "USD", at(0, 10, 0))
        ),
        Status::Conflict
    );
    assert_eq!(
        p.fact(4, at(0, 10, 4), pay("e1", "m1", 1000, "USD", at(0, 10, 0))),
        Status::Duplicate
    );
    assert_eq!(
        p.st.daily_rows(),
        vec![daily(
            "m1",
            D0,
            "USD",
            1000,
            1000,
            1_709_287_200_000_000,
            Counts(1, 1, 2, 0),
            false,
            4
        )]
    );
    assert_eq!(
        p.current("m1", "USD"),
        current(
            "m1",
            "USD",
            1000,
            1_709_287_200_000_000,
            Counts(1, 1, 2, 0),
            4
        )
    );
}

#[test]
fn rule1_identity_includes_the_merchant() {
    // m3 and m10 share partition 1 of 16.
    assert_eq!(partition_of("m3", 16), 1);
    assert_eq!(partition_of("m10", 16), 1);
    let mut p = Part::of("m3");
    assert_eq!(
        p.fact(1, at(0, 10, 1), pay("e1", "m3", 100, "USD", at(0, 10, 0))),
        Status::Applied
    );
    assert_eq!(
        p.fact(2, at(0, 10, 2), pay("e1", "m10", 100, "USD", at(0, 10, 0))),
        Status::Applied
    );
    assert_eq!(p.current("m3", "USD").balance_minor, 100);
    assert_eq!(p.current("m10", "USD").balance_minor, 100);
}

#[test]
fn rule1_same_content_is_duplicate_counted_on_own_day() {
    let mut p = Part::of("m1");
    let e1 = pay("e1", "m1", 1000, "USD", at(0, 10, 0));
    assert_eq!(p.fact(1, at(0, 10, 1), e1.clone()), Status::Applied);
    assert_eq!(
        p.fact(2, at(1, 9, 0), pay("e2", "m1", 300, "USD", at(1, 8, 50))),
        Status::Applied
    );
    // D0 is closed by now (at(1,9,0) >= end of D0 + 1 h), yet a duplicate never
    // restates, and although it is read 23 h after its event time it is not late.
    let out = p.st.apply(&rec(3, at(1, 9, 5), e1)).unwrap();
    assert_eq!(out.status, Status::Duplicate);
    assert_eq!(
        out.touched,
        Some(Touched {
            currency: cur("USD"),
            day: Day(D0),
            balances_changed: false
        })
    );
    assert_eq!(
        p.st.daily_rows(),
        vec![
            daily(
                "m1",
                D0,
                "USD",
                1000,
                1000,
                1_709_287_200_000_000,
                Counts(1, 1, 0, 0),
                false,
                3
            ),
            daily(
                "m1",
                D0 + 1,
                "USD",
                1300,
                1300,
                1_709_369_100_000_000,
                Counts(1, 0, 0, 0),
                false,
                2
            ),
        ]
    );
    assert_eq!(
        p.current("m1", "USD"),
        current(
            "m1",
            "USD",
            1300,
            1_709_369_400_000_000,
            Counts(2, 1, 0, 0),
            3
        )
    );
}

#[test]
fn rule1_other_content_is_conflict() {
    let original = pay("e1", "m1", 1000, "USD", at(0, 10, 0));
    let variants = [
        Fact {
            kind: ChargebackOpened,
            ..original.clone()
        },
        Fact {
            amount_minor: 1001,
            ..original.clone()
        },
        Fact {
            currency: cur("EUR"),
            ..original.clone()
        },
        Fact {
            event_time_us: original.event_time_us + 1,
            ..original.clone()
        },
    ];
    for variant in variants {
        let mut p = Part::of("m1");
        assert_eq!(p.fact(1, at(0, 10, 1), original.clone()), Status::Applied);
        assert_eq!(
            p.fact(2, at(0, 10, 2), variant.clone()),
            Status::Conflict,
            "{variant:?}"
        );
        assert_eq!(p.current("m1", "USD").balance_minor, 1000);
    }

    // A correction's target is content too.
    let c1 = correction("c1", "m1", -50, "USD", at(0, 11, 0), "e1");
    let mut p = Part::of("m1");
    assert_eq!(p.fact(1, at(0, 11, 1), c1.clone()), Status::Applied);
    assert_eq!(p.fact(2, at(0, 11, 2), c1.clone()), Status::Duplicate);
    let retargeted = Fact {
        corrects_event_id: Some("e2".into()),
        ..c1
    };
    assert_eq!(p.fact(3, at(0, 11, 3), retargeted), Status::Conflict);
    assert_eq!(
        p.current("m1", "USD"),
        current(
            "m1",
            "USD",
            -50,
            1_709_290_800_000_000,
            Counts(1, 1, 1, 0),
            3
        )
    );
}

#[test]
fn rule1_conflict_is_counted_on_its_own_day_and_currency() {
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("e1", "m1", 1000, "USD", at(0, 10, 0)));
    let out =
        p.st.apply(&rec(
            2,
            at(1, 0, 21),
            pay("e1", "m1", 1000, "EUR", at(1, 0, 20)),
        ))
        .unwrap();
    assert_eq!(out.status, Status::Conflict);
    assert_eq!(
        out.touched,
        Some(Touched {
            currency: cur("EUR"),
            day: Day(D0 + 1),
            balances_changed: false
        })
    );
    assert_eq!(
        p.st.daily_rows(),
        vec![
            daily(
                "m1",
                D0,
                "USD",
                1000,
                1000,
                1_709_287_200_000_000,
                Counts(1, 0, 0, 0),
                false,
                1
            ),
            daily(
                "m1",
                D0 + 1,
                "EUR",
                0,
                0,
                1_709_337_600_000_000,
                Counts(0, 0, 1, 0),
                false,
                2
            ),
        ]
    );
    assert_eq!(
        p.st.current_rows(),
        vec![
            current("m1", "EUR", 0, 0, Counts(0, 0, 1, 0), 2),
            current(
                "m1",
                "USD",
                1000,
                1_709_287_200_000_000,
                Counts(1, 0, 0, 0),
                1
            ),
        ]
    );
}

// ---------------------------------------------------------------------------
// Rule 2: dedup horizon.

#[test]
fn rule2_identity_expires_after_horizon() {
    let e = at(0, 10, 0);
    let e1 = pay("e1", "m1", 1000, "USD", e);
    let mut p = Part::of("m1");
    assert_eq!(p.fact(1, at(0, 10, 1), e1.clone()), Status::Applied);
    // The merchant's clock reaches exactly E + H: still remembered.
    assert_eq!(
        p.fact(2, e + H, pay("e2", "m1", 1, "USD", e + H - MIN)),
        Status::Applied
    );
    assert_eq!(p.fact(3, e + H, e1.clone()), Status::Duplicate);
    // One microsecond more and the identity has expired.
    assert_eq!(
        p.fact(4, e + H + 1, pay("e3", "m1", 1, "USD", e + H)),
        Status::Applied
    );
    // Its own age is exactly H, so ingest accepted it: it is new.
    assert_eq!(p.fact(5, e + H, e1), Status::Applied);
    assert_eq!(
        p.current("m1", "USD"),
        current(
            "m1",
            "USD",
            2002,
            1_712_311_200_000_000,
            Counts(4, 1, 0, 1),
            5
        )
    );
    // D0 was closed when seq 5 was read: restated, and late (H old).
    assert_eq!(
        p.row("m1", D0, "USD"),
        daily(
            "m1",
            D0,
            "USD",
            2000,
            2000,
            1_709_287_200_000_000,
            Counts(2, 1, 0, 1),
            true,
            5
        )
    );
}

#[test]
fn rule2_expiry_uses_ingest_time_before_the_event() {
    let e = at(0, 10, 0);
    let e1 = pay("e1", "m1", 1000, "USD", e);
    let mut p = Part::of("m1");
    assert_eq!(p.fact(1, at(0, 10, 1), e1.clone()), Status::Applied);
    // Its own ingest_time is past E + H, but the clock before it is not.
    assert_eq!(p.fact(2, e + H + 10, e1.clone()), Status::Duplicate);
    // Now the clock read so far is past E + H.
    assert_eq!(p.fact(3, e + H + 10, e1), Status::Applied);
    assert_eq!(p.current("m1", "USD").balance_minor, 2000);
}

#[test]
fn rule2_expiry_clock_is_the_merchants_own() {
    let e = at(0, 10, 0);
    let e1 = pay("e1", "m3", 100, "USD", e);
    let mut p = Part::of("m3");
    assert_eq!(p.fact(1, at(0, 10, 1), e1.clone()), Status::Applied);
    // A heartbeat and another merchant of the same partition move the partition's
    // clock far past E + H, not m3's.
    assert_eq!(p.heartbeat(2, e + H + 100), Status::Heartbeat);
    assert_eq!(
        p.fact(3, e + H + 100, pay("x1", "m10", 5, "USD", e + H + 50)),
        Status::Applied
    );
    assert_eq!(p.fact(4, e + H + 100, e1), Status::Duplicate);
}

#[test]
fn rule2_expired_identities_are_dropped_from_memory() {
    let e = at(0, 10, 0);
    let mut p = Part::of("m1");
    for i in 0..60u64 {
        let id = format!("old-{i}");
        assert_eq!(
            p.fact(i + 1, at(0, 10, 1), pay(&id, "m1", 1, "USD", e)),
            Status::Applied
        );
    }
    for i in 0..5u64 {
        let id = format!("new-{i}");
        assert_eq!(
            p.fact(61 + i, e + H + 1, pay(&id, "m1", 1, "USD", e + H)),
            Status::Applied
        );
        if i == 3 {
            assert_eq!(p.st.identities_remembered(), 64);
        }
    }
    // The 65th identity triggered a prune: the 60 old ones had expired.
    assert_eq!(p.st.identities_remembered(), 5);
    assert_eq!(
        p.fact(66, e + H + 1, pay("old-0", "m1", 1, "USD", e)),
        Status::Applied
    );
    assert_eq!(
        p.fact(67, e + H + 1, pay("new-0", "m1", 1, "USD", e + H)),
        Status::Duplicate
    );
}

#[test]
fn rule2_prune_keeps_identities_at_exactly_the_horizon() {
    let e = at(0, 10, 0);
    let mut p = Part::of("m1");
    for i in 0..64u64 {
        let id = format!("old-{i}");
        p.fact(i + 1, at(0, 10, 1), pay(&id, "m1", 1, "USD", e));
    }
    // The 65th identity prunes with the merchant's clock at exactly E + H:
    // the old ones have not expired yet, so they stay.
    p.fact(65, e + H, pay("new-0", "m1", 1, "USD", e + H));
    assert_eq!(p.st.identities_remembered(), 65);
    assert_eq!(
        p.fact(66, e + H, pay("old-0", "m1", 1, "USD", e)),
        Status::Duplicate
    );
}

#[test]
fn rule2_ingest_rejects_events_beyond_horizon_or_skew() {
    let s = Settings::default().stream();
    let ingest = at(0, 12, 0);
    assert_eq!(check_event_time(ingest, ingest, &s), Ok(()));
    assert_eq!(check_event_time(ingest + 300_000_000, ingest, &s), Ok(()));
    let ahead = check_event_time(ingest + 300_000_001, ingest, &s).unwrap_err();
    assert_eq!(
        ahead,
        FactError::InFuture {
            ahead_us: 300_000_001,
            skew_us: 300_000_000
        }
    );
    assert_eq!(ahead.field(), "event_time_us");
    assert_eq!(
        check_event_time(ingest - 3_024_000_000_000, ingest, &s),
        Ok(())
    );
    let old = check_event_time(ingest - 3_024_000_000_001, ingest, &s).unwrap_err();
    assert_eq!(
        old,
        FactError::BeyondHorizon {
            age_us: 3_024_000_000_001,
            horizon_us: 3_024_000_000_000
        }
    );
    assert_eq!(old.field(), "event_time_us");
    assert!(old.to_string().contains("submit a CORRECTION"));
}

// ---------------------------------------------------------------------------
// Rule 3: lateness.

#[test]
fn rule3_late_event_counted() {
    let mut p = Part::of("m1");
    // Exactly the allowed lateness: not late.
    assert_eq!(
        p.fact(1, at(0, 11, 10), pay("e1", "m1", 100, "USD", at(0, 10, 10))),
        Status::Applied
    );
    // One microsecond more: late.
    assert_eq!(
        p.fact(
            2,
            at(0, 11, 10) + 1,
            pay("e2", "m1", 200, "USD", at(0, 10, 10))
        ),
        Status::Applied
    );
    // A duplicate is never counted late.
    assert_eq!(
        p.fact(3, at(0, 11, 20), pay("e2", "m1", 200, "USD", at(0, 10, 10))),
        Status::Duplicate
    );
    // Late across midnight, before D0 closes: late but not restated.
    assert_eq!(
        p.fact(4, at(1, 0, 55), pay("e3", "m1", 50, "USD", at(0, 23, 50))),
        Status::Applied
    );
    assert_eq!(
        p.st.daily_rows(),
        vec![daily(
            "m1",
            D0,
            "USD",
            350,
            350,
            1_709_336_700_000_000,
            Counts(3, 1, 0, 2),
            false,
            4
        )]
    );
    assert_eq!(
        p.current("m1", "USD"),
        current(
            "m1",
            "USD",
            350,
            1_709_337_000_000_000,
            Counts(3, 1, 0, 2),
            4
        )
    );
}

// ---------------------------------------------------------------------------
// Rule 4: balances.

#[test]
fn rule4_signed_deltas_of_the_kinds() {
    assert_eq!(PaymentCaptured.signed_delta(5), 5);
    assert_eq!(RefundIssued.signed_delta(5), -5);
    assert_eq!(SettlementReceived.signed_delta(5), -5);
    assert_eq!(ChargebackOpened.signed_delta(5), 5);
    assert_eq!(ChargebackReversed.signed_delta(5), -5);
    assert_eq!(Correction.signed_delta(5), 5);
    assert_eq!(Correction.signed_delta(-7), -7);
    assert_eq!(
        PaymentCaptured.signed_delta(i64::MAX),
        9_223_372_036_854_775_807
    );
    for kind in EventKind::ALL {
        assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        assert_eq!(EventKind::from_wire_code(kind.wire_code()), Some(kind));
    }
    assert_eq!(EventKind::parse("payment_captured"), None);
    assert_eq!(EventKind::from_wire_code(0), None);
    assert_eq!(EventKind::ALL.len(), KINDS.len());
    assert_eq!(
        EventKind::names(),
        "PAYMENT_CAPTURED, REFUND_ISSUED, SETTLEMENT_RECEIVED, CHARGEBACK_OPENED, CHARGEBACK_REVERSED, CORRECTION"
    );
}

#[test]
fn facts_a_correction_of_itself_is_refused_at_ingest_and_folds_if_already_logged() {
    let selfish = correction("c1", "m1", 5, "USD", at(0, 10, 0), "c1");
    assert_eq!(selfish.validate(), Ok(()));
    assert_eq!(selfish.validate_new(), Err(FactError::CorrectsItself));
    assert_eq!(FactError::CorrectsItself.field(), "corrects_event_id");
    assert_eq!(
        correction("c2", "m1", 5, "USD", at(0, 10, 0), "c1").validate_new(),
        Ok(())
    );
    let mut p = Part::of("m1");
    assert_eq!(p.fact(1, at(0, 10, 1), selfish), Status::Applied);
    assert_eq!(p.row("m1", D0, "USD").closing_minor, 5);
}

#[test]
fn rule4_balances_exact_per_currency() {
    let mut p = Part::of("m1");
    let log = [
        pay("e1", "m1", 10_000, "USD", at(0, 1, 0)),
        fact("e2", "m1", RefundIssued, 2_500, "USD", at(0, 2, 0)),
        fact("e3", "m1", SettlementReceived, 5_000, "USD", at(0, 3, 0)),
        fact("e4", "m1", ChargebackOpened, 700, "USD", at(0, 4, 0)),
        fact("e5", "m1", ChargebackReversed, 200, "USD", at(0, 5, 0)),
        correction("c1", "m1", -1, "USD", at(0, 6, 0), "e1"),
        correction("c2", "m1", 11, "USD", at(0, 6, 30), "e2"),
        pay("j1", "m1", 1500, "JPY", at(0, 7, 0)),
        fact("j2", "m1", RefundIssued, 2000, "JPY", at(0, 8, 0)),
        pay("x1", "m1", i64::MAX, "EUR", at(0, 9, 0)),
        pay("x2", "m1", i64::MAX, "EUR", at(0, 9, 1)),
    ];
    for (i, f) in log.into_iter().enumerate() {
        let ingest = f.event_time_us + MIN;
        assert_eq!(p.fact(i as u64 + 1, ingest, f), Status::Applied);
    }
    assert_eq!(
        p.st.daily_rows(),
        vec![
            daily(
                "m1",
                D0,
                "EUR",
                18_446_744_073_709_551_614,
                18_446_744_073_709_551_614,
                1_709_283_600_000_000,
                Counts(2, 0, 0, 0),
                false,
                11
            ),
            daily(
                "m1",
                D0,
                "JPY",
                -500,
                1500,
                1_709_276_400_000_000,
                Counts(2, 0, 0, 0),
                false,
                9
            ),
            daily(
                "m1",
                D0,
                "USD",
                3010,
                10_000,
                1_709_254_800_000_000,
                Counts(7, 0, 0, 0),
                false,
                7
            ),
        ]
    );
    assert_eq!(
        p.st.current_rows(),
        vec![
            current(
                "m1",
                "EUR",
                18_446_744_073_709_551_614,
                1_709_283_660_000_000,
                Counts(2, 0, 0, 0),
                11
            ),
            current(
                "m1",
                "JPY",
                -500,
                1_709_280_000_000_000,
                Counts(2, 0, 0, 0),
                9
            ),
            current(
                "m1",
                "USD",
                3010,
                1_709_274_600_000_000,
                Counts(7, 0, 0, 0),
                7
            ),
        ]
    );
}

#[test]
fn rule4_overflow_is_an_error_and_changes_nothing() {
    // Reaching DECIMAL(38,0) takes ~10^19 events; start from a checkpoint whose
    // gross turnover is 50 short of the limit instead.
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("e1", "m1", 100, "USD", at(0, 10, 0)));
    let json = serde_json::to_string(&p.st).unwrap();
    assert!(json.contains("\"gross\":100,"), "{json}");
    let json = json.replace(
        "\"gross\":100,",
        "\"gross\":99999999999999999999999999999999999950,",
    );
    let mut st: PartitionState = serde_json::from_str(&json).unwrap();
    let (daily_before, current_before) = (st.daily_rows(), st.current_rows());

    let err = st
        .apply(&rec(
            2,
            at(0, 10, 2),
            pay("e2", "m1", 100, "USD", at(0, 10, 0)),
        ))
        .unwrap_err();
    assert_eq!(
        err,
        SemanticsError::Overflow {
            merchant_id: "m1".into(),
            currency: cur("USD"),
            seq: 2
        }
    );
    assert_eq!(st.daily_rows(), daily_before);
    assert_eq!(st.current_rows(), current_before);
    assert_eq!(st.last_seq(), 1);
    assert_eq!(st.identities_remembered(), 1);

    // Up to exactly 10^38 - 1 is fine; the failed e2 was not remembered.
    let ok = st
        .apply(&rec(
            2,
            at(0, 10, 2),
            pay("e2", "m1", 49, "USD", at(0, 10, 0)),
        ))
        .unwrap();
    assert_eq!(ok.status, Status::Applied);
    assert_eq!(st.current_row("m1", cur("USD")).unwrap().balance_minor, 149);
}

// ---------------------------------------------------------------------------
// Rule 5: buckets, days and closure.

#[test]
fn rule5_day_closes_after_lateness() {
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("e1", "m1", 1000, "USD", at(0, 10, 0)));
    p.fact(2, at(1, 1, 0) - 1, pay("e2", "m1", 50, "USD", at(1, 0, 30)));
    // The clock read so far is one microsecond short of end of D0 + 1 h.
    p.fact(3, at(1, 1, 0), pay("e3", "m1", 200, "USD", at(0, 12, 0)));
    assert!(!p.row("m1", D0, "USD").restated);
    // Now it has reached it: D0 is closed.
    p.fact(
        4,
        at(1, 1, 0) + 5 * SEC,
        pay("e4", "m1", 300, "USD", at(0, 13, 0)),
    );
    assert_eq!(
        p.st.daily_rows(),
        vec![
            daily(
                "m1",
                D0,
                "USD",
                1500,
                1500,
                1_709_298_000_000_000,
                Counts(3, 0, 0, 2),
                true,
                4
            ),
            daily(
                "m1",
                D0 + 1,
                "USD",
                1550,
                1550,
                1_709_339_400_000_000,
                Counts(1, 0, 0, 0),
                false,
                4
            ),
        ]
    );
}

#[test]
fn rule5_heartbeat_closes_quiet_partition() {
    for (beat, restated) in [(at(1, 1, 0), true), (at(1, 1, 0) - 1, false)] {
        let mut p = Part::of("m1");
        p.fact(1, at(0, 10, 1), pay("e1", "m1", 1000, "USD", at(0, 10, 0)));
        let rows = p.st.daily_rows();
        let out = p.st.apply(&heartbeat(2, beat)).unwrap();
        assert_eq!(out.status, Status::Heartbeat);
        assert_eq!(out.touched, None);
        assert_eq!(p.st.daily_rows(), rows, "a heartbeat changes no row");
        assert_eq!(p.st.last_seq(), 2);
        p.fact(
            3,
            at(1, 1, 0) + 30 * SEC,
            pay("e2", "m1", 1, "USD", at(0, 11, 0)),
        );
        assert_eq!(
            p.st.daily_rows(),
            vec![daily(
                "m1",
                D0,
                "USD",
                1001,
                1001,
                1_709_290_800_000_000,
                Counts(2, 0, 0, 1),
                restated,
                3
            )]
        );
    }
}

#[test]
fn rule5_closure_ignores_the_event_own_ingest_time() {
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("e1", "m1", 1000, "USD", at(0, 10, 0)));
    p.fact(2, at(1, 5, 0), pay("e2", "m1", 10, "USD", at(0, 11, 0)));
    assert!(!p.row("m1", D0, "USD").restated);
    p.fact(3, at(1, 5, 0), pay("e3", "m1", 20, "USD", at(0, 11, 30)));
    assert_eq!(
        p.st.daily_rows(),
        vec![daily(
            "m1",
            D0,
            "USD",
            1030,
            1030,
            1_709_292_600_000_000,
            Counts(3, 0, 0, 2),
            true,
            3
        )]
    );
}

#[test]
fn rule5_closure_is_per_partition_and_counts_every_record_read() {
    assert_eq!(partition_of("m1", 16), 11);
    let mut x = Exposure::new(Settings::default());
    let mut apply = |seq, ingest, f: Fact| x.apply_fact(&rec(seq, ingest, f)).unwrap().status;
    apply(1, at(0, 10, 1), pay("e1", "m3", 100, "USD", at(0, 10, 0)));
    // Partition 11's clock passes the end of D0 + 1 h; partition 1's does not.
    apply(2, at(1, 2, 0), pay("y1", "m1", 1, "USD", at(1, 2, 0)));
    apply(3, at(0, 23, 0), pay("e2", "m3", 10, "USD", at(0, 9, 0)));
    apply(4, at(0, 23, 30), pay("x1", "m10", 7, "USD", at(0, 20, 0)));
    // A duplicate of another merchant moves partition 1's clock too.
    assert_eq!(
        apply(5, at(1, 1, 0), pay("x1", "m10", 7, "USD", at(0, 20, 0))),
        Status::Duplicate
    );
    apply(6, at(1, 1, 0), pay("e3", "m3", 1000, "USD", at(0, 12, 0)));
    assert_eq!(
        x.daily_rows(),
        vec![
            daily(
                "m1",
                D0 + 1,
                "USD",
                1,
                1,
                1_709_344_800_000_000,
                Counts(1, 0, 0, 0),
                false,
                2
            ),
            daily(
                "m10",
                D0,
                "USD",
                7,
                7,
                1_709_323_200_000_000,
                Counts(1, 1, 0, 1),
                false,
                5
            ),
            daily(
                "m3",
                D0,
                "USD",
                1110,
                1110,
                1_709_294_400_000_000,
                Counts(3, 0, 0, 2),
                true,
                6
            ),
        ]
    );
}

#[test]
fn rule5_buckets_are_fifteen_minutes_of_event_time() {
    let mut p = Part::of("m1");
    // 00:14:59.999999 is bucket 0, 00:15:00 is bucket 1.
    p.fact(
        1,
        at(0, 0, 16),
        pay("e1", "m1", 100, "USD", at(0, 0, 15) - 1),
    );
    p.fact(
        2,
        at(0, 0, 16),
        fact("e2", "m1", RefundIssued, 100, "USD", at(0, 0, 15)),
    );
    assert_eq!(
        p.st.daily_rows(),
        vec![daily(
            "m1",
            D0,
            "USD",
            0,
            100,
            1_709_251_200_000_000,
            Counts(2, 0, 0, 0),
            false,
            2
        )]
    );
}

#[test]
fn rule5_bucket_index_fits_any_valid_bucket_width() {
    // One-second and one-microsecond buckets divide a day: valid settings, with
    // 86 400 and 86 400 000 000 buckets a day.
    for width in [SEC, 1] {
        let settings = Settings {
            bucket_width_us: width,
            ..Settings::default()
        };
        assert_eq!(settings.validate(), Ok(()));
        let mut p = Part::with(settings, "m1");
        p.fact(1, at(0, 23, 1), pay("e1", "m1", 100, "USD", at(0, 23, 0)));
        p.fact(
            2,
            at(0, 23, 1),
            fact("e2", "m1", RefundIssued, 100, "USD", at(0, 23, 0) + SEC),
        );
        assert_eq!(
            p.st.daily_rows(),
            vec![daily(
                "m1",
                D0,
                "USD",
                0,
                100,
                1_709_334_000_000_000,
                Counts(2, 0, 0, 0),
                false,
                2
            )],
            "bucket width {width}"
        );
    }
}

// ---------------------------------------------------------------------------
// Rule 6: daily rows.

#[test]
fn rule6_peak_and_earliest_bucket_on_ties() {
    let mut p = Part::of("m1");
    // D0: 0 -> 500 (bucket 4) -> 0 (bucket 8) -> 500 (bucket 12): earliest is 4.
    p.fact(1, at(0, 1, 11), pay("e1", "m1", 500, "USD", at(0, 1, 10)));
    p.fact(
        2,
        at(0, 2, 1),
        fact("e2", "m1", RefundIssued, 500, "USD", at(0, 2, 0)),
    );
    p.fact(3, at(0, 3, 6), pay("e3", "m1", 500, "USD", at(0, 3, 5)));
    // D1 opens at 500 but the end of bucket 0 is already 400: the opening
    // balance is not a bucket end.
    p.fact(
        4,
        at(1, 0, 6),
        fact("e4", "m1", RefundIssued, 100, "USD", at(1, 0, 5)),
    );
    // D2: +1000 and -900 inside bucket 10: only its end (500) counts.
    p.fact(5, at(2, 2, 32), pay("e5", "m1", 1000, "USD", at(2, 2, 31)));
    p.fact(
        6,
        at(2, 2, 45),
        fact("e6", "m1", RefundIssued, 900, "USD", at(2, 2, 44)),
    );
    // D3 falls below its opening: the peak is the opening at bucket 0.
    p.fact(
        7,
        at(3, 5, 1),
        fact("e7", "m1", SettlementReceived, 600, "USD", at(3, 5, 0)),
    );
    assert_eq!(
        p.st.daily_rows(),
        vec![
            daily(
                "m1",
                D0,
                "USD",
                500,
                500,
                1_709_254_800_000_000,
                Counts(3, 0, 0, 0),
                false,
                3
            ),
            daily(
                "m1",
                D0 + 1,
                "USD",
                400,
                400,
                1_709_337_600_000_000,
                Counts(1, 0, 0, 0),
                false,
                4
            ),
            daily(
                "m1",
                D0 + 2,
                "USD",
                500,
                500,
                1_709_433_000_000_000,
                Counts(2, 0, 0, 0),
                false,
                6
            ),
            daily(
                "m1",
                D0 + 3,
                "USD",
                -100,
                500,
                1_709_510_400_000_000,
                Counts(1, 0, 0, 0),
                false,
                7
            ),
        ]
    );
}

#[test]
fn rule6_row_exists_only_for_days_with_events() {
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("e1", "m1", 100, "USD", at(0, 10, 0)));
    p.fact(2, at(2, 10, 1), pay("e2", "m1", 20, "USD", at(2, 10, 0)));
    let days: Vec<Day> = p.st.daily_rows().iter().map(|r| r.day).collect();
    assert_eq!(days, vec![Day(D0), Day(D0 + 2)]);
    assert_eq!(p.row("m1", D0 + 2, "USD").closing_minor, 120);
    assert_eq!(
        p.row("m1", D0 + 2, "USD").semantics_version,
        SEMANTICS_VERSION
    );
    assert_eq!(SEMANTICS_VERSION, 2);
}

#[test]
fn rule6_restated_own_day_and_later_closed_days() {
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("a0", "m1", 100, "USD", at(0, 10, 0)));
    p.fact(2, at(1, 10, 1), pay("a1", "m1", 10, "USD", at(1, 10, 0)));
    // D0 is closed, but this event is of D2: nothing restated.
    p.fact(3, at(2, 10, 1), pay("a2", "m1", 1, "USD", at(2, 10, 0)));
    // A late EUR event of D0: its row did not exist, yet it is restated.
    p.fact(4, at(2, 10, 2), pay("b0", "m1", 5, "EUR", at(0, 12, 0)));
    p.fact(5, at(3, 0, 31), pay("a3", "m1", 1000, "USD", at(3, 0, 30)));
    // Clock: D0 and D1 closed, D2 (closes at(3,1,0)) and D3 open.
    let out =
        p.st.apply(&rec(
            6,
            at(3, 0, 40),
            pay("a4", "m1", 7, "USD", at(0, 11, 0)),
        ))
        .unwrap();
    let touched = p.st.daily_rows_touched("m1", &out.touched.unwrap());
    let summary: Vec<(Day, bool, u64)> = touched
        .iter()
        .map(|r| (r.day, r.restated, r.log_position))
        .collect();
    assert_eq!(
        summary,
        vec![
            (Day(D0), true, 6),
            (Day(D0 + 1), true, 6),
            (Day(D0 + 2), false, 6),
            (Day(D0 + 3), false, 6),
        ]
    );
    // A late event of D1 leaves D0 alone.
    p.fact(7, at(3, 0, 41), pay("a5", "m1", 3, "USD", at(1, 12, 0)));
    assert_eq!(p.row("m1", D0, "USD").log_position, 6);
    // A late event of a day without any row yet (2024-02-29).
    p.fact(8, at(3, 0, 42), pay("a6", "m1", 2, "USD", at(-1, 12, 0)));
    assert_eq!(
        p.st.daily_rows(),
        vec![
            daily(
                "m1",
                D0 - 1,
                "USD",
                2,
                2,
                1_709_208_000_000_000,
                Counts(1, 0, 0, 1),
                true,
                8
            ),
            daily(
                "m1",
                D0,
                "EUR",
                5,
                5,
                1_709_294_400_000_000,
                Counts(1, 0, 0, 1),
                true,
                4
            ),
            daily(
                "m1",
                D0,
                "USD",
                109,
                109,
                1_709_290_800_000_000,
                Counts(2, 0, 0, 1),
                true,
                8
            ),
            daily(
                "m1",
                D0 + 1,
                "USD",
                122,
                122,
                1_709_380_800_000_000,
                Counts(2, 0, 0, 1),
                true,
                8
            ),
            daily(
                "m1",
                D0 + 2,
                "USD",
                123,
                123,
                1_709_460_000_000_000,
                Counts(1, 0, 0, 0),
                false,
                8
            ),
            daily(
                "m1",
                D0 + 3,
                "USD",
                1123,
                1123,
                1_709_512_200_000_000,
                Counts(1, 0, 0, 0),
                false,
                8
            ),
        ]
    );
}

#[test]
fn rule6_log_position() {
    let mut p = Part::of("m1");
    let a = pay("a", "m1", 100, "USD", at(0, 10, 0));
    p.fact(1, at(0, 10, 1), a.clone());
    p.fact(2, at(1, 10, 1), pay("b", "m1", 100, "USD", at(1, 10, 0)));
    // A later day's event leaves earlier rows alone.
    assert_eq!(p.row("m1", D0, "USD").log_position, 1);
    p.heartbeat(3, at(1, 11, 0));
    // A duplicate and a conflict count on their own day only.
    assert_eq!(p.fact(4, at(1, 11, 1), a.clone()), Status::Duplicate);
    assert_eq!(
        p.fact(
            5,
            at(1, 11, 2),
            Fact {
                amount_minor: 999,
                ..a
            }
        ),
        Status::Conflict
    );
    assert_eq!(p.row("m1", D0, "USD").log_position, 5);
    assert_eq!(p.row("m1", D0 + 1, "USD").log_position, 2);
    // An applied event of D0 moves D1's closing balance: D1's position moves too.
    p.fact(6, at(1, 11, 3), pay("c", "m1", 1, "USD", at(0, 20, 0)));
    // Sequences need not be contiguous.
    p.fact(8, at(1, 11, 4), pay("d", "m1", 1, "EUR", at(0, 21, 0)));
    assert_eq!(
        p.st.daily_rows(),
        vec![
            daily(
                "m1",
                D0,
                "EUR",
                1,
                1,
                1_709_326_800_000_000,
                Counts(1, 0, 0, 1),
                true,
                8
            ),
            daily(
                "m1",
                D0,
                "USD",
                101,
                101,
                1_709_323_200_000_000,
                Counts(2, 1, 1, 1),
                true,
                6
            ),
            daily(
                "m1",
                D0 + 1,
                "USD",
                201,
                201,
                1_709_373_600_000_000,
                Counts(1, 0, 0, 0),
                false,
                6
            ),
        ]
    );
    assert_eq!(
        p.st.current_rows(),
        vec![
            current("m1", "EUR", 1, 1_709_326_800_000_000, Counts(1, 0, 0, 1), 8),
            current(
                "m1",
                "USD",
                201,
                1_709_373_600_000_000,
                Counts(3, 1, 1, 1),
                6
            ),
        ]
    );
}

#[test]
fn rule6_rows_touched_are_own_day_and_later_days_of_the_currency() {
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("a", "m1", 100, "USD", at(0, 10, 0)));
    p.fact(2, at(0, 10, 2), pay("b", "m1", 100, "EUR", at(0, 10, 0)));
    p.fact(3, at(1, 10, 1), pay("c", "m1", 10, "USD", at(1, 10, 0)));
    p.fact(4, at(2, 10, 1), pay("d", "m1", 1, "USD", at(2, 10, 0)));
    let out =
        p.st.apply(&rec(5, at(2, 10, 2), pay("e", "m1", 5, "USD", at(1, 9, 0))))
            .unwrap();
    let t = out.touched.unwrap();
    let rows = p.st.daily_rows_touched("m1", &t);
    let keys: Vec<(Day, i128)> = rows.iter().map(|r| (r.day, r.closing_minor)).collect();
    assert_eq!(keys, vec![(Day(D0 + 1), 115), (Day(D0 + 2), 116)]);
    let dup =
        p.st.apply(&rec(
            6,
            at(2, 10, 3),
            pay("c", "m1", 10, "USD", at(1, 10, 0)),
        ))
        .unwrap();
    let rows = p.st.daily_rows_touched("m1", &dup.touched.unwrap());
    let keys: Vec<(Day, u64, u64)> = rows
        .iter()
        .map(|r| (r.day, r.duplicates, r.log_position))
        .collect();
    assert_eq!(keys, vec![(Day(D0 + 1), 1, 6)]);
    assert_eq!(p.st.daily_rows_touched("nobody", &t), vec![]);
}

// ---------------------------------------------------------------------------
// Rule 7: current rows.

#[test]
fn rule7_current_row() {
    let mut p = Part::of("m1");
    let b = pay("b", "m1", 50, "USD", at(0, 8, 0));
    p.fact(1, at(0, 10, 1), pay("a", "m1", 100, "USD", at(0, 10, 0)));
    // An earlier event time does not move last_event_time back; 2 h 2 min: late.
    p.fact(2, at(0, 10, 2), b.clone());
    p.fact(
        3,
        at(0, 10, 3),
        fact("c", "m1", SettlementReceived, 30, "USD", at(0, 9, 30)),
    );
    // A conflict with a later event time does not move it either.
    assert_eq!(
        p.fact(4, at(0, 10, 4), pay("a", "m1", 100, "USD", at(0, 11, 0))),
        Status::Conflict
    );
    assert_eq!(p.fact(5, at(0, 10, 5), b), Status::Duplicate);
    assert_eq!(
        p.current("m1", "USD"),
        current(
            "m1",
            "USD",
            120,
            1_709_287_200_000_000,
            Counts(3, 1, 1, 1),
            5
        )
    );
    assert_eq!(p.st.current_row("m1", cur("EUR")), None);
    assert_eq!(p.st.current_row("nobody", cur("USD")), None);

    p.fact(6, at(0, 10, 6), pay("e", "m1", 5, "EUR", at(0, 10, 6)));
    // The current row spans all days.
    p.fact(7, at(1, 0, 6), pay("f", "m1", 1000, "USD", at(1, 0, 5)));
    assert_eq!(
        p.st.current_rows(),
        vec![
            current("m1", "EUR", 5, 1_709_287_560_000_000, Counts(1, 0, 0, 0), 6),
            current(
                "m1",
                "USD",
                1120,
                1_709_337_900_000_000,
                Counts(4, 1, 1, 1),
                7
            ),
        ]
    );
}

// ---------------------------------------------------------------------------
// Log positions and redelivery.

#[test]
fn apply_of_a_sequence_already_read_changes_nothing() {
    let mut p = Part::of("m1");
    p.fact(5, at(0, 10, 1), pay("a", "m1", 100, "USD", at(0, 10, 0)));
    let (daily_rows, current_rows) = (p.st.daily_rows(), p.st.current_rows());
    for record in [
        rec(5, at(0, 10, 1), pay("a", "m1", 100, "USD", at(0, 10, 0))),
        rec(4, at(0, 10, 1), pay("z", "m1", 100, "USD", at(0, 10, 0))),
        rec(1, at(5, 0, 0), pay("y", "m1", 100, "USD", at(5, 0, 0))),
        heartbeat(5, at(9, 0, 0)),
    ] {
        let out = p.st.apply(&record).unwrap();
        assert_eq!(out.status, Status::AlreadyRead);
        assert_eq!(out.touched, None);
    }
    assert_eq!(p.st.last_seq(), 5);
    assert_eq!(p.st.daily_rows(), daily_rows);
    assert_eq!(p.st.current_rows(), current_rows);
    // The heartbeat at seq 5 did not move the clock: D0 is still open.
    p.fact(6, at(0, 11, 0), pay("b", "m1", 1, "USD", at(0, 10, 30)));
    assert!(!p.row("m1", D0, "USD").restated);
}

// ---------------------------------------------------------------------------
// Rule 8: dimensions.

fn fx(code: &str, rate: &str, day: i32, version: i32) -> FxRecord {
    FxRecord {
        currency: cur(code),
        rate: Rate::parse(rate).unwrap(),
        effective_day: Day(day),
        version,
    }
}

fn risk(merchant: &str, tier: &str, bps: i32, day: i32, version: i32) -> RiskRecord {
    RiskRecord {
        merchant_id: merchant.into(),
        tier: tier.into(),
        reserve_bps: bps,
        effective_day: Day(day),
        version,
    }
}

fn closing(merchant: &str, day: i32, code: &str, closing_minor: i128) -> DailyRow {
    daily(
        merchant,
        day,
        code,
        closing_minor,
        closing_minor,
        0,
        Counts(1, 0, 0, 0),
        false,
        1,
    )
}

fn fx_used(code: &str, day: i32, version: i32, rate: &str) -> FxUsed {
    FxUsed {
        currency: cur(code),
        effective_day: Day(day),
        version,
        rate: rate.into(),
    }
}

#[test]
fn rule8_fx_latest_effective_date_highest_version() {
    let mut book = DimensionBook::default();
    book.apply_fx(1, &fx("EUR", "1.10", D0, 1));
    book.apply_fx(2, &fx("EUR", "1.20", D0, 3));
    // A lower version read later does not win.
    book.apply_fx(3, &fx("EUR", "1.15", D0, 2));
    book.apply_fx(4, &fx("EUR", "1.30", D0 + 2, 1));
    book.apply_fx(5, &fx("EUR", "9.99", D0 + 5, 1));
    book.apply_fx(6, &fx("JPY", "0.0067", D0, 1));
    assert_eq!(book.fx(cur("EUR"), Day(D0 - 1), u64::MAX), None);
    assert_eq!(
        book.fx(cur("EUR"), Day(D0), u64::MAX),
        Some(fx_used("EUR", D0, 3, "1.20"))
    );
    assert_eq!(
        book.fx(cur("EUR"), Day(D0 + 1), u64::MAX),
        Some(fx_used("EUR", D0, 3, "1.20"))
    );
    assert_eq!(
        book.fx(cur("EUR"), Day(D0 + 3), u64::MAX),
        Some(fx_used("EUR", D0 + 2, 1, "1.30"))
    );

    let rows = [
        closing("m1", D0 + 1, "EUR", 1000),
        closing("m1", D0 + 1, "JPY", 15_000),
        closing("m1", D0 + 1, "USD", 100),
    ];
    assert_eq!(
        to_reporting(&rows, &book, u64::MAX),
        Reporting {
            closing_reporting_minor: Some(11_350),
            reserve_minor: None,
            fx_used: vec![
                fx_used("EUR", D0, 3, "1.20"),
                fx_used("JPY", D0, 1, "0.0067")
            ],
            risk_used: None,
            missing_rates: vec![],
            overflow: None,
        }
    );
}

/// Converts one row of `minor` in `code` at `rate`.
fn convert(code: &str, rate: &str, minor: i128) -> Option<i128> {
    let mut book = DimensionBook::default();
    book.apply_fx(1, &fx(code, rate, D0, 1));
    to_reporting(&[closing("m1", D0, code, minor)], &book, u64::MAX).closing_reporting_minor
}

#[test]
fn rule8_half_to_even_rounding() {
    let cases: &[(&str, &str, i128, i128)] = &[
        // JPY: exponent 0, so × 100.
        ("JPY", "0.005", 1, 0),
        ("JPY", "0.005", 3, 2),
        ("JPY", "0.005", 5, 2),
        ("JPY", "0.005", 7, 4),
        ("JPY", "0.005", -1, 0),
        ("JPY", "0.005", -3, -2),
        ("JPY", "0.005", -5, -2),
        ("JPY", "0.0067", 1, 1),
        ("JPY", "0.0067", -1, -1),
        ("JPY", "0.0067", 100, 67),
        ("JPY", "0.0067", 15_000, 10_050),
        // KWD: exponent 3, so / 10.
        ("KWD", "1", 5, 0),
        ("KWD", "1", 15, 2),
        ("KWD", "1", 25, 2),
        ("KWD", "1", 14, 1),
        ("KWD", "1", 16, 2),
        ("KWD", "1", -25, -2),
        ("KWD", "1", -35, -4),
        ("KWD", "1", -14, -1),
        ("KWD", "1", -16, -2),
        ("KWD", "3.25", 1000, 325),
        ("KWD", "3.25", 1, 0),
        ("KWD", "3.25", 2, 1),
        // EUR: exponent 2, same as USD.
        ("EUR", "0.5", 1, 0),
        ("EUR", "0.5", 3, 2),
        ("EUR", "0.5", -1, 0),
        ("EUR", "0.5", -3, -2),
        ("EUR", "1.15", 10, 12),
        ("EUR", "1.25", 10, 12),
        ("EUR", "1.15", -10, -12),
        ("EUR", "1.25", -10, -12),
        ("EUR", "1.0842", 123_456, 133_851),
        ("EUR", "1", 0, 0),
        // CLF: exponent 4, so / 100.
        ("CLF", "45.2", 10_000, 4520),
        ("CLF", "45.2", 1, 0),
    ];
    for &(code, rate, minor, want) in cases {
        assert_eq!(
            convert(code, rate, minor),
            Some(want),
            "{minor} {code} at {rate}"
        );
    }

    // Each currency is rounded, then summed: 0.5 + 0.5 gives 0, not 1.
    let mut book = DimensionBook::default();
    book.apply_fx(1, &fx("EUR", "0.5", D0, 1));
    book.apply_fx(2, &fx("KWD", "1", D0, 1));
    let rows = [closing("m1", D0, "EUR", 1), closing("m1", D0, "KWD", 5)];
    assert_eq!(
        to_reporting(&rows, &book, u64::MAX).closing_reporting_minor,
        Some(0)
    );
}

#[test]
fn rule8_missing_rate_gives_absent_total() {
    let mut book = DimensionBook::default();
    book.apply_fx(1, &fx("EUR", "1.1", D0, 1));
    book.apply_risk(2, &risk("m1", "gold", 250, D0, 1));
    let rows = [
        closing("m1", D0 + 1, "EUR", 1000),
        closing("m1", D0 + 1, "JPY", 5),
        closing("m1", D0 + 1, "USD", 100),
    ];
    let r = to_reporting(&rows, &book, u64::MAX);
    assert_eq!(r.closing_reporting_minor, None);
    assert_eq!(r.reserve_minor, None);
    assert_eq!(r.missing_rates, vec![cur("JPY")]);
    assert_eq!(r.fx_used, vec![fx_used("EUR", D0, 1, "1.1")]);
    assert_eq!(
        r.risk_used,
        Some(RiskUsed {
            tier: "gold".into(),
            reserve_bps: 250,
            effective_day: Day(D0),
            version: 1
        })
    );
    // A rate effective only after the day does not count.
    let r = to_reporting(&[closing("m1", D0 - 1, "EUR", 1000)], &book, u64::MAX);
    assert_eq!(r.closing_reporting_minor, None);
    assert_eq!(r.missing_rates, vec![cur("EUR")]);
    // USD needs no record at all.
    let r = to_reporting(
        &[closing("m9", D0, "USD", 100)],
        &DimensionBook::default(),
        u64::MAX,
    );
    assert_eq!(r.closing_reporting_minor, Some(100));
    assert_eq!(r.missing_rates, vec![]);
    assert_eq!(r.fx_used, vec![]);
}

#[test]
fn rule8_repeated_dimension_version_ignored_first_wins() {
    let mut book = DimensionBook::default();
    assert_eq!(
        book.apply_fx(1, &fx("EUR", "1.10", D0, 1)),
        DimOutcome::Recorded
    );
    assert_eq!(
        book.apply_fx(2, &fx("EUR", "9.99", D0, 1)),
        DimOutcome::Repeated
    );
    assert_eq!(
        book.apply_fx(2, &fx("EUR", "5.55", D0, 7)),
        DimOutcome::AlreadyRead
    );
    assert_eq!(
        book.fx(cur("EUR"), Day(D0), u64::MAX),
        Some(fx_used("EUR", D0, 1, "1.10"))
    );
    assert_eq!(
        book.apply_risk(3, &risk("m1", "gold", 100, D0, 1)),
        DimOutcome::Recorded
    );
    assert_eq!(
        book.apply_risk(4, &risk("m1", "tin", 900, D0, 1)),
        DimOutcome::Repeated
    );
    // FX and risk records share the stream's sequence.
    assert_eq!(
        book.apply_fx(4, &fx("EUR", "5.55", D0, 7)),
        DimOutcome::AlreadyRead
    );
    assert_eq!(
        book.apply_risk(4, &risk("m1", "tin", 900, D0, 2)),
        DimOutcome::AlreadyRead
    );
    assert_eq!(book.last_seq(), 4);
    assert_eq!(
        book.risk("m1", Day(D0), u64::MAX),
        Some(RiskUsed {
            tier: "gold".into(),
            reserve_bps: 100,
            effective_day: Day(D0),
            version: 1
        })
    );
    assert_eq!(
        book.apply_fx(5, &fx("EUR", "1.20", D0, 2)),
        DimOutcome::Recorded
    );
    assert_eq!(
        book.fx(cur("EUR"), Day(D0), u64::MAX),
        Some(fx_used("EUR", D0, 2, "1.20"))
    );
}

#[test]
fn rule8_cutoff_excludes_later_dimension_records() {
    let mut book = DimensionBook::default();
    book.apply_fx(10, &fx("EUR", "1.10", D0, 1));
    book.apply_fx(20, &fx("EUR", "1.20", D0, 2));
    book.apply_risk(25, &risk("m1", "a", 100, D0, 1));
    book.apply_fx(30, &fx("EUR", "1.30", D0 + 1, 1));
    book.apply_risk(35, &risk("m1", "b", 200, D0, 2));
    let rows = [closing("m1", D0 + 1, "EUR", 1000)];
    let at_cutoff = |cutoff| {
        let r = to_reporting(&rows, &book, cutoff);
        (
            r.closing_reporting_minor,
            r.reserve_minor,
            r.fx_used.iter().map(|f| f.version).collect::<Vec<_>>(),
            r.risk_used.map(|r| r.tier),
        )
    };
    assert_eq!(at_cutoff(5), (None, None, vec![], None));
    assert_eq!(at_cutoff(10), (Some(1100), None, vec![1], None));
    assert_eq!(at_cutoff(24), (Some(1200), None, vec![2], None));
    assert_eq!(
        at_cutoff(25),
        (Some(1200), Some(12), vec![2], Some("a".into()))
    );
    assert_eq!(
        at_cutoff(30),
        (Some(1300), Some(13), vec![1], Some("a".into()))
    );
    assert_eq!(
        at_cutoff(u64::MAX),
        (Some(1300), Some(26), vec![1], Some("b".into()))
    );
}

#[test]
fn rule8_reserve_bps() {
    let mut book = DimensionBook::default();
    book.apply_risk(1, &risk("m1", "silver", 250, D0, 1));
    book.apply_risk(2, &risk("m1", "gold", 300, D0, 2));
    book.apply_risk(3, &risk("m1", "tin", 5000, D0 + 2, 1));
    book.apply_risk(4, &risk("m2", "silver", 250, D0, 1));
    book.apply_fx(5, &fx("EUR", "1.10", D0, 1));
    let reserve = |merchant: &str, day: i32, code: &str, minor: i128| {
        let r = to_reporting(&[closing(merchant, day, code, minor)], &book, u64::MAX);
        r.reserve_minor
    };
    // 12345 × 300 / 10 000 = 370.35
    assert_eq!(reserve("m1", D0 + 1, "USD", 12_345), Some(370));
    assert_eq!(reserve("m1", D0 + 1, "USD", -12_345), Some(-370));
    // 5000 bps: halves, to even both ways.
    assert_eq!(reserve("m1", D0 + 2, "USD", 1), Some(0));
    assert_eq!(reserve("m1", D0 + 2, "USD", 3), Some(2));
    assert_eq!(reserve("m1", D0 + 2, "USD", 5), Some(2));
    assert_eq!(reserve("m1", D0 + 2, "USD", 7), Some(4));
    assert_eq!(reserve("m1", D0 + 2, "USD", -3), Some(-2));
    assert_eq!(reserve("m1", D0 + 2, "USD", -5), Some(-2));
    // 12345 × 250 / 10 000 = 308.625
    assert_eq!(reserve("m2", D0 + 1, "USD", 12_345), Some(309));
    assert_eq!(reserve("m2", D0 + 1, "USD", -12_345), Some(-309));
    // Of the converted total: 1000 EUR × 1.10 = 1100; × 250 / 10 000 = 27.5.
    assert_eq!(reserve("m2", D0 + 1, "EUR", 1000), Some(28));
    assert_eq!(reserve("m2", D0 + 1, "EUR", 3000), Some(82));
    // No risk record in force: no reserve, the total is still there.
    let r = to_reporting(&[closing("m1", D0 - 1, "USD", 100)], &book, u64::MAX);
    assert_eq!(
        (r.closing_reporting_minor, r.reserve_minor),
        (Some(100), None)
    );
    assert_eq!(
        to_reporting(&[closing("m1", D0 + 1, "USD", 1)], &book, u64::MAX).risk_used,
        Some(RiskUsed {
            tier: "gold".into(),
            reserve_bps: 300,
            effective_day: Day(D0),
            version: 2
        })
    );
}

#[test]
fn rule8_rate_parse_is_exact_and_strict() {
    for ok in [
        "1.0842",
        "1",
        "0.5",
        "007.50",
        "0.000000000000000001",
        "123456789012345678901234567890",
        "123456789012.345678901234567890",
    ] {
        assert_eq!(Rate::parse(ok).unwrap().as_str(), ok);
    }
    for bad in [
        "", ".5", "1.", "-1", "+1", "1e3", "1.2.3", " 1", "1,5", "NaN",
    ] {
        assert_eq!(
            Rate::parse(bad),
            Err(RateError::Format(bad.into())),
            "{bad:?}"
        );
    }
    for zero in ["0", "0.000", "000"] {
        assert_eq!(Rate::parse(zero), Err(RateError::NotPositive));
    }
    for long in ["0.0000000000000000001", "1234567890123456789012345678901"] {
        assert_eq!(Rate::parse(long), Err(RateError::Precision(long.into())));
    }
    assert_eq!(Rate::one().as_str(), "1");
}

#[test]
fn rule8_risk_record_validation() {
    assert_eq!(risk("m1", "gold", 100, D0, 1).validate(), Ok(()));
    assert_eq!(risk("m1", "gold", 0, D0, 1).validate(), Ok(()));
    assert_eq!(risk("m1", "gold", 10_000, D0, 1).validate(), Ok(()));
    let refused = [
        (
            risk("m1", "", 100, D0, 1),
            DimensionError::Id(FactError::Missing { field: "tier" }),
            "tier",
        ),
        (
            risk("m 1", "gold", 100, D0, 1),
            DimensionError::Id(FactError::IdCharacter {
                field: "merchant_id",
                ch: ' ',
                at: 1,
            }),
            "merchant_id",
        ),
        (
            risk("m1", "gold", 10_001, D0, 1),
            DimensionError::ReserveBps(10_001),
            "reserve_bps",
        ),
        (
            risk("m1", "gold", -1, D0, 1),
            DimensionError::ReserveBps(-1),
            "reserve_bps",
        ),
        (
            risk("m1", "gold", 100, D0, 0),
            DimensionError::Version(0),
            "version",
        ),
    ];
    for (record, error, field) in refused {
        assert_eq!(record.validate(), Err(error.clone()), "{record:?}");
        assert_eq!(error.field(), field);
        assert!(error.to_string().starts_with(field), "{error}");
    }
}

#[test]
fn rule8_fx_record_validation() {
    let year = |y| Day::from_ymd(y, 1, 1).unwrap().0;
    assert_eq!(MAX_EFFECTIVE_DAY, Day::from_ymd(2999, 12, 31).unwrap());
    assert_eq!(fx("EUR", "1.1", 0, 1).validate(), Ok(()));
    assert_eq!(fx("EUR", "1.1", MAX_EFFECTIVE_DAY.0, 1).validate(), Ok(()));
    let refused = [
        (
            fx("USD", "1", D0, 1),
            DimensionError::ReportingCurrency,
            "currency",
        ),
        (
            fx("EUR", "1.1", year(0), 1),
            DimensionError::EffectiveDate(Day(year(0))),
            "effective_date",
        ),
        (
            fx("EUR", "1.1", -1, 1),
            DimensionError::EffectiveDate(Day(-1)),
            "effective_date",
        ),
        (
            fx("EUR", "1.1", year(9999), 1),
            DimensionError::EffectiveDate(Day(year(9999))),
            "effective_date",
        ),
        (
            fx("EUR", "1.1", D0, 0),
            DimensionError::Version(0),
            "version",
        ),
    ];
    for (record, error, field) in refused {
        assert_eq!(record.validate(), Err(error.clone()), "{record:?}");
        assert_eq!(error.field(), field);
    }
    assert_eq!(
        DimensionError::EffectiveDate(Day(year(0))).to_string(),
        "effective_date: 0000-01-01 is outside 1970-01-01..=2999-12-31"
    );
}

#[test]
fn rule8_records_ingest_now_refuses_still_fold_as_before() {
    // Ingest's rules are for new records: one already in the log folds as it did.
    let year_zero = Day::from_ymd(0, 1, 1).unwrap().0;
    let mut book = DimensionBook::default();
    assert_eq!(
        book.apply_fx(1, &fx("EUR", "1.5", year_zero, 1)),
        DimOutcome::Recorded
    );
    assert_eq!(
        book.apply_fx(2, &fx("USD", "2", D0, 1)),
        DimOutcome::Recorded
    );
    assert_eq!(
        book.apply_risk(3, &risk("m1", "gold", 20_000, D0, 0)),
        DimOutcome::Recorded
    );
    let reporting = to_reporting(
        &[closing("m1", D0, "EUR", 100), closing("m1", D0, "USD", 10)],
        &book,
        u64::MAX,
    );
    assert_eq!(reporting.fx_used, vec![fx_used("EUR", year_zero, 1, "1.5")]);
    assert_eq!(reporting.closing_reporting_minor, Some(160));
    assert_eq!(reporting.reserve_minor, Some(320));
}

#[test]
fn rule8_held_says_whether_a_key_is_held_and_with_what_content() {
    let mut book = DimensionBook::default();
    book.apply_fx(4, &fx("EUR", "1.10", D0, 1));
    book.apply_risk(5, &risk("m1", "gold", 100, D0, 1));
    assert_eq!(book.held_fx(&fx("EUR", "1.10", D0, 1)), Held::Same(4));
    // The rate as received is the content: "1.1" is another record.
    assert_eq!(book.held_fx(&fx("EUR", "1.1", D0, 1)), Held::Other(4));
    assert_eq!(book.held_fx(&fx("EUR", "1.10", D0, 2)), Held::Nothing);
    assert_eq!(book.held_fx(&fx("EUR", "1.10", D0 + 1, 1)), Held::Nothing);
    assert_eq!(book.held_fx(&fx("GBP", "1.10", D0, 1)), Held::Nothing);
    assert_eq!(
        book.held_risk(&risk("m1", "gold", 100, D0, 1)),
        Held::Same(5)
    );
    assert_eq!(
        book.held_risk(&risk("m1", "gold", 101, D0, 1)),
        Held::Other(5)
    );
    assert_eq!(
        book.held_risk(&risk("m1", "tin", 100, D0, 1)),
        Held::Other(5)
    );
    assert_eq!(
        book.held_risk(&risk("m2", "gold", 100, D0, 1)),
        Held::Nothing
    );
}

#[test]
fn rule8_an_overflowing_conversion_names_its_reason() {
    let mut book = DimensionBook::default();
    book.apply_fx(1, &fx("EUR", "100000000000.5", D0, 1));
    book.apply_fx(2, &fx("KWD", "3.25", D0, 1));
    book.apply_risk(3, &risk("m1", "gold", 10_000, D0, 1));
    let huge = 10_i128.pow(37);
    let reporting = to_reporting(&[closing("m1", D0, "EUR", huge)], &book, u64::MAX);
    assert_eq!(reporting.closing_reporting_minor, None);
    assert_eq!(reporting.reserve_minor, None);
    assert_eq!(reporting.missing_rates, Vec::<Currency>::new());
    assert_eq!(reporting.overflow, Some(Overflow::Conversion(cur("EUR"))));
    assert_eq!(
        Overflow::Conversion(cur("EUR")).to_string(),
        "converting the EUR closing to USD leaves 128 bits"
    );

    // Two closings that convert but whose sum does not fit.
    let near_max = i128::MAX / 2 + 1;
    let reporting = to_reporting(
        &[
            closing("m1", D0, "USD", near_max),
            closing("m1", D0, "USD", near_max),
        ],
        &book,
        u64::MAX,
    );
    assert_eq!(reporting.overflow, Some(Overflow::Total));

    // A total that fits, a reserve that does not.
    let reporting = to_reporting(&[closing("m1", D0, "USD", i128::MAX / 2)], &book, u64::MAX);
    assert_eq!(reporting.closing_reporting_minor, Some(i128::MAX / 2));
    assert_eq!(reporting.reserve_minor, None);
    assert_eq!(reporting.overflow, Some(Overflow::Reserve));

    // A missing rate explains the absence on its own.
    let reporting = to_reporting(
        &[closing("m1", D0, "EUR", huge), closing("m1", D0, "GBP", 1)],
        &book,
        u64::MAX,
    );
    assert_eq!(reporting.missing_rates, vec![cur("GBP")]);
    assert_eq!(reporting.overflow, None);

    // Nothing overflows: no reason.
    let reporting = to_reporting(&[closing("m1", D0, "KWD", 1000)], &book, u64::MAX);
    assert_eq!(reporting.closing_reporting_minor, Some(325));
    assert_eq!(reporting.overflow, None);
}

// ---------------------------------------------------------------------------
// Rule 9: settings are semantics.

#[test]
fn rule9_settings_fingerprint_changes_with_any_setting() {
    let s = Settings::default();
    assert_eq!(
        s,
        Settings {
            partitions: 16,
            dedup_horizon_us: 3_024_000_000_000,
            allowed_lateness_us: 3_600_000_000,
            max_clock_skew_us: 300_000_000,
            bucket_width_us: 900_000_000,
        }
    );
    assert_eq!(s.buckets_per_day(), 96);
    // What the first streams, footers and checkpoints recorded: kept to recognise them.
    assert_eq!(
        s.legacy_canonical(),
        "semantics_version=1;partitions=16;dedup_horizon_us=3024000000000;\
         allowed_lateness_us=3600000000;max_clock_skew_us=300000000;bucket_width_us=900000000"
    );
    assert_eq!(s.legacy_fingerprint(), "24d5f4baa8093b62");
    let variants = [
        s,
        Settings {
            partitions: 17,
            ..s
        },
        Settings {
            dedup_horizon_us: s.dedup_horizon_us + 1,
            ..s
        },
        Settings {
            allowed_lateness_us: s.allowed_lateness_us + 1,
            ..s
        },
        Settings {
            max_clock_skew_us: s.max_clock_skew_us + 1,
            ..s
        },
        Settings {
            bucket_width_us: 1_800_000_000,
            ..s
        },
    ];
    let prints: Vec<String> = variants.iter().map(Settings::legacy_fingerprint).collect();
    for (i, a) in prints.iter().enumerate() {
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        for b in &prints[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // Every setting changes the version key; only the stream's change the stream's
    // fingerprint, which is all an archive footer records.
    let keys: Vec<String> = variants.iter().map(Settings::version_key).collect();
    for (i, a) in keys.iter().enumerate() {
        assert!(a.starts_with(&format!("v{SEMANTICS_VERSION}-")), "{a}");
        for b in &keys[i + 1..] {
            assert_ne!(a, b);
        }
    }
    let streams: Vec<String> = variants.iter().map(|v| v.stream().fingerprint()).collect();
    assert_ne!(streams[0], streams[1]);
    assert_ne!(streams[0], streams[2]);
    assert_eq!(
        streams[0], streams[3],
        "allowed lateness is the projection's"
    );
    assert_ne!(streams[0], streams[4]);
    assert_eq!(streams[0], streams[5], "bucket width is the projection's");
}

/// The names every derived object is stored under: pinned, since changing them
/// orphans every checkpoint, replay state and commit already written.
#[test]
fn rule9_stream_fingerprint_and_version_key_are_pinned() {
    let s = Settings::default();
    assert_eq!(
        s.stream().canonical(),
        "partitions=16;dedup_horizon_us=3024000000000;max_clock_skew_us=300000000"
    );
    assert_eq!(s.stream().fingerprint(), "72dbc598e2d2e484");
    assert_eq!(
        s.version_canonical(),
        format!(
            "semantics_version={SEMANTICS_VERSION};state_format={STATE_FORMAT};\
             allowed_lateness_us=3600000000;bucket_width_us=900000000;stream=72dbc598e2d2e484"
        )
    );
    assert_eq!(s.version_key(), "v2-f8893dc5151ab250");
    assert_eq!(
        StreamSettings::parse(&s.stream().canonical()),
        Ok(s.stream())
    );
    assert_eq!(
        Settings::of(s.stream(), s.projection()),
        s,
        "a stream's and a projection's settings make the whole"
    );
    for bad in [
        "",
        "partitions=16",
        "partitions=x;dedup_horizon_us=1;max_clock_skew_us=1",
        "partitions=0;dedup_horizon_us=1;max_clock_skew_us=1",
    ] {
        assert!(StreamSettings::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn rule9_settings_validation() {
    let s = Settings::default();
    assert_eq!(s.validate(), Ok(()));
    assert_eq!(
        Settings { partitions: 0, ..s }.validate(),
        Err(SettingsError::Partitions(0))
    );
    assert_eq!(
        Settings {
            partitions: 4097,
            ..s
        }
        .validate(),
        Err(SettingsError::Partitions(4097))
    );
    assert_eq!(
        Settings {
            partitions: 4096,
            ..s
        }
        .validate(),
        Ok(())
    );
    assert_eq!(
        Settings {
            dedup_horizon_us: 0,
            ..s
        }
        .validate(),
        Err(SettingsError::NotPositive {
            name: "dedup horizon",
            value: 0
        })
    );
    assert_eq!(
        Settings {
            allowed_lateness_us: -1,
            ..s
        }
        .validate(),
        Err(SettingsError::NotPositive {
            name: "allowed lateness",
            value: -1
        })
    );
    assert_eq!(
        Settings {
            max_clock_skew_us: 0,
            ..s
        }
        .validate(),
        Err(SettingsError::NotPositive {
            name: "max clock skew",
            value: 0
        })
    );
    assert_eq!(
        Settings {
            bucket_width_us: 0,
            ..s
        }
        .validate(),
        Err(SettingsError::NotPositive {
            name: "bucket width",
            value: 0
        })
    );
    assert_eq!(
        Settings {
            bucket_width_us: 420_000_000,
            ..s
        }
        .validate(),
        Err(SettingsError::BucketWidth(420_000_000))
    );
}

#[test]
fn rule9_shards_of_other_settings_do_not_merge() {
    let s = Settings::default();
    let mut a = Exposure::new(s);
    a.apply_fact(&rec(
        1,
        at(0, 10, 1),
        pay("e", "m1", 1, "USD", at(0, 10, 0)),
    ))
    .unwrap();
    let other = Exposure::new(Settings {
        allowed_lateness_us: 2 * HOUR,
        ..s
    });
    assert!(matches!(a.merge(other), Err(SemanticsError::Merge(_))));
    // The same partition from two shards is refused too, and changes nothing.
    let rows = a.daily_rows();
    let mut b = Exposure::new(s);
    b.apply_fact(&rec(1, at(0, 9, 0), pay("g", "m3", 1, "USD", at(0, 9, 0))))
        .unwrap();
    b.apply_fact(&rec(
        2,
        at(0, 10, 2),
        pay("f", "m1", 5, "USD", at(0, 10, 0)),
    ))
    .unwrap();
    assert!(matches!(a.merge(b), Err(SemanticsError::Merge(_))));
    assert_eq!(a.daily_rows(), rows);
    assert!(a.partition(1).is_none());
    assert!(matches!(
        a.apply_fact(&heartbeat(3, at(0, 11, 0))),
        Err(SemanticsError::Merge(_))
    ));
}

#[test]
fn rule9_partition_of_is_fnv1a_64() {
    assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    assert_eq!(partition_of("m1", 16), 11);
    assert_eq!(partition_of("m1", 4), 3);
    assert_eq!(partition_of("merchant-8", 16), 0);
    assert_eq!(partition_of("anything", 1), 0);

    // A fact read in a partition other than its merchant's is refused.
    let mut st = PartitionState::new(0, Settings::default());
    let err = st
        .apply(&rec(
            1,
            at(0, 10, 1),
            pay("e", "m1", 1, "USD", at(0, 10, 0)),
        ))
        .unwrap_err();
    assert_eq!(
        err,
        SemanticsError::WrongPartition {
            merchant_id: "m1".into(),
            expected: 11,
            actual: 0
        }
    );
    assert_eq!(st.last_seq(), 0);
    assert_eq!(st.daily_rows(), vec![]);
    assert_eq!(st.current_rows(), vec![]);
}

// ---------------------------------------------------------------------------
// Rule 10: identity state never drops a real event.

#[test]
fn rule10_distinct_ids_are_never_duplicates() {
    let mut p = Part::of("m1");
    let mut ids: Vec<String> = (0..2000).map(|i| format!("e-{i}")).collect();
    // Ids of the full 128 bytes that differ in one byte only.
    for ch in ['a', 'b', 'A', '0', '.', '_', ':', '-'] {
        ids.push(format!("{}{ch}", "x".repeat(127)));
        ids.push(format!("{ch}{}", "x".repeat(127)));
    }
    ids.extend(["E1", "e1", "e1.", "e1:", "1e"].map(String::from));
    let n = ids.len() as u64;
    for (i, id) in ids.iter().enumerate() {
        let f = pay(id, "m1", 1, "USD", at(0, 10, 0));
        assert_eq!(f.validate(), Ok(()));
        assert_eq!(
            p.fact(i as u64 + 1, at(0, 10, 1), f),
            Status::Applied,
            "{id}"
        );
    }
    assert_eq!(n, 2021);
    assert_eq!(p.current("m1", "USD").applied, 2021);
    assert_eq!(p.current("m1", "USD").balance_minor, 2021);
    assert_eq!(p.st.identities_remembered(), 2021);
    // And each of them is still recognised.
    for (i, id) in ids.iter().enumerate() {
        let f = pay(id, "m1", 1, "USD", at(0, 10, 0));
        assert_eq!(p.fact(n + i as u64 + 1, at(0, 10, 2), f), Status::Duplicate);
    }
}

// ---------------------------------------------------------------------------
// Input validation.

#[test]
fn fact_validate_names_field_and_rule() {
    let ok = pay("e1", "m1", 1, "USD", at(0, 0, 0));
    assert_eq!(ok.validate(), Ok(()));
    let c = correction("c1", "m1", -3, "USD", at(0, 0, 0), "e1");
    assert_eq!(c.validate(), Ok(()));
    let with = |f: &dyn Fn(&mut Fact)| {
        let mut x = ok.clone();
        f(&mut x);
        x.validate()
    };
    assert_eq!(
        with(&|f| f.event_id = String::new()),
        Err(FactError::Missing { field: "event_id" })
    );
    assert_eq!(
        with(&|f| f.merchant_id = String::new()),
        Err(FactError::Missing {
            field: "merchant_id"
        })
    );
    assert_eq!(with(&|f| f.event_id = "a".repeat(128)), Ok(()));
    assert_eq!(
        with(&|f| f.event_id = "a".repeat(129)),
        Err(FactError::IdLength {
            field: "event_id",
            max: 128,
            len: 129
        })
    );
    assert_eq!(with(&|f| f.merchant_id = "m".repeat(64)), Ok(()));
    assert_eq!(
        with(&|f| f.merchant_id = "m".repeat(65)),
        Err(FactError::IdLength {
            field: "merchant_id",
            max: 64,
            len: 65
        })
    );
    assert_eq!(
        with(&|f| f.event_id = "ab/c".into()),
        Err(FactError::IdCharacter {
            field: "event_id",
            ch: '/',
            at: 2
        })
    );
    assert_eq!(
        with(&|f| f.merchant_id = "x:é".into()),
        Err(FactError::IdCharacter {
            field: "merchant_id",
            ch: 'é',
            at: 2
        })
    );
    // Lengths are in bytes: 65 two-byte characters are 130 bytes.
    assert_eq!(
        with(&|f| f.event_id = "é".repeat(65)),
        Err(FactError::IdLength {
            field: "event_id",
            max: 128,
            len: 130
        })
    );
    assert_eq!(with(&|f| f.event_id = "AZaz09._:-".into()), Ok(()));
    assert_eq!(
        with(&|f| f.amount_minor = 0),
        Err(FactError::AmountNotPositive {
            kind: "PAYMENT_CAPTURED",
            amount: 0
        })
    );
    assert_eq!(
        with(&|f| {
            f.kind = RefundIssued;
            f.amount_minor = -5;
        }),
        Err(FactError::AmountNotPositive {
            kind: "REFUND_ISSUED",
            amount: -5
        })
    );
    assert_eq!(
        with(&|f| f.corrects_event_id = Some("e0".into())),
        Err(FactError::TargetWithoutCorrection {
            kind: "PAYMENT_CAPTURED"
        })
    );
    assert_eq!(
        with(&|f| f.kind = Correction),
        Err(FactError::CorrectionWithoutTarget)
    );
    let mut zero = c.clone();
    zero.amount_minor = 0;
    assert_eq!(zero.validate(), Err(FactError::ZeroCorrection));
    let mut no_target = c.clone();
    no_target.corrects_event_id = Some(String::new());
    assert_eq!(
        no_target.validate(),
        Err(FactError::Missing {
            field: "corrects_event_id"
        })
    );
    let mut bad_target = c;
    bad_target.corrects_event_id = Some("e 1".into());
    assert_eq!(
        bad_target.validate(),
        Err(FactError::IdCharacter {
            field: "corrects_event_id",
            ch: ' ',
            at: 1
        })
    );
    assert_eq!(FactError::ZeroCorrection.field(), "amount_minor");
    assert_eq!(
        FactError::CorrectionWithoutTarget.field(),
        "corrects_event_id"
    );
    assert_eq!(
        FactError::IdLength {
            field: "merchant_id",
            max: 64,
            len: 65
        }
        .field(),
        "merchant_id"
    );
}

#[test]
fn currency_parse_and_exponents() {
    assert_eq!(cur("USD"), Currency::USD);
    assert_eq!(cur("USD").exponent(), 2);
    assert_eq!(cur("EUR").exponent(), 2);
    assert_eq!(cur("JPY").exponent(), 0);
    assert_eq!(cur("KRW").exponent(), 0);
    assert_eq!(cur("KWD").exponent(), 3);
    assert_eq!(cur("BHD").exponent(), 3);
    assert_eq!(cur("CLF").exponent(), 4);
    assert_eq!(cur("EUR").to_string(), "EUR");
    assert_eq!(cur("EUR").as_str(), "EUR");
    for bad in ["usd", "US", "USDX", "", "U$D", "ÜSD", "us1"] {
        assert_eq!(
            Currency::parse(bad),
            Err(CurrencyError::Format(bad.into())),
            "{bad:?}"
        );
    }
    for unknown in ["XXX", "ABC", "ZZZ"] {
        assert_eq!(
            Currency::parse(unknown),
            Err(CurrencyError::Unknown(unknown.into()))
        );
    }
}

#[test]
fn day_parse_and_arithmetic() {
    assert_eq!(Day::parse("2024-03-01"), Ok(Day(19_783)));
    assert_eq!(Day::parse("2024-02-29"), Ok(Day(19_782)));
    assert_eq!(Day::parse("1970-01-01"), Ok(Day(0)));
    assert_eq!(Day::parse("1969-12-31"), Ok(Day(-1)));
    assert_eq!(Day::parse("2000-02-29"), Ok(Day(11_016)));
    for bad in [
        "2023-02-29",
        "1900-02-29",
        "2024-13-01",
        "2024-00-10",
        "2024-04-31",
        "2024-03-00",
        "2024-3-01",
        "24-03-01",
        "2024/03/01",
        "2024-03-01T00",
        "2024-03-1a",
        "",
    ] {
        assert_eq!(Day::parse(bad), Err(DayParseError(bad.into())), "{bad:?}");
    }
    assert_eq!(Day(19_783).to_string(), "2024-03-01");
    assert_eq!(Day(19_783).ymd(), (2024, 3, 1));
    assert_eq!(Day::from_ymd(2024, 2, 30), None);
    assert_eq!(Day::of_micros(T0), Day(19_783));
    assert_eq!(Day::of_micros(T0 - 1), Day(19_782));
    assert_eq!(Day::of_micros(T0 + MICROS_PER_DAY - 1), Day(19_783));
    assert_eq!(Day(19_783).start_us(), 1_709_251_200_000_000);
    assert_eq!(Day(19_783).end_us(), 1_709_337_600_000_000);
    assert_eq!(Day::of_micros(-1), Day(-1));
}

// ---------------------------------------------------------------------------
// Rule 11: final days.

/// With the defaults (H 35 d, allowed lateness 1 h) day D0 is final once the
/// partition's clock reaches the end of D0 + 35 d + 1 h.
fn final_at() -> i64 {
    at(1, 0, 0) + 35 * MICROS_PER_DAY + 3_600_000_000
}

#[test]
fn rule11_a_day_is_final_from_its_end_plus_horizon_plus_lateness_by_the_partition_clock() {
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("e1", "m1", 100, "USD", at(0, 10, 0)));
    p.heartbeat(2, final_at() - 1);
    assert!(!p.st.is_final(Day(D0)));
    // An ingest clock behind by more than the allowed lateness stamps an event of
    // D0 that a correct clock would have refused: still applied one µs before.
    assert_eq!(
        p.fact(3, at(0, 11, 0), pay("e2", "m1", 5, "USD", at(0, 10, 30))),
        Status::Applied
    );
    p.heartbeat(4, final_at());
    assert!(p.st.is_final(Day(D0)));
    assert!(!p.st.is_final(Day(D0 + 1)));
    let before = p.st.daily_rows();
    // From then on, a fact of D0 changes no daily row, whatever its identity:
    // new, an exact resend, or a conflicting one.
    assert_eq!(
        p.fact(5, at(0, 12, 0), pay("e3", "m1", 7, "USD", at(0, 11, 0))),
        Status::TooOld
    );
    assert_eq!(
        p.fact(6, at(0, 12, 0), pay("e1", "m1", 100, "USD", at(0, 10, 0))),
        Status::TooOld
    );
    assert_eq!(
        p.fact(7, at(0, 12, 0), pay("e1", "m1", 999, "USD", at(0, 10, 0))),
        Status::TooOld
    );
    assert_eq!(p.st.daily_rows(), before);
    let current = p.current("m1", "USD");
    assert_eq!(current.balance_minor, 105, "not applied");
    assert_eq!(
        (current.applied, current.too_old, current.log_position),
        (2, 3, 7)
    );
}

#[test]
fn rule11_identities_of_final_days_match_no_more() {
    // A quiet merchant's clock stays behind; the partition's moves on.
    let mut p = Part::of("m1");
    p.fact(1, at(0, 10, 1), pay("e1", "m1", 100, "USD", at(0, 10, 0)));
    p.heartbeat(2, final_at());
    // The same id on a later, open day: new, not a conflict with the final day's.
    let later = final_at() - MICROS_PER_DAY;
    assert_eq!(
        p.fact(3, final_at(), pay("e1", "m1", 1, "USD", later)),
        Status::Applied
    );
}

#[test]
fn rule11_stored_state_keeps_no_final_day_and_the_open_rows_are_the_same() {
    let mut p = Part::of("m1");
    for d in 0..40i64 {
        p.fact(
            d as u64 + 1,
            at(d, 10, 1),
            pay(&format!("e{d}"), "m1", 10 + d, "USD", at(d, 10, 0)),
        );
    }
    let all = p.st.daily_rows();
    assert_eq!(all.len(), 40, "kept in memory by default");
    let stored = p.st.encode();
    let restored = PartitionState::decode(&stored, p.st.settings(), p.st.partition()).unwrap();
    let open: Vec<DailyRow> = all
        .iter()
        .filter(|r| !p.st.is_final(r.day))
        .cloned()
        .collect();
    assert!(open.len() < 40 && open.len() >= 36, "{}", open.len());
    assert_eq!(restored.daily_rows(), open);
    assert_eq!(restored.current_rows(), p.st.current_rows());
    // Continuing either gives the same rows and the same bytes.
    let next = rec(
        100,
        at(40, 10, 1),
        pay("e40", "m1", 1, "USD", at(40, 10, 0)),
    );
    let mut restored = restored;
    restored.apply(&next).unwrap();
    p.st.apply(&next).unwrap();
    assert!(restored.encode() == p.st.encode());
    assert_eq!(
        restored.daily_rows().last().unwrap(),
        p.st.daily_rows().last().unwrap()
    );
}

/// The stream projector keeps no final day in memory: a year of daily events
/// leaves the horizon's days, not the year's.
#[test]
fn rule11_a_state_that_keeps_no_final_day_stays_bounded() {
    let mut p = Part::of("m1");
    p.st.keep_final_days_from(Day(i32::MAX));
    for d in 0..365i64 {
        p.fact(
            d as u64 + 1,
            at(d, 10, 1),
            pay(&format!("e{d}"), "m1", 10, "USD", at(d, 10, 0)),
        );
    }
    let rows = p.st.daily_rows();
    assert!(rows.len() <= 37, "{} days kept", rows.len());
    assert_eq!(
        rows.last().unwrap().closing_minor,
        3650,
        "the carried balance counts"
    );
    assert!(p.st.identities_remembered() <= 37 + 64);
}
