//! Properties of the fold over generated logs (docs/semantics.md, properties):
//! the same rows whatever the interleaving of partitions, the sharding, the
//! redeliveries, the path (incremental or rebuilt) or a checkpoint in between,
//! and the same rows as a naive model of the rules written here independently.

use std::collections::{BTreeMap, HashMap};

use payledger_semantics::{
    Currency, CurrentRow, DailyRow, Day, EventKind, Exposure, Fact, PartitionState, Record,
    RecordBody, SEMANTICS_VERSION, Settings, Status, partition_of,
};
use proptest::prelude::*;

const T0: i64 = 1_709_251_200_000_000; // 2024-03-01T00:00:00Z
const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

/// With 4 partitions: m0 -> 0, m1 -> 3, m2 -> 2, m3 -> 1, m4 -> 0, m5 -> 3.
const MERCHANTS: [&str; 6] = ["m0", "m1", "m2", "m3", "m4", "m5"];
const CURRENCIES: [&str; 3] = ["USD", "EUR", "JPY"];
const KINDS: [EventKind; 5] = [
    EventKind::PaymentCaptured,
    EventKind::RefundIssued,
    EventKind::SettlementReceived,
    EventKind::ChargebackOpened,
    EventKind::ChargebackReversed,
];
/// Log sequences are spaced so that tests can insert records between them.
const SEQ_STEP: u64 = 10;

fn cur(i: usize) -> Currency {
    Currency::parse(CURRENCIES[i % CURRENCIES.len()]).unwrap()
}

// ---------------------------------------------------------------------------
// Generated logs.

#[derive(Clone, Debug)]
enum Op {
    New {
        merchant: usize,
        kind: usize,
        amount: i64,
        currency: usize,
        lag_s: i64,
    },
    /// An exact resend of an earlier fact.
    Resend {
        pick: usize,
    },
    /// An earlier fact's identity with other content.
    Conflict {
        pick: usize,
        change: u8,
    },
    /// A CORRECTION of an earlier fact.
    Correct {
        pick: usize,
        amount: i64,
        lag_s: i64,
    },
    Heartbeat {
        partition: u32,
    },
}

/// One log record: the op, how far the ingest clock advances before it, and
/// how far its own ingest_time falls behind that clock (ingest nodes race).
#[derive(Clone, Debug)]
struct Step {
    op: Op,
    advance_s: i64,
    jitter_s: i64,
}

/// Times move on a 5-minute grid (from midnight) so that the boundaries of the
/// rules (exactly the allowed lateness, exactly end of day + lateness, exactly
/// event_time + H) are hit, not only straddled.
const GRID_S: i64 = 300;

fn lag() -> impl Strategy<Value = i64> {
    // Mostly on time (up to 5 min in the future), some late by up to 3 days.
    prop_oneof![
        8 => (-1..=13i64).prop_map(|x| x * GRID_S),
        2 => (12..=864i64).prop_map(|x| x * GRID_S),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // m0 is a big merchant: enough identities to be pruned once expired.
        10 => (prop_oneof![1 => Just(0), 1 => 0..MERCHANTS.len()], 0..KINDS.len(), 1..100_000i64, 0..CURRENCIES.len(), lag())
            .prop_map(|(merchant, kind, amount, currency, lag_s)| Op::New {
                merchant,
                kind,
                amount,
                currency,
                lag_s
            }),
        2 => any::<usize>().prop_map(|pick| Op::Resend { pick }),
        1 => (any::<usize>(), 0..5u8).prop_map(|(pick, change)| Op::Conflict { pick, change }),
        1 => (any::<usize>(), (1..50_000i64, any::<bool>()), lag()).prop_map(
            |(pick, (amount, negative), lag_s)| Op::Correct {
                pick,
                amount: if negative { -amount } else { amount },
                lag_s
            }
        ),
        1 => (0..4u32).prop_map(|partition| Op::Heartbeat { partition }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        op(),
        prop_oneof![8 => (0..=2i64).prop_map(|x| x * GRID_S), 1 => (2..=48i64).prop_map(|x| x * GRID_S)],
        prop_oneof![6 => Just(0i64), 1 => (0..=2i64).prop_map(|x| x * 60)],
    )
        .prop_map(|(op, advance_s, jitter_s)| Step {
            op,
            advance_s,
            jitter_s,
        })
}

fn steps(max: usize) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 1..max)
}

