"""Invoices from hand-made segments and usage: worked examples with the arithmetic in the case id,
then the invariants (lines sum to the total, every amount an integer, rerun equals run)."""
from __future__ import annotations

import json
from datetime import date, datetime, timezone
from decimal import Decimal as D

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms.engine.invoices import (
    INVOICE_SCHEMA,
    LINE_SCHEMA,
    SegmentUsage,
    invoices_table,
    lines_table,
    period_invoices,
    totals_by_currency,
)
from transforms.errors import InputError
from transforms.inputs.plans import PlanFile, parse_plan
from transforms.inputs.reference import Segment, Subscription, segments_by_subscription, subscription_plans
from transforms.money import to_minor
from transforms.periods import Period

OCT, NOV, FEB = Period(2026, 10), Period(2026, 11), Period(2026, 2)


def plan(body: str = "", currency: str = "USD", rounding: str = "half_up", name: str = "p",
         version: int = 1) -> PlanFile:
    text = (f"plan: {name}\nversion: {version}\neffective_from: 2026-01-01\ncurrency: {currency}\n"
            f"rounding: {rounding}\n{body}")
    return parse_plan(text, f"plans/{name}-v{version}.yaml")


def fee(amount: str, name: str = "Platform fee") -> str:
    return f'fixed_fees:\n  - {{name: {name}, amount: "{amount}"}}\n'


def charges(*blocks: str) -> str:
    return "charges:\n" + "".join(f"  - {b}\n" for b in blocks)


def subscription(sid: str = "s1", customer: str = "c1", hard_cap: str | None = None) -> Subscription:
    return Subscription(sid, customer, "p", None, date(2026, 1, 1), None, None,
                        D(hard_cap) if hard_cap is not None else None, 1)


def at(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=timezone.utc)


def segment(pf: PlanFile, start: str | None = None, end: str | None = None, period: Period = OCT,
            sub: Subscription | None = None, no: int = 1) -> Segment:
    return Segment(sub or subscription(), no, pf, at(start) if start else period.start_at,
                   at(end) if end else period.end_at, period)


def usage(*rows: tuple, per_event: tuple = (), sid: str = "s1", no: int = 1) -> dict:
    """(meter, dims dict, units text, events) rows -> the usage map period_invoices takes."""
    by_dims = tuple((m, json.dumps(d, sort_keys=True, separators=(",", ":")), D(u), n) for m, d, u, n in rows)
    return {(sid, no): SegmentUsage(by_dims, per_event)}


def one_invoice(segments, used=None, period: Period = OCT):
    [invoice] = period_invoices(period, segments, used or {})
    assert invoice.total_minor == sum(line.amount_minor for line in invoice.lines)
    return invoice


def amounts(invoice) -> list[tuple[str, int]]:
    return [(line.kind, line.amount_minor) for line in invoice.lines]


# Fixed fees -----------------------------------------------------------------------------------

