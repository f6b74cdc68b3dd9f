"""Tax and payment terms through a real close and a real backfill, worked to the cent.

The store: a Dutch seller (NL VAT registration, EU One-Stop-Shop, California sales tax permit),
30 days net, and one customer per case. Rates from the published sources: Germany 19% (UStG
section 12), France 20% (CGI art. 278), the Netherlands 21% (Wet OB art. 9), California's
statewide base rate 7.25% (CDTFA). Tax is computed per invoice and rate on the sum of the
rounded lines and rounded once, half up.
"""
from __future__ import annotations

import io
from datetime import date
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closeutil import close, table
from flows.backfill import backfill
from flows.nightly import nightly
from flows.status import store_status
from flows.store import open_store
from transforms.credits.model import WalletReplay
from transforms.engine.invoices import Invoice, Line
from transforms.errors import InputError
from transforms.finance.revenue import journal, revenue_rows, tax_rows
from transforms.periods import Period
from transforms.tax import EXEMPT, REVERSE_CHARGE, Party, TaxableLine, invoice_with_tax, tax_line
from transforms.tax.rules import load_rules

PERIOD = "2026-10"
RULES = """\
seller:
  country: NL
  registrations: [NL, EU-OSS, US-CA]
rates:
  - {country: NL, rate: "21"}
  - {country: DE, rate: "19"}
  - {country: FR, rate: "20"}
  - {country: US, region: CA, rate: "7.25", label: Sales tax}
"""
SELLER = """\
name: Rekenwerk B.V.
address: Keizersgracht 1, Amsterdam
tax_id: NL004495445B01
payment_terms_days: 30
payment: {bank: Example Bank, iban: NL91ABNA0417164300, bic: ABNANL2A}
"""
PLANS = {
    "svc-v1.yaml": """plan: svc\nversion: 1\neffective_from: 2026-01-01\ncurrency: EUR\n"""
                   """fixed_fees:\n  - {name: Platform fee, amount: "FEE"}\n"""
                   """charges:\n  - {name: API calls, meter: calls, price: {model: standard, unit_price: "0.01"}}\n""",
    "svcus-v1.yaml": """plan: svcus\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n"""
                     """fixed_fees:\n  - {name: Platform fee, amount: "100.00"}\n"""
                     """charges:\n  - {name: API calls, meter: calls, """
                     """price: {model: standard, unit_price: "0.01"}}\n""",
    "incl-v1.yaml": """plan: incl\nversion: 1\neffective_from: 2026-01-01\ncurrency: EUR\ntax_inclusive: true\n"""
                    """fixed_fees:\n  - {name: Creator plan, amount: "99.99"}\n""",
}
CUSTOMERS = """\
customer_id,name,email,address,tax_id,country,region,tax_exempt,payment_terms_days
de_b2b,Beispiel GmbH,,,DE136695976,DE,,,
fr_b2c,Camille Martin,,,,FR,,,14
fr_incl,Élodie Durand,,,,FR,,,
jp,田中太郎,,,,JP,,,
nl,Voorbeeld B.V.,,,NL004495445B01,NL,,,
nl_exempt,Stichting Voorbeeld,,,,NL,,yes,
us_ca,Golden Gate LLC,,,,US,CA,,
"""
SUBS = "subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap\n" + "".join(
    f"s_{c},{c},{p},,2026-01-01,,,\n" for c, p in (("de_b2b", "svc"), ("fr_b2c", "svc"), ("fr_incl", "incl"),
                                                   ("jp", "svc"), ("nl", "svc"), ("nl_exempt", "svc"),
                                                   ("us_ca", "svcus")))
USAGE = "event_id,customer_id,meter,quantity,timestamp\n" + "".join(
    f"e_{c},{c},calls,12347,2026-10-05T10:00:00Z\n" for c in ("de_b2b", "fr_b2c", "us_ca", "nl"))


