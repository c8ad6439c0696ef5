//! The lines of `payledger ingest` files (`payledger_proto::lines`): any input is
//! decoded line by line without a panic, and every line the decoder accepts is
//! one ingest's own conversion accepts too, so a file that passes the CLI's checks
//! is not refused later for a reason the CLI could have told.
//!
//! The first byte picks the kind (events, FX rates, risk tiers) and the format
//! (CSV, JSON lines, or told by the first line); the rest is the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use payledger_proto::lines::{Decoder, Format, Kind, Line};

fuzz_target!(|input: &[u8]| {
    let Some((&choice, rest)) = input.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let kind = [Kind::Events, Kind::Fx, Kind::Risk][usize::from(choice % 3)];
    let format = [None, Some(Format::Csv), Some(Format::JsonLines)][usize::from(choice / 3 % 3)];
    let mut decoder = Decoder::new(kind, format);
    for line in text.split_inclusive('\n') {
        match decoder.decode(line) {
            Ok(Some(Line::Event(event))) => {
                let fact = payledger_proto::fact_from_event(&event).expect("accepted line converts");
                fact.validate_new().expect("accepted line obeys the new-record rules");
            }
            Ok(Some(Line::Fx(fx))) => {
                let rate = payledger_proto::fx_from_proto(&fx).expect("accepted line converts");
                rate.validate().expect("accepted line obeys the FX rules");
            }
            Ok(Some(Line::Risk(risk))) => {
                let tier = payledger_proto::risk_from_proto(&risk).expect("accepted line converts");
                tier.validate().expect("accepted line obeys the risk rules");
            }
            Ok(None) | Err(_) => {}
        }
    }
});
