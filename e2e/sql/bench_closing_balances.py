"""DuckDB's side of the replay benchmark: the same dedup (first occurrence of an
identity by sequence wins) and daily closing balances per merchant, currency and day,
computed from the archived Parquet and written to Parquet, with a given thread count.

usage: bench_closing_balances.py STORE THREADS OUT.parquet
prints JSON: {"seconds": wall time of the query, "rows": rows written}"""

import json
import sys
import time

import duckdb

store, threads, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
con = duckdb.connect()
con.execute(f"SET threads = {threads}")
started = time.perf_counter()
con.execute(
    f"""
    COPY (
        WITH facts AS (
            SELECT seq, merchant_id, event_id, kind, amount_minor, currency,
                   CAST(epoch_us(event_time) // 86400000000 AS BIGINT) AS day
            FROM read_parquet('{store}/archive/events/*/*.parquet')
            WHERE record_type = 'fact'
        ),
        first_seen AS (
            SELECT * FROM facts
            QUALIFY row_number() OVER (PARTITION BY merchant_id, event_id ORDER BY seq) = 1
        ),
        daily AS (
            SELECT merchant_id, currency, day,
                   SUM(CASE WHEN kind IN ('PAYMENT_CAPTURED', 'CHARGEBACK_OPENED', 'CORRECTION')
                            THEN amount_minor ELSE -amount_minor END) AS delta
            FROM first_seen GROUP BY ALL
        )
        SELECT merchant_id, day, currency,
               SUM(delta) OVER (PARTITION BY merchant_id, currency ORDER BY day) AS closing_minor
        FROM daily
        ORDER BY merchant_id, day, currency
    ) TO '{out}' (FORMAT parquet)
    """
)
seconds = time.perf_counter() - started
rows = con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0]
print(json.dumps({"seconds": seconds, "rows": rows}))
