"""margins_table, summed in Polars, equals the rule spelled out row by row in Python."""
from __future__ import annotations

import io
import json
from datetime import date
from decimal import Decimal as D

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.finance.margins import (
    MARGINS_SCHEMA,
    costs_from,
    margin_pct,
    margin_pct_in_integers,
    margins_table,
    units_text,
)
from transforms.money import decimal_text, to_minor
from transforms.periods import Period

PERIOD = Period.parse("2026-10")
COSTS = costs_from(pl.read_csv(io.BytesIO(
    b'meter,filter,unit_cost,per,currency,effective_from\n'
    b'tokens,"{""model"": ""a""}",1.25,1000000,USD,2026-01-01\n'
    b'tokens,"{""model"": ""a""}",1.50,1000000,USD,2026-10-10\n'
    b'images,,0.02,,USD,2026-01-01\nimages,,0.03,,EUR,2026-01-01\n'), infer_schema=False))
SEGMENTS = pl.DataFrame(
    [("s1", 1, "c1", "p", 1, "USD", date(2026, 10, 1)), ("s1", 2, "c1", "p", 2, "USD", date(2026, 10, 15)),
     ("s2", 1, "c2", "q", 1, "EUR", date(2026, 10, 1)), ("s3", 1, "c1", "q", 1, "EUR", date(2026, 10, 1))],
    schema={"subscription_id": pl.String, "segment_no": pl.Int32, "customer_id": pl.String, "plan": pl.String,
            "plan_version": pl.Int32, "currency": pl.String, "start_on": pl.Date}, orient="row")
SUBS = {"s1": ("c1", "USD"), "s2": ("c2", "EUR"), "s3": ("c1", "EUR"), "s9": ("c9", "USD")}
DIMS = ('{"model": "a"}', '{"model": "b"}', "{}")


def plain_margins(lines: pl.DataFrame, usage: pl.DataFrame, costs) -> list[dict]:
    """Each line and each usage row on its own, as the rule reads."""
    segs = {(r["subscription_id"], r["segment_no"]): r for r in SEGMENTS.iter_rows(named=True)}
    last = {r["subscription_id"]: r for r in SEGMENTS.sort("segment_no").iter_rows(named=True)}
    revenue, units, cost = {}, {}, {}
    for line in lines.iter_rows(named=True):
        seg = segs.get((line["subscription_id"], line["segment_no"])) or last.get(line["subscription_id"])
        plan, version = ((line["plan"], line["plan_version"]) if line["plan"] is not None
                         else (seg["plan"], seg["plan_version"]) if seg else (None, None))
        key = (line["customer_id"], plan, version, line["meter"], line["currency"])
        revenue[key] = revenue.get(key, 0) + line["amount_minor"]
    for row in usage.iter_rows(named=True):
        seg = segs.get((row["subscription_id"], row["segment_no"]))
        if seg is None:
            continue
        key = (seg["customer_id"], seg["plan"], seg["plan_version"], row["meter"], seg["currency"])
        units[key] = units.get(key, D(0)) + row["units"]
        found = costs.in_force(row["meter"], json.loads(row["dims"]), seg["currency"], row.get("day", PERIOD.start))
        known = cost.get(key, D(0))
        cost[key] = None if found is None or known is None else known + found.cost_of(row["units"])
    rows = []
    for key in set(revenue) | set(units):
        customer, plan, version, meter, currency = key
        rev = revenue.get(key, 0)
        exact = cost.get(key, D(0)) if meter is not None else D(0)
        cost_minor = None if exact is None else to_minor(exact, currency)
        margin = None if cost_minor is None else rev - cost_minor
        rows.append({"customer_id": customer, "period": str(PERIOD), "plan": plan, "plan_version": version,
                     "meter": meter, "currency": currency,
                     "units": None if meter is None else decimal_text(units.get(key, D(0))),
                     "revenue_minor": rev, "cost_minor": cost_minor, "margin_minor": margin,
                     "margin_pct": margin_pct(margin, rev)})
    return sorted(rows, key=lambda r: (r["customer_id"], r["plan"] or "", r["plan_version"] or 0, r["meter"] or "",
                                       r["currency"]))


