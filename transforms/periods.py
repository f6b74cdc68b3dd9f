"""Billing periods: calendar months in UTC, half-open. `2026-10` is [2026-10-01, 2026-11-01)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timezone

from transforms.errors import InputError

_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")


@dataclass(frozen=True, order=True)
class Period:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> "Period":
        match = _PERIOD.match(text or "")
        if not match or not 1 <= int(match.group(2)) <= 12:
            raise InputError(f"period {text!r} is not a month; write it as YYYY-MM, e.g. 2026-10")
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


def utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=timezone.utc)
