"""Every customer's wallet replayed through a period: the one driver of the wallet engine.

What differs between the runs that replay wallets is which grants the wallets start from (the
whole history, `grants.history_grants`, or the previous close's balances brought forward,
`opening.opening_grants`) and which credit events they consume. The events arrive as one frame
(events.CREDIT_EVENT_SCHEMA) and are read as columns a batch of customers at a time, never as an
object per event; what each event draws is worked out once per plan version, meter and dims.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from itertools import pairwise

import polars as pl

from transforms.credits.events import CREDIT_EVENT_SCHEMA
from transforms.credits.model import CreditEvent, Grant, WalletReplay
from transforms.credits.wallet import EventColumns, Wallet, credit_rate, needed, same_plan_runs
from transforms.inputs.plans import Catalog, PlanFile
from transforms.inputs.reference import Subscription, bound_versions
from transforms.periods import Period

BATCH_EVENTS = 50_000
"""Events read into Python columns at once (whole customers): the replay's working set."""


def replayed_wallets(grants: list[Grant], subs: list[Subscription], catalog: Catalog,
                     events: pl.DataFrame | list[CreditEvent], period: Period, stretches: bool = True) -> WalletReplay:
    """Every customer's wallet, started from its `grants` and fed its credit events (a frame of
    CREDIT_EVENT_SCHEMA, or hand-made CreditEvents, whose decimals are kept as given; in any
    order) in event time, through the end of `period`; customers in customer_id order.
    `stretches=False` consumes every event one at a time: the reference the stretch replay is
    checked against."""
    grants_of = by_customer(grants)
    replay = WalletReplay()
    for customer, columns, lo, hi in customers_with_events(set(grants_of), events, subs, catalog):
        wallet = Wallet(customer, grants_of.pop(customer, []), replay, stretches)
        if columns is not None:
            wallet.consume_events(columns, lo, hi)
        wallet.advance(period.end_at)  # expiries at the period's end instant included
    return replay


def customers_with_events(customers: set[str], events: pl.DataFrame | list[CreditEvent], subs: list[Subscription],
                          catalog: Catalog) -> Iterator[tuple[str, EventColumns | None, int, int]]:
    """Per customer of `customers` or of `events`, in customer_id order: (customer, columns, lo,
    hi), its events being lo..hi-1 of `columns` (None when it has none)."""
    if isinstance(events, list):
        streamed = _listed_batches(events, subs, catalog)
        with_events = {e.customer_id for e in events}
    else:
        frame = events.select(list(CREDIT_EVENT_SCHEMA)).sort("customer_id", "event_at", "event_id")
        streamed = _event_batches(frame, subs, catalog)
        with_events = set(frame["customer_id"].unique().to_list())
    current = next(streamed, None)
    for customer in sorted(customers | with_events):
        if current is not None and current[0] == customer:
            yield current
            current = next(streamed, None)
        else:
            yield customer, None, 0, 0


def _listed_batches(events: list[CreditEvent], subs: list[Subscription], catalog: Catalog
                    ) -> Iterator[tuple[str, EventColumns, int, int]]:
    """(customer, columns, lo, hi) per customer of hand-made `events`, their decimals as given."""
    ordered = sorted(events, key=lambda e: (e.customer_id, e.event_at, e.event_id))
    plan_at = _plans_in_force(subs, catalog)
    bounds = [k for k in range(len(ordered)) if k == 0 or ordered[k].customer_id != ordered[k - 1].customer_id]
    bounds.append(len(ordered))
    columns = EventColumns.listed(ordered, [plan_at(e.subscription_id, e.event_at.date()) for e in ordered], bounds)
    for lo, hi in pairwise(bounds):
        yield ordered[lo].customer_id, columns, lo, hi


def _event_batches(frame: pl.DataFrame, subs: list[Subscription], catalog: Catalog
                   ) -> Iterator[tuple[str, EventColumns, int, int]]:
    """(customer, columns, lo, hi) per customer of `frame` (sorted by customer, then event
    time), the columns read a batch of whole customers at a time."""
    if frame.height == 0:
        return
    runs = frame["customer_id"].rle()
    names, lengths = runs.struct.field("value").to_list(), runs.struct.field("len").to_list()
    plan_at = _plans_in_force(subs, catalog)
    first = i = 0
    while i < len(names):
        start, j, size = first, i, 0
        while j < len(names) and (size == 0 or size + lengths[j] <= BATCH_EVENTS):
            size += lengths[j]
            j += 1
        columns = _columns(frame.slice(start, size), plan_at)
        lo = 0
        for name, length in zip(names[i:j], lengths[i:j], strict=True):
            yield name, columns, lo, lo + length
            lo += length
        first, i = start + size, j


