"""The credit wallet: grants, purchases, top-ups, consumption and expiry, replayed in event time.

A batch run only replays what a real-time system would have done: per customer, every credit
event of its history in time order. At one instant expiries come first (a grant is usable on
[granted_at, expires_at)), then grants, then consumption. Credits are drawn from the grant that
expires first, then free grants before paid ones, then the oldest. A grant that expires at a
period's end expires in that period. Every movement is a ledger entry with the customer's total
balance after it; credits are conserved: granted = consumed + expired + balance.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from decimal import Decimal

import isodate
import polars as pl

from transforms.errors import InputError
from transforms.invoices import Line, cycle_collector_paused, parsed_dims
from transforms.money import decimal_text, from_minor, is_known_currency, to_minor
from transforms.periods import Period, utc_midnight
from transforms.plans import Catalog, ConsumeByDimension, Credits, PlanFile
from transforms.pricing.base import fmt_units
from transforms.reference import Subscription, bound_versions, plan_on

ZERO = Decimal(0)


@dataclass(frozen=True)
class Purchase:
    """A credit pack bought outside the plan (credit_purchases input)."""

    purchase_id: str
    customer_id: str
    credits: Decimal
    price: Decimal
    currency: str
    purchased_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreditEvent:
    """A billed usage event of a meter its plan pays with credits."""

    customer_id: str
    subscription_id: str
    segment_no: int | None  # None for events of earlier periods (only their effect on balances matters)
    event_id: str
    event_at: datetime
    meter: str
    dims: str
    quantity: Decimal


@dataclass
class Grant:
    grant_id: str
    customer_id: str
    subscription_id: str | None
    kind: str                    # grant | purchase | top_up | rollover
    granted_at: datetime
    expires_at: datetime | None
    credits: Decimal
    price: Decimal               # what was paid for these credits (0 when free)
    currency: str | None
    remaining: Decimal = ZERO
    rollover_max: Decimal = ZERO

    @property
    def cost_basis(self) -> Decimal:
        return self.price / self.credits if self.price else ZERO


@dataclass(frozen=True, slots=True)
class Entry:
    customer_id: str
    grant_id: str
    kind: str                    # grant | purchase | top_up | consume | expire | rollover
    credits: Decimal             # signed
    balance_after: Decimal
    occurred_at: datetime
    expires_at: datetime | None
    cost_basis: Decimal
    subscription_id: str | None = None
    event_id: str | None = None
    meter: str | None = None


@dataclass
class Outcome:
    """What the replay means for billing, revenue and alerts."""

    entries: list[Entry] = field(default_factory=list)
    # per (subscription_id, segment_no, meter, dims): units left for the charges (uncovered, or
    # covered by grace) and units blocked (not billed)
    billable_units: dict[tuple, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    # the same by UTC day of the event (key + (day,)), for spend replayed in event time
    billable_by_day: dict[tuple, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    blocked_units: dict[tuple, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    grants: dict[str, Grant] = field(default_factory=dict)
    alerts: list[tuple] = field(default_factory=list)  # (customer, subscription, kind, threshold, value, at)


def expiry(spec: str, granted_at: datetime, period_end: datetime) -> datetime | None:
    if spec == "never":
        return None
    if spec == "period_end":
        return period_end
    return granted_at + isodate.parse_duration(spec)


def credits_needed(plan: PlanFile, event: CreditEvent) -> Decimal:
    """Credits one event draws: `consume` per unit, or the event's rated amount for a money wallet."""
    credits = plan.plan.credits
    if credits.unit == "money":
        dims = parsed_dims(event.dims)
        charge = next(c for c in plan.plan.charges if c.prices(event.meter, dims))
        return event.quantity * charge.price.unit_price / charge.price.per
    rate = credits.consume[event.meter]
    if isinstance(rate, ConsumeByDimension):
        value = parsed_dims(event.dims).get(rate.by)
        rate = rate.rates.get(value, rate.default)
        if rate is None:
            raise ValueError(f"no credit rate for {event.meter} with {rate.by}={value!r}")  # checked upstream
    return event.quantity * rate


