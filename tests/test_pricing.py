"""Charge models: worked examples at the tier edges, invariants, and the checks on price blocks.

Each case id carries the arithmetic. Published examples cite their source next to the case: the
tiers are rewritten in billrun's plan shape, the totals are the source's own unless the comment
says they are worked here from the source's tiers.
"""
from __future__ import annotations

import typing
from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from transforms.inputs.plans import PlanError, parse_plan
from transforms.pricing import PRICE_MODELS, Price, Usage, rate
from transforms.pricing.base import fmt_units

PRICE = TypeAdapter(Price)


def price(**block):
    """A price block as a plan file writes it: money quoted, unit counts as integers."""
    return PRICE.validate_python(block)


def tiers(*rows):
    """(up_to, unit_price[, flat_fee]) rows -> graduated/volume tiers."""
    return [{"up_to": r[0], "unit_price": r[1], **({"flat_fee": r[2]} if len(r) > 2 else {})} for r in rows]


def events(*amounts: str) -> Usage:
    """Per-event money amounts in event-time order (what percentage models rate)."""
    quantities = tuple(D(a) for a in amounts)
    return Usage(sum(quantities, D(0)), len(quantities), quantities)


GRADUATED = price(model="graduated", tiers=tiers((10, "1.00"), (20, "0.50"), (None, "0.10")))
GRADUATED_FLAT = price(model="graduated", tiers=tiers((10, "1.00", "2.00"), (None, "0.50", "3.00")))
# The contract's example: output tokens at $10.00 per million up to 10M, then $8.00 per million.
GRADUATED_PER = price(model="graduated", per=1_000_000, tiers=tiers((10_000_000, "10.00"), (None, "8.00")))
# Stripe, "Set up tiered pricing" (docs.stripe.com/subscriptions/pricing-models/tiered-pricing):
# Typographic's fonts, 1-5 at 7 USD, 6-10 at 6.5 USD, 11+ at 6 USD.
STRIPE_TIERS = tiers((5, "7"), (10, "6.5"), (None, "6"))
# Lago, graduated charge model (getlago.com/docs/guide/plans/charges/charge-models/graduated):
# $1 for the first 100 calls, $0.50 for the next 100, $0.10 for any additional call.
LAGO_GRADUATED = price(model="graduated", tiers=tiers((100, "1"), (200, "0.50"), (None, "0.10")))
# OpenMeter's pricing-models guide as migrated to Kong's docs (Kong/developer.konghq.com#4888):
# first 1,000 units $0 with a $500 flat price, then $0.1 per unit.
OPENMETER_FLAT = price(model="graduated", tiers=tiers((1000, "0", "500"), (None, "0.1")))

VOLUME = price(model="volume", tiers=tiers((10, "1.00"), (20, "0.50"), (None, "0.10")))
VOLUME_FLAT = price(model="volume", tiers=tiers((10, "1.00", "2.00"), (None, "0.50", "3.00")))
VOLUME_PER = price(model="volume", per=1000, tiers=tiers((1000, "2.00"), (None, "1.00")))
# Lago, volume charge model (getlago.com/docs/guide/plans/charges/charge-models/volume).
LAGO_VOLUME = price(model="volume", tiers=tiers((10_000, "0.0010", "10"), (50_000, "0.0008", "10"),
                                                (100_000, "0.0006", "10"), (None, "0.0004", "10")))
# Orb, bulk pricing (docs.withorb.com, price configuration): $0.50 a unit up to 10 units, then
# every unit at $0.40 (Orb closes that tier at 1,000; billrun's last tier is open).
ORB_BULK = price(model="volume", tiers=tiers((10, "0.50"), (None, "0.40")))

PACKAGE = price(model="package", package_size=100, package_price="5.00")
# Orb, package pricing (docs.withorb.com, price configuration): package size 10 at $0.80.
ORB_PACKAGE = price(model="package", package_size=10, package_price="0.80")

# The contract's example: 1.2% + $0.10 a payment, the first 3 payments of the period free.
PERCENTAGE = price(model="percentage", rate="1.2", fixed_fee="0.10", free_events=3)
PERCENTAGE_NO_FREE = price(model="percentage", rate="1.2", fixed_fee="0.10")
PERCENTAGE_MIN_MAX = price(model="percentage", rate="1", min_fee="0.50", max_fee="5.00")
# Stripe's online card rate, 2.9% + $0.30, as in Lago's "Clone Stripe pricing" template
# (getlago.com/docs/templates/per-transaction/stripe).
STRIPE_CARD = price(model="percentage", rate="2.9", fixed_fee="0.30")

