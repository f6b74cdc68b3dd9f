"""Payment terms: when a document is due and how to pay it, from the store's seller.yaml.

    name: Acme AI B.V.
    address: Keizersgracht 1, Amsterdam
    email: billing@acme.example
    tax_id: NL004495445B01
    payment_terms_days: 30         # net days from the issue date (a customer's own column wins)
    payment:                       # printed on invoices and debit notes, reference = document id
      bank: Example Bank
      account_name: Acme AI B.V.
      iban: NL91ABNA0417164300
      bic: ABNANL2A

A document is due `payment_terms_days` after it is issued (invoices, credit notes and debit
notes alike); a customer's `payment_terms_days` column overrides the seller's. Without either,
documents carry no due date.
"""
from __future__ import annotations

from datetime import date, timedelta

from transforms.errors import InputError
from transforms.layout import SELLER_KEY

SELLER_FIELDS = ("name", "address", "email", "tax_id")
PAYMENT_LABELS = {"bank": "Bank", "account_name": "Account name", "iban": "IBAN", "bic": "BIC / SWIFT",
                  "account_number": "Account number", "routing_number": "Routing number",
                  "sort_code": "Sort code", "note": "Note"}


def _days(value, where: str) -> int | None:
    if value is None or value == "":
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) > 3650:
        raise InputError(f"{where}: {value!r} is not a number of days (a whole number from 0 to 3650)")
    return int(text)


def seller_block(loaded, source: str = SELLER_KEY) -> dict:
    """The seller shown on documents: name, address, email, tax_id, payment_terms_days and the
    payment instructions as (label, value) pairs, from seller.yaml's parsed content."""
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise InputError(f"{source}: expected a mapping of name, address, email, tax_id, payment_terms_days, payment")
    seller = {k: loaded.get(k) for k in SELLER_FIELDS}
    seller["name"] = seller.get("name") or "(seller not configured: add seller.yaml to the store)"
    seller["payment_terms_days"] = _days(loaded.get("payment_terms_days"), f"{source}, payment_terms_days")
    payment = loaded.get("payment") or {}
    if not isinstance(payment, dict):
        raise InputError(f"{source}, payment: expected a mapping such as {{bank: ..., iban: ..., bic: ...}}")
    unknown = sorted(set(payment) - set(PAYMENT_LABELS))
    if unknown:
        raise InputError(f"{source}, payment: unknown field(s) {', '.join(map(str, unknown))} "
                         f"(known: {', '.join(PAYMENT_LABELS)})")
    seller["payment"] = [(label, str(payment[key])) for key, label in PAYMENT_LABELS.items()
                         if payment.get(key) not in (None, "")]
    return seller


def terms_days(seller: dict, customer: dict | None) -> int | None:
    """Net days for a customer: its own `payment_terms_days`, else the seller's."""
    own = (customer or {}).get("payment_terms_days")
    return int(own) if own not in (None, "") else seller.get("payment_terms_days")


def due_on(issued_on: date, seller: dict, customer: dict | None) -> date | None:
    days = terms_days(seller, customer)
    return None if days is None else issued_on + timedelta(days=days)
