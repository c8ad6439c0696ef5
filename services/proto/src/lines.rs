//! The line formats of `payledger ingest`: events, FX rates and risk tiers as CSV
//! (a header row naming the columns, then one record per line) or as JSON lines
//! (one object per line). A line decodes on its own, into the wire message checked
//! as ingest checks it (`fact_from_event`, `fx_from_proto`, `risk_from_proto` and the
//! semantics' rules for new records), or
//! into an error naming the field and the problem. Reading and sending are the
//! caller's, so a file of any length is read one line at a time.
//!
//! Fields (the same names as CSV columns and JSON keys; any other, or one given
//! twice, is refused):
//!
//! * events: `event_id`, `merchant_id`, `kind` (`PAYMENT_CAPTURED`, ...),
//!   `amount_minor` (integer minor units), `currency`, `event_time` (RFC 3339 UTC)
//!   or `event_time_us`, and `corrects_event_id` for a `CORRECTION`;
//! * FX rates: `currency`, `rate` (a decimal string, kept exact), `effective_date`
//!   (YYYY-MM-DD), `version`;
//! * risk tiers: `merchant_id`, `tier`, `reserve_bps`, `effective_date`, `version`.
//!
//! A CSV field may be quoted (`"..."`, a quote inside doubled); a record never spans
//! lines. An empty CSV field, or a JSON `null`, is an absent field.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::convert::{fact_from_event, fx_from_proto, risk_from_proto};
use crate::v1;

/// What a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Events,
    Fx,
    Risk,
}

impl Kind {
    /// The fields of a record, in the order `gen` and the README write them.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Events => &[
                "event_id",
                "merchant_id",
                "kind",
                "amount_minor",
                "currency",
                "event_time",
                "event_time_us",
                "corrects_event_id",
            ],
            Kind::Fx => &["currency", "rate", "effective_date", "version"],
            Kind::Risk => &[
                "merchant_id",
                "tier",
                "reserve_bps",
                "effective_date",
                "version",
            ],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Fx => "FX rates",
            Kind::Risk => "risk tiers",
        }
    }
}

/// How the lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    Event(v1::Event),
    Fx(v1::FxRate),
    Risk(v1::RiskTier),
}

/// Why a line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    /// The field at fault, when one is.
    pub field: Option<String>,
    /// The whole message, the field named first.
    pub message: String,
    /// The CSV header was refused: no later line can be read.
    pub header: bool,
}

impl LineError {
    fn field(field: &str, problem: impl std::fmt::Display) -> Self {
        Self {
            field: Some(field.to_string()),
            message: format!("{field}: {problem}"),
            header: false,
        }
    }

    fn line(problem: impl Into<String>) -> Self {
        Self {
            field: None,
            message: problem.into(),
            header: false,
        }
    }
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LineError {}

impl From<crate::FieldViolation> for LineError {
    fn from(v: crate::FieldViolation) -> Self {
        Self {
            field: Some(v.field.to_string()),
            message: v.message,
            header: false,
        }
    }
}

/// Decodes the lines of one file, in order.
#[derive(Debug)]
pub struct Decoder {
    kind: Kind,
    format: Option<Format>,
    /// The CSV columns, once the header is read.
    columns: Option<Vec<&'static str>>,
}

impl Decoder {
    /// `format` None: JSON lines if the first line that is not blank starts with
    /// `{`, CSV otherwise.
    pub fn new(kind: Kind, format: Option<Format>) -> Self {
        Self {
            kind,
            format,
            columns: None,
        }
    }

    pub fn format(&self) -> Option<Format> {
        self.format
    }

