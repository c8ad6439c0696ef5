//! Compiles `proto/payledger/v1/*.proto` without protoc: protox parses them into a
//! descriptor set, which also feeds gRPC reflection.
use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["records.proto", "rows.proto", "ingest.proto", "query.proto"]
        .map(|f| root.join("payledger/v1").join(f));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("payledger_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
