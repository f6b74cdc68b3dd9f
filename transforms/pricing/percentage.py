"""Percentage: a percent of each transaction's amount plus a fixed fee per transaction.

Quantities are money amounts (50 = $50.00). Each event not among the period's first
`free_events` (by event time) pays amount x rate / 100 + fixed_fee, clamped to [min_fee, max_fee]
when those are set; free events pay nothing. At 1.2% + $0.10, a $50 payment costs $0.70.

The amounts come as a tuple or as a Polars Decimal column. A column is rated without a Python
object per event: only the events the allowance or `free_events` reach are looked at one by one;
the others count through sums, and the events min_fee raises (or max_fee caps) are those whose
amount lies below (above) the amount at which the fee reaches that bound.
"""
from __future__ import annotations

from dataclasses import replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal
from typing import Annotated, Literal

import polars as pl
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
    if isinstance(amounts, pl.Series):
        return _rate_column(price, usage, amounts)
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


def _min_max_adjustments(price: Price, paid: tuple[Decimal, ...],
                         tail: tuple[tuple[int, Decimal], tuple[int, Decimal]] = ((0, ZERO), (0, ZERO))
                         ) -> list[Step]:
    # min_fee and max_fee bound each paid event's own fee, not the period's total. `tail` adds
    # further paid events by (count, amount sum) of those raised and of those capped: each one's
    # adjustment is bound - (amount x rate / 100 + fixed_fee), so their sum is
    # count x (bound - fixed_fee) - amount sum x rate / 100.
    raised, capped = [], []
    for amount in paid:
        fee = amount * price.rate / 100 + price.fixed_fee
        if price.min_fee is not None and fee < price.min_fee:
            raised.append(price.min_fee - fee)
        elif price.max_fee is not None and fee > price.max_fee:
            capped.append(price.max_fee - fee)
    (tail_raised, raised_sum), (tail_capped, capped_sum) = tail
    raised_count, capped_count = len(raised) + tail_raised, len(capped) + tail_capped
    if tail_raised:
        raised.append(tail_raised * (price.min_fee - price.fixed_fee) - raised_sum * price.rate / 100)
    if tail_capped:
        capped.append(tail_capped * (price.max_fee - price.fixed_fee) - capped_sum * price.rate / 100)
    steps = []
    if raised:
        steps.append(Step(f"{raised_count} events raised to the {price.min_fee} minimum fee",
                          Decimal(raised_count), price.min_fee, sum(raised, ZERO)))
    if capped:
        steps.append(Step(f"{capped_count} events capped at the {price.max_fee} maximum fee",
                          Decimal(capped_count), price.max_fee, sum(capped, ZERO)))
    return steps


# Up to this many events, a column costs more in Polars calls than its events cost in Python.
_FEW = 200

# Wide enough for any threshold: a division rounded toward the side it is compared on never
# passes a point of the amounts' grid (see _amounts_below and _amounts_above).
_UP, _DOWN = Context(prec=80, rounding=ROUND_CEILING), Context(prec=80, rounding=ROUND_FLOOR)


