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

/// Everything a kind means, in one row (docs/semantics.md, facts). Adding a kind
/// is adding a row here and a value to `EventKind` in records.proto; the proto
/// conversion and the CLI's messages are built from this table, and tests check
/// the proto enum and the DuckDB SQL against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: EventKind,
    /// The name in JSON lines, the archive's `kind` column and the `Nats-Msg-Id`;
    /// the proto value is `EVENT_KIND_<name>`.
    pub name: &'static str,
    /// +1 or −1: the delta is `sign × amount` (R4). A CORRECTION's is +1, its
    /// amount carrying either sign.
    pub sign: i8,
    /// The value of records.proto's `EventKind`. Pinned: logs hold it.
    pub wire_code: i32,
    /// The byte the content hash holds for the kind (R10). Pinned: checkpoints
    /// and replay states remember identities by hashes made with it, so a new
    /// kind takes an unused byte, whatever its place in the enum.
    pub hash_code: u8,
}

/// One row per kind, in the order of `EventKind`'s variants.
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        kind: EventKind::PaymentCaptured,
        name: "PAYMENT_CAPTURED",
        sign: 1,
        wire_code: 1,
        hash_code: 0,
    },
    KindInfo {
        kind: EventKind::RefundIssued,
        name: "REFUND_ISSUED",
        sign: -1,
        wire_code: 2,
        hash_code: 1,
    },
    KindInfo {
        kind: EventKind::SettlementReceived,
        name: "SETTLEMENT_RECEIVED",
        sign: -1,
        wire_code: 3,
        hash_code: 2,
    },
    KindInfo {
        kind: EventKind::ChargebackOpened,
        name: "CHARGEBACK_OPENED",
        sign: 1,
        wire_code: 4,
        hash_code: 3,
    },
    KindInfo {
        kind: EventKind::ChargebackReversed,
        name: "CHARGEBACK_REVERSED",
        sign: -1,
        wire_code: 5,
        hash_code: 4,
    },
    KindInfo {
        kind: EventKind::Correction,
        name: "CORRECTION",
        sign: 1,
        wire_code: 6,
        hash_code: 5,
    },
];

// `EventKind::info` indexes the table by variant: a row out of place fails the build.
const _: () = {
    let mut i = 0;
    while i < KINDS.len() {
        assert!(KINDS[i].kind as usize == i, "KINDS is in variant order");
        assert!(KINDS[i].sign == 1 || KINDS[i].sign == -1, "a sign is ±1");
        i += 1;
    }
};

impl EventKind {
    pub const ALL: [EventKind; KINDS.len()] = {
        let mut all = [EventKind::PaymentCaptured; KINDS.len()];
        let mut i = 0;
        while i < KINDS.len() {
            all[i] = KINDS[i].kind;
            i += 1;
        }
        all
    };

    pub fn info(self) -> &'static KindInfo {
        &KINDS[self as usize]
    }

    /// The signed delta this kind applies to open exposure (docs/semantics.md, facts; R4).
    pub fn signed_delta(self, amount_minor: i64) -> i128 {
        i128::from(self.info().sign) * i128::from(amount_minor)
    }

    pub fn as_str(self) -> &'static str {
        self.info().name
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        KINDS.iter().find(|k| k.name == s).map(|k| k.kind)
    }

    /// The kind of a records.proto `EventKind` value; None for 0 (unset) and values
    /// this build does not know.
    pub fn from_wire_code(code: i32) -> Option<EventKind> {
        KINDS.iter().find(|k| k.wire_code == code).map(|k| k.kind)
    }

    pub fn wire_code(self) -> i32 {
        self.info().wire_code
    }

    /// "PAYMENT_CAPTURED, REFUND_ISSUED, …": for messages naming the accepted kinds.
    pub fn names() -> String {
        KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
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
    #[error("corrects_event_id: a CORRECTION cannot correct itself (it names its own event_id)")]
    CorrectsItself,
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
            FactError::CorrectionWithoutTarget
            | FactError::CorrectsItself
            | FactError::TargetWithoutCorrection { .. } => "corrects_event_id",
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

    /// [`Fact::validate`] and the rules ingest added later (docs/semantics.md,
    /// facts): ingest applies them to new facts, the fold never, so a record
    /// already in the log folds as it always did.
    pub fn validate_new(&self) -> Result<(), FactError> {
        self.validate()?;
        if self.corrects_event_id.as_deref() == Some(self.event_id.as_str()) {
            return Err(FactError::CorrectsItself);
        }
        Ok(())
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
