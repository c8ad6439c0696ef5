//! The archive's checks that need no second backend: tiling, and segments of
//! another stream or of the first releases (the round trips, rewrites and listings
//! are in the conformance suite, e2e/tests/storage.rs, on every backend).

use payledger_semantics::{
    Currency, EventKind, Fact, Record, RecordBody, RecordedStream, StreamSettings,
};
use payledger_storage::{
    ArchiveStore, CutRange, StorageError, TilingError, open_store, verify_tiling,
};

fn store() -> (tempfile::TempDir, ArchiveStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::new(
        open_store(dir.path().to_str().unwrap()).unwrap(),
        RecordedStream::new(StreamSettings::default()),
    );
    (dir, store)
}

fn fact(seq: u64, id: &str, amount: i64, corrects: Option<&str>) -> Record {
    Record {
        seq,
        ingest_time_us: 1_700_000_000_000_000 + seq as i64,
        body: RecordBody::Fact(Fact {
            event_id: id.to_string(),
            merchant_id: "m:1".to_string(),
            kind: if corrects.is_some() {
                EventKind::Correction
            } else {
                EventKind::PaymentCaptured
            },
            amount_minor: amount,
            currency: Currency::parse("EUR").unwrap(),
            event_time_us: 1_699_999_000_000_000,
            corrects_event_id: corrects.map(str::to_string),
        }),
    }
}

#[test]
fn tiling_accepts_whole_cuts_and_names_each_defect() {
    let watermarks = [10, 20, 35];
    let cut = |first, last| CutRange { first, last };
    // p has records in cuts 1 and 3 only: no segment for cut 2 is not a gap.
    assert_eq!(
        verify_tiling(&[cut(1, 10), cut(21, 35)], &watermarks, 35),
        Ok(())
    );
    assert_eq!(
        verify_tiling(&[cut(1, 10), cut(15, 20)], &watermarks, 35),
        Err(TilingError::Gap(cut(15, 20), 10))
    );
    assert_eq!(
        verify_tiling(&[cut(1, 10), cut(5, 20)], &watermarks, 35),
        Err(TilingError::Overlap(cut(1, 10), cut(5, 20)))
    );
    assert_eq!(
        verify_tiling(&[cut(1, 12)], &watermarks, 35),
        Err(TilingError::NotACut(cut(1, 12)))
    );
    // A cut past the verified watermark (being written) is not judged.
    assert_eq!(
        verify_tiling(&[cut(1, 10), cut(36, 50)], &watermarks, 35),
        Ok(())
    );
}

#[tokio::test]
async fn an_archive_of_another_stream_is_refused() {
    let (dir, archive) = store();
    let cut = CutRange { first: 1, last: 1 };
    archive
        .put_events(0, cut, &[fact(1, "a", 100, None)])
        .await
        .unwrap();
    let settings = StreamSettings {
        dedup_horizon_us: 1_000_000,
        ..StreamSettings::default()
    };
    let other = ArchiveStore::new(
        open_store(dir.path().to_str().unwrap()).unwrap(),
        RecordedStream::new(settings),
    );
    match other.read_events(0, cut).await {
        Err(StorageError::Corrupt { message, .. }) => {
            assert!(
                message.contains(&StreamSettings::default().fingerprint())
                    && message.contains(&settings.fingerprint()),
                "{message}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Segments the first archivers wrote (`payledger.settings_fingerprint` in the
/// footer, here one of the v1 fixture's) are read when the stream recorded the
/// settings they name, and refused for any other stream.
#[tokio::test]
async fn a_first_release_segment_is_read_for_the_stream_that_recorded_its_settings() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../e2e/fixtures/v1-stack/store"
    );
    let legacy = payledger_semantics::Settings::default();
    let archive = ArchiveStore::new(
        open_store(fixture).unwrap(),
        RecordedStream {
            settings: legacy.stream(),
            legacy: Some(legacy),
        },
    );
    let watermarks = archive.watermarks().await.unwrap();
    let segments = archive.event_segments(1).await.unwrap();
    verify_tiling(&segments, &watermarks, *watermarks.last().unwrap()).unwrap();
    let mut records = 0;
    for cut in &segments {
        records += archive.read_events(1, *cut).await.unwrap().len();
    }
    assert!(records > 0);
    let dims = archive.dim_segments().await.unwrap();
    assert!(!archive.read_dims(dims[0]).await.unwrap().is_empty());

    // A stream created by today's ingest recorded no legacy settings.
    let today = ArchiveStore::new(
        open_store(fixture).unwrap(),
        RecordedStream::new(legacy.stream()),
    );
    assert!(matches!(
        today.read_events(1, segments[0]).await,
        Err(StorageError::Corrupt { .. })
    ));
}
