//! A realistic PayLedger traffic generator, deterministic for a given seed.
//!
//! Merchants capture payments in a few currencies, refund some, receive
//! settlements, open and reverse chargebacks; a share of events is sent again
//! unchanged (duplicates), re-used with other content (conflicts), arrives late,
//! or repairs an earlier event (corrections). FX rates get new versions.

use payledger_proto::v1;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, clap::Args)]
pub struct GenConfig {
    /// Seed: the same seed and settings give the same traffic.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Distinct merchants.
    #[arg(long, default_value_t = 50)]
    pub merchants: usize,
    /// Events to generate (resends included).
    #[arg(long, default_value_t = 10_000)]
    pub events: usize,
    /// Percent of events that are exact resends of an earlier event.
    #[arg(long, default_value_t = 2.0)]
    pub duplicate_pct: f64,
    /// Percent of events that reuse an earlier event_id with other content.
    #[arg(long, default_value_t = 0.5)]
    pub conflict_pct: f64,
    /// Percent of events whose event_time lies 1-20 h before ingest (late).
    #[arg(long, default_value_t = 3.0)]
    pub late_pct: f64,
    /// Percent of events that correct an earlier one.
    #[arg(long, default_value_t = 1.0)]
    pub correction_pct: f64,
    /// FX rate versions published per non-USD currency.
    #[arg(long, default_value_t = 3)]
    pub fx_versions: u32,
    /// Spread of event times before "now" for on-time events, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub spread_secs: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            merchants: 50,
            events: 10_000,
            duplicate_pct: 2.0,
            conflict_pct: 0.5,
            late_pct: 3.0,
            correction_pct: 1.0,
            fx_versions: 3,
            spread_secs: 1800,
        }
    }
}

const CURRENCIES: [&str; 4] = ["USD", "EUR", "GBP", "JPY"];

pub struct Generator {
    config: GenConfig,
    rng: ChaCha8Rng,
    sent: Vec<v1::Event>,
    next_id: u64,
}

impl Generator {
    pub fn new(config: GenConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Self {
            config,
            rng,
            sent: Vec::new(),
            next_id: 0,
        }
    }

    pub fn merchant(&self, i: usize) -> String {
        format!("m-{:05}", i)
    }

    /// FX records for every non-USD currency, `fx_versions` versions each, effective
    /// from `day` (YYYY-MM-DD). A rate depends on its key alone, whatever the seed, so
    /// traffic generated again for the same day publishes the same records, which
    /// ingest answers as duplicates (docs/failure-contract.md, dimension records).
    pub fn fx_records(&mut self, day: &str) -> Vec<v1::FxRate> {
        let mut out = Vec::new();
        for (i, currency) in CURRENCIES.iter().enumerate().skip(1) {
            let base = [0.0, 1.08, 1.27, 0.0067][i];
            for version in 1..=self.config.fx_versions as i32 {
                let key =
                    payledger_semantics::fnv1a_64(format!("{currency}/{day}/{version}").as_bytes());
                let jitter = 1.0 + ((key % 2000) as f64 - 1000.0) / 100_000.0;
                let decimals = if *currency == "JPY" { 6 } else { 4 };
                out.push(v1::FxRate {
                    currency: currency.to_string(),
                    rate: format!("{:.*}", decimals, base * jitter),
                    effective_date: day.to_string(),
                    version,
                });
            }
        }
        out
    }

    pub fn risk_records(&mut self, day: &str) -> Vec<v1::RiskTier> {
        (0..self.config.merchants)
            .map(|i| v1::RiskTier {
                merchant_id: self.merchant(i),
                tier: ["low", "medium", "high"][i % 3].to_string(),
                reserve_bps: [500, 1000, 2500][i % 3],
                effective_date: day.to_string(),
                version: 1,
            })
            .collect()
    }

    fn pct(&mut self, p: f64) -> bool {
        self.rng.gen_bool((p / 100.0).clamp(0.0, 1.0))
    }

    /// The next event, as if ingested at `now_us`.
    pub fn next_event(&mut self, now_us: i64) -> v1::Event {
        if !self.sent.is_empty() && self.pct(self.config.duplicate_pct) {
            let i = self.rng.gen_range(0..self.sent.len());
            return self.sent[i].clone();
        }
        if !self.sent.is_empty() && self.pct(self.config.conflict_pct) {
            let i = self.rng.gen_range(0..self.sent.len());
            let mut event = self.sent[i].clone();
            event.amount_minor += 1;
            return event;
        }
        let merchant = self.rng.gen_range(0..self.config.merchants.max(1));
        let spread = (self.config.spread_secs.max(1) * 1_000_000) as i64;
        let late = self.pct(self.config.late_pct);
        let event_time_us = if late {
            now_us - self.rng.gen_range(3_600_000_000..72_000_000_000)
        } else {
            now_us - self.rng.gen_range(0..spread)
        };
        self.next_id += 1;
        let event_id = format!("ev-{}-{:08}", self.config.seed, self.next_id);
        let event = if !self.sent.is_empty() && self.pct(self.config.correction_pct) {
            let target = self.sent[self.rng.gen_range(0..self.sent.len())].clone();
            let magnitude = (target.amount_minor / 10).max(1);
            v1::Event {
                event_id,
                merchant_id: target.merchant_id,
                kind: v1::EventKind::Correction as i32,
                amount_minor: if self.rng.gen_bool(0.5) {
                    magnitude
                } else {
                    -magnitude
                },
                currency: target.currency,
                event_time_us,
                corrects_event_id: target.event_id,
            }
        } else {
            let roll = self.rng.gen_range(0..100);
            let kind = match roll {
                0..=69 => v1::EventKind::PaymentCaptured,
                70..=79 => v1::EventKind::RefundIssued,
                80..=94 => v1::EventKind::SettlementReceived,
                95..=97 => v1::EventKind::ChargebackOpened,
                _ => v1::EventKind::ChargebackReversed,
            };
            // Most merchants trade in one currency, some in a second one.
            let second = usize::from(self.rng.gen_range(0..4) == 0);
            let currency = CURRENCIES[(merchant + second) % CURRENCIES.len()].to_string();
            v1::Event {
                event_id,
                merchant_id: self.merchant(merchant),
                kind: kind as i32,
                amount_minor: self.rng.gen_range(100..500_000),
                currency,
                event_time_us,
                corrects_event_id: String::new(),
            }
        };
        self.sent.push(event.clone());
        event
    }

    /// `n` events ingested around `now_us`.
    pub fn batch(&mut self, n: usize, now_us: i64) -> Vec<v1::Event> {
        (0..n).map(|_| self.next_event(now_us)).collect()
    }
}
