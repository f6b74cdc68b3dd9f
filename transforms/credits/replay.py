"""Every customer's wallet replayed through a period: the one driver of the wallet engine.

What differs between the runs that replay wallets is which grants the wallets start from (the
whole history, `grants.history_grants`, or the previous close's balances brought forward,
`opening.opening_grants`) and how their events arrive: a list, or one customer at a time (the
close's period events, never a list of millions).
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import groupby
from operator import itemgetter

from transforms.credits.model import CreditEvent, Grant, WalletReplay
from transforms.credits.wallet import Wallet
from transforms.inputs.plans import Catalog, PlanFile
from transforms.inputs.reference import Subscription, plan_on
from transforms.periods import Period


def replayed_wallets(grants: list[Grant], subs: list[Subscription], catalog: Catalog, events: list[CreditEvent],
                     period: Period, events_by_customer: Iterable[tuple[str, list[CreditEvent]]] = ()) -> WalletReplay:
    """Every customer's wallet, started from its `grants` and fed its credit events in event time,
    through the end of `period`; customers in customer_id order. The events are `events` (a
    list, in any order) and `events_by_customer`: (customer_id, events) pairs in customer_id
    order, read one customer at a time."""
    grants_of, listed = by_customer(grants), by_customer(events)
    plan_of = plan_in_force(subs, catalog)
    replay = WalletReplay()
    without_streamed = ((customer, []) for customer in sorted(set(grants_of) | set(listed)))
    every_customer = heapq.merge(without_streamed, events_by_customer, key=itemgetter(0))
    for customer, parts in groupby(every_customer, key=itemgetter(0)):
        mine = listed.pop(customer, []) + [ev for _, part in parts for ev in part]
        wallet = Wallet(customer, grants_of.pop(customer, []), replay)
        wallet.consume_in_order(mine, {ev.event_id: plan_of(ev) for ev in mine})
        wallet.advance(period.end_at)  # expiries at the period's end instant included
    return replay


def by_customer(items: list) -> dict[str, list]:
    """Grants or events grouped by customer_id, each customer's in their given order."""
    out: dict[str, list] = defaultdict(list)
    for item in items:
        out[item.customer_id].append(item)
    return out


def plan_in_force(subs: list[Subscription], catalog: Catalog) -> Callable[[CreditEvent], PlanFile]:
    """The plan version in force for an event, looked up once per subscription and day."""
    subs_by_id = {s.subscription_id: s for s in subs}
    that_day: dict[tuple[str, object], PlanFile] = {}

    def plan_of(ev: CreditEvent) -> PlanFile:
        key = (ev.subscription_id, ev.event_at.date())
        plan = that_day.get(key)
        if plan is None:
            plan = that_day[key] = plan_on(subs_by_id[ev.subscription_id], catalog, key[1])
        return plan
    return plan_of
