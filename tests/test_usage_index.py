"""Which usage objects a night reads, from the usage index's event-time ranges: worked examples at
the edges (the night's end is the next UTC midnight, excluded)."""
from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from transforms.engine.usage_index import event_ranges, has_days_after, night_end, nothing_in

UTC = timezone.utc
OCT = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))


def entry(first: str | None, last: str | None, undated: bool = False) -> dict:
    return {"first_at": first, "last_at": last, "undated": undated}


def test_a_night_ends_at_the_next_utc_midnight():
    assert night_end(date(2026, 10, 31)) == datetime(2026, 11, 1, tzinfo=UTC)


@pytest.mark.parametrize("last_at, through, day, expected", [
    ("2026-10-05T23:59:59+00:00", "2026-10-05", date(2026, 10, 6), False),  # nothing after night 5's end
    ("2026-10-06T00:00:00+00:00", "2026-10-05", date(2026, 10, 6), True),   # night 5's end instant: day 6
    ("2026-10-09T12:00:00+00:00", "2026-10-05", date(2026, 10, 6), True),   # later days, still ahead of night 6
    ("2026-10-09T12:00:00+00:00", "2026-10-06", date(2026, 10, 6), False),  # taken in by this very night
    ("2026-10-09T12:00:00+00:00", "2026-10-07", date(2026, 10, 6), False),  # a later night already took it
    (None, "2026-10-05", date(2026, 10, 6), False),                         # no dated row
])
def test_an_object_is_taken_in_again_when_it_holds_days_after_its_night(last_at, through, day, expected):
    assert has_days_after(entry("2026-10-01T00:00:00+00:00", last_at), through, day) is expected


def test_an_object_without_an_index_entry_or_a_night_is_not_taken_in_again():
    assert not has_days_after(None, "2026-10-05", date(2026, 10, 6))
    assert not has_days_after(entry("2026-10-01T00:00:00+00:00", "2026-10-09T00:00:00+00:00"), None, date(2026, 10, 6))


@pytest.mark.parametrize("first, last, undated, expected", [
    ("2026-09-01T00:00:00+00:00", "2026-09-30T23:59:59+00:00", False, True),   # all before the period
    ("2026-09-01T00:00:00+00:00", "2026-10-01T00:00:00+00:00", False, False),  # its last row at the start: inside
    ("2026-11-01T00:00:00+00:00", "2026-11-03T00:00:00+00:00", False, True),   # from the window's end (excluded) on
    ("2026-10-31T23:59:59+00:00", "2026-11-03T00:00:00+00:00", False, False),  # its first row the last second
    ("2026-09-01T00:00:00+00:00", "2026-09-02T00:00:00+00:00", True, False),   # an undated row belongs to every period
    (None, None, False, True),                                                 # no rows at all
])
def test_an_object_with_nothing_in_the_window_is_left_unread(first, last, undated, expected):
    assert nothing_in(entry(first, last, undated), OCT) is expected


def test_an_entry_without_the_undated_flag_is_always_read():
    assert not nothing_in({"first_at": "2026-09-01T00:00:00+00:00", "last_at": "2026-09-02T00:00:00+00:00"}, OCT)


def test_the_index_entries_of_tonights_objects():
    at = datetime(2026, 10, 5, 8, 30, tzinfo=UTC)
    assert event_ranges([("usage/a.jsonl", at, at, False), ("usage/b.jsonl", None, None, True)]) == {
        "usage/a.jsonl": entry("2026-10-05T08:30:00+00:00", "2026-10-05T08:30:00+00:00"),
        "usage/b.jsonl": entry(None, None, True),
    }
