"""Published worked examples, to the cent, through a real close.

tests/test_pricing.py checks the arithmetic of each charge model by calling `rate()`. This module
checks that the same published examples come out on the invoices of a real close: plan files on
disk, usage CSVs in a store, the Prefect flow (`closeutil.close`), and invoices.parquet /
invoice_lines.parquet read back. So aggregation over several events and objects, allowances,
filters, per-event ordering, fixed fees, commitments, currency exponents and the one rounding per
line are all on the path.

One store holds one customer, one subscription and one plan file per example, all closed once for
2026-10. Each case id carries the published arithmetic; the comment above each example cites its
source. Where the total is worked here from the source's prices (not the source's own total), the
comment says so.
"""
from __future__ import annotations

import csv
import io
import json
import textwrap
from dataclasses import dataclass, field
from decimal import Decimal as D

import polars as pl
import pytest

from closeutil import close, table
from flows.store import open_store

PERIOD = "2026-10"


@dataclass(frozen=True)
class Event:
    quantity: str                     # a decimal string, as the usage CSV carries it
    at: str                           # UTC instant inside the period
    dims: dict[str, str] = field(default_factory=dict)
    object: str = "events"            # usage/<example>/<object>.csv


@dataclass(frozen=True)
class Example:
    key: str                          # plan id, customer_id and usage folder: one of each per example
    arithmetic: str                   # the published arithmetic: the pytest id
    plan: str                         # the plan file after its header (fixed_fees, charges, commitment)
    meter: str
    events: tuple[Event, ...]
    total_minor: int
    lines: tuple[tuple[str, str, int], ...]   # (kind, quantity, amount_minor), in line order
    currency: str = "USD"
    rounding: str = "half_up"


def at(day: int, hour: int = 12) -> str:
    return f"2026-10-{day:02d}T{hour:02d}:00:00Z"


def events(*quantities: str, first_day: int = 2) -> tuple[Event, ...]:
    """One event per quantity, a day apart, so no two share a timestamp."""
    return tuple(Event(q, at(first_day + i)) for i, q in enumerate(quantities))


