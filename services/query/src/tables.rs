//! The query service's in-memory view of the stream tables, kept by KV watches,
//! and of the dimension records (`dims`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use payledger_proto::v1;
use payledger_semantics::Day;
use prost::Message;
use tokio::sync::broadcast;

use payledger_server_common::stall::Stall;

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

/// How long a follower waits before re-creating what it lost: doubling from
/// `FIRST_RETRY` to `LAST_RETRY`, back to the first once anything arrives, so a
/// restarting server is not hammered and a short blip costs little.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// How often a follower checks that its stream did not go back in time. The
/// client re-creates a lost consumer by itself, from the sequence after the last
/// one delivered; on a store that came back empty it then waits, silently, for
/// sequences the new stream reaches only much later.
const RESET_CHECK_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) struct Backoff {
    next: Duration,
    /// Losses since anything last arrived.
    pub(crate) attempt: u64,
    /// Whether anything was ever lost, so a re-creation is told from the start.
    lost_before: bool,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            next: FIRST_RETRY,
            attempt: 0,
            lost_before: false,
        }
    }

    fn progressed(&mut self) {
        self.next = FIRST_RETRY;
        self.attempt = 0;
    }

    pub(crate) async fn wait(&mut self) {
        self.attempt += 1;
        self.lost_before = true;
        let delay = self.next;
        self.next = (self.next * 2).min(LAST_RETRY);
        tokio::time::sleep(delay).await;
    }
}

enum Lost {
    /// The stream went back in time (a store wiped and recreated): what was read
    /// from it can no longer be trusted, and following it again cannot fix that.
    Reset(anyhow::Error),
    /// The server restarted, the consumer vanished, a request timed out.
    Transient(anyhow::Error),
}

fn transient(e: impl Into<anyhow::Error>) -> Lost {
    Lost::Transient(e.into())
}

/// How long a stream may answer with fewer messages than were already read from
/// it before that counts as a reset. A replica that was cut off, or a leader just
/// back from a partition, answers from a state behind the majority's until it has
/// caught up (seconds); a store restored from an older backup stays behind.
const BEHIND_GRACE: Duration = Duration::from_secs(30);

/// What tells a stream that went back in time from an answer that is behind:
/// the creation time of the stream first read from, and since when its answers
/// have ended below what was read.
#[derive(Default)]
struct Lineage {
    created: Option<String>,
    behind_since: Option<Instant>,
}

impl Lineage {
    /// Fails with [`Lost::Reset`] when `stream` is not the one first read from (a
    /// store wiped and the stream made again), or has ended below `last`, a
    /// sequence already read from it, for longer than [`BEHIND_GRACE`]; with
    /// [`Lost::Transient`] while it is behind for less. Returns where the
    /// stream ends.
    async fn check(&mut self, stream: &jetstream::stream::Stream, last: u64) -> Result<u64, Lost> {
        let info = stream.get_info().await.map_err(transient)?;
        self.observe(
            &info.config.name,
            info.created.to_string(),
            info.state.last_sequence,
            last,
            Instant::now(),
        )?;
        Ok(info.state.last_sequence)
    }

    fn observe(
        &mut self,
        name: &str,
        created: String,
        last_sequence: u64,
        last: u64,
        now: Instant,
    ) -> Result<(), Lost> {
        match &self.created {
            None => self.created = Some(created),
            Some(first) if *first != created => {
                return Err(Lost::Reset(anyhow::anyhow!(
                    "stream {name} was reset: it was made again at {created}; the one read from was made at {first}"
                )));
            }
            Some(_) => {}
        }
        if last_sequence >= last {
            self.behind_since = None;
            return Ok(());
        }
        let since = *self.behind_since.get_or_insert(now);
        let behind = format!(
            "stream {name} ends at sequence {last_sequence}, below sequence {last} already read"
        );
        if now.duration_since(since) >= BEHIND_GRACE {
            return Err(Lost::Reset(anyhow::anyhow!(
                "{behind} for {BEHIND_GRACE:?}: it was reset"
            )));
        }
        Err(transient(anyhow::anyhow!(
            "{behind}: an answer from a replica that has not caught up yet"
        )))
    }
}

