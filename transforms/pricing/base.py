"""The one contract every charge model keeps.

A charge model is a module with a pydantic `Price` class (its `model:` literal is the key in the
registry) and `rate(price, usage) -> Rating`. `rate` is pure and returns the *unrounded* amount
plus the steps that explain it (tiers crossed, packages started, free events); rounding happens
once, later, on the invoice line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from transforms.money import decimal_text

ZERO = Decimal(0)


def _quoted_decimal(value: Any) -> Decimal:
    # Prices and rates must be quoted in plan files: YAML reads 0.1 as a binary float, and a
    # price that is off by 1e-17 is a price a pricing team never wrote.
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f'quote money as a string, e.g. "{value}" (got {type(value).__name__} {value!r})')
    try:
        parsed = Decimal(value.strip())
    except Exception:
        raise ValueError(f"{value!r} is not a decimal number") from None
    if not parsed.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    return parsed


def _unit_count(value: Any) -> Decimal:
    # Unit counts (per, up_to, package_size, included) may be integers or quoted decimals,
    # never floats, for the same reason as prices.
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f'write unit counts as integers or quoted decimals (got {value!r})')
    if isinstance(value, int):
        return Decimal(value)
    return _quoted_decimal(value)


Money = Annotated[Decimal, BeforeValidator(_quoted_decimal)]
"""An exact amount in the currency's major unit, written as a quoted string in plan files."""

Units = Annotated[Decimal, BeforeValidator(_unit_count)]
"""A count of metered units (tokens, calls, GB), an integer or a quoted decimal."""


def _positive_per(value: Decimal) -> Decimal:
    if value <= 0:
        raise ValueError("per must be a positive number of units")
    return value


PerUnits = Annotated[Decimal, BeforeValidator(_unit_count), AfterValidator(_positive_per)]
"""How many units a unit price is for (`per: 1000000` prices per million); positive."""


class PriceModel(BaseModel):
    """Base of every charge model's price block: strict, so a typo is an error, not a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Usage:
    """What one charge bills for one subscription segment (or one group of it) in one period.

    `units` are the billable units after the allowance; `event_quantities` are the same events'
    quantities in event-time order, given only to models that price per event (percentage).
    """

    units: Decimal
    events: int = 0
    event_quantities: tuple[Decimal, ...] = field(default=())


@dataclass(frozen=True)
class Step:
    """One line of a rating's audit trail, e.g. `tier 2 (10,000,001 and up)`."""

    label: str
    units: Decimal
    unit_price: Decimal | None
    amount: Decimal
    per: Decimal | None = None  # the unit price is per this many units (None: per unit)

    def as_dict(self) -> dict[str, str | None]:
        return {
            "label": self.label,
            "units": decimal_text(self.units),
            "unit_price": None if self.unit_price is None else decimal_text(self.unit_price),
            "per": None if self.per is None else decimal_text(self.per),
            "amount": decimal_text(self.amount),
        }

    @property
    def price_text(self) -> str:
        """`2.50 / 1,000,000` or `0.04`: the unit price as an invoice shows it."""
        if self.unit_price is None:
            return ""
        per = f" / {fmt_units(self.per)}" if self.per is not None and self.per != 1 else ""
        return f"{self.unit_price}{per}"


@dataclass(frozen=True)
class Rating:
    """An unrounded amount and the steps that add up to it."""

    amount: Decimal
    steps: tuple[Step, ...] = ()


@lru_cache(maxsize=1024)
def per_suffix(per: Decimal) -> str:
    """How a label names the price's block: "" per unit, " per 1,000,000" per million. The same
    few per catalog, named once each (equal values have the same text: `fmt_units` normalizes)."""
    return "" if per == 1 else f" per {fmt_units(per)}"


def fmt_units(value: Decimal) -> str:
    """Units for labels: `1000000` -> `1,000,000`, `2.50` -> `2.5`, `-0` -> `0`. Decimal's own `,f`
    format writes a whole number's digits as an int's would (`1E+6` -> `1,000,000`); only zero's
    sign is dropped. An invoice prints ~13 of these, so no int() round trip."""
    normalized = value.normalize()
    return f"{normalized:,f}" if normalized else "0"
