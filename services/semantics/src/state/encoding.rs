//! The one encoding of a partition's state, shared by projector checkpoints and
//! replay states (docs/storage.md, "State files").
//!
//! Canonical: merchants sorted by id, identities by key, currency books by
//! currency; identities that can no longer match (R2) and final days (R11, their
//! balance carried) left out. So the same fold gives the same bytes however it was
//! restored and continued, and state grows with the recent horizon, not with
//! history. Nothing
//! that only schedules work (when to prune next) is written. The version key
//! comes first after the format, so a reader refuses state of another projection
//! before trusting anything else in it.
//!
//! Format 1, written by the first releases as the projector's checkpoint, stays
//! readable: it is decoded through frozen copies of its structs below.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::{
    CurrencyBook, DayState, MAX_MINOR, MerchantState, PartitionState, Remembered, identity_expired,
    is_final,
};
use crate::currency::Currency;
use crate::settings::{Settings, partition_of};
use crate::time::{Day, MICROS_PER_DAY};
use crate::{SEMANTICS_VERSION, STATE_FORMAT};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StateFileError {
    #[error("the state is unreadable: {0}")]
    Unreadable(String),
    #[error("the state has format {0}; this build reads formats 1 and {STATE_FORMAT}")]
    Format(u32),
    #[error(
        "the state was folded under version key {found}, this projection's is {expected}; \
         it cannot be continued under other settings or semantics"
    )]
    VersionKey { found: String, expected: String },
    #[error(
        "the state was written under semantics {semantics_version} with settings [{found}], \
         this projection folds semantics {SEMANTICS_VERSION} with [{expected}]"
    )]
    Legacy {
        semantics_version: u32,
        found: String,
        expected: String,
    },
    #[error("the state holds partition {found}, not partition {expected}")]
    Partition { found: u32, expected: u32 },
    #[error("the state is not one a fold can reach: {0}")]
    Invalid(String),
}

/// The days whose start and end are both microseconds an `i64` holds: every day of
/// an event time ingest accepts, with room for the fold's arithmetic on them.
const FIRST_DAY: i32 = -106_751_991;
const LAST_DAY: i32 = 106_751_990;

#[derive(Serialize, Deserialize)]
struct File {
    state_format: u32,
    version_key: String,
    partition: u32,
    last_seq: u64,
    max_ingest_time_us: i64,
    merchants: Vec<MerchantFile>,
}

#[derive(Serialize, Deserialize)]
struct MerchantFile {
    merchant_id: String,
    max_ingest_time_us: i64,
    /// (key, content, event_time_us), sorted by key.
    identities: Vec<(u128, u64, i64)>,
    books: Vec<BookFile>,
}

#[derive(Serialize, Deserialize)]
struct BookFile {
    currency: Currency,
    balance: i128,
    gross: i128,
    last_event_time_us: i64,
    applied: u64,
    duplicates: u64,
    conflicts: u64,
    late: u64,
    too_old: u64,
    log_position: u64,
    carried: i128,
    days: Vec<(Day, DayFile)>,
}

#[derive(Serialize, Deserialize)]
struct DayFile {
    total: i128,
    buckets: Vec<(u64, i128)>,
    applied: u64,
    duplicates: u64,
    conflicts: u64,
    late: u64,
    restated: bool,
    log_position: u64,
}

impl PartitionState {
    /// The canonical bytes of this state (see the module's comment).
    pub fn encode(&self) -> Vec<u8> {
        let (settings, clock) = (&self.settings, self.max_ingest_time_us);
        let mut merchants: Vec<MerchantFile> = self
            .merchants
            .iter()
            .map(|(id, m)| {
                let mut identities: Vec<(u128, u64, i64)> = m
                    .identities
                    .iter()
                    .filter(|(_, r)| !identity_expired(settings, clock, m.max_ingest_time_us, r))
                    .map(|(k, r)| (*k, r.content, r.event_time_us))
                    .collect();
                identities.sort_unstable_by_key(|(k, _, _)| *k);
                let mut books: Vec<BookFile> = m
                    .books
                    .iter()
                    .map(|b| book_file(b, |d| is_final(settings, clock, d)))
                    .collect();
                books.sort_unstable_by_key(|b| b.currency);
                MerchantFile {
                    merchant_id: id.clone(),
                    max_ingest_time_us: m.max_ingest_time_us,
                    identities,
                    books,
                }
            })
            .collect();
        merchants.sort_unstable_by(|a, b| a.merchant_id.cmp(&b.merchant_id));
        let file = File {
            state_format: STATE_FORMAT,
            version_key: self.settings.version_key(),
            partition: self.partition,
            last_seq: self.last_seq,
            max_ingest_time_us: self.max_ingest_time_us,
            merchants,
        };
        postcard::to_stdvec(&file).expect("a state always serialises")
    }

