"""The credit_purchases input read and checked: one Purchase per row; a bad row fails the run
with one line naming the file, row and field."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import polars as pl

from transforms.credits.model import Purchase
from transforms.errors import InputError
from transforms.money import is_known_currency


def purchases_from(frame: pl.DataFrame, source: str, customers: set[str]) -> list[Purchase]:
    """Checked credit_purchases rows; a bad row fails the run naming the file, row and field."""
    required = ("purchase_id", "customer_id", "credits", "price", "currency", "purchased_at")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {', '.join(missing)}")
    out, seen = [], set()
    for i, row in enumerate(frame.cast({c: pl.String for c in frame.columns}).iter_rows(named=True), start=1):
        where = f"{source} row {i}"

        def parse(column, fn, optional=False, row=row, where=where):
            text = (row.get(column) or "").strip()
            if not text and optional:
                return None
            try:
                return fn(text)
            except (ValueError, ArithmeticError):
                raise InputError(f"{where}, {column}: {text!r} is not valid") from None
        purchase = Purchase(
            purchase_id=parse("purchase_id", lambda t: t or _raise()),
            customer_id=parse("customer_id", lambda t: t if t in customers else _raise()),
            credits=parse("credits", lambda t: _positive(Decimal(t))),
            price=parse("price", lambda t: _not_negative(Decimal(t))),
            currency=parse("currency", lambda t: t if is_known_currency(t) else _raise()),
            purchased_at=parse("purchased_at", _instant),
            expires_at=parse("expires_at", _instant, optional=True))
        if purchase.purchase_id in seen:
            raise InputError(f"{where}, purchase_id: {purchase.purchase_id!r} appears more than once")
        if purchase.expires_at is not None and purchase.expires_at <= purchase.purchased_at:
            raise InputError(f"{where}, expires_at: not after purchased_at")
        seen.add(purchase.purchase_id)
        out.append(purchase)
    return out


def _raise():
    raise ValueError


def _positive(value: Decimal) -> Decimal:
    if not value.is_finite() or value <= 0:
        raise ValueError
    return value


def _not_negative(value: Decimal) -> Decimal:
    if not value.is_finite() or value < 0:
        raise ValueError
    return value


def _instant(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
