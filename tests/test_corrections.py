"""Corrections as pure functions: `issued_lines` nets what a period already issued, and
`correction_documents` turns the difference with a fresh rating into credit and debit notes.

Worked examples on the golden customers (tests/test_golden.py has the close's arithmetic):
sub_1 bills gpt-4o input tokens at 2.50 per 1,000,000 (eu 1,500,000 -> 3.75, us 400,000 -> 1.00);
sub_2 one eu token (0.0000025 -> 0.00); sub_3 images at JPY 3.5, rounded half even.
"""
from __future__ import annotations

from datetime import date
from decimal import Decimal

import polars as pl

from transforms.engine.invoices import Invoice, Line, invoices_table, lines_table
from transforms.finance.corrections import correction_documents, issued_lines

PERIOD = "2026-10"
AS_OF = date(2026, 12, 5)
EU = "gpt-4o input tokens (region: eu)"
US = "gpt-4o input tokens (region: us)"
FEE = "Platform fee"
FIRST_NUMBERS = {"credit_note": 1, "debit_note": 1}


def line(description: str, units: int, amount_minor: int, kind: str = "usage", meter: str = "input_tokens") -> Line:
    if kind == "fixed_fee":
        return Line(kind=kind, description=description, quantity=Decimal(units), amount_minor=amount_minor,
                    unit="days")
    return Line(kind=kind, description=description, quantity=Decimal(units), amount_minor=amount_minor,
                meter=meter, unit="units")


def invoice(sub: str, *lines: Line, invoice_id: str = "INV-2026-10-000001", customer: str = "c1",
            currency: str = "USD", kind: str = "invoice") -> Invoice:
    return Invoice(invoice_id=invoice_id, kind=kind, customer_id=customer, subscription_id=sub, period=PERIOD,
                   currency=currency, issued_on=date(2026, 11, 1), lines=tuple(lines),
                   service_start=date(2026, 10, 1), service_end=date(2026, 11, 1))


def images(units: int, amount_minor: int) -> Line:
    return line("Images", units, amount_minor, meter="images")


# What the golden close issued for sub_1 and sub_2 (the tok plan).
SUB_1_ISSUED = invoice("sub_1", line(FEE, 31, 2000, "fixed_fee"), line(EU, 1500000, 375), line(US, 400000, 100))
SUB_2_ISSUED = invoice("sub_2", line(FEE, 16, 1032, "fixed_fee"), line(EU, 1, 0),
                       invoice_id="INV-2026-10-000002", customer="c2")


def corrections(issued: list[Invoice], rerated: list[Invoice], next_number=FIRST_NUMBERS) -> list[Invoice]:
    """Run both functions the way the backfill does: issued documents -> their tables -> net."""
    originals = {}
    for row in invoices_table(issued).sort(pl.col("kind") != "invoice", "invoice_id").iter_rows(named=True):
        originals.setdefault(row["subscription_id"], row)
    return correction_documents(PERIOD, rerated, issued_lines(lines_table(issued)), originals, next_number, AS_OF)


def adjustments(doc: Invoice) -> list[tuple]:
    return [(line.adjusts_kind, line.adjusts_description, line.old_quantity, line.new_quantity, line.old_amount_minor,
              line.new_amount_minor, line.quantity, line.amount_minor) for line in doc.lines]


def test_issued_lines_nets_an_invoice_and_its_corrections_per_line():
    cn = invoice("sub_1", Line(kind="adjustment", description="...", quantity=Decimal(0), amount_minor=-75,
                               unit="units", adjusts_kind="usage", adjusts_description=EU),
                 invoice_id="CN-2026-10-000001", kind="credit_note")
    net = issued_lines(lines_table([SUB_1_ISSUED, SUB_2_ISSUED, cn]))
    # eu: 375 issued, 75 credited back: 300 net, quantity unchanged
    assert (net["sub_1"][("usage", EU)].quantity, net["sub_1"][("usage", EU)].amount_minor) == (Decimal(1500000), 300)
    assert net["sub_1"][("usage", US)].amount_minor == 100
    assert net["sub_1"][("fixed_fee", FEE)].quantity == Decimal(31)
    assert net["sub_2"][("usage", EU)].amount_minor == 0


def test_no_difference_no_document():
    assert corrections([SUB_1_ISSUED, SUB_2_ISSUED], [SUB_1_ISSUED, SUB_2_ISSUED]) == []


def test_price_cut_2_50_to_2_00_credits_sub_1_only():
    # eu 1,500,000 x 2.00/1M = 3.00 (was 3.75: -0.75); us 400,000 x 2.00/1M = 0.80 (was 1.00: -0.20);
    # total -0.95. sub_2: 1 x 2.00/1M = 0.000002 rounds to 0.00 as 0.0000025 did: no line, no document.
    rerated = [invoice("sub_1", line(FEE, 31, 2000, "fixed_fee"), line(EU, 1500000, 300), line(US, 400000, 80)),
               SUB_2_ISSUED]
    (doc,) = corrections([SUB_1_ISSUED, SUB_2_ISSUED], rerated)
    assert (doc.invoice_id, doc.kind, doc.subscription_id, doc.customer_id) == (
        "CN-2026-10-000001", "credit_note", "sub_1", "c1")
    assert (doc.total_minor, doc.corrects_invoice_id, doc.issued_on, doc.period) == (
        -95, "INV-2026-10-000001", AS_OF, PERIOD)
    assert adjustments(doc) == [
        ("usage", EU, Decimal(1500000), Decimal(1500000), 375, 300, Decimal(0), -75),
        ("usage", US, Decimal(400000), Decimal(400000), 100, 80, Decimal(0), -20)]
    assert all(line.kind == "adjustment" for line in doc.lines)
    assert doc.lines[0].description == f"{EU}: 1,500,000 units -> 1,500,000 units, $3.75 -> $3.00"