def plan_grants(subs: list[Subscription], catalog: Catalog, until: Period) -> list[Grant]:
    """The grants plans give each subscription from its start through `until`."""
    out = []
    timelines: dict[tuple, list] = {}  # bound_versions depends on these three fields only
    for sub in subs:
        if sub.start_date >= until.end:
            continue
        key = (sub.plan, sub.plan_version, sub.start_date)
        timeline = timelines.get(key)
        if timeline is None:
            timeline = timelines[key] = bound_versions(sub, catalog)  # plan_on's, once per key
        if all(plan.plan.credits is None for _, plan in timeline):
            continue  # no version of its plan grants credits: nothing to walk month by month
        period = Period.containing(sub.start_date)
        first = True
        while period <= until and (sub.end_date is None or period.start < sub.end_date):
            start = max(period.start, sub.start_date)
            plan = [plan for starts_on, plan in timeline if starts_on <= start][-1]  # plan_on(sub, catalog, start)
            spec: Credits | None = plan.plan.credits
            for i, g in enumerate(spec.grants if spec else ()):
                if g.every == "once" and not first:
                    continue
                days = (min(period.end, sub.end_date or period.end) - start).days
                granted_at = utc_midnight(start)
                out.append(Grant(
                    grant_id=f"{sub.subscription_id}/{period if g.every == 'period' else 'once'}/g{i + 1}",
                    customer_id=sub.customer_id, subscription_id=sub.subscription_id,
                    kind="grant", granted_at=granted_at, expires_at=expiry(g.expires, granted_at, period.end_at),
                    credits=g.credits,
                    price=_booked(g.allocated * days / period.days if g.every == "period" else g.allocated,
                                  plan.plan.currency, plan.plan.rounding),
                    currency=plan.plan.currency, rollover_max=g.rollover_max))
            first = False
            period = period.next()
    return out


def purchase_grants(purchases: list[Purchase]) -> list[Grant]:
    return [Grant(grant_id=f"purchase/{p.purchase_id}", customer_id=p.customer_id, subscription_id=None,
                  kind="purchase", granted_at=p.purchased_at, expires_at=p.expires_at, credits=p.credits,
                  price=_booked(p.price, p.currency, "half_up"), currency=p.currency) for p in purchases]


def _booked(amount: Decimal, currency: str, rounding: str) -> Decimal:
    """What is paid for a grant, as its invoice line bills it (rounded once): the grant's price
    and so its cost basis, so that revenue recognized from it adds up to the cent billed."""
    return from_minor(to_minor(amount, currency, rounding), currency)


def _draw_order(g: Grant) -> tuple:
    # expires first; then free before paid; then oldest
    return (g.expires_at is None, g.expires_at or datetime.max, g.price > 0, g.granted_at, g.grant_id)


class _Wallet:
    def __init__(self, customer_id: str, grants: list[Grant], outcome: Outcome):
        self.customer_id = customer_id
        self.pending = sorted(grants, key=lambda g: (g.granted_at, g.grant_id))
        self.active: list[Grant] = []
        self.out = outcome
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
                  _booked(top.price, plan.plan.currency, plan.plan.rounding), plan.plan.currency)
        self._grant(g)
        self.out.alerts.append((ev.customer_id, ev.subscription_id, "auto_top_up", str(n), decimal_text(top.price),
                                ev.event_at))
        return True


def replay(customer_id: str, events: list[CreditEvent], grants: list[Grant], plans_of: dict[str, PlanFile],
           until: datetime, outcome: Outcome) -> None:
    """Replay one customer's wallet up to `until` (expiries at `until` included). `plans_of`
    maps event_id to the plan version in force for that event."""
    wallet = _Wallet(customer_id, grants, outcome)
    for ev in sorted(events, key=lambda e: (e.event_at, e.event_id)):
        wallet.advance(ev.event_at)
        wallet.consume(ev, plans_of[ev.event_id])
    wallet.advance(until)


def wallet_history(subs: list[Subscription], catalog: Catalog, purchases: list[Purchase],
                   events: list[CreditEvent], period: Period) -> Outcome:
    """Every customer's wallet from its first grant or event through the end of `period`."""
    return _replay_all(history_grants(subs, catalog, purchases, period), subs, catalog, events, period)


def history_grants(subs: list[Subscription], catalog: Catalog, purchases: list[Purchase],
                   period: Period) -> list[Grant]:
    """Every grant and purchase from each subscription's start through `period` (see wallet_history)."""
    return plan_grants(subs, catalog, period) + purchase_grants(
        [p for p in purchases if p.purchased_at < period.end_at])


def _by_customer(items: list) -> dict[str, list]:
    """Grants or events grouped by customer_id, each customer's in their given order."""
    out: dict[str, list] = defaultdict(list)
    for item in items:
        out[item.customer_id].append(item)
    return out


def _replay_all(grants: list[Grant], subs: list[Subscription], catalog: Catalog, events: list[CreditEvent],
                period: Period) -> Outcome:
    """Replay every customer's wallet, each with its grants and events, through `period`."""
    by_customer_grants, by_customer_events = _by_customer(grants), _by_customer(events)
    plans_of = _plans_of(events, subs, catalog)
    outcome = Outcome()
    for customer in sorted(set(by_customer_grants) | set(by_customer_events)):
        replay(customer, by_customer_events.get(customer, []), by_customer_grants.get(customer, []), plans_of,
               period.end_at, outcome)
    return outcome