def _plans(folder: Path, fee: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in PLANS.items():
        (folder / name).write_text(text.replace("FEE", fee))
    return str(folder)


@pytest.fixture(scope="module")
def taxed(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("tax")
    store = str(root / "store")
    s = open_store(store, create=True)
    for key, text in (("seller.yaml", SELLER), ("tax/rules.yaml", RULES), ("customers/customers.csv", CUSTOMERS),
                      ("subscriptions/subscriptions.csv", SUBS), ("usage/date=2026-10-05/u.csv", USAGE)):
        s.put_bytes(key, text.encode())
    plans = _plans(root / "plans", "100.00")
    nightly(store=store, plans=plans, day="2026-10-31")  # drafts first: the same tax path as the close
    result = close(store, plans, PERIOD)
    invoices = table(store, PERIOD, "invoices.parquet")
    by_customer = {r["customer_id"]: r for r in invoices.iter_rows(named=True)}
    return store, root, result, by_customer


def _tax_lines(store: str, customer: str) -> list[dict]:
    lines = table(store, PERIOD, "invoice_lines.parquet")
    return lines.filter((pl.col("customer_id") == customer) & pl.col("kind").is_in(["tax", "tax_included"])).to_dicts()


@pytest.mark.slow
@pytest.mark.parametrize("customer, subtotal, tax, total", [
    # DE company with a valid German VAT ID, seller in NL: reverse charge, 0%:
    # 100.00 fee + 12,347 calls x 0.01 = 123.47 -> 223.47, tax 0.00
    pytest.param("de_b2b", 22347, 0, 22347, id="de-b2b-reverse-charge-223.47x0%=0.00"),
    # French consumer, EU OSS: 223.47 x 20% = 44.694 -> 44.69; total 268.16
    pytest.param("fr_b2c", 22347, 4469, 26816, id="fr-b2c-oss-223.47x20%=44.694->44.69"),
    # California: 223.47 x 7.25% = 16.201575 -> 16.20; total 239.67
    pytest.param("us_ca", 22347, 1620, 23967, id="us-ca-223.47x7.25%=16.201575->16.20"),
    # tax-inclusive 99.99 in France: tax = 99.99 x 20/120 = 16.665 -> 16.67, net 83.32, total stays 99.99
    pytest.param("fr_incl", 8332, 1667, 9999, id="fr-inclusive-99.99x20/120=16.665->16.67"),
    # domestic NL: 223.47 x 21% = 46.9287 -> 46.93
    pytest.param("nl", 22347, 4693, 27040, id="nl-domestic-223.47x21%=46.9287->46.93"),
    # exempt NL customer: 100.00 x 0%
    pytest.param("nl_exempt", 10000, 0, 10000, id="nl-exempt-100.00x0%=0.00"),
    # Japan: the seller has no registration there, no tax line at all
    pytest.param("jp", 10000, 0, 10000, id="jp-no-registration-no-tax"),
])
def test_worked_tax_examples_through_a_close(taxed, customer, subtotal, tax, total):
    store, _, _, invoices = taxed
    inv = invoices[customer]
    assert (inv["subtotal_minor"], inv["tax_minor"], inv["total_minor"]) == (subtotal, tax, total)
    lines = table(store, PERIOD, "invoice_lines.parquet").filter(pl.col("invoice_id") == inv["invoice_id"])
    assert lines["amount_minor"].sum() == total  # the tax is carried by lines


@pytest.mark.slow
def test_tax_lines_carry_rate_base_and_mentions(taxed):
    store, _, _, _ = taxed
    [rc] = _tax_lines(store, "de_b2b")
    assert (rc["tax_rate"], rc["taxable_base_minor"], rc["amount_minor"], rc["tax_note"]) == ("0", 22347, 0,
                                                                                              REVERSE_CHARGE)
    [fr] = _tax_lines(store, "fr_b2c")
    assert (fr["description"], fr["tax_rate"], fr["taxable_base_minor"]) == ("VAT 20% (FR)", "20", 22347)
    [us] = _tax_lines(store, "us_ca")
    assert us["description"] == "Sales tax 7.25% (US-CA)"
    tax, backed = _tax_lines(store, "fr_incl")
    assert (tax["amount_minor"], backed["amount_minor"], tax["taxable_base_minor"]) == (1667, -1667, 8332)
    [ex] = _tax_lines(store, "nl_exempt")
    assert ex["tax_note"] == EXEMPT
    assert _tax_lines(store, "jp") == []


@pytest.mark.slow
def test_nightly_drafts_are_taxed_and_dated_like_the_close(taxed):
    store, _, _, invoices = taxed
    drafts = pl.read_parquet(io.BytesIO(open_store(store).read_bytes(
        "billing/nightly/date=2026-10-31/draft_invoices.parquet")))
    assert ({r["customer_id"]: (r["subtotal_minor"], r["tax_minor"], r["due_on"]) for r in drafts.iter_rows(named=True)}
            == {c: (i["subtotal_minor"], i["tax_minor"], i["due_on"]) for c, i in invoices.items()})


@pytest.mark.slow
def test_due_dates_follow_the_terms(taxed):
    # issued 2026-11-01; seller 30 days net -> 2026-12-01; fr_b2c's own 14 days -> 2026-11-15
    _, _, _, invoices = taxed
    assert invoices["nl"]["due_on"] == date(2026, 12, 1)
    assert invoices["fr_b2c"]["due_on"] == date(2026, 11, 15)


@pytest.mark.slow
def test_revenue_is_net_of_tax_and_the_journal_books_tax_as_a_liability(taxed):
    store, _, _, invoices = taxed
    revenue = table(store, PERIOD, "revenue.parquet")
    fr_incl = revenue.filter(pl.col("customer_id") == "fr_incl")["billed_minor"].sum()
    assert fr_incl == 8332  # 99.99 gross less the 16.67 of tax in it
    assert revenue.filter(pl.col("customer_id") == "fr_b2c")["billed_minor"].sum() == 22347
    j = table(store, PERIOD, "journal.parquet")
    payable = j.filter(pl.col("account") == "tax_payable")
    eur_tax = sum(i["tax_minor"] for i in invoices.values() if i["currency"] == "EUR")
    assert payable.filter(pl.col("currency") == "EUR")["credit_minor"].sum() == eur_tax == 4469 + 1667 + 4693
    for _, group in j.group_by("currency"):
        assert group["debit_minor"].sum() == group["credit_minor"].sum()


@pytest.mark.slow
def test_the_taxed_invoice_shows_subtotal_rates_ids_mention_and_how_to_pay(taxed):
    store, _, _, invoices = taxed
    s = open_store(store)
    html = s.read_bytes(f"billing/period={PERIOD}/invoices/{invoices['de_b2b']['invoice_id']}.html").decode()
    assert REVERSE_CHARGE in html and "DE136695976" in html and "NL004495445B01" in html
    assert "Subtotal" in html and "on €223.47" in html
    assert "NL91ABNA0417164300" in html and "<td class=\"k\">Reference</td>" in html
    assert "<td class=\"k\">Due</td><td>2026-12-01</td>" in html
    fr = s.read_bytes(f"billing/period={PERIOD}/invoices/{invoices['fr_b2c']['invoice_id']}.html").decode()
    assert "VAT 20% (FR)" in fr and "€44.69" in fr and "€268.16" in fr and REVERSE_CHARGE not in fr


@pytest.mark.slow
def test_a_credit_note_reverses_tax_at_the_original_rate(taxed):
    # the fee drops 100.00 -> 90.00 and France's rate changes to 21% before the backfill: the
    # credit note reverses 10.00 and 20% of it (the invoice's rate), -10.00 - 2.00 = -12.00
    store, root, _, invoices = taxed
    s = open_store(store)
    s.put_bytes("tax/rules.yaml", RULES.replace('{country: FR, rate: "20"}', '{country: FR, rate: "21"}').encode())
    assert "rewritten (tax/rules.yaml)" in str(store_status(store))  # status reports the new rates as drift
    result = backfill(store=store, plans=_plans(root / "plans-fixed", "90.00"), first=PERIOD, last=PERIOD,
                      reason="fee fix", as_of="2026-12-05")
    docs = {d["subscription_id"]: d for d in result["documents"]}
    fr = docs["s_fr_b2c"]
    assert (fr["kind"], fr["total_minor"], fr["corrects_invoice_id"]) == ("credit_note", -1200,
                                                                           invoices["fr_b2c"]["invoice_id"])
    # reverse charge stays 0%: -10.00 exactly; NL: -10.00 - 2.10 = -12.10
    assert docs["s_de_b2b"]["total_minor"] == -1000 and docs["s_nl"]["total_minor"] == -1210
    folder = f"billing/corrections/run={result['run_id']}/"
    notes = pl.read_parquet(io.BytesIO(s.read_bytes(folder + "invoices.parquet")))
    row = notes.filter(pl.col("invoice_id") == fr["invoice_id"]).row(0, named=True)
    assert (row["subtotal_minor"], row["tax_minor"], row["due_on"]) == (-1000, -200, date(2026, 12, 19))
    j = pl.read_parquet(io.BytesIO(s.read_bytes(folder + "journal.parquet")))
    assert j.filter(pl.col("account") == "tax_payable")["debit_minor"].sum() == 200 + 210
    for _, group in j.group_by("currency"):
        assert group["debit_minor"].sum() == group["credit_minor"].sum()


# -- the rules on their own --------------------------------------------------------------------

def test_a_rules_file_mistake_is_one_line():
    with pytest.raises(InputError, match=r"tax/rules.yaml, rates.0.rate: .*quoted"):
        load_rules("seller: {country: NL, registrations: [NL]}\nrates:\n  - {country: NL, rate: 21}\n")


def test_a_registered_place_without_a_rate_is_an_error_not_zero():
    rules = load_rules("seller: {country: NL, registrations: [NL, US-TX]}\nrates: []\n")
    with pytest.raises(InputError, match="no rate for US-TX"):
        rules.tax_lines([TaxableLine(1, "fixed_fee", "p", None, 100)], Party("NL"), Party("US", "TX"), "USD",
                        "half_up")


def test_a_product_category_takes_its_own_rate():
    # NL reduced rate 9% for the images plan: 100.00 x 9% = 9.00; api stays at 21%: 50.00 x 21% = 10.50
    rules = load_rules(RULES.replace('rates:\n', 'rates:\n  - {country: NL, category: reduced, rate: "9"}\n')
                       + "categories:\n  - {plan: images, category: reduced}\n")
    lines = [TaxableLine(1, "fixed_fee", "images", None, 10000), TaxableLine(2, "usage", "api", "calls", 5000)]
    taxes = rules.tax_lines(lines, Party("NL"), Party("NL"), "EUR", "half_up")
    assert [(t.rate, t.base_minor, t.amount_minor, t.line_nos) for t in taxes] == [
        (Decimal(21), 5000, 1050, (2,)), (Decimal(9), 10000, 900, (1,))]


def test_an_invalid_vat_id_is_b2c_not_reverse_charge():
    rules = load_rules(RULES)
    lines = [TaxableLine(1, "fixed_fee", "svc", None, 10000)]
    [bad] = rules.tax_lines(lines, Party("NL"), Party("DE", None, "DE123456789"), "EUR", "half_up")
    assert (bad.rate, bad.amount_minor, bad.note) == (Decimal(19), 1900, None)  # 100.00 x 19%
    [good] = rules.tax_lines(lines, Party("NL"), Party("DE", None, "DE136695976"), "EUR", "half_up")
    assert (good.rate, good.note) == (Decimal(0), REVERSE_CHARGE)


RULES_ALL = load_rules(RULES)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["de_b2b", "fr_b2c", "us_ca", "nl", "jp", "nl_exempt"]),
                          st.integers(0, 10**7), st.integers(-10**5, 10**7), st.booleans()), min_size=1, max_size=8))