    /// Reads state of `partition` to be continued under `settings`: this format
    /// with the same version key, or format 1 folded under the same semantics and
    /// all the same settings.
    pub fn decode(
        bytes: &[u8],
        settings: &Settings,
        partition: u32,
    ) -> Result<PartitionState, StateFileError> {
        let unreadable = |e: postcard::Error| StateFileError::Unreadable(e.to_string());
        // The format comes first, so it can be read whatever follows it.
        let (format, _): (u32, _) = postcard::take_from_bytes(bytes).map_err(unreadable)?;
        let state = match format {
            STATE_FORMAT => {
                let file: File = postcard::from_bytes(bytes).map_err(unreadable)?;
                let expected = settings.version_key();
                if file.version_key != expected {
                    return Err(StateFileError::VersionKey {
                        found: file.version_key,
                        expected,
                    });
                }
                from_file(file, *settings)?
            }
            1 => legacy::decode(bytes, settings)?,
            other => return Err(StateFileError::Format(other)),
        };
        if state.partition != partition {
            return Err(StateFileError::Partition {
                found: state.partition,
                expected: partition,
            });
        }
        Ok(state)
    }
}

/// A book as stored: final days are never stored, only their carried balance.
fn book_file(b: &CurrencyBook, is_final: impl Fn(Day) -> bool) -> BookFile {
    let dropped = b.days.iter().take_while(|(d, _)| is_final(*d)).count();
    BookFile {
        currency: b.currency,
        balance: b.balance,
        gross: b.gross,
        last_event_time_us: b.last_event_time_us,
        applied: b.applied,
        duplicates: b.duplicates,
        conflicts: b.conflicts,
        late: b.late,
        too_old: b.too_old,
        log_position: b.log_position,
        carried: b.carried + b.days[..dropped].iter().map(|(_, d)| d.total).sum::<i128>(),
        days: b.days[dropped..]
            .iter()
            .map(|(day, d)| {
                (
                    *day,
                    DayFile {
                        total: d.total,
                        buckets: d.buckets.clone(),
                        applied: d.applied,
                        duplicates: d.duplicates,
                        conflicts: d.conflicts,
                        late: d.late,
                        restated: d.restated,
                        log_position: d.log_position,
                    },
                )
            })
            .collect(),
    }
}

/// Checks what the fold guarantees of every state it builds and the rows and
/// encoding rely on, so that state bytes from outside (a corrupt or forged object)
/// are refused here instead of overflowing or misreading later: merchants of this
/// partition; a book per currency; days and buckets in order, inside the range of
/// representable days and of a day's buckets; and the balances bounded by `gross`
/// as docs/semantics.md R4 bounds them (each day's total the sum of its buckets,
/// the balance the carried balance plus the days', every prefix sum within gross).
fn validate(file: &File, settings: &Settings) -> Result<(), StateFileError> {
    let invalid = |what: String| Err(StateFileError::Invalid(what));
    let days_ok = |d: Day| (FIRST_DAY..=LAST_DAY).contains(&d.0);
    let buckets_per_day = (MICROS_PER_DAY / settings.bucket_width_us) as u64;
    for m in &file.merchants {
        let id = &m.merchant_id;
        if partition_of(id, settings.partitions) != file.partition {
            return invalid(format!(
                "merchant '{id}' is not of partition {}",
                file.partition
            ));
        }
        if let Some((_, _, t)) = m
            .identities
            .iter()
            .find(|(_, _, t)| !days_ok(Day::of_micros(*t)))
        {
            return invalid(format!("merchant '{id}' remembers an event at {t} µs"));
        }
        for (i, b) in m.books.iter().enumerate() {
            let book = format!("merchant '{id}' in {}", b.currency);
            if m.books[..i].iter().any(|o| o.currency == b.currency) {
                return invalid(format!("{book}: a second book"));
            }
            if !(0..=MAX_MINOR).contains(&b.gross) {
                return invalid(format!("{book}: gross {} out of range", b.gross));
            }
            // |carried| plus every bucket's |delta| bounds every prefix sum.
            let mut bound = b.carried.unsigned_abs();
            let mut balance = b.carried;
            for (j, (day, d)) in b.days.iter().enumerate() {
                if !days_ok(*day) || (j > 0 && b.days[j - 1].0 >= *day) {
                    return invalid(format!("{book}: day {} out of order or range", day.0));
                }
                let mut total: i128 = 0;
                for (k, (bucket, delta)) in d.buckets.iter().enumerate() {
                    if *bucket >= buckets_per_day || (k > 0 && d.buckets[k - 1].0 >= *bucket) {
                        return invalid(format!(
                            "{book}, day {day}: bucket {bucket} out of order or range"
                        ));
                    }
                    bound = bound.saturating_add(delta.unsigned_abs());
                    total = total.saturating_add(*delta);
                }
                if bound > b.gross.unsigned_abs() || total != d.total {
                    return invalid(format!(
                        "{book}, day {day}: balances beyond gross {}",
                        b.gross
                    ));
                }
                balance += d.total;
            }
            if balance != b.balance {
                return invalid(format!(
                    "{book}: balance {} is not its days' {balance}",
                    b.balance
                ));
            }
        }
    }
    Ok(())
}

