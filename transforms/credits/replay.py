"""Every customer's wallet replayed through a period: the one driver of the wallet engine.

What differs between the runs that replay wallets is only which grants the wallets start from:
the whole history (`grants.history_grants`, a close or a nightly run with no closed period
before it) or the previous close's balances brought forward (`opening.opening_grants`).
"""
from __future__ import annotations

from collections import defaultdict

from transforms.credits.model import CreditEvent, Grant, Outcome
from transforms.credits.wallet import replay
from transforms.periods import Period
from transforms.plans import Catalog, PlanFile
from transforms.reference import Subscription, plan_on


def replayed_wallets(grants: list[Grant], subs: list[Subscription], catalog: Catalog, events: list[CreditEvent],
                     period: Period) -> Outcome:
    """Every customer's wallet, each started from its `grants` and fed its `events` in event
    time, through the end of `period`; customers in customer_id order."""
    grants_of, events_of = by_customer(grants), by_customer(events)
    plans = plans_by_event(events, subs, catalog)
    outcome = Outcome()
    for customer in sorted(set(grants_of) | set(events_of)):
        replay(customer, events_of.get(customer, []), grants_of.get(customer, []), plans, period.end_at, outcome)
    return outcome


def by_customer(items: list) -> dict[str, list]:
    """Grants or events grouped by customer_id, each customer's in their given order."""
    out: dict[str, list] = defaultdict(list)
    for item in items:
        out[item.customer_id].append(item)
    return out


def plans_by_event(events: list[CreditEvent], subs: list[Subscription], catalog: Catalog) -> dict[str, PlanFile]:
    """event_id -> the plan version in force for the event."""
    subs_by_id = {s.subscription_id: s for s in subs}
    plans: dict[str, PlanFile] = {}
    plan_that_day: dict[tuple[str, object], PlanFile] = {}  # one lookup per subscription and day, not per event
    for ev in events:
        key = (ev.subscription_id, ev.event_at.date())
        if key not in plan_that_day:
            plan_that_day[key] = plan_on(subs_by_id[ev.subscription_id], catalog, key[1])
        plans[ev.event_id] = plan_that_day[key]
    return plans