FIXED_FEES = [
    pytest.param("USD", "half_up", "20.00", "2026-10-01", "2026-11-01", OCT, 2000, id="USD 20.00 x 31/31 days = 20.00"),
    pytest.param("USD", "half_up", "20.00", "2026-10-17", "2026-11-01", OCT, 968,
                 id="USD 20.00 x 15/31 days = 9.677... -> 9.68"),
    pytest.param("USD", "half_up", "20.00", "2026-10-01", "2026-10-02", OCT, 65,
                 id="USD 20.00 x 1/31 days = 0.645... -> 0.65"),
    pytest.param("USD", "half_up", "20.00", "2026-02-15", "2026-03-01", FEB, 1000,
                 id="USD 20.00 x 14/28 days (Feb) = 10.00"),
    pytest.param("USD", "half_up", "10.00", "2026-11-30", "2026-12-01", NOV, 33,
                 id="USD 10.00 x 1/30 days = 0.333... -> 0.33"),
    pytest.param("USD", "half_up", "0.31", "2026-10-17", "2026-11-01", OCT, 15,
                 id="USD 0.31 x 15/31 days = 0.15 exactly"),
    pytest.param("USD", "half_up", "0.01", "2026-11-16", "2026-12-01", NOV, 1,
                 id="USD half_up 0.01 x 15/30 days = 0.005 -> 0.01"),
    pytest.param("USD", "half_even", "0.01", "2026-11-16", "2026-12-01", NOV, 0,
                 id="USD half_even 0.01 x 15/30 days = 0.005 -> 0.00"),
    pytest.param("USD", "half_up", "0.05", "2026-11-16", "2026-12-01", NOV, 3,
                 id="USD half_up 0.05 x 15/30 days = 0.025 -> 0.03"),
    pytest.param("USD", "half_even", "0.05", "2026-11-16", "2026-12-01", NOV, 2,
                 id="USD half_even 0.05 x 15/30 days = 0.025 -> 0.02"),
    pytest.param("USD", "half_even", "0.03", "2026-11-16", "2026-12-01", NOV, 2,
                 id="USD half_even 0.03 x 15/30 days = 0.015 -> 0.02"),
    pytest.param("JPY", "half_up", "1000", "2026-10-17", "2026-11-01", OCT, 484,
                 id="JPY 1000 x 15/31 days = 483.87... -> 484 yen"),
    pytest.param("JPY", "half_up", "5", "2026-11-16", "2026-12-01", NOV, 3, id="JPY half_up 5 x 15/30 = 2.5 -> 3 yen"),
    pytest.param("JPY", "half_even", "5", "2026-11-16", "2026-12-01", NOV, 2,
                 id="JPY half_even 5 x 15/30 = 2.5 -> 2 yen"),
    pytest.param("KWD", "half_up", "5.000", "2026-10-17", "2026-11-01", OCT, 2419,
                 id="KWD 5.000 x 15/31 days = 2.41935... -> 2.419 (3 decimals)"),
    pytest.param("KWD", "half_up", "0.001", "2026-11-16", "2026-12-01", NOV, 1,
                 id="KWD half_up 0.001 x 15/30 = 0.0005 -> 0.001"),
    pytest.param("KWD", "half_even", "0.001", "2026-11-16", "2026-12-01", NOV, 0,
                 id="KWD half_even 0.001 x 15/30 = 0.0005 -> 0.000"),
]


@pytest.mark.parametrize("currency, rounding, amount, start, end, period, expected", FIXED_FEES)
def test_fixed_fee_prorated_by_days(currency, rounding, amount, start, end, period, expected):
    seg = segment(plan(fee(amount), currency, rounding), start, end, period)
    invoice = one_invoice([seg], period=period)
    [line] = invoice.lines
    assert (line.kind, line.amount_minor, line.quantity, line.unit) == ("fixed_fee", expected, D(seg.days), "days")
    assert invoice.currency == currency
    assert invoice.total_minor == expected
    assert line.amount == D(amount) * seg.days / period.days


def test_fixed_fee_description_says_the_days_only_when_prorated():
    pf = plan(fee("20.00"))
    assert one_invoice([segment(pf)]).lines[0].description == "Platform fee"
    assert one_invoice([segment(pf, "2026-10-17")]).lines[0].description == "Platform fee, 15 of 31 days"


# Usage lines ----------------------------------------------------------------------------------

STANDARD = [
    pytest.param("USD", "half_up", '"0.005"', "", "1", 1, id="USD half_up 1 x 0.005 = 0.005 -> 0.01"),
    pytest.param("USD", "half_even", '"0.005"', "", "1", 0, id="USD half_even 1 x 0.005 = 0.005 -> 0.00"),
    pytest.param("USD", "half_up", '"0.005"', "", "5", 3, id="USD half_up 5 x 0.005 = 0.025 -> 0.03"),
    pytest.param("USD", "half_even", '"0.005"', "", "5", 2, id="USD half_even 5 x 0.005 = 0.025 -> 0.02"),
    pytest.param("USD", "half_even", '"0.005"', "", "3", 2, id="USD half_even 3 x 0.005 = 0.015 -> 0.02"),
    pytest.param("USD", "half_up", '"2.50"', ", per: 1000000", "1500", 0,
                 id="USD 1,500 x 2.50 / 1,000,000 = 0.00375 -> 0.00"),
    pytest.param("USD", "half_up", '"2.50"', ", per: 1000000", "2500000", 625,
                 id="USD 2,500,000 x 2.50 / 1,000,000 = 6.25"),
    pytest.param("USD", "half_up", '"2.50"', ", per: 1000000", "2002000", 501,
                 id="USD 2,002,000 x 2.50 / 1,000,000 = 5.005 -> 5.01"),
    pytest.param("USD", "half_up", '"0.1"', "", "0.000000001", 0, id="USD 1e-9 x 0.1 = 1e-10 -> 0.00"),
    pytest.param("JPY", "half_up", '"0.5"', "", "5", 3, id="JPY half_up 5 x 0.5 = 2.5 -> 3 yen"),
    pytest.param("JPY", "half_even", '"0.5"', "", "5", 2, id="JPY half_even 5 x 0.5 = 2.5 -> 2 yen"),
    pytest.param("JPY", "half_up", '"3"', "", "1234", 3702, id="JPY 1,234 x 3 = 3,702 yen"),
    pytest.param("KWD", "half_up", '"0.0125"', "", "3", 38, id="KWD 3 x 0.0125 = 0.0375 -> 0.038"),
    pytest.param("KWD", "half_up", '"0.0005"', "", "5", 3, id="KWD half_up 5 x 0.0005 = 0.0025 -> 0.003"),
    pytest.param("KWD", "half_even", '"0.0005"', "", "5", 2, id="KWD half_even 5 x 0.0005 = 0.0025 -> 0.002"),
]


