"""The wallet engine: one customer's credits replayed in event time.

A batch run only replays what a real-time system would have done: per customer, every credit
event of its history in time order. At one instant expiries come first (a grant is usable on
[granted_at, expires_at)), then grants, then consumption. Credits are drawn from the grant that
expires first, then free grants before paid ones, then the oldest. A grant that expires at a
period's end expires in that period. An event the wallet cannot cover buys auto top-ups (up to
the plan's cap), or is billed (or blocked past the plan's grace) by units.

Most events change nothing but balances: they draw from the grant in use and leave it holding
credits, with no grant, expiry, top-up, alert or period end among them. The wallet moves
through such a stretch at once (cumulative sums over the events' columns find where it ends,
the balances after each event are the running sums the one-by-one replay would compute, and
its consume entries are kept as columns, a ConsumeRun). So does a wallet with nothing left once
nothing more can happen in the period (exhaustion said, top-ups capped, overage): its events
only bill by units until the next grant. Only the events at a breakpoint are consumed one at a
time.
"""
from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from itertools import accumulate

from transforms.credits.grants import booked_price, expiry
from transforms.credits.model import ZERO, ConsumeRun, CreditEvent, Entry, Grant, WalletReplay
from transforms.engine.dims import parsed_dims
from transforms.inputs.plans import ConsumeByDimension, Credits, PlanFile
from transforms.money import decimal_text
from transforms.periods import Period


def credit_rate(plan: PlanFile, meter: str, dims: str) -> tuple[Decimal, Decimal | None]:
    """What one unit of `meter` with `dims` draws: (credits per unit, None) for a credit wallet,
    (unit price, per) for a money wallet, whose event draws quantity x unit price / per."""
    credits = plan.plan.credits
    if credits.unit == "money":
        parsed = parsed_dims(dims)
        charge = next(c for c in plan.plan.charges if c.prices(meter, parsed))
        return charge.price.unit_price, charge.price.per
    rate = credits.consume[meter]
    if isinstance(rate, ConsumeByDimension):
        by = rate.by
        value = parsed_dims(dims).get(by)
        rate = rate.rates.get(value, rate.default)
        if rate is None:
            raise ValueError(f"no credit rate for {meter} with {by}={value!r}")  # checked upstream
    return rate, None


@dataclass(frozen=True)
class EventColumns:
    """Credit events as columns (index k is one event), customers one after another, each
    customer's in event time (event_at, then event_id); `need` is what each draws, `plan` the
    plan version in force for it, `same_plan_to` the end of its run of events under that plan."""

    subscription_id: list[str]
    segment_no: list[int | None]
    event_id: list[str]
    event_at: list[datetime]
    day: list[date]
    meter: list[str]
    dims: list[str]
    quantity: list[Decimal]
    need: list[Decimal]
    plan: list[PlanFile]
    same_plan_to: list[int]

    @classmethod
    def listed(cls, events: list[CreditEvent], plans: list[PlanFile], bounds: list[int]) -> EventColumns:
        """`events` made by hand (each customer's in event time; customers start at `bounds`,
        which end with the length) under `plans`, as columns, their decimals as given."""
        rates = [credit_rate(p, e.meter, e.dims) for e, p in zip(events, plans, strict=True)]
        return cls([e.subscription_id for e in events], [e.segment_no for e in events],
                   [e.event_id for e in events], [e.event_at for e in events], [e.event_at.date() for e in events],
                   [e.meter for e in events], [e.dims for e in events], [e.quantity for e in events],
                   needed([e.quantity for e in events], rates), plans, same_plan_runs(plans, bounds))

    def event(self, k: int, customer_id: str) -> CreditEvent:
        return CreditEvent(customer_id, self.subscription_id[k], self.segment_no[k], self.event_id[k],
                           self.event_at[k], self.meter[k], self.dims[k], self.quantity[k])


def _draw_order(g: Grant) -> tuple:
    # expires first; then free before paid; then oldest
    return (g.expires_at is None, g.expires_at or datetime.max, g.price > 0, g.granted_at, g.grant_id)


