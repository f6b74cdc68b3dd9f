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
        segs = by_sub[sub_id]
        watch = thresholds(segs[-1])
        if not watch:
            continue
        currency, rounding = segs[-1].plan.plan.currency, segs[-1].plan.plan.rounding
        watch = [(kind, to_minor(amount, currency, rounding), label) for kind, amount, label in watch]
        if final_spend_minor.get(sub_id, 0) < min(minor for _, minor, _ in watch):
            continue
        pending = sorted(watch, key=lambda w: w[1])
        for day in sorted({d for seg_days in days[sub_id].values() for (_, _, d) in seg_days}):
            spend = _spend_minor(segs, days[sub_id], per_event[sub_id], day)
            while pending and spend >= pending[0][1]:
                kind, minor, label = pending.pop(0)
                sub = segs[-1].subscription
                amount, spent = from_minor(minor, currency), from_minor(spend, currency)
                alerts.append(Alert(sub.customer_id, sub_id, str(period), kind, decimal_text(amount),
                                    decimal_text(spent), day,
                                    f"Spend {decimal_text(spent)} {currency} reached {label} on {day}"))
            if not pending:
                break
    return alerts
