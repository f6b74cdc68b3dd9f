"""Spend alerts, replayed in event time: the day a subscription's spend reached each threshold.

Spend is the period's usage charges so far (usage and overage lines, before any hard cap, after
credits): what a customer is about to be billed for what they used. Thresholds are fractions of
the budget (subscription override, else the plan's `spend_controls.budget`); without a budget,
usage plans alert at DEFAULT_AMOUNTS of their currency. `hard_cap_reached` fires on the day spend
reaches the cap. The close and the nightly runs call the same function on the same days, so they
fire the same alerts; an alert is identified by (customer, period, kind, threshold).

Only subscriptions whose whole-period spend reaches their lowest threshold are replayed. Their
per-day usage is summed cumulatively in Polars, so rating a day reads each (segment, meter,
dims)'s units so far instead of re-adding the month; and when every price of the subscription
can only grow with its units, the day a threshold was crossed is found by bisection.
"""
from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

import polars as pl

from transforms.collector import cycle_collector_paused
from transforms.engine.invoices import Invoice, SegmentUsage, charge_lines, usage_spend_minor
from transforms.finance.alerts import Alert
from transforms.inputs.reference import Segment, segments_by_subscription, subscription_plans
from transforms.money import decimal_text, from_minor, to_minor
from transforms.periods import Period

DEFAULT_AMOUNTS = (Decimal(100), Decimal(1000), Decimal(10000))
"""Alerts for a usage plan with no budget: when spend reaches 100, 1,000 and 10,000 of its currency."""

ZERO = Decimal(0)

MONOTONE_MODELS = frozenset({"standard", "package", "graduated", "graduated_percentage", "percentage"})
"""Charge models whose amount never falls as units or events are added (prices are checked
non-negative on load). Volume is not one: crossing a bound reprices every unit, lower."""

USAGE_KEY = ["subscription_id", "segment_no", "meter", "dims"]


def thresholds(segment: Segment) -> list[tuple[str, Decimal, str]]:
    """(kind, amount, label) to watch for the subscription of `segment`, on its plan's terms."""
    plan = segment.plan.plan
    sub = segment.subscription
    controls = plan.spend_controls
    budget = sub.budget if sub.budget is not None else (controls.budget if controls else None)
    out = []
    if budget is not None:
        fractions = controls.alerts if controls else [Decimal("0.5"), Decimal("0.8"), Decimal("1.0")]
        out += [("spend_threshold", budget * f, f"{decimal_text(f * 100)}% of budget {budget}") for f in fractions]
    elif plan.charges:
        out += [("spend_threshold", amount, f"{amount} {plan.currency}") for amount in DEFAULT_AMOUNTS]
    cap = sub.hard_cap if sub.hard_cap is not None else (controls.hard_cap if controls else None)
    if cap is not None:
        out.append(("hard_cap_reached", cap, f"hard cap {cap}"))
    return out


def usage_spend_by_subscription(invoices: list[Invoice]) -> dict[str, int]:
    """Each subscription's usage spend over its invoice (one per subscription): the whole
    period's spend that `spend_alerts` starts from."""
    return {inv.subscription_id: inv.usage_spend_minor for inv in invoices}


def subscriptions_over_budget(invoices: list[Invoice], segments: list[Segment], fraction: str = "0.8") -> list[dict]:
    """One row per subscription whose usage spend so far is at or above `fraction` of its budget
    (subscription override, else the plan's `spend_controls.budget` of its last segment)."""
    last = subscription_plans(segments).last_segment
    out = []
    for inv in invoices:
        seg = last[inv.subscription_id]
        budgets = [amount for kind, amount, label in thresholds(seg) if kind == "spend_threshold" and "budget" in label]
        controls = seg.plan.plan.spend_controls
        budget = seg.subscription.budget or (controls.budget if controls else None)
        if budget is None or not budgets:
            continue
        spend = inv.usage_spend_minor
        if spend >= to_minor(budget * Decimal(fraction), inv.currency):
            out.append({"customer_id": inv.customer_id, "subscription_id": inv.subscription_id,
                        "spend_minor": spend, "budget_minor": to_minor(budget, inv.currency),
                        "currency": inv.currency})
    return out