def test_total_is_subtotal_plus_tax_revenue_excludes_tax_and_the_journal_balances(cases):
    parties = {"de_b2b": Party("DE", None, "DE136695976"), "fr_b2c": Party("FR"), "us_ca": Party("US", "CA"),
               "nl": Party("NL"), "jp": Party("JP"), "nl_exempt": Party("NL", None, None, True)}
    invoices = []
    for n, (customer, fee, usage, inclusive) in enumerate(cases, start=1):
        currency = "USD" if customer == "us_ca" else "EUR"
        inv = Invoice(f"INV-2026-10-{n:06d}", "invoice", customer, f"s{n}", PERIOD, currency, date(2026, 11, 1),
                      (Line("fixed_fee", "Fee", Decimal(31), fee, plan="p", plan_version=1),
                       Line("usage", "Calls", Decimal(1), usage, plan="p", plan_version=1, meter="calls")),
                      date(2026, 10, 1), date(2026, 11, 1))
        taxable = [TaxableLine(i, line.kind, "p", line.meter, line.amount_minor, inclusive)
                   for i, line in enumerate(inv.lines, 1)]
        inv = invoice_with_tax(inv, RULES_ALL.tax_lines(taxable, Party("NL"), parties[customer], currency, "half_up"))
        invoices.append(inv)
        assert inv.total_minor == inv.subtotal_minor + inv.tax_minor
        assert inv.total_minor == sum(line.amount_minor for line in inv.lines)
        if not inclusive:
            assert inv.subtotal_minor == fee + usage
    revenue = revenue_rows(Period.parse(PERIOD), invoices, WalletReplay(), {})
    for currency in ("EUR", "USD"):
        mine = [i for i in invoices if i.currency == currency]
        assert revenue.filter(pl.col("currency") == currency)["billed_minor"].sum() == sum(i.subtotal_minor
                                                                                           for i in mine)
    j = journal(revenue, tax_rows(invoices, PERIOD))
    for currency in ("EUR", "USD"):
        group = j.filter(pl.col("currency") == currency)
        assert group["debit_minor"].sum() == group["credit_minor"].sum()
        payable = group.filter(pl.col("account") == "tax_payable")
        tax = sum(i.tax_minor for i in invoices if i.currency == currency)
        assert payable["credit_minor"].sum() - payable["debit_minor"].sum() == tax