line_rows = st.builds(
    lambda sub, seg, meter, amount, own_plan: {
        "customer_id": SUBS[sub][0], "subscription_id": sub, "segment_no": seg, "meter": meter,
        "amount_minor": amount, "currency": SUBS[sub][1], "plan": "p" if own_plan else None,
        "plan_version": 7 if own_plan else None},
    st.sampled_from(sorted(SUBS)), st.sampled_from([1, 2, None]), st.sampled_from(["tokens", "images", None]),
    st.integers(-5000, 50000), st.booleans())
usage_rows = st.builds(
    lambda sub, seg, meter, dims, units, day: {
        "subscription_id": sub, "segment_no": seg, "meter": meter, "dims": dims, "units": D(units) / 1000,
        "day": date(2026, 10, day)},
    st.sampled_from(sorted(SUBS)), st.sampled_from([1, 2]), st.sampled_from(["tokens", "images"]),
    st.sampled_from(DIMS), st.integers(0, 10**12), st.integers(1, 31))


@settings(max_examples=80, deadline=None)
@given(lines=st.lists(line_rows, max_size=12), usage=st.lists(usage_rows, max_size=12), by_day=st.booleans())
def test_margins_equal_the_row_by_row_rule(lines, usage, by_day):
    lines_frame = pl.DataFrame(lines, schema={
        "customer_id": pl.String, "subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String,
        "amount_minor": pl.Int64, "currency": pl.String, "plan": pl.String, "plan_version": pl.Int32})
    usage_frame = pl.DataFrame(usage, schema={
        "subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String, "dims": pl.String,
        "units": pl.Decimal(38, 9), "day": pl.Date})
    if not by_day:
        usage_frame = usage_frame.drop("day")
    expected = pl.DataFrame(plain_margins(lines_frame, usage_frame, COSTS), schema=MARGINS_SCHEMA)
    assert margins_table(lines_frame, usage_frame, SEGMENTS, COSTS, PERIOD).equals(expected)


@settings(max_examples=300, deadline=None)
@given(margin=st.one_of(st.none(), st.integers(-10**12, 10**12)), revenue=st.integers(-10**12, 10**12))
def test_margin_pct_in_integers_equals_the_decimal_rule(margin, revenue):
    frame = pl.DataFrame({"m": [margin], "r": [revenue]}, schema={"m": pl.Int64, "r": pl.Int64})
    assert frame.select(margin_pct_in_integers(pl.col("m"), pl.col("r"))).item() == margin_pct(margin, revenue)


def test_margin_pct_rounds_half_away_from_zero():
    """1 of 8 = 12.5% exactly; 1 of 16 = 6.25% -> 6.3; -1 of 16 -> -6.3; -1 of 3000 = -0.033% -> 0.0."""
    frame = pl.DataFrame({"m": [1, 1, -1, -1, 1], "r": [8, 16, 16, 3000, -16]})
    assert frame.select(margin_pct_in_integers(pl.col("m"), pl.col("r"))).to_series().to_list() == [
        "12.5", "6.3", "-6.3", "0.0", "-6.3"]


@settings(max_examples=300, deadline=None)
@given(value=st.decimals(min_value=0, max_value=10**18, places=9, allow_nan=False, allow_infinity=False))
def test_units_text_equals_decimal_text(value):
    """Up to 28 significant digits, where Python's Decimal context is exact too (past them
    `decimal_text` rounds; Polars keeps every digit of a DECIMAL(38, 9))."""
    frame = pl.DataFrame({"u": [value]}, schema={"u": pl.Decimal(38, 9)})
    assert frame.select(units_text(pl.col("u"))).item() == decimal_text(value)