_WATCHED: dict[tuple, tuple] = {}
"""What watched_thresholds gives, by (plan, budget, hard cap), the only things it depends on: a
close asks for 100k subscriptions' thresholds, and most share a few plans and no overrides."""


def watched_thresholds(segs: list[Segment]) -> list[tuple[str, int, str]]:
    """The subscription's thresholds in minor units, lowest first (ties keep their order)."""
    plan, sub = segs[-1].plan.plan, segs[-1].subscription
    key = (id(plan), str(sub.budget), str(sub.hard_cap))  # as text: labels print 10.0 and 10 apart
    known = _WATCHED.get(key)
    if known is None or known[0] is not plan:  # the plan object itself is held, so its id stays its own
        if len(_WATCHED) > 4096:
            _WATCHED.clear()
        currency, rounding = plan.currency, plan.rounding
        known = _WATCHED[key] = (plan, sorted(
            ((kind, to_minor(amount, currency, rounding), label) for kind, amount, label in thresholds(segs[-1])),
            key=lambda w: w[1]))
    return list(known[1])  # a copy: the caller pops from it


def _may_alert(segs: list[Segment], final_minor: int) -> bool:
    """Whether the subscription can fire a spend alert: spend only ever reaches a threshold if
    the period's whole spend reaches its lowest."""
    watch = watched_thresholds(segs)
    return bool(watch) and final_minor >= watch[0][1]


def _monotone(segs: list[Segment]) -> bool:
    """Whether spend through a day can only grow with the day: every charge of every segment
    is priced by a model whose amount never falls as usage is added (allowances only move
    units from free to billable, and rounding keeps order)."""
    return all(charge.price.model in MONOTONE_MODELS for seg in segs for charge in seg.plan.plan.charges)


@dataclass
class _SubscriptionUsage:
    """One subscription's usage as rating a day reads it, per segment: for each (meter, dims),
    its days with usage and the units and events summed through each of them (units after
    credits for meters paid with credits); and per meter priced event by event, its events
    (day, dims, quantity) in the order of the per-event table, with their last day and
    distinct dims. The events stay a Polars frame: rating a day takes those up to it as a
    column (as the invoice rates them), never a Python object per event."""

    by_key: dict[int, dict[tuple[str, str], tuple[list, list, list]]] = field(
        default_factory=lambda: defaultdict(dict))
    per_event: dict[int, list[tuple[str, pl.DataFrame, date, tuple[str, ...]]]] = field(
        default_factory=lambda: defaultdict(list))

    def segment_usage(self, segment_no: int, through: date) -> SegmentUsage:
        rows = []
        for (meter, dims), (days, units, events) in sorted(self.by_key.get(segment_no, {}).items()):
            i = bisect_right(days, through)
            if i:
                rows.append((meter, dims, units[i - 1], events[i - 1]))
        per_event = []
        for meter, events, last_day, dims in self.per_event.get(segment_no, ()):
            if last_day > through:  # the meter's events up to `through` only, in table order
                events = events.filter(pl.col("day") <= through)
                dims = tuple(events["dims"].unique(maintain_order=True))
            if events.height:
                per_event.append((meter, dims, events))
        return SegmentUsage(tuple(rows), tuple(per_event))


def spend_to_date_minor(segments: list[Segment], usage: _SubscriptionUsage, through: date) -> int:
    """Usage charges of the subscription for its usage up to and including `through`."""
    allowance_used: dict[tuple, Decimal] = {}
    return sum(usage_spend_minor(charge_lines(seg, usage.segment_usage(seg.segment_no, through), "", allowance_used))
               for seg in segments)