EXAMPLES = [
    # Stripe, "Set up tiered pricing" (docs.stripe.com/subscriptions/pricing-models/tiered-pricing):
    # Typographic's fonts, 1-5 at 7 USD, 6-10 at 6.5 USD, 11+ at 6 USD; volume: "For December,
    # Typographic charges 39 USD (6 x 6.5 USD)". Two events (2 + 4 fonts): volume prices the
    # period's total, so pricing each event alone (2x7 + 4x7 = 42) would be wrong.
    Example("stripe-volume", "volume Stripe fonts 2+4=6: 6x6.5 = 39.00", meter="fonts", plan="""\
        charges:
          - name: Fonts
            meter: fonts
            price:
              model: volume
              tiers:
                - {up_to: 5, unit_price: "7"}
                - {up_to: 10, unit_price: "6.5"}
                - {up_to: null, unit_price: "6"}
        """,
            events=events("2", "4"), total_minor=3900, lines=(("usage", "6", 3900),)),
    # Stripe, same page and tiers, graduated; the total is worked here from Stripe's tiers.
    Example("stripe-graduated", "graduated Stripe fonts 5+5+10=20: 5x7 + 5x6.5 + 10x6 = 127.50", meter="fonts",
            plan="""\
        charges:
          - name: Fonts
            meter: fonts
            price:
              model: graduated
              tiers:
                - {up_to: 5, unit_price: "7"}
                - {up_to: 10, unit_price: "6.5"}
                - {up_to: null, unit_price: "6"}
        """,
            events=events("5", "5", "10"), total_minor=12750, lines=(("usage", "20", 12750),)),
    # Stripe's card rates as in Lago's "Clone Stripe pricing" template
    # (getlago.com/docs/templates/per-transaction/stripe): online 2.9% + $0.30, in-person 2.7% + $0.05,
    # told apart by a `type` dimension (the template's filters). Totals worked here from those rates.
    Example("stripe-card", "percentage Stripe card $100 online: 100x2.9% + 0.30 = 3.20; "
                           "$100 in person: 100x2.7% + 0.05 = 2.75; total 5.95", meter="payments", plan="""\
        charges:
          - name: Card payments (online)
            meter: payments
            filter: {type: online}
            price: {model: percentage, rate: "2.9", fixed_fee: "0.30"}
          - name: Card payments (in person)
            meter: payments
            filter: {type: in_person}
            price: {model: percentage, rate: "2.7", fixed_fee: "0.05"}
        """,
            events=(Event("100.00", at(5), {"type": "online"}), Event("100.00", at(6), {"type": "in_person"})),
            total_minor=595, lines=(("usage", "100", 320), ("usage", "100", 275))),
    # Stripe, "Set up a pay-as-you-go pricing model" (docs.stripe.com/billing/subscriptions/
    # usage-based/implementation-guide): Llama AI charges 0.04 USD per 100 tokens. Total worked here;
    # the tokens are a whole number of hundreds, so Stripe's package rounding and billrun's exact
    # `per` agree.
    Example("stripe-tokens", "standard per 100 tokens 100,000+23,400: 123,400x0.04/100 = 49.36", meter="tokens",
            plan="""\
        charges:
          - name: Tokens
            meter: tokens
            price: {model: standard, unit_price: "0.04", per: 100}
        """,
            events=events("100000", "23400"), total_minor=4936, lines=(("usage", "123400", 4936),)),
    # The contract's own example (CONTRACT.md, plan files): GPT-4o input tokens at $2.50 per 1M;
    # `per` is exact, not whole blocks, so the line is rounded once, at the end.
    Example("contract-tokens", "standard per 1M tokens 1,234,567: x2.50/1,000,000 = 3.0864175 -> 3.09",
            meter="input_tokens", plan="""\
        charges:
          - name: gpt-4o input tokens
            meter: input_tokens
            price: {model: standard, unit_price: "2.50", per: 1000000}
        """,
            events=events("1000000", "234567"), total_minor=309, lines=(("usage", "1234567", 309),)),
    # Lago, package (getlago.com/docs/guide/plans/charges/charge-models/package): $5 per 100 units,
    # the first 100 free: "201 units would cost $0 + $5 + $5 = $10".
    Example("lago-package", "package Lago 120+81=201 units, 100 included: 101 billable = 2 packages x5 = 10.00",
            meter="api_calls", plan="""\
        charges:
          - name: API calls
            meter: api_calls
            included: 100
            price: {model: package, package_size: 100, package_price: "5"}
        """,
            events=events("120", "81"), total_minor=1000, lines=(("overage", "101", 1000),)),
    # Lago, percentage (getlago.com/docs/guide/plans/charges/charge-models/percentage): 1.2% + $0.10,
    # the first 3 events free; transactions of $200, $100, $100, $50: "for the fourth transaction,
    # the charge will be $0.10 x 1 event + 1.2% of $50 = $0.70". The events are written so that
    # neither file order, object order nor event_id order is event-time order: the $50 one is
    # first in every one of them and last in time. Free by file order would bill $100: 1.30.
    Example("lago-percentage", "percentage Lago free events 200,100,100 then 50: 3 free + 50x1.2% + 0.10 = 0.70",
            meter="transactions", plan="""\
        charges:
          - name: Transactions
            meter: transactions
            price: {model: percentage, rate: "1.2", fixed_fee: "0.10", free_events: 3}
        """,
            events=(Event("50", at(20), object="a-late"), Event("100", at(9), object="a-late"),
                    Event("200", at(2), object="b-early"), Event("100", at(5), object="b-early")),
            total_minor=70, lines=(("usage", "450", 70),)),
    # Lago, "Minimum / Maximum per transaction" (getlago.com/changelog/minimum-maximum-price-per-transaction,
    # Lago product update #25): 1% + $0.50 a transaction, minimum $1, maximum $5: "A $20 transaction
    # will cost $1 ($20 x 1% + $0.50 = $0.70, so the minimum applies)" and "A $600 transaction will
    # cost $5 ($600 x 1% + $0.50 = $6.50, so the maximum applies)".
    Example("lago-min-max", "percentage Lago min 1 max 5: $20 -> 0.70 -> 1.00 + $600 -> 6.50 -> 5.00 = 6.00",
            meter="transactions", plan="""\
        charges:
          - name: Transactions
            meter: transactions
            price: {model: percentage, rate: "1", fixed_fee: "0.50", min_fee: "1", max_fee: "5"}
        """,
            events=events("20", "600"), total_minor=600, lines=(("usage", "620", 600),)),
    # Lago, graduated percentage (getlago.com/docs/guide/plans/charges/charge-models/graduated-percentage):
    # 1% + $200 flat up to 1,000; 2% + $300 up to 10,000; 3% + $400 above. Transactions of $500
    # ("$205.00"), $550 ("$306.00") and $4,000 ("$80.00"): 205 + 306 + 80 = 591.
    Example("lago-graduated-percentage",
            "graduated_percentage Lago 500+550+4,000: 1,000x1% + 200 + 4,050x2% + 300 = 205 + 306 + 80 = 591.00",
            meter="transfers", plan="""\
        charges:
          - name: Transfers
            meter: transfers
            price:
              model: graduated_percentage
              tiers:
                - {up_to: 1000, rate: "1", flat_fee: "200"}
                - {up_to: 10000, rate: "2", flat_fee: "300"}
                - {up_to: null, rate: "3", flat_fee: "400"}
        """,
            events=events("500", "550", "4000"), total_minor=59100, lines=(("usage", "5050", 59100),)),
    # Lago, volume (getlago.com/docs/guide/plans/charges/charge-models/volume):
    # "65,000 API calls would cost 65,000 x $0.0006 + $10 = $49".
    Example("lago-volume", "volume Lago 30,000+35,000=65,000 calls: 65,000x0.0006 + 10 = 49.00", meter="api_calls",
            plan="""\
        charges:
          - name: API calls
            meter: api_calls
            price:
              model: volume
              tiers:
                - {up_to: 10000, unit_price: "0.0010", flat_fee: "10"}
                - {up_to: 50000, unit_price: "0.0008", flat_fee: "10"}
                - {up_to: 100000, unit_price: "0.0006", flat_fee: "10"}
                - {up_to: null, unit_price: "0.0004", flat_fee: "10"}
        """,
            events=events("30000", "35000"), total_minor=4900, lines=(("usage", "65000", 4900),)),
    # Lago, graduated (getlago.com/docs/guide/plans/charges/charge-models/graduated): $1 for the first
    # 100 calls, $0.50 for the next 100, $0.10 beyond. Total worked here from Lago's tiers.
    Example("lago-graduated", "graduated Lago 100+150=250 calls: 100x1 + 100x0.50 + 50x0.10 = 155.00",
            meter="api_calls", plan="""\
        charges:
          - name: API calls
            meter: api_calls
            price:
              model: graduated
              tiers:
                - {up_to: 100, unit_price: "1"}
                - {up_to: 200, unit_price: "0.50"}
                - {up_to: null, unit_price: "0.10"}
        """,
            events=events("100", "150"), total_minor=15500, lines=(("usage", "250", 15500),)),
    # Orb, package pricing (docs.withorb.com, price configuration): package size 10 at $0.80, "11
    # units will be billed at 20". Three events of 4, 4 and 3: packages count on the period's
    # total (2 packages), not per event (3 packages, 2.40).
    Example("orb-package", "package Orb 4+4+3=11 units: 2 packages of 10 x0.80 = 1.60", meter="units", plan="""\
        charges:
          - name: Units
            meter: units
            price: {model: package, package_size: 10, package_price: "0.80"}
        """,
            events=events("4", "4", "3"), total_minor=160, lines=(("usage", "11", 160),)),
    # Orb, bulk pricing (docs.withorb.com, price configuration): $0.50 a unit up to 10, then every
    # unit at $0.40: "101 units total would be $40.40" (Orb closes that tier at 1,000).
    Example("orb-bulk", "volume Orb bulk 50+51=101 units: 101x0.40 = 40.40", meter="units", plan="""\
        charges:
          - name: Units
            meter: units
            price:
              model: volume
              tiers:
                - {up_to: 10, unit_price: "0.50"}
                - {up_to: null, unit_price: "0.40"}
        """,
            events=events("50", "51"), total_minor=4040, lines=(("usage", "101", 4040),)),
    # OpenMeter's pricing-models guide as migrated to Kong's docs (Kong/developer.konghq.com#4888):
    # first 1,000 units $0 with a $500 flat price, then $0.1 a unit:
    # "(1000 * $0 + $500) + (1000 * $0.1 + $0) = $500 + $100 = $600".
    Example("openmeter-graduated", "graduated OpenMeter 1,500+500=2,000 units: 1,000x0 + 500 + 1,000x0.1 = 600.00",
            meter="units", plan="""\
        charges:
          - name: Units
            meter: units
            price:
              model: graduated
              tiers:
                - {up_to: 1000, unit_price: "0", flat_fee: "500"}
                - {up_to: null, unit_price: "0.1"}
        """,
            events=events("1500", "500"), total_minor=60000, lines=(("usage", "2000", 60000),)),
    # Kill Bill, "Usage: consumable in arrear" (killbill-docs userguide/tutorials/consumable_in_arrear.adoc):
    # $30 a month, the first 5 videos at $2, the next at $1; 13 videos: "A USAGE item for a price
    # of $18 (= 5 * 2 + 8 * 1)" next to the $30 recurring item. One event per video, a day apart.
    Example("killbill-videos", "graduated Kill Bill 13 videos: 30 + 5x2 + 8x1 = 48.00", meter="videos", plan="""\
        fixed_fees:
          - {name: Chocolate box, amount: "30.00"}
        charges:
          - name: Videos
            meter: videos
            price:
              model: graduated
              tiers:
                - {up_to: 5, unit_price: "2"}
                - {up_to: null, unit_price: "1"}
        """,
            events=events(*["1"] * 13), total_minor=4800,
            lines=(("fixed_fee", "31", 3000), ("usage", "13", 1800))),
    # Lago, minimum commitment scenario specs (getlago/lago-api#1787): "$50 + 3 * $10 = $80 + $20
    # (true-up fee) = $100".
    Example("lago-commitment", "commitment Lago 50 + 3x10 = 80 < 100: true-up 20 = 100.00", meter="units", plan="""\
        fixed_fees:
          - {name: Subscription, amount: "50"}
        charges:
          - name: Units
            meter: units
            price: {model: standard, unit_price: "10"}
        commitment:
          minimum: "100"
        """,
            events=events("1", "1", "1"), total_minor=10000,
            lines=(("fixed_fee", "31", 5000), ("usage", "3", 3000), ("commitment_true_up", "1", 2000))),
    # Lago, negotiated contract billing (getlago.com/docs/guide/lago-cloud/contract-billing): a $1,000
    # monthly minimum; "With $1,300 of eligible usage, it bills $1,300 and adds no true-up".
    Example("lago-commitment-met", "commitment Lago 1,300x1.00 = 1,300 >= 1,000: no true-up = 1,300.00",
            meter="units", plan="""\
        charges:
          - name: Units
            meter: units
            price: {model: standard, unit_price: "1.00"}
        commitment:
          minimum: "1000.00"
        """,
            events=events("800", "500"), total_minor=130000, lines=(("usage", "1300", 130000),)),
    # Cursor, "Plans and usage" (docs.cursor.com/account/plans-and-usage): the Pro plan ($20/month)
    # includes 500 requests a month, then usage-based pricing; "1150 requests ($46)" at $0.04 each.
    Example("cursor-pro", "allowance Cursor 400+600+650=1,650 requests, 500 included: 20 + 1,150x0.04 = 66.00",
            meter="premium_requests", plan="""\
        fixed_fees:
          - {name: Pro seat, amount: "20.00"}
        charges:
          - name: Premium requests
            meter: premium_requests
            included: 500
            price: {model: standard, unit_price: "0.04"}
        """,
            events=events("400", "600", "650"), total_minor=6600,
            lines=(("fixed_fee", "31", 2000), ("overage", "1150", 4600))),
    # ISO 4217 gives JPY no minor unit (exponent 0), as Stripe's zero-decimal currencies do
    # (docs.stripe.com/currencies#zero-decimal): amounts are whole yen. Worked here: 3 images at
    # ¥3.5 = ¥10.5, rounded half_up to ¥11 (the golden close has the half_even twin: ¥10).
    Example("jpy-images", "JPY 0 decimals: 1000 + 3x3.5 = 10.5 -> 11 (half_up) = JPY 1,011", meter="images",
            currency="JPY", plan="""\
        fixed_fees:
          - {name: 基本料金, amount: "1000"}
        charges:
          - name: Images
            meter: images
            price: {model: standard, unit_price: "3.5"}
        """,
            events=events("1", "1", "1"), total_minor=1011, lines=(("fixed_fee", "31", 1000), ("usage", "3", 11))),
    # A tie on half a cent: Stripe's online card rate (2.9% + $0.30, as above) on a $5.00 payment is
    # $0.445. Python's decimal module defines the two rules billrun offers: ROUND_HALF_UP ("ties
    # going away from zero") gives 0.45, ROUND_HALF_EVEN ("ties going to nearest even integer") 0.44.
    Example("tie-half-up", "rounding half_up: 5.00x2.9% + 0.30 = 0.445 -> 0.45", meter="payments",
            rounding="half_up", plan="""\
        charges:
          - name: Card payments
            meter: payments
            price: {model: percentage, rate: "2.9", fixed_fee: "0.30"}
        """,
            events=events("5.00"), total_minor=45, lines=(("usage", "5", 45),)),
    Example("tie-half-even", "rounding half_even: 5.00x2.9% + 0.30 = 0.445 -> 0.44", meter="payments",
            rounding="half_even", plan="""\
        charges:
          - name: Card payments
            meter: payments
            price: {model: percentage, rate: "2.9", fixed_fee: "0.30"}
        """,
            events=events("5.00"), total_minor=44, lines=(("usage", "5", 44),)),
]

