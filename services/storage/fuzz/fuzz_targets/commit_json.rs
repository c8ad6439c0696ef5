//! A commit of the authoritative table (`_commits/{N}.json`, docs/storage.md) as
//! every reader of the commit log parses it: any bytes are refused or give a
//! commit whose JSON reads back as the same commit and is written the same way
//! again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use payledger_storage::Commit;

fuzz_target!(|bytes: &[u8]| {
    let Ok(commit) = serde_json::from_slice::<Commit>(bytes) else {
        return;
    };
    let json = serde_json::to_vec_pretty(&commit).expect("a commit serialises");
    let again: Commit = serde_json::from_slice(&json).expect("its own JSON reads back");
    assert_eq!(again, commit);
    assert_eq!(
        serde_json::to_vec_pretty(&again).unwrap(),
        json,
        "canonical"
    );
});