def _usage_from(usage_by_day: pl.DataFrame, per_event_usage: pl.DataFrame, since: dict[str, date],
                billable_by_day: dict[tuple, Decimal], credit_meters: set[tuple[str, int, str]]
                ) -> dict[str, _SubscriptionUsage]:
    """The usage of the subscriptions of `since`, for rating any day on or after their day in
    `since`: units and events are summed per (segment, meter, dims) through each day in Polars,
    and of the days before `since` only each key's last is kept (it carries the sums so far).

    Units of meters paid with credits are the units the wallet left (`billable_by_day`, which
    the wallet replay computed with Decimal division): they are summed here in Python, in day
    order, as rating them one day at a time would."""
    usage: dict[str, _SubscriptionUsage] = defaultdict(_SubscriptionUsage)
    if not since:
        return usage
    sub_dtype = usage_by_day.schema["segment_no"]
    starts = pl.DataFrame({"subscription_id": list(since), "_from": list(since.values())},
                          schema={"subscription_id": pl.String, "_from": pl.Date})
    paid_with_credits = pl.DataFrame(sorted(credit_meters), orient="row",
                                     schema={"subscription_id": pl.String, "segment_no": sub_dtype,
                                             "meter": pl.String}).with_columns(pl.lit(True).alias("_credits"))
    rows = (usage_by_day.lazy().select(*USAGE_KEY, "day", "units", "events")
            .join(starts.lazy(), on="subscription_id")
            .join(paid_with_credits.lazy(), on=["subscription_id", "segment_no", "meter"], how="left")
            .with_columns(pl.col("_credits").fill_null(False))
            .sort(*USAGE_KEY, "day")
            .with_columns(pl.col("units").cum_sum().over(USAGE_KEY).alias("units_so_far"),
                          pl.col("events").cum_sum().over(USAGE_KEY).alias("events_so_far"),
                          pl.col("day").shift(-1).over(USAGE_KEY).alias("_next"))
            .filter(pl.col("_credits") | (pl.col("day") >= pl.col("_from")) | pl.col("_next").is_null()
                    | (pl.col("_next") >= pl.col("_from")))
            .collect())
    for sub, seg, meter, dims, day, so_far, events in rows.filter(~pl.col("_credits")).select(
            *USAGE_KEY, "day", "units_so_far", "events_so_far").iter_rows():
        days, units, counts = usage[sub].by_key[seg].setdefault((meter, dims), ([], [], []))
        days.append(day)
        units.append(so_far)
        counts.append(events)
    for sub, seg, meter, dims, day, events in rows.filter(pl.col("_credits")).select(
            *USAGE_KEY, "day", "events_so_far").iter_rows():
        days, units, counts = usage[sub].by_key[seg].setdefault((meter, dims), ([], [], []))
        days.append(day)
        units.append((units[-1] if units else ZERO) + billable_by_day.get((sub, seg, meter, dims, day), ZERO))
        counts.append(events)
    keys = ["subscription_id", "segment_no", "meter"]
    events_of = (per_event_usage.lazy()
                 .select(*keys, "dims", "quantity", pl.col("event_at").dt.date().alias("day"))
                 .join(starts.lazy().select("subscription_id"), on="subscription_id", how="semi",
                       maintain_order="left")
                 .join(paid_with_credits.lazy(), on=["subscription_id", "segment_no", "meter"], how="anti",
                       maintain_order="left")
                 .sort(keys, maintain_order=True)  # each meter's events together, in table order
                 .collect())
    groups = events_of.group_by(keys, maintain_order=True).agg(
        pl.len(), pl.col("day").max(), pl.col("dims").unique(maintain_order=True))
    narrow = events_of.select("day", "dims", "quantity")  # sliced per meter: a slice is a view
    offset = 0
    for sub, seg, meter, count, last_day, dims in groups.iter_rows():
        usage[sub].per_event[seg].append((meter, narrow.slice(offset, count), last_day, tuple(dims)))
        offset += count
    return usage