    /// The record on `line` (its line ending removed or not); None for a blank line
    /// and for the CSV header.
    pub fn decode(&mut self, line: &str) -> Result<Option<Line>, LineError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            return Ok(None);
        }
        let format = *self
            .format
            .get_or_insert(if line.trim_start().starts_with('{') {
                Format::JsonLines
            } else {
                Format::Csv
            });
        let fields = match format {
            Format::JsonLines => self.json_fields(line)?,
            Format::Csv => match &self.columns {
                None => {
                    self.columns = Some(header(self.kind, line).map_err(|mut e| {
                        e.header = true;
                        e
                    })?);
                    return Ok(None);
                }
                Some(columns) => csv_fields(columns, line)?,
            },
        };
        let record = Record(fields);
        Ok(Some(match self.kind {
            Kind::Events => Line::Event(record.event()?),
            Kind::Fx => Line::Fx(record.fx()?),
            Kind::Risk => Line::Risk(record.risk()?),
        }))
    }

    fn json_fields<'a>(
        &self,
        line: &'a str,
    ) -> Result<BTreeMap<&'static str, Cell<'a>>, LineError> {
        let Pairs(pairs) = serde_json::from_str(line).map_err(|e| {
            // serde_json counts lines within the one line it was given: only the
            // column means anything to whoever reads "line N: ...".
            let text = e.to_string();
            let located = format!(" at line {} column {}", e.line(), e.column());
            let problem = text.strip_suffix(&located).unwrap_or(&text);
            LineError::line(format!(
                "not a JSON object: {problem} (column {})",
                e.column()
            ))
        })?;
        let mut fields = BTreeMap::new();
        let mut named = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            let name = known(self.kind, &key)?;
            if named.contains(&name) {
                return Err(LineError::field(name, "given twice"));
            }
            named.push(name);
            if !value.is_null() {
                fields.insert(name, Cell::Json(value));
            }
        }
        Ok(fields)
    }
}

/// A JSON object's members in order, repeated keys kept: a map would keep only
/// the last of them, and the line would be read as something it does not say.
struct Pairs(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Pairs;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Pairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, Value>()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

fn known(kind: Kind, name: &str) -> Result<&'static str, LineError> {
    kind.fields()
        .iter()
        .find(|f| **f == name)
        .copied()
        .ok_or_else(|| {
            LineError::field(
                name,
                format!(
                    "not a field of {} (expected {})",
                    kind.name(),
                    kind.fields().join(", ")
                ),
            )
        })
}

fn header(kind: Kind, line: &str) -> Result<Vec<&'static str>, LineError> {
    let mut columns: Vec<&'static str> = Vec::new();
    for name in split_csv(line)? {
        let name = known(kind, name.trim())?;
        if columns.contains(&name) {
            return Err(LineError::field(name, "column named twice in the header"));
        }
        columns.push(name);
    }
    Ok(columns)
}

fn csv_fields<'a>(
    columns: &[&'static str],
    line: &'a str,
) -> Result<BTreeMap<&'static str, Cell<'a>>, LineError> {
    let cells = split_csv(line)?;
    if cells.len() != columns.len() {
        return Err(LineError::line(format!(
            "{} fields, the header has {}",
            cells.len(),
            columns.len()
        )));
    }
    Ok(columns
        .iter()
        .copied()
        .zip(cells)
        .filter(|(_, text)| !text.is_empty())
        .map(|(name, text)| (name, Cell::Text(text)))
        .collect())
}

/// The fields of one CSV line (RFC 4180 quoting, no line breaks inside a field).
pub fn split_csv(line: &str) -> Result<Vec<std::borrow::Cow<'_, str>>, LineError> {
    use std::borrow::Cow;
    let mut fields = Vec::new();
    let mut rest = line;
    loop {
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let after = loop {
                match chars.next() {
                    None => {
                        return Err(LineError::line(format!(
                            "field {}: a quote is not closed",
                            fields.len() + 1
                        )));
                    }
                    Some((i, '"')) if quoted[i + 1..].starts_with('"') => {
                        value.push('"');
                        chars.next();
                    }
                    Some((i, '"')) => break &quoted[i + 1..],
                    Some((_, c)) => value.push(c),
                }
            };
            fields.push(Cow::Owned(value));
            match after.strip_prefix(',') {
                Some(next) => rest = next,
                None if after.is_empty() => return Ok(fields),
                None => {
                    return Err(LineError::line(format!(
                        "field {}: text after the closing quote",
                        fields.len()
                    )));
                }
            }
        } else {
            match rest.split_once(',') {
                Some((field, next)) => {
                    fields.push(Cow::Borrowed(field));
                    rest = next;
                }
                None => {
                    fields.push(Cow::Borrowed(rest));
                    return Ok(fields);
                }
            }
        }
    }
}