def _plans_of(events: list[CreditEvent], subs: list[Subscription], catalog: Catalog) -> dict[str, PlanFile]:
    """event_id -> the plan version in force for the event."""
    subs_by_id = {s.subscription_id: s for s in subs}
    plans_of: dict[str, PlanFile] = {}
    plan_that_day: dict[tuple[str, object], PlanFile] = {}  # one lookup per subscription and day, not per event
    for ev in events:
        key = (ev.subscription_id, ev.event_at.date())
        if key not in plan_that_day:
            plan_that_day[key] = plan_on(subs_by_id[ev.subscription_id], catalog, key[1])
        plans_of[ev.event_id] = plan_that_day[key]
    return plans_of


def in_period(entry: Entry, period: Period) -> bool:
    """Entries belong to the period that contains them; an expiry at a period's end instant
    belongs to the period whose credits it ends."""
    return _within(entry, period.start_at, period.end_at)


def _within(entry: Entry, start_at: datetime, end_at: datetime) -> bool:
    """`in_period` with the period's bounds worked out once, for loops over every entry."""
    if entry.kind == "expire" or (entry.kind == "rollover" and entry.credits < 0):
        return start_at < entry.occurred_at <= end_at
    return start_at <= entry.occurred_at < end_at



LEDGER_SCHEMA = {
    "entry_id": pl.String, "customer_id": pl.String, "grant_id": pl.String, "kind": pl.String,
    "credits": pl.String, "balance_after": pl.String, "occurred_at": pl.Datetime("us", "UTC"),
    "expires_at": pl.Datetime("us", "UTC"), "cost_basis": pl.String, "subscription_id": pl.String,
    "event_id": pl.String, "meter": pl.String, "period": pl.String,
}


@cycle_collector_paused()  # see transforms.invoices
def ledger_table(outcome: Outcome, period: Period) -> pl.DataFrame:
    """One row per wallet movement in `period`, in replay order (customer, then time), numbered
    L-2026-10-00000001...

    Built column by column (no dict per entry; a 50M-event close has millions of entries), the
    numbers and the period in Polars, and each distinct cost basis formatted once."""
    start_at, end_at = period.start_at, period.end_at
    entries = [e for e in outcome.entries if _within(e, start_at, end_at)]
    bases: dict[Decimal, str] = {}

    def basis_text(value: Decimal) -> str:
        text = bases.get(value)
        if text is None:
            text = bases[value] = decimal_text(value)
        return text

    columns = {
        "customer_id": [e.customer_id for e in entries], "grant_id": [e.grant_id for e in entries],
        "kind": [e.kind for e in entries], "credits": [decimal_text(e.credits) for e in entries],
        "balance_after": [decimal_text(e.balance_after) for e in entries],
        "occurred_at": [e.occurred_at for e in entries], "expires_at": [e.expires_at for e in entries],
        "cost_basis": [basis_text(e.cost_basis) for e in entries],
        "subscription_id": [e.subscription_id for e in entries], "event_id": [e.event_id for e in entries],
        "meter": [e.meter for e in entries],
    }
    schema = {c: t for c, t in LEDGER_SCHEMA.items() if c in columns}
    return pl.DataFrame(columns, schema=schema).select(
        pl.format(f"L-{period}-{{}}", (pl.int_range(1, pl.len() + 1)).cast(pl.String).str.zfill(8))
        .alias("entry_id"), *columns, pl.lit(str(period), dtype=pl.String).alias("period"))


def credit_lines(period: Period, outcome: Outcome, purchases: list[Purchase], subs: list[Subscription],
                 currency_of: dict[str, str], rounding_of: dict[str, str]) -> dict[str, list[Line]]:
    """Invoice lines for credits bought in `period`: auto top-ups on the subscription that
    bought them, and purchases on the invoice of the customer's subscription active at
    purchased_at."""
    lines: dict[str, list[Line]] = defaultdict(list)
    for g in sorted(outcome.grants.values(), key=lambda g: (g.granted_at, g.grant_id)):
        if g.kind == "top_up" and period.start_at <= g.granted_at < period.end_at:
            # numbered within the period, not timed: a correction that moves a top-up in time
            # is not a different top-up
            number = sum(1 for line in lines[g.subscription_id] if line.kind == "top_up") + 1
            lines[g.subscription_id].append(Line(
                kind="top_up", description=f"Automatic credit top-up #{number}, {fmt_units(g.credits)} credits",
                quantity=g.credits, unit="credits", amount=g.price,
                amount_minor=to_minor(g.price, g.currency, rounding_of[g.subscription_id])))
    for p in sorted(purchases, key=lambda p: (p.purchased_at, p.purchase_id)):
        if not period.start_at <= p.purchased_at < period.end_at:
            continue
        sub = next((s for s in subs if s.customer_id == p.customer_id and s.active_on(p.purchased_at.date())), None)
        if sub is None:
            raise InputError(f"credit_purchases {p.purchase_id}: customer {p.customer_id!r} has no subscription "
                             f"active at {p.purchased_at:%Y-%m-%d} to bill it on")
        if currency_of.get(sub.subscription_id, p.currency) != p.currency:
            raise InputError(f"credit_purchases {p.purchase_id}: currency {p.currency} but subscription "
                             f"{sub.subscription_id} bills in {currency_of[sub.subscription_id]}")
        lines[sub.subscription_id].append(Line(
            kind="credit_purchase", description=f"Credit pack {p.purchase_id}, {fmt_units(p.credits)} credits",
            quantity=p.credits, unit="credits", amount=p.price,
            amount_minor=to_minor(p.price, p.currency, rounding_of.get(sub.subscription_id, "half_up"))))
    return lines


