//! A stored reconciliation report (`_reconciliation/{N}.json`, docs/storage.md) as
//! `ReconcileReport` reads it: any bytes are refused or give a report whose JSON
//! reads back as the same report and is written the same way again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use payledger_proto::v1::ReconcileReport;

fuzz_target!(|bytes: &[u8]| {
    let Ok(report) = serde_json::from_slice::<ReconcileReport>(bytes) else {
        return;
    };
    let json = serde_json::to_vec(&report).expect("a report serialises");
    let again: ReconcileReport = serde_json::from_slice(&json).expect("its own JSON reads back");
    assert_eq!(again, report);
    assert_eq!(serde_json::to_vec(&again).unwrap(), json, "canonical");
});
