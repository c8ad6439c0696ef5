//! The seed corpora of the fuzz targets (`services/{semantics,proto,storage}/fuzz/
//! corpus/<target>/`): real values, encoded by the crates' own writers. Here
//! because this is the one crate that depends on all three decoding crates.
//!
//! The committed seeds must be exactly what the writers produce now, and each must
//! be read back by its decoder, so a fuzz run starts from inputs that pass every
//! check; after a deliberate format change rewrite them with
//! `PAYLEDGER_WRITE_FUZZ_SEEDS=1 cargo nextest run -p payledger-e2e --test fuzz_seeds`.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use payledger_proto::page_token::{PagePosition, PageQuery, decode_page_token, encode_page_token};
use payledger_proto::{record_from_log, v1};
use payledger_semantics::{
    Currency, Day, EventKind, Fact, FxRecord, PartitionState, Rate, Record, RecordBody,
    RecordedStream, RiskRecord, Settings, StreamSettings, partition_of,
};
use payledger_storage::{
    ArchiveStore, ArchivedDim, Commit, CommitDraft, CutRange, DimRecord, ObjectRef,
    PartitionLineage, SnapshotStore, StateRef,
};
use prost::Message;

/// The partition every seed belongs to, as the fuzz targets read them.
const PARTITION: u32 = 3;
const CUT: CutRange = CutRange {
    first: 1,
    last: 1_000,
};
const SNAPSHOT: &str = "r20261125-013000-fuzz";
/// 2026-11-24T00:00:00Z
const DAY0_US: i64 = 1_795_478_400_000_000;
const HOUR_US: i64 = 3_600_000_000;

struct Seeds {
    write: bool,
}

impl Seeds {
    fn new() -> Self {
        Seeds {
            write: std::env::var_os("PAYLEDGER_WRITE_FUZZ_SEEDS").is_some(),
        }
    }

    fn seed(&mut self, krate: &str, target: &str, name: &str, bytes: &[u8]) {
        let path: PathBuf = [
            env!("CARGO_MANIFEST_DIR"),
            "../services",
            krate,
            "fuzz/corpus",
            target,
            name,
        ]
        .iter()
        .collect();
        if self.write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            return;
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; write the seeds with PAYLEDGER_WRITE_FUZZ_SEEDS=1",
                path.display()
            )
        });
        assert!(
            committed == bytes,
            "{} is not what the writer produces now; after a deliberate format change rewrite the seeds with PAYLEDGER_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
    }
}

fn merchants() -> Vec<String> {
    (0..200)
        .map(|i| format!("m-{i:05}"))
        .filter(|m| partition_of(m, Settings::default().partitions) == PARTITION)
        .take(3)
        .collect()
}

fn fact(id: &str, merchant: &str, kind: EventKind, amount: i64, currency: &str, at: i64) -> Fact {
    Fact {
        event_id: id.to_string(),
        merchant_id: merchant.to_string(),
        kind,
        amount_minor: amount,
        currency: Currency::parse(currency).unwrap(),
        event_time_us: at,
        corrects_event_id: None,
    }
}

/// A partition's log over two days: two currencies, refunds, a correction, a
/// resend, a conflicting resend, a late event and heartbeats.
fn log() -> Vec<Record> {
    let m = merchants();
    let mut facts = Vec::new();
    for i in 0..24i64 {
        let kind = if i % 5 == 4 {
            EventKind::RefundIssued
        } else {
            EventKind::PaymentCaptured
        };
        let currency = if i % 3 == 0 { "USD" } else { "EUR" };
        facts.push(fact(
            &format!("ev-{i}"),
            &m[i as usize % 3],
            kind,
            500 + 37 * i,
            currency,
            DAY0_US + 2 * i * HOUR_US,
        ));
    }
    let mut correction = fact(
        "ev-fix",
        &m[1],
        EventKind::Correction,
        -120,
        "EUR",
        DAY0_US + 30 * HOUR_US,
    );
    correction.corrects_event_id = Some("ev-1".into());
    facts.push(correction);
    facts.push(facts[2].clone());
    let mut conflicting = facts[5].clone();
    conflicting.amount_minor += 1;
    facts.push(conflicting);
    facts.push(fact(
        "ev-late",
        &m[0],
        EventKind::SettlementReceived,
        900,
        "USD",
        DAY0_US + HOUR_US,
    ));
    let mut log = Vec::new();
    for (i, f) in facts.into_iter().enumerate() {
        let seq = 1 + 2 * i as u64;
        let ingest = DAY0_US + 2 * i as i64 * HOUR_US + 60_000_000;
        log.push(Record {
            seq,
            ingest_time_us: ingest.max(f.event_time_us),
            body: RecordBody::Fact(f),
        });
        if i % 10 == 9 {
            log.push(Record {
                seq: seq + 1,
                ingest_time_us: ingest + 1,
                body: RecordBody::Heartbeat,
            });
        }
    }
    log
}

