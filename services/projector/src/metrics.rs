//! The projector's Prometheus metrics, by partition: lag, applied position,
//! checkpoint time, and freshness (ingest to stored row); and replay shards run.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use payledger_server_common::metrics::{
    Counter, Family, Gauge, Histogram, Labels, Registry, latency_histogram,
};

pub(crate) struct ProjectorMetrics {
    lag: Family<Labels, Gauge>,
    applied: Family<Labels, Gauge>,
    checkpoint: Family<Labels, Gauge<f64, AtomicU64>>,
    checkpoint_failures: Family<Labels, Counter>,
    freshness: Histogram,
    owned: Family<Labels, Gauge>,
    leases_lost: Family<Labels, Counter>,
    leases_taken_over: Family<Labels, Counter>,
    refused: Family<Labels, Gauge>,
    bootstrap_segments: Family<Labels, Counter>,
    bootstrapping: Family<Labels, Gauge>,
    pub shards: Family<Labels, Counter>,
}

fn partition(p: u32) -> Labels {
    vec![("partition", p.to_string())]
}

impl ProjectorMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            lag: Family::default(),
            applied: Family::default(),
            checkpoint: Family::default(),
            checkpoint_failures: Family::default(),
            freshness: latency_histogram(),
            owned: Family::default(),
            leases_lost: Family::default(),
            leases_taken_over: Family::default(),
            refused: Family::default(),
            bootstrap_segments: Family::default(),
            bootstrapping: Family::default(),
            shards: Family::default(),
        };
        registry.register(
            "payledger_projector_lag_records",
            "Records of the partition in the stream not yet applied",
            m.lag.clone(),
        );
        registry.register(
            "payledger_projector_applied_sequence",
            "Log position through which the partition's rows are stored",
            m.applied.clone(),
        );
        registry.register(
            "payledger_projector_checkpoint_timestamp_seconds",
            "When the partition's newest checkpoint was written (Unix time); alert on its age",
            m.checkpoint.clone(),
        );
        registry.register(
            "payledger_projector_checkpoint_failures",
            "Checkpoints of the partition that could not be written (the object store failed); each is tried again",
            m.checkpoint_failures.clone(),
        );
        registry.register(
            "payledger_projector_freshness_seconds",
            "From ingest_time of the newest record of a flush until its rows were stored",
            m.freshness.clone(),
        );
        registry.register(
            "payledger_projector_partition_owned",
            "1 while this projector holds the partition's lease and applies it",
            m.owned.clone(),
        );
        registry.register(
            "payledger_projector_partition_leases_lost",
            "Partition leases this projector lost (taken over or not renewed in time)",
            m.leases_lost.clone(),
        );
        registry.register(
            "payledger_projector_partition_leases_taken_over",
            "Partition leases this projector took over after they expired",
            m.leases_taken_over.clone(),
        );
        registry.register(
            "payledger_projector_partition_refused",
            "1 while the partition is refused: records after its starting point are in neither the log nor the archive",
            m.refused.clone(),
        );
        registry.register(
            "payledger_projector_bootstrap_segments_read",
            "Archive segments read to fill in what the log no longer held, when a partition started",
            m.bootstrap_segments.clone(),
        );
        registry.register(
            "payledger_projector_bootstrapping",
            "1 while the partition starts: restores its state, fills in from the archive what the log \
             no longer holds and writes its rows, until it reads the log (stays 1 while a failed start \
             is tried again)",
            m.bootstrapping.clone(),
        );
        registry.register(
            "payledger_replay_shards",
            "Replay shards this worker ran, by outcome (done, failed, cancelled)",
            m.shards.clone(),
        );
        Arc::new(m)
    }

    pub fn progress(&self, p: u32, applied: u64, pending: u64) {
        self.applied
            .get_or_create(&partition(p))
            .set(applied as i64);
        self.lag.get_or_create(&partition(p)).set(pending as i64);
    }

    pub fn checkpointed(&self, p: u32, at_us: i64) {
        self.checkpoint
            .get_or_create(&partition(p))
            .set(at_us as f64 / 1e6);
    }

    pub fn checkpoint_failed(&self, p: u32) {
        self.checkpoint_failures.get_or_create(&partition(p)).inc();
    }

    pub fn stored(&self, ingest_time_us: i64, now_us: i64) {
        self.freshness
            .observe((now_us - ingest_time_us).max(0) as f64 / 1e6);
    }

    pub fn owned(&self, p: u32, owned: bool) {
        self.owned.get_or_create(&partition(p)).set(owned.into());
    }

    pub fn lease_lost(&self, p: u32) {
        self.leases_lost.get_or_create(&partition(p)).inc();
    }

    pub fn lease_taken_over(&self, p: u32) {
        self.leases_taken_over.get_or_create(&partition(p)).inc();
    }

    pub fn refused(&self, p: u32, refused: bool) {
        self.refused
            .get_or_create(&partition(p))
            .set(refused.into());
    }

    pub fn bootstrap_segment_read(&self, p: u32) {
        self.bootstrap_segments.get_or_create(&partition(p)).inc();
    }

    pub fn bootstrapping(&self, p: u32, bootstrapping: bool) {
        self.bootstrapping
            .get_or_create(&partition(p))
            .set(bootstrapping.into());
    }

    pub fn shard(&self, outcome: &'static str) {
        self.shards
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }
}
