"""The wallet engine: one customer's credits replayed in event time.

A batch run only replays what a real-time system would have done: per customer, every credit
event of its history in time order. At one instant expiries come first (a grant is usable on
[granted_at, expires_at)), then grants, then consumption. Credits are drawn from the grant that
expires first, then free grants before paid ones, then the oldest. A grant that expires at a
period's end expires in that period. An event the wallet cannot cover buys auto top-ups (up to
the plan's cap), or is billed (or blocked past the plan's grace) by units.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal

from transforms.credits.grants import booked_price, expiry
from transforms.credits.model import ZERO, CreditEvent, Entry, Grant, WalletReplay
from transforms.engine.dims import parsed_dims
from transforms.inputs.plans import ConsumeByDimension, Credits, PlanFile
from transforms.money import decimal_text
from transforms.periods import Period


def credits_needed(plan: PlanFile, event: CreditEvent) -> Decimal:
    """Credits one event draws: `consume` per unit, or the event's rated amount for a money wallet."""
    credits = plan.plan.credits
    if credits.unit == "money":
        dims = parsed_dims(event.dims)
        charge = next(c for c in plan.plan.charges if c.prices(event.meter, dims))
        return event.quantity * charge.price.unit_price / charge.price.per
    rate = credits.consume[event.meter]
    if isinstance(rate, ConsumeByDimension):
        by = rate.by
        value = parsed_dims(event.dims).get(by)
        rate = rate.rates.get(value, rate.default)
        if rate is None:
            raise ValueError(f"no credit rate for {event.meter} with {by}={value!r}")  # checked upstream
    return event.quantity * rate


def _draw_order(g: Grant) -> tuple:
    # expires first; then free before paid; then oldest
    return (g.expires_at is None, g.expires_at or datetime.max, g.price > 0, g.granted_at, g.grant_id)


