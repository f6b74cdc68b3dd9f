"""One-off charges and manual credits (the `adjustments/` input), worked to the cent.

The store: a Dutch seller registered in NL and California (21% and 7.25%), a Dutch customer
with an onboarding fee and a goodwill credit, a Californian one with an untaxed setup charge,
a customer who changed plans mid-month with a credit larger than their invoice, and rows that
break each rule. Then adjustments that arrive after the close, issued once by a backfill.
"""
from __future__ import annotations

import io
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closeutil import close, table
from flows.backfill import backfill
from flows.status import store_status
from flows.store import open_store
from transforms.credits.model import WalletReplay
from transforms.engine.invoices import Invoice, Line
from transforms.finance.revenue import journal, revenue_rows, tax_rows
from transforms.inputs.adjustments import (
    Adjustment,
    adjustment_counts,
    adjustment_rows,
    billed_by_periods,
    billed_table,
    checked_rows,
    period_adjustments,
    with_adjustments,
)
from transforms.inputs.reference import Segment, Subscription
from transforms.periods import Period

PERIOD = "2026-10"
RULES = """\
seller:
  country: NL
  registrations: [NL, US-CA]
rates:
  - {country: NL, rate: "21"}
  - {country: US, region: CA, rate: "7.25", label: Sales tax}
"""
PLANS = {
    "svc-v1.yaml": """plan: svc\nversion: 1\neffective_from: 2026-01-01\ncurrency: EUR\n"""
                   """fixed_fees:\n  - {name: Platform fee, amount: "100.00"}\n"""
                   """charges:\n  - {name: API calls, meter: calls, price: {model: standard, unit_price: "0.01"}}\n""",
    "svcus-v1.yaml": """plan: svcus\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n"""
                     """fixed_fees:\n  - {name: Platform fee, amount: "100.00"}\n"""
                     """charges:\n  - {name: API calls, meter: calls, """
                     """price: {model: standard, unit_price: "0.01"}}\n""",
}
CUSTOMERS = """\
customer_id,name,email,address,tax_id,country,region
nl,Voorbeeld B.V.,,,NL004495445B01,NL,
us_ca,Golden Gate LLC,,,,US,CA
sw,Wisselaar B.V.,,,,NL,
"""
SUBS = """\
subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap
s_nl,nl,svc,,2026-01-01,,,
s_us_ca,us_ca,svcus,,2026-01-01,,,
s_sw_a,sw,svc,,2026-01-01,2026-10-16,,
s_sw_b,sw,svc,,2026-10-16,,,
"""
USAGE = "event_id,customer_id,meter,quantity,timestamp\ne1,nl,calls,0,2026-10-05T10:00:00Z\n"
ADJUSTMENTS = """\
adjustment_id,customer_id,subscription_id,period,description,amount,currency,reason,taxable
A1,nl,,2026-10,Onboarding fee,250.00,EUR,signed order 17,
A2,nl,s_nl,2026-10,Goodwill credit for the outage,-50.00,EUR,ticket 4411,
A3,us_ca,,2026-10,Hardware shipped at cost,40.00,USD,pass-through,false
A4,sw,,2026-10,Migration credit,-1000.00,EUR,sales promise,
A1,nl,,2026-10,Onboarding fee again,250.00,EUR,sent twice,
A6,nobody,,2026-10,Fee,10.00,EUR,typo,
A7,nl,,2026-10,Fee,"12,50",EUR,comma,
A8,nl,,2026-10,Fee,10.00,USD,wrong currency,
A9,nl,s_us_ca,2026-10,Fee,10.00,EUR,not theirs,
A10,nl,,2026-11,Next month,10.00,EUR,later,
,nl,,2026-10,No id,10.00,EUR,forgot,
A11,nl,,2026-10,Fee,1.001,EUR,too precise,
"""