enum Cell<'a> {
    Text(std::borrow::Cow<'a, str>),
    Json(Value),
}

struct Record<'a>(BTreeMap<&'static str, Cell<'a>>);

impl Record<'_> {
    fn text(&self, field: &'static str) -> Result<Option<String>, LineError> {
        match self.0.get(field) {
            None => Ok(None),
            Some(Cell::Text(t)) => Ok(Some(t.to_string())),
            Some(Cell::Json(Value::String(s))) => Ok(Some(s.clone())),
            Some(Cell::Json(other)) => Err(LineError::field(
                field,
                format!("must be a string, got {other}"),
            )),
        }
    }

    fn required_text(&self, field: &'static str) -> Result<String, LineError> {
        self.text(field)?
            .ok_or_else(|| LineError::field(field, "required"))
    }

    fn integer(&self, field: &'static str) -> Result<Option<i64>, LineError> {
        match self.0.get(field) {
            None => Ok(None),
            Some(Cell::Text(t)) => t.trim().parse().map(Some).map_err(|_| {
                LineError::field(
                    field,
                    format!("'{t}' is not an integer from -2^63 to 2^63-1"),
                )
            }),
            Some(Cell::Json(v)) => v.as_i64().map(Some).ok_or_else(|| {
                LineError::field(
                    field,
                    format!("must be an integer from -2^63 to 2^63-1, got {v}"),
                )
            }),
        }
    }

    fn int32(&self, field: &'static str) -> Result<i32, LineError> {
        let value = self
            .integer(field)?
            .ok_or_else(|| LineError::field(field, "required"))?;
        i32::try_from(value).map_err(|_| {
            LineError::field(field, format!("{value} is out of range (at most 2^31-1)"))
        })
    }

    fn event(&self) -> Result<v1::Event, LineError> {
        let kind_text = self.required_text("kind")?;
        let kind = payledger_semantics::EventKind::parse(&kind_text).ok_or_else(|| {
            LineError::field(
                "kind",
                format!(
                    "'{kind_text}' is not one of {}",
                    payledger_semantics::EventKind::names()
                ),
            )
        })?;
        let event_time_us = match (self.text("event_time")?, self.integer("event_time_us")?) {
            (Some(_), Some(_)) => {
                return Err(LineError::field(
                    "event_time",
                    "give event_time or event_time_us, not both",
                ));
            }
            (Some(text), None) => parse_time(&text)?,
            (None, Some(us)) => us,
            (None, None) => {
                return Err(LineError::field(
                    "event_time",
                    "required (RFC 3339 UTC such as 2026-11-25T09:30:00Z), or event_time_us",
                ));
            }
        };
        let event = v1::Event {
            event_id: self.required_text("event_id")?,
            merchant_id: self.required_text("merchant_id")?,
            kind: crate::kind_to_proto(kind) as i32,
            amount_minor: self
                .integer("amount_minor")?
                .ok_or_else(|| LineError::field("amount_minor", "required"))?,
            currency: self.required_text("currency")?,
            event_time_us,
            corrects_event_id: self.text("corrects_event_id")?.unwrap_or_default(),
        };
        // The rules ingest applies to new records, so a line is refused here as there.
        fact_from_event(&event)?
            .validate_new()
            .map_err(crate::FieldViolation::from)?;
        Ok(event)
    }

    fn fx(&self) -> Result<v1::FxRate, LineError> {
        let fx = v1::FxRate {
            currency: self.required_text("currency")?,
            rate: self.required_text("rate")?,
            effective_date: self.required_text("effective_date")?,
            version: self.int32("version")?,
        };
        fx_from_proto(&fx)?
            .validate()
            .map_err(crate::FieldViolation::from)?;
        Ok(fx)
    }

    fn risk(&self) -> Result<v1::RiskTier, LineError> {
        let risk = v1::RiskTier {
            merchant_id: self.required_text("merchant_id")?,
            tier: self.required_text("tier")?,
            reserve_bps: self.int32("reserve_bps")?,
            effective_date: self.required_text("effective_date")?,
            version: self.int32("version")?,
        };
        risk_from_proto(&risk)?
            .validate()
            .map_err(crate::FieldViolation::from)?;
        Ok(risk)
    }
}

