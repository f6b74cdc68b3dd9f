"""The grant schedule: which credits each subscription receives from its plan (per period or
once, prorated by days), which a purchase brings, and when each expires.

A grant's price is what its invoice line bills, rounded once: its cost basis, so that revenue
recognized from it adds up to the cent billed.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import isodate

from transforms.credits.model import Grant, Purchase
from transforms.inputs.plans import Catalog, Credits
from transforms.inputs.reference import Subscription, bound_versions
from transforms.money import from_minor, to_minor
from transforms.periods import Period, utc_midnight


def expiry(spec: str, granted_at: datetime, period_end: datetime) -> datetime | None:
    """When a grant made at `granted_at` expires, by its plan's `expires`: never (None), at the end
    of its period, or after an ISO 8601 duration such as `P90D`."""
    if spec == "never":
        return None
    if spec == "period_end":
        return period_end
    return granted_at + isodate.parse_duration(spec)


def plan_grants(subs: list[Subscription], catalog: Catalog, until: Period) -> list[Grant]:
    """The grants plans give each subscription from its start through `until`. What depends only
    on the period (its dates, text and successor), the midnight of a start day and the price of
    an allocation are worked out once each: a close walks 100k subscriptions month by month."""
    out = []
    timelines: dict[tuple, list] = {}  # bound_versions depends on these three fields only
    periods: dict[Period, tuple] = {}
    midnights: dict = {}
    prices: dict[tuple, Decimal] = {}  # booked_price depends on the amount's value, not its digits
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
        while True:
            facts = periods.get(period)
            if facts is None:
                facts = periods[period] = (period <= until, period.start, period.end, period.end_at, period.days,
                                           str(period), period.next())
            within, period_start, period_end, period_end_at, period_days, period_text, following = facts
            if not within or (sub.end_date is not None and period_start >= sub.end_date):
                break
            start = max(period_start, sub.start_date)
            plan = [plan for starts_on, plan in timeline if starts_on <= start][-1]  # plan_on(sub, catalog, start)
            spec: Credits | None = plan.plan.credits
            for i, g in enumerate(spec.grants if spec else ()):
                if g.every == "once" and not first:
                    continue
                days = (min(period_end, sub.end_date or period_end) - start).days
                granted_at = midnights.get(start)
                if granted_at is None:
                    granted_at = midnights[start] = utc_midnight(start)
                allocated = g.allocated * days / period_days if g.every == "period" else g.allocated
                price_key = (allocated, plan.plan.currency, plan.plan.rounding)
                price = prices.get(price_key)
                if price is None:
                    price = prices[price_key] = booked_price(allocated, plan.plan.currency, plan.plan.rounding)
                out.append(Grant(
                    grant_id=f"{sub.subscription_id}/{period_text if g.every == 'period' else 'once'}/g{i + 1}",
                    customer_id=sub.customer_id, subscription_id=sub.subscription_id,
                    kind="grant", granted_at=granted_at, expires_at=expiry(g.expires, granted_at, period_end_at),
                    credits=g.credits, price=price, currency=plan.plan.currency, rollover_max=g.rollover_max))
            first = False
            period = following
    return out


def purchase_grants(purchases: list[Purchase]) -> list[Grant]:
    """One grant per credit pack bought outside the plan, priced as its invoice line bills it."""
    return [Grant(grant_id=f"purchase/{p.purchase_id}", customer_id=p.customer_id, subscription_id=None,
                  kind="purchase", granted_at=p.purchased_at, expires_at=p.expires_at, credits=p.credits,
                  price=booked_price(p.price, p.currency, "half_up"), currency=p.currency) for p in purchases]


def booked_price(amount: Decimal, currency: str, rounding: str) -> Decimal:
    """What is paid for a grant, as its invoice line bills it (rounded once): the grant's price
    and so its cost basis, so that revenue recognized from it adds up to the cent billed."""
    return from_minor(to_minor(amount, currency, rounding), currency)


def history_grants(subs: list[Subscription], catalog: Catalog, purchases: list[Purchase],
                   period: Period) -> list[Grant]:
    """Every grant and purchase from each subscription's start through `period`: what a replay of
    the whole history starts from (the close's, and nightly's when the previous period is not
    closed)."""
    return plan_grants(subs, catalog, period) + purchase_grants(
        [p for p in purchases if p.purchased_at < period.end_at])
