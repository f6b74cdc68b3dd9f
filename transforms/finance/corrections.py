"""Corrections: what a re-rated period owes compared with everything already issued for it.

A finalized invoice is never rewritten. For each subscription of a corrected period, the lines
due now (a fresh rating with today's usage and plans) are compared with the lines issued so far
(the invoice plus every earlier correction), line by line on (kind, description). Every
difference becomes a line of one correction document: a `credit_note` when the total goes down,
a `debit_note` when it goes up. No difference, no document; so a second identical backfill
issues nothing.

Tax lines are not compared: a correction carries its own tax, on its adjustment lines, at the
rate the original invoice applied to the line adjusted (so a rate changed since the invoice
does not change what the correction reverses or adds); a line new to the period takes the
original invoice's rate for the same treatment when it had one, else the re-rating's.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import polars as pl

from transforms.engine.invoices import TAX_LINE_KINDS, Invoice, Line
from transforms.money import decimal_text, format_money
from transforms.pricing.base import ZERO, fmt_units
from transforms.tax import tax_document_lines, tax_line

PREFIXES = {"credit_note": "CN", "debit_note": "DN"}


@dataclass(frozen=True)
class Issued:
    """Net of everything issued for one (subscription, line key) of one period."""

    quantity: Decimal
    amount_minor: int
    meter: str | None
    unit: str
    tax_rate: Decimal | None = None     # the rate the original invoice taxed the line at
    tax_inclusive: bool | None = None


@dataclass(frozen=True)
class IssuedTax:
    """A rate an invoice of the period was taxed at: its label and legal mention."""

    label: str
    note: str | None


def issued_taxes(lines: pl.DataFrame) -> dict[str, dict[tuple[Decimal, bool], IssuedTax]]:
    """Per subscription, the tax rates its documents of the period carry, (rate, inclusive) ->
    label and mention, the first document's first (the original invoice's)."""
    out: dict[str, dict[tuple[Decimal, bool], IssuedTax]] = defaultdict(dict)
    if "tax_rate" not in lines.columns:  # a period closed before billrun knew tax
        return {}
    for row in lines.filter(pl.col("kind") == "tax").iter_rows(named=True):
        key = (Decimal(row["tax_rate"]), bool(row["tax_inclusive"]))
        out[row["subscription_id"]].setdefault(key, IssuedTax(row["description"], row["tax_note"]))
    return dict(out)


def issued_lines(lines: pl.DataFrame) -> dict[str, dict[tuple[str, str], Issued]]:
    """From invoice_lines rows (invoices and earlier corrections of one period): per
    subscription, per (kind, description), the net quantity and amount issued. A correction
    line counts toward the line it adjusts (`adjusts_kind`, `adjusts_description`)."""
    net: dict[str, dict[tuple[str, str], list]] = defaultdict(dict)
    for row in lines.iter_rows(named=True):
        if row["kind"] in TAX_LINE_KINDS:
            continue
        key = (row.get("adjusts_kind") or row["kind"], row.get("adjusts_description") or row["description"])
        rate = row.get("tax_rate")
        entry = net[row["subscription_id"]].setdefault(
            key, [ZERO, 0, row["meter"], row["unit"] or "", Decimal(rate) if rate is not None else None,
                  row.get("tax_inclusive")])
        entry[0] += Decimal(row["quantity"])
        entry[1] += int(row["amount_minor"])
    return {sub: {k: Issued(*entry) for k, entry in keys.items()} for sub, keys in net.items()}


def _fmt_quantity(value: Decimal, unit: str) -> str:
    return f"{fmt_units(value)} {unit}".strip()


def _tax_of(was: Issued | None, now: Line | None, original: dict[tuple[Decimal, bool], IssuedTax],
            rerated: dict[tuple[Decimal, bool], IssuedTax]) -> tuple | None:
    """(label, rate, inclusive, note) a correction of one line is taxed at, None if untaxed."""
    if was is not None and was.tax_rate is not None:
        key = (was.tax_rate, bool(was.tax_inclusive))
        tax = original.get(key) or rerated.get(key)
    elif now is not None and now.tax_rate is not None:
        key = (now.tax_rate, bool(now.tax_inclusive))
        tax = rerated.get(key)
        same = [k for k, t in original.items() if k[1] == key[1] and tax is not None and t.note == tax.note]
        if len(same) == 1:  # the original invoice's rate for this treatment
            key, tax = same[0], original[same[0]]
    else:
        return None
    if tax is None:
        return None
    return tax.label, key[0], key[1], tax.note


def original_documents(docs: pl.DataFrame) -> dict[str, dict]:
    """From invoices rows of one period (the invoice and earlier corrections): per subscription,
    the document its corrections refer to, its invoice or, for a subscription first billed by a
    correction, that first document."""
    out: dict[str, dict] = {}
    for row in docs.sort(pl.col("kind") != "invoice", "issued_on", "invoice_id").iter_rows(named=True):
        out.setdefault(row["subscription_id"], row)
    return out


def next_note_numbers(docs: pl.DataFrame) -> dict[str, int]:
    """The number the next credit note and the next debit note of the period take (series
    gap-free per kind: one more than those issued)."""
    return {kind: docs.filter(pl.col("kind") == kind).height + 1 for kind in ("credit_note", "debit_note")}


def correction_documents(period: str, rerated: list[Invoice], issued: dict[str, dict[tuple[str, str], Issued]],
                         originals: dict[str, dict], next_number: dict[str, int], as_of: date,
                         taxes: dict[str, dict[tuple[Decimal, bool], IssuedTax]] | None = None,
                         rounding_of: dict[str, str] | None = None) -> list[Invoice]:
    """One document per subscription whose lines differ from what was issued.

    `rerated`: the period's invoices as they would be issued now. `originals`: the invoices
    issued at the close (rows of invoices.parquet) by subscription. `next_number`: the next free
    number per document kind in this period (gap-free series CN-P-000001 and DN-P-000001).
    `taxes`: the rates issued per subscription (issued_taxes); `rounding_of`: per subscription.
    """
    taxes = taxes or {}
    rounding_of = rounding_of or {}
    by_sub = {inv.subscription_id: inv for inv in rerated}
    numbers = dict(next_number)
    documents = []
    for sub_id in sorted(set(by_sub) | set(issued)):
        new = by_sub.get(sub_id)
        before = issued.get(sub_id, {})
        due: dict[tuple[str, str], Line] = {}
        for line in new.lines if new else ():
            if line.kind in TAX_LINE_KINDS:
                continue
            key = (line.kind, line.description)
            if key in due:  # two lines of one key: compare their sum
                old = due[key]
                line = Line(kind=line.kind, description=line.description, quantity=old.quantity + line.quantity,
                            amount_minor=old.amount_minor + line.amount_minor, meter=line.meter, unit=line.unit,
                            tax_rate=line.tax_rate, tax_inclusive=line.tax_inclusive)
            due[key] = line
        rerated_taxes = {(line.tax_rate, bool(line.tax_inclusive)): IssuedTax(line.description, line.tax_note)
                         for line in (new.lines if new else ()) if line.kind == "tax"}
        tax_groups: dict[tuple, int] = {}
        lines = []
        for key in list(due) + sorted(k for k in before if k not in due):
            now = due.get(key)
            was = before.get(key)
            new_q, new_a = (now.quantity, now.amount_minor) if now else (ZERO, 0)
            old_q, old_a = (was.quantity, was.amount_minor) if was else (ZERO, 0)
            if new_q == old_q and new_a == old_a:
                continue
            currency = new.currency if new else originals[sub_id]["currency"]
            unit = (now.unit if now else was.unit) or ""
            meter = now.meter if now else was.meter
            tax = _tax_of(was, now, taxes.get(sub_id, {}), rerated_taxes)
            if tax is not None:
                tax_groups[tax] = tax_groups.get(tax, 0) + new_a - old_a
            lines.append(Line(
                kind="adjustment", adjusts_kind=key[0], adjusts_description=key[1], meter=meter, unit=unit,
                description=f"{key[1]}: {_fmt_quantity(old_q, unit)} -> {_fmt_quantity(new_q, unit)}, "
                            f"{format_money(old_a, currency)} -> {format_money(new_a, currency)}",
                quantity=new_q - old_q, amount_minor=new_a - old_a,
                old_quantity=old_q, new_quantity=new_q, old_amount_minor=old_a, new_amount_minor=new_a,
                tax_rate=tax[1] if tax else None, tax_inclusive=tax[2] if tax else None))
        if not lines:
            continue
        currency = new.currency if new else originals[sub_id]["currency"]
        for (label, rate, inclusive, note), amount in tax_groups.items():
            lines += tax_document_lines(tax_line(label, rate, amount, inclusive, currency,
                                                 rounding_of.get(sub_id, "half_up"), note))
        total = sum(line.amount_minor for line in lines)
        kind = "credit_note" if total < 0 else "debit_note"
        number = numbers.get(kind, 1)
        numbers[kind] = number + 1
        # A subscription that no longer bills in the period (its row was removed) is credited
        # back in full, on the terms of its original invoice.
        source = ({"customer_id": new.customer_id, "currency": new.currency, "service_start": new.service_start,
                   "service_end": new.service_end} if new else originals[sub_id])
        original = originals.get(sub_id)
        documents.append(Invoice(
            invoice_id=f"{PREFIXES[kind]}-{period}-{number:06d}", kind=kind,
            customer_id=source["customer_id"], subscription_id=sub_id, period=period,
            currency=source["currency"], issued_on=as_of, lines=tuple(lines),
            service_start=source["service_start"], service_end=source["service_end"],
            corrects_invoice_id=original["invoice_id"] if original else None))
    return documents


REVENUE_KEYS = ["customer_id", "stream", "currency"]
REVENUE_AMOUNTS = ["billed_minor", "recognized_minor", "breakage_minor"]


def revenue_adjustments(rerated: pl.DataFrame, recorded: pl.DataFrame, corrected: str, booked: str) -> pl.DataFrame:
    """Rows that bring the revenue recorded for period `corrected` (its close plus earlier
    adjustments) to the re-rated figures, booked in period `booked` (the correction's own: a
    closed period's books are not reopened). Each row is a change: opening 0, and closing is the
    change in deferred revenue (opening + billed - recognized - breakage = closing)."""
    def totals(frame: pl.DataFrame) -> pl.DataFrame:
        if frame.height == 0:
            return pl.DataFrame(schema={**{k: pl.String for k in REVENUE_KEYS},
                                        **{a: pl.Int64 for a in REVENUE_AMOUNTS}})
        return frame.group_by(REVENUE_KEYS).agg([pl.col(a).sum() for a in REVENUE_AMOUNTS])

    joined = totals(rerated).join(totals(recorded), on=REVENUE_KEYS, how="full", coalesce=True, suffix="_was")
    delta = joined.select(
        *REVENUE_KEYS,
        *[(pl.col(a).fill_null(0) - pl.col(f"{a}_was").fill_null(0)).alias(a) for a in REVENUE_AMOUNTS])
    delta = delta.filter(pl.any_horizontal([pl.col(a) != 0 for a in REVENUE_AMOUNTS])).sort(REVENUE_KEYS)
    return delta.select(
        "customer_id", pl.lit(booked).alias("period"), pl.lit(corrected).alias("corrected_period"), "stream",
        "currency", pl.lit(0, dtype=pl.Int64).alias("opening_deferred_minor"), *REVENUE_AMOUNTS,
        (pl.col("billed_minor") - pl.col("recognized_minor") - pl.col("breakage_minor"))
        .alias("closing_deferred_minor"))


def ledger_adjustments(rerated: pl.DataFrame, recorded: pl.DataFrame, corrected: str, booked: str,
                       at) -> pl.DataFrame:
    """One `adjustment` ledger entry per grant whose re-rated closing balance for `corrected`
    differs from what was recorded (the close's credit_balances plus earlier adjustments)."""
    def closing(frame: pl.DataFrame) -> dict[str, tuple[Decimal, str]]:
        out: dict[str, tuple[Decimal, str]] = {}
        for row in frame.iter_rows(named=True):
            value = Decimal(row.get("closing") or row.get("credits") or "0")
            prev = out.get(row["grant_id"], (ZERO, row["customer_id"]))
            out[row["grant_id"]] = (prev[0] + value, row["customer_id"])
        return out

    new, was = closing(rerated), closing(recorded)
    rows = []
    for grant_id in sorted(set(new) | set(was)):
        change = new.get(grant_id, (ZERO, None))[0] - was.get(grant_id, (ZERO, None))[0]
        if change != 0:
            customer = (new.get(grant_id) or was.get(grant_id))[1]
            rows.append({"entry_id": f"A-{booked}-{corrected}-{len(rows) + 1:06d}", "customer_id": customer,
                         "grant_id": grant_id, "kind": "adjustment", "credits": decimal_text(change),
                         "occurred_at": at, "period": booked, "corrected_period": corrected})
    return pl.DataFrame(rows, schema={"entry_id": pl.String, "customer_id": pl.String, "grant_id": pl.String,
                                      "kind": pl.String, "credits": pl.String,
                                      "occurred_at": pl.Datetime("us", "UTC"), "period": pl.String,
                                      "corrected_period": pl.String})
