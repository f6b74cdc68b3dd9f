"""A night's draft invoices rate per-event percentage fees from columns, not a Python object per
event of the month: the column path must equal the rule as written, event by event."""
from __future__ import annotations

import json
from decimal import Decimal as D
from unittest.mock import patch

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_invoices import charges, plan, segment
from transforms.engine.invoices import SegmentUsage, charge_lines, usage_by_segment
from transforms.pricing import Usage, percentage
from transforms.pricing.base import ZERO

SCALE = 9
AMOUNT = pl.Decimal(38, SCALE)


def as_column(amounts: list[D]) -> pl.Series:
    return pl.Series("quantity", amounts, dtype=AMOUNT)


def column_rating(price, usage: Usage):
    """Rate the usage's amounts as a column, by sums however few they are."""
    with patch.object(percentage, "_FEW", 0):
        return percentage.rate(price, Usage(usage.units, usage.events, as_column(list(usage.event_quantities))))


def rendered(rating) -> tuple[str, str]:
    """What an invoice line shows of a rating: its amount and its details, as text."""
    return format(rating.amount.normalize(), "f"), json.dumps([s.as_dict() for s in rating.steps])


amounts_st = st.lists(st.decimals(min_value=0, max_value=D("100000"), places=SCALE, allow_nan=False,
                                  allow_infinity=False)
                      | st.sampled_from([D(0), D("0.01"), D("3.33"), D("21.428571428"), D("21.428571429")]),
                      max_size=60)
money = st.decimals(min_value=0, max_value=D("50"), places=2, allow_nan=False, allow_infinity=False)


@st.composite
def prices(draw):
    low = draw(st.none() | money)
    high = draw(st.none() | money)
    if low is not None and high is not None and high < low:
        low, high = high, low
    return percentage.Price(model="percentage", rate=draw(st.sampled_from(["0", "1.4", "2.9", "0.125", "7", "100"])),
                            fixed_fee=draw(st.sampled_from(["0", "0.25", "0.30", "1.5"])),
                            free_events=draw(st.integers(0, 5)), min_fee=low, max_fee=high)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(price=prices(), amounts=amounts_st, included=st.integers(0, 100))
def test_column_rating_equals_the_rule_event_by_event(price, amounts, included):
    # `included` is the percent of the month's amount the allowance covers (0 to all of it)
    total = sum(amounts, ZERO)
    allowance = min((total * included / 100).quantize(D(1).scaleb(-SCALE)), total)
    usage = Usage(total - allowance, len(amounts), tuple(amounts))
    expected = percentage.rate(price, usage)
    got = column_rating(price, usage)
    assert got == expected
    assert rendered(got) == rendered(expected)


def test_events_at_the_minimum_fee_edge():
    # 1.4% + 0.25 reaches the 0.30 minimum at 0.05 x 100 / 1.4 = 3.571428571428...: 3.571428571
    # is raised (fee 0.29999999999...), 3.571428572 is not; the first 3 events are free.
    price = percentage.Price(model="percentage", rate="1.4", fixed_fee="0.25", free_events=3, min_fee="0.30")
    amounts = [D("50")] * 3 + [D("3.571428571"), D("3.571428572"), D("0"), D("100")]
    usage = Usage(sum(amounts, ZERO), len(amounts), tuple(amounts))
    expected = percentage.rate(price, usage)
    assert column_rating(price, usage) == expected
    assert [s.label for s in expected.steps][-1] == "2 events raised to the 0.30 minimum fee"


def test_refunds_rate_as_the_rule_does():
    price = percentage.Price(model="percentage", rate="2.9", fixed_fee="0.30", min_fee="0.50", max_fee="5")
    amounts = [D("10"), D("-4"), D("500"), D("1")]
    usage = Usage(D("500"), 4, tuple(amounts))
    assert column_rating(price, usage) == percentage.rate(price, usage)


def test_a_month_of_payments_with_an_allowance():
    # 1,000 events: 5 free after the allowance of 1,234.5 covers the first ones, 0.30 minimum
    price = percentage.Price(model="percentage", rate="1.4", fixed_fee="0.25", free_events=5, min_fee="0.30",
                             max_fee="2")
    amounts = [D(f"{(i * 7919) % 20000}.{i % 1000:03d}") / 100 for i in range(1000)]
    usage = Usage(sum(amounts, ZERO) - D("1234.5"), len(amounts), tuple(amounts))
    assert percentage.rate(price, Usage(usage.units, usage.events, as_column(amounts))) == \
        percentage.rate(price, usage)


dims_st = st.sampled_from(['{"region": "eu"}', '{"region": "us"}', '{}', '{"region": "eu", "card": "amex"}',
                           '{"region": "us", "card": "amex"}', '{"region": "us", "card": "visa"}'])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(st.tuples(st.sampled_from(["payments", "images"]), dims_st,
                                 st.decimals(min_value=0, max_value=D("999"), places=2)), max_size=40))
def test_segment_columns_rate_as_per_event_rows(events):
    """usage_by_segment keeps per-event quantities as columns per meter x dims; the charges rate
    them exactly as the same events given one row each, in table order."""
    charges_usage = _usage_of(events)
    by_rows = SegmentUsage(charges_usage.by_dims, tuple(events))
    with patch.object(percentage, "_FEW", 0):
        for segment in _SEGMENTS:
            assert _lines(segment, charges_usage) == _lines(segment, by_rows)


def _lines(segment, usage):
    return [(line.description, line.amount_minor, line.amount, line.steps)
            for line in charge_lines(segment, usage, "", {})]


def _usage_of(events):
    per_event = pl.DataFrame({"subscription_id": ["s1"] * len(events), "segment_no": [1] * len(events),
                              "meter": [m for m, _, _ in events], "dims": [d for _, d, _ in events],
                              "quantity": [q for _, _, q in events]},
                             schema={"subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String,
                                     "dims": pl.String, "quantity": AMOUNT})
    by_dims = (per_event.group_by("subscription_id", "segment_no", "meter", "dims", maintain_order=True)
               .agg(pl.col("quantity").sum().alias("units"), pl.len().cast(pl.Int64).alias("events")))
    return usage_by_segment(by_dims, per_event).get(("s1", 1), SegmentUsage(()))


_SEGMENTS = [
    segment(plan(charges(  # filters and group_by: each charge takes part of the meter's events
        '{name: EU payments, meter: payments, filter: {region: eu}, included: "40", price: {model: percentage, '
        'rate: "1.4", fixed_fee: "0.25", free_events: 2, min_fee: "0.30", max_fee: "9"}}',
        '{name: US payments, meter: payments, filter: {region: us}, group_by: [card], price: {model: percentage, '
        'rate: "2.9", fixed_fee: "0.30", free_events: 1, min_fee: "0.50"}}',
        '{name: Images, meter: images, price: {model: standard, unit_price: "0.02"}}'), "EUR", "half_even")),
    segment(plan(charges(  # one charge takes all of the meter's events
        '{name: Payments, meter: payments, included: "25", price: {model: percentage, '
        'rate: "1.4", fixed_fee: "0.25", free_events: 2, min_fee: "0.30", max_fee: "9"}}'), "EUR", "half_even")),
]