# Lago, graduated percentage (getlago.com/docs/guide/plans/charges/charge-models/graduated-percentage):
# 1% + $200 flat up to 1,000; 2% + $300 flat up to 10,000; 3% + $400 flat above.
LAGO_GRAD_PERCENT = price(model="graduated_percentage", tiers=[
    {"up_to": 1000, "rate": "1", "flat_fee": "200"},
    {"up_to": 10_000, "rate": "2", "flat_fee": "300"},
    {"up_to": None, "rate": "3", "flat_fee": "400"}])


def units(n) -> Usage:
    return Usage(D(n))


CASES = [
    # graduated, 10 at 1.00 / 10 more at 0.50 / then 0.10
    pytest.param(GRADUATED, units(0), "0", id="graduated 0 units: no tier reached = 0.00"),
    pytest.param(GRADUATED, units(1), "1.00", id="graduated 1 unit: 1x1.00 = 1.00"),
    pytest.param(GRADUATED, units(10), "10.00", id="graduated 10 units: 10x1.00 = 10.00"),
    pytest.param(GRADUATED, units(11), "10.50", id="graduated 11 units: 10x1.00 + 1x0.50 = 10.50"),
    pytest.param(GRADUATED, units(20), "15.00", id="graduated 20 units: 10x1.00 + 10x0.50 = 15.00"),
    pytest.param(GRADUATED, units(21), "15.10", id="graduated 21 units: 10x1.00 + 10x0.50 + 1x0.10 = 15.10"),
    pytest.param(GRADUATED, units("10.5"), "10.25", id="graduated 10.5 units: 10x1.00 + 0.5x0.50 = 10.25"),
    pytest.param(GRADUATED_FLAT, units(0), "0",
                 id="graduated flat fees 0 units: no tier reached, no flat fee = 0.00"),
    pytest.param(GRADUATED_FLAT, units(1), "3.00", id="graduated flat fees 1 unit: 1x1.00 + 2.00 = 3.00"),
    pytest.param(GRADUATED_FLAT, units(10), "12.00", id="graduated flat fees 10 units: 10x1.00 + 2.00 = 12.00"),
    pytest.param(GRADUATED_FLAT, units(11), "15.50",
                 id="graduated flat fees 11 units: 10x1.00 + 2.00 + 1x0.50 + 3.00 = 15.50"),
    pytest.param(GRADUATED_PER, units(1500), "0.015",
                 id="graduated per 1M 1,500 units: 1,500x10.00/1,000,000 = 0.015"),
    pytest.param(GRADUATED_PER, units(10_000_000), "100.00",
                 id="graduated per 1M 10,000,000 units: 10,000,000x10.00/1,000,000 = 100.00"),
    pytest.param(GRADUATED_PER, units(10_000_001), "100.000008",
                 id="graduated per 1M 10,000,001 units: 100.00 + 1x8.00/1,000,000 = 100.000008"),
    pytest.param(GRADUATED_PER, units(12_000_000), "116.00",
                 id="graduated per 1M 12,000,000 units: 100.00 + 2,000,000x8.00/1,000,000 = 116.00"),
    # Stripe: "5 fonts result in the same charge as volume-based pricing: 35 USD".
    pytest.param(price(model="graduated", tiers=STRIPE_TIERS), units(5), "35",
                 id="graduated Stripe fonts 5: 5x7 = 35"),
    # Worked here from Stripe's tiers.
    pytest.param(price(model="graduated", tiers=STRIPE_TIERS), units(6), "41.5",
                 id="graduated Stripe fonts 6: 5x7 + 1x6.5 = 41.50"),
    pytest.param(price(model="graduated", tiers=STRIPE_TIERS), units(20), "127.5",
                 id="graduated Stripe fonts 20: 5x7 + 5x6.5 + 10x6 = 127.50"),
    # Worked here from Lago's tiers.
    pytest.param(LAGO_GRADUATED, units(250), "155",
                 id="graduated Lago API calls 250: 100x1 + 100x0.50 + 50x0.10 = 155.00"),
    # OpenMeter: "(1000 * $0 + $500) + (1000 * $0.1 + $0) = $500 + $100 = $600".
    pytest.param(OPENMETER_FLAT, units(2000), "600",
                 id="graduated OpenMeter 2,000 units: 1,000x0 + 500 + 1,000x0.1 = 600.00"),
    # OpenMeter bills the $500 at 0 units; billrun charges a flat fee only when the tier is reached.
    pytest.param(OPENMETER_FLAT, units(0), "0",
                 id="graduated OpenMeter 0 units: first tier not reached, no flat fee = 0.00"),

    # volume, same tiers: the tier the total lands in prices every unit
    pytest.param(VOLUME, units(0), "0", id="volume 0 units: 0x1.00 = 0.00"),
    pytest.param(VOLUME, units(1), "1.00", id="volume 1 unit: 1x1.00 = 1.00"),
    pytest.param(VOLUME, units(10), "10.00", id="volume 10 units: 10x1.00 = 10.00"),
    pytest.param(VOLUME, units(11), "5.50", id="volume 11 units: all in tier 2, 11x0.50 = 5.50"),
    pytest.param(VOLUME, units(20), "10.00", id="volume 20 units: 20x0.50 = 10.00"),
    pytest.param(VOLUME, units(21), "2.10", id="volume 21 units: all in tier 3, 21x0.10 = 2.10"),
    pytest.param(VOLUME, units("10.5"), "5.25", id="volume 10.5 units: above 10, 10.5x0.50 = 5.25"),
    pytest.param(VOLUME_FLAT, units(0), "0", id="volume flat fees 0 units: no tier reached = 0.00"),
    pytest.param(VOLUME_FLAT, units(1), "3.00", id="volume flat fees 1 unit: 1x1.00 + 2.00 = 3.00"),
    pytest.param(VOLUME_FLAT, units(10), "12.00", id="volume flat fees 10 units: 10x1.00 + 2.00 = 12.00"),
    pytest.param(VOLUME_FLAT, units(11), "8.50", id="volume flat fees 11 units: 11x0.50 + 3.00 = 8.50"),
    pytest.param(VOLUME_PER, units(1000), "2.00", id="volume per 1,000 1,000 units: 1,000x2.00/1,000 = 2.00"),
    pytest.param(VOLUME_PER, units(1500), "1.50", id="volume per 1,000 1,500 units: 1,500x1.00/1,000 = 1.50"),
    # Stripe's volume table: 1 -> 7 USD, 5 -> 35, 6 -> 39, 20 -> 120, 25 -> 150.
    pytest.param(price(model="volume", tiers=STRIPE_TIERS), units(1), "7", id="volume Stripe fonts 1: 1x7 = 7"),
    pytest.param(price(model="volume", tiers=STRIPE_TIERS), units(5), "35", id="volume Stripe fonts 5: 5x7 = 35"),
    pytest.param(price(model="volume", tiers=STRIPE_TIERS), units(6), "39",
                 id="volume Stripe fonts 6: 6x6.5 = 39"),
    pytest.param(price(model="volume", tiers=STRIPE_TIERS), units(20), "120",
                 id="volume Stripe fonts 20: 20x6 = 120"),
    pytest.param(price(model="volume", tiers=STRIPE_TIERS), units(25), "150",
                 id="volume Stripe fonts 25: 25x6 = 150"),
    # Lago: "65,000 API calls would cost 65,000 x $0.0006 + $10 = $49".
    pytest.param(LAGO_VOLUME, units(65_000), "49", id="volume Lago 65,000 calls: 65,000x0.0006 + 10 = 49.00"),
    # Orb: at most 10 units, "$0.50 for a total of $5.00"; above, "101 units total would be $40.40".
    pytest.param(ORB_BULK, units(10), "5.00", id="volume Orb bulk 10 units: 10x0.50 = 5.00"),
    pytest.param(ORB_BULK, units(101), "40.40", id="volume Orb bulk 101 units: 101x0.40 = 40.40"),

    # package, 100 units for 5.00: a started package is a whole package
    pytest.param(PACKAGE, units(0), "0", id="package 0 units: no package started = 0.00"),
    pytest.param(PACKAGE, units(1), "5.00", id="package 1 unit: starts 1 package, 1x5.00 = 5.00"),
    pytest.param(PACKAGE, units("0.5"), "5.00", id="package 0.5 units: starts 1 package, 1x5.00 = 5.00"),
    pytest.param(PACKAGE, units(100), "5.00", id="package 100 units: 1 package, 1x5.00 = 5.00"),
    pytest.param(PACKAGE, units(101), "10.00", id="package 101 units: 2 packages, 2x5.00 = 10.00"),
    pytest.param(PACKAGE, units(200), "10.00", id="package 200 units: 2 packages, 2x5.00 = 10.00"),
    pytest.param(PACKAGE, units(201), "15.00", id="package 201 units: 3 packages, 3x5.00 = 15.00"),
    # Lago (getlago.com/docs/guide/plans/charges/charge-models/package): $5 per 100 units, the
    # first 100 free, "201 units would cost $0 + $5 + $5 = $10"; the caller subtracts `included`.
    pytest.param(PACKAGE, units(201 - 100), "10",
                 id="package Lago 201 units, 100 included: 101 billable = 2 packages, 2x5 = 10.00"),
    # Orb: "4 units will be billed as 10 and 11 units will be billed at 20".
    pytest.param(ORB_PACKAGE, units(4), "0.80", id="package Orb 4 units: 1 package of 10, 1x0.80 = 0.80"),
    pytest.param(ORB_PACKAGE, units(11), "1.60", id="package Orb 11 units: 2 packages of 10, 2x0.80 = 1.60"),

    # percentage, 1.2% + 0.10 per event, first 3 events of the period free
    pytest.param(PERCENTAGE, events(), "0", id="percentage no events = 0.00"),
    pytest.param(PERCENTAGE, events("50"), "0", id="percentage 1 event: inside the 3 free events = 0.00"),
    # Lago (getlago.com/docs/guide/plans/charges/charge-models/percentage): with 3 free events,
    # a fourth transaction of $50 costs "$0.10 x 1 event + 1.2% of $50 = $0.70".
    pytest.param(PERCENTAGE, events("200", "100", "100", "50"), "0.70",
                 id="percentage Lago 4 events: 3 free + 50x1.2% + 0.10 = 0.70"),
    pytest.param(PERCENTAGE, events("200", "100", "100", "50", "100"), "2.00",
                 id="percentage 5 events: 3 free + 150x1.2% + 2x0.10 = 2.00"),
    pytest.param(PERCENTAGE_NO_FREE, events("50", "0"), "0.80",
                 id="percentage 2 events, one of 0: 50x1.2% + 2x0.10 = 0.80"),
    pytest.param(PERCENTAGE_NO_FREE, Usage(D(1000), 4), "12.40",
                 id="percentage total of 4 events, no per-event rules: 1,000x1.2% + 4x0.10 = 12.40"),
    pytest.param(PERCENTAGE, Usage(D(0), 5), "0.20",
                 id="percentage 5 events of 0: 3 free + 0x1.2% + 2x0.10 = 0.20"),
    # `included` is an amount here: the caller bills 500 - 100 and the allowance covers the earliest amounts.
    pytest.param(PERCENTAGE_NO_FREE, Usage(D(400), 2, (D(200), D(300))), "5.00",
                 id="percentage 500 with 100 included: (500-100)x1.2% + 2x0.10 = 5.00"),
    pytest.param(PERCENTAGE_MIN_MAX, events("10", "100", "1000"), "6.50",
                 id="percentage min 0.50 max 5.00: 10x1%=0.10->0.50 + 100x1%=1.00 + 1,000x1%=10.00->5.00 = 6.50"),
    pytest.param(PERCENTAGE_MIN_MAX, events("50", "500"), "5.50",
                 id="percentage min 0.50 max 5.00 at the bounds: 50x1% = 0.50 + 500x1% = 5.00 = 5.50"),
    pytest.param(STRIPE_CARD, events("100"), "3.20", id="percentage Stripe card $100: 100x2.9% + 0.30 = 3.20"),

    # graduated percentage, Lago's tiers: cumulative totals of its three transactions
    pytest.param(LAGO_GRAD_PERCENT, units(0), "0", id="graduated_percentage 0: no tier reached = 0.00"),
    # Lago: "A first transaction at $500 would cost (500 units x 1%) + $200 flat fee = $205.00".
    pytest.param(LAGO_GRAD_PERCENT, units(500), "205",
                 id="graduated_percentage Lago $500: 500x1% + 200 = 205.00"),
    pytest.param(LAGO_GRAD_PERCENT, units(1000), "210",
                 id="graduated_percentage $1,000: 1,000x1% + 200 = 210.00"),
    # Lago: the second transaction, $550, adds "[(500 x 1%) + (50 x 2%)] + $300 = $306.00".
    pytest.param(LAGO_GRAD_PERCENT, units(1050), "511",
                 id="graduated_percentage Lago $1,050: 1,000x1% + 200 + 50x2% + 300 = 511.00"),
    # Lago: the third, $4,000, adds "(4,000 x 2%) = $80.00".
    pytest.param(LAGO_GRAD_PERCENT, units(5050), "591",
                 id="graduated_percentage Lago $5,050: 1,000x1% + 200 + 4,050x2% + 300 = 591.00"),
    pytest.param(LAGO_GRAD_PERCENT, units(10_001), "1090.03",
                 id="graduated_percentage $10,001: 1,000x1% + 200 + 9,000x2% + 300 + 1x3% + 400 = 1,090.03"),
]