EVENT_COUNT = sum(len(ex.events) for ex in EXAMPLES)


def plan_text(ex: Example) -> str:
    header = (f"plan: {ex.key}\nversion: 1\neffective_from: 2026-01-01\ncurrency: {ex.currency}\n"
              f"rounding: {ex.rounding}\n")
    return header + textwrap.dedent(ex.plan)


def usage_objects(ex: Example) -> dict[str, bytes]:
    """usage/<key>/<object>.csv: the contract's columns, then the dimensions these events carry."""
    by_object: dict[str, list[tuple[int, Event]]] = {}
    for n, event in enumerate(ex.events, start=1):
        by_object.setdefault(event.object, []).append((n, event))
    out = {}
    for name, rows in by_object.items():
        dims = sorted({d for _, e in rows for d in e.dims})
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["event_id", "customer_id", "meter", "quantity", "timestamp", *dims])
        for n, e in rows:
            writer.writerow([f"{ex.key}-e{n}", ex.key, ex.meter, e.quantity, e.at, *(e.dims.get(d, "") for d in dims)])
        out[f"usage/{ex.key}/{name}.csv"] = buffer.getvalue().encode()
    return out


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


@pytest.fixture(scope="module")
def closed(prefect_server, tmp_path_factory):
    """Plans and store for every example, closed once: (store uri, close result)."""
    root = tmp_path_factory.mktemp("published")
    plans = root / "plans"
    plans.mkdir()
    for ex in EXAMPLES:
        (plans / f"{ex.key}-v1.yaml").write_text(plan_text(ex), encoding="utf-8")
    store_uri = str(root / "store")
    store = open_store(store_uri, create=True)
    store.put_bytes("customers/customers.csv", csv_bytes(
        ["customer_id", "name", "email"],
        [[ex.key, f"Customer on {ex.key}", f"billing@{ex.key}.example"] for ex in EXAMPLES]))
    store.put_bytes("subscriptions/subscriptions.csv", csv_bytes(
        ["subscription_id", "customer_id", "plan", "plan_version", "start_date", "end_date", "budget", "hard_cap"],
        [[f"sub-{ex.key}", ex.key, ex.key, "1", "2026-01-01", "", "", ""] for ex in EXAMPLES]))
    for ex in EXAMPLES:
        for key, data in usage_objects(ex).items():
            store.put_bytes(key, data)
    return store_uri, close(store_uri, str(plans), PERIOD)


