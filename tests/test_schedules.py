"""Which month a scheduled close closes, which night a scheduled nightly run brings to date, and
which date a scheduled backfill issues on: pure date arithmetic on the run's scheduled start, in UTC."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from flows.schedules import night_to_run, period_to_close, scheduled_on

UTC = timezone.utc
PLUS_2 = timezone(timedelta(hours=2))
MINUS_5 = timezone(timedelta(hours=-5))


@pytest.mark.parametrize("scheduled_at, period", [
    pytest.param(datetime(2026, 11, 1, 2, 0, tzinfo=UTC), "2026-10", id="cron 0 2 1 * * in November closes October"),
    pytest.param(datetime(2027, 1, 1, 2, 0, tzinfo=UTC), "2026-12", id="January closes December of the year before"),
    pytest.param(datetime(2026, 3, 1, 2, 0, tzinfo=UTC), "2026-02", id="March closes the 28-day February"),
    pytest.param(datetime(2026, 11, 30, 23, 59, tzinfo=UTC), "2026-10",
                 id="a run late by a month still closes by its month"),
    pytest.param(datetime(2026, 11, 1, 0, 30, tzinfo=PLUS_2), "2026-09",
                 id="00:30+02:00 on Nov 1 is Oct 31 22:30 UTC: the month before October"),
    pytest.param(datetime(2026, 10, 31, 21, 0, tzinfo=MINUS_5), "2026-10",
                 id="21:00-05:00 on Oct 31 is Nov 1 02:00 UTC: October"),
    pytest.param(datetime(2026, 11, 1, 0, 0), "2026-10", id="naive time is UTC"),
])
def test_period_to_close_is_the_month_before_the_scheduled_start_in_utc(scheduled_at: datetime, period: str) -> None:
    assert str(period_to_close(scheduled_at)) == period


@pytest.mark.parametrize("scheduled_at, day", [
    pytest.param(datetime(2026, 11, 1, 2, 0, tzinfo=UTC), date(2026, 11, 1), id="utc"),
    pytest.param(datetime(2026, 11, 1, 1, 0, tzinfo=PLUS_2), date(2026, 10, 31),
                 id="01:00+02:00 is the day before in UTC"),
    pytest.param(datetime(2026, 12, 31, 20, 0, tzinfo=MINUS_5), date(2027, 1, 1),
                 id="20:00-05:00 on Dec 31 is Jan 1 in UTC"),
])
def test_scheduled_on_is_the_utc_date_of_the_scheduled_start(scheduled_at: datetime, day: date) -> None:
    assert scheduled_on(scheduled_at) == day


@pytest.mark.parametrize("scheduled_at, night", [
    pytest.param(datetime(2026, 10, 15, 0, 30, tzinfo=UTC), date(2026, 10, 14),
                 id="cron 30 0 * * * on the 15th runs the 14th"),
    pytest.param(datetime(2026, 11, 1, 0, 30, tzinfo=UTC), date(2026, 10, 31),
                 id="the 1st runs the last night of the month before"),
    pytest.param(datetime(2027, 1, 1, 0, 30, tzinfo=UTC), date(2026, 12, 31), id="New Year's Day runs New Year's Eve"),
    pytest.param(datetime(2028, 3, 1, 0, 30, tzinfo=UTC), date(2028, 2, 29), id="March 1st of a leap year runs Feb 29"),
    pytest.param(datetime(2026, 10, 15, 23, 59, tzinfo=UTC), date(2026, 10, 14),
                 id="a run late by a day still runs by its schedule"),
    pytest.param(datetime(2026, 10, 15, 1, 0, tzinfo=PLUS_2), date(2026, 10, 13),
                 id="01:00+02:00 on the 15th is 23:00 UTC on the 14th: runs the 13th"),
    pytest.param(datetime(2026, 10, 14, 20, 0, tzinfo=MINUS_5), date(2026, 10, 14),
                 id="20:00-05:00 on the 14th is 01:00 UTC on the 15th: runs the 14th"),
    pytest.param(datetime(2026, 10, 15, 0, 30), date(2026, 10, 14), id="naive time is UTC"),
])
def test_night_to_run_is_the_utc_day_before_the_scheduled_start(scheduled_at: datetime, night: date) -> None:
    assert night_to_run(scheduled_at) == night
