//! A message payload of the log as the projector, the archiver and the query
//! service's dimension follower read it (`LogRecord`, then `record_from_log` on a
//! partition subject, `fx_from_proto` / `risk_from_proto` on a dimension subject):
//! any bytes are refused with an error or read as a record that encodes back to
//! the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use payledger_proto::{event_from_fact, fx_from_proto, record_from_log, risk_from_proto, v1};
use payledger_semantics::RecordBody;
use prost::Message;

fuzz_target!(|payload: &[u8]| {
    let seq = 7;
    if let Ok(record) = record_from_log(seq, payload) {
        let body = match &record.body {
            RecordBody::Fact(fact) => v1::log_record::Body::Fact(event_from_fact(fact)),
            RecordBody::Heartbeat => v1::log_record::Body::Heartbeat(v1::Heartbeat::default()),
        };
        let encoded = v1::LogRecord {
            ingest_time_us: record.ingest_time_us,
            body: Some(body),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            record_from_log(seq, &encoded).as_ref(),
            Ok(&record),
            "a record read from the log encodes back to itself"
        );
    }
    let Ok(log) = v1::LogRecord::decode(payload) else {
        return;
    };
    match &log.body {
        Some(v1::log_record::Body::Fx(fx)) => {
            if let Ok(record) = fx_from_proto(fx) {
                let again = v1::FxRate {
                    currency: record.currency.to_string(),
                    rate: record.rate.as_str().to_string(),
                    effective_date: record.effective_day.to_string(),
                    version: record.version,
                };
                assert_eq!(fx_from_proto(&again).as_ref(), Ok(&record));
            }
        }
        Some(v1::log_record::Body::Risk(risk)) => {
            if let Ok(record) = risk_from_proto(risk) {
                let again = v1::RiskTier {
                    merchant_id: record.merchant_id.clone(),
                    tier: record.tier.clone(),
                    reserve_bps: record.reserve_bps,
                    effective_date: record.effective_day.to_string(),
                    version: record.version,
                };
                assert_eq!(risk_from_proto(&again).as_ref(), Ok(&record));
            }
        }
        _ => {}
    }
});