fn settings() -> impl Strategy<Value = Settings> {
    let base = Settings {
        partitions: 4,
        ..Settings::default()
    };
    prop_oneof![
        Just(base),
        // Short horizons so identities expire (and get pruned) inside the log.
        Just(Settings {
            dedup_horizon_us: 2 * DAY,
            ..base
        }),
        Just(Settings {
            dedup_horizon_us: DAY,
            allowed_lateness_us: 30 * MIN,
            bucket_width_us: HOUR,
            ..base
        }),
    ]
}

/// No identity expires within a generated log: 200 steps advance the clock by
/// at most 200 × 4 h (33 days) and events lag by at most 3 days.
fn long_horizon() -> Settings {
    Settings {
        partitions: 4,
        dedup_horizon_us: 60 * DAY,
        ..Settings::default()
    }
}

type Log = Vec<(u32, Record)>;

fn partition_of_fact(f: &Fact, settings: &Settings) -> u32 {
    partition_of(&f.merchant_id, settings.partitions)
}

/// Turns steps into a log of records with sequences 10, 20, 30, ...
fn build_log(settings: &Settings, steps: &[Step]) -> Log {
    let mut log = Log::new();
    let mut facts: Vec<Fact> = Vec::new();
    let mut clock = T0;
    let mut next_id = 0usize;
    for st in steps {
        clock += st.advance_s * SEC;
        let ingest = clock - st.jitter_s * SEC;
        let body = match &st.op {
            Op::New {
                merchant,
                kind,
                amount,
                currency,
                lag_s,
            } => {
                next_id += 1;
                RecordBody::Fact(Fact {
                    event_id: format!("e{next_id}"),
                    merchant_id: MERCHANTS[*merchant].to_string(),
                    kind: KINDS[*kind],
                    amount_minor: *amount,
                    currency: cur(*currency),
                    event_time_us: ingest - lag_s * SEC,
                    corrects_event_id: None,
                })
            }
            Op::Resend { pick } if !facts.is_empty() => {
                RecordBody::Fact(facts[pick % facts.len()].clone())
            }
            Op::Conflict { pick, change } if !facts.is_empty() => {
                let mut f = facts[pick % facts.len()].clone();
                match change {
                    0 => {
                        f.amount_minor = if f.amount_minor == -1 {
                            1
                        } else {
                            f.amount_minor + 1
                        }
                    }
                    1 if f.kind == EventKind::Correction => {
                        f.corrects_event_id = Some("elsewhere".into())
                    }
                    1 => {
                        let k = KINDS.iter().position(|k| *k == f.kind).unwrap();
                        f.kind = KINDS[(k + 1) % KINDS.len()];
                    }
                    2 => {
                        let c = CURRENCIES
                            .iter()
                            .position(|c| *c == f.currency.as_str())
                            .unwrap();
                        f.currency = cur(c + 1);
                    }
                    3 => f.event_time_us += MIN,
                    _ => f.event_time_us -= DAY,
                }
                RecordBody::Fact(f)
            }
            Op::Correct {
                pick,
                amount,
                lag_s,
            } if !facts.is_empty() => {
                let target = &facts[pick % facts.len()];
                next_id += 1;
                RecordBody::Fact(Fact {
                    event_id: format!("c{next_id}"),
                    merchant_id: target.merchant_id.clone(),
                    kind: EventKind::Correction,
                    amount_minor: *amount,
                    currency: target.currency,
                    event_time_us: ingest - lag_s * SEC,
                    corrects_event_id: Some(target.event_id.clone()),
                })
            }
            // A heartbeat, or a resend, conflict or correction with nothing to
            // refer to yet.
            _ => RecordBody::Heartbeat,
        };
        let partition = match (&body, &st.op) {
            (RecordBody::Fact(f), _) => {
                facts.push(f.clone());
                partition_of_fact(f, settings)
            }
            (RecordBody::Heartbeat, Op::Heartbeat { partition }) => partition % settings.partitions,
            (RecordBody::Heartbeat, _) => 0,
        };
        let seq = (log.len() as u64 + 1) * SEQ_STEP;
        log.push((
            partition,
            Record {
                seq,
                ingest_time_us: ingest,
                body,
            },
        ));
    }
    log
}