@pytest.mark.parametrize("currency, rounding, price, per, units, expected", STANDARD)
def test_standard_usage_line(currency, rounding, price, per, units, expected):
    pf = plan(charges(f"{{meter: calls, price: {{model: standard, unit_price: {price}{per}}}}}"), currency, rounding)
    invoice = one_invoice([segment(pf)], usage(("calls", {}, units, 1)))
    [line] = invoice.lines
    assert (line.kind, line.meter, line.quantity, line.amount_minor) == ("usage", "calls", D(units), expected)
    assert invoice.total_minor == expected


INCLUDED = [
    pytest.param("0.05", "", "200", "350", "150", 750, id="350 used - 200 included = 150 x 0.05 = 7.50"),
    pytest.param("0.05", "", "200", "120", "0", 0, id="120 used, 200 included = 0 x 0.05 = 0.00"),
    pytest.param("0.05", "", "200", "200", "0", 0, id="200 used = 200 included = 0.00"),
    pytest.param("0.05", "", "200", "201", "1", 5, id="201 used - 200 included = 1 x 0.05 = 0.05"),
    pytest.param("2.50", ", per: 1000000", "1000000", "2500000", "1500000", 375,
                 id="2,500,000 - 1,000,000 included = 1,500,000 x 2.50 / 1,000,000 = 3.75"),
]


@pytest.mark.parametrize("price, per, included, used, billable, expected", INCLUDED)
def test_included_allowance_bills_an_overage_line(price, per, included, used, billable, expected):
    pf = plan(charges(f'{{name: Images, meter: images, included: {included}, '
                      f'price: {{model: standard, unit_price: "{price}"{per}}}}}'))
    [line] = one_invoice([segment(pf)], usage(("images", {}, used, 3))).lines
    assert (line.kind, line.quantity, line.amount_minor) == ("overage", D(billable), expected)
    assert (line.total_units, line.included_units) == (D(used), min(D(used), D(included)))


def test_percentage_prices_each_event_in_order():
    pf = plan(charges('{name: Card payments, meter: payments, price: {model: percentage, rate: "1.4", '
                      'fixed_fee: "0.25", free_events: 3, min_fee: "0.30"}}'), "EUR", "half_even")
    events = tuple(("payments", "{}", D(q)) for q in ("50", "50", "50", "50", "10"))
    used = {("s1", 1): SegmentUsage((("payments", "{}", D("210"), 5),), events)}
    # 3 free; 50 x 1.4% + 0.25 = 0.95; 10 x 1.4% + 0.25 = 0.39; 0.95 + 0.39 = 1.34
    [line] = one_invoice([segment(pf)], used).lines
    assert (line.kind, line.amount_minor) == ("usage", 134)


GPT = ('{name: GPT output, meter: tokens, filter: {model: gpt-4o}, group_by: [region], '
       'price: {model: standard, unit_price: "1.00"}}')


def test_filter_and_group_by_one_line_per_group_sorted_none_last():
    pf = plan(charges(GPT))
    used = usage(("tokens", {"model": "gpt-4o", "region": "us"}, "3", 1),
                 ("tokens", {"model": "gpt-4o", "region": "eu"}, "2", 1),
                 ("tokens", {"model": "gpt-4o", "region": "eu", "user": "u1"}, "5", 2),
                 ("tokens", {"model": "gpt-4o"}, "1", 1),
                 ("tokens", {"model": "gpt-4o-mini", "region": "eu"}, "100", 1),  # filtered out
                 ("other", {"model": "gpt-4o", "region": "eu"}, "100", 1))        # another meter
    invoice = one_invoice([segment(pf)], used)
    # eu: 2 + 5 = 7 x 1.00 = 7.00; us: 3 x 1.00 = 3.00; (none): 1 x 1.00 = 1.00
    assert [(line.description, line.quantity, line.amount_minor, line.group) for line in invoice.lines] == [
        ("GPT output (region: eu)", D(7), 700, {"region": "eu"}),
        ("GPT output (region: us)", D(3), 300, {"region": "us"}),
        ("GPT output (region: (none))", D(1), 100, {"region": None})]
    assert invoice.total_minor == 1100
    assert lines_table([invoice])["group"].to_list() == ['{"region": "eu"}', '{"region": "us"}', '{"region": null}']