def _store(root: Path) -> tuple[str, str]:
    store = str(root / "store")
    s = open_store(store, create=True)
    for key, text in (("tax/rules.yaml", RULES), ("customers/customers.csv", CUSTOMERS),
                      ("subscriptions/subscriptions.csv", SUBS), ("usage/u.csv", USAGE),
                      ("adjustments/2026-10.csv", ADJUSTMENTS)):
        s.put_bytes(key, text.encode())
    plans = root / "plans"
    plans.mkdir()
    for name, text in PLANS.items():
        (plans / name).write_text(text)
    return store, str(plans)


@pytest.fixture(scope="module")
def closed(prefect_server, tmp_path_factory):
    store, plans = _store(tmp_path_factory.mktemp("adjustments"))
    result = close(store, plans, PERIOD)
    invoices = {r["subscription_id"]: r for r in table(store, PERIOD, "invoices.parquet").iter_rows(named=True)}
    return store, plans, result, invoices


def _lines(store: str, invoice_id: str) -> list[dict]:
    return (table(store, PERIOD, "invoice_lines.parquet").filter(pl.col("invoice_id") == invoice_id)
            .sort("line_no").to_dicts())


@pytest.mark.slow
@pytest.mark.parametrize("sub, subtotal, tax, total", [
    # fee 100.00 + onboarding 250.00 - goodwill 50.00 = 300.00; NL 21%: 63.00; total 363.00
    pytest.param("s_nl", 30000, 6300, 36300, id="nl-100+250-50=300x21%=63->363"),
    # fee 100.00 taxed 7.25% = 7.25; the 40.00 pass-through is outside tax: 140.00 + 7.25 = 147.25
    pytest.param("s_us_ca", 14000, 725, 14725, id="ca-100x7.25%=7.25+40untaxed->147.25"),
    # the credit goes on the invoice that bills last (the new plan's, 16 of 31 days: 51.61) and
    # stops at zero: 51.61 applied, 948.39 not
    pytest.param("s_sw_b", 0, 0, 0, id="sw-51.61-1000->floored-at-0"),
    # the first half of the month is untouched: 100.00 x 15/31 = 48.387 -> 48.39, +21% = 10.16
    pytest.param("s_sw_a", 4839, 1016, 5855, id="sw-first-half-untouched"),
])
def test_a_close_bills_adjustments_on_the_right_invoice_with_tax(closed, sub, subtotal, tax, total):
    store, _, _, invoices = closed
    inv = invoices[sub]
    assert (inv["subtotal_minor"], inv["tax_minor"], inv["total_minor"]) == (subtotal, tax, total)
    assert sum(line["amount_minor"] for line in _lines(store, inv["invoice_id"])) == total


@pytest.mark.slow
def test_adjustment_lines_have_their_kinds_descriptions_and_tax(closed):
    store, _, _, invoices = closed
    nl = [line for line in _lines(store, invoices["s_nl"]["invoice_id"]) if line["kind"].startswith("adjustment_")]
    assert [(line["kind"], line["description"], line["amount_minor"], line["tax_rate"]) for line in nl] == [
        ("adjustment_charge", "Onboarding fee (ref A1)", 25000, "21"),
        ("adjustment_credit", "Goodwill credit for the outage (ref A2)", -5000, "21")]
    [us] = [line for line in _lines(store, invoices["s_us_ca"]["invoice_id"]) if line["kind"] == "adjustment_charge"]
    assert us["tax_rate"] is None  # taxable: false
    [sw] = [line for line in _lines(store, invoices["s_sw_b"]["invoice_id"]) if line["kind"] == "adjustment_credit"]
    assert sw["amount_minor"] == -5161 and "not applied" in sw["details"]


