"""The columns DuckDB reads from the archive's Parquet, in file order, to check them
against the names the archive writer uses (payledger_storage::columns).

usage: archive_columns.py STORE
prints JSON: {"events": [names of archive/events/*/*.parquet], "dims": [names of archive/dims/*.parquet]}"""

import json
import sys

import duckdb

store = sys.argv[1]
con = duckdb.connect()


def names(glob):
    return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{glob}')").fetchall()]


print(json.dumps({
    "events": names(f"{store}/archive/events/*/*.parquet"),
    "dims": names(f"{store}/archive/dims/*.parquet"),
}))
