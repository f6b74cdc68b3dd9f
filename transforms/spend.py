"""Spend alerts, replayed in event time: the day a subscription's spend reached each threshold.

Spend is the period's usage charges so far (usage and overage lines, before any hard cap, after
credits): what a customer is about to be billed for what they used. Thresholds are fractions of
the budget (subscription override, else the plan's `spend_controls.budget`); without a budget,
usage plans alert at DEFAULT_AMOUNTS of their currency. `hard_cap_reached` fires on the day spend
reaches the cap. The close and the nightly runs call the same function on the same days, so they
fire the same alerts; an alert is identified by (customer, period, kind, threshold).
"""
from __future__ import annotations

from collections import defaultdict
from datetime import date
from decimal import Decimal

import polars as pl

from transforms.alerts import Alert
from transforms.invoices import SegmentUsage, charge_lines
from transforms.money import decimal_text, from_minor, to_minor
from transforms.periods import Period
from transforms.reference import Segment

DEFAULT_AMOUNTS = (Decimal(100), Decimal(1000), Decimal(10000))
"""Alerts for a usage plan with no budget: when spend reaches 100, 1,000 and 10,000 of its currency."""

ZERO = Decimal(0)


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


def _spend_minor(segments: list[Segment], by_day: dict, per_event: dict, through: date) -> int:
    """Usage charges of the subscription for its usage up to and including `through`."""
    total = 0
    allowance_used: dict[tuple, Decimal] = {}
    for seg in segments:
        rows: dict[tuple, list] = {}
        for (meter, dims, day), (units, events) in by_day.get(seg.segment_no, {}).items():
            if day <= through:
                acc = rows.setdefault((meter, dims), [ZERO, 0])
                acc[0] += units
                acc[1] += events
        usage = SegmentUsage(tuple((m, d, u, n) for (m, d), (u, n) in sorted(rows.items())),
                             tuple((m, d, q) for m, d, q, day in per_event.get(seg.segment_no, ()) if day <= through))
        total += sum(l.amount_minor for l in charge_lines(seg, usage, "", allowance_used)
                     if l.kind in ("usage", "overage"))
    return total


def spend_alerts(period: Period, segments: list[Segment], usage_by_day, per_event_usage,
                 billable_by_day: dict[tuple, Decimal], credit_meters: set[tuple[str, int, str]],
                 final_spend_minor: dict[str, int]) -> list[Alert]:
    """The spend alerts of `period`. `usage_by_day`: rows (subscription_id, segment_no, meter,
    dims, day, units, events); `per_event_usage`: rows with event_at, for per-event prices;
    `billable_by_day`: units left after credits by (sub, seg, meter, dims, day) for meters paid
    with credits; `final_spend_minor`: each subscription's usage charges for the whole period
    (a subscription that never reaches its lowest threshold is not replayed day by day)."""
    by_sub: dict[str, list[Segment]] = defaultdict(list)
    for seg in segments:
        by_sub[seg.subscription.subscription_id].append(seg)
    days: dict[str, dict[int, dict]] = defaultdict(lambda: defaultdict(dict))
    for sub, seg, meter, dims, day, units, events in usage_by_day.select(
            "subscription_id", "segment_no", "meter", "dims", "day", "units", "events").iter_rows():
        if (sub, seg, meter) in credit_meters:
            units = billable_by_day.get((sub, seg, meter, dims, day), ZERO)
        days[sub][seg][(meter, dims, day)] = (units, events)
    per_event: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for sub, seg, meter, dims, quantity, event_at in per_event_usage.select(
            "subscription_id", "segment_no", "meter", "dims", "quantity", "event_at").iter_rows():
        if (sub, seg, meter) not in credit_meters:
            per_event[sub][seg].append((meter, dims, quantity, event_at.date()))
    alerts = []
    for sub_id in sorted(by_sub):
        day_list = sorted({d for seg_days in days[sub_id].values() for (_, _, d) in seg_days})
        alerts += _crossings(period, by_sub[sub_id], day_list, final_spend_minor.get(sub_id, 0),
                             lambda day, s=sub_id: _spend_minor(by_sub[s], days[s], per_event[s], day))
    return alerts