@pytest.mark.slow
def test_every_adjustment_row_is_billed_or_quarantined_with_a_reason(closed):
    store, _, result, invoices = closed
    adjustments = table(store, PERIOD, "adjustments.parquet")
    status = {(r["adjustment_id"], r["source"]): (r["status"], r["quarantine_reason"])
              for r in adjustments.iter_rows(named=True)}
    src = "adjustments/2026-10.csv#row="
    assert status == {
        ("A1", src + "1"): ("billed", None), ("A2", src + "2"): ("billed", None), ("A3", src + "3"): ("billed", None),
        ("A4", src + "4"): ("billed", None), ("A1", src + "5"): ("quarantined", "duplicate_id"),
        ("A6", src + "6"): ("quarantined", "unknown_customer"), ("A7", src + "7"): ("quarantined", "bad_amount"),
        ("A8", src + "8"): ("quarantined", "currency_mismatch"), ("A9", src + "9"): ("quarantined", "no_invoice"),
        (None, src + "11"): ("quarantined", "missing_id"), ("A11", src + "12"): ("quarantined", "bad_amount"),
    }  # A10 is November's: neither billed nor counted here
    manifest = open_store(store).read_bytes(f"billing/period={PERIOD}/manifest.json").decode()
    import json
    counts = json.loads(manifest)["adjustments"]
    assert (counts["read"], counts["billed"], counts["quarantined"]) == (11, 4, 7)
    assert counts["quarantined_by_reason"] == {"bad_amount": 2, "currency_mismatch": 1, "duplicate_id": 1,
                                               "missing_id": 1, "no_invoice": 1, "unknown_customer": 1}
    a4 = adjustments.filter(pl.col("adjustment_id") == "A4").row(0, named=True)
    assert (a4["subscription_id"], a4["invoice_id"], a4["amount_minor"], a4["unapplied_minor"]) == (
        "s_sw_b", invoices["s_sw_b"]["invoice_id"], -5161, 94839)


@pytest.mark.slow
def test_revenue_books_charges_and_goodwill_credits_and_the_journal_balances(closed):
    store, _, _, _ = closed
    revenue = table(store, PERIOD, "revenue.parquet")
    nl = {r["stream"]: r["recognized_minor"]
          for r in revenue.filter(pl.col("customer_id") == "nl").iter_rows(named=True)}
    assert nl == {"usage": 0, "fixed_fee": 10000, "one_off": 25000, "goodwill_credit": -5000}
    j = table(store, PERIOD, "journal.parquet")
    contra = j.filter((pl.col("account") == "contra_revenue") & (pl.col("customer_id") == "nl"))
    assert contra["debit_minor"].sum() == 5000
    for _, group in j.group_by("currency"):
        assert group["debit_minor"].sum() == group["credit_minor"].sum()


@pytest.mark.slow
def test_the_invoice_shows_the_adjustments(closed):
    store, _, _, invoices = closed
    inv = invoices["s_nl"]["invoice_id"]
    html = open_store(store).read_bytes(f"billing/period={PERIOD}/invoices/{inv}.html").decode()
    assert "One-off charges and credits" in html and "Onboarding fee (ref A1)" in html
    assert "Goodwill credit for the outage (ref A2)" in html


@pytest.mark.slow
def test_explain_shows_the_adjustment_behind_a_line(closed):
    from flows.explain import explain_invoice
    store, _, _, invoices = closed
    report = explain_invoice(store, invoices["s_sw_b"]["invoice_id"])
    [line] = [entry for entry in report["lines"] if entry["kind"] == "adjustment_credit"]
    assert line["description"] == "Migration credit (ref A4)"
    assert line["adjustment"] == {"adjustment_id": "A4", "reason": "sales promise", "amount": "-1000.00",
                                  "taxable": True, "unapplied_minor": 94839, "source": "adjustments/2026-10.csv#row=4"}
    assert line["steps"][0]["label"] == ("Credit of €1,000.00: €51.61 applied, €948.39 not applied, as an invoice "
                                         "never goes below zero")


