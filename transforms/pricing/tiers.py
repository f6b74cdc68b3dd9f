"""Tiers, shared by graduated, volume and graduated_percentage: their checks and how usage fills them.

`up_to` is inclusive: a tier covers what is above the previous tier's bound up to and including its
own (the first tier starts above 0); only the last tier is open (`up_to: null`), so every unit has
a price. A tier is *reached* when some usage falls in it; 0 units reach no tier.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Sequence

from pydantic import ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from transforms.pricing.base import ZERO, Money, PerUnits, PriceModel, Units, fmt_units


def field_error(loc: tuple[str | int, ...], message: str, value: object) -> ValidationError:
    """An error placed on the field at fault (e.g. `tiers[1].up_to`), not on the whole price block.

    pydantic-core re-raises a ValidationError from a validator under the validator's own location
    (the path wrap validators rely on), so the plan loader reports `charges[0].price.tiers[1].up_to`;
    tests/test_pricing.py pins that path.
    """
    error = PydanticCustomError("price_block", message)
    return ValidationError.from_exception_data("price", [InitErrorDetails(type=error, loc=loc, input=value)])


class UnitTier(PriceModel):
    """One tier priced per unit (per `per` units of the price block), plus an optional flat fee."""

    up_to: Units | None
    unit_price: Money
    flat_fee: Money = ZERO

    @field_validator("unit_price", "flat_fee")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise ValueError("must not be negative (give discounts as credit notes)")
        return v


class UnitTiers(PriceModel):
    """The body of a graduated or volume price: unit prices are per `per` units, bounds count units."""

    per: PerUnits = Decimal(1)
    tiers: list[UnitTier]

    @field_validator("tiers")
    @classmethod
    def _contiguous(cls, v):
        check_bounds(v)
        return v


def check_bounds(tiers: Sequence) -> None:
    """Contiguous, increasing bounds with only the last tier open; raises on the first bad `up_to`."""
    if not tiers:
        raise ValueError("at least one tier is needed, e.g. [{up_to: null, unit_price: \"0.10\"}]")
    previous = ZERO
    last = len(tiers) - 1
    for i, tier in enumerate(tiers):
        loc = (i, "up_to")  # under the `tiers` field this validator is attached to
        if tier.up_to is None and i < last:
            raise field_error(loc, "only the last tier may be open (up_to: null); give this tier an "
                                   "upper bound", None)
        if tier.up_to is None:
            continue
        if i == last:
            raise field_error(loc, f"the last tier must be open (up_to: null) so usage above "
                                   f"{tier.up_to} has a price", tier.up_to)
        if tier.up_to <= previous:
            what = "above 0" if i == 0 else f"above the previous tier's {previous}"
            raise field_error(loc, f"{tier.up_to} is not {what}; tiers must be contiguous and increasing",
                              tier.up_to)
        previous = tier.up_to


@dataclass(frozen=True)
class Band:
    """The part of the usage that falls in one tier."""

    index: int            # 0-based position in `tiers`
    above: Decimal        # the previous tier's bound (exclusive)
    up_to: Decimal | None
    units: Decimal

    @property
    def label(self) -> str:
        """`tier 2 (101 to 1,000)`: the range as a customer reads it, bounds inclusive."""
        return f"tier {self.index + 1} ({tier_range(self.above, self.up_to)})"


def tier_range(above: Decimal, up_to: Decimal | None) -> str:
    whole = above == above.to_integral_value()
    start = fmt_units(above + 1) if whole else f"above {fmt_units(above)}"
    if up_to is None:
        return "all usage" if above == 0 else (f"{start} and up" if whole else start)
    if above == 0:
        return f"first {fmt_units(up_to)}"
    return f"{start} to {fmt_units(up_to)}" if whole else f"{start} up to {fmt_units(up_to)}"


def bands(units: Decimal, tiers: Sequence) -> list[Band]:
    """The tiers `units` reach, each with the units that fall in it (graduated filling).

    0 units reach no tier; they are shown as 0 units of the first tier, so the invoice still says
    which price applied.
    """
    out: list[Band] = []
    above = ZERO
    for i, tier in enumerate(tiers):
        if units <= above and out:
            break
        top = units if tier.up_to is None else min(units, tier.up_to)
        out.append(Band(i, above, tier.up_to, max(top - above, ZERO)))
        if tier.up_to is None:
            break
        above = tier.up_to
    return out


def landing_band(units: Decimal, tiers: Sequence) -> Band:
    """The one tier the total lands in (volume): the first whose bound holds all of `units`."""
    above = ZERO
    for i, tier in enumerate(tiers):
        if tier.up_to is None or units <= tier.up_to:
            return Band(i, above, tier.up_to, units)
        above = tier.up_to
    raise ValueError("tiers have no open last tier")  # check_bounds makes this unreachable
