"""Volume: the tier the period's total lands in prices every unit, plus that tier's flat fee.

With 100 units at $0.10 and then $0.08, 100 units cost 100 x 0.10 = $10.00 and 101 units cost
101 x 0.08 = $8.08: crossing a bound lowers the price of all units, so a total can go down.
"""
from __future__ import annotations

from typing import Literal

from transforms.pricing.base import ZERO, Rating, Step, Usage, fmt_units, per_suffix
from transforms.pricing.tiers import UnitTiers, landing_band


class Price(UnitTiers):
    model: Literal["volume"]


def rate(price: Price, usage: Usage) -> Rating:
    band = landing_band(usage.units, price.tiers)
    tier = price.tiers[band.index]
    amount = usage.units * tier.unit_price / price.per
    label = f"{band.label}: {fmt_units(usage.units)} units at {tier.unit_price}{per_suffix(price.per)}"
    steps = [Step(label, usage.units, tier.unit_price, amount, price.per)]
    # 0 units land in the first tier but reach no tier, so they cost nothing, flat fee included:
    # graduated's rule (see there, and why Lago and OpenMeter differ), which keeps a one-tier
    # volume price equal to the graduated one.
    if usage.units > 0 and tier.flat_fee:
        steps.append(Step(f"{band.label}: flat fee", ZERO, None, tier.flat_fee))
    return Rating(sum((s.amount for s in steps), ZERO), tuple(steps))