def _crossings(period: Period, segs: list[Segment], day_list: list[date], final_minor: int, spend_through) -> list[Alert]:
    """The spend alerts of one subscription: its days with usage in order, each threshold firing
    on the first day whose spend so far (`spend_through(day)`) reaches it, lowest first."""
    watch = thresholds(segs[-1])
    if not watch:
        return []
    currency, rounding = segs[-1].plan.plan.currency, segs[-1].plan.plan.rounding
    watch = [(kind, to_minor(amount, currency, rounding), label) for kind, amount, label in watch]
    if final_minor < min(minor for _, minor, _ in watch):
        return []
    alerts = []
    sub = segs[-1].subscription
    pending = sorted(watch, key=lambda w: w[1])
    for day in day_list:
        spend = spend_through(day)
        while pending and spend >= pending[0][1]:
            kind, minor, label = pending.pop(0)
            amount, spent = from_minor(minor, currency), from_minor(spend, currency)
            alerts.append(Alert(sub.customer_id, sub.subscription_id, str(period), kind, decimal_text(amount),
                                decimal_text(spent), day,
                                f"Spend {decimal_text(spent)} {currency} reached {label} on {day}"))
        if not pending:
            break
    return alerts


def _usage_of(by_day_rows, per_event_rows, billable_by_day: dict[tuple, Decimal],
              credit_meters: set[tuple[str, int, str]]) -> tuple[dict, dict]:
    """One subscription's usage as `_spend_minor` reads it: per segment, units and events by
    (meter, dims, day) (units after credits for meters paid with credits), and the per-event
    quantities of meters not paid with credits."""
    days: dict[int, dict] = defaultdict(dict)
    for sub, seg, meter, dims, day, units, events in by_day_rows:
        if (sub, seg, meter) in credit_meters:
            units = billable_by_day.get((sub, seg, meter, dims, day), ZERO)
        days[seg][(meter, dims, day)] = (units, events)
    per_event: dict[int, list] = defaultdict(list)
    for sub, seg, meter, dims, quantity, event_at in per_event_rows:
        if (sub, seg, meter) not in credit_meters:
            per_event[seg].append((meter, dims, quantity, event_at.date()))
    return days, per_event


def spend_alerts_resumed(period: Period, segments: list[Segment], usage_by_day, per_event_usage,
                         billable_by_day: dict[tuple, Decimal], credit_meters: set[tuple[str, int, str]],
                         final_spend_minor: dict[str, int], known_spend: dict[tuple[str, date], int],
                         changed_from: dict[str, date] | None) -> tuple[list[Alert], dict[tuple[str, date], int]]:
    """`spend_alerts`, resumed from what an earlier night worked out: the same alerts, and the
    spend through each (subscription, day) replayed, for the next night.

    Spend through a day depends only on the usage (and credits drawn) up to that day, so a
    subscription's spend through `day` in `known_spend` still holds when no usage of its
    customer changed on or before that day (`changed_from`: per customer, the first day that
    changed; None when anything may have). Only the other days are rated again."""
    by_sub: dict[str, list[Segment]] = defaultdict(list)
    for seg in segments:
        by_sub[seg.subscription.subscription_id].append(seg)
    day_lists = {sub: sorted(days) for sub, days in usage_by_day.group_by("subscription_id").agg(
        pl.col("day").unique()).iter_rows()}
    by_day_of = usage_by_day.select("subscription_id", "segment_no", "meter", "dims", "day", "units", "events"
                                    ).partition_by("subscription_id", as_dict=True)
    per_event_of = per_event_usage.select("subscription_id", "segment_no", "meter", "dims", "quantity", "event_at"
                                          ).partition_by("subscription_id", as_dict=True)
    spend: dict[tuple[str, date], int] = {}
    alerts = []
    for sub_id in sorted(by_sub):
        segs = by_sub[sub_id]
        customer = segs[-1].subscription.customer_id
        changed = date.min if changed_from is None else changed_from.get(customer, date.max)
        usage: list = []  # the subscription's usage as _spend_minor reads it, built the first time a day is rated

        def spend_through(day: date, sub_id=sub_id, segs=segs, changed=changed, usage=usage) -> int:
            if day < changed and (sub_id, day) in known_spend:
                spend[(sub_id, day)] = known_spend[(sub_id, day)]
            else:
                if not usage:
                    usage.extend(_usage_of(by_day_of[(sub_id,)].iter_rows() if (sub_id,) in by_day_of else (),
                                           per_event_of[(sub_id,)].iter_rows() if (sub_id,) in per_event_of else (),
                                           billable_by_day, credit_meters))
                spend[(sub_id, day)] = _spend_minor(segs, usage[0], usage[1], day)
            return spend[(sub_id, day)]

        alerts += _crossings(period, segs, day_lists.get(sub_id, []), final_spend_minor.get(sub_id, 0), spend_through)
    return alerts, spend
