"""Unicode bidi controls cannot reorder what a document shows.

A customer name such as "Acme\u202eFDP.exe" would display reversed after the override
(U+202E), so an invoice could show a name, a description or an amount other than the one it
holds. Every embedding, override and isolate control (U+202A-U+202E, U+2066-U+2069) that reaches
a document (invoice, note, report) is shown visibly as [U+XXXX] instead, whatever field it is in.
"""
from __future__ import annotations

from datetime import date
from decimal import Decimal as D

import pytest

from transforms.documents.render import invoice_html, visible_bidi
from transforms.engine.invoices import Invoice, Line

CONTROLS = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))]
CUSTOMER = {"customer_id": "c1", "name": "Acme\u202eFDP.exe", "email": "ap@acme.test",
            "address": "1 \u2067Main\u2069 St", "tax_id": None}
SELLER = {"name": "Seller \u202dInc.", "address": "2 Market St", "email": None, "tax_id": None}


def document(kind: str = "invoice") -> str:
    lines = (Line("usage", "Input tokens (model: gpt\u202b-4o\u202c)", D(1), 250),
             Line("fixed_fee", "Seat \u2066x\u2068y", D(1), 1000))
    inv = Invoice("INV-2026-10-000001" if kind == "invoice" else "CN-2026-10-000001", kind, "c1", "s1", "2026-10",
                  "USD", date(2026, 11, 1), lines, date(2026, 10, 1), date(2026, 11, 1),
                  None if kind == "invoice" else "INV-2026-10-000001")
    return invoice_html(inv, CUSTOMER, SELLER, "half_up", "close-2026-10-abc")


@pytest.mark.parametrize("kind", ["invoice", "credit_note"])
def test_no_bidi_control_reaches_a_document_and_each_is_shown(kind):
    out = document(kind)
    assert not any(c in out for c in CONTROLS)
    assert "Acme[U+202E]FDP.exe" in out                      # the name, visibly marked
    assert "1 [U+2067]Main[U+2069] St" in out                # the address
    assert "gpt[U+202B]-4o[U+202C]" in out                   # a dimension value in a description
    assert "Seller [U+202D]Inc." in out


def test_visible_bidi_leaves_other_text_alone_and_keeps_markup_safe():
    from markupsafe import Markup

    assert visible_bidi("Zürich 東京 שלום") == "Zürich 東京 שלום"   # right-to-left text itself is fine
    assert visible_bidi(42) == 42
    marked = visible_bidi(Markup("<b>a\u202eb</b>"))
    assert isinstance(marked, Markup) and str(marked) == "<b>a[U+202E]b</b>"


def test_the_report_page_marks_them_too():
    from flows.report import render_page

    page = render_page("Report \u202e2026-10", [("customer", "x\u2066y")], [], [], [], [])
    assert not any(c in page for c in CONTROLS)
    assert "[U+202E]" in page and "[U+2066]" in page