def _rate_column(price: Price, usage: Usage, amounts: pl.Series) -> Rating:
    """`rate` for amounts in a Polars Decimal column: equal to rating the same amounts as a tuple."""
    def as_tuple(column: pl.Series) -> tuple[Decimal, ...]:
        return tuple(column.to_list())

    if len(amounts) <= _FEW:
        return rate(price, replace(usage, event_quantities=as_tuple(amounts)))
    total = amounts.sum()
    if amounts.min() < 0 or _beyond_exact(price, total, len(amounts), amounts.dtype.scale):
        # refunds (the allowance then covers them differently), or sums past Python decimal's
        # 28 digits (where it rounds): the rule as written, event by event
        return rate(price, replace(usage, event_quantities=as_tuple(amounts)))
    allowance = total - usage.units
    if allowance < 0:
        raise ValueError(f"event_quantities add up to {total}, less than usage.units "
                         f"{usage.units}: pass every event's amount")
    # The allowance reaches the events whose earlier amounts add up to less than it.
    reached = int(((amounts.cum_sum() - amounts) < allowance).sum()) if allowance > 0 else 0
    head_size = max(reached, price.free_events)
    head = _after_allowance(as_tuple(amounts.head(head_size)), allowance)
    tail = amounts.slice(head_size)  # untouched by the allowance, and all paid
    free, paid_head = head[:price.free_events], head[price.free_events:]
    tail_sum = tail.sum() if len(tail) else ZERO
    steps = []
    if free:
        steps.append(Step(f"{len(free)} free events ({fmt_units(sum(free, ZERO))})", sum(free, ZERO), None, ZERO))
    steps += _rate_and_fixed_fee(price, sum(paid_head, ZERO) + tail_sum, len(paid_head) + len(tail))
    steps += _min_max_adjustments(price, paid_head, _bounded_tail(price, tail))
    return Rating(sum((s.amount for s in steps), ZERO), tuple(steps))


def _beyond_exact(price: Price, total: Decimal, events: int, scale: int) -> bool:
    # The rule as written is exact while every fee and sum fits Python decimal's 28 digits; past
    # that it rounds, and only the event-by-event rule gives its result.
    bounds = [b for b in (price.fixed_fee, price.min_fee, price.max_fee) if b is not None]
    whole = max(total.adjusted() + 1 + max(price.rate.adjusted() + 1, 1),
                len(str(events)) + max(max(b.adjusted() + 1, 1) for b in bounds)) + 1
    decimals = max([scale + 2 - price.rate.as_tuple().exponent] + [-b.as_tuple().exponent for b in bounds])
    return whole + decimals > 26


def _bounded_tail(price: Price, tail: pl.Series) -> tuple[tuple[int, Decimal], tuple[int, Decimal]]:
    """(count, amount sum) of the tail's events raised to min_fee, and of those capped at max_fee."""
    none = (0, ZERO)
    if not len(tail):
        return none, none

    def counted(column: pl.Series) -> tuple[int, Decimal]:
        return (len(column), column.sum()) if len(column) else none

    raised = capped = none
    if price.min_fee is not None:
        raised = counted(_amounts_below(tail, price, price.min_fee))
    if price.max_fee is not None:
        capped = counted(_amounts_above(tail, price, price.max_fee))
    return raised, capped


def _amounts_below(amounts: pl.Series, price: Price, bound: Decimal) -> pl.Series:
    # fee < bound  <=>  amount x rate < (bound - fixed_fee) x 100; on the amounts' grid of
    # 10^-scale, amount < T  <=>  amount < T rounded up to that grid.
    if price.rate == 0:
        return amounts if price.fixed_fee < bound else amounts.head(0)
    grid = Decimal(1).scaleb(-amounts.dtype.scale)
    limit = _UP.divide((bound - price.fixed_fee) * 100, price.rate).quantize(grid, context=_UP)
    if limit > amounts.max():
        return amounts
    if limit <= amounts.min():
        return amounts.head(0)
    return amounts.filter(amounts < pl.Series([limit], dtype=amounts.dtype))


def _amounts_above(amounts: pl.Series, price: Price, bound: Decimal) -> pl.Series:
    # fee > bound  <=>  amount > T = (bound - fixed_fee) x 100 / rate  <=>  amount > T rounded
    # down to the amounts' grid.
    if price.rate == 0:
        return amounts if price.fixed_fee > bound else amounts.head(0)
    grid = Decimal(1).scaleb(-amounts.dtype.scale)
    limit = _DOWN.divide((bound - price.fixed_fee) * 100, price.rate).quantize(grid, context=_DOWN)
    if limit < amounts.min():
        return amounts
    if limit >= amounts.max():
        return amounts.head(0)
    return amounts.filter(amounts > pl.Series([limit], dtype=amounts.dtype))