class Wallet:
    """One customer's wallet while it replays: grants pending and active, the balance, and what
    was fired or bought per period (alerts once a period, top-ups up to the plan's cap). Every
    movement is appended to `out` (a WalletReplay shared by the customers of one replay)."""

    def __init__(self, customer_id: str, grants: list[Grant], replay: WalletReplay):
        self.customer_id = customer_id
        self.pending = sorted(grants, key=lambda g: (g.granted_at, g.grant_id))
        self.active: list[Grant] = []
        self.out = replay
        self.balance = ZERO
        self.top_ups: dict[Period, int] = defaultdict(int)
        self.low_fired: set[Period] = set()
        self.exhausted_fired: set[Period] = set()
        self.limit_fired: set[Period] = set()
        self.grace_used: dict[tuple, Decimal] = defaultdict(Decimal)
        self._drawn_from: list[Grant] | None = None  # active in draw order, until active changes

    def _entry(self, g: Grant, kind: str, credits: Decimal, at: datetime, **extra) -> None:
        self.balance += credits
        self.out.entries.append(Entry(self.customer_id, g.grant_id, kind, credits, self.balance, at, g.expires_at,
                                      g.cost_basis, g.subscription_id, **extra))

    def _grant(self, g: Grant) -> None:
        g.remaining = g.credits
        self.active.append(g)
        self._drawn_from = None
        self.out.grants[g.grant_id] = g
        self._entry(g, g.kind, g.credits, g.granted_at)



    def _expire(self, g: Grant) -> None:
        self.active.remove(g)
        self._drawn_from = None
        left = g.remaining
        carried = min(left, g.rollover_max)
        g.remaining = ZERO
        if carried > 0:
            # unused plan credits move into the next period on the same cost basis: out of this
            # grant, into a new one; neither billed nor recognized
            self._entry(g, "rollover", -carried, g.expires_at)
            nxt = Period.containing(g.expires_at.date())
            # granted like any grant, after every expiry of this instant
            self.pending.append(Grant(f"{g.grant_id}/rollover", g.customer_id, g.subscription_id, "rollover",
                                      g.expires_at, nxt.end_at, carried,
                                      g.price * carried / g.credits if g.price else ZERO, g.currency))
            self.pending.sort(key=lambda p: (p.granted_at, p.grant_id))
        if left - carried > 0:
            self._entry(g, "expire", -(left - carried), g.expires_at)

    def advance(self, to: datetime, inclusive: bool = True) -> None:
        """Apply expiries and grants up to instant `to` (expiries first at one instant)."""
        def due(at: datetime | None) -> bool:
            return at is not None and (at <= to if inclusive else at < to)

        if not (self.pending and due(self.pending[0].granted_at)) and not any(due(g.expires_at) for g in self.active):
            return  # nothing happens by `to`: the common case, once per event
        while True:
            exp = min((g for g in self.active if g.expires_at is not None), key=lambda g: (g.expires_at, g.grant_id),
                      default=None)
            nxt = self.pending[0] if self.pending else None
            exp_at = exp.expires_at if exp else None
            grant_at = nxt.granted_at if nxt else None
            candidates = [t for t in (exp_at, grant_at) if t is not None and (t <= to if inclusive else t < to)]
            if not candidates:
                return
            t = min(candidates)
            if exp_at == t:
                self._expire(exp)
            else:
                self._grant(self.pending.pop(0))

    def consume_in_order(self, events: list[CreditEvent], plans_of: dict[str, PlanFile]
                         ) -> tuple[datetime, str] | None:
        """Consume `events` in event time (event_at, then event_id), each after the expiries and
        grants due at its instant; the (event_at, event_id) of the last one (None: no events).
        `plans_of` maps event_id to the plan version in force for that event."""
        ordered = sorted(events, key=lambda e: (e.event_at, e.event_id))
        for ev in ordered:
            self.advance(ev.event_at)
            self.consume(ev, plans_of[ev.event_id])
        return (ordered[-1].event_at, ordered[-1].event_id) if ordered else None

    def consume(self, ev: CreditEvent, plan: PlanFile) -> None:
        spec = plan.plan.credits
        period = Period.containing(ev.event_at.date())
        need = credits_needed(plan, ev)
        drawn = self._draw(need, ev)
        if need - drawn > 0 and spec.top_up and spec.top_up.auto:
            while need - drawn > 0 and self._buy_top_up(spec, plan, ev, period):
                drawn += self._draw(need - drawn, ev)
        if need > 0 and spec.top_up and spec.top_up.auto and self.balance < spec.top_up.below:
            self._buy_top_up(spec, plan, ev, period)
        low = spec.low_balance if spec.low_balance is not None else (spec.top_up.below if spec.top_up else None)
        if low is not None and self.balance < low and period not in self.low_fired:
            self.low_fired.add(period)
            self.out.alerts.append((ev.customer_id, ev.subscription_id, "credits_low", decimal_text(low),
                                    decimal_text(self.balance),
                                    ev.event_at))
        uncovered = need - drawn
        key = (ev.subscription_id, ev.segment_no, ev.meter, ev.dims)
        units = ev.quantity * uncovered / need if need else ZERO
        if uncovered > 0:
            if period not in self.exhausted_fired:
                self.exhausted_fired.add(period)
                self.out.alerts.append((ev.customer_id, ev.subscription_id, "credits_exhausted", "0",
                                        decimal_text(uncovered), ev.event_at))
            if spec.when_exhausted == "block":
                grace_key = (ev.subscription_id, period)
                served = min(uncovered, spec.grace - self.grace_used[grace_key])
                self.grace_used[grace_key] += served
                billed_units = ev.quantity * served / need
                self.out.blocked_units[key] += units - billed_units
                units = billed_units
        self.out.billable_units[key] += units
        self.out.billable_by_day[key + (ev.event_at.date(),)] += units

    def _draw(self, need: Decimal, ev: CreditEvent) -> Decimal:
        drawn = ZERO
        if self._drawn_from is None:  # sorted once per change of the active grants, not per event
            self._drawn_from = sorted(self.active, key=_draw_order)
        for g in self._drawn_from:
            if drawn >= need:
                break
            take = min(g.remaining, need - drawn)
            if take > 0:
                g.remaining -= take
                drawn += take
                self._entry(g, "consume", -take, ev.event_at, event_id=ev.event_id, meter=ev.meter)
        return drawn

    def _buy_top_up(self, spec: Credits, plan: PlanFile, ev: CreditEvent, period: Period) -> bool:
        top = spec.top_up
        if top.max_per_period is not None and self.top_ups[period] >= top.max_per_period:
            # the plan's cap binds: said once per period, on the first pack it keeps back
            if period not in self.limit_fired:
                self.limit_fired.add(period)
                self.out.alerts.append((ev.customer_id, ev.subscription_id, "top_up_limit_reached",
                                        str(top.max_per_period), decimal_text(self.balance), ev.event_at))
            return False
        self.top_ups[period] += 1
        n = self.top_ups[period]
        g = Grant(f"{ev.subscription_id}/{period}/top_up{n}", ev.customer_id, ev.subscription_id, "top_up",
                  ev.event_at, expiry(top.expires, ev.event_at, period.end_at), top.credits,
                  booked_price(top.price, plan.plan.currency, plan.plan.rounding), plan.plan.currency)
        self._grant(g)
        self.out.alerts.append((ev.customer_id, ev.subscription_id, "auto_top_up", str(n), decimal_text(top.price),
                                ev.event_at))
        return True
