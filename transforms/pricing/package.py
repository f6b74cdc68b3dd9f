"""Package: units are sold in whole packages of `package_size`; a started package is a whole package.

amount = ceil(units / package_size) x package_price: at $5.00 per 100 calls, 101 calls are two
packages, $10.00. 0 units start no package and cost nothing.
"""
from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from transforms.pricing.base import Money, PriceModel, Rating, Step, Units, Usage, fmt_units


class Price(PriceModel):
    model: Literal["package"]
    package_size: Units
    package_price: Money

    @field_validator("package_size")
    @classmethod
    def _positive(cls, v):
        if v <= 0:
            raise ValueError("package_size must be a positive number of units")
        return v

    @field_validator("package_price")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise ValueError("package_price must not be negative")
        return v


def rate(price: Price, usage: Usage) -> Rating:
    # Rounded up, because a package counts from its first unit. divmod keeps it exact (no
    # rounding of units / package_size at the context's precision).
    whole, rest = divmod(usage.units, price.package_size)
    packages = whole + (1 if rest > 0 else 0)
    amount = packages * price.package_price
    noun = "package" if packages == 1 else "packages"
    label = (f"{fmt_units(packages)} {noun} of {fmt_units(price.package_size)} units at "
             f"{price.package_price} ({fmt_units(usage.units)} units)")
    return Rating(amount, (Step(label, usage.units, price.package_price, amount, price.package_size),))
