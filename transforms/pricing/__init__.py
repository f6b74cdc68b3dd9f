"""Charge models, one module each, behind one signature: `rate(price, usage) -> Rating`.

`PRICE_MODELS` is the one table that maps a plan's `model:` value to its module; `Price` is the
discriminated union pydantic uses to check plan files, so an unknown model fails when plans load,
never at rating time.
"""
from __future__ import annotations

from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

from transforms.pricing import graduated, graduated_percentage, package, percentage, standard, volume
from transforms.pricing.base import Money, Rating, Step, Units, Usage

PRICE_MODELS: dict[str, ModuleType] = {
    "standard": standard,
    "package": package,
    "graduated": graduated,
    "volume": volume,
    "percentage": percentage,
    "graduated_percentage": graduated_percentage,
}

# Each module names its pydantic price block `Price`; its `model:` literal must equal its key here.
Price = Annotated[Union[tuple(module.Price for module in PRICE_MODELS.values())],
                  Field(discriminator="model")]


def rate(price, usage: Usage) -> Rating:
    """Rate `usage` with the module registered for `price.model`."""
    return PRICE_MODELS[price.model].rate(price, usage)


__all__ = ["PRICE_MODELS", "Price", "Money", "Rating", "Step", "Units", "Usage", "rate"]