fn folded(records: &[Record]) -> PartitionState {
    let mut state = PartitionState::new(PARTITION, Settings::default());
    for r in records {
        state.apply(r).unwrap();
    }
    state
}

fn partition_state(seeds: &mut Seeds) {
    let log = log();
    let settings = Settings::default();
    for (name, state) in [
        ("empty", PartitionState::new(PARTITION, settings)),
        ("first-day", folded(&log[..12])),
        ("two-days", folded(&log)),
    ] {
        let bytes = state.encode();
        PartitionState::decode(&bytes, &settings, PARTITION).unwrap();
        seeds.seed("semantics", "partition_state", name, &bytes);
    }
    // Format 1, as the first releases wrote it (refused for continuing, but read).
    let format1 = include_bytes!("../../services/semantics/tests/data/format1-p3.bin");
    seeds.seed("semantics", "partition_state", "format1", format1);
}

fn log_record(seeds: &mut Seeds) {
    let log = log();
    let mut payloads: Vec<(String, Vec<u8>)> = Vec::new();
    let heartbeat = log.iter().find(|r| r.body == RecordBody::Heartbeat);
    let correction = log
        .iter()
        .find(|r| matches!(&r.body, RecordBody::Fact(f) if f.corrects_event_id.is_some()));
    for (name, record) in [
        ("payment", &log[0]),
        ("heartbeat", heartbeat.unwrap()),
        ("correction", correction.unwrap()),
    ] {
        let body = match &record.body {
            RecordBody::Fact(f) => v1::log_record::Body::Fact(payledger_proto::event_from_fact(f)),
            RecordBody::Heartbeat => v1::log_record::Body::Heartbeat(v1::Heartbeat {
                partition: PARTITION,
            }),
        };
        let payload = v1::LogRecord {
            ingest_time_us: record.ingest_time_us,
            body: Some(body),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            record_from_log(record.seq, &payload).as_ref(),
            Ok(record),
            "{name}"
        );
        payloads.push((name.to_string(), payload));
    }
    let fx = v1::log_record::Body::Fx(v1::FxRate {
        currency: "EUR".into(),
        rate: "1.0842".into(),
        effective_date: "2026-11-24".into(),
        version: 2,
    });
    let risk = v1::log_record::Body::Risk(v1::RiskTier {
        merchant_id: merchants()[0].clone(),
        tier: "high".into(),
        reserve_bps: 1_500,
        effective_date: "2026-11-24".into(),
        version: 1,
    });
    for (name, body) in [("fx", fx), ("risk", risk)] {
        let payload = v1::LogRecord {
            ingest_time_us: DAY0_US,
            body: Some(body),
            ..Default::default()
        }
        .encode_to_vec();
        payloads.push((name.to_string(), payload));
    }
    for (name, payload) in payloads {
        seeds.seed("proto", "log_record", &name, &payload);
    }
}

fn page_token(seeds: &mut Seeds) {
    let from = Day::of_micros(DAY0_US);
    let to = Day(from.0 + 30);
    let m = merchants();
    for (name, filter, at) in [
        ("every-merchant", "", 1),
        ("one-merchant", m[0].as_str(), 29),
    ] {
        let query = PageQuery {
            merchant_id: filter,
            from_day: from,
            to_day: to,
            consistency: v1::Consistency::Auto as i32,
        };
        let position = PagePosition {
            merchant_id: m[0].clone(),
            day: Day(from.0 + at),
        };
        let token = encode_page_token(&query, &position);
        assert_eq!(
            decode_page_token(&query, &token),
            Ok(Some(position.clone()))
        );
        // The target's input: one field a line (see fuzz_targets/page_token.rs).
        let input = [
            filter.to_string(),
            from.0.to_string(),
            to.0.to_string(),
            query.consistency.to_string(),
            token,
            position.merchant_id,
            position.day.0.to_string(),
        ]
        .join("\n");
        seeds.seed("proto", "page_token", name, input.as_bytes());
    }
}