@pytest.fixture(scope="module")
def invoices(closed) -> pl.DataFrame:
    return table(closed[0], PERIOD, "invoices.parquet")


@pytest.fixture(scope="module")
def lines(closed) -> pl.DataFrame:
    return table(closed[0], PERIOD, "invoice_lines.parquet")


def test_examples_are_one_customer_each():
    keys = [ex.key for ex in EXAMPLES]
    assert len(keys) == len(set(keys))
    for ex in EXAMPLES:
        assert ex.total_minor == sum(amount for _, _, amount in ex.lines), ex.key


@pytest.mark.parametrize("ex", [pytest.param(ex, id=ex.arithmetic) for ex in EXAMPLES])
def test_published_example_through_a_close(ex, invoices, lines):
    invoice = invoices.filter(pl.col("customer_id") == ex.key)
    assert invoice.height == 1
    assert invoice["currency"].item() == ex.currency
    assert invoice["total_minor"].item() == ex.total_minor
    got = lines.filter(pl.col("invoice_id") == invoice["invoice_id"].item()).sort("line_no")
    assert list(got.select("kind", "quantity", "amount_minor").iter_rows()) == list(ex.lines)


def test_free_events_are_the_first_by_event_time(invoices, lines):
    # Lago's example: the three earliest transactions ($200 on Oct 2, $100 on Oct 5 and Oct 9) are
    # free; the $50 on Oct 20 pays. It comes first in its file, its object and by event_id.
    invoice_id = invoices.filter(pl.col("customer_id") == "lago-percentage")["invoice_id"].item()
    line = lines.filter((pl.col("invoice_id") == invoice_id) & (pl.col("kind") == "usage"))
    steps = json.loads(line["details"].item())
    assert [(s["units"], s["amount"]) for s in steps] == [
        ("400", "0"),    # 3 free events: 200 + 100 + 100
        ("50", "0.6"),   # 1.2% of 50
        ("1", "0.1"),    # fixed fee: 1 event at 0.10
    ]
    assert D(line["amount"].item()) == D("0.70")


