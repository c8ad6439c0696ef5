//! The one rendering layer: every command hands its reports to [`Output`], which
//! prints each as text or, with `--json`, as one JSON value per line on stdout,
//! and takes the exit status from the report itself, so that a script reading
//! JSON and a person reading text see the same status (README "Exit status").
//! Progress bars, warnings and retries go to stderr and never mix with either.

use std::io::Write;

/// The exit statuses of `payledger`, the same with and without `--json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The command did what it was asked.
    Success,
    /// It could not: a service unreachable, a refused call, unreadable input.
    /// The error is on stderr. (Rust's own status for an error from `main`.)
    Error,
    /// Command-line usage error (clap's status); also a replay followed with
    /// `--wait` that failed or was cancelled.
    Failed,
    /// Snapshot and stream disagree for the same log prefix (divergent or missing
    /// rows): `reconcile`, `replay start --wait`. Never expected; page someone.
    Divergent,
    /// `ingest`: at least one line or record was rejected; the others were sent
    /// (with `--all-or-nothing`, none was).
    Rejected,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Error => 1,
            Exit::Failed => 2,
            Exit::Divergent => 3,
            Exit::Rejected => 4,
        }
    }
}

/// The exit statuses as `--help` shows them.
pub const EXIT_STATUS_HELP: &str = "Exit status (the same with --json): 0 done; 1 error (stated on stderr); \
2 usage error, or a replay followed with --wait failed or was cancelled; \
3 reconcile or replay start --wait found divergent or missing rows; \
4 ingest rejected at least one line or record.";

/// What a command reports: a text form, a JSON form and the exit status it implies.
pub trait Report {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()>;
    fn json(&self) -> serde_json::Value;
    fn exit(&self) -> Exit {
        Exit::Success
    }
}

/// Prints reports in the form `--json` chose.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints `report` and returns its exit status.
    pub fn emit(&self, report: &dyn Report) -> anyhow::Result<Exit> {
        let mut out = std::io::stdout().lock();
        if self.json {
            serde_json::to_writer(&mut out, &report.json())?;
            writeln!(out)?;
        } else {
            report.human(&mut out)?;
        }
        out.flush()?;
        Ok(report.exit())
    }

    /// A line for people only (what is about to happen); none in JSON.
    pub fn note(&self, text: &str) -> anyhow::Result<()> {
        if !self.json {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")?;
            out.flush()?;
        }
        Ok(())
    }
}

/// A report made of a JSON value and its text.
pub struct Plain {
    pub text: String,
    pub value: serde_json::Value,
    pub exit: Exit,
}

impl Report for Plain {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{}", self.text)
    }

    fn json(&self) -> serde_json::Value {
        self.value.clone()
    }

    fn exit(&self) -> Exit {
        self.exit
    }
}