def purchases_from(frame: pl.DataFrame, source: str, customers: set[str]) -> list[Purchase]:
    """Checked credit_purchases rows; a bad row fails the run naming the file, row and field."""
    required = ("purchase_id", "customer_id", "credits", "price", "currency", "purchased_at")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {', '.join(missing)}")
    out, seen = [], set()
    for i, row in enumerate(frame.cast({c: pl.String for c in frame.columns}).iter_rows(named=True), start=1):
        where = f"{source} row {i}"

        def parse(column, fn, optional=False, row=row, where=where):
            text = (row.get(column) or "").strip()
            if not text and optional:
                return None
            try:
                return fn(text)
            except (ValueError, ArithmeticError):
                raise InputError(f"{where}, {column}: {text!r} is not valid") from None
        purchase = Purchase(
            purchase_id=parse("purchase_id", lambda t: t or _raise()),
            customer_id=parse("customer_id", lambda t: t if t in customers else _raise()),
            credits=parse("credits", lambda t: _positive(Decimal(t))),
            price=parse("price", lambda t: _not_negative(Decimal(t))),
            currency=parse("currency", lambda t: t if is_known_currency(t) else _raise()),
            purchased_at=parse("purchased_at", _instant),
            expires_at=parse("expires_at", _instant, optional=True))
        if purchase.purchase_id in seen:
            raise InputError(f"{where}, purchase_id: {purchase.purchase_id!r} appears more than once")
        if purchase.expires_at is not None and purchase.expires_at <= purchase.purchased_at:
            raise InputError(f"{where}, expires_at: not after purchased_at")
        seen.add(purchase.purchase_id)
        out.append(purchase)
    return out


def _raise():
    raise ValueError


def _positive(value: Decimal) -> Decimal:
    if not value.is_finite() or value <= 0:
        raise ValueError
    return value


def _not_negative(value: Decimal) -> Decimal:
    if not value.is_finite() or value < 0:
        raise ValueError
    return value


def _instant(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def period_credit_events(per_event_usage: pl.DataFrame, segments: list) -> list[CreditEvent]:
    """The period's billed events that their segment's plan pays with credits."""
    plan_of = {(s.subscription.subscription_id, s.segment_no): s.plan.plan for s in segments}
    return [CreditEvent(customer_id, sub, seg, event_id, event_at, meter, dims, quantity)
            for sub, seg, meter, dims, quantity, customer_id, event_id, event_at in per_event_usage.select(
                "subscription_id", "segment_no", "meter", "dims", "quantity", "customer_id", "event_id",
                "event_at").iter_rows()
            if plan_of[(sub, seg)].consumes(meter)]


def credit_meters(segments: list) -> set[tuple[str, int, str]]:
    """(subscription_id, segment_no, meter) of every segment x meter paid with credits."""
    out = set()
    for s in segments:
        plan = s.plan.plan
        if plan.credits is not None:
            meters = [c.meter for c in plan.charges] if plan.credits.unit == "money" else plan.credits.consume
            out |= {(s.subscription.subscription_id, s.segment_no, m) for m in meters}
    return out


def per_event_charged(per_event_usage: pl.DataFrame, segments: list) -> pl.DataFrame:
    """The per-event rows the charges price: those of meters their segment does not pay with
    credits (what the wallet leaves of those is billed by units, see invoices.apply_credits)."""
    return per_event_usage.join(_credit_meters_frame(segments, per_event_usage), on=["subscription_id", "segment_no",
                                "meter"], how="anti", maintain_order="left")


def _credit_meters_frame(segments: list, like: pl.DataFrame) -> pl.DataFrame:
    """credit_meters as a frame, typed like the per-event table `like`."""
    return pl.DataFrame(sorted(credit_meters(segments)), schema={"subscription_id": pl.String,
                                                                 "segment_no": pl.Int64, "meter": pl.String},
                        orient="row").cast({"segment_no": like.schema["segment_no"]})


def credit_report(outcome: Outcome, period: Period, plan_of_sub: dict) -> list[dict]:
    """Per plan (or `purchases`): credits granted, consumed, expired in `period`, and the cost of
    what expired (breakage at expiry), so pricing can see whether allocations fit customers' use."""
    totals: dict[str, list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO, ZERO])
    for e in outcome.entries:
        if not in_period(e, period):
            continue
        g = outcome.grants[e.grant_id]
        plan = plan_of_sub.get(g.subscription_id)
        key = ("purchases" if g.kind == "purchase" or plan is None else f"{plan.plan} v{plan.version}", g.currency)
        acc = totals[key]
        if e.kind in ("grant", "purchase", "top_up"):
            acc[0] += e.credits
        elif e.kind == "consume":
            acc[1] -= e.credits
        elif e.kind == "expire":
            acc[2] -= e.credits
            acc[3] -= e.credits * e.cost_basis
    return [{"plan": plan, "currency": currency, "granted": decimal_text(v[0]), "consumed": decimal_text(v[1]),
             "expired": decimal_text(v[2]), "breakage_minor": to_minor(v[3], currency)}
            for (plan, currency), v in sorted(totals.items())]


