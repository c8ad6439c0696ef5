//! Dimensions (docs/semantics.md R8): versioned FX and risk records, applied at read time by
//! one pure function, [`to_reporting`].

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::currency::Currency;
use crate::fact::{FactError, MAX_MERCHANT_ID_BYTES, check_id};
use crate::state::DailyRow;
use crate::time::Day;

pub const REPORTING_CURRENCY: Currency = Currency::USD;

/// A decimal rate as received (`"1.0842"`), kept exact as mantissa × 10^-scale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    text: String,
    mantissa: i128,
    scale: u32,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RateError {
    #[error("rate: '{0}' is not a positive decimal such as 1.0842 (digits, at most one '.')")]
    Format(String),
    #[error("rate: '{0}' has more than 18 digits after the point or 30 digits in all")]
    Precision(String),
    #[error("rate: must be greater than zero")]
    NotPositive,
}

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, RateError> {
        let format = || RateError::Format(text.to_string());
        let (int, frac) = match text.split_once('.') {
            Some((i, f)) => (i, f),
            None => (text, ""),
        };
        if int.is_empty()
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || (text.contains('.') && frac.is_empty())
        {
            return Err(format());
        }
        if frac.len() > 18 || int.len() + frac.len() > 30 {
            return Err(RateError::Precision(text.to_string()));
        }
        let digits = format!("{int}{frac}");
        let mantissa: i128 = digits.parse().map_err(|_| format())?;
        if mantissa == 0 {
            return Err(RateError::NotPositive);
        }
        Ok(Rate {
            text: text.to_string(),
            mantissa,
            scale: frac.len() as u32,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn one() -> Rate {
        Rate {
            text: "1".to_string(),
            mantissa: 1,
            scale: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FxRecord {
    pub currency: Currency,
    pub rate: Rate,
    pub effective_day: Day,
    pub version: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskRecord {
    pub merchant_id: String,
    pub tier: String,
    pub reserve_bps: i32,
    pub effective_day: Day,
    pub version: i32,
}

/// The earliest effective date ingest accepts: no event has an earlier day, and a
/// date before it (year 0000, say) is a typo that would apply to every day.
pub const MIN_EFFECTIVE_DAY: Day = Day(0);
/// The latest effective date ingest accepts (2999-12-31): later ones are
/// placeholders (9999-12-31) rather than dates a rate takes effect on.
pub const MAX_EFFECTIVE_DAY: Day = Day(376_199);
pub const MAX_RESERVE_BPS: i32 = 10_000;
pub const MAX_TIER_BYTES: usize = 32;

/// Why ingest refuses a dimension record; names the field and the rule
/// (docs/semantics.md R8).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DimensionError {
    #[error(transparent)]
    Id(#[from] FactError),
    #[error("version: must be ≥ 1, got {0}")]
    Version(i32),
    #[error("reserve_bps: must be within 0..={MAX_RESERVE_BPS}, got {0}")]
    ReserveBps(i32),
    #[error(
        "currency: {REPORTING_CURRENCY} is the reporting currency; it converts at exactly 1 and takes no FX rate"
    )]
    ReportingCurrency,
    #[error("effective_date: {0} is outside {MIN_EFFECTIVE_DAY}..={MAX_EFFECTIVE_DAY}")]
    EffectiveDate(Day),
}

impl DimensionError {
    /// The request field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            DimensionError::Id(e) => e.field(),
            DimensionError::Version(_) => "version",
            DimensionError::ReserveBps(_) => "reserve_bps",
            DimensionError::ReportingCurrency => "currency",
            DimensionError::EffectiveDate(_) => "effective_date",
        }
    }
}

fn check_date_and_version(day: Day, version: i32) -> Result<(), DimensionError> {
    if !(MIN_EFFECTIVE_DAY..=MAX_EFFECTIVE_DAY).contains(&day) {
        return Err(DimensionError::EffectiveDate(day));
    }
    if version < 1 {
        return Err(DimensionError::Version(version));
    }
    Ok(())
}

// Ingest's rules for new records. The fold never applies them, so records already
// in the log (some from before a rule existed) fold as they always did.
impl FxRecord {
    pub fn validate(&self) -> Result<(), DimensionError> {
        if self.currency == REPORTING_CURRENCY {
            return Err(DimensionError::ReportingCurrency);
        }
        check_date_and_version(self.effective_day, self.version)
    }
}

impl RiskRecord {
    pub fn validate(&self) -> Result<(), DimensionError> {
        check_id("merchant_id", &self.merchant_id, MAX_MERCHANT_ID_BYTES)?;
        check_id("tier", &self.tier, MAX_TIER_BYTES)?;
        if !(0..=MAX_RESERVE_BPS).contains(&self.reserve_bps) {
            return Err(DimensionError::ReserveBps(self.reserve_bps));
        }
        check_date_and_version(self.effective_day, self.version)
    }
}

/// What the book holds for a record's (key, effective date, version).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    Nothing,
    /// A record with the same content, read at this sequence.
    Same(u64),
    /// A record with other content, read at this sequence: it stays in force.
    Other(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DimOutcome {
    Recorded,
    /// A (key, date, version) already seen: the first in the log wins.
    Repeated,
    AlreadyRead,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Versioned<T> {
    /// (effective_day, version) -> (value, sequence it was read at).
    by_date: BTreeMap<(Day, i32), (T, u64)>,
}

impl<T> Default for Versioned<T> {
    fn default() -> Self {
        Self {
            by_date: BTreeMap::new(),
        }
    }
}

impl<T> Versioned<T> {
    /// The record with the latest effective date ≤ `day`, highest version on ties,
    /// among records read at or below `cutoff`.
    fn effective(&self, day: Day, cutoff: u64) -> Option<(Day, i32, &T)> {
        self.by_date
            .range(..=(day, i32::MAX))
            .rev()
            .find(|(_, (_, seq))| *seq <= cutoff)
            .map(|((d, v), (t, _))| (*d, *v, t))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct RiskTerms {
    tier: String,
    reserve_bps: i32,
}

/// Every dimension record read so far, with the sequence it was read at, so that
/// an authoritative answer can use exactly the records up to its cutoff.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DimensionBook {
    last_seq: u64,
    fx: FxHashMap<Currency, Versioned<Rate>>,
    risk: FxHashMap<String, Versioned<RiskTerms>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FxUsed {
    pub currency: Currency,
    pub effective_day: Day,
    pub version: i32,
    pub rate: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RiskUsed {
    pub tier: String,
    pub reserve_bps: i32,
    pub effective_day: Day,
    pub version: i32,
}

/// One merchant-day in the reporting currency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reporting {
    /// Sum of the currencies' converted closings; None when a rate is missing.
    pub closing_reporting_minor: Option<i128>,
    /// `closing_reporting_minor × reserve_bps / 10 000`; None without a risk record.
    pub reserve_minor: Option<i128>,
    pub fx_used: Vec<FxUsed>,
    pub risk_used: Option<RiskUsed>,
    pub missing_rates: Vec<Currency>,
    /// Set when a value is absent although every record it needs is held.
    pub overflow: Option<Overflow>,
}

/// The step whose exact result leaves `i128`, so that the value is absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("converting the {0} closing to {REPORTING_CURRENCY} leaves 128 bits")]
    Conversion(Currency),
    #[error("the sum of the converted closings leaves 128 bits")]
    Total,
    #[error("closing_reporting_minor × reserve_bps leaves 128 bits")]
    Reserve,
}

impl DimensionBook {
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn apply_fx(&mut self, seq: u64, record: &FxRecord) -> DimOutcome {
        if seq <= self.last_seq {
            return DimOutcome::AlreadyRead;
        }
        self.last_seq = seq;
        let versions = self.fx.entry(record.currency).or_default();
        insert_first(
            versions,
            (record.effective_day, record.version),
            record.rate.clone(),
            seq,
        )
    }

    pub fn apply_risk(&mut self, seq: u64, record: &RiskRecord) -> DimOutcome {
        if seq <= self.last_seq {
            return DimOutcome::AlreadyRead;
        }
        self.last_seq = seq;
        let versions = self.risk.entry(record.merchant_id.clone()).or_default();
        let terms = RiskTerms {
            tier: record.tier.clone(),
            reserve_bps: record.reserve_bps,
        };
        insert_first(versions, (record.effective_day, record.version), terms, seq)
    }

    /// Whether a record of this FX key is held, and with what content; a new
    /// record of a held key would be ignored (the first in the log wins).
    pub fn held_fx(&self, record: &FxRecord) -> Held {
        let held = self
            .fx
            .get(&record.currency)
            .and_then(|v| v.by_date.get(&(record.effective_day, record.version)));
        match held {
            None => Held::Nothing,
            Some((rate, seq)) if *rate == record.rate => Held::Same(*seq),
            Some((_, seq)) => Held::Other(*seq),
        }
    }

    /// [`DimensionBook::held_fx`] for a risk record.
    pub fn held_risk(&self, record: &RiskRecord) -> Held {
        let held = self
            .risk
            .get(&record.merchant_id)
            .and_then(|v| v.by_date.get(&(record.effective_day, record.version)));
        match held {
            None => Held::Nothing,
            Some((terms, seq))
                if (terms.tier.as_str(), terms.reserve_bps)
                    == (record.tier.as_str(), record.reserve_bps) =>
            {
                Held::Same(*seq)
            }
            Some((_, seq)) => Held::Other(*seq),
        }
    }

    pub fn fx(&self, currency: Currency, day: Day, cutoff: u64) -> Option<FxUsed> {
        let (effective_day, version, rate) = self.fx.get(&currency)?.effective(day, cutoff)?;
        Some(FxUsed {
            currency,
            effective_day,
            version,
            rate: rate.text.clone(),
        })
    }

    fn fx_rate(&self, currency: Currency, day: Day, cutoff: u64) -> Option<(FxUsed, &Rate)> {
        let (effective_day, version, rate) = self.fx.get(&currency)?.effective(day, cutoff)?;
        Some((
            FxUsed {
                currency,
                effective_day,
                version,
                rate: rate.text.clone(),
            },
            rate,
        ))
    }

    pub fn risk(&self, merchant_id: &str, day: Day, cutoff: u64) -> Option<RiskUsed> {
        let (effective_day, version, terms) = self.risk.get(merchant_id)?.effective(day, cutoff)?;
        Some(RiskUsed {
            tier: terms.tier.clone(),
            reserve_bps: terms.reserve_bps,
            effective_day,
            version,
        })
    }
}

fn insert_first<T>(versions: &mut Versioned<T>, key: (Day, i32), value: T, seq: u64) -> DimOutcome {
    match versions.by_date.entry(key) {
        std::collections::btree_map::Entry::Occupied(_) => DimOutcome::Repeated,
        std::collections::btree_map::Entry::Vacant(slot) => {
            slot.insert((value, seq));
            DimOutcome::Recorded
        }
    }
}

/// `num / den` rounded half-to-even; `den > 0`.
pub(crate) fn div_half_even(num: i128, den: i128) -> i128 {
    let q = num.div_euclid(den);
    let r = num.rem_euclid(den);
    match (2 * r).cmp(&den) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

/// `minor × rate × 10^(exp(USD) − exp(currency))`, rounded half-to-even; None on overflow.
pub(crate) fn convert(minor: i128, currency: Currency, rate: &Rate) -> Option<i128> {
    let target = REPORTING_CURRENCY.exponent() as i32;
    let shift = target - currency.exponent() as i32;
    let mut num = minor.checked_mul(rate.mantissa)?;
    let mut den_exp = rate.scale;
    if shift >= 0 {
        num = num.checked_mul(10_i128.checked_pow(shift as u32)?)?;
    } else {
        den_exp += (-shift) as u32;
    }
    Some(div_half_even(num, 10_i128.checked_pow(den_exp)?))
}

/// Applies the dimensions to one merchant-day's rows (all its currencies), using
/// only dimension records read at or below `cutoff` (`u64::MAX`: everything read).
pub fn to_reporting(rows: &[DailyRow], book: &DimensionBook, cutoff: u64) -> Reporting {
    let mut total: Option<i128> = Some(0);
    let mut fx_used = Vec::new();
    let mut missing_rates = Vec::new();
    let (merchant_id, day) = match rows.first() {
        Some(r) => (r.merchant_id.as_str(), r.day),
        None => {
            return Reporting {
                closing_reporting_minor: Some(0),
                reserve_minor: None,
                fx_used,
                risk_used: None,
                missing_rates,
                overflow: None,
            };
        }
    };
    // The first step that overflowed; reported only when no rate is missing, since
    // a missing rate alone already explains the absent values.
    let mut overflow = None;
    for row in rows {
        let converted = if row.currency == REPORTING_CURRENCY {
            Some(row.closing_minor)
        } else {
            match book.fx_rate(row.currency, day, cutoff) {
                Some((used, rate)) => {
                    fx_used.push(used);
                    let converted = convert(row.closing_minor, row.currency, rate);
                    if converted.is_none() {
                        overflow = overflow.or(Some(Overflow::Conversion(row.currency)));
                    }
                    converted
                }
                None => {
                    missing_rates.push(row.currency);
                    None
                }
            }
        };
        total = match (total, converted) {
            (Some(t), Some(c)) => {
                let sum = t.checked_add(c);
                if sum.is_none() {
                    overflow = overflow.or(Some(Overflow::Total));
                }
                sum
            }
            _ => None,
        };
    }
    let risk_used = book.risk(merchant_id, day, cutoff);
    let reserve_minor = total.zip(risk_used.as_ref()).and_then(|(t, r)| {
        let reserve = t
            .checked_mul(i128::from(r.reserve_bps))
            .map(|n| div_half_even(n, 10_000));
        if reserve.is_none() {
            overflow = overflow.or(Some(Overflow::Reserve));
        }
        reserve
    });
    if !missing_rates.is_empty() {
        overflow = None;
    }
    Reporting {
        closing_reporting_minor: total,
        reserve_minor,
        fx_used,
        risk_used,
        missing_rates,
        overflow,
    }
}
