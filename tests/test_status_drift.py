"""`status` reports a closed period as drifted only when a new or rewritten usage object can change
it: one holding rows of the period or earlier (an earlier copy of an event_id makes the period's
copy a duplicate), or rows that belong to no period (a bad timestamp, a malformed line, an
unreadable object: every close counts them). An object holding only later events leaves it
alone: the ordinary life of a store, where each month's usage arrives after the last close.

One small store, closed for 2026-10, then objects are added and rewritten.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from creditutil import write_store
from flows.cli import app
from flows.store import open_store

runner = CliRunner()
PLAN = """
    plan: p
    version: 1
    effective_from: 2026-01-01
    currency: USD
    charges: [{meter: images, price: {model: standard, unit_price: "0.10"}}]
    """
HEADER = "event_id,customer_id,meter,quantity,timestamp\n"


def billrun(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def closed(prefect_server, tmp_path_factory):
    store, plans = write_store(tmp_path_factory.mktemp("drift"), {"p-v1": PLAN}, ["c1"],
                               [("s1", "c1", "p", "2026-09-01", "")],
                               {"oct": [("e1", "c1", "images", "3", "2026-10-05T10:00:00Z")],
                                "nov-early": [("n1", "c1", "images", "2", "2026-11-01T00:00:00Z")]}, [])
    result = billrun("close", "--period", "2026-10", "--store", store, "--plans", plans)
    assert result.exit_code == 0, result.output
    return store, plans


def changes(store: str, plans: str) -> list[str]:
    result = billrun("status", "--store", store, "--plans", plans, "--json")
    assert result.exit_code == 0, result.output
    [period] = [p for p in json.loads(result.stdout)["periods"] if p["period"] == "2026-10"]
    return period["changes"]


def put(store: str, key: str, rows: str) -> None:
    open_store(store).put_bytes(key, (HEADER + rows).encode())


def test_objects_of_later_periods_only_are_not_drift(closed):
    store, plans = closed
    put(store, "usage/2026/11/02.csv", "n2,c1,images,4,2026-11-02T09:00:00Z\nn3,c1,images,1,2026-12-01T00:00:00Z\n")
    # rewritten, but still only November
    put(store, "usage/nov-early.csv", "n1,c1,images,5,2026-11-01T00:00:00Z\n")
    assert changes(store, plans) == []


@pytest.mark.parametrize("key, rows", [
    pytest.param("usage/late-oct.csv", "l1,c1,images,1,2026-10-31T23:59:59Z\n", id="a late event of the period"),
    pytest.param("usage/sept.csv", "s1,c1,images,1,2026-09-30T12:00:00Z\n", id="an earlier event (dedup)"),
    pytest.param("usage/bad.csv", "b1,c1,images,1,2026-13-01T00:00:00Z\n", id="a bad timestamp (every close)"),
    pytest.param("usage/junk.parquet", None, id="an unreadable object (every close)"),
])
def test_an_object_that_can_change_the_period_is_drift(closed, key, rows):
    store, plans = closed
    if rows is None:
        open_store(store).put_bytes(key, b"PAR1 this is not parquet")
    else:
        put(store, key, "n9,c1,images,1,2026-11-20T00:00:00Z\n" + rows)   # a later event as well
    try:
        found = changes(store, plans)
        assert len(found) == 1 and key in found[0] and "new" in found[0], found
    finally:
        open_store(store).delete(key)