/// Follows a KV bucket from its start, handing each live value to `apply`.
///
/// A NATS server that restarts, or loses the watch's consumer, ends the watch; it
/// is then re-created from the revision after the last one seen, so no update is
/// missed and none is applied out of order; so is a watch that has gone silent
/// while the bucket holds later revisions (server_common::stall). Only a bucket
/// that went back in time ends the follower, since the rows already served can no
/// longer be trusted.
pub(crate) async fn follow_bucket(
    store: kv::Store,
    apply: impl Fn(&[u8]) + Send + 'static,
    stall_timeout: Duration,
) -> anyhow::Result<()> {
    let bucket = store.name.clone();
    let mut last_revision = 0u64;
    let mut backoff = Backoff::new();
    let mut lineage = Lineage::default();
    let mut stall = Stall::new(stall_timeout);
    let mut reset_check = tokio::time::interval(RESET_CHECK_INTERVAL.min(stall_timeout / 2));
    reset_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let lost = match watch_after(&store, last_revision, &mut lineage).await {
            Ok(mut watch) => {
                stall.delivered();
                if backoff.lost_before {
                    tracing::info!(
                        %bucket,
                        from_revision = last_revision + 1,
                        "watch of bucket re-created"
                    );
                }
                loop {
                    tokio::select! {
                        entry = watch.next() => match entry {
                            Some(Ok(entry)) => {
                                stall.delivered();
                                last_revision = entry.revision;
                                backoff.progressed();
                                if matches!(entry.operation, kv::Operation::Put) {
                                    apply(&entry.value);
                                }
                            }
                            Some(Err(e)) => break transient(e),
                            None => break transient(anyhow::anyhow!("the watch ended")),
                        },
                        _ = reset_check.tick() => {
                            // The watch reports its own losses, except going silent.
                            match lineage.check(&store.stream, last_revision).await {
                                Err(Lost::Reset(e)) => break Lost::Reset(e),
                                Err(Lost::Transient(_)) => {}
                                Ok(end) => {
                                    let what = format!("the watch of bucket {bucket}");
                                    if let Err(e) = stall.judge(&what, last_revision, end) {
                                        break transient(e);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Err(lost) => lost,
        };
        let lost = match lost {
            Lost::Reset(e) => {
                return Err(e.context(format!(
                    "bucket {bucket} went back in time; the rows read from it are gone"
                )));
            }
            Lost::Transient(e) => e,
        };
        tracing::warn!(
            %bucket,
            error = %lost,
            last_revision,
            attempt = backoff.attempt + 1,
            "watch of bucket lost; re-creating it from the last revision seen"
        );
        backoff.wait().await;
    }
}

async fn watch_after(
    store: &kv::Store,
    last_revision: u64,
    lineage: &mut Lineage,
) -> Result<kv::Watch, Lost> {
    lineage.check(&store.stream, last_revision).await?;
    if last_revision == 0 {
        return store.watch_with_history(">").await.map_err(transient);
    }
    store
        .watch_from_revision(">", last_revision + 1)
        .await
        .map_err(transient)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(r: Result<(), Lost>) -> &'static str {
        match r {
            Ok(()) => "ok",
            Err(Lost::Transient(_)) => "transient",
            Err(Lost::Reset(_)) => "reset",
        }
    }

    #[test]
    fn a_stream_made_again_is_a_reset_at_once() {
        let mut lineage = Lineage::default();
        let t = Instant::now();
        assert_eq!(
            verdict(lineage.observe("KV_x", "t1".into(), 10, 5, t)),
            "ok"
        );
        assert_eq!(
            verdict(lineage.observe("KV_x", "t2".into(), 50, 10, t)),
            "reset"
        );
    }

    #[test]
    fn an_answer_behind_is_transient_until_the_grace_has_passed() {
        let mut lineage = Lineage::default();
        let t = Instant::now();
        assert_eq!(
            verdict(lineage.observe("KV_x", "t1".into(), 400, 400, t)),
            "ok"
        );
        // A replica back from a partition answers from its older state.
        assert_eq!(
            verdict(lineage.observe("KV_x", "t1".into(), 130, 400, t)),
            "transient"
        );
        let later = t + BEHIND_GRACE - Duration::from_secs(1);
        assert_eq!(
            verdict(lineage.observe("KV_x", "t1".into(), 130, 400, later)),
            "transient"
        );
        // Caught up: the next time behind starts a new grace.
        assert_eq!(
            verdict(lineage.observe("KV_x", "t1".into(), 401, 400, later)),
            "ok"
        );
        let again = later + Duration::from_secs(1);
        assert_eq!(
            verdict(lineage.observe("KV_x", "t1".into(), 130, 401, again)),
            "transient"
        );
        // Behind for the whole grace: a store restored from an older copy.
        let stuck = again + BEHIND_GRACE;
        assert_eq!(
            verdict(lineage.observe("KV_x", "t1".into(), 130, 401, stuck)),
            "reset"
        );
    }
}