def test_group_by_two_dimensions_sorts_by_both():
    pf = plan(charges('{name: T, meter: tokens, group_by: [model, region], price: {model: standard, unit_price: "1"}}'))
    used = usage(("tokens", {"model": "b", "region": "eu"}, "1", 1), ("tokens", {"model": "a", "region": "us"}, "2", 1),
                 ("tokens", {"model": "a", "region": "eu"}, "3", 1), ("tokens", {"region": "eu"}, "4", 1))
    assert [line.description for line in one_invoice([segment(pf)], used).lines] == [
        "T (model: a, region: eu)", "T (model: a, region: us)", "T (model: b, region: eu)",
        "T (model: (none), region: eu)"]


def test_unused_charge_without_group_by_shows_a_zero_line_with_group_by_none():
    pf = plan(charges('{name: API calls, meter: calls, '
                      'price: {model: package, package_size: 100, package_price: "5.00"}}',
                      GPT))
    invoice = one_invoice([segment(pf)])
    assert [(line.kind, line.description, line.quantity, line.amount_minor) for line in invoice.lines] == [
        ("usage", "API calls", D(0), 0)]
    assert invoice.total_minor == 0


def test_an_invoice_at_zero_still_exists():
    invoice = one_invoice([segment(plan())])
    assert (invoice.lines, invoice.total_minor) == ((), 0)


# Hard cap -------------------------------------------------------------------------------------

CAPPED = (fee("20.00") + charges('{meter: calls, price: {model: standard, unit_price: "1.00"}}',
                                 '{meter: images, included: 10, price: {model: standard, unit_price: "1.00"}}')
          + 'spend_controls: {hard_cap: "30.00"}\n')

CAPS = [
    pytest.param(None, "25", "15", [("fixed_fee", 2000), ("usage", 2500), ("overage", 500)],
                 id="usage 25.00 + overage 5.00 = 30.00 = cap 30.00: no waiver"),
    pytest.param(None, "25", "16", [("fixed_fee", 2000), ("usage", 2500), ("overage", 600), ("cap_waiver", -100)],
                 id="usage 25.00 + overage 6.00 = 31.00 > cap 30.00: waiver -1.00"),
    pytest.param(None, "100", "0", [("fixed_fee", 2000), ("usage", 10000), ("overage", 0), ("cap_waiver", -7000)],
                 id="usage 100.00 > cap 30.00: waiver -70.00, fee untouched"),
    pytest.param("50.00", "100", "0", [("fixed_fee", 2000), ("usage", 10000), ("overage", 0), ("cap_waiver", -5000)],
                 id="subscription cap 50.00 beats plan 30.00: 100.00 - 50.00 = waiver -50.00"),
    pytest.param("200.00", "100", "0", [("fixed_fee", 2000), ("usage", 10000), ("overage", 0)],
                 id="subscription cap 200.00 beats plan 30.00: 100.00 under it, no waiver"),
    pytest.param("0", "1", "0", [("fixed_fee", 2000), ("usage", 100), ("overage", 0), ("cap_waiver", -100)],
                 id="subscription cap 0.00: all usage waived, fee kept"),
]


@pytest.mark.parametrize("sub_cap, calls, images, expected", CAPS)
def test_hard_cap_waives_the_excess_in_one_line(sub_cap, calls, images, expected):
    seg = segment(plan(CAPPED), sub=subscription(hard_cap=sub_cap))
    invoice = one_invoice([seg], usage(("calls", {}, calls, 1), ("images", {}, images, 1)))
    assert amounts(invoice) == expected
    assert invoice.total_minor == sum(a for _, a in expected)


def test_cap_waiver_line_reads_as_a_waiver():
    invoice = one_invoice([segment(plan(CAPPED))], usage(("calls", {}, "100", 1)))
    waiver = invoice.lines[-1]
    assert (waiver.kind, waiver.quantity, waiver.description) == (
        "cap_waiver", D(1), "Hard cap: usage above 30.00 USD is waived")


def test_no_cap_no_waiver():
    pf = plan(charges('{meter: calls, price: {model: standard, unit_price: "1.00"}}'))
    assert amounts(one_invoice([segment(pf)], usage(("calls", {}, "1000000", 1)))) == [("usage", 100000000)]


