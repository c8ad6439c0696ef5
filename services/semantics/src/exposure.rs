//! All partitions of one log: what a test oracle, a single-process replay or a
//! merge of per-partition shards holds.

use std::collections::BTreeMap;

use crate::fact::{Record, RecordBody};
use crate::settings::{Settings, partition_of};
use crate::state::{CurrentRow, DailyRow, Outcome, PartitionState, SemanticsError};

#[derive(Clone, Debug)]
pub struct Exposure {
    settings: Settings,
    partitions: BTreeMap<u32, PartitionState>,
}

impl Exposure {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            partitions: BTreeMap::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Folds a record of `partition` (facts must belong to it).
    pub fn apply(&mut self, partition: u32, record: &Record) -> Result<Outcome, SemanticsError> {
        let settings = self.settings;
        self.partitions
            .entry(partition)
            .or_insert_with(|| PartitionState::new(partition, settings))
            .apply(record)
    }

    /// Folds a fact into the partition of its merchant; heartbeats need [`Exposure::apply`].
    pub fn apply_fact(&mut self, record: &Record) -> Result<Outcome, SemanticsError> {
        let RecordBody::Fact(fact) = &record.body else {
            return Err(SemanticsError::Merge(
                "a heartbeat names its partition".into(),
            ));
        };
        let partition = partition_of(&fact.merchant_id, self.settings.partitions);
        self.apply(partition, record)
    }

    /// Adds a partition folded on its own (restored from a state, say).
    pub fn insert(&mut self, state: PartitionState) -> Result<(), SemanticsError> {
        if *state.settings() != self.settings {
            return Err(SemanticsError::Merge(
                "the partition was folded under other settings".into(),
            ));
        }
        if self.partitions.contains_key(&state.partition()) {
            return Err(SemanticsError::Merge(format!(
                "partition {} is there already",
                state.partition()
            )));
        }
        self.partitions.insert(state.partition(), state);
        Ok(())
    }

    pub fn partition(&self, partition: u32) -> Option<&PartitionState> {
        self.partitions.get(&partition)
    }

    /// Unites shards folded separately; each partition may come from one shard only.
    /// On error `self` is unchanged.
    pub fn merge(&mut self, other: Exposure) -> Result<(), SemanticsError> {
        if other.settings != self.settings {
            return Err(SemanticsError::Merge(
                "shards were folded under other settings".into(),
            ));
        }
        // Check before inserting anything, so that a refused merge changes nothing.
        if let Some(p) = other
            .partitions
            .keys()
            .find(|p| self.partitions.contains_key(p))
        {
            return Err(SemanticsError::Merge(format!(
                "partition {p} is in two shards"
            )));
        }
        self.partitions.extend(other.partitions);
        Ok(())
    }

    pub fn daily_rows(&self) -> Vec<DailyRow> {
        let mut rows: Vec<DailyRow> = self
            .partitions
            .values()
            .flat_map(PartitionState::daily_rows)
            .collect();
        rows.sort_by(|a, b| {
            (&a.merchant_id, a.day, a.currency).cmp(&(&b.merchant_id, b.day, b.currency))
        });
        rows
    }

    pub fn current_rows(&self) -> Vec<CurrentRow> {
        let mut rows: Vec<CurrentRow> = self
            .partitions
            .values()
            .flat_map(PartitionState::current_rows)
            .collect();
        rows.sort_by(|a, b| (&a.merchant_id, a.currency).cmp(&(&b.merchant_id, b.currency)));
        rows
    }
}
