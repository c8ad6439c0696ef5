//! Wire ⇄ semantics. Parsing a wire message checks what a semantic value needs
//! (a known kind, a currency code, a date) and a failure names the field, the rule
//! and the gRPC code it maps to. The rules new records must meet on top are the
//! semantics' (`Fact::validate_new`, `FxRecord::validate`, `RiskRecord::validate`),
//! applied by ingest alone, so that decoding a record already in the log never
//! refuses it for a rule made after it was written.

use payledger_semantics::Currency;
use payledger_semantics::{
    CurrentRow, DailyRow, Day, DimensionError, EventKind, Fact, FactError, FxRecord, Rate, Record,
    RecordBody, RiskRecord,
};
use tonic::Code;

use crate::v1;

/// One rejected field: what the client must fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub code: Code,
    pub field: &'static str,
    pub message: String,
}

impl FieldViolation {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Code::InvalidArgument,
            field,
            message: message.into(),
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code, self.message.clone())
    }
}

impl From<FactError> for FieldViolation {
    fn from(e: FactError) -> Self {
        // The one error-to-code map: the horizon is OUT_OF_RANGE, all else INVALID_ARGUMENT.
        let code = match e {
            FactError::BeyondHorizon { .. } => Code::OutOfRange,
            _ => Code::InvalidArgument,
        };
        Self {
            code,
            field: e.field(),
            message: e.to_string(),
        }
    }
}

impl From<DimensionError> for FieldViolation {
    fn from(e: DimensionError) -> Self {
        match e {
            DimensionError::Id(e) => e.into(),
            e => Self::invalid(e.field(), e.to_string()),
        }
    }
}

impl std::fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub fn kind_from_proto(kind: i32) -> Result<EventKind, FieldViolation> {
    if kind == v1::EventKind::Unspecified as i32 {
        return Err(FactError::Missing { field: "kind" }.into());
    }
    EventKind::from_wire_code(kind)
        .ok_or_else(|| FieldViolation::invalid("kind", format!("kind: unknown value {kind}")))
}

pub fn kind_to_proto(kind: EventKind) -> v1::EventKind {
    v1::EventKind::try_from(kind.wire_code()).expect("every kind's wire code is in records.proto")
}

fn currency(field: &'static str, code: &str) -> Result<Currency, FieldViolation> {
    if code.is_empty() {
        return Err(FactError::Missing { field }.into());
    }
    Currency::parse(code).map_err(|e| FieldViolation::invalid(field, format!("{field}: {e}")))
}

fn day(field: &'static str, text: &str) -> Result<Day, FieldViolation> {
    if text.is_empty() {
        return Err(FactError::Missing { field }.into());
    }
    Day::parse(text).map_err(|e| FieldViolation::invalid(field, format!("{field}: {e}")))
}

/// Parses a submitted event or a logged one and checks its structure
/// (`Fact::validate`); ingest adds `Fact::validate_new` and the time rules, which
/// need its clock (`payledger_semantics::check_event_time`).
pub fn fact_from_event(e: &v1::Event) -> Result<Fact, FieldViolation> {
    let mut fact = Fact {
        event_id: e.event_id.clone(),
        merchant_id: e.merchant_id.clone(),
        kind: kind_from_proto(e.kind)?,
        amount_minor: e.amount_minor,
        currency: Currency::USD,
        event_time_us: e.event_time_us,
        corrects_event_id: (!e.corrects_event_id.is_empty()).then(|| e.corrects_event_id.clone()),
    };
    // Ids and amounts first, so that a message names the most basic problem.
    fact.validate()?;
    fact.currency = currency("currency", &e.currency)?;
    if e.event_time_us == 0 {
        return Err(FactError::Missing {
            field: "event_time_us",
        }
        .into());
    }
    Ok(fact)
}