# Commitment -----------------------------------------------------------------------------------

COMMITTED = (fee("20.00") + charges('{meter: calls, price: {model: standard, unit_price: "1.00"}}')
             + 'commitment: {minimum: "50.00"}\n')

COMMITMENTS = [
    pytest.param("2026-10-01", "5", [("fixed_fee", 2000), ("usage", 500), ("commitment_true_up", 2500)],
                 id="fee 20.00 + usage 5.00 = 25.00 < 50.00: true-up 25.00"),
    pytest.param("2026-10-01", "30", [("fixed_fee", 2000), ("usage", 3000)],
                 id="fee 20.00 + usage 30.00 = 50.00 = minimum: no true-up"),
    pytest.param("2026-10-01", "80", [("fixed_fee", 2000), ("usage", 8000)],
                 id="fee 20.00 + usage 80.00 = 100.00 > 50.00: no true-up, no credit"),
    pytest.param("2026-10-17", "0", [("fixed_fee", 968), ("usage", 0), ("commitment_true_up", 1451)],
                 id="15/31 days: minimum 50.00 x 15/31 = 24.19 - fee 9.68 = true-up 14.51"),
    pytest.param("2026-10-17", "20", [("fixed_fee", 968), ("usage", 2000)],
                 id="15/31 days: fee 9.68 + usage 20.00 = 29.68 > 24.19: no true-up"),
]


@pytest.mark.parametrize("start, calls, expected", COMMITMENTS)
def test_commitment_true_up_makes_up_the_shortfall_only(start, calls, expected):
    invoice = one_invoice([segment(plan(COMMITTED), start)], usage(("calls", {}, calls, 1)))
    assert amounts(invoice) == expected


def test_commitment_counts_spend_after_the_cap_waiver():
    pf = plan(COMMITTED + 'spend_controls: {hard_cap: "10.00"}\n')
    invoice = one_invoice([segment(pf)], usage(("calls", {}, "25", 1)))
    # fee 20.00 + usage 25.00 - waiver 15.00 = 30.00 < 50.00: true-up 20.00
    assert amounts(invoice) == [("fixed_fee", 2000), ("usage", 2500), ("cap_waiver", -1500),
                                ("commitment_true_up", 2000)]
    assert invoice.total_minor == 5000


def test_usage_spend_is_the_usage_and_overage_lines_before_the_waiver():
    """fee 20.00, usage 25.00, overage 6.00, waiver -1.00: usage spend 25.00 + 6.00 = 31.00 (what
    budgets and the cap measure); commitment spend 20.00 + 31.00 - 1.00 = 50.00 (the waiver
    counts, the fee too)."""
    invoice = one_invoice([segment(plan(CAPPED))], usage(("calls", {}, "25", 1), ("images", {}, "16", 1)))
    assert amounts(invoice) == [("fixed_fee", 2000), ("usage", 2500), ("overage", 600), ("cap_waiver", -100)]
    assert (invoice.usage_spend_minor, invoice.commitment_spend_minor) == (3100, 5000)


def test_totals_by_currency_count_invoices_and_add_their_totals():
    usd, eur = plan(fee("20.00")), plan(fee("5.00"), currency="EUR", name="q")
    segs = [segment(usd, sub=subscription("s1", "c1")), segment(eur, sub=subscription("s2", "c2")),
            segment(usd, sub=subscription("s3", "c3"))]
    assert totals_by_currency(period_invoices(OCT, segs, {})) == [
        {"currency": "EUR", "invoices": 1, "total_minor": 500}, {"currency": "USD", "invoices": 2, "total_minor": 4000}]


def test_the_plan_view_is_each_subscriptions_last_segment():
    """A migration on Oct 16 moves s1 from v1 (half_up, USD) to v2 (half_even): its invoice-level
    lines, rounding and credits follow v2; s2 has one segment."""
    v1, v2 = plan(rounding="half_up"), plan(rounding="half_even", version=2)
    eur = plan(currency="EUR", name="q")
    s1, s2 = subscription("s1", "c1"), subscription("s2", "c2")
    segs = [segment(v1, end="2026-10-16", sub=s1, no=1), segment(v2, start="2026-10-16", sub=s1, no=2),
            segment(eur, sub=s2)]
    plans = subscription_plans(segs)
    assert plans.plan == {"s1": v2.plan, "s2": eur.plan}
    assert (plans.rounding, plans.currency) == ({"s1": "half_even", "s2": "half_up"}, {"s1": "USD", "s2": "EUR"})
    assert plans.plan_version == {"s1": ("p", 2), "s2": ("q", 1)}
    assert [[s.segment_no for s in ss] for ss in segments_by_subscription(segs).values()] == [[1, 2], [1]]


