"""The period to date as a night keeps it: pure Polars steps, no store, no clock.

Each night carries two tables from the last one and moves them by tonight's events
(flows/nightly.py reads and writes them; nightly.sql works out the moves):
- by day: one row per customer x meter x dims x UTC day (BY_DAY_COLUMNS), units and events;
- events: one row per event of a meter priced or paid event by event (EVENT_COLUMNS).
From them come the usage the draft invoices and spend alerts are rated on, per subscription
segment: `usage_by_day`, `usage_by_dims` and `per_event_usage`.

Both tables are kept in time order (BY_DAY_ORDER, EVENT_ORDER: the day or event time first), so
the month before the first day a night moves is a prefix already in order: a night sorts only
its own days (most nights: the one new day), not the month (nightly.sql's rebuild writes the
same order).
"""
from __future__ import annotations

import polars as pl

BY_DAY_COLUMNS = {"customer_id": pl.String, "meter": pl.String, "dims": pl.String, "day": pl.Date,
                  "units": pl.Decimal(38, 9), "events": pl.Int64}
EVENT_COLUMNS = {"customer_id": pl.String, "meter": pl.String, "dims": pl.String, "quantity": pl.Decimal(38, 9),
                 "event_id": pl.String, "event_at": pl.Datetime("us", "UTC")}
BY_DAY_KEYS = ["customer_id", "meter", "dims", "day"]
BY_DAY_ORDER = ["day", "customer_id", "meter", "dims"]
EVENT_ORDER = ["event_at", "event_id", "customer_id", "meter"]


def _before(frame: pl.DataFrame, column: str, first) -> pl.Series:
    """Which rows lie strictly before `first` in `column` (a row without a value does not: it
    sorts last)."""
    return frame.select((pl.col(column) < first).fill_null(False)).to_series()


def by_day_to_date(state: pl.DataFrame, moves: pl.DataFrame) -> pl.DataFrame:
    """One row per customer x meter x dims x UTC day of the period to date, in BY_DAY_ORDER: the
    last night's table (in that order) moved by tonight's `moves` (nightly.sql `delta_by_day`; a
    group that empties disappears). Only the groups tonight touches are summed again, and only
    the days from the first one tonight moves are sorted again; the month before them is carried
    as it is."""
    state, moves = state.cast(BY_DAY_COLUMNS), moves.cast(BY_DAY_COLUMNS)
    if moves.is_empty():
        return state
    before = _before(state, "day", moves["day"].min())
    earlier, later = state.filter(before), state.filter(~before)
    on_days = pl.col("day").is_in(moves["day"].unique().implode())  # a night moves few days
    nearby, carried = later.filter(on_days), later.filter(~on_days)
    touched = moves.select(BY_DAY_KEYS)
    summed = (pl.concat([nearby.join(touched, on=BY_DAY_KEYS, how="semi", nulls_equal=True), moves])
              .group_by(BY_DAY_KEYS).agg(pl.col("units").sum(), pl.col("events").sum())
              .filter(pl.col("events") != 0))
    carried = pl.concat([carried, nearby.join(touched, on=BY_DAY_KEYS, how="anti", nulls_equal=True)])
    later = pl.concat([carried, summed.cast(BY_DAY_COLUMNS)]).sort(BY_DAY_ORDER, nulls_last=True)
    return pl.concat([earlier, later])


def events_to_date(state: pl.DataFrame, leaving: pl.DataFrame, entering: pl.DataFrame) -> pl.DataFrame:
    """One row per event of the period to date of a meter handled event by event, in
    EVENT_ORDER: the last night's rows (in that order) less those whose event_id left or moved
    tonight, plus those that entered; only the rows from the first entering event's time on are
    sorted again."""
    kept = state.cast(EVENT_COLUMNS)
    if leaving.height:  # most nights none does: no pass over the month's rows to take nothing out
        kept = kept.filter(~pl.col("event_id").is_in(leaving["event_id"].cast(pl.String).implode()))
    if entering.is_empty():
        return kept
    entering = entering.cast(EVENT_COLUMNS)
    before = _before(kept, "event_at", entering["event_at"].min())
    later = pl.concat([kept.filter(~before), entering]).sort(EVENT_ORDER, nulls_last=True)
    return pl.concat([kept.filter(before), later])


def _in_segment(frame: pl.DataFrame, segments: pl.DataFrame, at: pl.Expr) -> pl.DataFrame:
    """`frame`'s rows with the subscription segment of their customer that holds `at`, in
    `frame`'s order."""
    spans = segments.select("customer_id", "subscription_id", "segment_no", "start_at", "end_at")
    return (frame.join(spans, on="customer_id", maintain_order="left")
            .filter((at >= pl.col("start_at")) & (at < pl.col("end_at"))))


def usage_by_day(by_day: pl.DataFrame, segments: pl.DataFrame) -> pl.DataFrame:
    """One row per subscription segment x meter x dimensions x UTC day: units so far this period.
    Segments start and end at UTC midnights, so a day belongs to one segment of its customer."""
    keys = ["subscription_id", "segment_no", "meter", "dims", "day"]  # unique: one segment per customer and day
    return (_in_segment(by_day, segments, pl.col("day").cast(pl.Datetime("us", "UTC")))
            .select(*keys, "units", "events").sort(keys, nulls_last=True))


def usage_by_dims(usage_by_day: pl.DataFrame) -> pl.DataFrame:
    """One row per subscription segment x meter x dimensions: units and events so far this period."""
    return (usage_by_day.group_by("subscription_id", "segment_no", "meter", "dims")
            .agg(pl.col("units").sum(), pl.col("events").sum())
            .sort("subscription_id", "segment_no", "meter", "dims"))


def per_event_usage(events: pl.DataFrame, segments: pl.DataFrame) -> pl.DataFrame:
    """One row per event so far of a meter priced or paid event by event, by subscription
    segment and meter, each in event-time order (event_at, then event_id).

    `events` is the period-to-date table, in EVENT_ORDER (one row per event_id): it is in
    (event_at, event_id) order already, so a stable sort by segment and meter alone gives that
    order, and it sorts a rank of the few distinct (subscription, segment, meter) instead of the
    rows' strings: on 745k events of 2,000 customers 0.3 CPU s against 0.95 for sorting by all
    five keys."""
    groups = ["subscription_id", "segment_no", "meter"]
    rows = (_in_segment(events, segments, pl.col("event_at"))
            .select(*groups, "dims", "quantity", "customer_id", "event_id", "event_at"))
    ranks = rows.select(groups).unique().sort(groups).with_row_index("group_rank")
    return (rows.join(ranks, on=groups, maintain_order="left")
            .sort("group_rank", maintain_order=True).drop("group_rank"))
