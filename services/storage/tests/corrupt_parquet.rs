//! Objects the archive fuzz targets found making the Parquet reader panic (README,
//! "Fuzzing"): each is refused as a corrupt object naming its path, so a replay or
//! the query service reports it instead of losing the task to a panic.

use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use payledger_semantics::{RecordedStream, StreamSettings};
use payledger_storage::{ArchiveStore, CutRange, SnapshotStore, StorageError};

const CUT: CutRange = CutRange {
    first: 1,
    last: 1_000,
};

async fn store_with(path: &str, bytes: &'static [u8]) -> Arc<dyn ObjectStore> {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    store
        .put(&Path::from(path), bytes.to_vec().into())
        .await
        .unwrap();
    store
}

fn assert_refused<T: std::fmt::Debug>(read: Result<T, StorageError>, path: &str) {
    match read {
        Err(StorageError::Corrupt { path: p, message }) => {
            assert_eq!(p, path);
            assert!(message.contains("the Parquet reader failed"), "{message}");
        }
        other => panic!("{path}: expected a corrupt object, got {other:?}"),
    }
}

#[tokio::test]
async fn objects_that_made_the_parquet_reader_panic_are_refused_as_corrupt() {
    let stream = RecordedStream::new(StreamSettings::default());
    let events = "archive/events/p3/00000000000000000001-00000000000000001000.parquet";
    let archive = ArchiveStore::new(
        store_with(
            events,
            include_bytes!("data/fuzz-events-empty-bitmap.parquet"),
        )
        .await,
        stream,
    );
    assert_refused(archive.read_events(3, CUT).await, events);

    let dims = "archive/dims/00000000000000000001-00000000000000001000.parquet";
    let archive = ArchiveStore::new(
        store_with(dims, include_bytes!("data/fuzz-dims-no-dictionary.parquet")).await,
        stream,
    );
    assert_refused(archive.read_dims(CUT).await, dims);

    let part = "tables/merchant_exposure_daily/snapshots/r20261125-013000-fuzz/p3.parquet";
    let snapshots = SnapshotStore::new(
        store_with(part, include_bytes!("data/fuzz-part-short-decimal.parquet")).await,
    );
    assert_refused(snapshots.read_part("r20261125-013000-fuzz", 3).await, part);
}
