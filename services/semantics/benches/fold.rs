//! Folding a realistic log through `PartitionState::apply`.
//!
//! 1 000 000 pre-generated records: 10 000 merchants (skewed: a few large ones,
//! a long tail), 16 partitions, USD/EUR/JPY, ~2% exact resends (duplicates), ~0.2%
//! conflicts, ~1% late events, heartbeats, over ten days of ingest time. Records
//! are split by partition beforehand; each partition folds in its own state, as a
//! projector does. Throughput is in events (records) per second.
//!
//! `cargo bench -p payledger-semantics --bench fold`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use payledger_semantics::{
    Currency, EventKind, Fact, PartitionState, Record, RecordBody, Settings, partition_of,
};

const RECORDS: usize = 1_000_000;
const MERCHANTS: u64 = 10_000;
const T0: i64 = 1_709_251_200_000_000; // 2024-03-01T00:00:00Z
const SEC: i64 = 1_000_000;
/// Ten days of ingest time over the log.
const SPAN: i64 = 10 * 86_400 * SEC;

/// SplitMix64: a fixed, dependency-free stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The log, pre-split by partition (each part in sequence order).
fn generate(settings: &Settings) -> Vec<Vec<Record>> {
    let mut rng = Rng(0x5EED);
    let currencies = ["USD", "EUR", "JPY"].map(|c| Currency::parse(c).unwrap());
    let merchants: Vec<String> = (0..MERCHANTS).map(|i| format!("merchant-{i:05}")).collect();
    let mut parts: Vec<Vec<Record>> = vec![Vec::new(); settings.partitions as usize];
    let mut recent: Vec<Fact> = Vec::with_capacity(4096);
    let mut last_beat = vec![T0; settings.partitions as usize];
    let mut seq = 0u64;
    let mut n = 0usize;
    while n < RECORDS {
        let ingest = T0 + (n as i64) * (SPAN / RECORDS as i64);
        seq += 1;
        let roll = rng.below(1000);
        let fact = if roll < 20 && !recent.is_empty() {
            // ~2%: an exact resend of a recent event.
            recent[rng.below(recent.len() as u64) as usize].clone()
        } else if roll < 22 && !recent.is_empty() {
            // ~0.2%: a conflict (same identity, other amount).
            let mut f = recent[rng.below(recent.len() as u64) as usize].clone();
            f.amount_minor += 1;
            f
        } else {
            // Skewed merchants: u^3 puts many events on few merchants.
            let u = rng.unit();
            let merchant = &merchants[((u * u * u) * MERCHANTS as f64) as usize];
            let late = rng.below(100) == 0;
            let lag = if late {
                (3_600 + rng.below(30 * 3_600) as i64) * SEC
            } else {
                rng.below(60) as i64 * SEC
            };
            let (kind, amount) = match rng.below(100) {
                0..=69 => (EventKind::PaymentCaptured, 1 + rng.below(50_000) as i64),
                70..=79 => (EventKind::RefundIssued, 1 + rng.below(20_000) as i64),
                80..=94 => (EventKind::SettlementReceived, 1 + rng.below(100_000) as i64),
                95..=97 => (EventKind::ChargebackOpened, 1 + rng.below(50_000) as i64),
                _ => (EventKind::ChargebackReversed, 1 + rng.below(50_000) as i64),
            };
            let f = Fact {
                event_id: format!("evt-{seq:09}"),
                merchant_id: merchant.clone(),
                kind,
                amount_minor: amount,
                currency: currencies[rng.below(3) as usize],
                event_time_us: ingest - lag,
                corrects_event_id: None,
            };
            if recent.len() < 4096 {
                recent.push(f.clone());
            } else {
                let at = rng.below(4096) as usize;
                recent[at] = f.clone();
            }
            f
        };
        let p = partition_of(&fact.merchant_id, settings.partitions) as usize;
        parts[p].push(Record {
            seq,
            ingest_time_us: ingest,
            body: RecordBody::Fact(fact),
        });
        n += 1;
        // A heartbeat to every partition quiet for a minute (rare at this rate,
        // but the log carries them like any other record).
        for (q, beat) in last_beat.iter_mut().enumerate() {
            if q == p {
                *beat = ingest;
            } else if ingest - *beat > 60 * SEC && n < RECORDS {
                seq += 1;
                parts[q].push(Record {
                    seq,
                    ingest_time_us: ingest,
                    body: RecordBody::Heartbeat,
                });
                *beat = ingest;
                n += 1;
            }
        }
    }
    parts
}

fn fold(settings: Settings, parts: &[Vec<Record>]) -> Vec<PartitionState> {
    parts
        .iter()
        .enumerate()
        .map(|(p, records)| {
            let mut st = PartitionState::new(p as u32, settings);
            for r in records {
                black_box(st.apply(r).unwrap());
            }
            st
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let settings = Settings::default();
    // Each partition's records are cloned so that their strings lie in memory in log
    // order, as records freshly decoded from the log do; otherwise every record's
    // event id is a cache miss that no projector pays.
    let parts: Vec<Vec<Record>> = generate(&settings).iter().map(|p| p.to_vec()).collect();
    let total: usize = parts.iter().map(Vec::len).sum();
    assert_eq!(total, RECORDS);

    let mut group = c.benchmark_group("fold");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(total as u64));

    // Freeing the folded state is left out: a projector keeps it, a replay frees it once.
    group.bench_function("apply_1m_records_16_partitions", |b| {
        b.iter_with_large_drop(|| fold(settings, black_box(&parts)))
    });

    // The streaming projector's path: after each record, build the rows it
    // touched (own day and, for applied events, later days) and the current row.
    group.bench_function("apply_and_build_touched_rows_1m", |b| {
        b.iter(|| {
            let mut rows = 0usize;
            for (p, records) in parts.iter().enumerate() {
                let mut st = PartitionState::new(p as u32, settings);
                for r in records {
                    let out = st.apply(r).unwrap();
                    if let (Some(t), RecordBody::Fact(f)) = (out.touched, &r.body) {
                        rows += st.daily_rows_touched(&f.merchant_id, &t).len();
                        rows += usize::from(st.current_row(&f.merchant_id, t.currency).is_some());
                    }
                }
            }
            black_box(rows)
        })
    });
    group.finish();

    // Building every row of a folded log at once (what a replay shard writes).
    let folded = fold(settings, &parts);
    let rows: usize = folded.iter().map(|st| st.daily_rows().len()).sum();
    let mut group = c.benchmark_group("rows");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(rows as u64));
    group.bench_function("daily_rows_of_folded_log", |b| {
        b.iter(|| folded.iter().map(|st| st.daily_rows().len()).sum::<usize>())
    });
    group.finish();
}

criterion_group!(fold_benches, benches);
criterion_main!(fold_benches);