@pytest.mark.slow
def test_the_command_line_counts_adjustments_and_explains_them(closed):
    from typer.testing import CliRunner

    from flows.cli import app
    store, plans, _, invoices = closed
    closed_again = CliRunner().invoke(app, ["close", "--period", PERIOD, "--store", store, "--plans", plans])
    assert closed_again.exit_code == 0, closed_again.output
    assert ("adjustments: 11 rows, 4 billed, 7 quarantined (bad_amount 2, currency_mismatch 1, duplicate_id 1, "
            "missing_id 1, no_invoice 1, unknown_customer 1)") in closed_again.output
    explained = CliRunner().invoke(app, ["explain", "--invoice", invoices["s_sw_b"]["invoice_id"], "--store", store])
    assert ("<- adjustment A4: reason: sales promise; €948.39 not applied; from adjustments/2026-10.csv#row=4"
            in explained.output), explained.output


@pytest.mark.slow
def test_a_late_adjustment_is_issued_once_by_backfill(closed):
    # after the close: 20.00 more for nl (+21% = 24.20, a debit note) and a 10.00 credit for
    # us_ca (-10.00 - 7.25% = -10.725 -> -10.73, a credit note); A1..A4 were billed by the close
    store, plans, _, invoices = closed
    s = open_store(store)
    s.put_bytes("adjustments/late.csv", (
        "adjustment_id,customer_id,period,description,amount,currency,reason\n"
        "L1,nl,2026-10,Extra training day,20.00,EUR,approved late\n"
        "L2,us_ca,2026-10,Late delivery credit,-10.00,USD,ticket 4500\n").encode())
    assert "new (adjustments/late.csv)" in str(store_status(store))  # status says a backfill is due
    first = backfill(store=store, plans=plans, first=PERIOD, last=PERIOD, reason="late adjustments",
                     as_of="2026-11-10")
    docs = {d["subscription_id"]: d for d in first["documents"]}
    assert set(docs) == {"s_nl", "s_us_ca"}
    assert (docs["s_nl"]["kind"], docs["s_nl"]["total_minor"], docs["s_nl"]["corrects_invoice_id"]) == (
        "debit_note", 2420, invoices["s_nl"]["invoice_id"])
    assert (docs["s_us_ca"]["kind"], docs["s_us_ca"]["total_minor"]) == ("credit_note", -1073)
    lines = pl.read_parquet(io.BytesIO(
        s.read_bytes(f"billing/corrections/run={first['run_id']}/invoice_lines.parquet")))
    adjusted = sorted(line for line in lines["adjusts_description"].to_list() if line)
    assert adjusted == ["Extra training day (ref L1)", "Late delivery credit (ref L2)"]  # never A1..A4 again
    folder = f"billing/corrections/run={first['run_id']}/"
    note = s.read_bytes(f"{folder}documents/{docs['s_nl']['invoice_id']}.html").decode()
    assert "Extra training day (ref L1)" in note and invoices["s_nl"]["invoice_id"] in note
    # the books: the late charge is one_off revenue, the late credit contra-revenue, booked in November
    revenue = pl.read_parquet(io.BytesIO(s.read_bytes(folder + "revenue.parquet")))
    assert sorted(revenue.select("customer_id", "stream", "billed_minor", "period").rows()) == [
        ("nl", "one_off", 2000, "2026-11"), ("us_ca", "goodwill_credit", -1000, "2026-11")]
    journal_ = pl.read_parquet(io.BytesIO(s.read_bytes(folder + "journal.parquet")))
    for _, group in journal_.group_by("currency"):
        assert group["debit_minor"].sum() == group["credit_minor"].sum()
    second = backfill(store=store, plans=plans, first=PERIOD, last=PERIOD, reason="late adjustments",
                      as_of="2026-11-11")
    assert second["status"] == "nothing_to_correct" and second["documents"] == []


