"""Graduated percentage: tiers over the period's summed amount, each with its own percent.

Each tier's rate applies to the part of the amount that falls in it, plus the tier's flat fee
once the tier is reached (Lago's graduated percentage model). With 1% up to 1,000 and 2% above,
$1,050 costs 1,000 x 1% + 50 x 2% = $11.00.
"""
from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from transforms.pricing.base import ZERO, Money, PriceModel, Rating, Step, Units, Usage, fmt_units
from transforms.pricing.percentage import percent
from transforms.pricing.tiers import bands, check_bounds


class PercentTier(PriceModel):
    up_to: Units | None  # an amount of money: bounds count the summed quantities
    rate: Money
    flat_fee: Money = ZERO

    @field_validator("rate")
    @classmethod
    def _percent(cls, v):
        return percent(v)

    @field_validator("flat_fee")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise ValueError("must not be negative (give discounts as credit notes)")
        return v


class Price(PriceModel):
    model: Literal["graduated_percentage"]
    tiers: list[PercentTier]

    @field_validator("tiers")
    @classmethod
    def _contiguous(cls, v):
        check_bounds(v)
        return v


def rate(price: Price, usage: Usage) -> Rating:
    steps: list[Step] = []
    for band in bands(usage.units, price.tiers):
        tier = price.tiers[band.index]
        amount = band.units * tier.rate / 100
        steps.append(Step(f"{band.label}: {tier.rate}% of {fmt_units(band.units)}", band.units, None, amount))
        # Charged once the tier is reached (some amount falls in it), as in graduated: $0 costs $0.
        if band.units > 0 and tier.flat_fee:
            steps.append(Step(f"{band.label}: flat fee", ZERO, None, tier.flat_fee))
    return Rating(sum((s.amount for s in steps), ZERO), tuple(steps))
