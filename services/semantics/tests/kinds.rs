//! The kind table (`KINDS`) against the places outside Rust that spell the kinds
//! out: the DuckDB SQL of the cross-engine test and benchmark (e2e/sql), and the
//! delta table of docs/semantics.md. A kind added to the table and not there fails
//! here, instead of silently summing with the wrong sign.

use std::collections::BTreeSet;
use std::path::Path;

use payledger_semantics::KINDS;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The quoted names of every `kind IN (...)` list in `text`.
fn positive_lists(text: &str) -> Vec<BTreeSet<String>> {
    text.match_indices("kind IN (")
        .map(|(at, m)| {
            let rest = &text[at + m.len()..];
            let list = &rest[..rest.find(')').expect("the list closes")];
            list.split(',')
                .map(|name| name.trim().trim_matches('\'').to_string())
                .collect()
        })
        .collect()
}

#[test]
fn the_duckdb_sql_adds_exactly_the_kinds_of_sign_plus_one() {
    let plus: BTreeSet<String> = KINDS
        .iter()
        .filter(|k| k.sign == 1)
        .map(|k| k.name.to_string())
        .collect();
    for file in [
        "e2e/sql/closing_balances.py",
        "e2e/sql/bench_closing_balances.py",
    ] {
        let lists = positive_lists(&repo_file(file));
        assert_eq!(lists.len(), 1, "{file}: one CASE over the kinds");
        // Every other kind is subtracted by the CASE's ELSE.
        assert_eq!(lists[0], plus, "{file}: the kinds that add their amount");
    }
}

#[test]
fn the_delta_table_of_the_docs_is_the_kind_table() {
    let docs = repo_file("docs/semantics.md");
    let documented: Vec<(String, String)> = docs
        .lines()
        .skip_while(|l| !l.starts_with("| kind | delta |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect();
    let tabled: Vec<String> = KINDS.iter().map(|k| k.name.to_string()).collect();
    assert_eq!(
        documented
            .iter()
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>(),
        tabled
    );
    for ((name, delta), info) in documented.iter().zip(KINDS) {
        let documented_sign = if delta.trim_start_matches('`').starts_with('−') {
            -1
        } else {
            1
        };
        assert_eq!(documented_sign, info.sign, "{name}: {delta}");
    }
}