pub fn event_from_fact(f: &Fact) -> v1::Event {
    v1::Event {
        event_id: f.event_id.clone(),
        merchant_id: f.merchant_id.clone(),
        kind: kind_to_proto(f.kind) as i32,
        amount_minor: f.amount_minor,
        currency: f.currency.to_string(),
        event_time_us: f.event_time_us,
        corrects_event_id: f.corrects_event_id.clone().unwrap_or_default(),
    }
}

pub fn fx_from_proto(fx: &v1::FxRate) -> Result<FxRecord, FieldViolation> {
    let currency = currency("currency", &fx.currency)?;
    if fx.rate.is_empty() {
        return Err(FactError::Missing { field: "rate" }.into());
    }
    let rate = Rate::parse(&fx.rate).map_err(|e| FieldViolation::invalid("rate", e.to_string()))?;
    Ok(FxRecord {
        currency,
        rate,
        effective_day: day("effective_date", &fx.effective_date)?,
        version: fx.version,
    })
}

pub fn risk_from_proto(r: &v1::RiskTier) -> Result<RiskRecord, FieldViolation> {
    Ok(RiskRecord {
        merchant_id: r.merchant_id.clone(),
        tier: r.tier.clone(),
        reserve_bps: r.reserve_bps,
        effective_day: day("effective_date", &r.effective_date)?,
        version: r.version,
    })
}

pub fn daily_row_to_proto(r: &DailyRow) -> v1::DailyRow {
    v1::DailyRow {
        merchant_id: r.merchant_id.clone(),
        day: r.day.to_string(),
        currency: r.currency.to_string(),
        closing_minor: r.closing_minor.to_string(),
        peak_minor: r.peak_minor.to_string(),
        peak_bucket_start_us: r.peak_bucket_start_us,
        applied: r.applied,
        duplicates: r.duplicates,
        conflicts: r.conflicts,
        late: r.late,
        restated: r.restated,
        log_position: r.log_position,
        semantics_version: r.semantics_version,
    }
}

fn minor(field: &'static str, text: &str) -> Result<i128, FieldViolation> {
    text.parse()
        .map_err(|_| FieldViolation::invalid(field, format!("{field}: '{text}' is not an integer")))
}

pub fn daily_row_from_proto(r: &v1::DailyRow) -> Result<DailyRow, FieldViolation> {
    Ok(DailyRow {
        merchant_id: r.merchant_id.clone(),
        day: day("day", &r.day)?,
        currency: currency("currency", &r.currency)?,
        closing_minor: minor("closing_minor", &r.closing_minor)?,
        peak_minor: minor("peak_minor", &r.peak_minor)?,
        peak_bucket_start_us: r.peak_bucket_start_us,
        applied: r.applied,
        duplicates: r.duplicates,
        conflicts: r.conflicts,
        late: r.late,
        restated: r.restated,
        log_position: r.log_position,
        semantics_version: r.semantics_version,
    })
}

pub fn current_row_to_proto(r: &CurrentRow) -> v1::CurrentRow {
    v1::CurrentRow {
        merchant_id: r.merchant_id.clone(),
        currency: r.currency.to_string(),
        balance_minor: r.balance_minor.to_string(),
        last_event_time_us: r.last_event_time_us,
        applied: r.applied,
        duplicates: r.duplicates,
        conflicts: r.conflicts,
        late: r.late,
        log_position: r.log_position,
        semantics_version: r.semantics_version,
        too_old: r.too_old,
    }
}

pub fn current_row_from_proto(r: &v1::CurrentRow) -> Result<CurrentRow, FieldViolation> {
    Ok(CurrentRow {
        merchant_id: r.merchant_id.clone(),
        currency: currency("currency", &r.currency)?,
        balance_minor: minor("balance_minor", &r.balance_minor)?,
        last_event_time_us: r.last_event_time_us,
        applied: r.applied,
        duplicates: r.duplicates,
        conflicts: r.conflicts,
        late: r.late,
        too_old: r.too_old,
        log_position: r.log_position,
        semantics_version: r.semantics_version,
    })
}