BALANCES_SCHEMA = {
    "customer_id": pl.String, "grant_id": pl.String, "kind": pl.String, "subscription_id": pl.String,
    "granted_at": pl.Datetime("us", "UTC"), "expires_at": pl.Datetime("us", "UTC"), "credits": pl.String,
    "price": pl.String, "currency": pl.String, "cost_basis": pl.String, "opening": pl.String,
    "granted": pl.String, "consumed": pl.String, "expired": pl.String, "rolled_over": pl.String,
    "closing": pl.String, "period": pl.String,
}


def _grant_moves(outcome: Outcome, period: Period) -> dict[str, list[Decimal]]:
    """Per grant: [opening, granted, used, expired, rolled over] credits in `period`. A balance
    brought forward (`opening` entries of a run started from a close) is the grant's opening."""
    moves: dict[str, list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO, ZERO, ZERO])
    start_at, end_at = period.start_at, period.end_at  # once, not per entry
    for e in outcome.entries:
        kind, at = e.kind, e.occurred_at
        ends = kind == "expire" or (kind == "rollover" and e.credits < 0)  # see in_period
        if start_at < at <= end_at if ends else start_at <= at < end_at:
            acc = moves[e.grant_id]
            if kind == "consume":
                acc[2] -= e.credits
            elif kind == "opening":
                acc[0] += e.credits
            elif kind in ("grant", "purchase", "top_up") or (kind == "rollover" and e.credits > 0):
                acc[1] += e.credits
            elif kind == "expire":
                acc[3] -= e.credits
            else:
                acc[4] -= e.credits
        elif at <= start_at if ends else at < start_at:  # see _before
            moves[e.grant_id][0] += e.credits
    return moves


@cycle_collector_paused()  # see transforms.invoices
def balances_table(outcome: Outcome, period: Period) -> pl.DataFrame:
    """One row per grant alive at some point in `period`: opening + granted - consumed - expired
    - rolled over = closing. The closing balances of one period are the opening of the next."""
    moves = _grant_moves(outcome, period)
    rows = []
    for grant_id in sorted(moves):
        opening, granted, consumed, expired, rolled = moves[grant_id]
        closing = opening + granted - consumed - expired - rolled
        if opening == granted == consumed == expired == rolled == closing == 0:
            continue
        g = outcome.grants[grant_id]
        rows.append({"customer_id": g.customer_id, "grant_id": grant_id, "kind": g.kind,
                     "subscription_id": g.subscription_id, "granted_at": g.granted_at, "expires_at": g.expires_at,
                     "credits": decimal_text(g.credits), "price": decimal_text(g.price), "currency": g.currency,
                     "cost_basis": decimal_text(g.cost_basis), "opening": decimal_text(opening),
                     "granted": decimal_text(granted), "consumed": decimal_text(consumed),
                     "expired": decimal_text(expired), "rolled_over": decimal_text(rolled),
                     "closing": decimal_text(closing), "period": str(period)})
    return pl.DataFrame(rows, schema=BALANCES_SCHEMA)


def _before(entry: Entry, period: Period) -> bool:
    if entry.kind == "expire" or (entry.kind == "rollover" and entry.credits < 0):
        return entry.occurred_at <= period.start_at
    return entry.occurred_at < period.start_at


