//! The checkpoint format: a partition's semantics state plus the settings it was
//! folded under. A checkpoint written under other settings is refused, never mixed.

use bytes::Bytes;
use payledger_semantics::{PartitionState, SEMANTICS_VERSION, STATE_FORMAT, Settings};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    state_format: u32,
    semantics_version: u32,
    settings_fingerprint: String,
    settings: Settings,
    state: PartitionState,
}

pub(crate) fn encode(state: &PartitionState) -> Result<Bytes, postcard::Error> {
    let checkpoint = Checkpoint {
        state_format: STATE_FORMAT,
        semantics_version: SEMANTICS_VERSION,
        settings_fingerprint: state.settings().fingerprint(),
        settings: *state.settings(),
        state: state.clone(),
    };
    postcard::to_stdvec(&checkpoint).map(Bytes::from)
}

pub(crate) fn decode(
    bytes: &[u8],
    expected: &Settings,
    partition: u32,
) -> anyhow::Result<PartitionState> {
    // The format comes first, so it can be read whatever follows it.
    let (format, _): (u32, _) = postcard::take_from_bytes(bytes)?;
    anyhow::ensure!(
        format == STATE_FORMAT,
        "checkpoint of partition {partition} has state format {format}, this binary reads {STATE_FORMAT}; \
         move the old checkpoints away to rebuild from the log"
    );
    let checkpoint: Checkpoint = postcard::from_bytes(bytes)?;
    anyhow::ensure!(
        checkpoint.semantics_version == SEMANTICS_VERSION
            && checkpoint.settings_fingerprint == expected.fingerprint(),
        "checkpoint of partition {partition} was written under semantics {} / settings {}, \
         the stream uses semantics {SEMANTICS_VERSION} / settings {}; move the old checkpoints away to rebuild",
        checkpoint.semantics_version,
        checkpoint.settings_fingerprint,
        expected.fingerprint()
    );
    anyhow::ensure!(
        checkpoint.state.partition() == partition,
        "checkpoint under p{partition} holds partition {}",
        checkpoint.state.partition()
    );
    Ok(checkpoint.state)
}