fn fold(settings: Settings, log: &[(u32, Record)]) -> Exposure {
    let mut x = Exposure::new(settings);
    for (p, r) in log {
        x.apply(*p, r).unwrap();
    }
    x
}

fn fact_of(r: &Record) -> Option<&Fact> {
    match &r.body {
        RecordBody::Fact(f) => Some(f),
        RecordBody::Heartbeat => None,
    }
}

// ---------------------------------------------------------------------------
// A naive model of the rules, written from docs/semantics.md without the crate's code:
// rows are recomputed from the list of applied events, bucket end by bucket end.

#[derive(Clone, Debug, Default)]
struct Meta {
    applied: u64,
    duplicates: u64,
    conflicts: u64,
    late: u64,
    too_old: u64,
    restated: bool,
    log_position: u64,
    last_event_time_us: i64,
}

struct Model {
    s: Settings,
    last_seq: HashMap<u32, u64>,
    partition_clock: HashMap<u32, i64>,
    merchant_clock: HashMap<String, i64>,
    /// (merchant, event_id) -> the fact applied under that identity.
    identities: HashMap<(String, String), Fact>,
    applied: Vec<Fact>,
    rows: BTreeMap<(String, i32, Currency), Meta>,
    current: BTreeMap<(String, Currency), Meta>,
}

fn delta(f: &Fact) -> i128 {
    let a = i128::from(f.amount_minor);
    match f.kind {
        EventKind::PaymentCaptured | EventKind::ChargebackOpened | EventKind::Correction => a,
        EventKind::RefundIssued | EventKind::SettlementReceived | EventKind::ChargebackReversed => {
            -a
        }
    }
}

fn same_content(a: &Fact, b: &Fact) -> bool {
    a.kind == b.kind
        && a.amount_minor == b.amount_minor
        && a.currency == b.currency
        && a.event_time_us == b.event_time_us
        && a.corrects_event_id == b.corrects_event_id
}

fn day_of(t: i64) -> i32 {
    t.div_euclid(DAY) as i32
}

impl Model {
    fn new(s: Settings) -> Model {
        Model {
            s,
            last_seq: HashMap::new(),
            partition_clock: HashMap::new(),
            merchant_clock: HashMap::new(),
            identities: HashMap::new(),
            applied: Vec::new(),
            rows: BTreeMap::new(),
            current: BTreeMap::new(),
        }
    }