/// What a message on a partition subject holds, as the semantics reads it. Stream
/// and replay decode with this one function, so they skip exactly the same records.
pub fn record_from_log(seq: u64, payload: &[u8]) -> Result<Record, FieldViolation> {
    use prost::Message;
    let log = v1::LogRecord::decode(payload)
        .map_err(|e| FieldViolation::invalid("payload", format!("not a LogRecord: {e}")))?;
    let body = match &log.body {
        Some(v1::log_record::Body::Fact(event)) => RecordBody::Fact(fact_from_event(event)?),
        Some(v1::log_record::Body::Heartbeat(_)) => RecordBody::Heartbeat,
        Some(_) => {
            return Err(FieldViolation::invalid(
                "body",
                "a dimension record on a partition subject",
            ));
        }
        None => return Err(FactError::Missing { field: "body" }.into()),
    };
    Ok(Record {
        seq,
        ingest_time_us: log.ingest_time_us,
        body,
    })
}

#[cfg(test)]
mod tests {
    use payledger_semantics::{KINDS, StreamSettings, check_event_time};

    use super::*;

    /// records.proto's `EventKind` and the semantics' kind table name the same
    /// kinds with the same values, so a kind added to one alone fails here.
    #[test]
    fn the_proto_kinds_are_the_kind_table() {
        for info in KINDS {
            let wire = v1::EventKind::try_from(info.wire_code).expect("in records.proto");
            assert_eq!(wire.as_str_name(), format!("EVENT_KIND_{}", info.name));
            assert_eq!(kind_from_proto(info.wire_code), Ok(info.kind));
            assert_eq!(kind_to_proto(info.kind), wire);
        }
        // prost accepts exactly the declared values; probe well past the highest.
        let declared: Vec<i32> = (0..1024)
            .filter(|&v| v1::EventKind::try_from(v).is_ok())
            .collect();
        let mut tabled: Vec<i32> = KINDS.iter().map(|k| k.wire_code).collect();
        tabled.insert(0, v1::EventKind::Unspecified as i32);
        tabled.sort_unstable();
        assert_eq!(declared, tabled);
        assert_eq!(kind_from_proto(0).unwrap_err().field, "kind");
        assert_eq!(
            kind_from_proto(99).unwrap_err().message,
            "kind: unknown value 99"
        );
    }

    /// Decoding only converts: a record ingest now refuses, already in the log, is
    /// read as it always was (docs/semantics.md R8).
    #[test]
    fn dimension_records_decode_without_ingest_rules() {
        let fx = fx_from_proto(&v1::FxRate {
            currency: "USD".into(),
            rate: "2".into(),
            effective_date: "0000-01-01".into(),
            version: 0,
        })
        .expect("converts");
        assert_eq!(fx.effective_day, Day::from_ymd(0, 1, 1).unwrap());
        assert!(fx.validate().is_err());
        let risk = risk_from_proto(&v1::RiskTier {
            merchant_id: "m-1".into(),
            tier: "gold".into(),
            reserve_bps: 20_000,
            effective_date: "9999-12-31".into(),
            version: 1,
        })
        .expect("converts");
        let v: FieldViolation = risk.validate().unwrap_err().into();
        assert_eq!((v.code, v.field), (Code::InvalidArgument, "reserve_bps"));
    }

    #[test]
    fn time_rules_name_the_wire_field_event_time_us() {
        let settings = StreamSettings::default();
        let now = 1_800_000_000_000_000;
        let ahead = now + 2 * settings.max_clock_skew_us;
        let beyond = now - 2 * settings.dedup_horizon_us;
        for (what, event_time_us, code) in [
            ("ahead of the clock", ahead, Code::InvalidArgument),
            ("beyond the horizon", beyond, Code::OutOfRange),
        ] {
            let v: FieldViolation = check_event_time(event_time_us, now, &settings)
                .expect_err(what)
                .into();
            assert_eq!(v.field, "event_time_us", "{what}");
            assert_eq!(v.code, code, "{what}");
            assert!(
                v.message.starts_with("event_time_us: "),
                "{what}: {}",
                v.message
            );
        }
    }
}
