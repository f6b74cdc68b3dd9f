"""transforms.engine.lineage on tiny frames: which line bills an event, and what a duplicate and a
quarantined row become; the close's billed_events file, sorted by DuckDB, in the table's bytes."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl
import pytest

import flows.statement
from flows.outputs import PARQUET
from flows.statement import IN_MEMORY_ROWS, billed_events_table
from transforms.engine.checked_usage import CheckedUsage
from transforms.engine.lineage import (
    LINEAGE_COLUMNS,
    bucket_bounds,
    bucket_rows,
    bucket_shapes,
    customer_bucket,
    events_of,
    prepare_buckets,
    source_keys,
    statement_rows,
    write_lineage,
)

AT = datetime(2026, 10, 3, tzinfo=timezone.utc)


def _lines() -> pl.DataFrame:
    # one invoice: a fee, gpt-4o grouped by region (eu, us), then everything else on the meter
    return pl.DataFrame({
        "invoice_id": ["INV-1"] * 4, "line_no": [1, 2, 3, 4], "kind": ["fixed_fee", "usage", "usage", "overage"],
        "subscription_id": ["s1"] * 4, "segment_no": [None, 1, 1, 1],
        "meter": [None, "tokens", "tokens", "calls"],
        "filter": [None, '{"model": "gpt-4o"}', '{"model": "gpt-4o"}', None],
        "group": [None, '{"region": "eu"}', '{"region": "us"}', None],
        "description": ["Seat", "gpt-4o (eu)", "gpt-4o (us)", "Calls"],
        "quantity": ["1", "15", "2", "1"], "total_units": [None, "15", "2", "3"],
        "included_units": [None, None, None, "2"],
        "amount_minor": [1000, 30, 4, 5], "currency": ["USD"] * 4,
    }, schema_overrides={"segment_no": pl.Int32, "line_no": pl.Int32})


def _lineage() -> pl.LazyFrame:
    rows = [  # customer, event_id, meter, dims, quantity, outcome, row, duplicate of row
        ("c1", "e1", "tokens", '{"model":"gpt-4o","region":"eu"}', "10", "billed", 1, None),
        ("c1", "e2", "tokens", '{"model":"gpt-4o","region":"eu"}', "5", "billed", 2, None),
        ("c1", "e3", "tokens", '{"model":"gpt-4o","region":"us"}', "2", "billed", 3, None),
        ("c1", "e4", "calls", "{}", "3", "billed", 4, None),
        ("c1", "e1", "tokens", '{"model":"gpt-4o","region":"eu"}', "10", "duplicate", 5, 1),
    ]
    return pl.LazyFrame({
        "customer_id": [r[0] for r in rows], "event_at": [AT] * len(rows), "event_id": [r[1] for r in rows],
        "meter": [r[2] for r in rows], "dims": [r[3] for r in rows], "quantity": [Decimal(r[4]) for r in rows],
        "subscription_id": ["s1"] * len(rows), "segment_no": [1] * len(rows), "outcome": [r[5] for r in rows],
        "source_key": ["u.csv"] * len(rows), "source_row": [r[6] for r in rows],
        "duplicate_of_source_key": ["u.csv" if r[7] else None for r in rows],
        "duplicate_of_source_row": [r[7] for r in rows],
    }).cast(LINEAGE_COLUMNS)


QUARANTINE = pl.DataFrame({"source_key": ["u.csv"], "source_row": [6], "event_id": ["e9"], "customer_id": ["c1"],
                           "meter": ["tokens"], "quantity": ["-1"], "timestamp": ["2026-10-04T00:00:00Z"],
                           "dims": ["{}"], "reason": ["negative_quantity"], "detail": [None],
                           "source": ["u.csv#row=6"]},
                          schema_overrides={"detail": pl.String})
LEDGER = pl.DataFrame({"kind": ["consume"], "event_id": ["e4"], "grant_id": ["g1"]})


def _billed_events(tmp_path: Path, lineage: pl.LazyFrame | None = None) -> pl.DataFrame:
    """billed_events of the lineage rows (written to a file, as the shards write theirs)."""
    path = tmp_path / "lineage.parquet"
    (lineage if lineage is not None else _lineage()).sink_parquet(path)
    with duckdb.connect() as con:
        assert prepare_buckets(con, {0: [str(path)]}, _lines(), QUARANTINE, LEDGER, ()) == [0]
        rows, count = bucket_rows(con, 0, [str(path)])
        return events_of(rows.pl(), bucket_shapes(con, 0), source_keys(con))


def test_each_event_goes_to_the_line_of_its_filter_and_group(tmp_path):
    events = _billed_events(tmp_path)
    placed = {(r["event_id"], r["status"]): (r["line_no"], r["grant_id"]) for r in events.iter_rows(named=True)}
    assert placed == {("e1", "billed"): (2, None), ("e2", "billed"): (2, None), ("e3", "billed"): (3, None),
                      ("e4", "billed"): (4, "g1"), ("e1", "duplicate"): (None, None),
                      ("e9", "quarantined"): (None, None)}
    duplicate = events.filter(pl.col("status") == "duplicate").row(0, named=True)
    assert (duplicate["reason"], duplicate["duplicate_of"]) == ("duplicate_event_id", "u.csv#row=1")
    assert events.filter(pl.col("status") == "quarantined")["reason"].to_list() == ["negative_quantity"]


def test_statement_line_totals_take_off_credits_and_allowance(tmp_path):
    events = _billed_events(tmp_path).filter(pl.col("status") == "billed")
    totals = {r["line_no"]: r for r in statement_rows(events, _lines()).iter_rows(named=True)
              if r["row"] == "line_total"}
    # line 2: 10 + 5 = 15 units, nothing included, 15 billed
    assert (totals[2]["event_units"], totals[2]["credited_units"], totals[2]["billed_quantity"]) == ("15", "0", "15")
    # line 4: 3 units, 2 included: 1 billed
    assert (totals[4]["event_units"], totals[4]["included_units"], totals[4]["billed_quantity"]) == ("3", "2", "1")
    assert totals[1]["event_units"] is None and totals[1]["amount_minor"] == 1000


def test_a_published_table_has_the_same_bytes_whatever_its_chunks(tmp_path):
    # a sorted table's in-memory chunks follow the machine's thread count; its file must not
    rows = pl.DataFrame({"customer_id": [f"c{(i * 7919) % 1000:04d}" for i in range(300_000)],
                         "event_id": [f"e{i}" for i in range(300_000)]})
    chunked = pl.concat([rows.slice(at, 70_001) for at in range(0, rows.height, 70_001)], rechunk=False)
    assert chunked.n_chunks() > 1
    chunked.write_parquet(tmp_path / "chunked.parquet", **PARQUET)
    rows.write_parquet(tmp_path / "whole.parquet", **PARQUET)
    rows.lazy().sink_parquet(tmp_path / "streamed.parquet", **PARQUET)
    whole = (tmp_path / "whole.parquet").read_bytes()
    assert (tmp_path / "chunked.parquet").read_bytes() == whole
    assert (tmp_path / "streamed.parquet").read_bytes() == whole


def test_billed_events_streamed_from_duckdbs_sort_has_the_bytes_of_the_whole_table_written(tmp_path):
    # DuckDB sorts the rows, with their shapes' numbers, into a file of its own; the table's writer
    # streams that file, two batches here, each with its shapes' columns put back, into row groups
    # of the close's size: the bytes are those of the sorted table written whole
    n = 300_000
    lineage = _lineage().collect()
    many = pl.concat([lineage.sample(n, with_replacement=True, seed=7).with_columns(
        pl.format("c{}", pl.int_range(n) % 997).alias("customer_id"),
        (pl.col("event_at") + pl.duration(seconds=pl.int_range(n) % 86_400)).alias("event_at"),
        pl.format("e{}", pl.int_range(n)).alias("event_id"),
        pl.int_range(n, dtype=pl.Int64).alias("source_row"))]).lazy()
    (tmp_path / "shard").mkdir()
    path = tmp_path / "shard" / "lineage.parquet"
    many.sink_parquet(path)
    checked = CheckedUsage({}, QUARANTINE, pl.DataFrame(), pl.DataFrame(), pl.DataFrame(), [], lineage=(str(path),))
    with billed_events_table(checked, _lines(), QUARANTINE, LEDGER) as table:
        table.sink_parquet(tmp_path / "streamed.parquet", **PARQUET)
    assert list((tmp_path / "shard").iterdir()) == [path], "the sorted file is gone after the block"
    whole = _billed_events(tmp_path, many).sort("customer_id", "event_at", "event_id", "source_key", "source_row",
                                                nulls_last=True)
    assert whole.height == n + 1 and whole["line_no"].null_count() < n
    whole.write_parquet(tmp_path / "whole.parquet", **PARQUET)
    assert (tmp_path / "streamed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()


def test_customer_ranges_follow_duckdbs_order_of_text():
    # the buckets are sorted one after the other: their ranges must be in the order DuckDB sorts
    # customer ids in (byte by byte: capitals before small letters, accents after both)
    ids = pl.Series(["b", "Zed", "a", "é", "c9", "c10", "ß", "A"])
    bounds = bucket_bounds(ids, 3)
    assert len(bounds) == 2 and list(bounds) == sorted(bounds)
    frame = pl.DataFrame({"customer_id": ids.to_list() + [None]}).with_columns(customer_bucket(bounds).alias("bucket"))
    with duckdb.connect() as con:
        in_duckdb_order = [c for (c,) in con.execute("SELECT customer_id FROM frame ORDER BY customer_id NULLS LAST")
                           .fetchall()]
    buckets = dict(zip(frame["customer_id"], frame["bucket"], strict=True))
    assert [buckets[c] for c in in_duckdb_order] == sorted(buckets[c] for c in in_duckdb_order)
    assert buckets[None] == 2 and bucket_bounds(ids, 1) == ()
    assert bucket_bounds(ids, 20) == tuple(sorted(ids.to_list())[1:])  # more ranges than ids: one each


@pytest.mark.parametrize("in_memory_rows", [IN_MEMORY_ROWS, 0])
def test_billed_events_in_buckets_of_customers_has_the_bytes_of_one_sort(tmp_path, monkeypatch, in_memory_rows):
    # lineage files split by ranges of customers (as the shards write them), sorted a range at a
    # time: the same table as one sort of every row, with quarantined rows (one without a
    # customer, one of a customer without billed rows) and credit grants in their ranges; each
    # range from DuckDB's sort as a frame, or through a file (a range too large to hold)
    monkeypatch.setattr(flows.statement, "IN_MEMORY_ROWS", in_memory_rows)
    n = 50_000
    many = _lineage().collect().sample(n, with_replacement=True, seed=3).with_columns(
        pl.format("c{}", pl.int_range(n) % 211).alias("customer_id"),
        (pl.col("event_at") + pl.duration(seconds=pl.int_range(n) % 86_400)).alias("event_at"),
        pl.format("e{}", pl.int_range(n)).alias("event_id"),
        pl.int_range(n, dtype=pl.Int64).alias("source_row"))
    quarantine = pl.concat([QUARANTINE, QUARANTINE.with_columns(pl.lit(None, pl.String).alias("customer_id"),
                                                                pl.lit(7, pl.Int64).alias("source_row")),
                            QUARANTINE.with_columns(pl.lit("c0999").alias("customer_id"),
                                                    pl.lit(8, pl.Int64).alias("source_row"))])
    ledger = pl.DataFrame({"kind": ["consume"] * 3, "event_id": ["e4", "e17", "e17"], "grant_id": ["g1", "g2", "g1"],
                           "customer_id": ["c4", "c17", "c17"]})
    tables = {}
    for name, bounds in (("one", ()), ("split", bucket_bounds(many["customer_id"], 5))):
        folder = tmp_path / name
        folder.mkdir()
        with duckdb.connect() as con:
            con.register("many", many.to_arrow())
            files = write_lineage(con, con.sql("SELECT * FROM many"), folder / ("lineage" if bounds else "l.parquet"),
                                  bounds, "snappy")
        assert len(files) == (5 if bounds else 1)
        checked = CheckedUsage({}, quarantine, pl.DataFrame(), pl.DataFrame(), pl.DataFrame(), [], lineage=files,
                               lineage_bounds=bounds)
        with billed_events_table(checked, _lines(), quarantine, ledger) as table:
            table.sink_parquet(tmp_path / f"{name}.parquet", **PARQUET)
        tables[name] = (tmp_path / f"{name}.parquet").read_bytes()
    assert tables["split"] == tables["one"]
    written = pl.read_parquet(tmp_path / "one.parquet")
    assert written.height == n + 3 and written["customer_id"].is_sorted(nulls_last=True)
    assert written.filter(pl.col("event_id") == "e17")["grant_id"].to_list() == ["g1,g2"]