@pytest.mark.parametrize("price_block, usage, expected", CASES)
def test_worked_example(price_block, usage, expected):
    rating = rate(price_block, usage)
    assert rating.amount == D(expected)
    assert sum((s.amount for s in rating.steps), D(0)) == rating.amount


def test_steps_read_as_invoice_lines():
    rating = rate(GRADUATED_FLAT, units(11))
    assert [s.label for s in rating.steps] == [
        "tier 1 (first 10): 10 units at 1.00", "tier 1 (first 10): flat fee",
        "tier 2 (11 and up): 1 units at 0.50", "tier 2 (11 and up): flat fee"]
    assert [s.label for s in rate(PACKAGE, units(101)).steps] == ["2 packages of 100 units at 5.00 (101 units)"]
    assert [s.label for s in rate(PERCENTAGE, events("200", "100", "100", "50")).steps] == [
        "3 free events (400)", "1.2% of 50", "fixed fee: 1 events at 0.10"]


def test_percentage_needs_events_for_per_event_rules():
    with pytest.raises(ValueError, match="event_quantities"):
        rate(PERCENTAGE, Usage(D(100), 2))
    with pytest.raises(ValueError, match="event_quantities"):
        rate(PERCENTAGE_MIN_MAX, Usage(D(100), 2))


