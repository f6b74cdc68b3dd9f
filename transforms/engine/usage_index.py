"""Which usage objects a night reads: pure rules on the store-wide usage index, no store, no clock.

The index (billing/_state/nightly/usage_index.json, written by flows/nightly.py) keeps, per
usage object, its fingerprint and its event-time range: `first_at` and `last_at` (ISO 8601 UTC
instants, None when it holds no dated row) and `undated` (whether a row has no event time). A
night of day D takes in events up to the end of D (`night_end`); from the range it knows
whether an object taken in on an earlier night holds later days it must take in now
(`has_days_after`), and whether an object it has never read holds nothing of the period up to
tonight (`nothing_in`), so it can be left unread.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta

from transforms.periods import utc_midnight


def night_end(day: date) -> datetime:
    """The instant the night of `day` takes events up to (excluded): the next UTC midnight."""
    return utc_midnight(day + timedelta(days=1))


def has_days_after(entry: dict | None, through: str | None, day: date) -> bool:
    """Whether an object taken in through night `through` holds events of later days that
    night `day` must now take in (the usage index knows its last event)."""
    if entry is None or through is None or not entry.get("last_at") or date.fromisoformat(through) >= day:
        return False
    return datetime.fromisoformat(entry["last_at"]) >= night_end(date.fromisoformat(through))


def nothing_in(entry: dict, window: tuple[datetime, datetime]) -> bool:
    """An object whose every row has an event time outside `window` (rows without one belong to
    every period, so such an object is always read)."""
    if entry.get("undated", True):
        return False
    if not entry.get("first_at"):
        return True  # no rows at all
    first, last = datetime.fromisoformat(entry["first_at"]), datetime.fromisoformat(entry["last_at"])
    return last < window[0] or first >= window[1]


def event_ranges(rows: list[tuple]) -> dict[str, dict]:
    """One index entry per object read tonight, from nightly.sql `event_ranges` rows (source_key,
    first event time, last event time, whether a row has none)."""
    return {key: {"first_at": first.isoformat() if first else None, "last_at": last.isoformat() if last else None,
                  "undated": bool(undated)} for key, first, last, undated in rows}