    fn apply(&mut self, p: u32, r: &Record) -> Status {
        let last = self.last_seq.entry(p).or_insert(0);
        if r.seq <= *last {
            return Status::AlreadyRead;
        }
        *last = r.seq;
        let clock = self.partition_clock.get(&p).copied().unwrap_or(i64::MIN);
        self.partition_clock.insert(p, clock.max(r.ingest_time_us));
        let Some(f) = fact_of(r) else {
            return Status::Heartbeat;
        };
        let m = f.merchant_id.clone();
        let m_clock = self.merchant_clock.get(&m).copied().unwrap_or(i64::MIN);
        self.merchant_clock
            .insert(m.clone(), m_clock.max(r.ingest_time_us));
        let key = (m.clone(), f.event_id.clone());
        // R11: a day is final once the partition's clock (before the record) has
        // reached its end plus the horizon plus the allowed lateness.
        let h_l = self.s.dedup_horizon_us + self.s.allowed_lateness_us;
        let is_final = |t: i64| clock >= (i64::from(day_of(t)) + 1) * DAY + h_l;
        if is_final(f.event_time_us) {
            let current = self.current.entry((m.clone(), f.currency)).or_default();
            current.too_old += 1;
            current.log_position = r.seq;
            return Status::TooOld;
        }
        let status = match self.identities.get(&key) {
            Some(seen)
                if m_clock <= seen.event_time_us + self.s.dedup_horizon_us
                    && !is_final(seen.event_time_us) =>
            {
                if same_content(seen, f) {
                    Status::Duplicate
                } else {
                    Status::Conflict
                }
            }
            _ => Status::Applied,
        };
        let day = day_of(f.event_time_us);
        let own = (m.clone(), day, f.currency);
        self.rows.entry(own.clone()).or_default();
        let current = self.current.entry((m.clone(), f.currency)).or_default();
        current.log_position = r.seq;
        match status {
            Status::Applied => {
                let late =
                    u64::from(r.ingest_time_us - f.event_time_us > self.s.allowed_lateness_us);
                current.applied += 1;
                current.late += late;
                current.last_event_time_us = if current.applied == 1 {
                    f.event_time_us
                } else {
                    current.last_event_time_us.max(f.event_time_us)
                };
                let row = self.rows.get_mut(&own).unwrap();
                row.applied += 1;
                row.late += late;
                for ((rm, rd, rc), row) in self.rows.iter_mut() {
                    if *rm == m && *rc == f.currency && *rd >= day {
                        row.log_position = r.seq;
                        let end = i64::from(*rd + 1) * DAY;
                        if clock >= end + self.s.allowed_lateness_us {
                            row.restated = true;
                        }
                    }
                }
                self.identities.insert(key, f.clone());
                self.applied.push(f.clone());
            }
            _ => {
                let row = self.rows.get_mut(&own).unwrap();
                row.log_position = r.seq;
                if status == Status::Duplicate {
                    row.duplicates += 1;
                    current.duplicates += 1;
                } else {
                    row.conflicts += 1;
                    current.conflicts += 1;
                }
            }
        }
        status
    }

    fn daily_rows(&self) -> Vec<DailyRow> {
        let width = self.s.bucket_width_us;
        let mut out = Vec::new();
        for ((m, d, c), meta) in &self.rows {
            let mut events: Vec<(i64, i128)> = self
                .applied
                .iter()
                .filter(|f| f.merchant_id == *m && f.currency == *c)
                .map(|f| (f.event_time_us, delta(f)))
                .collect();
            events.sort();
            let start = i64::from(*d) * DAY;
            let balance_before = |t: i64| -> i128 {
                events
                    .iter()
                    .take_while(|(et, _)| *et < t)
                    .map(|(_, x)| x)
                    .sum()
            };
            let mut peak: Option<(i128, i64)> = None;
            let mut b = 0;
            while start + b * width < start + DAY {
                let bucket_start = start + b * width;
                let v = balance_before(bucket_start + width);
                if peak.is_none_or(|(p, _)| v > p) {
                    peak = Some((v, bucket_start));
                }
                b += 1;
            }
            let (peak_minor, peak_bucket_start_us) = peak.unwrap();
            out.push(DailyRow {
                merchant_id: m.clone(),
                day: Day(*d),
                currency: *c,
                closing_minor: balance_before(start + DAY),
                peak_minor,
                peak_bucket_start_us,
                applied: meta.applied,
                duplicates: meta.duplicates,
                conflicts: meta.conflicts,
                late: meta.late,
                restated: meta.restated,
                log_position: meta.log_position,
                semantics_version: SEMANTICS_VERSION,
            });
        }
        out
    }

    fn current_rows(&self) -> Vec<CurrentRow> {
        self.current
            .iter()
            .map(|((m, c), meta)| CurrentRow {
                merchant_id: m.clone(),
                currency: *c,
                balance_minor: self
                    .applied
                    .iter()
                    .filter(|f| f.merchant_id == *m && f.currency == *c)
                    .map(delta)
                    .sum(),
                last_event_time_us: meta.last_event_time_us,
                applied: meta.applied,
                duplicates: meta.duplicates,
                conflicts: meta.conflicts,
                late: meta.late,
                too_old: meta.too_old,
                log_position: meta.log_position,
                semantics_version: SEMANTICS_VERSION,
            })
            .collect()
    }
}