def test_percentage_refuses_events_that_add_up_to_less_than_the_units():
    with pytest.raises(ValueError, match="add up to 50"):
        rate(PERCENTAGE_NO_FREE, Usage(D(60), 1, (D(50),)))


# Invariants -----------------------------------------------------------------------------------

MONEY = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False)
UNITS = st.decimals(min_value=0, max_value=10**7, places=3, allow_nan=False, allow_infinity=False)
PER = st.sampled_from([1, 1000, 1_000_000])


@st.composite
def unit_tiers(draw) -> list[dict]:
    bounds = sorted(draw(st.sets(st.integers(1, 10**6), max_size=4)))
    return [{"up_to": b, "unit_price": draw(MONEY), "flat_fee": draw(MONEY)} for b in [*bounds, None]]


@settings(deadline=None)
@given(unit_tiers(), PER, UNITS, UNITS)
def test_graduated_never_decreases_as_units_grow(tier_rows, per, a, b):
    p = price(model="graduated", per=per, tiers=tier_rows)
    low, high = sorted([a, b])
    assert rate(p, Usage(low)).amount <= rate(p, Usage(high)).amount


@settings(deadline=None)
@given(MONEY, MONEY, PER, UNITS)
def test_volume_equals_graduated_with_one_tier(unit_price, flat_fee, per, n):
    block = {"per": per, "tiers": [{"up_to": None, "unit_price": unit_price, "flat_fee": flat_fee}]}
    usage = Usage(n)
    assert rate(price(model="volume", **block), usage).amount == rate(price(model="graduated", **block), usage).amount