@pytest.mark.slow
def test_nightly_drafts_of_the_open_period_carry_its_adjustments(closed):
    from flows.nightly import nightly
    store, plans, _, _ = closed
    nightly(store=store, plans=plans, day="2026-11-15")
    lines = pl.read_parquet(io.BytesIO(open_store(store).read_bytes(
        "billing/nightly/date=2026-11-15/draft_invoice_lines.parquet")))
    # November's A10 on nl's draft, taxed 21% like the close would: 10.00 -> 12.10 on top of the fee
    [a10] = lines.filter(pl.col("kind") == "adjustment_charge").to_dicts()
    assert (a10["description"], a10["amount_minor"], a10["tax_rate"]) == ("Next month (ref A10)", 1000, "21")


@pytest.mark.slow
def test_an_adjustment_moved_to_another_period_after_it_billed_is_not_billed_twice(closed):
    # A1 billed on October's invoice; its row is then moved to November. November's close
    # quarantines it (October's documents bill it) and bills November's own A10.
    from flows.close import close_period
    store, plans, _, _ = closed
    s = open_store(store)
    s.put_bytes("adjustments/2026-10.csv", ADJUSTMENTS.replace("A1,nl,,2026-10,Onboarding fee,",
                                                               "A1,nl,,2026-11,Onboarding fee,").encode())
    close_period(store=store, plans=plans, period="2026-11", allow_empty=True)
    november = {r["adjustment_id"]: r for r in table(store, "2026-11", "adjustments.parquet").iter_rows(named=True)}
    assert (november["A1"]["quarantine_reason"], november["A1"]["detail"]) == (
        "billed_in_period", "already billed by the documents of 2026-10")
    assert november["A10"]["status"] == "billed"


# -- the rules on their own (fast) -------------------------------------------------------------

P = Period.parse(PERIOD)


def _segment(sub: str, customer: str, currency: str = "EUR", start: int = 1, end: int | None = None) -> Segment:
    subscription = Subscription(sub, customer, "svc", None, date(2026, 1, 1), None, None, None, 1)
    start_at = datetime(2026, 10, start, tzinfo=timezone.utc)
    end_at = datetime(2026, 10, end, tzinfo=timezone.utc) if end else P.end_at
    return Segment(subscription, 1, SimpleNamespace(plan=SimpleNamespace(currency=currency)), start_at, end_at, P)


def _rows(text: str) -> pl.DataFrame:
    return adjustment_rows([("adjustments/a.csv", pl.read_csv(io.StringIO(text), infer_schema=False))])


def test_without_a_subscription_the_invoice_that_bills_last_takes_it():
    rows = _rows("adjustment_id,customer_id,period,description,amount,currency,reason\n"
                 "a,c,2026-10,Fee,5.00,EUR,r\n")
    billable, _ = period_adjustments(checked_rows(rows, {"c"}), PERIOD,
                                     [_segment("s_b", "c", start=16), _segment("s_a", "c", end=16)])
    assert [a.subscription_id for a in billable] == ["s_b"]


def test_a_float_amount_column_is_never_billed():
    frame = pl.DataFrame({"adjustment_id": ["a"], "customer_id": ["c"], "period": [PERIOD], "description": ["x"],
                          "amount": pl.Series(["0.1"]).cast(pl.Float64), "currency": ["EUR"], "reason": ["r"]})
    rows = adjustment_rows([("adjustments/a.parquet", frame)])
    _, table_ = period_adjustments(checked_rows(rows, {"c"}), PERIOD, [_segment("s", "c")])
    assert table_["quarantine_reason"].to_list() == ["bad_amount"] and "floating-point" in table_["detail"][0]


def test_an_unreadable_period_is_quarantined_in_every_close():
    rows = _rows("adjustment_id,customer_id,period,description,amount,currency,reason\n"
                 "a,c,2026-13,Fee,5.00,EUR,r\nb,c,2026-11,Fee,5.00,EUR,r\n")
    for period in ("2026-10", "2026-11"):
        _, table_ = period_adjustments(checked_rows(rows, {"c"}), period, [_segment("s", "c")])
        assert ("a", "bad_period") in table_.select("adjustment_id", "quarantine_reason").rows()


