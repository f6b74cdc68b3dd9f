"""No single row or object blocks a close: a close of a store holding every poison object and row
bills every good row, quarantines each bad row or object with its reason, and retries nothing."""
from __future__ import annotations

import io
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from closeutil import close, table
from creditutil import csv_bytes, write_store
from flows.store import open_store

PLAN = """\
plan: p
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {meter: calls, price: {model: standard, unit_price: "1.00"}}
"""
COLUMNS = ["event_id", "customer_id", "meter", "quantity", "timestamp"]
WHEN = "2026-10-05T00:00:00Z"


def row(event_id: str, quantity: str = "1", when: str = WHEN) -> list[str]:
    return [event_id, "c1", "calls", quantity, when]


def parquet_with(event_id: str, column: pa.Array) -> bytes:
    base = dict(zip(COLUMNS, ([v] for v in row(event_id)), strict=True))
    buffer = io.BytesIO()
    pq.write_table(pa.table({**{k: pa.array(v) for k, v in base.items()}, "model": column}), buffer)
    return buffer.getvalue()


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines)).encode()


def event(event_id: str, quantity: str = "1") -> str:
    return json.dumps({"event_id": event_id, "customer_id": "c1", "meter": "calls", "timestamp": WHEN}
                      )[:-1] + f', "quantity": {quantity}}}'


@pytest.fixture(scope="module")
def poisoned(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("poison")
    store, plans = write_store(root, {"p-v1": PLAN}, ["c1"], [("s1", "c1", "p", "2026-01-01", "")],
                               {"good": [row(f"g{i}") for i in range(5)]}, [])
    s = open_store(store)
    s.put_bytes("usage/huge.csv", csv_bytes(COLUMNS, [row("h1", "100000000000000000000"), row("h2", "9" * 29),
                                                      row("h3", "9" * 29), row("h4", "2")]))
    s.put_bytes("usage/lower.csv", csv_bytes(COLUMNS, [row("t1", "1", "2026-10-10t10:00:00z")]))
    s.put_bytes("usage/binary.parquet", parquet_with("b1", pa.array([b"\xff\xfe"], pa.binary())))
    s.put_bytes("usage/list.parquet", parquet_with("b2", pa.array([[b"\xff"]], pa.list_(pa.binary()))))
    s.put_bytes("usage/struct.parquet", parquet_with("b3", pa.array([{"x": b"\xff"}], pa.struct([("x", pa.binary())]))))
    s.put_bytes("usage/duration.parquet", parquet_with("b4", pa.array([5], pa.duration("s"))))
    s.put_bytes("usage/truncated.jsonl", jsonl(event("j1"), event("j2"), '{"event_id": "j3", "cust'))
    s.put_bytes("usage/infinite.jsonl", jsonl(event("k1"), event("k2", "1e400"), event("k3")))
    s.put_bytes("usage/extra.csv", csv_bytes(COLUMNS, [row("x1"), row("x2") + ["oops"], row("x3")]))
    return store, close(store, plans, "2026-10")


@pytest.mark.slow
def test_every_good_row_bills(poisoned):
    store, result = poisoned
    # read: 5 good + 4 huge + 1 lower-case + 4 objects + 3 truncated + 3 infinite + 3 extra = 23;
    # billed: 5 good + h4 + t1 + j1, j2 + k1, k3 + x1, x3 = 13 events of 1 call, h4 is 2 calls
    assert result["rows"] == {"read": 23, "billed": 13, "duplicates": 0, "quarantined": 10}
    lines = table(store, "2026-10", "invoice_lines.parquet").filter(pl.col("meter") == "calls")
    assert lines["amount_minor"].to_list() == [1400]


@pytest.mark.slow
def test_each_bad_row_and_object_is_quarantined_with_its_reason(poisoned):
    store, _ = poisoned
    q = table(store, "2026-10", "quarantine.parquet")
    assert sorted(q.select("source", "reason").rows()) == [
        ("usage/binary.parquet", "unreadable_object"),
        ("usage/duration.parquet", "unreadable_object"),
        ("usage/extra.csv#row=2", "malformed_line"),
        ("usage/huge.csv#row=1", "amount_out_of_range"),
        ("usage/huge.csv#row=2", "amount_out_of_range"),
        ("usage/huge.csv#row=3", "amount_out_of_range"),
        ("usage/infinite.jsonl#row=2", "malformed_line"),
        ("usage/list.parquet", "unreadable_object"),
        ("usage/struct.parquet", "unreadable_object"),
        ("usage/truncated.jsonl#row=3", "malformed_line")]
    assert q.filter(pl.col("reason") == "malformed_line")["detail"].to_list() == [
        "line 3: 6 fields where the header has 5, the first extra one at character 35",
        f"line 2: number 1e400 at character {event('k2', '1e400').index('1e400')} is not finite (send it as a string)",
        "line 3: Unterminated string starting at: character 19"]