@settings(deadline=None)
@given(MONEY, st.integers(0, 10**9))
def test_package_of_one_equals_standard(unit_price, n):
    usage = Usage(D(n))
    package = price(model="package", package_size=1, package_price=unit_price)
    standard = price(model="standard", unit_price=unit_price)
    assert rate(package, usage).amount == rate(standard, usage).amount


@settings(deadline=None)
@given(st.decimals(min_value=0, max_value=100, places=3, allow_nan=False, allow_infinity=False), MONEY,
       st.lists(st.decimals(min_value=0, max_value=10**6, places=2, allow_nan=False, allow_infinity=False),
                max_size=20))
def test_percentage_is_rate_of_total_plus_fixed_fees(percent, fixed_fee, amounts):
    p = price(model="percentage", rate=percent, fixed_fee=fixed_fee)
    total = sum(amounts, D(0))
    expected = total * percent / 100 + fixed_fee * len(amounts)
    assert rate(p, Usage(total, len(amounts), tuple(amounts))).amount == expected
    assert rate(p, Usage(total, len(amounts))).amount == expected  # the same, from the total alone


@settings(deadline=None)
@given(unit_tiers(), PER, UNITS, st.sampled_from(["graduated", "volume"]))
def test_steps_add_up_to_the_amount(tier_rows, per, n, model):
    rating = rate(price(model=model, per=per, tiers=tier_rows), Usage(n))
    assert sum((s.amount for s in rating.steps), D(0)) == rating.amount