fn from_file(file: File, settings: Settings) -> Result<PartitionState, StateFileError> {
    validate(&file, &settings)?;
    let merchants = file
        .merchants
        .into_iter()
        .map(|m| {
            let identities: FxHashMap<u128, Remembered> = m
                .identities
                .into_iter()
                .map(|(k, content, event_time_us)| {
                    (
                        k,
                        Remembered {
                            content,
                            event_time_us,
                        },
                    )
                })
                .collect();
            let books = m
                .books
                .into_iter()
                .map(|b| CurrencyBook {
                    currency: b.currency,
                    balance: b.balance,
                    gross: b.gross,
                    last_event_time_us: b.last_event_time_us,
                    applied: b.applied,
                    duplicates: b.duplicates,
                    conflicts: b.conflicts,
                    late: b.late,
                    too_old: b.too_old,
                    log_position: b.log_position,
                    carried: b.carried,
                    days: b
                        .days
                        .into_iter()
                        .map(|(day, d)| {
                            (
                                day,
                                DayState {
                                    total: d.total,
                                    buckets: d.buckets,
                                    applied: d.applied,
                                    duplicates: d.duplicates,
                                    conflicts: d.conflicts,
                                    late: d.late,
                                    restated: d.restated,
                                    log_position: d.log_position,
                                },
                            )
                        })
                        .collect(),
                })
                .collect();
            let merchant = MerchantState {
                max_ingest_time_us: m.max_ingest_time_us,
                prune_at: MerchantState::next_prune(identities.len()),
                identities,
                books,
            };
            (m.merchant_id, merchant)
        })
        .collect();
    Ok(PartitionState {
        partition: file.partition,
        settings,
        last_seq: file.last_seq,
        max_ingest_time_us: file.max_ingest_time_us,
        merchants,
        keep_from: Day(i32::MIN),
    })
}

/// Format 1 as the first releases wrote it: postcard of these structs, field for
/// field. Frozen: changing them would make those checkpoints unreadable.
mod legacy {
    use super::*;

    #[derive(Deserialize)]
    struct Checkpoint {
        _state_format: u32,
        semantics_version: u32,
        _settings_fingerprint: String,
        settings: Settings,
        state: State,
    }

    #[derive(Deserialize)]
    struct State {
        partition: u32,
        _settings: Settings,
        last_seq: u64,
        max_ingest_time_us: i64,
        merchants: Vec<(String, Merchant)>,
    }

    #[derive(Deserialize)]
    struct Merchant {
        max_ingest_time_us: i64,
        identities: Vec<(u128, (u64, i64))>,
        _prune_at: usize,
        books: Vec<Book>,
    }

    #[derive(Deserialize)]
    struct Book {
        currency: Currency,
        balance: i128,
        gross: i128,
        last_event_time_us: i64,
        applied: u64,
        duplicates: u64,
        conflicts: u64,
        late: u64,
        log_position: u64,
        days: Vec<(Day, DayFile)>,
    }

    pub(super) fn decode(
        bytes: &[u8],
        settings: &Settings,
    ) -> Result<PartitionState, StateFileError> {
        let old: Checkpoint = postcard::from_bytes(bytes)
            .map_err(|e| StateFileError::Unreadable(format!("format 1: {e}")))?;
        if old.semantics_version != SEMANTICS_VERSION || old.settings != *settings {
            return Err(StateFileError::Legacy {
                semantics_version: old.semantics_version,
                found: old.settings.legacy_canonical(),
                expected: settings.legacy_canonical(),
            });
        }
        let s = old.state;
        let file = File {
            state_format: STATE_FORMAT,
            version_key: settings.version_key(),
            partition: s.partition,
            last_seq: s.last_seq,
            max_ingest_time_us: s.max_ingest_time_us,
            merchants: s
                .merchants
                .into_iter()
                .map(|(merchant_id, m)| MerchantFile {
                    merchant_id,
                    max_ingest_time_us: m.max_ingest_time_us,
                    identities: m
                        .identities
                        .into_iter()
                        .map(|(k, (content, event_time_us))| (k, content, event_time_us))
                        .collect(),
                    books: m
                        .books
                        .into_iter()
                        .map(|b| BookFile {
                            currency: b.currency,
                            balance: b.balance,
                            gross: b.gross,
                            last_event_time_us: b.last_event_time_us,
                            applied: b.applied,
                            duplicates: b.duplicates,
                            conflicts: b.conflicts,
                            late: b.late,
                            too_old: 0,
                            log_position: b.log_position,
                            carried: 0,
                            days: b.days,
                        })
                        .collect(),
                })
                .collect(),
        };
        from_file(file, *settings)
    }
}
