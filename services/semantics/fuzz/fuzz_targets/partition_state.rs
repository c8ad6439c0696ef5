//! Checkpoints and replay states as read back from object storage
//! (`PartitionState::decode`, docs/storage.md "State files"): any bytes are refused
//! with an error or give a state whose encoding is canonical, that is, it decodes to
//! a state with the very same encoding, and whose rows can be built.
#![no_main]

use libfuzzer_sys::fuzz_target;
use payledger_semantics::{PartitionState, Settings};

fuzz_target!(|bytes: &[u8]| {
    let settings = Settings::default();
    let Ok(state) = PartitionState::decode(bytes, &settings, 3) else {
        return;
    };
    let encoded = state.encode();
    let again =
        PartitionState::decode(&encoded, &settings, 3).expect("a decoded state's encoding decodes");
    assert_eq!(again.encode(), encoded, "the encoding is canonical");
    state.daily_rows();
    state.current_rows();
});
