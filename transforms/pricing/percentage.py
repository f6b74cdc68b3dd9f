"""Percentage: a percent of each transaction's amount plus a fixed fee per transaction.

Quantities are money amounts (50 = $50.00). Each event not among the period's first
`free_events` (by event time) pays amount x rate / 100 + fixed_fee, clamped to [min_fee, max_fee]
when those are set; free events pay nothing. At 1.2% + $0.10, a $50 payment costs $0.70.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from transforms.pricing.base import ZERO, Money, PriceModel, Rating, Step, Usage, fmt_units
from transforms.pricing.tiers import field_error


def percent(v: Decimal) -> Decimal:
    """A rate as plan files write it, in percent: "1.2" is 1.2% (also graduated_percentage's tiers)."""
    if not 0 <= v <= 100:
        raise ValueError(f'rate is a percent of the amount between 0 and 100 ("1.2" means 1.2%), got {v}')
    return v


class Price(PriceModel):
    model: Literal["percentage"]
    rate: Money
    fixed_fee: Money = ZERO
    free_events: Annotated[int, Field(strict=True)] = 0
    min_fee: Money | None = None
    max_fee: Money | None = None

    @field_validator("rate")
    @classmethod
    def _percent(cls, v):
        return percent(v)

    @field_validator("fixed_fee", "min_fee", "max_fee")
    @classmethod
    def _non_negative(cls, v):
        if v is not None and v < 0:
            raise ValueError("must not be negative")
        return v

    @field_validator("free_events")
    @classmethod
    def _count(cls, v):
        if v < 0:
            raise ValueError("free_events is a number of events: 0 or more")
        return v

    @model_validator(mode="after")
    def _range(self):
        if self.min_fee is not None and self.max_fee is not None and self.max_fee < self.min_fee:
            raise field_error(("max_fee",), f"{self.max_fee} is below min_fee {self.min_fee}; "
                                            f"the per-event maximum must be at least the minimum", self.max_fee)
        return self

    @property
    def prices_each_event(self) -> bool:
        return bool(self.free_events) or self.min_fee is not None or self.max_fee is not None


def rate(price: Price, usage: Usage) -> Rating:
    amounts = usage.event_quantities
    if not amounts and usage.units > 0:
        if price.prices_each_event:
            raise ValueError("percentage with free_events, min_fee or max_fee prices each event: "
                             "pass usage.event_quantities in event-time order")
        steps = _rate_and_fixed_fee(price, usage.units, usage.events)
        return Rating(sum((s.amount for s in steps), ZERO), tuple(steps))
    if not amounts:
        amounts = (ZERO,) * usage.events  # no money moved: every event's amount is 0
    allowance = sum(amounts, ZERO) - usage.units
    if allowance < 0:
        raise ValueError(f"event_quantities add up to {sum(amounts, ZERO)}, less than usage.units "
                         f"{usage.units}: pass every event's amount")
    amounts = _after_allowance(amounts, allowance)

    # The period's first events by event time are free of both the rate and the fixed fee.
    free, paid = amounts[:price.free_events], amounts[price.free_events:]
    steps = []
    if free:
        steps.append(Step(f"{len(free)} free events ({fmt_units(sum(free, ZERO))})", sum(free, ZERO), None, ZERO))
    steps += _rate_and_fixed_fee(price, sum(paid, ZERO), len(paid))
    steps += _min_max_adjustments(price, paid)
    return Rating(sum((s.amount for s in steps), ZERO), tuple(steps))


def _after_allowance(amounts: tuple[Decimal, ...], allowance: Decimal) -> tuple[Decimal, ...]:
    # The charge's `included` amount (the caller bills usage.units = total - included) is free of
    # the rate, and it covers the period's earliest amounts by event time; each event still counts
    # for the fixed fee, as in Lago's "free units (total amount)".
    out = []
    for amount in amounts:
        covered = min(amount, allowance)
        allowance -= covered
        out.append(amount - covered)
    return tuple(out)


def _rate_and_fixed_fee(price: Price, amount: Decimal, events: int) -> list[Step]:
    # A percent is not a unit price, so the step carries none; its label says the rate.
    steps = [Step(f"{price.rate}% of {fmt_units(amount)}", amount, None, amount * price.rate / 100)]
    if price.fixed_fee and events:
        steps.append(Step(f"fixed fee: {events} events at {price.fixed_fee}", Decimal(events), price.fixed_fee,
                          events * price.fixed_fee))
    return steps


def _min_max_adjustments(price: Price, paid: tuple[Decimal, ...]) -> list[Step]:
    # min_fee and max_fee bound each paid event's own fee, not the period's total.
    raised, capped = [], []
    for amount in paid:
        fee = amount * price.rate / 100 + price.fixed_fee
        if price.min_fee is not None and fee < price.min_fee:
            raised.append(price.min_fee - fee)
        elif price.max_fee is not None and fee > price.max_fee:
            capped.append(price.max_fee - fee)
    steps = []
    if raised:
        steps.append(Step(f"{len(raised)} events raised to the {price.min_fee} minimum fee",
                          Decimal(len(raised)), price.min_fee, sum(raised, ZERO)))
    if capped:
        steps.append(Step(f"{len(capped)} events capped at the {price.max_fee} maximum fee",
                          Decimal(len(capped)), price.max_fee, sum(capped, ZERO)))
    return steps
