//! An archive segment of partition events (`archive/events/p{N}/…parquet`,
//! docs/storage.md) as a replay or a projector bootstrap reads it: any bytes are
//! refused as corrupt or give records that, archived again, make a segment with
//! the same content hash that reads back as the same records.
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

const PARTITION: u32 = 3;
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
        let path = format!(
            "archive/events/p{PARTITION}/{:020}-{:020}.parquet",
            CUT.first, CUT.last
        );
        store
            .put(&Path::from(path), bytes.to_vec().into())
            .await
            .expect("an in-memory put");
        let Ok((records, info)) = archive.read_events_with_info(PARTITION, CUT).await else {
            return;
        };
        let (_, again) = empty_archive();
        let written = again
            .put_events(PARTITION, CUT, &records)
            .await
            .expect("records read from a segment can be archived again");
        assert_eq!(
            (written.rows, &written.content_hash),
            (info.rows, &info.content_hash)
        );
        let reread = again
            .read_events(PARTITION, CUT)
            .await
            .expect("a segment just written reads back");
        assert_eq!(reread, records);
    })
});
