"""Which settled usage the wallets consume: the segment x meters whose plan pays with credits,
their billed events as CreditEvents, and the per-event rows left for the charges."""
from __future__ import annotations

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
