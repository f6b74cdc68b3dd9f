"""HTML invoices: hostile text stays text, a missing field is an error, money reads as money."""
from __future__ import annotations

import re
from datetime import date
from decimal import Decimal as D

import pytest
from jinja2 import UndefinedError

from transforms.invoices import Invoice, Line, period_invoices
from transforms.money import format_money
from transforms.periods import Period
from transforms.plans import parse_plan
from transforms.reference import Segment, Subscription
from transforms.render import invoice_html

OCT = Period(2026, 10)
CUSTOMER = {"customer_id": "c1", "name": "Acme Ltd", "email": "billing@acme.test", "address": "1 Main St",
            "tax_id": None}
SELLER = {"name": "billrun Demo Inc.", "address": "2 Market St", "email": None, "tax_id": "US-123"}


def invoice(*lines: Line, currency: str = "USD", kind: str = "invoice", corrects: str | None = None) -> Invoice:
    return Invoice("INV-2026-10-000001", kind, "c1", "s1", "2026-10", currency, date(2026, 11, 1), lines,
                   date(2026, 10, 1), date(2026, 11, 1), corrects)


def line(amount_minor: int, description: str = "Platform fee", kind: str = "fixed_fee") -> Line:
    return Line(kind, description, D(1), amount_minor)


def html(inv: Invoice, customer: dict | None = None, seller: dict | None = None) -> str:
    return invoice_html(inv, customer or CUSTOMER, seller or SELLER, "half_up", "close-2026-10-abc")


# Hostile input --------------------------------------------------------------------------------

def test_customer_name_with_a_script_tag_is_escaped():
    out = html(invoice(line(100)), {**CUSTOMER, "name": "<script>alert(1)</script>"})
    assert "<script>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out


def test_address_with_an_ampersand_is_escaped():
    out = html(invoice(line(100)), {**CUSTOMER, "address": "Smith & Sons, 5 <b>Road</b>"})
    assert "Smith &amp; Sons, 5 &lt;b&gt;Road&lt;/b&gt;" in out
    assert "Smith & Sons" not in out


@pytest.mark.parametrize("field", ["email", "tax_id"])
def test_every_customer_field_is_escaped(field):
    out = html(invoice(line(100)), {**CUSTOMER, field: '"><img src=x onerror=alert(1)>'})
    assert "<img" not in out
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in out


def test_seller_fields_are_escaped():
    out = html(invoice(line(100)), seller={**SELLER, "name": "<i>Evil</i> & Co"})
    assert "<i>Evil</i>" not in out
    assert "&lt;i&gt;Evil&lt;/i&gt; &amp; Co" in out


def test_a_plan_charge_name_with_markup_is_escaped_in_the_description():
    pf = parse_plan('plan: p\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n'
                    'fixed_fees:\n  - {name: "<b>Seat</b>", amount: "20.00"}\n'
                    'charges:\n  - {name: "<b>Bold</b> calls", meter: calls, '
                    'price: {model: standard, unit_price: "1.00"}}\n', "plans/p-v1.yaml")
    sub = Subscription("s1", "c1", "p", None, date(2026, 1, 1), None, None, None, 1)
    [inv] = period_invoices(OCT, [Segment(sub, 1, pf, OCT.start_at, OCT.end_at, OCT)], {})
    assert [l.description for l in inv.lines] == ["<b>Seat</b>", "<b>Bold</b> calls"]
    out = html(inv)
    assert "<b>" not in out
    assert "&lt;b&gt;Seat&lt;/b&gt;" in out and "&lt;b&gt;Bold&lt;/b&gt; calls" in out


def test_missing_customer_field_raises_instead_of_rendering_blank():
    with pytest.raises(UndefinedError, match="name"):
        html(invoice(line(100)), {k: v for k, v in CUSTOMER.items() if k != "name"})


def test_missing_optional_customer_key_raises_too():
    # StrictUndefined: the close always passes every column of checked_customers, so a missing key is a bug.
    with pytest.raises(UndefinedError, match="address"):
        html(invoice(line(100)), {k: v for k, v in CUSTOMER.items() if k != "address"})


