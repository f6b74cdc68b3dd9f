"""A night's settle step costs its new data: the event_id index is read as hashes, then checked
exactly in the objects whose hashes match; the period-to-date tables move by tonight's delta."""
from __future__ import annotations

import hashlib
import random
from datetime import date, datetime, timezone
from decimal import Decimal

import duckdb
import polars as pl

from flows.nightly import ID_COLUMNS, PARQUET, kept_copies
from transforms.engine.billed_index import id_hash_macro
from transforms.engine.period_to_date import (
    BY_DAY_COLUMNS,
    EVENT_COLUMNS,
    by_day_to_date,
    events_to_date,
    per_event_usage,
)
from transforms.queries import statements

SQL = statements("nightly.sql")
DAY1, DAY2 = date(2026, 10, 1), date(2026, 10, 2)


def id_hash(event_id: str) -> int:
    """The index's hash, as the spec says: the first 64 bits of the event_id's MD5."""
    return int(hashlib.md5(event_id.encode()).hexdigest()[:16], 16)


def connection() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    id_hash_macro(con)
    return con


def test_the_id_hash_is_the_first_64_bits_of_md5():
    con = connection()
    got = con.sql("SELECT id_hash('evt_1'), id_hash('e-\u00e9')").fetchall()[0]
    assert got == (id_hash("evt_1"), id_hash("e-\u00e9"))


def test_the_id_hash_is_md5s_first_64_bits_for_every_kind_of_event_id():
    """The macro reads the digest as a number, not as hex text: every byte of it must still land
    where the hex digits put it (high bytes set and clear, any length, any characters)."""
    rng = random.Random(17)
    alphabet = "az09-_.:/ \u00e9\u4e2d\U0001f600"
    ids = ["", "a", "evt_1", "x" * 1000] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
                                         for _ in range(5000)]
    con = connection()
    con.register("ids", pl.DataFrame({"event_id": ids}).to_arrow())
    got = con.sql("SELECT event_id, id_hash(event_id) FROM ids").fetchall()
    assert {e: h for e, h in got} == {e: id_hash(e) for e in ids}
    assert con.sql("SELECT id_hash(NULL::VARCHAR)").fetchall() == [(None,)]


def ids_file(path, rows: list[tuple[str, str, date, int]]):
    pl.DataFrame(rows, schema=ID_COLUMNS, orient="row").write_parquet(path, **PARQUET)
    return path


def test_a_matching_hash_is_checked_on_the_event_id_and_only_matching_objects_are_read(tmp_path):
    """Tonight bills e-1 and e-2. Object a holds a true copy of e-1; object b holds another id
    whose stored hash equals e-2's (a collision, forged here): only e-1's copy is kept. Object c
    shares no hash with tonight, so its event_ids are never read (its file has none to read)."""
    con = connection()
    con.register("tonight", pl.DataFrame({"event_id": ["e-1", "e-2"], "id_hash": [id_hash("e-1"), id_hash("e-2")]},
                                         schema={"event_id": pl.String, "id_hash": pl.UInt64}).to_arrow())
    con.register("gone", pl.DataFrame(schema={"event_id": pl.String}).to_arrow())
    files = {"a": ids_file(tmp_path / "a.parquet",
                           [("e-1", "a", DAY1, id_hash("e-1")), ("x", "a", DAY1, id_hash("x"))]),
             "b": ids_file(tmp_path / "b.parquet", [("other", "b", DAY1, id_hash("e-2"))]),
             "c": tmp_path / "c.parquet"}
    pl.DataFrame({"id_hash": [id_hash("e-3")], "source_key": ["c"]},
                 schema={"id_hash": pl.UInt64, "source_key": pl.String}).write_parquet(files["c"])
    kept_copies(con, SQL, files)
    assert con.sql("SELECT * FROM kept_ids").fetchall() == [("e-1", "a", DAY1)]


def by_day(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=BY_DAY_COLUMNS, orient="row")


def test_the_by_day_table_moves_only_the_groups_tonight_touches():
    """c1 api on day 1: 5 units (3 events), minus a rewritten event of 2 units, plus 4 units
    tonight on day 2; c2's only group on day 1 empties; c3 (no dimensions) is carried."""
    state = by_day([("c1", "api", "{}", DAY1, Decimal("5"), 3), ("c2", "api", "{}", DAY1, Decimal("1"), 1),
                    ("c3", "api", None, DAY1, Decimal("7"), 2)])
    moves = by_day([("c1", "api", "{}", DAY1, Decimal("-2"), -1), ("c2", "api", "{}", DAY1, Decimal("-1"), -1),
                    ("c1", "api", "{}", DAY2, Decimal("4"), 1), ("c3", "api", None, DAY2, Decimal("1"), 1)])
    assert by_day_to_date(state, moves).rows() == [
        ("c1", "api", "{}", DAY1, Decimal("3"), 2),       # 5 - 2 units, 3 - 1 events
        ("c3", "api", None, DAY1, Decimal("7"), 2),
        ("c1", "api", "{}", DAY2, Decimal("4"), 1),
        ("c3", "api", None, DAY2, Decimal("1"), 1),
    ]


