"""Property: whatever the order of closes, archives, late copies and backfills, no event_id is
billed on two finalized documents unless a correction reverses one.

Each event ei belongs to its own customer c(i+1), one call each, so the calls a period's
documents (invoice plus committed corrections) bill a customer count that event's billings in
that period. Real closes and backfills through the flows, on a tiny folder store per example."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flows.backfill import backfill
from flows.close import close_period
from indexutil import archive, billed_by_customer, send, tiny_store

pytestmark = pytest.mark.slow

PERIODS = ("2026-10", "2026-11")
EVENTS = 3

step = st.one_of(
    st.tuples(st.just("send"), st.integers(0, EVENTS - 1), st.integers(0, len(PERIODS) - 1), st.integers(1, 28)),
    st.tuples(st.just("archive"), st.integers(0, 7)),
    st.tuples(st.just("close"), st.integers(0, len(PERIODS) - 1)),
    st.tuples(st.just("backfill"), st.integers(0, len(PERIODS) - 1), st.integers(0, len(PERIODS) - 1)),
)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(step, min_size=3, max_size=6))
@example([("send", 0, 0, 5), ("close", 0), ("archive", 0), ("send", 0, 1, 3), ("close", 1)])  # archive, resend
@example([("send", 0, 1, 3), ("close", 1), ("send", 0, 0, 5), ("close", 0), ("backfill", 0, 1)])  # out of order
def test_no_event_is_billed_twice(prefect_server, steps):
    root = Path(tempfile.mkdtemp(prefix="billrun-index-property-"))
    try:
        store, plans = tiny_store(root, customers=EVENTS)
        objects, backfills = [], 0
        for op in steps:
            if op[0] == "send":
                _, event, period, day = op
                key = f"usage/o{len(objects)}.csv"
                send(store, key, (f"e{event}", f"{PERIODS[period]}-{day:02d}T00:00:00Z", 1, f"c{event + 1}"))
                objects.append(key)
            elif op[0] == "archive" and objects:
                archive(store, objects.pop(op[1] % len(objects)))
            elif op[0] == "close":  # a month may have no usage yet: closed all the same
                close_period(store=store, plans=plans, period=PERIODS[op[1]], allow_empty=True)
            elif op[0] == "backfill":
                first, last = sorted((op[1], op[2]))
                backfills += 1
                backfill(store=store, plans=plans, first=PERIODS[first], last=PERIODS[last], reason="property",
                         as_of=f"2026-12-{10 + backfills:02d}")
        billed = billed_by_customer(store)
        for event in range(EVENTS):
            customer = f"c{event + 1}"
            per_period = {p: billed.get((p, customer), 0) for p in PERIODS}
            assert all(n in (0, 1) for n in per_period.values()), (steps, per_period)
            assert sum(per_period.values()) <= 1, (steps, per_period)
    finally:
        shutil.rmtree(root, ignore_errors=True)