def test_a_second_change_carries_only_the_new_difference():
    # After CN-1 (eu 300, us 80 net), the price goes to 1.00: eu 1.50 (-1.50), us 0.40 (-0.40): -1.90,
    # numbered CN-2 because CN-1 exists.
    cn_1 = corrections([SUB_1_ISSUED], [invoice("sub_1", line(FEE, 31, 2000, "fixed_fee"), line(EU, 1500000, 300),
                                                line(US, 400000, 80))])[0]
    rerated = [invoice("sub_1", line(FEE, 31, 2000, "fixed_fee"), line(EU, 1500000, 150), line(US, 400000, 40))]
    (doc,) = corrections([SUB_1_ISSUED, cn_1], rerated, {"credit_note": 2, "debit_note": 1})
    assert (doc.invoice_id, doc.total_minor, doc.corrects_invoice_id) == ("CN-2026-10-000002", -190,
                                                                          "INV-2026-10-000001")
    assert [(a[4], a[5], a[7]) for a in adjustments(doc)] == [(300, 150, -150), (80, 40, -40)]


def test_late_usage_is_a_debit_note_with_the_new_quantity():
    # 100,000 late eu tokens: 1,600,000 x 2.50/1M = 4.00 (was 3.75): +0.25, quantity +100,000
    rerated = [invoice("sub_1", line(FEE, 31, 2000, "fixed_fee"), line(EU, 1600000, 400), line(US, 400000, 100))]
    (doc,) = corrections([SUB_1_ISSUED], rerated)
    assert (doc.invoice_id, doc.kind, doc.total_minor) == ("DN-2026-10-000001", "debit_note", 25)
    assert adjustments(doc) == [("usage", EU, Decimal(1500000), Decimal(1600000), 375, 400, Decimal(100000), 25)]


def test_jpy_debit_note_in_whole_yen():
    # 3 -> 7 images at 3.5: 10.5 -> 10 (half even) was issued, 24.5 -> 24 is due: +14 yen
    issued = invoice("sub_3", images(3, 10), invoice_id="INV-2026-10-000003", customer="c3", currency="JPY")
    rerated = invoice("sub_3", images(7, 24), invoice_id="INV-2026-10-000003", customer="c3", currency="JPY")
    (doc,) = corrections([issued], [rerated])
    assert (doc.kind, doc.currency, doc.total_minor) == ("debit_note", "JPY", 14)
    assert doc.lines[0].description == "Images: 3 units -> 7 units, ¥10 -> ¥24"


def test_credit_and_debit_notes_number_independently_in_subscription_order():
    issued_3 = invoice("sub_3", images(3, 10), invoice_id="INV-2026-10-000003", customer="c3", currency="JPY")
    rerated = [invoice("sub_1", line(FEE, 31, 2000, "fixed_fee"), line(EU, 1500000, 300), line(US, 400000, 80)),
               invoice("sub_3", images(7, 24), customer="c3", currency="JPY")]
    docs = corrections([SUB_1_ISSUED, issued_3], rerated, {"credit_note": 3, "debit_note": 1})
    assert [(d.invoice_id, d.subscription_id, d.corrects_invoice_id) for d in docs] == [
        ("CN-2026-10-000003", "sub_1", "INV-2026-10-000001"), ("DN-2026-10-000001", "sub_3", "INV-2026-10-000003")]


def test_a_subscription_no_longer_billed_is_credited_in_full_on_its_original_terms():
    # sub_2's row was removed: its fee 10.32 comes back; the 1-token line changes quantity only.
    (doc,) = corrections([SUB_1_ISSUED, SUB_2_ISSUED], [SUB_1_ISSUED])
    assert (doc.invoice_id, doc.customer_id, doc.currency, doc.total_minor, doc.corrects_invoice_id) == (
        "CN-2026-10-000001", "c2", "USD", -1032, "INV-2026-10-000002")
    assert (doc.service_start, doc.service_end) == (date(2026, 10, 1), date(2026, 11, 1))
    assert [(a[1], a[6], a[7]) for a in adjustments(doc)] == [(FEE, Decimal(-16), -1032), (EU, Decimal(-1), 0)]


def test_a_subscription_first_billed_by_a_correction_corrects_nothing():
    rerated = [SUB_1_ISSUED, invoice("sub_9", line(FEE, 31, 2000, "fixed_fee"), customer="c9")]
    (doc,) = corrections([SUB_1_ISSUED], rerated, {"credit_note": 1, "debit_note": 4})
    assert (doc.invoice_id, doc.kind, doc.total_minor, doc.corrects_invoice_id) == (
        "DN-2026-10-000004", "debit_note", 2000, None)


def test_two_lines_of_one_key_are_compared_as_their_sum():
    # 1,000,000 + 500,000 eu tokens on two lines of one description: 2.50 + 1.25 = 3.75, as issued
    rerated = [invoice("sub_1", line(FEE, 31, 2000, "fixed_fee"), line(EU, 1000000, 250), line(EU, 500000, 125),
                       line(US, 400000, 100))]
    assert corrections([SUB_1_ISSUED], rerated) == []
