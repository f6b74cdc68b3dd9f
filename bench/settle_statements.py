"""Where check-usage spends its time and memory, statement by statement.

    python bench/settle_statements.py --store .bench/store-10m --period 2026-10 [--duckdb-memory-limit 8GB]

Runs billrun's own normalize and settle functions (transforms.inputs.usage.normalized_usage,
transforms.engine.checked_usage.checked_usage) outside Prefect, on a DuckDB connection wrapped so that each
named statement of transforms/sql/checked_usage.sql is timed, with the process's peak RSS after
it and DuckDB's own memory use. Nothing of billrun is changed; the normalized files go to a
temporary folder that is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flows.ingest import normalized_object, read_table  # noqa: E402
from transforms.engine.checked_usage import SQL_FILE, checked_usage  # noqa: E402
from transforms.inputs.plans import load_catalog  # noqa: E402
from transforms.inputs.reference import checked_customers, checked_subscriptions, segments_frame, segments_in  # noqa: E402
from transforms.layout import CUSTOMERS_KEYS, SUBSCRIPTIONS_KEYS, USAGE_PREFIX  # noqa: E402
from transforms.periods import Period  # noqa: E402
from transforms.queries import statements  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timed:
    """A DuckDB connection that times each named statement (execute + fetch, or a relation's
    materialization) and records the peak RSS and DuckDB's memory after it."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con
        self._names = {" ".join(sql.split()): name for name, sql in statements(SQL_FILE).items()}
        self.rows: list[dict] = []

    def _name(self, sql: str) -> str:
        return self._names.get(" ".join(sql.split()), "(other: " + " ".join(sql.split())[:50] + ")")

    def _record(self, name: str, seconds: float) -> None:
        duck, spill = self._con.sql("SELECT sum(memory_usage_bytes), sum(temporary_storage_bytes) "
                                    "FROM duckdb_memory()").fetchall()[0]
        self.rows.append({"statement": name, "s": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb()),
                          "duckdb_memory_mb": round((duck or 0) / 2**20), "spilled_mb": round((spill or 0) / 2**20)})

    def execute(self, sql: str, params=None):
        started = time.perf_counter()
        result = self._con.execute(sql, params) if params is not None else self._con.execute(sql)
        rows = result.fetchall()
        self._record(self._name(sql), time.perf_counter() - started)
        return _Fetched(rows)

    def sql(self, sql: str, params=None):
        return _Relation(self, self._name(sql), self._con.sql(sql, params=params))

    def __getattr__(self, item):
        return getattr(self._con, item)


class _Fetched:
    def __init__(self, rows):
        self._rows = rows

    def fetchall(self):
        return self._rows


class _Relation:
    def __init__(self, timed: Timed, name: str, rel):
        self._timed, self._name, self._rel = timed, name, rel

    def _timed_call(self, method: str):
        started = time.perf_counter()
        out = getattr(self._rel, method)()
        self._timed._record(self._name, time.perf_counter() - started)
        return out

    def pl(self):
        return self._timed_call("pl")

    def fetchall(self):
        return self._timed_call("fetchall")

    def __getattr__(self, item):
        return getattr(self._rel, item)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--period", required=True)
    ap.add_argument("--plans", type=Path, default=REPO / "plans")
    ap.add_argument("--duckdb-memory-limit", help="e.g. 8GB (default: DuckDB's, 80%% of RAM)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    period = Period.parse(args.period)
    catalog = load_catalog(str(args.plans))
    customers_key, subscriptions_key = CUSTOMERS_KEYS[0], SUBSCRIPTIONS_KEYS[0]  # the .csv that generate.py writes
    customers = checked_customers(read_table(args.store / customers_key, customers_key), customers_key)
    subs = checked_subscriptions(read_table(args.store / subscriptions_key, subscriptions_key), subscriptions_key,
                                 customers, catalog)
    segments = segments_in(period, subs, catalog)
    usage = sorted((args.store / USAGE_PREFIX).rglob("*.parquet"))
    report = {"store": str(args.store), "duckdb_memory_limit": args.duckdb_memory_limit}
    with tempfile.TemporaryDirectory(prefix="billrun-bench-settle-") as tmp:
        started = time.perf_counter()
        paths = []
        for i, path in enumerate(usage):
            key = path.relative_to(args.store).as_posix()
            out = Path(tmp) / f"{i:04d}.parquet"
            normalized_object(path, key)[0].write_parquet(out, compression="zstd", statistics=True)
            paths.append(out)
        report["normalize_s"] = round(time.perf_counter() - started, 2)
        report["normalized_mb"] = round(sum(p.stat().st_size for p in paths) / 2**20)
        report["rss_after_normalize_mb"] = round(peak_rss_mb())
        config = {"temp_directory": str(Path(tmp) / "spill")}
        if args.duckdb_memory_limit:
            config["memory_limit"] = args.duckdb_memory_limit
        con = Timed(duckdb.connect(config=config))
        started = time.perf_counter()
        checked = checked_usage(con, paths, customers, subs, segments_frame(segments), catalog, period,
                                Path(tmp) / "checked")
        report["settle_s"] = round(time.perf_counter() - started, 2)
        report["counts"] = checked.counts
        report["temp_tables"] = [{"table": t, "rows": n, "columns": c} for t, n, c in con._con.sql(
            "SELECT table_name, estimated_size, column_count FROM duckdb_tables() WHERE temporary "
            "ORDER BY table_name").fetchall()]
        report["statements"] = con.rows
        report["peak_rss_mb"] = round(peak_rss_mb())
        con._con.close()
    print(f"normalize {report['normalize_s']}s ({report['normalized_mb']} MB of normalized Parquet), "
          f"settle {report['settle_s']}s, peak RSS {report['peak_rss_mb']} MB")
    print(f"{'statement':28s} {'s':>8s} {'peak RSS MB':>12s} {'DuckDB MB':>10s} {'spilled MB':>10s}")
    for row in report["statements"]:
        print(f"{row['statement'][:28]:28s} {row['s']:8.2f} {row['peak_rss_mb']:12,} {row['duckdb_memory_mb']:10,} "
              f"{row['spilled_mb']:10,}")
    for t in report["temp_tables"]:
        print(f"  temp table {t['table']}: {t['rows']:,} rows x {t['columns']} columns")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
