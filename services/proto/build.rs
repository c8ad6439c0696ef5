//! Compiles `proto/payledger/v1/*.proto` without protoc: protox parses them into a
//! descriptor set, which also feeds gRPC reflection.
use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "records.proto",
        "rows.proto",
        "ingest.proto",
        "query.proto",
        "replay.proto",
    ]
    .map(|f| root.join("payledger/v1").join(f));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("payledger_descriptor.bin"), fds.encode_to_vec())?;
    // Reconciliation reports are also stored as JSON next to the commit they check.
    let mut config = tonic_prost_build::configure();
    for message in [
        "payledger.v1.ReconcileReport",
        "payledger.v1.ReconcileDifference",
    ] {
        config = config.type_attribute(
            message,
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        );
    }
    config.compile_fds(fds)?;
    Ok(())
}
