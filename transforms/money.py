"""Money: ISO 4217 minor units and the one rounding rule of billrun.

Amounts are `Decimal` until an invoice line is finished; then `to_minor` rounds once, with the
plan's rule, to an integer count of the currency's minor unit. Totals are sums of rounded lines.
"""
from __future__ import annotations

from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from functools import lru_cache

import polars as pl
from babel.numbers import UnknownCurrencyError, format_currency, get_currency_name, get_currency_precision

ROUNDING_MODES = {"half_up": ROUND_HALF_UP, "half_even": ROUND_HALF_EVEN}


@lru_cache(maxsize=None)
def minor_exponent(currency: str) -> int:
    """Digits after the decimal point of `currency` (USD 2, JPY 0, KWD 3), from Babel's CLDR data."""
    if not is_known_currency(currency):
        raise ValueError(f"unknown currency {currency!r} (use an ISO 4217 code such as USD, EUR, JPY)")
    return get_currency_precision(currency)


@lru_cache(maxsize=None)
def is_known_currency(currency: str) -> bool:
    if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
        return False
    try:
        get_currency_name(currency, locale="en")
    except UnknownCurrencyError:
        return False
    # Babel names unknown three-letter codes after themselves; CLDR knows the real ones.
    return get_currency_name(currency, locale="en") != currency


@lru_cache(maxsize=None)
def _minor_unit(currency: str) -> Decimal:
    """10 ** the minor digits of `currency`: one minor unit's count per major unit."""
    return Decimal(10) ** minor_exponent(currency)


_ONE = Decimal(1)


def to_minor(amount: Decimal, currency: str, rounding: str = "half_up") -> int:
    """Round `amount` (major units) once, with `rounding`, to integer minor units. A close rounds
    every invoice line and grant with it, so the currency's scale is worked out once."""
    return int((amount * _minor_unit(currency)).quantize(_ONE, rounding=ROUNDING_MODES[rounding]))


def to_minor_column(amount: pl.Expr, div: pl.Expr, half_even: pl.Expr) -> pl.Expr:
    """`to_minor` over columns, for a path that prices many rows at once (spend alerts): `amount`
    a non-negative integer count of 10^-scale, `div` 10^(scale - the currency's minor digits),
    `half_even` the plan's rule (else half_up). Integer arithmetic only, so exact;
    tests/test_money_columns.py holds it to `to_minor`."""
    whole, rest = amount // div, amount % div
    up = pl.when(half_even).then((2 * rest > div) | ((2 * rest == div) & (whole % 2 == 1)))
    return whole + up.otherwise(2 * rest >= div).cast(pl.Int128)


def from_minor(amount_minor: int, currency: str) -> Decimal:
    """Integer minor units back to an exact major-unit Decimal (for display only)."""
    return Decimal(amount_minor).scaleb(-minor_exponent(currency))


def format_money(amount_minor: int, currency: str, locale: str = "en_US") -> str:
    """`1234` USD -> `$12.34`; the currency's own digits, never a float on the way."""
    return format_currency(from_minor(amount_minor, currency), currency, locale=locale,
                           currency_digits=True)


def decimal_text(value: Decimal) -> str:
    """A decimal as plain text without exponent or trailing zeros: 1000000, 0.00375, 12.5."""
    text = format(value.normalize(), "f")
    return text if text != "-0" else "0"
