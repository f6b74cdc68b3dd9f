"""Which settled usage the wallets consume: the segment x meters whose plan pays with credits,
their billed events as CreditEvents (a list, or one customer at a time), and the per-event rows
left for the charges."""
from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby
from operator import itemgetter

import polars as pl

from transforms.credits.model import CreditEvent


def period_credit_events(per_event_usage: pl.DataFrame, segments: list) -> list[CreditEvent]:
    """The period's billed events that their segment's plan pays with credits."""
    plan_of = {(s.subscription.subscription_id, s.segment_no): s.plan.plan for s in segments}
    return [CreditEvent(customer_id, sub, seg, event_id, event_at, meter, dims, quantity)
            for sub, seg, meter, dims, quantity, customer_id, event_id, event_at in per_event_usage.select(
                "subscription_id", "segment_no", "meter", "dims", "quantity", "customer_id", "event_id",
                "event_at").iter_rows()
            if plan_of[(sub, seg)].consumes(meter)]


CREDIT_EVENT_COLUMNS = ("customer_id", "subscription_id", "segment_no", "event_id", "event_at", "meter", "dims",
                        "quantity")
"""The per-event usage columns a CreditEvent is made of, in the order of its fields."""


def credit_events_by_customer(per_event_usage: pl.DataFrame, segments: list
                              ) -> Iterator[tuple[str, list[CreditEvent]]]:
    """Per customer (in customer_id order), the period's billed events that their segment's plan
    pays with credits: the events of one customer at a time, never a list of millions."""
    keys = pl.DataFrame(sorted(credit_meters(segments)), orient="row",
                        schema={"subscription_id": pl.String, "segment_no": pl.Int64, "meter": pl.String})
    keys = keys.cast({c: per_event_usage.schema[c] for c in keys.columns})
    rows = (per_event_usage.join(keys, on=list(keys.columns), how="semi", maintain_order="left")
            .select(pl.col("customer_id").cast(pl.String), *CREDIT_EVENT_COLUMNS[1:])
            .sort("customer_id", maintain_order=True))  # within a customer, checked-usage order
    for customer_id, group in groupby(rows.iter_rows(), key=itemgetter(0)):
        yield customer_id, [CreditEvent(*row) for row in group]


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
    return per_event_usage.join(credit_meters_frame(segments, per_event_usage), on=["subscription_id", "segment_no",
                                "meter"], how="anti", maintain_order="left")


def credit_meters_frame(segments: list, like: pl.DataFrame) -> pl.DataFrame:
    """credit_meters as a frame, typed like the per-event table `like`."""
    return pl.DataFrame(sorted(credit_meters(segments)), schema={"subscription_id": pl.String,
                                                                 "segment_no": pl.Int64, "meter": pl.String},
                        orient="row").cast({"segment_no": like.schema["segment_no"]})
