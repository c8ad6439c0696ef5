//! A snapshot part (`tables/merchant_exposure_daily/snapshots/{id}/p{N}.parquet`,
//! docs/storage.md) as the query service and a replay's verification read it: any
//! bytes are refused as corrupt or give rows that, written again as a part, read
//! back as the same rows in the part's order.
#![no_main]

use std::sync::{Arc, LazyLock, Once};

use libfuzzer_sys::fuzz_target;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use payledger_storage::SnapshotStore;

static DEFAULT_PANIC_HOOK: Once = Once::new();
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
});

const SNAPSHOT: &str = "r20261125-013000-fuzz";
const PARTITION: u32 = 3;

fuzz_target!(|bytes: &[u8]| {
    // libFuzzer's hook aborts at any panic, even one the decoder catches (it turns
    // the Parquet reader's panics into a corrupt-object error); with the default
    // hook a panic that escapes the target still aborts, in libfuzzer-sys.
    DEFAULT_PANIC_HOOK.call_once(|| drop(std::panic::take_hook()));
    RUNTIME.block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let path =
            format!("tables/merchant_exposure_daily/snapshots/{SNAPSHOT}/p{PARTITION}.parquet");
        store
            .put(&Path::from(path), bytes.to_vec().into())
            .await
            .expect("an in-memory put");
        let Ok(mut rows) = SnapshotStore::new(store)
            .read_part(SNAPSHOT, PARTITION)
            .await
        else {
            return;
        };
        let again = SnapshotStore::new(Arc::new(InMemory::new()));
        again
            .put_part(SNAPSHOT, PARTITION, &rows)
            .await
            .expect("rows read from a part can be written again");
        let reread = again
            .read_part(SNAPSHOT, PARTITION)
            .await
            .expect("a part just written reads back");
        rows.sort_by(|a, b| {
            (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
        });
        assert_eq!(reread, rows);
    })
});
