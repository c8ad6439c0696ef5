//! The `payledger` command line: a local dev stack, a traffic generator, and
//! clients for ingest, query and the replay coordinator. Each command lives in
//! `commands`, and prints only through the rendering layer (`render`), which
//! also sets the exit status. The library half is what the end-to-end tests
//! share with the binary.

pub mod check;
pub mod commands;
pub mod connect;
pub mod dev;
pub mod render;
pub mod replay;

/// The traffic generator, which `payledger gen`, the bench and the tests share.
pub use payledger_bench::generate;