# Plan files -----------------------------------------------------------------------------------

PLAN = """\
plan: api
version: 1
effective_from: 2026-09-01
currency: USD
charges:
  - meter: calls
    price: {block}
"""


def test_every_model_loads_from_a_plan_file():
    text = PLAN.format(block='{model: package, package_size: 100, package_price: "5.00"}') + """\
  - meter: output_tokens
    price:
      model: graduated
      per: 1000000
      tiers:
        - {up_to: 10000000, unit_price: "10.00"}
        - {up_to: null, unit_price: "8.00", flat_fee: "0"}
  - meter: storage_gb
    price:
      model: volume
      tiers:
        - {up_to: 100, unit_price: "0.10"}
        - {up_to: null, unit_price: "0.08"}
  - meter: payments
    price: {model: percentage, rate: "1.2", fixed_fee: "0.10", free_events: 3, min_fee: "0.20", max_fee: "5"}
  - meter: payouts
    price:
      model: graduated_percentage
      tiers:
        - {up_to: 1000, rate: "1", flat_fee: "200"}
        - {up_to: null, rate: "2"}
"""
    models = [c.price.model for c in parse_plan(text, "plans/api-v1.yaml").plan.charges]
    assert models == ["package", "graduated", "volume", "percentage", "graduated_percentage"]