def test_every_lines_unrounded_amount_is_in_major_units():
    pf = plan(COMMITTED + 'spend_controls: {hard_cap: "10.00"}\n')
    invoice = one_invoice([segment(pf)], usage(("calls", {}, "25", 1)))
    for line in invoice.lines:
        assert to_minor(line.amount, "USD") == line.amount_minor, line.kind


# Several segments, several subscriptions -------------------------------------------------------

def test_migration_mid_period_prorates_each_version_and_labels_its_lines():
    v1, v2 = plan(fee("20.00"), version=1), plan(fee("30.00"), version=2)
    sub = subscription()
    segs = [segment(v1, "2026-11-01", "2026-11-20", NOV, sub, 1), segment(v2, "2026-11-20", "2026-12-01", NOV, sub, 2)]
    invoice = one_invoice(segs, period=NOV)
    # 20.00 x 19/30 = 12.666... -> 12.67; 30.00 x 11/30 = 11.00; 12.67 + 11.00 = 23.67
    assert [(line.description, line.amount_minor, line.plan_version, line.segment_no) for line in invoice.lines] == [
        ("Platform fee, 19 of 30 days [Nov 1-19, p v1]", 1267, 1, 1),
        ("Platform fee, 11 of 30 days [Nov 20-30, p v2]", 1100, 2, 2)]
    assert invoice.total_minor == 2367
    assert (invoice.service_start, invoice.service_end) == (date(2026, 11, 1), date(2026, 12, 1))


def test_one_invoice_has_one_currency():
    sub = subscription()
    segs = [segment(plan(fee("1"), "USD", version=1), "2026-11-01", "2026-11-20", NOV, sub, 1),
            segment(plan(fee("1"), "EUR", version=2), "2026-11-20", "2026-12-01", NOV, sub, 2)]
    with pytest.raises(InputError, match=r"subscription 's1'.*\['EUR', 'USD'\]"):
        period_invoices(NOV, segs, {})


def test_invoice_ids_are_gap_free_and_ordered_by_customer_then_subscription():
    pf = plan(fee("1.00"))
    subs = [subscription("s-b", "c2"), subscription("s-z", "c1"), subscription("s-a", "c2"), subscription("s-0", "c3")]
    segs = [segment(pf, sub=s) for s in subs]
    invoices = period_invoices(OCT, segs, {})
    assert [(i.invoice_id, i.customer_id, i.subscription_id) for i in invoices] == [
        ("INV-2026-10-000001", "c1", "s-z"), ("INV-2026-10-000002", "c2", "s-a"),
        ("INV-2026-10-000003", "c2", "s-b"), ("INV-2026-10-000004", "c3", "s-0")]
    assert [i.invoice_id for i in period_invoices(OCT, list(reversed(segs)), {})] == [i.invoice_id for i in invoices]


def test_invoice_header_fields():
    invoice = one_invoice([segment(plan(fee("1.00")), "2026-10-17")])
    assert (invoice.kind, invoice.period, invoice.issued_on, invoice.service_start, invoice.service_end,
            invoice.corrects_invoice_id) == ("invoice", "2026-10", date(2026, 11, 1), date(2026, 10, 17),
                                             date(2026, 11, 1), None)


# Tables ---------------------------------------------------------------------------------------

FULL = (fee("20.00") + charges(GPT, '{meter: calls, price: {model: package, package_size: 100, package_price: "5.00"}}',
                               '{meter: images, included: 10, price: {model: standard, unit_price: "0.05"}}')
        + 'spend_controls: {hard_cap: "9.00"}\ncommitment: {minimum: "100.00"}\n')


def rated(units: str = "150"):
    sub_a, sub_b = subscription("s1", "c1"), subscription("s2", "c2")
    pf = plan(FULL)
    segs = [segment(pf, sub=sub_a), segment(pf, "2026-10-17", sub=sub_b)]
    used = {**usage(("tokens", {"model": "gpt-4o", "region": "eu"}, units, 4), ("calls", {}, units, 2),
                    ("images", {}, units, 1)),
            **usage(("calls", {}, "1", 1), sid="s2")}
    return period_invoices(OCT, segs, used)