def test_manifest_bills_every_event_written_once(closed):
    store_uri, result = closed
    manifest = json.loads(open_store(store_uri).read_bytes(f"billing/period={PERIOD}/manifest.json"))
    expected = {"read": EVENT_COUNT, "billed": EVENT_COUNT, "duplicates": 0, "quarantined": 0}
    assert manifest["rows"] == expected
    assert result["rows"] == expected


def test_one_invoice_per_example_and_totals_per_currency(closed, invoices):
    store_uri, _ = closed
    assert sorted(invoices["customer_id"]) == sorted(ex.key for ex in EXAMPLES)
    manifest = json.loads(open_store(store_uri).read_bytes(f"billing/period={PERIOD}/manifest.json"))
    expected: dict[str, list[int]] = {}
    for ex in EXAMPLES:
        entry = expected.setdefault(ex.currency, [0, 0])
        entry[0] += 1
        entry[1] += ex.total_minor
    assert manifest["totals"] == [{"currency": c, "invoices": n, "total_minor": t}
                                  for c, (n, t) in sorted(expected.items())]


def test_every_invoice_total_is_the_sum_of_its_lines(invoices, lines):
    sums = lines.group_by("invoice_id").agg(pl.col("amount_minor").sum().alias("lines_minor"),
                                            pl.len().alias("lines"))
    joined = invoices.join(sums, on="invoice_id", how="left")
    assert joined.height == len(EXAMPLES)
    assert joined.filter(pl.col("lines_minor").is_null()).height == 0
    mismatched = joined.filter(pl.col("total_minor") != pl.col("lines_minor"))
    assert mismatched.select("invoice_id", "total_minor", "lines_minor").to_dicts() == []
    assert (joined["line_count"] == joined["lines"]).all()
