//! `payledger bench`: the harness of `payledger_bench`, its report printed as
//! Markdown or, with `--json`, as the figures beside their baselines.

use std::io::Write;

use crate::render::{Exit, Output, Report};

struct Bench(payledger_bench::BenchReport);

impl Report for Bench {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{}", self.0.markdown())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap_or_default()
    }
}

pub async fn run(args: payledger_bench::BenchArgs, out: &Output) -> anyhow::Result<Exit> {
    let report = payledger_bench::run(args).await?;
    out.emit(&Bench(report))
}
