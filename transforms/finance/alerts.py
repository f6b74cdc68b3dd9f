"""Alerts a close derives from the period itself, in event time, whether or not nightly runs
happened. One row per customer x period x kind x threshold: an alert that the rules would fire
twice is still one row.

This module holds the price-change notices; spend and credit alerts join it with the nightly runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import polars as pl

from transforms.inputs.plans import Catalog
from transforms.inputs.reference import Subscription, bound_versions
from transforms.periods import Period

ALERT_SCHEMA = {
    "customer_id": pl.String, "subscription_id": pl.String, "period": pl.String, "kind": pl.String,
    "threshold": pl.String, "value": pl.String, "occurred_on": pl.Date, "message": pl.String,
}


@dataclass(frozen=True)
class Alert:
    customer_id: str
    subscription_id: str
    period: str
    kind: str
    threshold: str
    value: str
    occurred_on: date
    message: str


def price_change_notices(period: Period, subs: list[Subscription], catalog: Catalog) -> list[Alert]:
    """One `price_change_notice` per subscription that a later version's `migrate_existing_on`
    will move, fired `notice_days` before the move (or on the subscription's first day, if it
    starts inside the notice window), in the period that contains that day. `threshold` names
    the version moved to, `value` the day of the move.

    The moves are worked out once per (plan, pinned version, start date), all they depend on: a
    close has 100k subscriptions and a few hundred of those."""
    alerts = []
    moves_of: dict[tuple, list] = {}
    for sub in subs:
        key = (sub.plan, sub.plan_version, sub.start_date)
        moves = moves_of.get(key)
        if moves is None:
            moves = moves_of[key] = bound_versions(sub, catalog)[1:]
        for moves_on, plan_file in moves:
            plan = plan_file.plan
            if plan.notice_days is None or not sub.active_on(moves_on):
                continue
            notice_on = max(moves_on - timedelta(days=plan.notice_days), sub.start_date)
            if period.start <= notice_on < period.end:
                alerts.append(Alert(
                    sub.customer_id, sub.subscription_id, str(period), "price_change_notice",
                    f"{plan.plan} v{plan.version}", moves_on.isoformat(), notice_on,
                    f"Subscription {sub.subscription_id} moves to {plan.plan} v{plan.version} on {moves_on} "
                    f"({plan.notice_days} days' notice)"))
    return alerts


def credit_alerts(replay, period: Period) -> list[Alert]:
    """`credits_low`, `credits_exhausted`, `auto_top_up` and `top_up_limit_reached` alerts the
    wallet replay fired in `period` (at most one low, one exhausted and one limit per customer
    and period; one per top-up)."""
    return [Alert(customer, sub, str(period), kind, threshold, value, at.date(), _CREDIT_MESSAGES[kind].format(
                threshold=threshold, value=value))
            for customer, sub, kind, threshold, value, at in replay.alerts
            if period.start_at <= at < period.end_at]


_CREDIT_MESSAGES = {
    "credits_low": "Credit balance {value} fell below {threshold}",
    "credits_exhausted": "Credits ran out: {value} credits of usage were not covered",
    "auto_top_up": "Automatic top-up number {threshold} bought ({value})",
    "top_up_limit_reached": "The plan's limit of {threshold} automatic top-ups this period was reached; "
                            "no pack was bought at a balance of {value}",
}


def alerts_table(alerts: list[Alert]) -> pl.DataFrame:
    """The alerts as the contract's table, ordered by customer, kind, threshold and day."""
    rows = sorted({(a.customer_id, a.kind, a.threshold, a.subscription_id): a for a in alerts}.values(),
                  key=lambda a: (a.customer_id, a.kind, a.threshold, a.occurred_on, a.subscription_id))
    return pl.DataFrame([a.__dict__ for a in rows], schema=ALERT_SCHEMA)
