//! The one definition of derived state (docs/semantics.md, rules R1-R10).
//!
//! Pure functions from log records to exposure rows: no I/O, no async, no wall
//! clock. The streaming projector and the replay both call exactly these, so the
//! same log prefix yields the same rows on either path. Every rule depends only on
//! the records read so far, in log order per partition.
//!
//! * [`PartitionState::apply`] folds one record and says what it changed ([`Outcome`]).
//! * [`PartitionState::daily_rows_touched`] and friends build the rows.
//! * [`DimensionBook`] and [`to_reporting`] apply FX and risk dimensions at read time.
//!
//! Money is exact: `i64` minor units in, `i128` balances inside, overflow is an
//! error. Time is UTC microseconds.

mod currency;
mod dims;
mod exposure;
mod fact;
mod identity;
mod settings;
mod state;
mod time;

pub use currency::{Currency, CurrencyError};
pub use dims::{
    DimOutcome, DimensionBook, DimensionError, FxRecord, FxUsed, Held, MAX_EFFECTIVE_DAY,
    MAX_RESERVE_BPS, MAX_TIER_BYTES, MIN_EFFECTIVE_DAY, Overflow, REPORTING_CURRENCY, Rate,
    RateError, Reporting, RiskRecord, RiskUsed, to_reporting,
};
pub use exposure::Exposure;
pub use fact::{
    EventKind, Fact, FactError, KINDS, KindInfo, MAX_EVENT_ID_BYTES, MAX_MERCHANT_ID_BYTES, Record,
    RecordBody, check_event_time, check_id,
};
pub use identity::message_id;
pub use settings::{
    ProjectionSettings, RecordedStream, Settings, SettingsError, StreamSettings, fnv1a_64,
    partition_of,
};
pub use state::{
    CurrentRow, DailyRow, Outcome, PartitionState, SemanticsError, StateFileError, Status, Touched,
};
pub use time::{Day, DayParseError, MICROS_PER_DAY};

/// Changes with any change of meaning; written into every row, checkpoint and manifest.
/// 2: final days (docs/semantics.md R11) — a fact of a day that can no longer
/// change is counted as too old instead of restating it, and identities of such
/// days match no more.
pub const SEMANTICS_VERSION: u32 = 2;

/// Changes with any change of how [`PartitionState`] is encoded or hashed, even
/// without a change of meaning; part of the version key. 2: the canonical encoding
/// shared by checkpoints and replay states (format 1, the first checkpoints,
/// stays readable).
pub const STATE_FORMAT: u32 = 2;
