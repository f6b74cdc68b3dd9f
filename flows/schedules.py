"""Thin flows for Prefect schedules: they turn "when the run was scheduled" into the parameters of
the real flows and call them as subflows. No billing logic lives here.

A scheduled run that starts late (the worker was down over the night of the 1st) still closes the
month before its *scheduled* time, never the month it happens to start in, and a nightly run
scheduled for 00:30 on the 15th still brings the 14th to date when it starts at noon; that is why
the clock comes from the flow run, not the wall.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.backfill import backfill
from flows.close import close_period
from flows.nightly import nightly
from transforms.periods import Period


def period_to_close(scheduled_at: datetime) -> Period:
    """The calendar month (UTC) before the one a run is scheduled in: the run scheduled
    2026-11-01T02:00Z closes 2026-10. A naive time is taken as UTC."""
    return Period.containing(_utc(scheduled_at).date()).previous()


def scheduled_on(scheduled_at: datetime) -> date:
    """The UTC date of a run's scheduled start: a scheduled backfill's `issued_on`."""
    return _utc(scheduled_at).date()


def night_to_run(scheduled_at: datetime) -> date:
    """The UTC day before the one a run is scheduled in: the night scheduled 2026-11-01T00:30Z
    brings 2026-10-31 (and with it October) to date. A naive time is taken as UTC."""
    return scheduled_on(scheduled_at) - timedelta(days=1)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _scheduled_start() -> datetime:
    """When this flow run was scheduled to start. A run created by hand or called outside a
    deployment is scheduled for the moment it was created, which is now."""
    return flow_run.scheduled_start_time or datetime.now(timezone.utc)


@flow(name="monthly-close", log_prints=False)
def monthly_close(store: str = "./billing-data", plans: str = "./plans", period: str | None = None) -> dict:
    """Close the month before the run's scheduled start (or `period`, YYYY-MM, when given).
    Only a month that has ended by the scheduled start is closed: a `period` still running
    then is refused."""
    logger = get_run_logger()
    scheduled_at = _scheduled_start()
    if period is None:
        period = str(period_to_close(scheduled_at))
        logger.info("closing %s, the month before this run's scheduled start %s", period,
                    _utc(scheduled_at).isoformat(timespec="seconds"))
    else:
        logger.info("closing %s (given as a parameter)", period)
    return close_period(store=store, plans=plans, period=period, now=_utc(scheduled_at))


@flow(name="backfill-range", log_prints=False)
def backfill_range(store: str, plans: str, from_period: str, to_period: str, reason: str,
                   as_of: str | None = None) -> dict:
    """Re-rate the closed periods from_period..to_period and issue correction documents dated
    `as_of` (YYYY-MM-DD; default: the UTC date of the run's scheduled start)."""
    if as_of is None:
        as_of = scheduled_on(_scheduled_start()).isoformat()
    get_run_logger().info("backfill %s..%s as of %s: %s", from_period, to_period, as_of, reason)
    return backfill(store=store, plans=plans, first=from_period, last=to_period, reason=reason, as_of=as_of)


# A night that failed on something passing (the store unreachable for a while, a backfill holding
# the period's lock) is tried again; a rerun of a night is safe (it changes nothing that is done)
# and a retry also redelivers alerts a webhook refused.
@flow(name="nightly-run", log_prints=False, retries=2, retry_delay_seconds=600)
def nightly_run(store: str = "./billing-data", plans: str = "./plans", day: str | None = None,
                webhook_env: str | None = None, webhook_secret: str | None = None) -> dict:
    """Bring the period to date for the UTC day before the run's scheduled start (or `day`,
    YYYY-MM-DD, when given). The webhook is named by reference: `webhook_env` (an environment
    variable of the worker holding its URL) or `webhook_secret` (a Prefect Secret block)."""
    logger = get_run_logger()
    if day is None:
        scheduled_at = _scheduled_start()
        day = night_to_run(scheduled_at).isoformat()
        logger.info("nightly run for %s, the day before this run's scheduled start %s", day,
                    _utc(scheduled_at).isoformat(timespec="seconds"))
    else:
        logger.info("nightly run for %s (given as a parameter)", day)
    return nightly(store=store, plans=plans, day=day, webhook_env=webhook_env, webhook_secret=webhook_secret)
