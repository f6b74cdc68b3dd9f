"""Standard: one unit price, optionally per a block of `per` units.

amount = units x unit_price / per, exact: 1,500 tokens at $2.50 per million is $0.00375, not a
whole million (rounding up to whole blocks is the `package` model's rule).
"""
from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import field_validator

from transforms.pricing.base import Money, PerUnits, PriceModel, Rating, Step, Usage, fmt_units, per_suffix


class Price(PriceModel):
    model: Literal["standard"]
    unit_price: Money
    per: PerUnits = Decimal(1)

    @field_validator("unit_price")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise ValueError("unit_price must not be negative")
        return v


def rate(price: Price, usage: Usage) -> Rating:
    amount = usage.units * price.unit_price / price.per
    label = f"{fmt_units(usage.units)} units at {price.unit_price}{per_suffix(price.per)}"
    return Rating(amount, (Step(label, usage.units, price.unit_price, amount, price.per),))
