//! The query service's in-memory view of the stream tables, kept by KV watches,
//! and of the dimension records (`dims`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_nats::jetstream::kv;
use futures::StreamExt;
use payledger_proto::v1;
use payledger_semantics::Day;
use prost::Message;
use tokio::sync::broadcast;

use crate::dims::ProvisionalDims;

/// (merchant_id, day, currency) -> row, ordered for range scans.
pub(crate) type DailyKey = (String, Day, String);

#[derive(Default)]
pub(crate) struct Tables {
    pub current: RwLock<BTreeMap<String, BTreeMap<String, v1::CurrentRow>>>,
    pub daily: RwLock<BTreeMap<DailyKey, v1::DailyRow>>,
    pub progress: RwLock<HashMap<u32, (v1::PartitionProgress, Instant)>>,
    pub dimensions: RwLock<ProvisionalDims>,
}

impl Tables {
    fn apply_current(&self, row: v1::CurrentRow) -> bool {
        let mut current = self.current.write().expect("current table lock");
        let rows = current.entry(row.merchant_id.clone()).or_default();
        match rows.get(&row.currency) {
            // Rows never move backwards, whatever order updates arrive in.
            Some(old) if old.log_position > row.log_position => false,
            _ => {
                rows.insert(row.currency.clone(), row);
                true
            }
        }
    }

    fn apply_daily(&self, row: v1::DailyRow) {
        let Ok(day) = Day::parse(&row.day) else {
            tracing::warn!(day = %row.day, "daily row with an unreadable day ignored");
            return;
        };
        let key = (row.merchant_id.clone(), day, row.currency.clone());
        let mut daily = self.daily.write().expect("daily table lock");
        if daily
            .get(&key)
            .is_none_or(|old| old.log_position <= row.log_position)
        {
            daily.insert(key, row);
        }
    }
}

/// Follows a KV bucket from its start, handing each live value to `apply`.
pub(crate) async fn follow_bucket(
    store: kv::Store,
    apply: impl Fn(&[u8]) + Send + 'static,
) -> anyhow::Result<()> {
    let mut watch = store.watch_with_history(">").await?;
    while let Some(entry) = watch.next().await {
        let entry = entry?;
        if matches!(entry.operation, kv::Operation::Put) {
            apply(&entry.value);
        }
    }
    anyhow::bail!("the watch of bucket {} ended", store.name)
}

pub(crate) fn current_applier(
    tables: Arc<Tables>,
    changes: broadcast::Sender<v1::CurrentRow>,
) -> impl Fn(&[u8]) + Send + 'static {
    move |bytes| match v1::CurrentRow::decode(bytes) {
        Ok(row) => {
            if tables.apply_current(row.clone()) {
                let _ = changes.send(row);
            }
        }
        Err(e) => tracing::warn!(error = %e, "unreadable current row ignored"),
    }
}

pub(crate) fn daily_applier(tables: Arc<Tables>) -> impl Fn(&[u8]) + Send + 'static {
    move |bytes| match v1::DailyRow::decode(bytes) {
        Ok(row) => tables.apply_daily(row),
        Err(e) => tracing::warn!(error = %e, "unreadable daily row ignored"),
    }
}

pub(crate) fn progress_applier(tables: Arc<Tables>) -> impl Fn(&[u8]) + Send + 'static {
    move |bytes| {
        if let Ok(p) = v1::PartitionProgress::decode(bytes) {
            tables
                .progress
                .write()
                .expect("progress lock")
                .insert(p.partition, (p, Instant::now()));
        }
    }
}
