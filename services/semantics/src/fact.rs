//! Facts and log records, and the rules a fact must meet to enter the log.

use serde::{Deserialize, Serialize};

use crate::currency::Currency;
use crate::settings::StreamSettings;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    PaymentCaptured,
    RefundIssued,
    SettlementReceived,
    ChargebackOpened,
    ChargebackReversed,
    Correction,
}

impl EventKind {
    /// The signed delta this kind applies to open exposure (docs/semantics.md, facts; R4).
    pub fn signed_delta(self, amount_minor: i64) -> i128 {
        let amount = i128::from(amount_minor);
        match self {
            EventKind::PaymentCaptured | EventKind::ChargebackOpened | EventKind::Correction => {
                amount
            }
            EventKind::RefundIssued
            | EventKind::SettlementReceived
            | EventKind::ChargebackReversed => -amount,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::PaymentCaptured => "PAYMENT_CAPTURED",
            EventKind::RefundIssued => "REFUND_ISSUED",
            EventKind::SettlementReceived => "SETTLEMENT_RECEIVED",
            EventKind::ChargebackOpened => "CHARGEBACK_OPENED",
            EventKind::ChargebackReversed => "CHARGEBACK_REVERSED",
            EventKind::Correction => "CORRECTION",
        }
    }

    pub const ALL: [EventKind; 6] = [
        EventKind::PaymentCaptured,
        EventKind::RefundIssued,
        EventKind::SettlementReceived,
        EventKind::ChargebackOpened,
        EventKind::ChargebackReversed,
        EventKind::Correction,
    ];

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A fact as it stands in the log (ingest stamps `ingest_time` on the record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    pub event_id: String,
    pub merchant_id: String,
    pub kind: EventKind,
    pub amount_minor: i64,
    pub currency: Currency,
    pub event_time_us: i64,
    pub corrects_event_id: Option<String>,
}

/// One record of a partition's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The JetStream sequence: the record's log position.
    pub seq: u64,
    pub ingest_time_us: i64,
    pub body: RecordBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordBody {
    Fact(Fact),
    /// Moves the partition's clock so that its days close (docs/semantics.md R5).
    Heartbeat,
}

/// Why a fact cannot enter the log; names the field and the rule.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FactError {
    #[error("{field}: required")]
    Missing { field: &'static str },
    #[error("{field}: must be 1-{max} bytes of [A-Za-z0-9._:-], got {len} bytes")]
    IdLength {
        field: &'static str,
        max: usize,
        len: usize,
    },
    #[error("{field}: character {ch:?} at byte {at} is not one of [A-Za-z0-9._:-]")]
    IdCharacter {
        field: &'static str,
        ch: char,
        at: usize,
    },
    #[error("amount_minor: must be > 0 for {kind}, got {amount}")]
    AmountNotPositive { kind: &'static str, amount: i64 },
    #[error("amount_minor: a CORRECTION must be non-zero")]
    ZeroCorrection,
    #[error("corrects_event_id: a CORRECTION must name the event it corrects")]
    CorrectionWithoutTarget,
    #[error("corrects_event_id: only a CORRECTION may set it ({kind} does not)")]
    TargetWithoutCorrection { kind: &'static str },
    #[error(
        "event_time_us: {ahead_us} µs ahead of ingest's clock, beyond the allowed skew of {skew_us} µs"
    )]
    InFuture { ahead_us: i64, skew_us: i64 },
    #[error(
        "event_time_us: {age_us} µs older than ingest's clock, beyond the dedup horizon of {horizon_us} µs; submit a CORRECTION dated inside the horizon"
    )]
    BeyondHorizon { age_us: i64, horizon_us: i64 },
}

impl FactError {
    /// The request field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            FactError::Missing { field }
            | FactError::IdLength { field, .. }
            | FactError::IdCharacter { field, .. } => field,
            FactError::AmountNotPositive { .. } | FactError::ZeroCorrection => "amount_minor",
            FactError::CorrectionWithoutTarget | FactError::TargetWithoutCorrection { .. } => {
                "corrects_event_id"
            }
            FactError::InFuture { .. } | FactError::BeyondHorizon { .. } => "event_time_us",
        }
    }
}

/// Checks an id against `1..=max` bytes of `[A-Za-z0-9._:-]`.
pub fn check_id(field: &'static str, id: &str, max: usize) -> Result<(), FactError> {
    if id.is_empty() {
        return Err(FactError::Missing { field });
    }
    if id.len() > max {
        return Err(FactError::IdLength {
            field,
            max,
            len: id.len(),
        });
    }
    if let Some((at, ch)) = id
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(FactError::IdCharacter { field, ch, at });
    }
    Ok(())
}

pub const MAX_EVENT_ID_BYTES: usize = 128;
pub const MAX_MERCHANT_ID_BYTES: usize = 64;

impl Fact {
    /// The structural rules of docs/semantics.md, facts (the currency is valid by type).
    pub fn validate(&self) -> Result<(), FactError> {
        check_id("event_id", &self.event_id, MAX_EVENT_ID_BYTES)?;
        check_id("merchant_id", &self.merchant_id, MAX_MERCHANT_ID_BYTES)?;
        match (self.kind, &self.corrects_event_id) {
            (EventKind::Correction, None) => return Err(FactError::CorrectionWithoutTarget),
            (EventKind::Correction, Some(target)) => {
                check_id("corrects_event_id", target, MAX_EVENT_ID_BYTES)?;
                if self.amount_minor == 0 {
                    return Err(FactError::ZeroCorrection);
                }
            }
            (kind, Some(_)) => {
                return Err(FactError::TargetWithoutCorrection {
                    kind: kind.as_str(),
                });
            }
            (kind, None) => {
                if self.amount_minor <= 0 {
                    return Err(FactError::AmountNotPositive {
                        kind: kind.as_str(),
                        amount: self.amount_minor,
                    });
                }
            }
        }
        Ok(())
    }

    /// Fingerprint of everything but the identity: equal content means a duplicate,
    /// other content a conflict (docs/semantics.md R1).
    pub(crate) fn content_hash(&self) -> u64 {
        // Fixed-width fields on the stack; the optional target id hashed on its own.
        let mut fixed = [0u8; 32];
        fixed[0] = self.kind as u8;
        fixed[1..9].copy_from_slice(&self.amount_minor.to_le_bytes());
        fixed[9..12].copy_from_slice(self.currency.as_str().as_bytes());
        fixed[12..20].copy_from_slice(&self.event_time_us.to_le_bytes());
        let target = match &self.corrects_event_id {
            Some(target) => {
                fixed[20] = 1;
                xxhash_rust::xxh3::xxh3_64(target.as_bytes())
            }
            None => 0,
        };
        fixed[21..29].copy_from_slice(&target.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64(&fixed)
    }
}

/// Ingest's time rules (docs/semantics.md R2): not beyond the skew bound in the future, not
/// older than the dedup horizon.
pub fn check_event_time(
    event_time_us: i64,
    ingest_time_us: i64,
    settings: &StreamSettings,
) -> Result<(), FactError> {
    let ahead = event_time_us.saturating_sub(ingest_time_us);
    if ahead > settings.max_clock_skew_us {
        return Err(FactError::InFuture {
            ahead_us: ahead,
            skew_us: settings.max_clock_skew_us,
        });
    }
    let age = ingest_time_us.saturating_sub(event_time_us);
    if age > settings.dedup_horizon_us {
        return Err(FactError::BeyondHorizon {
            age_us: age,
            horizon_us: settings.dedup_horizon_us,
        });
    }
    Ok(())
}
