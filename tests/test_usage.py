"""Usage normalization: one raw object in, one row per input row out, with the row's own reason.

Tiny frames, one rule each. Quantities and timestamps arrive as text, as numbers or as typed
Parquet columns; whatever the shape, the normalized row must say the same thing.
"""
from __future__ import annotations

import json
from datetime import date, datetime, timezone
from decimal import Decimal as D

import duckdb
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import transforms.inputs.usage as usage_module
from transforms.inputs.usage import NORMALIZED_COLUMNS, ROW_REASONS, normalized_usage

UTC = timezone.utc
GOOD = {"event_id": "e1", "customer_id": "c1", "meter": "calls", "quantity": "5",
        "timestamp": "2026-10-05T12:00:00Z"}


def frame(*rows: dict, **columns) -> pl.DataFrame:
    """Rows as dicts of text (missing keys are nulls), or whole typed columns as keyword arguments."""
    if columns:
        return pl.DataFrame(columns)
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pl.DataFrame({n: [r.get(n) for r in rows] for n in names}, schema={n: pl.String for n in names})


def one(raw: pl.DataFrame, source_key: str = "usage/part-0.jsonl") -> dict:
    out = normalized_usage(raw, source_key)
    assert out.height == 1
    return out.row(0, named=True)


def canonical(dims: dict) -> str:
    return json.dumps(dims, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# Reason codes ---------------------------------------------------------------------------------

MISSING = [pytest.param(field, value, id=f"{field} {label} -> missing_field")
           for field in ("event_id", "customer_id", "meter", "quantity", "timestamp")
           for value, label in ((None, "null"), ("", "empty"), ("   ", "blank"))]


@pytest.mark.parametrize("field, value", MISSING)
def test_a_missing_core_field_is_missing_field(field, value):
    assert one(frame({**GOOD, field: value}))["reason"] == "missing_field"


@pytest.mark.parametrize("field", ["event_id", "customer_id", "meter", "quantity", "timestamp"])
def test_a_missing_core_column_is_missing_field(field):
    raw = frame(GOOD).drop(field)
    assert one(raw)["reason"] == "missing_field"


QUANTITIES = [
    pytest.param("abc", "bad_quantity", None, id="'abc' -> bad_quantity"),
    pytest.param("NaN", "bad_quantity", None, id="'NaN' -> bad_quantity"),
    pytest.param("inf", "bad_quantity", None, id="'inf' -> bad_quantity"),
    pytest.param("1e400", "bad_quantity", None, id="'1e400' overflows DECIMAL(38,9) -> bad_quantity"),
    pytest.param("1,5", "bad_quantity", None, id="'1,5' (decimal comma) -> bad_quantity"),
    pytest.param("1.0123456789", "bad_quantity", None, id="10 decimals would round at 9 -> bad_quantity"),
    pytest.param("0.0000000001", "bad_quantity", None, id="1e-10 written out would round to 0 -> bad_quantity"),
    pytest.param("-1", "negative_quantity", D("-1"), id="'-1' -> negative_quantity"),
    pytest.param("-0.000000001", "negative_quantity", D("-0.000000001"), id="-1e-9 -> negative_quantity"),
    pytest.param("1.123456789", None, D("1.123456789"), id="9 decimals = 1.123456789 exactly"),
    pytest.param("1.1234567890", None, D("1.123456789"), id="10 decimals, last one 0 = exact, kept"),
    pytest.param("0", None, D("0"), id="0 is a quantity"),
    pytest.param("-0", None, D("0"), id="-0 = 0, not negative"),
    pytest.param(" 7 ", None, D("7"), id="' 7 ' stripped = 7"),
    pytest.param("1e3", None, D("1000"), id="1e3 = 1000"),
    pytest.param("0.1", None, D("0.1"), id="'0.1' = 0.1 exactly (no binary float on the way)"),
    pytest.param("999999999999999999.999999999", None, D("999999999999999999.999999999"),
                 id="just below 10^18 is a quantity"),
    pytest.param("1000000000000000000", "amount_out_of_range", D("1000000000000000000"),
                 id="10^18 -> amount_out_of_range (10^11 of them would not sum in DECIMAL(38,9))"),
    pytest.param("99999999999999999999", "amount_out_of_range", D("99999999999999999999"),
                 id="20 integer digits kept exactly -> amount_out_of_range"),
]


@pytest.mark.parametrize("text, reason, quantity", QUANTITIES)
def test_quantity_text(text, reason, quantity):
    row = one(frame({**GOOD, "quantity": text}))
    assert row["reason"] == reason
    assert row["quantity_raw"] == text.strip()
    if reason is None:
        assert row["quantity"] == quantity
    elif reason in ("negative_quantity", "amount_out_of_range"):
        assert row["quantity"] == quantity


@pytest.mark.parametrize("text", ["123456789012345678901", "12345678901234567890123456789"],
                         ids=["21 integer digits", "29 integer digits (DECIMAL(38,9)'s limit)"])
def test_a_huge_but_exact_quantity_is_kept_and_quarantined_not_a_crash(text):
    row = one(frame({**GOOD, "quantity": text}))
    assert row["reason"] == "amount_out_of_range"
    assert row["quantity"] == D(text)


@pytest.mark.parametrize("text", ["1.0000000000000000001", "0.0000000000000000000001"],
                         ids=["1 + 1e-19 -> would round to 1", "1e-22 written out -> would round to 0"])
def test_more_than_eighteen_decimals_are_refused_not_rounded(text):
    assert one(frame({**GOOD, "quantity": text}))["reason"] == "bad_quantity"


TIMESTAMPS = [
    pytest.param("2026-10-05T12:00:00Z", datetime(2026, 10, 5, 12, tzinfo=UTC), id="Z = UTC"),
    pytest.param("2026-10-05T12:00:00+02:00", datetime(2026, 10, 5, 10, tzinfo=UTC), id="+02:00 -> 10:00Z"),
    pytest.param("2026-10-05T12:00:00-05:00", datetime(2026, 10, 5, 17, tzinfo=UTC), id="-05:00 -> 17:00Z"),
    pytest.param("2026-11-01T00:30:00+01:00", datetime(2026, 10, 31, 23, 30, tzinfo=UTC),
                 id="Nov 1 00:30+01:00 = Oct 31 23:30Z (crosses the month)"),
    pytest.param("2026-10-05 12:00:00", datetime(2026, 10, 5, 12, tzinfo=UTC), id="space separator, no offset = UTC"),
    pytest.param("2026-10-05T12:00:00", datetime(2026, 10, 5, 12, tzinfo=UTC), id="no offset = UTC"),
    pytest.param("2026-10-05T12:00:00.123Z", datetime(2026, 10, 5, 12, 0, 0, 123000, tzinfo=UTC),
                 id="milliseconds kept"),
    pytest.param("2026-10-05", datetime(2026, 10, 5, tzinfo=UTC), id="a date = its UTC midnight"),
    # ISO 8601 and RFC 3339 let the separator and the UTC designator be lower case
    pytest.param("2026-10-10t10:00:00z", datetime(2026, 10, 10, 10, tzinfo=UTC), id="lower-case t and z = UTC"),
    pytest.param("2026-10-10t10:00:00+02:00", datetime(2026, 10, 10, 8, tzinfo=UTC), id="lower-case t, offset"),
]


@pytest.mark.parametrize("text, instant", TIMESTAMPS)
def test_iso_timestamp_text(text, instant):
    row = one(frame({**GOOD, "timestamp": text}))
    assert row["reason"] is None
    assert row["event_at"] == instant
    assert row["timestamp_raw"] == text


@pytest.mark.parametrize("text", ["nope", "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "1790000000",
                                  "05/10/2026 12:00"],
                         ids=["word", "month 13", "Feb 30", "epoch seconds as text", "US date format"])
def test_an_unparseable_timestamp_is_bad_timestamp(text):
    row = one(frame({**GOOD, "timestamp": text}))
    assert (row["reason"], row["event_at"], row["timestamp_raw"]) == ("bad_timestamp", None, text)


PRIORITY = [
    pytest.param({"event_id": None, "timestamp": "nope"}, "missing_field",
                 id="missing + bad_timestamp -> missing_field"),
    pytest.param({"meter": "", "quantity": "-1"}, "missing_field", id="missing + negative -> missing_field"),
    pytest.param({"timestamp": None, "quantity": "abc"}, "missing_field",
                 id="missing timestamp + bad_quantity -> missing_field"),
    pytest.param({"timestamp": "nope", "quantity": "abc"}, "bad_timestamp",
                 id="bad_timestamp + bad_quantity -> bad_timestamp"),
    pytest.param({"timestamp": "nope", "quantity": "-1"}, "bad_timestamp",
                 id="bad_timestamp + negative -> bad_timestamp"),
    pytest.param({"quantity": "-1.0000000001"}, "bad_quantity", id="negative with 10 decimals -> bad_quantity"),
]


@pytest.mark.parametrize("broken, reason", PRIORITY)
def test_a_row_breaking_several_rules_gets_the_most_telling(broken, reason):
    assert one(frame({**GOOD, **broken}))["reason"] == reason


def test_reason_codes_are_ranked_as_documented():
    assert ROW_REASONS == ("missing_field", "bad_timestamp", "bad_quantity", "negative_quantity", "amount_out_of_range")


def test_a_clean_row_has_no_reason_and_keeps_its_text():
    row = one(frame(GOOD), "usage/date=2026-10-05/part-0.jsonl")
    assert row == {
        "source_key": "usage/date=2026-10-05/part-0.jsonl", "source_row": 1, "event_id": "e1",
        "customer_id": "c1", "meter": "calls", "quantity_raw": "5", "timestamp_raw": "2026-10-05T12:00:00Z",
        "dims": "{}", "quantity": D("5"), "event_at": datetime(2026, 10, 5, 12, tzinfo=UTC), "reason": None,
        "detail": None}


def test_core_fields_are_stripped_of_spaces():
    row = one(frame({**GOOD, "event_id": "  e1 ", "customer_id": "\tc1", "meter": "calls  "}))
    assert (row["event_id"], row["customer_id"], row["meter"], row["reason"]) == ("e1", "c1", "calls", None)


# Numbers, strings and typed columns ------------------------------------------------------------

def test_integer_columns_are_text_and_exact():
    raw = frame(event_id=[101], customer_id=[7], meter=["calls"], quantity=[12345678901234],
                timestamp=["2026-10-05T12:00:00Z"])
    row = one(raw)
    assert (row["event_id"], row["customer_id"], row["quantity_raw"]) == ("101", "7", "12345678901234")
    assert row["quantity"] == D("12345678901234")
    assert row["reason"] is None


def test_a_decimal_quantity_column_is_exact():
    raw = frame(event_id=["e1", "e2"], customer_id=["c1", "c1"], meter=["m", "m"],
                quantity=pl.Series([D("0.000000001"), D("-2.5")], dtype=pl.Decimal(20, 9)),
                timestamp=["2026-10-05T12:00:00Z"] * 2)
    out = normalized_usage(raw, "usage/a.parquet")
    assert out["quantity"].to_list() == [D("0.000000001"), D("-2.5")]
    assert out["reason"].to_list() == [None, "negative_quantity"]


def test_a_naive_parquet_timestamp_is_utc(tmp_path):
    path = tmp_path / "naive.parquet"
    frame(event_id=["e1", "e2"], customer_id=["c1", "c1"], meter=["m", "m"], quantity=["1", "1"],
          timestamp=[datetime(2026, 10, 31, 23, 59, 59, 999999), datetime(2026, 11, 1)]).write_parquet(path)
    raw = pl.read_parquet(path)
    assert raw.schema["timestamp"] == pl.Datetime("us", None)
    out = normalized_usage(raw, "usage/naive.parquet")
    assert out["event_at"].to_list() == [datetime(2026, 10, 31, 23, 59, 59, 999999, tzinfo=UTC),
                                         datetime(2026, 11, 1, tzinfo=UTC)]
    assert out["reason"].to_list() == [None, None]


@pytest.mark.parametrize("zone, wall, instant", [
    pytest.param("Europe/Berlin", datetime(2026, 10, 5, 12), datetime(2026, 10, 5, 10, tzinfo=UTC),
                 id="Berlin 12:00 CEST (+2) = 10:00Z"),
    pytest.param("America/New_York", datetime(2026, 10, 31, 21), datetime(2026, 11, 1, 1, tzinfo=UTC),
                 id="New York Oct 31 21:00 EDT (-4) = Nov 1 01:00Z"),
    pytest.param("UTC", datetime(2026, 10, 5, 12), datetime(2026, 10, 5, 12, tzinfo=UTC), id="UTC stays"),
])
def test_a_tz_aware_parquet_timestamp_is_converted_to_utc(tmp_path, zone, wall, instant):
    path = tmp_path / "aware.parquet"
    frame(event_id=["e1"], customer_id=["c1"], meter=["m"], quantity=["1"],
          timestamp=pl.Series([wall]).dt.replace_time_zone(zone)).write_parquet(path)
    row = one(pl.read_parquet(path))
    assert row["event_at"] == instant
    assert row["reason"] is None


def test_timestamp_raw_of_a_tz_aware_column_names_the_same_instant():
    raw = frame(event_id=["e1"], customer_id=["c1"], meter=["m"], quantity=["1"],
                timestamp=pl.Series([datetime(2026, 10, 5, 12)]).dt.replace_time_zone("Europe/Berlin"))
    row = one(raw)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    reread = con.execute("SELECT CAST($t AS TIMESTAMPTZ)", {"t": row["timestamp_raw"]}).fetchone()[0]
    assert reread == row["event_at"]


@pytest.mark.parametrize("unit", ["ms", "us", "ns"])
@pytest.mark.parametrize("zone", [None, "UTC", "America/New_York"])
def test_timestamp_raw_of_a_datetime_column_is_utc_with_as_many_fraction_digits_as_needed(unit, zone):
    at = datetime(2026, 9, 21, 13, 33, 20)
    per_unit = {"ms": 10**6, "us": 10**3, "ns": 1}[unit]
    nanos = [0, 250_000_000, 250_001_000, 1]  # whole, then a fraction of 3, 6 and 9 digits
    expected = {"ms": [".250", ".250", ""], "us": [".250", ".250001", ""],
                "ns": [".250", ".250001", ".000000001"]}[unit]
    wall = pl.Series([at] * 4, dtype=pl.Datetime("ns")).to_physical() + pl.Series([n // per_unit * per_unit
                                                                                   for n in nanos])
    column = wall.cast(pl.Datetime("ns")).dt.cast_time_unit(unit)
    far = pl.Series([datetime(9999, 12, 31, 23, 59, 59, 999_999), datetime(1969, 12, 31, 23, 59, 59)],
                    dtype=pl.Datetime(unit)) if unit != "ns" else pl.Series([datetime(1969, 12, 31, 23, 59, 59)],
                                                                            dtype=pl.Datetime(unit))
    texts = ["2026-09-21T13:33:20Z"] + [f"2026-09-21T13:33:20{f}Z" for f in expected]
    far_texts = (["9999-12-31T23:59:59.999Z" if unit == "ms" else "9999-12-31T23:59:59.999999Z"]
                 if unit != "ns" else []) + ["1969-12-31T23:59:59Z"]
    for values, want in ((column, texts), (pl.concat([column, far, pl.Series([None], dtype=column.dtype)]),
                                           texts + far_texts + [None])):
        typed = values if zone is None else values.dt.replace_time_zone("UTC").dt.convert_time_zone(zone)
        raw = frame(event_id=["e"] * typed.len(), customer_id=["c"] * typed.len(), meter=["m"] * typed.len(),
                    quantity=["1"] * typed.len(), timestamp=typed)
        assert normalized_usage(raw, "usage/a.parquet")["timestamp_raw"].to_list() == want


def test_a_date_column_is_utc_midnight():
    row = one(frame(event_id=["e1"], customer_id=["c1"], meter=["m"], quantity=["1"], timestamp=[date(2026, 10, 5)]))
    assert (row["event_at"], row["timestamp_raw"], row["reason"]) == (datetime(2026, 10, 5, tzinfo=UTC),
                                                                      "2026-10-05", None)


# Dimensions -----------------------------------------------------------------------------------

def test_dims_are_canonical_json_keys_sorted_nulls_omitted():
    out = normalized_usage(frame({**GOOD, "region": "eu", "model": "gpt-4o", "tier": None},
                                 {**GOOD, "region": None, "model": None, "tier": None},
                                 {**GOOD, "region": "", "model": "x", "tier": "gold"}), "k")
    assert out["dims"].to_list() == ['{"model":"gpt-4o","region":"eu"}', "{}",
                                     '{"model":"x","region":"","tier":"gold"}']


def test_same_dims_from_different_column_orders_give_the_same_string():
    a = frame({**GOOD, "region": "eu", "model": "gpt-4o"})
    b = a.select("model", "timestamp", "region", "quantity", "meter", "customer_id", "event_id")
    c = a.select("region", "model", *GOOD)
    assert a.columns != b.columns != c.columns
    assert {one(x)["dims"] for x in (a, b, c)} == {'{"model":"gpt-4o","region":"eu"}'}


def test_a_missing_dimension_column_equals_a_null_one():
    with_null = frame({**GOOD, "model": "gpt-4o", "region": None})
    without = frame({**GOOD, "model": "gpt-4o"})
    assert one(with_null)["dims"] == one(without)["dims"] == '{"model":"gpt-4o"}'


HOSTILE = [
    pytest.param("model", 'say "hi"', id="double quotes escaped"),
    pytest.param("model", "back\\slash", id="backslash escaped"),
    pytest.param("model", "line\nbreak\ttab", id="newline and tab escaped"),
    pytest.param("model", "\x01 control", id="control character escaped"),
    pytest.param("model", "日本語 é ü", id="unicode kept as text"),
    pytest.param("model", '"},"evil":"1', id="a value that tries to close the object"),
    pytest.param('we"ird', "x", id="a column name with a quote"),
    pytest.param("région", "x", id="a unicode column name"),
]


@pytest.mark.parametrize("name, value", HOSTILE)
def test_dims_escape_values_and_names_like_json(name, value):
    dims = one(frame({**GOOD, name: value}))["dims"]
    assert json.loads(dims) == {name: value}
    assert dims == canonical({name: value})


def test_dim_numbers_and_other_types_become_text():
    raw = frame(event_id=["e1"], customer_id=["c1"], meter=["m"], quantity=["1"], timestamp=["2026-10-05"],
                n=[3], big=[12345678901234567], ok=[True], price=pl.Series([D("1.50")], dtype=pl.Decimal(10, 2)),
                day=[date(2026, 1, 2)], tags=[[1, 2]])
    assert json.loads(one(raw)["dims"]) == {"big": "12345678901234567", "day": "2026-01-02", "n": "3",
                                            "ok": "true", "price": "1.50", "tags": "[1,2]"}


def test_every_dim_value_is_a_string():
    raw = frame(event_id=["e1"], customer_id=["c1"], meter=["m"], quantity=["1"], timestamp=["2026-10-05"],
                n=[0], neg=[-7])
    assert all(isinstance(v, str) for v in json.loads(one(raw)["dims"]).values())


# Order, numbering, schema ---------------------------------------------------------------------

def test_rows_keep_input_order_and_number_from_one():
    rows = [{**GOOD, "event_id": f"e{i}", "quantity": q} for i, q in enumerate(["3", "-1", "x", "2", "", "1"])]
    out = normalized_usage(frame(*rows), "usage/a.csv")
    assert out["source_row"].to_list() == [1, 2, 3, 4, 5, 6]
    assert out["event_id"].to_list() == ["e0", "e1", "e2", "e3", "e4", "e5"]
    assert out["reason"].to_list() == [None, "negative_quantity", "bad_quantity", None, "missing_field", None]
    assert out["source_key"].unique().to_list() == ["usage/a.csv"]


def test_a_frame_with_no_rows_gives_an_empty_frame_of_the_schema():
    out = normalized_usage(frame(GOOD).clear(), "usage/empty.csv")
    assert out.height == 0
    assert dict(out.schema) == NORMALIZED_COLUMNS


def test_output_schema_is_the_normalized_schema():
    out = normalized_usage(frame(GOOD, {**GOOD, "quantity": "bad", "region": "eu"}), "k")
    assert dict(out.schema) == NORMALIZED_COLUMNS
    assert not any(dtype in (pl.Float32, pl.Float64) for dtype in out.schema.values())


# The plain-quantity shortcut: rows with a typed timestamp and a quantity of digits (at most 9
# decimal places) skip DuckDB. Whatever the mix, the frame must equal the one DuckDB alone gives.
_QUANTITY_TEXT = st.one_of(
    st.from_regex(r"[0-9]{1,20}(\.[0-9]{0,11})?", fullmatch=True),
    st.sampled_from(["0", "007", "1e3", "-1", "+2", "1.", ".5", "1,5", "abc", "", " 3 ", "٣",
                     "999999999999999999", "9999999999999999999", "0.000000001", "0.0000000001",
                     "1.0123456789", "123456789012345678.123456789", "1.1234567890"]),
    st.none(),
)


@settings(max_examples=60, deadline=None)
@given(quantities=st.lists(_QUANTITY_TEXT, min_size=1, max_size=30),
       typed=st.lists(st.booleans(), min_size=30, max_size=30))
def test_the_plain_quantity_shortcut_gives_what_duckdb_gives(quantities, typed):
    n = len(quantities)
    stamps = [datetime(2026, 10, 5, 12, i, tzinfo=UTC) if typed[i] else None for i in range(n)]
    raw = pl.DataFrame({"event_id": [f"e{i}" for i in range(n)], "customer_id": ["c1"] * n,
                        "meter": ["calls"] * n, "quantity": quantities,
                        "timestamp": pl.Series(stamps, dtype=pl.Datetime("us", "UTC"))},
                       schema_overrides={"quantity": pl.String})
    text = normalized_usage(raw, "usage/x.parquet").select(
        "source_key", "source_row", "event_id", "customer_id", "meter", "quantity_raw", "timestamp_raw", "dims",
        pl.Series("timestamp_typed", stamps, dtype=pl.Datetime("us", "UTC")))
    assert_frame_equal(usage_module.parsed_values(text), usage_module.parsed_in_duckdb(text))


def test_dimensions_encoded_once_per_value_equal_the_row_by_row_encoding():
    """A large object's dimension values are JSON-encoded once each and looked up per row; an
    object under 10,000 rows is encoded row by row. Both must give the same text."""
    import random
    rng = random.Random(7)
    words = ["gpt-4o", 'a "quoted" model', "back\\slash", "ünïcode ✓", "tab\there", "", "  spaced  "]
    n = 20_000
    raw = pl.DataFrame({
        "event_id": [f"e{i}" for i in range(n)], "customer_id": ["c1"] * n, "meter": ["calls"] * n,
        "quantity": ["1"] * n, "timestamp": ["2026-10-05T12:00:00Z"] * n,
        "model": [rng.choice(words + [None]) for _ in range(n)],
        "tier": pl.Series([rng.choice([1, 2, -3, None]) for _ in range(n)], dtype=pl.Int64),
        "beta": [rng.choice([True, False, None]) for _ in range(n)],
        "id_like": [f"r{i}" for i in range(n)],  # a value per row: encoded row by row
    })
    whole = normalized_usage(raw, "usage/x.jsonl")["dims"]
    in_small_parts = pl.concat([normalized_usage(raw.slice(i, 5_000), "usage/x.jsonl")["dims"]
                                for i in range(0, n, 5_000)])
    assert whole.equals(in_small_parts)
    row = raw.row(0, named=True)  # dimension values are text: 2 -> "2", True -> "true"
    text = {"beta": None if row["beta"] is None else str(row["beta"]).lower(), "id_like": row["id_like"],
            "model": row["model"], "tier": None if row["tier"] is None else str(row["tier"])}
    assert json.loads(whole[0]) == {k: v for k, v in text.items() if v is not None}
