"""HTML invoices: jinja2 with autoescaping and StrictUndefined, so a customer's name is always
text and a missing field is an error, never a blank."""
from __future__ import annotations

from datetime import timedelta
from functools import lru_cache

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from transforms.invoices import Invoice
from transforms.money import format_money
from transforms.pricing.base import fmt_units

TITLES = {"invoice": "Invoice", "credit_note": "Credit note", "debit_note": "Debit note"}


@lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(loader=PackageLoader("transforms", "templates"),
                       autoescape=select_autoescape(default=True, default_for_string=True),
                       undefined=StrictUndefined, keep_trailing_newline=True)


def _line_view(no: int, line, currency: str) -> dict:
    single = line.steps[0] if len(line.steps) == 1 else None
    unit_price = single.price_text if single is not None and line.kind in ("usage", "overage") else ""
    quantity = "" if line.kind in ("cap_waiver", "commitment_true_up") else (
        f"{fmt_units(line.quantity)} {line.unit}".strip())
    steps = [s.label for s in line.steps] if len(line.steps) > 1 else []
    if line.included_units is not None:
        steps.insert(0, f"{fmt_units(line.total_units)} units used, {fmt_units(line.included_units)} included")
    return {"no": no, "description": line.description, "quantity": quantity, "unit_price": unit_price,
            "amount": format_money(line.amount_minor, currency), "steps": steps}


def invoice_html(invoice: Invoice, customer: dict, seller: dict, rounding: str, run_id: str) -> str:
    """The document a customer receives for `invoice` (an invoice, credit note or debit note)."""
    return _environment().get_template("invoice.html.j2").render(
        title=TITLES[invoice.kind],
        invoice=invoice,
        customer=customer,
        seller=seller,
        lines=[_line_view(no, line, invoice.currency) for no, line in enumerate(invoice.lines, start=1)],
        total=format_money(invoice.total_minor, invoice.currency),
        service_last_day=(invoice.service_end - timedelta(days=1)).isoformat(),
        rounding=rounding.replace("_", " "),
        run_id=run_id,
    )