def _columns(frame: pl.DataFrame, plan_at) -> EventColumns:
    """One batch of events (whole customers, each in event time) as columns, with the plan in
    force for each event and what it draws."""
    frame = frame.with_columns(pl.col("event_at").dt.date().alias("day"))
    plans, plan_no = [], {}

    def number(plan: PlanFile) -> int:
        if id(plan) not in plan_no:
            plan_no[id(plan)] = len(plans)
            plans.append(plan)
        return plan_no[id(plan)]

    # most subscriptions are under one plan version from their first event to their last: looked
    # up once; the others day by day
    spans = frame.group_by("subscription_id", maintain_order=True).agg(
        pl.col("day").min().alias("first"), pl.col("day").max().alias("last"))
    whole, numbers, changing = [], [], []
    for sub, first, last in spans.iter_rows():
        plan = plan_at.through(sub, first, last)
        if plan is None:
            changing.append(sub)
        else:
            whole.append(sub)
            numbers.append(number(plan))
    frame = frame.join(pl.DataFrame({"subscription_id": whole, "plan_no": numbers},
                                    schema={"subscription_id": pl.String, "plan_no": pl.Int64}),
                       on="subscription_id", how="left", maintain_order="left")
    if changing:
        days = frame.filter(pl.col("subscription_id").is_in(changing)).select("subscription_id", "day").unique(
            maintain_order=True)
        numbers = [number(plan_at(sub, day)) for sub, day in days.iter_rows()]
        by_day = days.with_columns(pl.Series("day_plan_no", numbers, dtype=pl.Int64))
        frame = frame.join(by_day, on=["subscription_id", "day"], how="left", maintain_order="left").with_columns(
            pl.coalesce("plan_no", "day_plan_no").alias("plan_no")).drop("day_plan_no")
    prices = frame.select("plan_no", "meter", "dims").unique(maintain_order=True)
    rates = [credit_rate(plans[p], meter, dims) for p, meter, dims in prices.iter_rows()]
    frame = frame.join(prices.with_row_index("rate_no"), on=["plan_no", "meter", "dims"], how="left",
                       maintain_order="left")
    quantity = frame["quantity"].to_list()
    plan_of_event = [plans[p] for p in frame["plan_no"].to_list()]
    bounds = [0, *frame["customer_id"].rle().struct.field("len").cum_sum().to_list()]
    return EventColumns(
        frame["subscription_id"].to_list(), frame["segment_no"].to_list(), frame["event_id"].to_list(),
        frame["event_at"].to_list(), frame["day"].to_list(), frame["meter"].to_list(), frame["dims"].to_list(),
        quantity, needed(quantity, [rates[r] for r in frame["rate_no"].to_list()]), plan_of_event,
        same_plan_runs(plan_of_event, bounds))


def by_customer(items: list) -> dict[str, list]:
    """Grants grouped by customer_id, each customer's in their given order."""
    out: dict[str, list] = defaultdict(list)
    for item in items:
        out[item.customer_id].append(item)
    return out


class _PlansInForce:
    """The plan version in force for a subscription on a day (`reference.plan_on`), its versions'
    timeline worked out once per subscription."""

    def __init__(self, subs: list[Subscription], catalog: Catalog):
        self.subs_by_id = {s.subscription_id: s for s in subs}
        self.catalog = catalog
        self.timelines: dict[str, list] = {}

    def _timeline(self, subscription_id: str) -> list:
        timeline = self.timelines.get(subscription_id)
        if timeline is None:
            timeline = self.timelines[subscription_id] = bound_versions(self.subs_by_id[subscription_id], self.catalog)
        return timeline

    def __call__(self, subscription_id: str, day):
        return [plan for starts_on, plan in self._timeline(subscription_id) if starts_on <= day][-1]  # plan_on

    def through(self, subscription_id: str, first, last):
        """The plan in force on every day from `first` through `last`, or None when a version
        starts after `first`, up to `last`."""
        if any(first < starts_on <= last for starts_on, _ in self._timeline(subscription_id)):
            return None
        return self(subscription_id, first)


def _plans_in_force(subs: list[Subscription], catalog: Catalog) -> _PlansInForce:
    """The plan version in force for a subscription on a day: `plan_at(subscription_id, day)`."""
    return _PlansInForce(subs, catalog)
