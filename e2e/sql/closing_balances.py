"""Closing balances per merchant, day and currency, computed by DuckDB straight from
the archived Parquet: first occurrence of an identity by sequence wins, signed deltas
by kind, cumulative over days. Prints JSON rows [merchant_id, day, currency, closing]
with day as days since 1970-01-01."""

import json
import sys

import duckdb

store = sys.argv[1]
con = duckdb.connect()
rows = con.execute(
    f"""
    WITH facts AS (
        SELECT *, CAST(epoch_us(event_time) // 86400000000 AS BIGINT) AS day
        FROM read_parquet('{store}/archive/events/*/*.parquet')
        WHERE record_type = 'fact'
    ),
    ranked AS (
        SELECT *, row_number() OVER (PARTITION BY merchant_id, event_id ORDER BY seq) AS n
        FROM facts
    ),
    applied AS (
        SELECT merchant_id, currency, day,
               CASE WHEN kind IN ('PAYMENT_CAPTURED', 'CHARGEBACK_OPENED', 'CORRECTION')
                    THEN amount_minor ELSE -amount_minor END AS delta
        FROM ranked WHERE n = 1
    ),
    row_days AS (SELECT DISTINCT merchant_id, currency, day FROM facts)
    SELECT d.merchant_id, d.day, d.currency,
           CAST(COALESCE(SUM(a.delta), 0) AS VARCHAR) AS closing
    FROM row_days d
    LEFT JOIN applied a
      ON a.merchant_id = d.merchant_id AND a.currency = d.currency AND a.day <= d.day
    GROUP BY d.merchant_id, d.day, d.currency
    ORDER BY 1, 2, 3
    """
).fetchall()
print(json.dumps(rows))
