//! The per-partition state machine: `apply` one record, then build rows.
//!
//! Partitions are independent: a merchant lives in exactly one, and day closure is
//! judged per partition. So any interleaving of partitions that keeps each
//! partition's order gives the same rows, and shards by partition merge by union.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::SEMANTICS_VERSION;
use crate::currency::Currency;
use crate::fact::{Fact, Record, RecordBody};
use crate::settings::{Settings, partition_of};
use crate::time::Day;

mod encoding;
pub use encoding::StateFileError;

/// Largest magnitude a `DECIMAL(38,0)` balance column can hold.
const MAX_MINOR: i128 = 10_i128.pow(38) - 1;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SemanticsError {
    #[error("merchant '{merchant_id}' belongs to partition {expected}, not to partition {actual}")]
    WrongPartition {
        merchant_id: String,
        expected: u32,
        actual: u32,
    },
    #[error(
        "balance of merchant '{merchant_id}' in {currency} would leave DECIMAL(38,0) at sequence {seq}"
    )]
    Overflow {
        merchant_id: String,
        currency: Currency,
        seq: u64,
    },
    #[error("cannot merge: {0}")]
    Merge(String),
}

/// What one record did; the projector turns it into row writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// The merchant's rows a fact changed: present for every fact read.
    pub touched: Option<Touched>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Applied,
    /// Same identity and content as a remembered event: counted, not applied.
    Duplicate,
    /// Same identity, other content: counted, not applied.
    Conflict,
    /// A fact of a day that can no longer change (docs/semantics.md R11): counted
    /// on its current row as `too_old`, not applied, changing no daily row.
    TooOld,
    Heartbeat,
    /// A sequence at or below the last one read (a redelivery): changes nothing.
    AlreadyRead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Touched {
    pub currency: Currency,
    pub day: Day,
    /// Applied events change the closing balance of their day and of every later
    /// day of the merchant and currency; duplicates and conflicts only count.
    pub balances_changed: bool,
}

/// `(merchant_id, day, currency)`: the columns of `merchant_exposure_daily`
/// (docs/semantics.md R6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyRow {
    pub merchant_id: String,
    pub day: Day,
    pub currency: Currency,
    pub closing_minor: i128,
    pub peak_minor: i128,
    pub peak_bucket_start_us: i64,
    pub applied: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub late: u64,
    pub restated: bool,
    /// The highest sequence of any record that changed the row: one counted on
    /// it, or an applied event of an earlier day that moved its balances.
    pub log_position: u64,
    pub semantics_version: u32,
}

/// `(merchant_id, currency)`: the open exposure right now (docs/semantics.md R7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentRow {
    pub merchant_id: String,
    pub currency: Currency,
    pub balance_minor: i128,
    /// The latest event_time among applied events.
    pub last_event_time_us: i64,
    pub applied: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub late: u64,
    /// Facts of days that could no longer change when they were read (R11).
    pub too_old: u64,
    pub log_position: u64,
    pub semantics_version: u32,
}