def test_tables_have_their_schemas_and_no_float_column():
    invoices = rated()
    for table, schema in ((invoices_table(invoices), INVOICE_SCHEMA), (lines_table(invoices), LINE_SCHEMA)):
        assert dict(table.schema) == schema
        assert not any(dtype in (pl.Float32, pl.Float64) for dtype in table.schema.values())
    assert invoices_table([]).height == lines_table([]).height == 0


def test_lines_table_numbers_lines_and_keeps_decimals_as_text():
    lines = lines_table(rated("0.5"))
    first = lines.filter(pl.col("invoice_id") == "INV-2026-10-000001")
    # fee 20.00; tokens 0.5 x 1.00 = 0.50; calls 0.5 -> 1 package = 5.00; images 0.5 of 10 included = 0.00;
    # 100.00 - 25.50 = true-up 74.50
    assert first.select("line_no", "kind", "quantity", "amount_minor").rows() == [
        (1, "fixed_fee", "31", 2000), (2, "usage", "0.5", 50), (3, "usage", "0.5", 500), (4, "overage", "0", 0),
        (5, "commitment_true_up", "1", 7450)]
    tokens = first.filter(pl.col("meter") == "tokens").row(0, named=True)
    assert (tokens["total_units"], tokens["amount"], tokens["included_units"]) == ("0.5", "0.5", None)
    images = first.filter(pl.col("meter") == "images").row(0, named=True)
    assert (images["total_units"], images["included_units"]) == ("0.5", "0.5")
    second = lines.filter(pl.col("invoice_id") == "INV-2026-10-000002")
    assert second["line_no"].to_list() == list(range(1, second.height + 1))


def test_invoice_total_is_the_sum_of_its_lines_in_the_tables():
    invoices = rated()
    per_invoice = lines_table(invoices).group_by("invoice_id").agg(pl.col("amount_minor").sum()).sort("invoice_id")
    totals = invoices_table(invoices).select("invoice_id", "total_minor").sort("invoice_id")
    assert per_invoice.rows() == totals.rows()


# Properties -----------------------------------------------------------------------------------

PROPERTY_PLAN = (fee("20.00") + charges(
    '{meter: tokens, group_by: [region], price: {model: graduated, per: 1000, tiers: '
    '[{up_to: 10000, unit_price: "0.30"}, {up_to: null, unit_price: "0.20", flat_fee: "1.00"}]}}',
    '{meter: calls, filter: {tier: gold}, price: {model: package, package_size: 100, package_price: "5.00"}}',
    '{meter: calls, filter: {tier: free}, included: 1000, price: {model: standard, unit_price: "0.001"}}',
    '{meter: storage, price: {model: volume, '
    'tiers: [{up_to: 100, unit_price: "0.10"}, {up_to: null, unit_price: "0.08"}]}}')
    + 'spend_controls: {hard_cap: "400.00"}\ncommitment: {minimum: "50.00"}\n')

quantities = st.decimals(min_value=0, max_value=10**7, places=3, allow_nan=False, allow_infinity=False)
dims = st.sampled_from([("tokens", {"region": "eu"}), ("tokens", {"region": "us"}), ("tokens", {}),
                        ("calls", {"tier": "gold"}), ("calls", {"tier": "free"}), ("storage", {})])
rows = st.lists(st.tuples(dims, quantities, st.integers(1, 1000)), max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_a=rows, rows_b=rows, currency=st.sampled_from(["USD", "JPY", "KWD"]),
       rounding=st.sampled_from(["half_up", "half_even"]), start_day=st.integers(1, 31))
def test_lines_sum_to_totals_amounts_are_ints_and_rerun_equals_run(rows_a, rows_b, currency, rounding, start_day):
    pf = plan(PROPERTY_PLAN, currency, rounding)
    sub_a, sub_b = subscription("s1", "c1"), subscription("s2", "c2")
    segs = [segment(pf, sub=sub_a), segment(pf, f"2026-10-{start_day:02d}", sub=sub_b)]

    def as_usage(rows_, sid):
        merged: dict = {}
        for (meter, d), q, n in rows_:  # usage_by_dims has one row per meter x dims
            key = (meter, json.dumps(d, sort_keys=True, separators=(",", ":")))
            u, c = merged.get(key, (D(0), 0))
            merged[key] = (u + q, c + n)
        return {(sid, 1): SegmentUsage(tuple((m, d, u, c) for (m, d), (u, c) in sorted(merged.items())))}

    used = {**as_usage(rows_a, "s1"), **as_usage(rows_b, "s2")}
    invoices = period_invoices(OCT, segs, used)
    for invoice in invoices:
        assert all(type(line.amount_minor) is int for line in invoice.lines)
        assert type(invoice.total_minor) is int
        assert invoice.total_minor == sum(line.amount_minor for line in invoice.lines)
        usage_minor = sum(line.amount_minor for line in invoice.lines
                          if line.kind in ("usage", "overage", "cap_waiver"))
        assert usage_minor <= to_minor(D("400.00"), currency, rounding)
    again = period_invoices(OCT, segs, used)
    assert invoices_table(again).equals(invoices_table(invoices))
    assert lines_table(again).equals(lines_table(invoices))


