//! An archive segment of dimension records (`archive/dims/…parquet`,
//! docs/storage.md) as the query service reads it at start: any bytes are
//! refused as corrupt or give records that, archived again, read back as the same
//! records.
#![no_main]

use std::sync::{Arc, LazyLock, Once};

use libfuzzer_sys::fuzz_target;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use payledger_semantics::{RecordedStream, StreamSettings};
use payledger_storage::{ArchiveStore, CutRange};

static DEFAULT_PANIC_HOOK: Once = Once::new();
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
});

const CUT: CutRange = CutRange {
    first: 1,
    last: 1_000,
};

fn empty_archive() -> (Arc<dyn ObjectStore>, ArchiveStore) {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let stream = RecordedStream::new(StreamSettings::default());
    (store.clone(), ArchiveStore::new(store, stream))
}

fuzz_target!(|bytes: &[u8]| {
    // libFuzzer's hook aborts at any panic, even one the decoder catches (it turns
    // the Parquet reader's panics into a corrupt-object error); with the default
    // hook a panic that escapes the target still aborts, in libfuzzer-sys.
    DEFAULT_PANIC_HOOK.call_once(|| drop(std::panic::take_hook()));
    RUNTIME.block_on(async {
        let (store, archive) = empty_archive();
        let path = format!("archive/dims/{:020}-{:020}.parquet", CUT.first, CUT.last);
        store
            .put(&Path::from(path), bytes.to_vec().into())
            .await
            .expect("an in-memory put");
        let Ok(records) = archive.read_dims(CUT).await else {
            return;
        };
        let (_, again) = empty_archive();
        again
            .put_dims(CUT, &records)
            .await
            .expect("records read from a segment can be archived again");
        let reread = again
            .read_dims(CUT)
            .await
            .expect("a segment just written reads back");
        assert_eq!(reread, records);
    })
});
