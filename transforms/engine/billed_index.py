"""The billed-event index: the exact event_ids the finalized documents of each closed period bill.

A close records every event_id it billed; a backfill records, per period it corrects, the events
its documents start or stop billing (+1, -1). Every later close, nightly and backfill looks the
index up before billing an event, so an event billed in one closed period is never billed in
another, whether or not the usage objects that carried it still exist, in whatever order periods
are closed. Files are Parquet of `INDEX_COLUMNS`, sorted by `id_hash` (a 64-bit hash of the
event_id: the first 64 bits of its MD5); lookups read the hash column only and compare event_ids
exactly for the hashes that match (transforms/sql/billed_index.sql). Where the files live and
when they count is the flows' business (flows/billed_index.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from transforms.queries import statements

SQL_FILE = "billed_index.sql"
INDEX_COLUMNS = {"period": pl.String, "event_id": pl.String, "id_hash": pl.UInt64, "change": pl.Int8}
INDEX_ROW_GROUP = 65536
"""Small row groups: a lookup by hash reads only the groups whose hash range holds one."""


@dataclass(frozen=True)
class BilledIndex:
    """The index files that count for one usage check, as local files.

    `files` maps each file to the run that wrote it; only rows of `periods` (the decided periods:
    closed, with an index) count. A backfill leaves out the periods it re-rates itself."""

    files: tuple[tuple[Path, str], ...] = ()
    periods: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.files and self.periods)


NO_INDEX = BilledIndex()
BILLED_ELSEWHERE_SCHEMA = {"event_id": pl.String, "period": pl.String, "run_id": pl.String}


def id_hash_macro(con: duckdb.DuckDBPyConnection) -> None:
    """`id_hash(event_id)` on `con` (billed_index.sql), with the macro it is written with."""
    sql = statements(SQL_FILE)
    con.execute(sql["byte_reversed_macro"]).fetchall()
    con.execute(sql["id_hash_macro"]).fetchall()


def look_up_billed(con: duckdb.DuckDBPyConnection, index: BilledIndex) -> int:
    """`billed_elsewhere` (event_id, period, run_id): the event_ids of `probed` (event_id, id_hash)
    that the counted periods' documents bill. Returns how many."""
    sql = statements(SQL_FILE)
    files = [str(path) for path, _ in index.files]
    hits = [h for (h,) in con.execute(sql["index_hits"], {"files": files}).fetchall()] if index else []
    if not hits:
        con.register("billed_elsewhere", pl.DataFrame(schema=BILLED_ELSEWHERE_SCHEMA).to_arrow())
        return 0
    con.register("index_runs", pl.DataFrame({"file": files, "run_id": [run for _, run in index.files]},
                                            schema={"file": pl.String, "run_id": pl.String}).to_arrow())
    con.execute(sql["billed_elsewhere"], {"files": files, "hits": hits, "periods": list(index.periods)}).fetchall()
    return con.execute("SELECT count(*) FROM billed_elsewhere").fetchone()[0]


def write_period_index(billed: list[Path], period: str, out: Path) -> int:
    """One period's index from the billed ids (event_id, id_hash) of its checked usage's parts,
    written to `out`; the same events give the same bytes, however they were split. Returns the
    number of events."""
    con = _capped(out)
    try:
        if billed:
            con.read_parquet([str(p) for p in billed]).create_view("billed")
        else:
            con.register("billed", pl.DataFrame(schema={"event_id": pl.String, "id_hash": pl.UInt64}).to_arrow())
        return _write(con, statements(SQL_FILE)["index_of_billed"], {"period": period}, out)
    finally:
        con.close()


def write_period_changes(index_files: list[Path], rerated: list[Path], period: str, out: Path) -> int:
    """A correction's index of one period: what its documents bill now (`rerated`: billed ids of
    the re-rating) against what the index says they billed before. Returns the number of changes."""
    sql = statements(SQL_FILE)
    con = _capped(out)
    try:
        empty = pl.DataFrame(schema={"event_id": pl.String, "id_hash": pl.UInt64}).to_arrow()
        if index_files:
            con.sql(sql["effective_in_period"], params={"files": [str(p) for p in index_files],
                                                        "period": period}).create_view("before")
        else:
            con.register("before", empty)
        if rerated:
            con.read_parquet([str(p) for p in rerated]).create_view("after")
        else:
            con.register("after", empty)
        return _write(con, sql["index_of_changes"], {"period": period}, out)
    finally:
        con.close()


INDEX_MEMORY = "512MB"
"""DuckDB's cap while an index file is sorted and written: a period's billed ids (9.9M at 10M
events) sorted in memory took 1 GB beside the wallet replay and rating; past the cap the sort
and its table spill to disk next to the file."""


def _capped(out: Path) -> duckdb.DuckDBPyConnection:
    out.parent.mkdir(parents=True, exist_ok=True)
    spill = out.parent / f"{out.name}.spill"
    return duckdb.connect(config={"memory_limit": INDEX_MEMORY, "temp_directory": str(spill)})


def _write(con: duckdb.DuckDBPyConnection, query: str, params: dict, out: Path) -> int:
    """Streamed by DuckDB (spilling its sort past INDEX_MEMORY), never held whole in memory."""
    con.sql(query, params=params).to_table("index_rows")  # sorted on every core, values bound
    con.execute("SET threads = 1").fetchall()  # one writer: row groups cut the same way every time
    con.table("index_rows").write_parquet(str(out), compression="zstd", row_group_size=INDEX_ROW_GROUP)
    return con.execute("SELECT count(*) FROM read_parquet($out)", {"out": str(out)}).fetchone()[0]