def test_inclusive_tax_is_backed_out_and_rounded_once():
    # 99.99 x 20/120 = 16.665 -> half up 16.67, half even 16.66 (the invoice's own rule)
    assert tax_line("VAT", Decimal(20), 9999, True, "EUR", "half_up").amount_minor == 1667
    assert tax_line("VAT", Decimal(20), 9999, True, "EUR", "half_even").amount_minor == 1666
    assert tax_line("VAT", Decimal(20), 9999, True, "EUR", "half_up").base_minor == 8332


def test_the_demo_store_bills_tax_by_its_customers_countries():
    """The demo's rules and customers: EU businesses carry valid-looking VAT IDs of their own
    country (reverse charge), EU consumers pay their country's rate, New York customers New York
    City's sales tax, and customers where the seller is not registered pay none."""
    from transforms.demo.synth import DEMO_TAX_RULES, synth_store
    from transforms.inputs.plans import load_catalog
    from transforms.inputs.reference import checked_customers
    from transforms.tax import customer_parties

    rules = load_rules(DEMO_TAX_RULES)
    sample = synth_store(load_catalog(str(Path(__file__).parent.parent / "plans")), PERIOD, 80, 7)
    parties = customer_parties(checked_customers(sample.customers, "customers/customers.csv"))
    line = [TaxableLine(1, "fixed_fee", "api", None, 10000)]
    seen = {}
    for party in parties.values():
        taxes = rules.tax_lines(line, Party("US"), party, "USD", "half_up")
        kind = ("none" if not taxes else "reverse_charge" if taxes[0].note == REVERSE_CHARGE
                else f"{taxes[0].rate}%")
        seen.setdefault((party.country, party.region), set()).add(kind)
    assert seen[("FR", None)] >= {"20%"} and seen[("US", "NY")] == {"8.875%"}  # 100.00 x 8.875% = 8.88
    assert seen[("US", "CA")] == {"none"} and seen[("GB", None)] == {"none"}
    assert any("reverse_charge" in kinds for (country, _), kinds in seen.items() if country in ("FR", "NL", "ES", "SE"))