def _days_with_usage(usage_by_day: pl.DataFrame, subs: list[str]) -> dict[str, list[date]]:
    """Each subscription's days with usage, in order."""
    return {sub: days for sub, days in usage_by_day.lazy()
            .filter(pl.col("subscription_id").is_in(pl.Series(subs, dtype=pl.String)))
            .group_by("subscription_id").agg(pl.col("day").unique().sort())
            .collect().iter_rows()}


def _with_negative_usage(usage_by_day: pl.DataFrame, per_event_usage: pl.DataFrame) -> set[str]:
    """Subscriptions with a negative quantity somewhere (the usage check quarantines them, but a
    spend that can fall from one day to the next must be walked, not bisected)."""
    return (set(usage_by_day.filter(pl.col("units") < 0)["subscription_id"].to_list())
            | set(per_event_usage.filter(pl.col("quantity") < 0)["subscription_id"].to_list()))


@cycle_collector_paused()  # rating day after day builds lines by the million, none of them a cycle
def spend_alerts(period: Period, segments: list[Segment], usage_by_day, per_event_usage,
                 billable_by_day: dict[tuple, Decimal], credit_meters: set[tuple[str, int, str]],
                 final_spend_minor: dict[str, int]) -> list[Alert]:
    """The spend alerts of `period`. `usage_by_day`: rows (subscription_id, segment_no, meter,
    dims, day, units, events); `per_event_usage`: rows with event_at, for per-event prices;
    `billable_by_day`: units left after credits by (sub, seg, meter, dims, day) for meters paid
    with credits; `final_spend_minor`: each subscription's usage charges for the whole period
    (a subscription that never reaches its lowest threshold is not replayed day by day)."""
    by_sub = segments_by_subscription(segments)
    replayed = sorted(s for s, segs in by_sub.items() if _may_alert(segs, final_spend_minor.get(s, 0)))
    day_lists = _days_with_usage(usage_by_day, replayed)
    usage = _usage_from(usage_by_day, per_event_usage, {s: day_lists[s][0] for s in replayed if s in day_lists},
                        billable_by_day, credit_meters)
    falling = _with_negative_usage(usage_by_day, per_event_usage)
    alerts = []
    for sub_id in replayed:
        segs, rated = by_sub[sub_id], {}

        def spend_through(day: date, segs=segs, usage=usage[sub_id], rated=rated) -> int:
            if day not in rated:
                rated[day] = spend_to_date_minor(segs, usage, day)
            return rated[day]

        alerts += _crossings(period, segs, day_lists.get(sub_id, []), final_spend_minor.get(sub_id, 0),
                             spend_through, bisect=_monotone(segs) and sub_id not in falling)
    return alerts


def _crossings(period: Period, segs: list[Segment], day_list: list[date], final_minor: int, spend_through,
               bisect: bool = False) -> list[Alert]:
    """The spend alerts of one subscription: its days with usage in order, each threshold firing
    on the first day whose spend so far (`spend_through(day)`) reaches it, lowest first.

    With `bisect` (spend never falls from one day to the next) the last day tells which
    thresholds are crossed at all, and each crossing day is searched for (`_first_reaching`),
    rating a few days instead of every day up to the last crossing."""
    if not _may_alert(segs, final_minor):
        return []
    currency = segs[-1].plan.plan.currency
    sub = segs[-1].subscription
    crossed: list[tuple[tuple[str, int, str], date, int]] = []
    pending = watched_thresholds(segs)
    if bisect:
        first = 0  # thresholds are sorted, so each crossing is on or after the one before
        for watch in pending:
            if not day_list or spend_through(day_list[-1]) < watch[1]:
                break
            first = _first_reaching(day_list, first, watch[1], spend_through)
            crossed.append((watch, day_list[first], spend_through(day_list[first])))
    else:
        for day in day_list:
            spend = spend_through(day)
            while pending and spend >= pending[0][1]:
                crossed.append((pending.pop(0), day, spend))
            if not pending:
                break
    alerts = []
    for (kind, minor, label), day, spend in crossed:
        amount, spent = from_minor(minor, currency), from_minor(spend, currency)
        alerts.append(Alert(sub.customer_id, sub.subscription_id, str(period), kind, decimal_text(amount),
                            decimal_text(spent), day,
                            f"Spend {decimal_text(spent)} {currency} reached {label} on {day}"))
    return alerts


