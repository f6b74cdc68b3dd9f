"""Bare DuckDB over a store's usage Parquet: read, deduplicate by event_id, aggregate per
customer x meter, rate with one graduated price in exact DECIMAL (see baseline.sql).

    python bench/baseline.py --store .bench/store-10m --period 2026-10

Prints one JSON object (rows read, unique events, customer x meter rows, total). bench/run.py runs
it in its own process so that its memory is measured alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transforms.layout import USAGE_PREFIX  # noqa: E402  (the store layout; nothing heavy)

SQL = Path(__file__).with_name("baseline.sql")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--period", required=True, help="YYYY-MM")
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    args = ap.parse_args(argv)

    year, month = (int(x) for x in args.period.split("-"))
    start = datetime(year, month, 1, tzinfo=timezone.utc)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=timezone.utc)
    files = str(args.store / USAGE_PREFIX / "**" / "*.parquet")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="billrun-bench-") as tmp:
        out = str(Path(tmp) / "rated.parquet")
        con = duckdb.connect(config={"temp_directory": str(Path(tmp) / "spill")})
        if args.threads:
            con.execute(f"SET threads = {int(args.threads)}")
        con.execute("SET TimeZone = 'UTC'")
        con.execute(SQL.read_text(encoding="utf-8"),
                    {"files": files, "period_start": start, "period_end": end, "out": out})
        query_s = time.perf_counter() - started
        read, = con.execute("SELECT count(*) FROM read_parquet($files, hive_partitioning = false)",
                            {"files": files}).fetchone()
        rows, unique, total = con.execute(
            "SELECT count(*), sum(events), sum(amount_minor) FROM read_parquet($out)", {"out": out}).fetchone()
        con.close()
    print(json.dumps({"rows_read": read, "unique_events": int(unique or 0), "customer_meter_rows": rows,
                      "total_minor": int(total or 0), "query_seconds": round(query_s, 3),
                      "threads": args.threads or "all"}))


if __name__ == "__main__":
    main()
