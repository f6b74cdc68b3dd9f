"""`billrun` with every DuckDB connection capped at a memory limit: an experiment, not a fix.

    python bench/close_capped.py --duckdb-memory-limit 12GB close --period 2026-10 --store ... --plans plans

billrun opens DuckDB with its default memory_limit (80% of RAM), which leaves no room for the
Python process around it, the Prefect server and anything else on the machine. This wrapper
answers "would the close finish, and how fast, if check-usage were told to spill earlier?"
without touching billrun's code: it wraps `duckdb.connect` before billrun imports it, then runs
billrun's own command line. bench/run.py uses it with --duckdb-memory-limit.
"""
from __future__ import annotations

import sys
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2 or args[0] != "--duckdb-memory-limit":
        sys.exit(__doc__)
    limit, rest = args[1], args[2:]
    connect = duckdb.connect

    def capped(database: str = ":memory:", read_only: bool = False, config: dict | None = None, **kwargs):
        config = dict(config or {})
        config.setdefault("memory_limit", limit)
        return connect(database, read_only=read_only, config=config, **kwargs)

    duckdb.connect = capped
    sys.path.insert(0, str(REPO))
    sys.argv = ["billrun", *rest]
    from flows.cli import main as billrun_main

    billrun_main()


if __name__ == "__main__":
    main()