/// The balance-bearing fields of a row, for comparisons that ignore restated,
/// late and log_position.
fn balances(rows: &[DailyRow]) -> Vec<(String, Day, Currency, i128, i128, i64, u64)> {
    rows.iter()
        .map(|r| {
            (
                r.merchant_id.clone(),
                r.day,
                r.currency,
                r.closing_minor,
                r.peak_minor,
                r.peak_bucket_start_us,
                r.applied,
            )
        })
        .collect()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------

/// The generator is worth its salt: over a fixed sample of logs, every outcome
/// the properties speak about actually occurs.
#[test]
fn generated_logs_exercise_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for _ in 0..40 {
        let s = settings().new_tree(&mut runner).unwrap().current();
        let steps = steps(250).new_tree(&mut runner).unwrap().current();
        let log = build_log(&s, &steps);
        let mut x = Exposure::new(s);
        let mut identities: HashMap<(String, String), u64> = HashMap::new();
        for (p, r) in &log {
            let status = x.apply(*p, r).unwrap().status;
            *seen.entry(format!("{status:?}").leak()).or_default() += 1;
            if let Some(f) = fact_of(r) {
                let n = identities
                    .entry((f.merchant_id.clone(), f.event_id.clone()))
                    .or_default();
                if status == Status::Applied && *n > 0 {
                    *seen.entry("applied again after expiry").or_default() += 1;
                }
                *n += 1;
                if f.kind == EventKind::Correction {
                    *seen.entry("correction").or_default() += 1;
                }
            }
        }
        let rows = x.daily_rows();
        *seen.entry("late").or_default() += rows.iter().map(|r| r.late).sum::<u64>();
        *seen.entry("restated").or_default() += rows.iter().filter(|r| r.restated).count() as u64;
        let remembered: usize = (0..s.partitions)
            .filter_map(|p| x.partition(p))
            .map(PartitionState::identities_remembered)
            .sum();
        if remembered < identities.len() {
            *seen.entry("pruned").or_default() += 1;
        }
        let days = rows
            .iter()
            .map(|r| r.day)
            .collect::<std::collections::BTreeSet<_>>();
        if days.len() >= 3 {
            *seen.entry("three days or more").or_default() += 1;
        }
    }
    for outcome in [
        "Applied",
        "Duplicate",
        "Conflict",
        "Heartbeat",
        "applied again after expiry",
        "correction",
        "late",
        "restated",
        "pruned",
        "three days or more",
    ] {
        assert!(
            seen.get(outcome).copied().unwrap_or(0) > 0,
            "{outcome} never occurs: {seen:?}"
        );
    }
}