def test_an_allowance_is_per_period_not_per_segment():
    """A migration on Oct 16 splits the period: 300 requests before, 400 after, 500 included for
    the period. Segment 1 draws 300 of the 500; segment 2 gets the other 200 and pays for 200:
    200 x 0.04 = 8.00 (not 0.00, which giving each segment the full 500 would bill)."""
    v1 = plan(charges('{meter: requests, included: 500, price: {model: standard, unit_price: "0.04"}}'))
    v2 = plan(charges('{meter: requests, included: 500, price: {model: standard, unit_price: "0.04"}}'), version=2)
    segs = [segment(v1, end="2026-10-16", no=1), segment(v2, start="2026-10-16", no=2)]
    used = {**usage(("requests", {}, "300", 3), no=1), **usage(("requests", {}, "400", 4), no=2)}
    invoice = one_invoice(segs, used)
    assert amounts(invoice) == [("overage", 0), ("overage", 800)]
    assert [line.included_units for line in invoice.lines] == [D(300), D(200)]


def test_a_line_beyond_int64_minor_units_fails_in_one_line_not_a_traceback():
    """Events that each fit, summed past int64: 10^17 calls x $1.00 = 10^19 cents > 2^63 - 1."""
    from transforms.errors import InputError

    pf = plan(charges('{meter: calls, price: {model: standard, unit_price: "1.00"}}'))
    with pytest.raises(InputError, match=r"^subscription 's1': the line 'calls' exceeds the largest amount"):
        period_invoices(OCT, [segment(pf)], usage(("calls", {}, "100000000000000000", 1000000)))


SHARED = plan(fee("20") + charges(
    '{meter: calls, included: 100, price: {model: standard, unit_price: "0.01"}}',
    '{meter: tokens, price: {model: graduated, per: 1000, tiers: [{up_to: 10, unit_price: "0.5"}, '
    '{up_to: null, unit_price: "0.25", flat_fee: "1"}]}}',
    '{meter: images, group_by: [size], price: {model: package, package_size: 10, package_price: "2"}}',
    '{meter: exports, price: {model: volume, tiers: [{up_to: 5, unit_price: "1"}, {up_to: null, unit_price: "0.5"}]}}'),
    name="shared")
SHARED_V2 = plan(charges('{meter: calls, included: 50, price: {model: standard, unit_price: "0.02"}}'),
                 name="shared", version=2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.lists(st.tuples(st.sampled_from(["calls", "tokens", "images", "exports", "unpriced"]),
                       st.sampled_from([{}, {"size": "s"}, {"size": "l"}]),
                       st.sampled_from(["0", "0.000", "5", "5.000", "100", "150", "10000", "12345.5"]),
                       st.integers(0, 3)), max_size=4),
    st.booleans()), min_size=1, max_size=6))
def test_lines_of_equal_usage_shared_across_invoices_are_the_lines_rated_alone(subs):
    """A period rates a line of equal usage once and shares it (charge_lines' `made`): every
    invoice's lines, to the exact decimal, are those it gets when rated on its own."""
    segments, used = [], {}
    for i, (rows, migrated) in enumerate(subs):
        sub = subscription(f"s{i}", f"c{i}")
        if migrated:  # a second version from the 16th: the allowance carries across segments
            segments += [segment(SHARED, end="2026-10-16", sub=sub), segment(SHARED_V2, start="2026-10-16", sub=sub,
                                                                             no=2)]
        else:
            segments.append(segment(SHARED, sub=sub))
        used |= usage(*rows, sid=f"s{i}")
        if migrated:
            used |= usage(*rows, sid=f"s{i}", no=2)
    together = period_invoices(OCT, segments, used)
    alone = [inv for sid in sorted({s.subscription.subscription_id for s in segments})
             for inv in period_invoices(OCT, [s for s in segments if s.subscription.subscription_id == sid], used)]
    assert [(i.subscription_id, [repr(line) for line in i.lines]) for i in together] == \
        [(i.subscription_id, [repr(line) for line in i.lines]) for i in alone]