class Wallet:
    """One customer's wallet while it replays: grants pending and active, the balance, and what
    was fired or bought per period (alerts once a period, top-ups up to the plan's cap). Every
    movement is appended to `out` (a WalletReplay shared by the customers of one replay)."""

    def __init__(self, customer_id: str, grants: list[Grant], replay: WalletReplay, stretches: bool = True):
        self.customer_id = customer_id
        self.stretches = stretches  # False: every event one at a time (the reference the tests compare with)
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
        self.out.movements.append(Entry(self.customer_id, g.grant_id, kind, credits, self.balance, at, g.expires_at,
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
        """Consume hand-made `events` (any order; `plans_of` maps event_id to the plan version
        in force for it) as `consume_events` does; the (event_at, event_id) of the last one."""
        ordered = sorted(events, key=lambda e: (e.event_at, e.event_id))
        columns = EventColumns.listed(ordered, [plans_of[e.event_id] for e in ordered], [0, len(ordered)])
        return self.consume_events(columns, 0, len(ordered))

    def consume_events(self, ev: EventColumns, lo: int, hi: int) -> tuple[datetime, str] | None:
        """Consume events lo..hi-1 of `ev` (this customer's, in event time), each after the
        expiries and grants due at its instant; the (event_at, event_id) of the last one (None:
        no events). Stretches that change nothing but balances go at once (`_stretch_end`)."""
        if lo == hi:
            return None
        so_far = list(accumulate(ev.need[lo:hi], initial=ZERO))  # so_far[k - lo]: drawn by events lo..k-1
        # the bisections need sums that never fall: a negative need (a price below zero) goes
        # event by event
        stretches = self.stretches and min(ev.need[lo:hi]) >= 0
        k = lo
        while k < hi:
            self.advance(ev.event_at[k])
            end = self._stretch_end(ev, k, hi, so_far, lo) if stretches else k
            if end > k:
                k = self._consume_stretch(ev, k, end)
            else:
                self.consume(ev.event(k, self.customer_id), ev.plan[k], ev.need[k])
                k += 1
        return ev.event_at[hi - 1], ev.event_id[hi - 1]

    def _stretch_end(self, ev: EventColumns, k: int, hi: int, so_far: list[Decimal], lo: int) -> int:
        """Where the stretch of events from k ends (k: none). A stretch holds the events before
        the next grant, expiry or period end, under the same plan, that the grant in use covers
        while it keeps credits and the balance stays at or above the plan's (uncapped) top-up and
        (unfired) low-balance thresholds: found on the cumulative sums, `_consume_stretch` checks
        it on the exact ones. With no grant holding credits, the events before the next grant are
        a stretch too once nothing more can happen in the period (`_exhausted`): they bill by units."""
        using = self._in_use()
        spec = ev.plan[k].plan.credits
        period = Period.containing(ev.event_at[k].date())
        if using is None and not self._exhausted(spec, period):
            return k
        limit = period.end_at
        if self.pending:
            limit = min(limit, self.pending[0].granted_at)
        for g in self.active:
            if g.expires_at is not None and g.expires_at < limit:
                limit = g.expires_at
        end = bisect_left(ev.event_at, limit, k, min(hi, ev.same_plan_to[k]))  # events strictly before it
        if using is None:
            return end
        base = so_far[k - lo]
        # drawn by events k..m-1 (so_far[m - lo] - base) must stay below what the grant holds
        end = min(end, bisect_left(so_far, base + using.remaining, k - lo, end - lo + 1) - 1 + lo)
        floor = self._floor(spec, period)
        if floor is not None:
            end = min(end, bisect_right(so_far, base + self.balance - floor, k - lo, end - lo + 1) - 1 + lo)
        return max(end, k)

    def _exhausted(self, spec: Credits, period: Period) -> bool:
        """Whether an event the wallet cannot cover only bills by units in `period`: its
        exhaustion alert fired, no top-up to buy (none, or the cap reached and said), the
        low-balance alert fired or not due, and overage billing (grace under `block` counts down
        event by event)."""
        top = spec.top_up
        low = spec.low_balance if spec.low_balance is not None else (top.below if top else None)
        return (spec.when_exhausted != "block" and period in self.exhausted_fired
                and not (top and top.auto and not self._capped(spec, period))
                and not (low is not None and self.balance < low and period not in self.low_fired))

    def _capped(self, spec: Credits, period: Period) -> bool:
        """Whether the plan's top-up cap binds in `period` and its alert was said: a top-up tried
        then changes nothing."""
        top = spec.top_up
        return (top.max_per_period is not None and self.top_ups.get(period, 0) >= top.max_per_period
                and period in self.limit_fired)

    def _in_use(self) -> Grant | None:
        """The grant the next draw takes from: the first in draw order still holding credits."""
        if self._drawn_from is None:
            self._drawn_from = sorted(self.active, key=_draw_order)
        return next((g for g in self._drawn_from if g.remaining > 0), None)

    def _floor(self, spec: Credits, period: Period) -> Decimal | None:
        """The balance below which consuming does more than draw: an auto top-up (the cap not
        reached), or the low balance alert not yet fired in `period` (None: neither)."""
        top = spec.top_up
        floors = [top.below] if top and top.auto and not self._capped(spec, period) else []
        low = spec.low_balance if spec.low_balance is not None else (top.below if top else None)
        if low is not None and period not in self.low_fired:
            floors.append(low)
        return max(floors) if floors else None

    def _consume_stretch(self, ev: EventColumns, k: int, end: int) -> int:
        """Consume events k..end-1, each drawn wholly from the grant in use: the balance and the
        grant's credits run down by the events' needs in order, with the same Decimal operations
        as one event at a time; the entries are a ConsumeRun. Returns where it stopped: `end`, or
        earlier at the first event after which the exact sums break the stretch (rounding)."""
        g = self._in_use()
        spec = ev.plan[k].plan.credits
        if g is None:
            return self._bill_stretch(ev, k, end, spec)
        floor = self._floor(spec, Period.containing(ev.event_at[k].date()))
        drawing = [i for i in range(k, end) if ev.need[i]]  # an event that needs nothing draws nothing
        taken = [ev.need[i] - ZERO for i in drawing]
        left = list(accumulate(taken, operator.sub, initial=g.remaining))[1:]
        balances = list(accumulate([-t for t in taken], operator.add, initial=self.balance))
        ok = len(taken)
        while ok and not (left[ok - 1] > 0 and (floor is None or balances[ok] >= floor)):
            ok -= 1  # both fall as events draw: the first that breaks ends the stretch
        if floor is not None and self.balance < floor:
            return self._one(ev, k)
        if ok < len(taken):
            end = drawing[ok]
            drawing, taken, left, balances = drawing[:ok], taken[:ok], left[:ok], balances[:ok + 1]
            if end == k:
                return self._one(ev, k)
        if taken:
            g.remaining = left[-1]
            self.balance = balances[-1]
            self.out.movements.append(ConsumeRun(
                self.customer_id, g.grant_id, g.expires_at, g.cost_basis, g.subscription_id,
                [ev.event_id[i] for i in drawing], [ev.meter[i] for i in drawing],
                [ev.event_at[i] for i in drawing], [-t for t in taken], balances[1:]))
        billable, by_day = self.out.billable_units, self.out.billable_by_day
        for i in range(k, end):
            need = ev.need[i]
            # what the one-by-one replay adds: the units nothing left uncovered, a zero whose
            # exponent is that of quantity x (need - drawn) / need
            units = ev.quantity[i] * (need - (ZERO + (need - ZERO))) / need if need else ZERO
            key = (ev.subscription_id[i], ev.segment_no[i], ev.meter[i], ev.dims[i])
            billable[key] += units
            by_day[key + (ev.day[i],)] += units
        return end

    def _bill_stretch(self, ev: EventColumns, k: int, end: int, spec: Credits) -> int:
        """Events k..end-1 of an exhausted wallet (`_exhausted`): each draws nothing and bills its
        units, quantity x (need - nothing drawn) / need, as one event at a time would."""
        billable, by_day = self.out.billable_units, self.out.billable_by_day
        for i in range(k, end):
            need = ev.need[i]
            units = ev.quantity[i] * (need - ZERO) / need if need else ZERO
            key = (ev.subscription_id[i], ev.segment_no[i], ev.meter[i], ev.dims[i])
            billable[key] += units
            by_day[key + (ev.day[i],)] += units
        return end

    def _one(self, ev: EventColumns, k: int) -> int:
        self.consume(ev.event(k, self.customer_id), ev.plan[k], ev.need[k])
        return k + 1

    def consume(self, ev: CreditEvent, plan: PlanFile, need: Decimal) -> None:
        """Consume one event that needs `need` credits under `plan`."""
        spec = plan.plan.credits
        period = Period.containing(ev.event_at.date())
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


def needed(quantities: list[Decimal], rates: list[tuple[Decimal, Decimal | None]]) -> list[Decimal]:
    """Credits each event draws, from its quantity and its `credit_rate`."""
    return [q * r if per is None else q * r / per for q, (r, per) in zip(quantities, rates, strict=True)]


def same_plan_runs(plans: list, bounds: list[int]) -> list[int]:
    """Per event, the end of its run of consecutive events under the same plan object, runs cut
    at `bounds` (each customer's first event, and the end)."""
    out = [0] * len(plans)
    cuts = set(bounds)
    end = len(plans)
    for k in range(len(plans) - 1, -1, -1):
        if k + 1 in cuts or plans[k + 1] is not plans[k]:
            end = k + 1
        out[k] = end
    return out