def grants_from_balances(balances: pl.DataFrame) -> list[Grant]:
    """Grants still holding credits at the end of a closed period (its credit_balances), ready to
    open the next period's wallets."""
    out = []
    for row in balances.iter_rows(named=True):
        closing = Decimal(row["closing"])
        if closing > 0:
            g = Grant(row["grant_id"], row["customer_id"], row["subscription_id"], row["kind"], row["granted_at"],
                      row["expires_at"], Decimal(row["credits"]), Decimal(row["price"]), row["currency"])
            out.append(g)
            g.opening = closing  # type: ignore[attr-defined]
    return out


def wallets_from_opening(opening: list[Grant], subs: list[Subscription], catalog: Catalog,
                         purchases: list[Purchase], events: list[CreditEvent], period: Period) -> Outcome:
    """Wallets of `period` started from the previous close's closing grants instead of a replay
    of all history: the plan grants and purchases of the period are added, then the period's
    events replayed. Opening grants enter at the period start with their remaining credits, as
    entries of kind `opening` (a balance brought forward, never billed again)."""
    return _replay_all(opening_grants(opening, subs, catalog, purchases, period), subs, catalog, events, period)


def opening_grants(opening: list[Grant], subs: list[Subscription], catalog: Catalog, purchases: list[Purchase],
                   period: Period) -> list[Grant]:
    """The previous close's closing grants brought forward, then the period's plan grants and
    purchases (see wallets_from_opening)."""
    fresh = [g for g in plan_grants(subs, catalog, period) + purchase_grants(purchases)
             if period.start_at <= g.granted_at < period.end_at]
    carried = [Grant(g.grant_id, g.customer_id, g.subscription_id, "opening", period.start_at, g.expires_at,
                     g.opening, g.price * g.opening / g.credits if g.price else ZERO, g.currency)
               for g in opening]
    return carried + fresh


@dataclass(frozen=True)
class GrantMovement:
    """One grant's credits over a period, as the invoice shows them:
    opening + granted - used - expired - rolled over = closing."""

    grant_id: str
    kind: str                    # grant | purchase | top_up | rollover | opening
    subscription_id: str | None
    granted_at: datetime
    expires_at: datetime | None
    currency: str | None
    cost_basis: Decimal
    opening: Decimal
    granted: Decimal
    used: Decimal
    expired: Decimal
    rolled_over: Decimal

    @property
    def closing(self) -> Decimal:
        return self.opening + self.granted - self.used - self.expired - self.rolled_over


@dataclass(frozen=True)
class CreditSummary:
    """One customer's credit wallet over one period, grant by grant (oldest first). A wallet
    belongs to the customer, not to a subscription: purchased packs serve every subscription."""

    customer_id: str
    grants: tuple[GrantMovement, ...]

    def total(self, column: str) -> Decimal:
        """The wallet's `opening`, `granted`, `used`, `expired`, `rolled_over` or `closing`."""
        return sum((getattr(g, column) for g in self.grants), ZERO)

    def value_minor(self, column: str, currency: str, rounding: str = "half_up") -> int:
        """What the credits of `column` cost when they were bought (credits x cost basis), in
        `currency`; free credits are worth nothing. Rounded once, for display."""
        return to_minor(sum((getattr(g, column) * g.cost_basis for g in self.grants if g.currency == currency),
                            ZERO), currency, rounding)


def credit_summaries(outcome: Outcome, period: Period) -> dict[str, CreditSummary]:
    """Per customer with credits moving or held in `period`: each grant's opening, granted, used,
    expired, rolled over and closing credits. The same movements as `balances_table`, grouped for
    the invoice; a balance brought forward (`opening` entries of a run started from a close) is
    the grant's opening, not a new grant."""
    moves = _grant_moves(outcome, period)
    by_customer: dict[str, list[GrantMovement]] = defaultdict(list)
    for grant_id, (opening, granted, used, expired, rolled) in moves.items():
        if opening == granted == used == expired == rolled == 0:
            continue
        g = outcome.grants[grant_id]
        by_customer[g.customer_id].append(GrantMovement(
            grant_id, g.kind, g.subscription_id, g.granted_at, g.expires_at, g.currency, g.cost_basis,
            opening, granted, used, expired, rolled))
    return {customer: CreditSummary(customer, tuple(sorted(rows, key=lambda m: (m.granted_at, m.grant_id))))
            for customer, rows in sorted(by_customer.items())}


