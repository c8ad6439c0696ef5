//! The coordinator's Prometheus metrics: replays by state and the progress of the
//! running ones (read from the registry at each scrape), the last commit, and the
//! differences its reconciliation found.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use payledger_proto::v1;
use payledger_server_common::metrics::{Family, Gauge, Labels, Registry};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::registry::Registry as Replays;

pub(crate) struct CoordinatorMetrics {
    last_commit: Gauge<f64, AtomicU64>,
    differences: Family<Labels, Gauge>,
}

impl CoordinatorMetrics {
    pub fn register(registry: &mut Registry, replays: Arc<Replays>) -> Arc<Self> {
        let m = Self {
            last_commit: Gauge::default(),
            differences: Family::default(),
        };
        registry.register(
            "payledger_replay_last_commit_timestamp_seconds",
            "When this coordinator last committed a snapshot (Unix time)",
            m.last_commit.clone(),
        );
        registry.register(
            "payledger_reconciliation_differences",
            "Rows the last reconciliation found different, by kind (stream_ahead is expected until the next replay; divergent and missing never are)",
            m.differences.clone(),
        );
        registry.register_collector(Box::new(ReplayStates(replays)));
        Arc::new(m)
    }

    pub fn reconciled(&self, summary: &v1::ReconciliationSummary, at_us: i64) {
        self.last_commit.set(at_us as f64 / 1e6);
        for (kind, rows) in [
            ("stream_ahead", summary.rows_stream_ahead),
            ("divergent", summary.rows_divergent),
            ("missing", summary.rows_missing),
        ] {
            self.differences
                .get_or_create(&vec![("kind", kind.to_string())])
                .set(rows as i64);
        }
    }
}

struct ReplayStates(Arc<Replays>);

impl std::fmt::Debug for ReplayStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayStates")
    }
}

impl Collector for ReplayStates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let replays = self.0.list();
        let mut by_state = encoder.encode_descriptor(
            "payledger_replays",
            "Replays known to the coordinator, by state",
            None,
            MetricType::Gauge,
        )?;
        for state in [
            v1::ReplayState::Running,
            v1::ReplayState::Committing,
            v1::ReplayState::Reconciling,
            v1::ReplayState::Succeeded,
            v1::ReplayState::Failed,
            v1::ReplayState::Cancelled,
        ] {
            let count = replays
                .iter()
                .filter(|r| r.state == i32::from(state))
                .count() as i64;
            let labels = [("state", state.as_str_name())];
            ConstGauge::new(count).encode(by_state.encode_family(&labels)?)?;
        }
        let running = replays
            .iter()
            .filter(|r| r.state == i32::from(v1::ReplayState::Running));
        let (mut done, mut total) = (0i64, 0i64);
        for shard in running.flat_map(|r| &r.shards) {
            let p = shard.progress.unwrap_or_default();
            total += p.segments_total as i64;
            done += if shard.state == i32::from(v1::ShardState::Done) {
                p.segments_total
            } else {
                p.segments_done
            } as i64;
        }
        for (name, help, value) in [
            (
                "payledger_replay_segments_done",
                "Archive segments folded by the shards of running replays",
                done,
            ),
            (
                "payledger_replay_segments_total",
                "Archive segments the shards of running replays read in all",
                total,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}
