//! The two hashes that say "the same event" (docs/semantics.md R1, R10).
//!
//! Both cover the same content (kind, amount, currency, event time, corrected
//! event), and they differ for reasons:
//!
//! * [`Fact::content_hash`] is stored beside an identity the state already keys
//!   by merchant and `event_id`, so it leaves the identity out; 64 bits suffice,
//!   since a collision only counts a conflict as a duplicate (neither is applied).
//! * [`message_id`] is JetStream's `Nats-Msg-Id`, whose deduplication spans the
//!   whole stream, so it holds the identity as well; it is 128 bits, since a
//!   collision there would have JetStream drop a real event unseen.
//!
//! Both values are held outside this process (checkpoints and replay states hold
//! content hashes, the log holds message ids), so neither may ever change: the
//! golden tests below pin them.

use crate::fact::Fact;

impl Fact {
    /// Fingerprint of everything but the identity: equal content means a duplicate,
    /// other content a conflict (docs/semantics.md R1).
    pub(crate) fn content_hash(&self) -> u64 {
        // Fixed-width fields on the stack; the optional target id hashed on its own.
        let mut fixed = [0u8; 32];
        fixed[0] = self.kind.info().hash_code;
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

/// `Nats-Msg-Id` of a fact: the 128-bit xxh3 of its identity and content as
/// length-prefixed fields, in hex (docs/failure-contract.md), so that an exact
/// resend is absorbed while a conflicting event still reaches the log.
pub fn message_id(fact: &Fact) -> String {
    let mut buf = Vec::with_capacity(160);
    let mut field = |bytes: &[u8]| {
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(bytes);
    };
    field(fact.merchant_id.as_bytes());
    field(fact.event_id.as_bytes());
    field(fact.kind.as_str().as_bytes());
    field(&fact.amount_minor.to_le_bytes());
    field(fact.currency.as_str().as_bytes());
    field(&fact.event_time_us.to_le_bytes());
    field(fact.corrects_event_id.as_deref().unwrap_or("").as_bytes());
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Currency, EventKind};

    fn fact(event_id: &str, kind: EventKind, amount_minor: i64, currency: &str, t: i64) -> Fact {
        Fact {
            event_id: event_id.into(),
            merchant_id: "m-1".into(),
            kind,
            amount_minor,
            currency: Currency::parse(currency).expect("a currency"),
            event_time_us: t,
            corrects_event_id: (kind == EventKind::Correction).then(|| "ev-1".into()),
        }
    }

    /// One fact of every kind, with the values the hashes had when logs,
    /// checkpoints and replay states were first written.
    fn golden() -> Vec<(Fact, u64, &'static str)> {
        use EventKind::*;
        vec![
            (
                fact("ev-1", PaymentCaptured, 1250, "EUR", 1_764_000_000_000_000),
                0x9a0fff4426cbec38,
                "cffbb93617e5df06cf4a776433e263ab",
            ),
            (
                fact("ev-2", RefundIssued, 300, "USD", 1_764_000_000_000_001),
                0x7f7068af392a4a68,
                "a69d2d33b35d8cf9e50aabeb09c4616b",
            ),
            (
                fact(
                    "ev-3",
                    SettlementReceived,
                    99_999,
                    "JPY",
                    1_764_086_400_000_000,
                ),
                0x592227ad5d57171c,
                "03a9cabdacc7cd2e7e8858f6a3907da8",
            ),
            (
                fact("ev-4", ChargebackOpened, 1, "KWD", 1_764_100_000_123_456),
                0x1ca4db4c2ebfc4cb,
                "0df65eb5a488c5b6d95c69ccba753fc8",
            ),
            (
                fact(
                    "ev-5",
                    ChargebackReversed,
                    i64::MAX,
                    "GBP",
                    1_764_200_000_000_000,
                ),
                0x36706b14d10eed10,
                "63be48483ad03617753858bfd5687320",
            ),
            (
                fact("ev-6", Correction, -250, "EUR", 1_764_300_000_000_000),
                0x999079f35dfde7f7,
                "81767f7a0f6406d6e55511bb16738029",
            ),
        ]
    }

    #[test]
    fn remembered_content_hashes_keep_their_values() {
        let golden = golden();
        assert_eq!(golden.len(), EventKind::ALL.len(), "one fact of every kind");
        for (f, content, _) in golden {
            assert_eq!(f.content_hash(), content, "{}", f.event_id);
        }
    }

    #[test]
    fn message_ids_in_the_log_keep_their_values() {
        for (f, _, id) in golden() {
            assert_eq!(message_id(&f), id, "{}", f.event_id);
        }
    }

    #[test]
    fn both_hashes_cover_the_same_content_and_only_the_message_id_the_identity() {
        let (base, _, _) = golden().remove(5);
        let mut changed = Vec::new();
        let mut with = |f: fn(&mut Fact)| {
            let mut other = base.clone();
            f(&mut other);
            changed.push(other);
        };
        with(|f| f.kind = EventKind::PaymentCaptured);
        with(|f| f.amount_minor += 1);
        with(|f| f.currency = Currency::USD);
        with(|f| f.event_time_us += 1);
        with(|f| f.corrects_event_id = Some("ev-2".into()));
        for other in &changed {
            assert_ne!(other.content_hash(), base.content_hash(), "{other:?}");
            assert_ne!(message_id(other), message_id(&base), "{other:?}");
        }
        for identity in [
            |f: &mut Fact| f.event_id = "ev-7".into(),
            |f: &mut Fact| f.merchant_id = "m-2".into(),
        ] {
            let mut other = base.clone();
            identity(&mut other);
            assert_eq!(other.content_hash(), base.content_hash(), "{other:?}");
            assert_ne!(message_id(&other), message_id(&base), "{other:?}");
        }
    }

    #[test]
    fn hash_codes_are_distinct() {
        let mut codes: Vec<u8> = crate::KINDS.iter().map(|k| k.hash_code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), crate::KINDS.len());
    }
}
