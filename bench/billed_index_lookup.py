"""What a lookup in the billed-event index costs: an index of N billed event_ids (one closed
period's file), looked up for M event_ids of which H were billed there.

    python bench/billed_index_lookup.py [N] [M] [H]      (defaults 2000000 100000 1000)
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import duckdb

from transforms.engine.billed_index import BilledIndex, id_hash_macro, look_up_billed, write_period_index


def main(n: int = 2_000_000, m: int = 100_000, hits: int = 1_000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        con = duckdb.connect()
        id_hash_macro(con)
        billed = Path(tmp) / "billed.parquet"
        con.execute(f"COPY (SELECT 'evt-' || i AS event_id, id_hash('evt-' || i) AS id_hash FROM range({n}) t(i)) "
                    f"TO '{billed}' (FORMAT parquet)")
        started, cpu = time.perf_counter(), time.process_time()
        index_file = Path(tmp) / "index.parquet"
        write_period_index([billed], "2026-10", index_file)
        written, written_cpu = time.perf_counter() - started, time.process_time() - cpu
        # M event_ids of the next period: H resends of indexed ones, the rest new
        con.execute(f"CREATE TABLE probed AS SELECT event_id, id_hash(event_id) AS id_hash FROM "
                    f"(SELECT 'evt-' || i AS event_id FROM range({hits}) t(i) UNION ALL "
                    f"SELECT 'new-' || i FROM range({m - hits}) t(i))")
        started, cpu = time.perf_counter(), time.process_time()
        found = look_up_billed(con, BilledIndex(((index_file, "close-2026-10-x"),), ("2026-10",)))
        looked, looked_cpu = time.perf_counter() - started, time.process_time() - cpu
        size = index_file.stat().st_size
        print(f"index of {n:,} ids: {size / 1e6:.1f} MB, written in {written:.2f}s ({written_cpu:.2f}s CPU); "
              f"{m:,} ids looked up, {found:,} found billed, in {looked:.3f}s ({looked_cpu:.2f}s CPU)")
        assert found == hits


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