# Night by night: each customer's wallet resumes from where the previous night left it.
#
# A customer's replay is a function of its grants and its events in (event_at, event_id) order,
# so the state after its last consumed event (a checkpoint) plus the events after it gives what
# a replay from the start gives. The checkpoint is taken before the wallet is advanced to the
# period's end: expiries and grants between the last event and the next one are applied when the
# next one arrives, exactly as in one replay. It also carries what the replay produced so far,
# with the consumption entries summed per grant: the nightly outputs (balances, credit lines,
# alerts, units left for the charges) read only those sums, never the per-event ledger.

CHECKPOINT_FORMAT = 1


def resume_days(checkpoint: dict | None, changed_from: dict[str, date] | None) -> dict[str, date | None]:
    """Per customer whose checkpointed wallet tonight's changes leave intact: the first day whose
    credit events it still has to consume (None: none, its usage did not change). A customer is
    left out, and replayed from the start, when its usage changed on or before the day of its
    last consumed event (a late event), or when there is no checkpoint or `changed_from` is None
    (anything may have changed)."""
    if checkpoint is None or changed_from is None:
        return {}
    out: dict[str, date | None] = {}
    for customer, state in checkpoint["customers"].items():
        day = changed_from.get(customer)
        last = state["last"]
        if day is None or last is None or day > datetime.fromisoformat(last[0]).date():
            out[customer] = day
    return out


def credit_events_since(per_event_usage: pl.DataFrame, segments: list,
                        since: dict[str, date | None]) -> list[CreditEvent]:
    """The period's credit events still to replay: a resumed customer's (in `since`) from its
    day on (none when its day is None), every other customer's all of them."""
    frame = per_event_usage.select("subscription_id", "segment_no", "meter", "dims", "quantity", "customer_id",
                                   "event_id", "event_at")
    frame = frame.join(_credit_meters_frame(segments, frame), on=["subscription_id", "segment_no", "meter"],
                       how="semi", maintain_order="left")
    if since:
        never = datetime.max.replace(tzinfo=timezone.utc)
        starts = pl.DataFrame({"customer_id": list(since),
                               "since_at": [utc_midnight(d) if d is not None else never for d in since.values()]},
                              schema={"customer_id": pl.String, "since_at": pl.Datetime("us", "UTC")})
        frame = (frame.join(starts, on="customer_id", how="left", maintain_order="left")
                 .filter(pl.col("since_at").is_null() | (pl.col("event_at") >= pl.col("since_at")))
                 .drop("since_at"))
    return period_credit_events(frame, segments)


def wallets_resumed(grants: list[Grant], subs: list[Subscription], catalog: Catalog, events: list[CreditEvent],
                    period: Period, checkpoint: dict | None, since: dict[str, date | None]
                    ) -> tuple[Outcome, dict]:
    """Every customer's wallet through `period`, as `_replay_all` gives it (with consumption
    entries summed per grant), and tonight's checkpoint. Customers in `since` continue from
    `checkpoint` with `events` (only their events after it); the others replay `grants` and
    `events` from the start."""
    by_customer_grants, by_customer_events = _by_customer(grants), _by_customer(events)
    plans_of = _plans_of(events, subs, catalog)
    outcome = Outcome()
    states = {}
    for customer in sorted(set(by_customer_grants) | set(by_customer_events) | set(since)):
        part = Outcome()
        if customer in since:
            wallet, last = _wallet_restored(customer, checkpoint["customers"][customer], part)
        else:
            wallet, last = _Wallet(customer, by_customer_grants.get(customer, []), part), None
        for ev in sorted(by_customer_events.get(customer, []), key=lambda e: (e.event_at, e.event_id)):
            wallet.advance(ev.event_at)
            wallet.consume(ev, plans_of[ev.event_id])
            last = (ev.event_at, ev.event_id)
        part.entries = _consumption_summed(part.entries, period)
        states[customer] = _wallet_saved(wallet, last)
        wallet.advance(period.end_at)  # on the wallet as tonight leaves it, after the checkpoint
        outcome.entries.extend(part.entries)
        outcome.billable_units.update(part.billable_units)  # keyed by subscription: one customer's
        outcome.billable_by_day.update(part.billable_by_day)
        outcome.blocked_units.update(part.blocked_units)
        outcome.grants.update(part.grants)
        outcome.alerts.extend(part.alerts)
    return outcome, {"format": CHECKPOINT_FORMAT, "period": str(period), "customers": states}


def checkpoint_bytes(checkpoint: dict) -> bytes:
    """The checkpoint as stored: JSON, decimals as exact strings, same inputs same bytes."""
    return (json.dumps(checkpoint, separators=(",", ":")) + "\n").encode()


def checkpoint_from(data: bytes, period: Period) -> dict | None:
    """A stored checkpoint, or None when it is of another format or period."""
    checkpoint = json.loads(data)
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("period") != str(period):
        return None
    return checkpoint