def test_an_adjustment_billed_by_another_period_is_not_billed_again():
    rows = _rows("adjustment_id,customer_id,period,description,amount,currency,reason\n"
                 "a,c,2026-10,Fee,5.00,EUR,r\n")
    billable, table_ = period_adjustments(checked_rows(rows, {"c"}), PERIOD, [_segment("s", "c")], {"a": "2026-09"})
    assert billable == [] and table_["quarantine_reason"].to_list() == ["billed_in_period"]


def _invoice(lines: list[int]) -> Invoice:
    return Invoice("INV-2026-10-000001", "invoice", "c", "s", PERIOD, "EUR", P.end,
                   tuple(Line(kind="fixed_fee", description=f"fee {i}", quantity=Decimal(1), amount_minor=m)
                         for i, m in enumerate(lines)), P.start, P.end)


amounts = st.integers(min_value=-10 ** 6, max_value=10 ** 6).map(lambda m: Decimal(m).scaleb(-2))


@settings(max_examples=60, deadline=None)
@given(fees=st.lists(st.integers(min_value=0, max_value=10 ** 6), max_size=3),
       adjustments=st.lists(st.tuples(amounts, st.booleans()), min_size=1, max_size=5))
def test_totals_are_lines_no_invoice_goes_negative_and_the_journal_balances(fees, adjustments):
    adj = [Adjustment(f"a{i}", "c", "s", "x", amount, "EUR", "r", taxable)
           for i, (amount, taxable) in enumerate(adjustments)]
    [inv] = with_adjustments([_invoice(fees)], adj)
    assert inv.total_minor == sum(line.amount_minor for line in inv.lines) >= 0
    for line in inv.lines:
        if line.kind == "adjustment_charge":
            assert line.amount_minor == int(line.amount.scaleb(2))
        elif line.kind == "adjustment_credit":  # applied in part at most, never more than asked
            assert int(line.amount.scaleb(2)) <= line.amount_minor <= 0
    revenue = revenue_rows(P, [inv], WalletReplay(), {})
    j = journal(revenue, tax_rows([inv], PERIOD))
    assert j["debit_minor"].sum() == j["credit_minor"].sum()
    assert revenue["billed_minor"].sum() == inv.total_minor


def test_the_table_accounts_for_every_row():
    rows = _rows("adjustment_id,customer_id,period,description,amount,currency,reason\n"
                 "a,c,2026-10,Fee,5.00,EUR,r\na,c,2026-10,Fee,5.00,EUR,r\nb,x,2026-10,Fee,5.00,EUR,r\n")
    billable, pending = period_adjustments(checked_rows(rows, {"c"}), PERIOD, [_segment("s", "c")])
    invoices = with_adjustments([_invoice([1000])], billable)
    counts = adjustment_counts(billed_table(pending, invoices))
    assert (counts["read"], counts["billed"], counts["quarantined"]) == (3, 1, 2)


def test_billed_by_periods_follows_the_documents():
    close = pl.DataFrame({"adjustment_id": ["a", "b", "c"], "status": ["billed", "billed", "quarantined"],
                          "amount_minor": [500, -200, None]})
    corrections = pl.DataFrame({"period": ["2026-10", "2026-10"], "adjusts_kind": ["adjustment_credit",
                                                                                   "adjustment_charge"],
                                "adjusts_description": ["Credit (ref b)", "Late (ref d)"], "amount_minor": [200, 700]})
    # b was taken back to zero by a correction; d was billed late by one; c never billed
    assert billed_by_periods({"2026-10": close}, corrections) == {"a": "2026-10", "d": "2026-10"}


def test_every_adjustment_reason_is_documented_and_only_those():
    from transforms.inputs.adjustments import PERIOD_REASONS, ROW_REASONS
    text = (Path(__file__).resolve().parent.parent / "docs" / "inputs.md").read_text()
    table = text.split("## Adjustments")[1].split("| reason | the row... |")[1].split("\n\n")[0]
    documented = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert documented == list(ROW_REASONS + PERIOD_REASONS)
