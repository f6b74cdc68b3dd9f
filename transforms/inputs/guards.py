"""Guards on irreversible commands: a close is final (a finalized invoice can only be corrected
by credit and debit notes), so the months a close would get wrong are refused before anything
is written. Each guard returns None (go ahead) or the one line that says why not and how to
proceed. The current time is always a parameter: the command line or the flow reads the clock
once and passes it in.
"""
from __future__ import annotations

from datetime import date, datetime
from typing import TYPE_CHECKING

from transforms.layout import USAGE_PREFIX
from transforms.periods import Period

if TYPE_CHECKING:  # the command line checks arguments with this module before the heavy imports
    from transforms.inputs.plans import Plan
    from transforms.inputs.reference import Segment


def close_too_early(period: Period, now: datetime) -> str | None:
    """Why `period` may not be closed at `now` (None once it has ended): its invoices would miss
    the usage of the days still to come, and a month typed for another (2027-05 for 2026-05)
    lands here too."""
    if now >= period.end_at:
        return None
    return (f"{period} has not ended yet (it ends {period.end_at:%Y-%m-%dT%H:%MZ}, now is {now:%Y-%m-%dT%H:%MZ}): "
            f"a close is final; close it after it ends, or pass --before-period-end to close it now")


def meters_usage(plan: "Plan") -> bool:
    """Whether a plan bills or draws credits by usage (a plan of fixed fees only does not)."""
    return bool(plan.charges) or bool(plan.credits and plan.credits.consume)


def rows_in_period(read: int, quarantine) -> int:
    """Usage rows of a close that fall in its period: the rows read, less those that belong to
    no period (no timestamp, or one that does not parse), which every close counts."""
    import polars as pl

    without_period = quarantine.filter((pl.col("reason") == "bad_timestamp")
                                       | ((pl.col("reason") == "missing_field") & pl.col("timestamp").is_null()))
    return read - without_period.height


def close_without_usage(period: Period, usage_rows: int, segments: "list[Segment]") -> str | None:
    """Why `period` may not be closed with `usage_rows` usage rows in it (None if it may): no row
    at all while subscriptions active in it are on plans that meter usage means the usage was
    not uploaded yet, and the invoices would hold only fixed fees and true-ups."""
    if usage_rows:
        return None
    metered = sorted({seg.plan.plan.plan for seg in segments if meters_usage(seg.plan.plan)})
    if not metered:
        return None
    subscriptions = len({seg.subscription.subscription_id for seg in segments if meters_usage(seg.plan.plan)})
    return (f"{period} has no usage rows while {subscriptions} subscription(s) active in it are on plans that meter "
            f"usage ({', '.join(metered[:5])}{', ...' if len(metered) > 5 else ''}): upload the period's usage under "
            f"{USAGE_PREFIX} first, or pass --allow-empty to close it without usage")


def periods_in_order(first: Period, last: Period) -> str | None:
    if last < first:
        return f"--from {first} is after --to {last}: give the earlier month first"
    return None


def backfill_dated_too_early(as_of: date, closed: list[Period]) -> str | None:
    """Why correction documents may not be dated `as_of` (None if they may): a credit or debit
    note is issued after the invoice it corrects, which is dated the day after its period."""
    late = [p for p in closed if as_of < p.end]
    if not late:
        return None
    latest = max(late)
    return (f"--as-of {as_of} is before {latest}'s invoices were issued ({latest.end}): a correction cannot be "
            f"dated before the invoice it corrects; pass --as-of {max(p.end for p in closed)} or later")


def night_of_closed_period(day: date) -> str:
    period = Period.containing(day)
    return (f"--date {day}: {period} is already closed, so a night would only draft estimates of final "
            f"invoices; late usage of a closed period is taken in by `billrun backfill --from {period} "
            f"--to {period}`")


def notice_problem(on: date, as_of: date, notice_days: int) -> str | None:
    """Why a migration on `on`, decided on `as_of`, gives too little notice (None if it does not)."""
    days = (on - as_of).days
    if days >= notice_days:
        return None
    earliest = date.fromordinal(as_of.toordinal() + notice_days)
    if days < 0:
        given = f"is {-days} days before --as-of {as_of} (a migration cannot start in the past)"
    else:
        given = f"gives customers {days} days' notice, less than --notice-days {notice_days}"
    return f"--on {on} {given}; move on {earliest} or later, or pass a shorter --notice-days"


def closed_period_problem(on: date, closed: list[Period]) -> str | None:
    """Why `on` would change a closed period (None if it would not): a new row may only start
    once every closed period has ended, so the rows a closed period was billed with stay as
    they were."""
    blocking = [p for p in closed if p.end > on]
    if not blocking:
        return None
    latest = max(closed)
    p = min(blocking)
    where = f"falls in closed period {p}" if p.start <= on else f"is before closed period {p} ends"
    return (f"--on {on} {where}; a migration may start on {latest.end} at the earliest "
            f"(closed periods are never changed)")