def _first_reaching(day_list: list[date], start: int, minor: int, spend_through) -> int:
    """The index of the first day from `start` whose spend reaches `minor`, when spend never
    falls and the last day's reaches it: gallop from `start` (crossings are often close
    together, early in the month), then bisect the last stride."""
    if spend_through(day_list[start]) >= minor:
        return start
    low, high, stride = start, len(day_list) - 1, 1  # spend at low is below, at high reaches it
    while low + stride < high:
        if spend_through(day_list[low + stride]) >= minor:
            high = low + stride
            break
        low, stride = low + stride, stride * 2
    while high - low > 1:
        middle = (low + high) // 2
        if spend_through(day_list[middle]) >= minor:
            high = middle
        else:
            low = middle
    return high


def spend_alerts_resumed(period: Period, segments: list[Segment], usage_by_day, per_event_usage,
                         billable_by_day: dict[tuple, Decimal], credit_meters: set[tuple[str, int, str]],
                         final_spend_minor: dict[str, int], known_spend: dict[tuple[str, date], int],
                         changed_from: dict[str, date] | None) -> tuple[list[Alert], dict[tuple[str, date], int]]:
    """`spend_alerts`, resumed from what an earlier night worked out: the same alerts, and the
    spend through each (subscription, day) replayed, for the next night.

    Spend through a day depends only on the usage (and credits drawn) up to that day, so a
    subscription's spend through `day` in `known_spend` still holds when no usage of its
    customer changed on or before that day (`changed_from`: per customer, the first day that
    changed; None when anything may have). Only the other days are rated again, from the usage
    of their day on (and each key's sums just before it), so a night's cost follows what
    changed, not the length of the month. Days are walked in order, as every night did, so the
    spend handed to the next night covers the same days."""
    by_sub = segments_by_subscription(segments)
    replayed = sorted(s for s, segs in by_sub.items() if _may_alert(segs, final_spend_minor.get(s, 0)))
    day_lists = _days_with_usage(usage_by_day, replayed)

    def still_known(sub_id: str, day: date) -> bool:
        customer = by_sub[sub_id][-1].subscription.customer_id
        changed = date.min if changed_from is None else changed_from.get(customer, date.max)
        return day < changed and (sub_id, day) in known_spend

    # first pass: where each walk leaves what the last night knew (None: it never does)
    rate_from: dict[str, date] = {}
    for sub_id in replayed:
        first_unknown: list[date] = []

        def from_known(day: date, sub_id=sub_id, first_unknown=first_unknown) -> int:
            if not first_unknown and still_known(sub_id, day):
                return known_spend[(sub_id, day)]
            first_unknown.append(day)
            return -1  # below every threshold: the walk goes on to the next day, unrated
        _crossings(period, by_sub[sub_id], day_lists.get(sub_id, []), final_spend_minor.get(sub_id, 0), from_known)
        if first_unknown:
            rate_from[sub_id] = first_unknown[0]
    usage = _usage_from(usage_by_day, per_event_usage, rate_from, billable_by_day, credit_meters)

    spend: dict[tuple[str, date], int] = {}
    alerts = []
    for sub_id in replayed:
        segs = by_sub[sub_id]

        def spend_through(day: date, sub_id=sub_id, segs=segs) -> int:
            if still_known(sub_id, day):
                spend[(sub_id, day)] = known_spend[(sub_id, day)]
            else:
                spend[(sub_id, day)] = spend_to_date_minor(segs, usage[sub_id], day)
            return spend[(sub_id, day)]

        alerts += _crossings(period, segs, day_lists.get(sub_id, []), final_spend_minor.get(sub_id, 0), spend_through)
    return alerts, spend
