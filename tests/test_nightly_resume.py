"""A night resumed from the last night's state equals the same night computed from the 1st.

A generated month (bench/generate.py: the repository's plans, so wallets paid with credits, a
percentage meter priced event by event; budgets of 5 and 50 and a few hard caps, so that spend
alerts fire on different nights) is taken in night
by night for six nights, each day's object delivered just before its night, with resent copies
and, before night 5, a late object of new events on day 2 (its customers' wallets and spend are
replayed from the start, everyone else's resumed). A second store holds the same objects and
runs night 6 only, from nothing. Their drafts, balances and period-to-date state must be the
same bytes, and the alerts the nights sent together must be the ones the fresh night finds: a
resume that dropped a day, or counted one twice, changes an amount.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.store import open_store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
NIGHTS = 6
LATE_BEFORE = 5
OUTPUTS = ("draft_invoices.parquet", "draft_invoice_lines.parquet", "credit_balances.parquet", "usage.parquet")
STATE = ("spend", "wallets")
ALERT_COLUMNS = ["customer_id", "subscription_id", "period", "kind", "threshold", "value", "occurred_on"]


def nightly(store: Path, day: int):
    result = runner.invoke(app, ["nightly", "--date", f"2026-10-{day:02d}", "--store", str(store),
                                 "--plans", str(REPO / "plans")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def fresh_store(source: Path, store: Path) -> None:
    """Customers, subscriptions and seller, no usage yet."""
    store.mkdir(parents=True)
    for folder in ("customers", "subscriptions"):
        shutil.copytree(source / folder, store / folder)
    shutil.copy2(source / "seller.yaml", store / "seller.yaml")


def deliver(source: Path, store: Path, relative: str) -> None:
    target = store / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / relative, target)


def alert_rows(frame: pl.DataFrame) -> list[tuple]:
    return sorted(frame.select(ALERT_COLUMNS).iter_rows())


@pytest.fixture(scope="module")
def stores(prefect_server, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    source = root / "source"
    subprocess.run([sys.executable, str(REPO / "bench" / "generate.py"), "--events", "6000", "--customers", "40",
                    "--out", str(source), "--seed", "3"], check=True, cwd=REPO, capture_output=True)
    subscriptions = source / "subscriptions/subscriptions.csv"
    subs = pl.read_csv(subscriptions, infer_schema=False)
    number = pl.int_range(pl.len())
    subs.with_columns(budget=pl.when(number % 2 == 0).then(pl.lit("5.00")).otherwise(pl.lit("50.00")),
                      hard_cap=pl.when(number % 5 == 0).then(pl.lit("8.00")).otherwise(pl.lit(None))
                      ).write_csv(subscriptions)
    # new events on day 2 (ids of their own, a tenth of the day's rows), arriving before night 5
    day2 = pl.read_parquet(source / "usage/date=2026-10-02/part-0.parquet")
    late = day2.gather_every(10).with_columns(pl.lit("late-") + pl.col("event_id"))
    late.write_parquet(source / "usage/date=2026-10-02/part-late.parquet")
    resumed, fresh = root / "resumed", root / "fresh"
    fresh_store(source, resumed)
    fresh_store(source, fresh)
    for day in range(1, NIGHTS + 1):
        objects = [f"usage/date=2026-10-{day:02d}/part-0.parquet"]
        if day == LATE_BEFORE:
            objects.append("usage/date=2026-10-02/part-late.parquet")
        for relative in objects:
            deliver(source, resumed, relative)
            deliver(source, fresh, relative)
        nightly(resumed, day)
    nightly(fresh, NIGHTS)
    return resumed, fresh


def test_the_resumed_night_drafts_what_a_night_from_the_first_drafts(stores):
    resumed, fresh = stores
    folder = f"billing/nightly/date=2026-10-{NIGHTS:02d}"
    for name in OUTPUTS:
        assert (resumed / folder / name).read_bytes() == (fresh / folder / name).read_bytes(), name
    assert pl.read_parquet(resumed / folder / "credit_balances.parquet").height  # wallets were replayed


def test_the_resumed_state_is_the_state_a_night_from_the_first_leaves(stores):
    """The same bytes, file by file: the resumed night's period-to-date tables are mostly files
    of the nights before (a file per day: a night writes the days it moves), the fresh night's
    all its own."""
    resumed, fresh = stores
    commit = f"billing/_state/nightly/period=2026-10/nights/night=2026-10-{NIGHTS:02d}.json"
    states = [json.loads((store / commit).read_text()) for store in (resumed, fresh)]
    for name in ("by_day", "events"):
        assert list(states[0][name]) == list(states[1][name]) == [f"2026-10-{d:02d}" for d in range(1, NIGHTS + 1)]
        for day, key in states[0][name].items():
            assert (resumed / key).read_bytes() == (fresh / states[1][name][day]).read_bytes(), (name, day)
    assert any(f"night=2026-10-{NIGHTS:02d}" not in key for key in states[0]["by_day"].values())  # carried
    for name in STATE:
        assert (resumed / states[0][name]).read_bytes() == (fresh / states[1][name]).read_bytes(), name


def test_the_nights_together_sent_the_alerts_the_fresh_night_finds(stores):
    resumed, fresh = stores
    sent = [pl.read_parquet(io.BytesIO(open_store(str(resumed)).read_bytes(
        f"billing/nightly/date=2026-10-{day:02d}/alerts.parquet"))) for day in range(1, NIGHTS + 1)]
    found = pl.read_parquet(fresh / f"billing/nightly/date=2026-10-{NIGHTS:02d}/alerts.parquet")
    assert found.filter(pl.col("kind") == "spend_threshold").height  # spend was replayed and crossed
    assert alert_rows(pl.concat(sent)) == alert_rows(found)