def test_the_per_event_table_drops_what_left_and_adds_what_entered():
    at = datetime(2026, 10, 1, 12, tzinfo=timezone.utc)
    state = pl.DataFrame([("c1", "img", "{}", Decimal("1"), "e-1", at), ("c1", "img", "{}", Decimal("2"), "e-2", at)],
                         schema=EVENT_COLUMNS, orient="row")
    entering = pl.DataFrame([("c1", "img", "{}", Decimal("3"), "e-2", at),
                             ("c0", "img", "{}", Decimal("1"), "e-9", at)],
                            schema=EVENT_COLUMNS, orient="row")
    moved = events_to_date(state, pl.DataFrame({"event_id": ["e-2"]}), entering)
    assert moved.select("customer_id", "event_id", "quantity").rows() == [
        ("c1", "e-1", Decimal("1")), ("c1", "e-2", Decimal("3")), ("c0", "e-9", Decimal("1"))]


def test_with_nothing_leaving_the_per_event_table_only_gains_what_entered():
    """Most nights no event leaves: the month's rows are carried, tonight's slot in by order."""
    at = datetime(2026, 10, 1, 12, tzinfo=timezone.utc)
    state = pl.DataFrame([("c1", "img", "{}", Decimal("1"), "e-1", at), ("c2", "img", "{}", Decimal("2"), "e-2", at)],
                         schema=EVENT_COLUMNS, orient="row")
    entering = pl.DataFrame([("c1", "img", "{}", Decimal("3"), "e-3", at)], schema=EVENT_COLUMNS, orient="row")
    moved = events_to_date(state, pl.DataFrame(schema={"event_id": pl.String}), entering)
    assert moved.select("customer_id", "event_id").rows() == [("c1", "e-1"), ("c2", "e-2"), ("c1", "e-3")]


def test_a_late_event_slots_in_by_time_and_the_tables_stay_in_their_order():
    """An event of day 1 that arrives after day 2's: only the rows from its time on are sorted
    again, and the result is the table in full time order; the by-day table likewise, when a
    night moves an earlier day than the last."""
    at = [datetime(2026, 10, 1, h, tzinfo=timezone.utc) for h in (1, 5, 9)]
    at.append(datetime(2026, 10, 2, 3, tzinfo=timezone.utc))
    state = pl.DataFrame([("c2", "img", "{}", Decimal("1"), "e-1", at[0]),
                          ("c1", "img", "{}", Decimal("1"), "e-2", at[2]),
                          ("c1", "img", "{}", Decimal("1"), "e-4", at[3])], schema=EVENT_COLUMNS, orient="row")
    entering = pl.DataFrame([("c3", "img", "{}", Decimal("2"), "e-3", at[1])], schema=EVENT_COLUMNS, orient="row")
    moved = events_to_date(state, pl.DataFrame(schema={"event_id": pl.String}), entering)
    assert moved["event_id"].to_list() == ["e-1", "e-3", "e-2", "e-4"]
    days = by_day([("c2", "api", "{}", DAY1, Decimal("1"), 1), ("c1", "api", "{}", DAY2, Decimal("2"), 1),
                   ("c2", "api", "{}", DAY2, Decimal("3"), 1)])
    moves = by_day([("c3", "api", "{}", DAY1, Decimal("4"), 1), ("c1", "api", "{}", DAY1, Decimal("5"), 1)])
    assert [(r[0], r[3]) for r in by_day_to_date(days, moves).rows()] == [
        ("c1", DAY1), ("c2", DAY1), ("c3", DAY1), ("c1", DAY2), ("c2", DAY2)]


def test_per_event_usage_is_by_segment_and_meter_then_event_time_then_event_id():
    """From the per-event table in its time order: c1's subscription changes segment on day 2
    (s1 segment 1, then 2), c2 is s2 all month; two events at the same time rank by event_id,
    whatever order their customers or meters come in."""
    oct1, oct2, nov1 = (datetime(2026, m, d, tzinfo=timezone.utc) for m, d in ((10, 1), (10, 2), (11, 1)))
    segments = pl.DataFrame([("s1", 1, "c1", oct1, oct2), ("s1", 2, "c1", oct2, nov1), ("s2", 1, "c2", oct1, nov1)],
                            schema={"subscription_id": pl.String, "segment_no": pl.Int32, "customer_id": pl.String,
                                    "start_at": pl.Datetime("us", "UTC"), "end_at": pl.Datetime("us", "UTC")},
                            orient="row")
    at = [datetime(2026, 10, d, h, tzinfo=timezone.utc) for d, h in ((1, 3), (1, 9), (2, 4))]
    one = Decimal("1")
    events = pl.DataFrame([("c2", "img", "{}", one, "e-5", at[0]), ("c1", "up", "{}", one, "e-2", at[0]),
                           ("c1", "img", "{}", one, "e-9", at[1]), ("c2", "img", "{}", one, "e-1", at[1]),
                           ("c1", "img", "{}", one, "e-3", at[2]), ("c1", "img", "{}", one, "e-4", at[2])],
                          schema=EVENT_COLUMNS, orient="row").sort("event_at", "event_id", "customer_id", "meter")
    got = per_event_usage(events, segments)
    assert got.select("subscription_id", "segment_no", "meter", "event_id").rows() == [
        ("s1", 1, "img", "e-9"), ("s1", 1, "up", "e-2"), ("s1", 2, "img", "e-3"), ("s1", 2, "img", "e-4"),
        ("s2", 1, "img", "e-5"), ("s2", 1, "img", "e-1")]