/// A partition's semantic state. Its stored bytes are [`PartitionState::encode`]'s,
/// the same for checkpoints and replay states; serde gives an inspection form
/// (JSON in tests, say) that is neither canonical nor stable.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionState {
    partition: u32,
    settings: Settings,
    last_seq: u64,
    /// Highest ingest_time of any record read in the partition; drives day closure.
    max_ingest_time_us: i64,
    merchants: FxHashMap<String, MerchantState>,
    /// Final days from this one on stay in memory (a replay keeps the days it
    /// publishes); earlier ones are folded into their book's carried balance.
    /// Not part of the state's meaning, and not encoded.
    keep_from: Day,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct MerchantState {
    /// Highest ingest_time of the merchant's facts read so far; drives identity expiry.
    max_ingest_time_us: i64,
    /// Keyed by the 128-bit xxh3 of event_id (docs/semantics.md R10): for a billion
    /// identities of one merchant the chance of any collision is below 2^-68.
    identities: FxHashMap<u128, Remembered>,
    prune_at: usize,
    books: Vec<CurrencyBook>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Remembered {
    content: u64,
    event_time_us: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CurrencyBook {
    currency: Currency,
    balance: i128,
    /// Sum of |delta|: bounds every prefix sum, so staying under MAX_MINOR here
    /// proves no closing or peak can overflow.
    gross: i128,
    last_event_time_us: i64,
    applied: u64,
    duplicates: u64,
    conflicts: u64,
    late: u64,
    /// Facts of final days (R11).
    too_old: u64,
    log_position: u64,
    /// The balance of the days no longer kept, carried into the first day kept.
    carried: i128,
    /// Sorted by day. Most events land on the newest day, so it is checked first.
    days: Vec<(Day, DayState)>,
}

impl CurrencyBook {
    /// The index of `day`'s state, inserted if missing.
    fn day_index(&mut self, day: Day) -> usize {
        if let Some((last, _)) = self.days.last()
            && *last == day
        {
            return self.days.len() - 1;
        }
        match self.days.binary_search_by_key(&day, |(d, _)| *d) {
            Ok(at) => at,
            Err(at) => {
                self.days.insert(at, (day, DayState::default()));
                at
            }
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct DayState {
    total: i128,
    /// Sparse deltas per bucket of the day, sorted by bucket index. The index is
    /// a u64: a valid bucket width may split a day into up to 86 400 000 000
    /// buckets (a u16 wrapped past 65 535). The tuple is 32 bytes (i128 alignment)
    /// whatever the index type, and serde formats with varints (postcard) encode
    /// a u64 below 65 536 exactly as they encoded the former u16.
    buckets: Vec<(u64, i128)>,
    applied: u64,
    duplicates: u64,
    conflicts: u64,
    late: u64,
    restated: bool,
    log_position: u64,
}

const MIN_PRUNE_AT: usize = 64;

/// R11, judged with the partition clock `clock`.
fn is_final(settings: &Settings, clock: i64, day: Day) -> bool {
    clock
        >= day
            .end_us()
            .saturating_add(settings.dedup_horizon_us)
            .saturating_add(settings.allowed_lateness_us)
}

/// R2 with R11: a remembered identity matches no more once the merchant's clock
/// passed its event time plus the horizon, or once its day is final.
fn identity_expired(
    settings: &Settings,
    partition_clock: i64,
    merchant_clock: i64,
    r: &Remembered,
) -> bool {
    merchant_clock > r.event_time_us.saturating_add(settings.dedup_horizon_us)
        || is_final(settings, partition_clock, Day::of_micros(r.event_time_us))
}

impl MerchantState {
    fn new() -> Self {
        Self {
            max_ingest_time_us: i64::MIN,
            identities: FxHashMap::default(),
            prune_at: MIN_PRUNE_AT,
            books: Vec::new(),
        }
    }

    /// How many identities a merchant may hold before the next prune.
    fn next_prune(remembered: usize) -> usize {
        (remembered * 2).max(MIN_PRUNE_AT)
    }

    fn book(&self, currency: Currency) -> Option<&CurrencyBook> {
        self.books.iter().find(|b| b.currency == currency)
    }
}

fn book_mut(books: &mut Vec<CurrencyBook>, currency: Currency) -> &mut CurrencyBook {
    let at = match books.iter().position(|b| b.currency == currency) {
        Some(at) => at,
        None => {
            books.push(CurrencyBook {
                currency,
                balance: 0,
                gross: 0,
                last_event_time_us: i64::MIN,
                applied: 0,
                duplicates: 0,
                conflicts: 0,
                late: 0,
                too_old: 0,
                log_position: 0,
                carried: 0,
                days: Vec::new(),
            });
            books.len() - 1
        }
    };
    &mut books[at]
}

impl PartitionState {
    pub fn new(partition: u32, settings: Settings) -> Self {
        Self {
            partition,
            settings,
            last_seq: 0,
            max_ingest_time_us: i64::MIN,
            merchants: FxHashMap::default(),
            keep_from: Day(i32::MIN),
        }
    }

    /// Keeps final days from `day` on in memory (every one by default), so that
    /// [`PartitionState::daily_rows`] still gives them; earlier final days are
    /// dropped as their merchants are read. The stream projector keeps none
    /// (`Day(i32::MAX)`): its rows are written as they change, and its state stays
    /// bounded by the recent horizon. Changes no row and no state byte.
    pub fn keep_final_days_from(&mut self, day: Day) {
        self.keep_from = day;
    }

    /// Whether `day` can no longer change in this partition (R11): the partition's
    /// clock has reached its end plus the dedup horizon plus the allowed lateness,
    /// so no event ingest accepts (with a clock that is not behind by more than the
    /// allowed lateness) can fall on it.
    pub fn is_final(&self, day: Day) -> bool {
        is_final(&self.settings, self.max_ingest_time_us, day)
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The sequence of the last record read; the next one to read is above it.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Identities currently remembered across all merchants (expired ones may linger
    /// until the next prune).
    pub fn identities_remembered(&self) -> usize {
        self.merchants.values().map(|m| m.identities.len()).sum()
    }

    /// Folds one record. Records at or below the last sequence read are ignored, so
    /// a redelivery changes nothing. On error the state is unchanged.
    pub fn apply(&mut self, record: &Record) -> Result<Outcome, SemanticsError> {
        if record.seq <= self.last_seq {
            return Ok(Outcome {
                status: Status::AlreadyRead,
                touched: None,
            });
        }
        let outcome = match &record.body {
            RecordBody::Heartbeat => Outcome {
                status: Status::Heartbeat,
                touched: None,
            },
            RecordBody::Fact(fact) => self.apply_fact(record, fact)?,
        };
        self.last_seq = record.seq;
        self.max_ingest_time_us = self.max_ingest_time_us.max(record.ingest_time_us);
        Ok(outcome)
    }

    fn apply_fact(&mut self, record: &Record, fact: &Fact) -> Result<Outcome, SemanticsError> {
        let settings = self.settings;
        let keep_from = self.keep_from;
        // The partition's clock from *before* this record decides closure
        // (docs/semantics.md R5).
        let partition_max_ingest = self.max_ingest_time_us;
        let is_closed = |d: Day| {
            partition_max_ingest >= d.end_us().saturating_add(settings.allowed_lateness_us)
        };
        let day = Day::of_micros(fact.event_time_us);
        let key = xxhash_rust::xxh3::xxh3_128(fact.event_id.as_bytes());
        let content = fact.content_hash();
        let seq = record.seq;

        let merchant = match self.merchants.get_mut(fact.merchant_id.as_str()) {
            Some(m) => m,
            None => {
                // A merchant's partition never changes: checking its first fact suffices.
                let expected = partition_of(&fact.merchant_id, settings.partitions);
                if expected != self.partition {
                    return Err(SemanticsError::WrongPartition {
                        merchant_id: fact.merchant_id.clone(),
                        expected,
                        actual: self.partition,
                    });
                }
                self.merchants
                    .entry(fact.merchant_id.clone())
                    .or_insert_with(MerchantState::new)
            }
        };
        let status = match merchant.identities.get(&key) {
            // Its day can no longer change (R11), whatever its identity.
            _ if is_final(&settings, partition_max_ingest, day) => Status::TooOld,
            Some(seen)
                if !identity_expired(
                    &settings,
                    partition_max_ingest,
                    merchant.max_ingest_time_us,
                    seen,
                ) =>
            {
                if seen.content == content {
                    Status::Duplicate
                } else {
                    Status::Conflict
                }
            }
            // Never seen, or expired (docs/semantics.md R2): new.
            _ => Status::Applied,
        };

        let book = book_mut(&mut merchant.books, fact.currency);
        match status {
            Status::Applied => {
                // Exact balances; passing the gross bound is an error (docs/semantics.md R4).
                let delta = fact.kind.signed_delta(fact.amount_minor);
                let gross = book
                    .gross
                    .checked_add(delta.abs())
                    .filter(|g| *g <= MAX_MINOR)
                    .ok_or_else(|| SemanticsError::Overflow {
                        merchant_id: fact.merchant_id.clone(),
                        currency: fact.currency,
                        seq,
                    })?;
                // Late: older than the allowed lateness at ingest (docs/semantics.md R3).
                let late = u64::from(
                    record.ingest_time_us.saturating_sub(fact.event_time_us)
                        > settings.allowed_lateness_us,
                );
                book.gross = gross;
                book.balance += delta;
                book.last_event_time_us = book.last_event_time_us.max(fact.event_time_us);
                book.applied += 1;
                book.late += late;
                book.log_position = seq;

                // In 0..buckets_per_day: the event lies inside its day.
                let bucket =
                    ((fact.event_time_us - day.start_us()) / settings.bucket_width_us) as u64;
                let at = book.day_index(day);
                let today = &mut book.days[at].1;
                today.total += delta;
                match today.buckets.binary_search_by_key(&bucket, |(b, _)| *b) {
                    Ok(at) => today.buckets[at].1 += delta,
                    Err(at) => today.buckets.insert(at, (bucket, delta)),
                }
                today.applied += 1;
                today.late += late;
                // This day and every later one of the merchant and currency moved;
                // those already closed are restated (docs/semantics.md R6).
                for (d, state) in &mut book.days[at..] {
                    state.log_position = seq;
                    state.restated |= is_closed(*d);
                }
                merchant.identities.insert(
                    key,
                    Remembered {
                        content,
                        event_time_us: fact.event_time_us,
                    },
                );
            }
            Status::Duplicate | Status::Conflict => {
                book.log_position = seq;
                let at = book.day_index(day);
                let today = &mut book.days[at].1;
                if status == Status::Duplicate {
                    book.duplicates += 1;
                    today.duplicates += 1;
                } else {
                    book.conflicts += 1;
                    today.conflicts += 1;
                }
                today.log_position = seq;
            }
            Status::TooOld => {
                book.too_old += 1;
                book.log_position = seq;
            }
            Status::Heartbeat | Status::AlreadyRead => unreachable!("a fact is read as one"),
        }
        // Final days never change again: fold those not kept into the carried
        // balance, so that state grows with the recent horizon, not with history.
        let clock = partition_max_ingest.max(record.ingest_time_us);
        let dropped = book
            .days
            .iter()
            .take_while(|(d, _)| *d < keep_from && is_final(&settings, clock, *d))
            .count();
        if dropped > 0 {
            book.carried += book
                .days
                .drain(..dropped)
                .map(|(_, d)| d.total)
                .sum::<i128>();
        }

        merchant.max_ingest_time_us = merchant.max_ingest_time_us.max(record.ingest_time_us);
        if merchant.identities.len() > merchant.prune_at {
            let now = merchant.max_ingest_time_us;
            merchant
                .identities
                .retain(|_, r| !identity_expired(&settings, clock, now, r));
            merchant.prune_at = MerchantState::next_prune(merchant.identities.len());
        }

        Ok(Outcome {
            status,
            touched: Some(Touched {
                currency: fact.currency,
                day,
                balances_changed: status == Status::Applied,
            }),
        })
    }

    /// The daily rows a fact's outcome changed: its own day's row, and with moved
    /// balances every later row of that merchant and currency.
    pub fn daily_rows_touched(&self, merchant_id: &str, touched: &Touched) -> Vec<DailyRow> {
        let Some(book) = self
            .merchants
            .get(merchant_id)
            .and_then(|m| m.book(touched.currency))
        else {
            return Vec::new();
        };
        let last = if touched.balances_changed {
            None
        } else {
            Some(touched.day)
        };
        self.rows_of_book(merchant_id, book, touched.day, last)
    }

    /// Every daily row of the partition, sorted by (merchant_id, day, currency).
    pub fn daily_rows(&self) -> Vec<DailyRow> {
        self.rows_between(Day(i32::MIN), None)
    }

    /// The daily rows of days `from..=to`, sorted like [`PartitionState::daily_rows`]:
    /// a replay publishes a day range, and building the others costs as much as
    /// the state is large.
    pub fn daily_rows_between(&self, from: Day, to: Day) -> Vec<DailyRow> {
        self.rows_between(from, Some(to))
    }

    fn rows_between(&self, from: Day, to: Option<Day>) -> Vec<DailyRow> {
        let mut rows = Vec::new();
        for (merchant_id, merchant) in &self.merchants {
            for book in &merchant.books {
                rows.extend(self.rows_of_book(merchant_id, book, from, to));
            }
        }
        rows.sort_by(|a, b| {
            (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
        });
        rows
    }

    pub fn current_row(&self, merchant_id: &str, currency: Currency) -> Option<CurrentRow> {
        let book = self.merchants.get(merchant_id)?.book(currency)?;
        Some(current_row_of(merchant_id, book))
    }

    /// Every current row of the partition, sorted by (merchant_id, currency).
    pub fn current_rows(&self) -> Vec<CurrentRow> {
        let mut rows: Vec<CurrentRow> = self
            .merchants
            .iter()
            .flat_map(|(id, m)| m.books.iter().map(move |b| current_row_of(id, b)))
            .collect();
        rows.sort_by(|a, b| (&a.merchant_id, a.currency).cmp(&(&b.merchant_id, b.currency)));
        rows
    }

    /// Rows of one merchant and currency for days `from..=last` (all later days when
    /// `last` is None). Closing balances are cumulative, so the walk starts from the
    /// sum of all earlier days.
    fn rows_of_book(
        &self,
        merchant_id: &str,
        book: &CurrencyBook,
        from: Day,
        last: Option<Day>,
    ) -> Vec<DailyRow> {
        let width = self.settings.bucket_width_us;
        let start = book.days.partition_point(|(d, _)| *d < from);
        let mut balance: i128 = book.carried
            + book.days[..start]
                .iter()
                .map(|(_, d)| d.total)
                .sum::<i128>();
        let mut rows = Vec::new();
        for (day, state) in &book.days[start..] {
            if last.is_some_and(|l| *day > l) {
                break;
            }
            // Balances are constant between buckets holding deltas, so the earliest
            // bucket end reaching the peak is bucket 0 or one that holds a delta.
            let opening = balance;
            let first_delta = match state.buckets.first() {
                Some((0, delta)) => *delta,
                _ => 0,
            };
            let mut peak = (opening + first_delta, 0u64);
            let mut running = opening;
            for (bucket, delta) in &state.buckets {
                running += delta;
                if running > peak.0 {
                    peak = (running, *bucket);
                }
            }
            balance = opening + state.total;
            rows.push(DailyRow {
                merchant_id: merchant_id.to_string(),
                day: *day,
                currency: book.currency,
                closing_minor: balance,
                peak_minor: peak.0,
                peak_bucket_start_us: day.start_us() + peak.1 as i64 * width,
                applied: state.applied,
                duplicates: state.duplicates,
                conflicts: state.conflicts,
                late: state.late,
                restated: state.restated,
                log_position: state.log_position,
                semantics_version: SEMANTICS_VERSION,
            });
        }
        rows
    }
}

fn current_row_of(merchant_id: &str, book: &CurrencyBook) -> CurrentRow {
    CurrentRow {
        merchant_id: merchant_id.to_string(),
        currency: book.currency,
        balance_minor: book.balance,
        last_event_time_us: if book.applied == 0 {
            0
        } else {
            book.last_event_time_us
        },
        applied: book.applied,
        duplicates: book.duplicates,
        conflicts: book.conflicts,
        late: book.late,
        too_old: book.too_old,
        log_position: book.log_position,
        semantics_version: SEMANTICS_VERSION,
    }
}
