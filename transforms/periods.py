"""Billing periods: calendar months in UTC, half-open. `2026-10` is [2026-10-01, 2026-11-01)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timezone

from transforms.errors import InputError

_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
LAST_YEAR = 9998
"""The last year billrun bills: every period has an end date (9999-12 would end in year 10000)."""


@dataclass(frozen=True, order=True)
class Period:
    year: int
    month: int

    def __post_init__(self) -> None:
        if not 1 <= self.year <= LAST_YEAR:
            raise InputError(f"period {self.year:04d}-{self.month:02d} is out of range: "
                             f"billrun bills months from 0001-01 to {LAST_YEAR}-12")

    @classmethod
    def parse(cls, text: str, option: str = "period") -> "Period":
        match = _PERIOD.match(text or "")
        if not match or not 1 <= int(match.group(2)) <= 12:
            raise InputError(f"{option} {text!r} is not a month; write it as YYYY-MM, e.g. 2026-10")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def containing(cls, day: date) -> "Period":
        return cls(day.year, day.month)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def end(self) -> date:
        """The first day after the period (exclusive end); also a close's `issued_on`."""
        return date(self.year + self.month // 12, self.month % 12 + 1, 1)

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    @property
    def start_at(self) -> datetime:
        return utc_midnight(self.start)

    @property
    def end_at(self) -> datetime:
        return utc_midnight(self.end)

    def next(self) -> "Period":
        return Period.containing(self.end)

    def previous(self) -> "Period":
        return Period(self.year - (self.month == 1), 12 if self.month == 1 else self.month - 1)


def parse_day(text: str, option: str) -> date:
    """A command's date argument (`--date`, `--as-of`, `--on`), YYYY-MM-DD, inside the months
    billrun bills."""
    try:
        if not _DAY.match(text or ""):
            raise ValueError(text)
        day = date.fromisoformat(text)
    except ValueError:
        raise InputError(f"{option} {text!r} is not a date; write it as YYYY-MM-DD, e.g. 2026-10-14") from None
    if day.year > LAST_YEAR:
        raise InputError(f"{option} {text} is out of range: billrun bills days up to {LAST_YEAR}-12-31")
    return day


def utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=timezone.utc)