def _consumption_summed(entries: list[Entry], period: Period) -> list[Entry]:
    """The entries with each grant's consumption in `period` summed into one entry, at the place
    of its first. Sums are taken in replay order, so the per-grant totals are the ones the single
    entries give (negation is exact). Applied again to its own output plus later entries, it
    gives what it gives on all of them at once."""
    out: list[Entry] = []
    at: dict[str, int] = {}
    for e in entries:
        if e.kind != "consume" or not in_period(e, period):
            out.append(e)
        elif e.grant_id not in at:
            at[e.grant_id] = len(out)
            out.append(replace(e, event_id=None, meter=None))
        else:
            first = out[at[e.grant_id]]
            out[at[e.grant_id]] = replace(first, credits=first.credits + e.credits, balance_after=e.balance_after)
    return out


def _grant_saved(g: Grant) -> list:
    return [g.grant_id, g.customer_id, g.subscription_id, g.kind, _at_text(g.granted_at), _at_text(g.expires_at),
            str(g.credits), str(g.price), g.currency, str(g.remaining), str(g.rollover_max)]


def _grant_restored(row: list) -> Grant:
    gid, customer, sub, kind, granted_at, expires_at, credits, price, currency, remaining, rollover_max = row
    return Grant(gid, customer, sub, kind, _at(granted_at), _at(expires_at), Decimal(credits), Decimal(price),
                 currency, Decimal(remaining), Decimal(rollover_max))


def _wallet_saved(w: _Wallet, last: tuple[datetime, str] | None) -> dict:
    out = w.out
    return {
        "last": None if last is None else [_at_text(last[0]), last[1]],
        "balance": str(w.balance),
        "grants": [_grant_saved(g) for g in out.grants.values()],
        "active": [g.grant_id for g in w.active],
        "pending": [_grant_saved(g) for g in w.pending],
        "top_ups": [[str(p), n] for p, n in w.top_ups.items()],
        "low_fired": sorted(str(p) for p in w.low_fired),
        "exhausted_fired": sorted(str(p) for p in w.exhausted_fired),
        "limit_fired": sorted(str(p) for p in w.limit_fired),
        "grace_used": [[sub, str(p), str(v)] for (sub, p), v in w.grace_used.items()],
        "entries": [[e.customer_id, e.grant_id, e.kind, str(e.credits), str(e.balance_after), _at_text(e.occurred_at),
                     _at_text(e.expires_at), str(e.cost_basis), e.subscription_id, e.event_id, e.meter]
                    for e in out.entries],
        "billable_units": [[*k, str(v)] for k, v in out.billable_units.items()],
        "billable_by_day": [[*k[:4], k[4].isoformat(), str(v)] for k, v in out.billable_by_day.items()],
        "blocked_units": [[*k, str(v)] for k, v in out.blocked_units.items()],
        "alerts": [[*a[:5], _at_text(a[5])] for a in out.alerts],
    }


def _wallet_restored(customer_id: str, state: dict, out: Outcome) -> tuple[_Wallet, tuple[datetime, str] | None]:
    w = _Wallet(customer_id, [], out)
    for row in state["grants"]:
        g = _grant_restored(row)
        out.grants[g.grant_id] = g
    w.active = [out.grants[gid] for gid in state["active"]]
    w.pending = [_grant_restored(row) for row in state["pending"]]
    w.balance = Decimal(state["balance"])
    for p, n in state["top_ups"]:
        w.top_ups[Period.parse(p)] = n
    w.low_fired = {Period.parse(p) for p in state["low_fired"]}
    w.exhausted_fired = {Period.parse(p) for p in state["exhausted_fired"]}
    w.limit_fired = {Period.parse(p) for p in state.get("limit_fired", ())}  # absent in older checkpoints
    for sub, p, v in state["grace_used"]:
        w.grace_used[(sub, Period.parse(p))] = Decimal(v)
    out.entries = [Entry(c, gid, kind, Decimal(credits), Decimal(after), _at(at), _at(expires), Decimal(basis), sub,
                         event_id, meter)
                   for c, gid, kind, credits, after, at, expires, basis, sub, event_id, meter in state["entries"]]
    for *k, v in state["billable_units"]:
        out.billable_units[tuple(k)] = Decimal(v)
    for sub, seg, meter, dims, day, v in state["billable_by_day"]:
        out.billable_by_day[(sub, seg, meter, dims, date.fromisoformat(day))] = Decimal(v)
    for *k, v in state["blocked_units"]:
        out.blocked_units[tuple(k)] = Decimal(v)
    out.alerts = [(*a[:5], _at(a[5])) for a in state["alerts"]]
    last = state["last"]
    return w, None if last is None else (_at(last[0]), last[1])


def _at_text(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(timezone.utc).isoformat()


def _at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