/// RFC 3339 in UTC, to microseconds since the Unix epoch.
pub fn parse_time(text: &str) -> Result<i64, LineError> {
    let t = humantime::parse_rfc3339(text).map_err(|e| {
        LineError::field(
            "event_time",
            format!("'{text}': {e} (expected RFC 3339 UTC such as 2026-11-25T09:30:00Z)"),
        )
    })?;
    let since = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| LineError::field("event_time", format!("'{text}' is before 1970")))?;
    i64::try_from(since.as_micros())
        .map_err(|_| LineError::field("event_time", format!("'{text}' is out of range")))
}

/// Microseconds since the Unix epoch as RFC 3339 UTC.
pub fn format_time_us(us: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(time).to_string()
}

/// An event as the JSON line `payledger ingest` reads back, fields in the
/// README's order.
pub fn event_to_json(e: &v1::Event) -> String {
    #[derive(serde::Serialize)]
    struct EventLine<'a> {
        event_id: &'a str,
        merchant_id: &'a str,
        kind: &'static str,
        amount_minor: i64,
        currency: &'a str,
        event_time: String,
        #[serde(skip_serializing_if = "str::is_empty")]
        corrects_event_id: &'a str,
    }
    let line = EventLine {
        event_id: &e.event_id,
        merchant_id: &e.merchant_id,
        kind: crate::kind_from_proto(e.kind).map_or("", |k| k.as_str()),
        amount_minor: e.amount_minor,
        currency: &e.currency,
        event_time: format_time_us(e.event_time_us),
        corrects_event_id: &e.corrects_event_id,
    };
    serde_json::to_string(&line).expect("an event serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(kind: Kind, text: &str) -> Vec<Result<Option<Line>, LineError>> {
        let mut decoder = Decoder::new(kind, None);
        text.lines().map(|l| decoder.decode(l)).collect()
    }

    fn error(result: &Result<Option<Line>, LineError>) -> &LineError {
        result.as_ref().expect_err("an error")
    }

    #[test]
    fn events_as_json_lines_and_csv_decode_alike() {
        let json = r#"{"event_id":"ev-1","merchant_id":"m-1","kind":"PAYMENT_CAPTURED","amount_minor":1250,"currency":"EUR","event_time":"2026-11-25T09:30:00Z"}"#;
        let csv = "event_id,merchant_id,kind,amount_minor,currency,event_time,corrects_event_id\n\
                   ev-1,m-1,PAYMENT_CAPTURED,1250,EUR,2026-11-25T09:30:00Z,";
        let from_json = decode_all(Kind::Events, json);
        let from_csv = decode_all(Kind::Events, csv);
        let expected = Line::Event(v1::Event {
            event_id: "ev-1".into(),
            merchant_id: "m-1".into(),
            kind: v1::EventKind::PaymentCaptured as i32,
            amount_minor: 1250,
            currency: "EUR".into(),
            event_time_us: 1_795_599_000_000_000,
            corrects_event_id: String::new(),
        });
        assert_eq!(from_json, [Ok(Some(expected.clone()))]);
        assert_eq!(from_csv, [Ok(None), Ok(Some(expected))]);
    }

    #[test]
    fn written_events_read_back() {
        let event = v1::Event {
            event_id: "ev-9".into(),
            merchant_id: "m-2".into(),
            kind: v1::EventKind::Correction as i32,
            amount_minor: -5,
            currency: "USD".into(),
            event_time_us: 1_795_599_000_123_456,
            corrects_event_id: "ev-1".into(),
        };
        let line = event_to_json(&event);
        assert_eq!(
            Decoder::new(Kind::Events, None).decode(&line),
            Ok(Some(Line::Event(event)))
        );
    }

    #[test]
    fn a_bad_line_names_its_field_and_the_next_line_still_decodes() {
        let text = "currency,rate,effective_date,version\n\
                    EUR,1.0842,2026-11-25,1\n\
                    GBP,1,2x,2026-11-25,1\n\
                    GBP,abc,2026-11-25,1\n\
                    JPY,0.0067,2026-11-25,99999999999\n\
                    \n\
                    \"CHF\",\"1.12\",2026-11-25,1";
        let results = decode_all(Kind::Fx, text);
        assert_eq!(results[0], Ok(None));
        assert!(matches!(results[1], Ok(Some(Line::Fx(ref fx))) if fx.rate == "1.0842"));
        assert_eq!(error(&results[2]).message, "5 fields, the header has 4");
        assert_eq!(error(&results[3]).field.as_deref(), Some("rate"));
        assert_eq!(error(&results[4]).field.as_deref(), Some("version"));
        assert_eq!(results[5], Ok(None));
        assert!(matches!(results[6], Ok(Some(Line::Fx(ref fx))) if fx.currency == "CHF"));
    }

    #[test]
    fn unknown_fields_and_columns_are_refused() {
        let results = decode_all(
            Kind::Risk,
            r#"{"merchant_id":"m-1","tier":"high","reserve_bps":500,"effective_date":"2026-11-25","version":1,"note":"x"}"#,
        );
        let e = error(&results[0]);
        assert_eq!(e.field.as_deref(), Some("note"));
        assert!(
            e.message.starts_with("note: not a field of risk tiers"),
            "{e}"
        );
        let header = decode_all(Kind::Risk, "merchant_id,tier,bps");
        assert!(error(&header[0]).header);
        let repeated = decode_all(
            Kind::Fx,
            r#"{"currency":"EUR","rate":"1.1","rate":"9.9","effective_date":"2026-11-25","version":1}"#,
        );
        assert_eq!(error(&repeated[0]).message, "rate: given twice");
        let twice = decode_all(Kind::Risk, "merchant_id,merchant_id");
        assert_eq!(
            error(&twice[0]).message,
            "merchant_id: column named twice in the header"
        );
    }

    #[test]
    fn types_and_rules_are_checked_per_field() {
        let cases = [
            (
                r#"{"event_id":"e","merchant_id":"m","kind":"PAYMENT_CAPTURED","amount_minor":"12","currency":"EUR","event_time_us":5}"#,
                "amount_minor",
            ),
            (
                r#"{"event_id":"e","merchant_id":"m","kind":"PAYMENT_CAPTURED","amount_minor":12.5,"currency":"EUR","event_time_us":5}"#,
                "amount_minor",
            ),
            (
                r#"{"event_id":"e","merchant_id":"m","kind":"PAID","amount_minor":12,"currency":"EUR","event_time_us":5}"#,
                "kind",
            ),
            (
                r#"{"event_id":"e","merchant_id":"m","kind":"PAYMENT_CAPTURED","amount_minor":-12,"currency":"EUR","event_time_us":5}"#,
                "amount_minor",
            ),
            (
                r#"{"event_id":"e","merchant_id":"m","kind":"PAYMENT_CAPTURED","amount_minor":12,"currency":"EUR","event_time":"yesterday"}"#,
                "event_time",
            ),
            (
                r#"{"event_id":"e","kind":"PAYMENT_CAPTURED","amount_minor":12,"currency":"EUR","event_time_us":5}"#,
                "merchant_id",
            ),
            (
                r#"{"event_id":"e","merchant_id":"m","kind":"PAYMENT_CAPTURED","amount_minor":12,"currency":"eur","event_time_us":5}"#,
                "currency",
            ),
        ];
        for (line, field) in cases {
            let results = decode_all(Kind::Events, line);
            assert_eq!(error(&results[0]).field.as_deref(), Some(field), "{line}");
        }
        let not_json = decode_all(Kind::Events, "{\"event_id\":");
        assert_eq!(
            error(&not_json[0]).message,
            "not a JSON object: EOF while parsing a value (column 12)"
        );
        let risk = decode_all(
            Kind::Risk,
            "merchant_id,tier,reserve_bps,effective_date,version\nm-1,high,20000,2026-11-25,1",
        );
        assert_eq!(error(&risk[1]).field.as_deref(), Some("reserve_bps"));
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(
            split_csv(r#"a,"b,c","d""e",,"""#).unwrap(),
            ["a", "b,c", "d\"e", "", ""]
        );
        assert!(split_csv(r#"a,"b"#).is_err());
        assert!(split_csv(r#""b"x,c"#).is_err());
    }
}
