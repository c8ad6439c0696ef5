//! The state's encoding: canonical bytes, refusals, and format 1 as the first
//! releases wrote it (`data/format1-p3.bin`, written by that code from the log
//! `log()` builds).

use payledger_semantics::{
    Currency, EventKind, Fact, PartitionState, Record, RecordBody, STATE_FORMAT, Settings,
    StateFileError, partition_of,
};

/// The log the fixture was folded from: three merchants of partition 3,
/// resends with other content, refunds, two currencies, heartbeats, late events.
fn log() -> Vec<Record> {
    let merchants: Vec<String> = (0..200)
        .map(|i| format!("m:{i}"))
        .filter(|m| partition_of(m, 16) == 3)
        .take(3)
        .collect();
    let day0 = 1_767_225_600_000_000i64; // 2026-01-01
    let hour = 3_600_000_000i64;
    let mut seq = 0;
    let mut log = Vec::new();
    for i in 0..60i64 {
        seq += 1 + (i % 3) as u64;
        let ingest = day0 + i * hour;
        let body = if i % 11 == 10 {
            RecordBody::Heartbeat
        } else {
            let id = if i % 7 == 6 {
                format!("e{}", i - 3)
            } else {
                format!("e{i}")
            };
            RecordBody::Fact(Fact {
                event_id: id,
                merchant_id: merchants[(i % 3) as usize].clone(),
                kind: if i % 5 == 4 {
                    EventKind::RefundIssued
                } else {
                    EventKind::PaymentCaptured
                },
                amount_minor: 100 + i * 7,
                currency: Currency::parse(if i % 4 == 0 { "EUR" } else { "USD" }).unwrap(),
                event_time_us: ingest - (i % 9) * hour,
                corrects_event_id: None,
            })
        };
        log.push(Record {
            seq,
            ingest_time_us: ingest,
            body,
        });
    }
    log
}

fn folded(records: &[Record]) -> PartitionState {
    let mut state = PartitionState::new(3, Settings::default());
    for r in records {
        state.apply(r).unwrap();
    }
    state
}

/// Format 1 still decodes, field for field; it was folded under semantics 1, which
/// R11 changed, so it is refused for continuing with both named (the projector
/// then starts from a replay state or the archive).
#[test]
fn a_first_release_checkpoint_is_read_and_refused_as_semantics_1() {
    let old = include_bytes!("data/format1-p3.bin");
    for settings in [
        Settings::default(),
        Settings {
            allowed_lateness_us: 2 * 3_600_000_000,
            ..Settings::default()
        },
    ] {
        match PartitionState::decode(old, &settings, 3) {
            Err(StateFileError::Legacy {
                semantics_version: 1,
                found,
                expected,
            }) => {
                assert!(found.contains("allowed_lateness_us=3600000000"), "{found}");
                assert_eq!(expected, settings.legacy_canonical());
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // Truncated, it is unreadable rather than misread.
    assert!(matches!(
        PartitionState::decode(&old[..old.len() / 2], &Settings::default(), 3),
        Err(StateFileError::Unreadable(_))
    ));
}

/// Pinned: a change of these bytes is a change of STATE_FORMAT (and so of the
/// version key), or every stored state stops matching its own re-encoding.
#[test]
fn the_encoding_is_pinned() {
    let bytes = folded(&log()).encode();
    assert_eq!(
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes)),
        "6f0cb195951ee1e5019014b93895ee2b"
    );
    assert_eq!(bytes.len(), 2241);
}

#[test]
fn the_same_fold_gives_the_same_bytes_however_it_was_restored() {
    let log = log();
    let whole = folded(&log).encode();
    for cut in [1, 17, 30, 59] {
        let mut state = folded(&log[..cut]);
        state = PartitionState::decode(&state.encode(), &Settings::default(), 3).unwrap();
        for r in &log[cut..] {
            state.apply(r).unwrap();
        }
        assert!(state.encode() == whole, "restored at {cut}: bytes differ");
    }
}

#[test]
fn state_of_another_version_key_partition_or_format_is_refused() {
    let bytes = folded(&log()).encode();
    let other = Settings {
        bucket_width_us: 1_800_000_000,
        ..Settings::default()
    };
    assert!(matches!(
        PartitionState::decode(&bytes, &other, 3),
        Err(StateFileError::VersionKey { .. })
    ));
    assert_eq!(
        PartitionState::decode(&bytes, &Settings::default(), 4).unwrap_err(),
        StateFileError::Partition {
            found: 3,
            expected: 4
        }
    );
    let mut future = bytes.clone();
    future[0] = (STATE_FORMAT + 1) as u8;
    assert_eq!(
        PartitionState::decode(&future, &Settings::default(), 3).unwrap_err(),
        StateFileError::Format(STATE_FORMAT + 1)
    );
    for cut in [0, 1, 10, bytes.len() - 1] {
        assert!(
            matches!(
                PartitionState::decode(&bytes[..cut], &Settings::default(), 3),
                Err(StateFileError::Unreadable(_))
            ),
            "truncated at {cut}"
        );
    }
}

/// Found by the `partition_state` fuzz target: a state whose day lies beyond the
/// microseconds an i64 holds overflowed building its encoding. State bytes come
/// from object storage, so what no fold can build is refused at decode.
#[test]
fn a_state_no_fold_can_reach_is_refused_at_decode() {
    let beyond = include_bytes!("data/fuzz-day-beyond-i64.bin");
    match PartitionState::decode(beyond, &Settings::default(), 3) {
        Err(StateFileError::Invalid(why)) => assert!(why.contains("day"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}
