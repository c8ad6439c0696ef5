//! Heartbeats keep quiet partitions' clocks moving so that their days close
//! (docs/semantics.md R5). They are log records like any other: archived and replayed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::publisher::Publisher;
use payledger_server_common::config::micros;

/// Every tick (at most a second of real time), appends a heartbeat to each
/// partition that has had no record for `interval` of ingest's clock.
pub(crate) async fn run(
    publisher: Arc<Publisher>,
    clock: Arc<dyn Clock>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval.min(Duration::from_secs(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let now = clock.now_us();
        let quiet = publisher.quiet_partitions(now - micros(interval));
        if let Err(e) = publisher.append_heartbeats(&quiet, now).await {
            tracing::warn!(error = %e, partitions = quiet.len(), "heartbeat not appended; retrying next tick");
        }
    }
}
