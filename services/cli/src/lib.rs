//! The `payledger` command line: a local dev stack, a traffic generator, and
//! clients for ingest and query. The library half is what the end-to-end tests
//! and benchmarks share with the binary.

pub mod bench;
pub mod bench_history;
pub mod bench_query;
mod bench_replay;
pub mod check;
pub mod connect;
pub mod dev;
pub mod events_file;
pub mod generate;
pub mod replay;
