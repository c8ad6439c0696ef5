//! Events as JSON lines, the format `payledger ingest` reads and `gen --out` writes:
//!
//! ```json
//! {"event_id":"ev-1","merchant_id":"m-1","kind":"PAYMENT_CAPTURED","amount_minor":1250,"currency":"EUR","event_time":"2026-11-25T09:30:00Z"}
//! ```
//!
//! `event_time` is RFC 3339 in UTC; `event_time_us` (microseconds) may be given instead.

use payledger_proto::v1;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct EventLine {
    pub event_id: String,
    pub merchant_id: String,
    pub kind: String,
    pub amount_minor: i64,
    pub currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time_us: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrects_event_id: Option<String>,
}

pub fn format_time_us(us: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(time).to_string()
}

pub fn parse_time(text: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339(text).map_err(|e| {
        format!("event_time '{text}': {e} (expected RFC 3339 UTC such as 2026-11-25T09:30:00Z)")
    })?;
    let since = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("event_time '{text}' is before 1970"))?;
    Ok(since.as_micros() as i64)
}

impl EventLine {
    pub fn from_event(e: &v1::Event) -> Self {
        let kind = v1::EventKind::try_from(e.kind).unwrap_or(v1::EventKind::Unspecified);
        Self {
            event_id: e.event_id.clone(),
            merchant_id: e.merchant_id.clone(),
            kind: kind
                .as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_string(),
            amount_minor: e.amount_minor,
            currency: e.currency.clone(),
            event_time: Some(format_time_us(e.event_time_us)),
            event_time_us: None,
            corrects_event_id: (!e.corrects_event_id.is_empty())
                .then(|| e.corrects_event_id.clone()),
        }
    }

    /// The wire event; an unknown kind or time is left for ingest to reject precisely.
    pub fn to_event(&self) -> Result<v1::Event, String> {
        let kind = v1::EventKind::from_str_name(&format!("EVENT_KIND_{}", self.kind)).ok_or_else(
            || {
                format!(
                    "kind '{}' is not one of {}",
                    self.kind,
                    payledger_semantics::EventKind::names()
                )
            },
        )?;
        let event_time_us = match (&self.event_time, self.event_time_us) {
            (Some(text), _) => parse_time(text)?,
            (None, Some(us)) => us,
            (None, None) => return Err("event_time: required (RFC 3339) or event_time_us".into()),
        };
        Ok(v1::Event {
            event_id: self.event_id.clone(),
            merchant_id: self.merchant_id.clone(),
            kind: kind as i32,
            amount_minor: self.amount_minor,
            currency: self.currency.clone(),
            event_time_us,
            corrects_event_id: self.corrects_event_id.clone().unwrap_or_default(),
        })
    }
}
