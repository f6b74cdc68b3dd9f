"""Graduated: usage fills the tiers in order and each tier prices only the units that fall in it.

amount = sum over the tiers reached of (units in the tier x unit_price / per + flat_fee). With
100 units at $1.00 and then $0.50, 101 units cost 100 x 1.00 + 1 x 0.50 = $100.50.
"""
from __future__ import annotations

from typing import Literal

from transforms.pricing.base import ZERO, Rating, Step, Usage, fmt_units, per_suffix
from transforms.pricing.tiers import UnitTiers, bands


class Price(UnitTiers):
    model: Literal["graduated"]


def rate(price: Price, usage: Usage) -> Rating:
    steps: list[Step] = []
    for band in bands(usage.units, price.tiers):
        tier = price.tiers[band.index]
        amount = band.units * tier.unit_price / price.per
        label = f"{band.label}: {fmt_units(band.units)} units at {tier.unit_price}{per_suffix(price.per)}"
        steps.append(Step(label, band.units, tier.unit_price, amount, price.per))
        # A tier's flat fee is charged once, when the tier is reached: when some units fall in it.
        # So 0 units cost nothing, even with a flat fee on the first tier. Lago (since
        # getlago/lago-api#5760) and OpenMeter (openmeterio/openmeter#2119) bill the first tier's
        # flat fee at 0 units; billrun keeps "no usage, no usage charge": a fee owed whatever the
        # usage belongs in the plan's `fixed_fees`, which are also prorated.
        if band.units > 0 and tier.flat_fee:
            steps.append(Step(f"{band.label}: flat fee", ZERO, None, tier.flat_fee))
    return Rating(sum((s.amount for s in steps), ZERO), tuple(steps))