BAD_BLOCKS = [
    pytest.param('{model: graduated, tiers: [{up_to: 100, unit_price: "1"}, {up_to: 100, unit_price: "0.5"}, '
                 '{up_to: null, unit_price: "0.1"}]}',
                 "charges[0].price.tiers[1].up_to: 100 is not above the previous tier's 100; "
                 "tiers must be contiguous and increasing", id="graduated bound not increasing"),
    pytest.param('{model: graduated, tiers: [{up_to: 0, unit_price: "1"}, {up_to: null, unit_price: "0.5"}]}',
                 "charges[0].price.tiers[0].up_to: 0 is not above 0", id="graduated first bound 0"),
    pytest.param('{model: volume, tiers: [{up_to: null, unit_price: "1"}, {up_to: null, unit_price: "0.5"}]}',
                 "charges[0].price.tiers[0].up_to: only the last tier may be open", id="volume open middle tier"),
    pytest.param('{model: volume, tiers: [{up_to: 10, unit_price: "1"}, {up_to: 20, unit_price: "0.5"}]}',
                 "charges[0].price.tiers[1].up_to: the last tier must be open (up_to: null)",
                 id="volume closed last tier"),
    pytest.param('{model: graduated, tiers: []}', "charges[0].price.tiers: at least one tier is needed",
                 id="graduated no tiers"),
    pytest.param('{model: graduated, tiers: [{unit_price: "1"}]}', "charges[0].price.tiers[0].up_to: required",
                 id="graduated up_to missing"),
    pytest.param('{model: graduated, tiers: [{up_to: null, unit_price: "-1"}]}',
                 "charges[0].price.tiers[0].unit_price: must not be negative", id="graduated negative price"),
    pytest.param('{model: volume, tiers: [{up_to: null, unit_price: "1", flat_fee: "-5"}]}',
                 "charges[0].price.tiers[0].flat_fee: must not be negative", id="volume negative flat fee"),
    pytest.param('{model: volume, tiers: [{up_to: null, unit_price: 0.1}]}',
                 "charges[0].price.tiers[0].unit_price: quote money as a string", id="volume float price"),
    pytest.param('{model: graduated, per: 0, tiers: [{up_to: null, unit_price: "1"}]}',
                 "charges[0].price.per: per must be a positive number of units", id="graduated per 0"),
    pytest.param('{model: graduated, tiers: [{up_to: 1.5, unit_price: "1"}, {up_to: null, unit_price: "1"}]}',
                 "charges[0].price.tiers[0].up_to: write unit counts as integers", id="graduated float bound"),
    pytest.param('{model: package, package_size: 0, package_price: "5"}',
                 "charges[0].price.package_size: package_size must be a positive number", id="package size 0"),
    pytest.param('{model: package, package_size: 100, package_price: "-5"}',
                 "charges[0].price.package_price: package_price must not be negative", id="package negative price"),
    pytest.param('{model: package, package_size: 100, package_price: "5", per: 10}',
                 "charges[0].price.per: unknown field", id="package has no per"),
    pytest.param('{model: percentage, rate: "120"}',
                 "charges[0].price.rate: rate is a percent of the amount between 0 and 100", id="percentage rate 120"),
    pytest.param('{model: percentage, rate: "1.2", free_events: -1}',
                 "charges[0].price.free_events: free_events is a number of events: 0 or more",
                 id="percentage negative free events"),
    pytest.param('{model: percentage, rate: "1.2", free_events: 3.0}',
                 "charges[0].price.free_events: Input should be a valid integer", id="percentage float free events"),
    pytest.param('{model: percentage, rate: "1.2", min_fee: "0.50", max_fee: "0.10"}',
                 "charges[0].price.max_fee: 0.10 is below min_fee 0.50", id="percentage max below min"),
    pytest.param('{model: percentage, rate: "1.2", fixed_fee: "-0.10"}',
                 "charges[0].price.fixed_fee: must not be negative", id="percentage negative fixed fee"),
    pytest.param('{model: graduated_percentage, tiers: [{up_to: 1000, rate: "1"}, {up_to: 500, rate: "2"}, '
                 '{up_to: null, rate: "3"}]}',
                 "charges[0].price.tiers[1].up_to: 500 is not above the previous tier's 1000",
                 id="graduated_percentage bound decreasing"),
    pytest.param('{model: graduated_percentage, tiers: [{up_to: null, rate: "101"}]}',
                 "charges[0].price.tiers[0].rate: rate is a percent", id="graduated_percentage rate 101"),
    pytest.param('{model: tiered, tiers: []}', "charges[0].price: unknown price model 'tiered'; use one of "
                 "['graduated', 'graduated_percentage', 'package', 'percentage', 'standard', 'volume']",
                 id="unknown model"),
]


@pytest.mark.parametrize("block, message", BAD_BLOCKS)
def test_bad_price_block_is_refused_naming_the_field(block, message):
    with pytest.raises(PlanError) as refused:
        parse_plan(PLAN.format(block=block), "plans/api-v1.yaml")
    assert str(refused.value).startswith(f"plans/api-v1.yaml: {message}")


@pytest.mark.parametrize("key", sorted(PRICE_MODELS))
def test_registry_key_is_the_model_literal(key):
    assert typing.get_args(PRICE_MODELS[key].Price.model_fields["model"].annotation) == (key,)


@pytest.mark.parametrize("value, text", [(D("1000000"), "1,000,000"), (D("1E+6"), "1,000,000"), (D("2.50"), "2.5"),
                                         (D("12345.000"), "12,345"), (D("-0"), "0"), (D("0.000"), "0"),
                                         (D("-1234.5"), "-1,234.5"), (D("0.0000025"), "0.0000025")])
def test_units_text_examples(value, text):
    assert fmt_units(value) == text


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_units_text_of_a_whole_number_is_its_int_digits(value):
    """fmt_units formats with Decimal's `,f` only: a whole number gives what an int would."""
    normalized = value.normalize()
    expected = f"{int(normalized):,}" if normalized == normalized.to_integral_value() else f"{normalized:,f}"
    assert fmt_units(value) == expected
