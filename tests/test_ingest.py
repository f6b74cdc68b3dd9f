"""Usage objects as read from disk: one bad line is quarantined alone, one bad object is set aside
whole, and nothing an object holds (a type, a byte, a reader's panic) stops the others."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flows.ingest as ingest
from flows.ingest import normalized_object

HEADER = "event_id,customer_id,meter,quantity,timestamp"
WHEN = "2026-10-05T12:00:00Z"


def json_line(i: int, quantity: str = "1") -> str:
    return json.dumps({"event_id": f"e{i}", "customer_id": "c1", "meter": "calls", "quantity": 1,
                       "timestamp": WHEN}).replace('"quantity": 1', f'"quantity": {quantity}')


def read(tmp_path: Path, name: str, data: bytes) -> tuple[pl.DataFrame | None, str | None]:
    path = tmp_path / name
    path.write_bytes(data)
    return normalized_object(path, f"usage/{name}")


def outcome(frame: pl.DataFrame) -> list[tuple]:
    return frame.select("source_row", "event_id", "reason", "detail").rows()


# One bad line, quarantined alone with its line number -------------------------------------------

def test_a_truncated_last_jsonl_line_is_quarantined_alone(tmp_path):
    cut = '{"event_id": "e4", "cust'
    data = "\n".join(json_line(i) for i in range(1, 4)) + "\n" + cut
    frame, why = read(tmp_path, "a.jsonl", data.encode())
    assert why is None
    at = cut.index('"cust')
    assert outcome(frame) == [(1, "e1", None, None), (2, "e2", None, None), (3, "e3", None, None),
                              (4, None, "malformed_line", f"line 4: Unterminated string starting at: character {at}")]


def test_a_json_number_that_is_not_finite_is_quarantined_alone(tmp_path):
    data = "\n".join([json_line(1), json_line(2, "1e400"), json_line(3)]) + "\n"
    frame, why = read(tmp_path, "a.jsonl", data.encode())
    assert why is None
    at = json_line(2, "1e400").index("1e400")
    assert outcome(frame) == [
        (1, "e1", None, None),
        (2, None, "malformed_line", f"line 2: number 1e400 at character {at} is not finite (send it as a string)"),
        (3, "e3", None, None)]


def test_a_json_line_that_is_not_an_object_is_quarantined_alone_and_blank_lines_are_no_rows(tmp_path):
    data = "\n".join([json_line(1), "", "[1, 2]", json_line(3)]) + "\n"
    frame, why = read(tmp_path, "a.jsonl", data.encode())
    assert why is None
    assert outcome(frame) == [(1, "e1", None, None),
                              (2, None, "malformed_line", "line 3: a JSON list where an object was expected"),
                              (3, "e3", None, None)]


def test_one_extra_csv_field_is_quarantined_alone_with_the_file_line(tmp_path):
    data = (f"{HEADER}\ne1,c1,calls,1,{WHEN}\ne2,c1,calls,1,{WHEN},oops\ne3,c1,calls,1,{WHEN}\n").encode()
    frame, why = read(tmp_path, "a.csv", data)
    assert why is None
    at = len(f"e2,c1,calls,1,{WHEN},")
    assert outcome(frame) == [
        (1, "e1", None, None),
        (2, None, "malformed_line", f"line 3: 6 fields where the header has 5, the first extra one at character {at}"),
        (3, "e3", None, None)]


def test_a_csv_line_that_is_not_utf8_is_quarantined_alone(tmp_path):
    data = f"{HEADER}\ne1,c1,calls,1,{WHEN}\ne2,c1,calls,1,".encode() + b"\xff\n" + f"e3,c1,calls,2,{WHEN}\n".encode()
    frame, why = read(tmp_path, "a.csv", data)
    assert why is None
    assert [r[:3] for r in outcome(frame)] == [(1, "e1", None), (2, None, "malformed_line"), (3, "e3", None)]
    assert frame["quantity"].to_list()[2] == 2


def test_a_clean_object_takes_the_fast_path_and_numbers_rows_the_same_way(tmp_path, monkeypatch):
    def no_fallback(*args):
        raise AssertionError("a clean object is parsed whole, once")

    monkeypatch.setattr(ingest, "_read_around_bad_lines", no_fallback)
    frame, why = read(tmp_path, "a.jsonl", ("\n".join(json_line(i) for i in range(1, 4)) + "\n").encode())
    assert why is None and frame["source_row"].to_list() == [1, 2, 3]


def test_an_object_of_junk_is_set_aside_whole_within_the_parse_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "PARSE_BUDGET", 50)
    frame, why = read(tmp_path, "junk.jsonl", b"\n".join(b"junk %d" % i for i in range(1000)))
    assert frame is None and why


# One bad object, set aside whole ------------------------------------------------------------------

BASE = {"event_id": ["e1"], "customer_id": ["c1"], "meter": ["calls"], "quantity": ["1"], "timestamp": [WHEN]}

POISON_COLUMNS = [
    pytest.param(pa.array([b"\xff\xfe"], pa.binary()), "binary values that are not UTF-8 text", id="binary, not UTF-8"),
    pytest.param(pa.array([[b"\xff"]], pa.list_(pa.binary())), "is not supported", id="list<binary> (a Rust panic)"),
    pytest.param(pa.array([{"x": b"\xff"}], pa.struct([("x", pa.binary())])), "is not supported",
                 id="struct<binary> (a Rust panic)"),
    pytest.param(pa.array([5], pa.duration("s")), "is not supported", id="duration"),
]


@pytest.mark.parametrize("column, why", POISON_COLUMNS)
def test_an_unsupported_parquet_column_sets_the_object_aside_with_its_reason(tmp_path, column, why):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({**{k: pa.array(v) for k, v in BASE.items()}, "model": column}), path)
    frame, reason = normalized_object(path, "usage/a.parquet")
    assert frame is None
    assert "'model'" in reason and why in reason


def test_binary_utf8_text_is_a_dimension(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({**{k: pa.array(v) for k, v in BASE.items()}, "model": pa.array([b"gpt-4o"])}), path)
    frame, why = normalized_object(path, "usage/a.parquet")
    assert why is None and frame["dims"].to_list() == ['{"model":"gpt-4o"}']


def test_a_reader_that_panics_sets_the_object_aside(tmp_path, monkeypatch):
    def panics(path, key):
        raise pl.exceptions.PanicException("not yet implemented: Writing BinaryView to JSON")

    monkeypatch.setattr(ingest, "read_usage_object", panics)
    frame, why = read(tmp_path, "a.jsonl", json_line(1).encode())
    assert frame is None and why == "not yet implemented: Writing BinaryView to JSON"


def test_a_corrupt_parquet_object_is_set_aside(tmp_path):
    frame, why = read(tmp_path, "a.parquet", b"PAR1 not really parquet")
    assert frame is None and why


def test_a_large_object_that_fails_whole_is_set_aside_unsearched(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "LINE_SEARCH_MAX_BYTES", 100)
    data = "\n".join([json_line(1), json_line(2, "1e400"), json_line(3)]) + "\n"
    frame, why = read(tmp_path, "a.jsonl", data.encode())
    assert frame is None and "InvalidNumber" in why


def test_parts_read_apart_are_typed_as_one_read_would_type_them(tmp_path, monkeypatch):
    """Parts inferred apart (an integer quantity in one, a decimal in another, a dimension only
    in the last) come together as one parse of the good lines would read them."""
    monkeypatch.setattr(ingest, "FANOUT", 2)
    lines = [json_line(1), json_line(2, "1e400"), json_line(3, "2.5"),
             json_line(4).replace('"meter"', '"region": "eu", "meter"')]
    frame, why = read(tmp_path, "a.jsonl", ("\n".join(lines) + "\n").encode())
    assert why is None
    assert frame.select("source_row", "quantity_raw", "dims", "reason").rows() == [
        (1, "1.0", "{}", None), (2, None, None, "malformed_line"), (3, "2.5", "{}", None),
        (4, "1.0", '{"region":"eu"}', None)]
