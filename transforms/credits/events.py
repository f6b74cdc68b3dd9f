"""Which checked usage the wallets consume: the segment x meters whose plan pays with credits,
their billed events as one frame of columns (CREDIT_EVENT_SCHEMA), and the per-event rows left
for the charges."""
from __future__ import annotations

import polars as pl

from transforms.credits.model import CreditEvent

CREDIT_EVENT_SCHEMA = {
    "customer_id": pl.String, "subscription_id": pl.String, "segment_no": pl.Int64, "event_id": pl.String,
    "event_at": pl.Datetime("us", "UTC"), "meter": pl.String, "dims": pl.String, "quantity": pl.Decimal(38, 9),
}
"""One row per credit event: the per-event usage columns a CreditEvent is made of, in its order."""


def period_credit_rows(per_event_usage: pl.DataFrame | pl.LazyFrame, segments: list) -> pl.DataFrame:
    """One row per billed event of the period that its segment's plan pays with credits, in the
    checked usage's order (CREDIT_EVENT_SCHEMA); from a frame, or a scan of its file (only the
    credit rows are read)."""
    rows = per_event_usage.lazy()
    keys = credit_meters_frame(segments, rows.collect_schema()["segment_no"])
    return (rows.join(keys.lazy(), on=["subscription_id", "segment_no", "meter"], how="semi", maintain_order="left")
            .select(list(CREDIT_EVENT_SCHEMA)).cast(CREDIT_EVENT_SCHEMA).collect())


def credit_events_frame(events: list[CreditEvent]) -> pl.DataFrame:
    """CreditEvents (earlier periods' events from the usage check, or events made by hand) as
    rows of CREDIT_EVENT_SCHEMA."""
    return pl.DataFrame([tuple(getattr(e, c) for c in CREDIT_EVENT_SCHEMA) for e in events],
                        schema=CREDIT_EVENT_SCHEMA, orient="row")


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
    return per_event_usage.join(credit_meters_frame(segments, per_event_usage.schema["segment_no"]),
                                on=["subscription_id", "segment_no", "meter"], how="anti", maintain_order="left")


def credit_meters_frame(segments: list, segment_no: pl.DataType) -> pl.DataFrame:
    """credit_meters as a frame, its segment_no of type `segment_no` (the per-event table's)."""
    return pl.DataFrame(sorted(credit_meters(segments)), schema={"subscription_id": pl.String,
                                                                 "segment_no": pl.Int64, "meter": pl.String},
                        orient="row").cast({"segment_no": segment_no})