def test_a_debit_note_adds_tax_at_the_original_rate():
    # invoiced 100.00 + 20% = 120.00; re-rated 120.00 at a new 21%: the debit note adds
    # 20.00 + 20% of it = 4.00 (not 4.20), 24.00 in all
    from transforms.engine.invoices import lines_table
    from transforms.finance.corrections import correction_documents, issued_lines, issued_taxes

    def invoice(fee: int, rate: str) -> Invoice:
        inv = Invoice("INV-2026-10-000001", "invoice", "fr_b2c", "s1", PERIOD, "EUR", date(2026, 11, 1),
                      (Line("fixed_fee", "Platform fee", Decimal(31), fee, plan="svc", plan_version=1),),
                      date(2026, 10, 1), date(2026, 11, 1))
        return invoice_with_tax(inv, [tax_line(f"VAT {rate}% (FR)", Decimal(rate), fee, False, "EUR", "half_up",
                                               line_nos=(1,))])

    issued = lines_table([invoice(10000, "20")])
    original = {"s1": {"invoice_id": "INV-2026-10-000001", "currency": "EUR", "customer_id": "fr_b2c"}}
    [note] = correction_documents(PERIOD, [invoice(12000, "21")], issued_lines(issued), original, {},
                                  date(2026, 12, 5), issued_taxes(issued), {"s1": "half_up"})
    assert (note.kind, note.subtotal_minor, note.tax_minor, note.total_minor) == ("debit_note", 2000, 400, 2400)
    [tax] = [line for line in note.lines if line.kind == "tax"]
    assert (tax.description, tax.tax_rate, tax.taxable_base_minor) == ("VAT 20% (FR)", Decimal(20), 2000)