proptest! {
    #![proptest_config(config(96))]

    /// The crate and the naive model agree on every row and every status.
    #[test]
    fn fold_agrees_with_a_naive_model_of_the_rules(s in settings(), steps in steps(250)) {
        let log = build_log(&s, &steps);
        let mut x = Exposure::new(s);
        let mut model = Model::new(s);
        for (p, r) in &log {
            let got = x.apply(*p, r).unwrap().status;
            prop_assert_eq!(got, model.apply(*p, r), "seq {}", r.seq);
        }
        prop_assert_eq!(x.daily_rows(), model.daily_rows());
        prop_assert_eq!(x.current_rows(), model.current_rows());
    }

    /// (a) Any interleaving of partitions that keeps each partition's order.
    #[test]
    fn any_interleaving_of_partitions_gives_the_same_rows(
        s in settings(),
        steps in steps(200),
        picks in prop::collection::vec(any::<usize>(), 200),
    ) {
        let log = build_log(&s, &steps);
        let expected = fold(s, &log);
        let mut queues: BTreeMap<u32, std::collections::VecDeque<&(u32, Record)>> = BTreeMap::new();
        for entry in &log {
            queues.entry(entry.0).or_default().push_back(entry);
        }
        let mut interleaved = Vec::new();
        let mut i = 0;
        while queues.values().any(|q| !q.is_empty()) {
            let open: Vec<u32> = queues.iter().filter(|(_, q)| !q.is_empty()).map(|(p, _)| *p).collect();
            let p = open[picks[i % picks.len()] % open.len()];
            interleaved.push(queues.get_mut(&p).unwrap().pop_front().unwrap().clone());
            i += 1;
        }
        let got = fold(s, &interleaved);
        prop_assert_eq!(got.daily_rows(), expected.daily_rows());
        prop_assert_eq!(got.current_rows(), expected.current_rows());
    }

    /// (b) Folding each partition as its own shard, then merging, equals one fold.
    #[test]
    fn shards_by_partition_merge_to_one_fold(s in settings(), steps in steps(200)) {
        let log = build_log(&s, &steps);
        let expected = fold(s, &log);
        let mut merged = Exposure::new(s);
        for p in 0..s.partitions {
            let shard: Vec<(u32, Record)> = log.iter().filter(|(q, _)| *q == p).cloned().collect();
            merged.merge(fold(s, &shard)).unwrap();
        }
        prop_assert_eq!(merged.daily_rows(), expected.daily_rows());
        prop_assert_eq!(merged.current_rows(), expected.current_rows());
    }

    /// (c) Re-delivering a record already read changes nothing; a resend under a
    /// new sequence only counts a duplicate or a conflict on its own row.
    #[test]
    fn redelivery_changes_nothing_and_a_resend_only_counts(
        steps in steps(200),
        at in any::<usize>(),
        pick in any::<usize>(),
    ) {
        let s = long_horizon();
        let log = build_log(&s, &steps);
        let k = 1 + at % log.len();
        let (prefix, rest) = log.split_at(k);
        let mut x = fold(s, prefix);
        let (daily, current) = (x.daily_rows(), x.current_rows());

        // Same sequence again: AlreadyRead, nothing moves.
        let (p, again) = &prefix[pick % k];
        let out = x.apply(*p, again).unwrap();
        prop_assert_eq!(out.status, Status::AlreadyRead);
        prop_assert_eq!(out.touched, None);
        prop_assert_eq!(x.daily_rows(), daily);
        prop_assert_eq!(x.current_rows(), current);

        // The same identity under a new sequence, slotted in before the rest of the
        // log, read at the original's ingest_time so that no clock moves.
        let facts: Vec<&(u32, Record)> = prefix.iter().filter(|(_, r)| fact_of(r).is_some()).collect();
        prop_assume!(!facts.is_empty());
        let (p, original) = facts[pick % facts.len()];
        let f = fact_of(original).unwrap();
        let resend_seq = prefix.last().unwrap().1.seq + 1;
        let resend = Record { seq: resend_seq, ingest_time_us: original.ingest_time_us, body: original.body.clone() };
        // Nothing expires within the log: the first record of an identity is the one applied.
        let first = prefix.iter().filter_map(|(_, r)| fact_of(r))
            .find(|g| g.merchant_id == f.merchant_id && g.event_id == f.event_id).unwrap();
        let want = if same_content(first, f) { Status::Duplicate } else { Status::Conflict };
        let out = x.apply(*p, &resend).unwrap();
        prop_assert_eq!(out.status, want);
        prop_assert!(!out.touched.unwrap().balances_changed);

        for (p, r) in rest {
            x.apply(*p, r).unwrap();
        }
        let plain = fold(s, &log);
        let own = (f.merchant_id.clone(), Day(day_of(f.event_time_us)), f.currency);
        let mut expected = plain.daily_rows();
        for row in expected.iter_mut() {
            if (row.merchant_id.clone(), row.day, row.currency) == own {
                if want == Status::Duplicate { row.duplicates += 1 } else { row.conflicts += 1 }
                row.log_position = row.log_position.max(resend_seq);
            }
        }
        let mut expected_current = plain.current_rows();
        for row in expected_current.iter_mut() {
            if row.merchant_id == f.merchant_id && row.currency == f.currency {
                if want == Status::Duplicate { row.duplicates += 1 } else { row.conflicts += 1 }
                row.log_position = row.log_position.max(resend_seq);
            }
        }
        prop_assert_eq!(x.daily_rows(), expected);
        prop_assert_eq!(x.current_rows(), expected_current);
    }

    /// (d) A correction and its original give the same balances in either order.
    #[test]
    fn correction_and_original_commute(
        s in settings(),
        steps in steps(150),
        (i, j) in (any::<usize>(), any::<usize>()),
        merchant in 0..MERCHANTS.len(),
        currency in 0..CURRENCIES.len(),
        (kind, amount, fix) in (0..KINDS.len(), 1..100_000i64, prop_oneof![-100_000..0i64, 1..100_000i64]),
        (t_original, t_correction) in (0..4 * DAY, 0..4 * DAY),
    ) {
        let log = build_log(&s, &steps);
        let p = partition_of(MERCHANTS[merchant], s.partitions);
        let (i, j) = { let (a, b) = (i % (log.len() + 1), j % (log.len() + 1)); (a.min(b), a.max(b)) };
        // Event times from half a horizon before the partition's clock at the later
        // slot on: no day of theirs is final (R11) at either slot, so both apply.
        let clock_at_j = log[..j]
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, r)| r.ingest_time_us)
            .max()
            .unwrap_or(T0);
        let earliest = clock_at_j - s.dedup_horizon_us / 2;
        let original = Fact {
            event_id: "original".into(),
            merchant_id: MERCHANTS[merchant].into(),
            kind: KINDS[kind],
            amount_minor: amount,
            currency: cur(currency),
            event_time_us: earliest + t_original,
            corrects_event_id: None,
        };
        let fix = Fact {
            event_id: "fix".into(),
            kind: EventKind::Correction,
            amount_minor: fix,
            event_time_us: earliest + t_correction,
            corrects_event_id: Some("original".into()),
            ..original.clone()
        };
        // Two slots (between log records i-1 and i, and j-1 and j) that keep
        // their sequence and ingest_time whichever fact goes in them.
        // The slots read at an ingest_time that moves no clock of the merchant or
        // the partition (the merchant's highest so far, else the lowest of the log),
        // so that every other record has the same outcome with or without the pair.
        let lowest = log.iter().map(|(_, r)| r.ingest_time_us).min().unwrap();
        let slot = |at: usize, extra: u64| -> (u64, i64) {
            let seq = at as u64 * SEQ_STEP + extra;
            // Before the partition's first record any time would start its clock,
            // which decides closure and finality (R5, R11) of the next record.
            if !log[..at].iter().any(|(q, _)| *q == p) {
                return (seq, i64::MIN);
            }
            let ingest = log[..at]
                .iter()
                .filter(|(_, r)| fact_of(r).is_some_and(|f| f.merchant_id == original.merchant_id))
                .map(|(_, r)| r.ingest_time_us)
                .max()
                .unwrap_or(lowest);
            (seq, ingest)
        };
        let with = |first: &Fact, second: &Fact| -> Exposure {
            let mut l = log.clone();
            let (s2, t2) = slot(j, 2);
            let (s1, t1) = slot(i, 1);
            l.insert(j, (p, Record { seq: s2, ingest_time_us: t2, body: RecordBody::Fact(second.clone()) }));
            l.insert(i, (p, Record { seq: s1, ingest_time_us: t1, body: RecordBody::Fact(first.clone()) }));
            let mut x = Exposure::new(s);
            for (q, r) in &l {
                let out = x.apply(*q, r).unwrap();
                if r.seq == s1 || r.seq == s2 {
                    assert_eq!(out.status, Status::Applied);
                }
            }
            x
        };
        let a = with(&original, &fix);
        let b = with(&fix, &original);
        prop_assert_eq!(balances(&a.daily_rows()), balances(&b.daily_rows()));
        let cur_balances = |x: &Exposure| -> Vec<(String, Currency, i128, u64)> {
            x.current_rows().into_iter().map(|r| (r.merchant_id, r.currency, r.balance_minor, r.applied)).collect()
        };
        prop_assert_eq!(cur_balances(&a), cur_balances(&b));
        // And the pair moves the merchant's balance by exactly original + fix.
        let without = fold(s, &log);
        let balance = |x: &Exposure| x.current_rows().into_iter()
            .find(|r| r.merchant_id == original.merchant_id && r.currency == original.currency)
            .map_or(0, |r| r.balance_minor);
        prop_assert_eq!(
            balance(&a) - balance(&without),
            delta(&original) + delta(&fix)
        );
    }

    /// (e) Rows written incrementally (the rows an outcome touched, after each
    /// record) equal the rows rebuilt from the state, after every prefix.
    #[test]
    fn incremental_rows_equal_rows_built_at_the_end(s in settings(), steps in steps(200)) {
        let log = build_log(&s, &steps);
        let mut x = Exposure::new(s);
        let mut daily: BTreeMap<(String, Day, Currency), DailyRow> = BTreeMap::new();
        let mut current: BTreeMap<(String, Currency), CurrentRow> = BTreeMap::new();
        for (n, (p, r)) in log.iter().enumerate() {
            let out = x.apply(*p, r).unwrap();
            let state = x.partition(*p).unwrap();
            match (out.touched, fact_of(r)) {
                (Some(t), Some(f)) => {
                    for row in state.daily_rows_touched(&f.merchant_id, &t) {
                        daily.insert((row.merchant_id.clone(), row.day, row.currency), row);
                    }
                    let row = state.current_row(&f.merchant_id, t.currency).unwrap();
                    current.insert((row.merchant_id.clone(), row.currency), row);
                }
                (None, None) => prop_assert_eq!(out.status, Status::Heartbeat),
                _ => prop_assert!(false, "a fact always touches its rows"),
            }
            // The stream's rows after this prefix equal a replay's.
            if n % 7 == 0 || n + 1 == log.len() {
                prop_assert_eq!(daily.values().cloned().collect::<Vec<_>>(), x.daily_rows());
                prop_assert_eq!(current.values().cloned().collect::<Vec<_>>(), x.current_rows());
                let replay = fold(s, &log[..=n]);
                prop_assert_eq!(replay.daily_rows(), x.daily_rows());
            }
        }
    }

    /// (f) A checkpoint (the state's encoding) taken mid-log and resumed gives the
    /// same rows (but for the final days a stored state drops), and the same state
    /// bytes as the fold that never stopped: the encoding is canonical.
    #[test]
    fn checkpoint_mid_log_and_resume_gives_the_same_rows(
        s in settings(),
        steps in steps(200),
        at in any::<usize>(),
    ) {
        let log = build_log(&s, &steps);
        let k = at % (log.len() + 1);
        let mut states: BTreeMap<u32, PartitionState> = BTreeMap::new();
        let apply = |states: &mut BTreeMap<u32, PartitionState>, p: u32, r: &Record| {
            states.entry(p).or_insert_with(|| PartitionState::new(p, s)).apply(r).unwrap();
        };
        for (p, r) in &log[..k] {
            apply(&mut states, *p, r);
        }
        let mut resumed: BTreeMap<u32, PartitionState> = states
            .iter()
            .map(|(p, st)| {
                let bytes = st.encode();
                (*p, PartitionState::decode(&bytes, &s, *p).unwrap())
            })
            .collect();
        for (p, r) in &log[k..] {
            apply(&mut states, *p, r);
            apply(&mut resumed, *p, r);
        }
        for (p, st) in &states {
            let other = &resumed[p];
            // A stored state keeps no final day (R11); every other row is the same.
            let live = |rows: Vec<DailyRow>| -> Vec<DailyRow> {
                rows.into_iter().filter(|r| !st.is_final(r.day)).collect()
            };
            prop_assert_eq!(live(st.daily_rows()), live(other.daily_rows()));
            prop_assert!(other.daily_rows().iter().all(|r| st.daily_rows().contains(r)));
            prop_assert_eq!(st.current_rows(), other.current_rows());
            prop_assert_eq!(st.last_seq(), other.last_seq());
            prop_assert!(st.encode() == other.encode(), "state bytes differ after a resume");
        }
        prop_assert_eq!(states.len(), resumed.len());
    }
}