fn reconcile_report(seeds: &mut Seeds) {
    let m = merchants();
    let report = v1::ReconcileReport {
        snapshot_ids: vec![SNAPSHOT.into()],
        uncovered_days: vec!["2026-11-26".into()],
        rows_equal: 41,
        rows_stream_ahead: 1,
        rows_divergent: 0,
        rows_missing: 1,
        differences: vec![
            v1::ReconcileDifference {
                merchant_id: m[0].clone(),
                day: "2026-11-24".into(),
                currency: "EUR".into(),
                kind: "STREAM_AHEAD".into(),
                detail: "closing_minor 1620 vs 1500".into(),
                snapshot_id: SNAPSHOT.into(),
                log_cutoff: 57,
            },
            v1::ReconcileDifference {
                merchant_id: m[1].clone(),
                day: "2026-11-25".into(),
                currency: "USD".into(),
                kind: "MISSING_IN_SNAPSHOT".into(),
                detail: String::new(),
                snapshot_id: SNAPSHOT.into(),
                log_cutoff: 57,
            },
        ],
    };
    // As the coordinator stores it: the report's fields beside the commit's.
    let mut stored = serde_json::to_value(&report).unwrap();
    let extra = serde_json::json!({
        "commit_number": 4,
        "snapshot_id": SNAPSHOT,
        "replay_id": "r-20261125-0130",
        "log_cutoff": 57,
        "stream_caught_up": true,
        "created_at_us": DAY0_US + 26 * HOUR_US,
    });
    stored
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let bytes = serde_json::to_vec_pretty(&stored).unwrap();
    let read: v1::ReconcileReport = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(read, report);
    seeds.seed("proto", "reconcile_report", "stored", &bytes);
    let empty = serde_json::to_vec(&v1::ReconcileReport::default()).unwrap();
    seeds.seed("proto", "reconcile_report", "empty", &empty);
}

