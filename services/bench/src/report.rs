//! The bench's report: prose and tables, printed as Markdown
//! (`target/bench-report.md`, and the README's figures) or as JSON, where each
//! table row is an object keyed by the table's columns and a cell that is a
//! number is a JSON number.

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

#[derive(Debug, Default)]
pub struct BenchReport {
    blocks: Vec<Block>,
}

#[derive(Debug)]
enum Block {
    Text(String),
    Table(Table),
}

#[derive(Debug)]
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl BenchReport {
    /// Prose, Markdown as written.
    pub fn text(&mut self, text: impl Into<String>) {
        self.blocks.push(Block::Text(text.into()));
    }

    /// Starts a table; the rows that follow are its.
    pub fn table<S: Into<String>>(&mut self, columns: impl IntoIterator<Item = S>) {
        self.blocks.push(Block::Table(Table {
            columns: columns.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }));
    }

    /// A row of the last table, one cell per column.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let Some(Block::Table(table)) = self.blocks.last_mut() else {
            panic!("a row needs a table before it");
        };
        let row: Vec<String> = cells.into_iter().map(Into::into).collect();
        assert_eq!(row.len(), table.columns.len(), "one cell per column");
        table.rows.push(row);
    }

    /// Whether a table is open for more rows (sections share the figures table).
    pub fn in_table(&self) -> bool {
        matches!(self.blocks.last(), Some(Block::Table(_)))
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for block in &self.blocks {
            match block {
                Block::Text(text) => {
                    out.push_str(text);
                    out.push('\n');
                }
                Block::Table(table) => {
                    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
                    out.push_str(&line(&table.columns));
                    out.push_str(&format!("|{}\n", "---|".repeat(table.columns.len())));
                    for row in &table.rows {
                        out.push_str(&line(row));
                    }
                }
            }
        }
        out
    }
}

fn number(text: &str) -> Option<serde_json::Value> {
    let n = text.trim().parse::<f64>().ok().filter(|n| n.is_finite())?;
    serde_json::Number::from_f64(n).map(serde_json::Value::Number)
}

/// A cell as JSON: a number when it is one; a number followed by a note in
/// parentheses (a baseline and what it is) as `{"value", "note"}`; text otherwise.
fn cell(text: &str) -> serde_json::Value {
    if let Some(n) = number(text) {
        return n;
    }
    let noted = text
        .strip_suffix(')')
        .and_then(|t| t.split_once(" ("))
        .and_then(|(value, note)| Some((number(value)?, note)));
    match noted {
        Some((value, note)) => serde_json::json!({"value": value, "note": note}),
        None => text.into(),
    }
}

struct Row<'a>(&'a Table, &'a [String]);

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.1.len()))?;
        for (column, value) in self.0.columns.iter().zip(self.1) {
            map.serialize_entry(column, &cell(value))?;
        }
        map.end()
    }
}

impl Serialize for Block {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Block::Text(text) => {
                let mut s = serializer.serialize_struct("Text", 1)?;
                s.serialize_field("text", text.trim())?;
                s.end()
            }
            Block::Table(table) => {
                let mut s = serializer.serialize_struct("Table", 2)?;
                s.serialize_field("columns", &table.columns)?;
                let rows: Vec<Row> = table.rows.iter().map(|r| Row(table, r)).collect();
                s.serialize_field("rows", &rows)?;
                s.end()
            }
        }
    }
}

impl Serialize for BenchReport {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("BenchReport", 1)?;
        s.serialize_field("blocks", &self.blocks)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_json_carry_the_same_table() {
        let mut report = BenchReport::default();
        report.text("# payledger bench\n");
        report.table(["figure", "payledger", "baseline", "ratio"]);
        report.row(["ingest events/s", "65544", "89112 (bare)", "0.74"]);
        assert_eq!(
            report.markdown(),
            "# payledger bench\n\n| figure | payledger | baseline | ratio |\n|---|---|---|---|\n| ingest events/s | 65544 | 89112 (bare) | 0.74 |\n"
        );
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            serde_json::json!({"blocks": [
                {"text": "# payledger bench"},
                {"columns": ["figure", "payledger", "baseline", "ratio"],
                 "rows": [{"figure": "ingest events/s", "payledger": 65544.0,
                           "baseline": {"value": 89112.0, "note": "bare"}, "ratio": 0.74}]},
            ]})
        );
    }
}