def test_absent_optional_fields_render_nothing():
    out = html(invoice(line(100)), {**CUSTOMER, "address": None, "email": None, "tax_id": None})
    assert "None" not in out
    assert "Tax ID" in out  # the seller's
    assert out.count("Tax ID") == 1


# Money ----------------------------------------------------------------------------------------

MONEY = [
    pytest.param(123456, "USD", "$1,234.56", id="USD 123456 minor = $1,234.56"),
    pytest.param(5, "USD", "$0.05", id="USD 5 minor = $0.05"),
    pytest.param(0, "USD", "$0.00", id="USD 0 = $0.00"),
    pytest.param(-1234, "USD", "-$12.34", id="USD -1234 minor = -$12.34"),
    pytest.param(123456789, "USD", "$1,234,567.89", id="USD 123456789 minor = $1,234,567.89"),
    pytest.param(100, "EUR", "€1.00", id="EUR 100 minor = €1.00"),
    pytest.param(1235, "JPY", "¥1,235", id="JPY 1235 (0 decimals) = ¥1,235"),
    pytest.param(-1235, "JPY", "-¥1,235", id="JPY -1235 = -¥1,235"),
]


@pytest.mark.parametrize("amount_minor, currency, text", MONEY)
def test_money_formatting(amount_minor, currency, text):
    assert format_money(amount_minor, currency) == text


@pytest.mark.parametrize("amount_minor, digits", [
    pytest.param(1234567, "1,234.567", id="KWD 1234567 fils (3 decimals) = KWD 1,234.567"),
    pytest.param(-5, "-KWD", id="KWD -5 fils = -KWD 0.005"),
    pytest.param(1000, "1.000", id="KWD 1000 fils = KWD 1.000"),
])
def test_kwd_has_three_decimals(amount_minor, digits):
    text = format_money(amount_minor, "KWD")
    assert "KWD" in text and digits in text
    assert text.replace("\xa0", "").replace(" ", "").lstrip("-").removeprefix("KWD") == format(
        abs(D(amount_minor).scaleb(-3)), ",.3f")


def test_amounts_and_total_render_formatted():
    out = html(invoice(line(123456), line(-1234, "Hard cap", "cap_waiver")))
    assert "$1,234.56" in out and "-$12.34" in out
    assert "$1,222.22" in out  # total: 1,234.56 - 12.34


def test_jpy_and_kwd_invoices_render_in_their_own_digits():
    assert "¥1,235" in html(invoice(line(1235), currency="JPY"))
    kwd = html(invoice(line(1234567), currency="KWD"))
    assert "1,234.567" in kwd and "Total due (KWD)" in kwd


def quantity_cell(out: str, description: str) -> str:
    return re.search(rf"<td>{re.escape(description)}</td>\s*<td class=\"num\">([^<]*)</td>", out).group(1)


@pytest.mark.parametrize("kind, shown", [("cap_waiver", ""), ("commitment_true_up", ""), ("fixed_fee", "1")])
def test_cap_waiver_and_true_up_show_no_quantity(kind, shown):
    assert quantity_cell(html(invoice(line(-500, "The line", kind))), "The line") == shown


# Titles ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, title", [("invoice", "Invoice"), ("credit_note", "Credit note"),
                                         ("debit_note", "Debit note")])
def test_document_title_follows_its_kind(kind, title):
    out = html(invoice(line(-100), kind=kind))
    assert f"<title>{title} INV-2026-10-000001</title>" in out
    assert f"<h1>{title}</h1>" in out


def test_credit_note_names_the_invoice_it_corrects():
    out = html(invoice(line(-100), kind="credit_note", corrects="INV-2026-09-000007"))
    assert "Corrects" in out and "INV-2026-09-000007" in out
    assert "Corrects" not in html(invoice(line(100)))


def test_service_dates_show_the_last_day_inclusive():
    out = html(invoice(line(100)))
    assert "2026-10-01 to 2026-10-31" in out
    assert "2026-11-01" in out  # issued on