async fn stored(store: &Arc<dyn ObjectStore>, path: &str) -> Vec<u8> {
    store
        .get(&Path::from(path))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

async fn archive_segments(seeds: &mut Seeds) {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let archive = ArchiveStore::new(
        store.clone(),
        RecordedStream::new(StreamSettings::default()),
    );
    let log = log();
    archive.put_events(PARTITION, CUT, &log).await.unwrap();
    assert_eq!(archive.read_events(PARTITION, CUT).await.unwrap(), log);
    let path = format!(
        "archive/events/p{PARTITION}/{:020}-{:020}.parquet",
        CUT.first, CUT.last
    );
    seeds.seed(
        "storage",
        "archive_events",
        "two-days",
        &stored(&store, &path).await,
    );

    let dims = vec![
        ArchivedDim {
            seq: 1,
            ingest_time_us: DAY0_US,
            record: DimRecord::Fx(FxRecord {
                currency: Currency::parse("EUR").unwrap(),
                rate: Rate::parse("1.0842").unwrap(),
                effective_day: Day::of_micros(DAY0_US),
                version: 1,
            }),
        },
        ArchivedDim {
            seq: 9,
            ingest_time_us: DAY0_US + HOUR_US,
            record: DimRecord::Risk(RiskRecord {
                merchant_id: merchants()[0].clone(),
                tier: "high".into(),
                reserve_bps: 1_500,
                effective_day: Day::of_micros(DAY0_US),
                version: 1,
            }),
        },
    ];
    archive.put_dims(CUT, &dims).await.unwrap();
    assert_eq!(archive.read_dims(CUT).await.unwrap(), dims);
    let path = format!("archive/dims/{:020}-{:020}.parquet", CUT.first, CUT.last);
    seeds.seed(
        "storage",
        "archive_dims",
        "fx-and-risk",
        &stored(&store, &path).await,
    );
}

async fn snapshot_part(seeds: &mut Seeds) {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let snapshots = SnapshotStore::new(store.clone());
    let rows = folded(&log()).daily_rows();
    assert!(!rows.is_empty());
    snapshots
        .put_part(SNAPSHOT, PARTITION, &rows)
        .await
        .unwrap();
    snapshots.read_part(SNAPSHOT, PARTITION).await.unwrap();
    let path = format!("tables/merchant_exposure_daily/snapshots/{SNAPSHOT}/p{PARTITION}.parquet");
    seeds.seed(
        "storage",
        "snapshot_part",
        "two-days",
        &stored(&store, &path).await,
    );
}

fn commit_json(seeds: &mut Seeds) {
    let object = |path: &str, rows: u64| ObjectRef {
        path: path.to_string(),
        rows,
        content_hash: "6f0cb195951ee1e5019014b93895ee2b".into(),
    };
    let state = |cutoff: u64| StateRef {
        path: format!("state/v2-0011223344556677/p{PARTITION}/{cutoff:020}.bin"),
        partition: PARTITION,
        cutoff,
        bytes: 2_241,
        content_hash: "019014b93895ee2b6f0cb195951ee1e5".into(),
    };
    let draft = CommitDraft {
        snapshot_id: SNAPSHOT.into(),
        replay_id: "r-20261125-0130".into(),
        from_day: Day::of_micros(DAY0_US),
        to_day: Day::of_micros(DAY0_US + 24 * HOUR_US),
        log_cutoff: 57,
        semantics_version: payledger_semantics::SEMANTICS_VERSION,
        version_key: Settings::default().version_key(),
        partitions: 16,
        parts: vec![object(
            &format!("tables/merchant_exposure_daily/snapshots/{SNAPSHOT}/p{PARTITION}.parquet"),
            12,
        )],
        segments_read: vec![object(
            &format!(
                "archive/events/p{PARTITION}/{:020}-{:020}.parquet",
                CUT.first, CUT.last
            ),
            31,
        )],
        states: vec![PartitionLineage {
            partition: PARTITION,
            started_from: Some(state(20)),
            written: state(57),
        }],
    };
    let with_states = Commit {
        number: 4,
        draft: draft.clone(),
    };
    // The first releases' commits: no states, the settings' fingerprint instead.
    let mut first_release = serde_json::to_value(Commit {
        number: 1,
        draft: CommitDraft {
            states: Vec::new(),
            ..draft
        },
    })
    .unwrap();
    let fields = first_release.as_object_mut().unwrap();
    let key = fields.remove("version_key").unwrap();
    fields.insert("settings_fingerprint".into(), key);
    for (name, bytes) in [
        (
            "with-states",
            serde_json::to_vec_pretty(&with_states).unwrap(),
        ),
        (
            "first-release",
            serde_json::to_vec_pretty(&first_release).unwrap(),
        ),
    ] {
        serde_json::from_slice::<Commit>(&bytes).unwrap();
        seeds.seed("storage", "commit_json", name, &bytes);
    }
}

/// `payledger ingest` files: the first byte picks kind and format (see the
/// target), the rest is the README's examples.
fn file_line(seeds: &mut Seeds) {
    let files: [(&str, u8, &str); 5] = [
        (
            "events.csv",
            3,
            "event_id,merchant_id,kind,amount_minor,currency,event_time,corrects_event_id\n\
             ev-1,m-1,PAYMENT_CAPTURED,1250,EUR,2026-11-25T09:30:00Z,\n\
             ev-2,m-1,CORRECTION,-250,EUR,2026-11-25T10:00:00Z,ev-1\n",
        ),
        (
            "events.jsonl",
            6,
            "{\"event_id\":\"ev-1\",\"merchant_id\":\"m-1\",\"kind\":\"PAYMENT_CAPTURED\",\"amount_minor\":1250,\"currency\":\"EUR\",\"event_time\":\"2026-11-25T09:30:00Z\"}\n",
        ),
        (
            "fx.csv",
            4,
            "currency,rate,effective_date,version\nEUR,1.0842,2026-11-25,1\nGBP,1.2710,2026-11-25,1\n",
        ),
        (
            "fx.jsonl",
            7,
            "{\"currency\":\"EUR\",\"rate\":\"1.0842\",\"effective_date\":\"2026-11-25\",\"version\":1}\n",
        ),
        (
            "risk.csv",
            5,
            "merchant_id,tier,reserve_bps,effective_date,version\nm-1,high,500,2026-11-25,1\n",
        ),
    ];
    for (name, choice, text) in files {
        let mut bytes = vec![choice];
        bytes.extend_from_slice(text.as_bytes());
        seeds.seed("proto", "file_line", name, &bytes);
    }
}

#[tokio::test]
async fn committed_seeds_are_what_the_writers_produce() {
    let mut seeds = Seeds::new();
    partition_state(&mut seeds);
    log_record(&mut seeds);
    page_token(&mut seeds);
    reconcile_report(&mut seeds);
    file_line(&mut seeds);
    archive_segments(&mut seeds).await;
    snapshot_part(&mut seeds).await;
    commit_json(&mut seeds);
}
