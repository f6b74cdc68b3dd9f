"""Auto top-ups as the contract states them: as many packs as the history needs, no hidden cap;
a cap only when the plan sets `max_per_period`, and then a `top_up_limit_reached` alert the
first time in a period it keeps a pack from being bought.

The worked example: plan `t` grants 10 credits a month (expiring at the month's end), an image
draws 1 credit, a pack is 10 credits for $1.00 bought when the balance falls below 5. Five
events of 10 images, Oct 1-5: each leaves the balance at 0, a pack brings it back to 10. Five
packs are bought ($5.00 in `top_up` lines), the balance is 10 at the month's end and no image
bills as overage. The close, a nightly run and a backfill replay the same wallet and agree.
"""
from __future__ import annotations

import io
import json
from decimal import Decimal as D

import polars as pl
import pytest
from typer.testing import CliRunner

from closeutil import table
from creditutil import at, catalog, event, iso, plan, subscription, write_store
from flows.cli import app
from flows.store import open_store
from transforms.credits.grants import history_grants
from transforms.credits.ledger import balances_table
from transforms.credits.lines import credit_lines
from transforms.credits.replay import replayed_wallets
from transforms.finance.alerts import credit_alerts
from transforms.periods import Period

OCT = Period(2026, 10)

T_TEXT = """
    plan: t
    version: 1
    effective_from: 2026-01-01
    currency: USD
    charges: [{meter: images, price: {model: standard, unit_price: "0.10"}}]
    credits:
      grants: [{credits: 10, every: period, expires: period_end}]
      consume: {images: 1}
      top_up: {credits: 10, price: "1.00", auto: true, below: 5{cap}}
      when_exhausted: overage
    """


def t_plan(cap: str = ""):
    return plan(T_TEXT.replace("{cap}", cap), "t.yaml")


EVENTS = [event("c1", "s1", f"e{day}", at(10, day), 10) for day in range(1, 6)]


def october(plan_file):
    sub = subscription("s1", "c1", "t")
    plans = catalog(plan_file)
    replay = replayed_wallets(history_grants([sub], plans, [], OCT), [sub], plans, EVENTS, OCT)
    lines = credit_lines(OCT, replay, [], [sub], {"s1": "USD"}, {"s1": "half_up"})["s1"]
    return replay, lines


def test_no_cap_by_default_five_packs_bought_five_dollars_balance_10_no_overage():
    replay, lines = october(t_plan())
    top_ups = [(line.kind, line.amount_minor) for line in lines if line.kind == "top_up"]
    assert top_ups == [("top_up", 100)] * 5                              # 5 x $1.00
    assert sum(minor for _, minor in top_ups) == 500                     # $5.00
    assert [e.balance_after for e in replay.entries][-1] == 10          # 0 + the fifth pack
    assert sum(D(c) for c in balances_table(replay, OCT)["closing"]) == 10
    assert sum(replay.billable_units.values()) == 0                     # nothing for the charges
    kinds = [a.kind for a in credit_alerts(replay, OCT)]
    assert kinds.count("auto_top_up") == 5 and "top_up_limit_reached" not in kinds


def test_a_cap_set_by_the_plan_binds_and_says_so_once():
    # max 3: Oct 1-3 buy packs; Oct 4 leaves 0 and no pack; Oct 5's 10 images are uncovered:
    # 10 x 0.10 = $1.00 of overage
    replay, lines = october(t_plan(", max_per_period: 3"))
    assert [line.amount_minor for line in lines if line.kind == "top_up"] == [100] * 3
    assert replay.billable_units[("s1", 1, "images", "{}")] == 10
    limits = [a for a in credit_alerts(replay, OCT) if a.kind == "top_up_limit_reached"]
    assert [(a.threshold, a.occurred_on.day) for a in limits] == [("3", 4)]   # first bound on Oct 4
    assert "3" in limits[0].message


def test_a_pack_bought_mid_event_counts_towards_the_cap():
    # one event of 35 images: 10 granted + 2 packs cover 30, the cap (2) keeps the rest uncovered
    sub = subscription("s1", "c1", "t")
    plans = catalog(t_plan(", max_per_period: 2"))
    replay = replayed_wallets(history_grants([sub], plans, [], OCT), [sub], plans,
                               [event("c1", "s1", "big", at(10, 2), 35)], OCT)
    assert sum(1 for g in replay.grants.values() if g.kind == "top_up") == 2
    assert replay.billable_units[("s1", 1, "images", "{}")] == 5
    assert [a[2] for a in replay.alerts].count("top_up_limit_reached") == 1


runner = CliRunner()


def billrun(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_close_nightly_and_backfill_agree_on_the_example(prefect_server, tmp_path):
    store, plans = write_store(tmp_path, {"t-v1": T_TEXT.replace("{cap}", "")}, ["c1"],
                               [("s1", "c1", "t", "2026-10-01", "")],
                               {"oct": [(f"e{d}", "c1", "images", "10", iso(at(10, d))) for d in range(1, 6)]}, [])
    night = billrun("nightly", "--date", "2026-10-31", "--store", store, "--plans", plans, "--json")
    assert night.exit_code == 0, night.output
    closed = billrun("close", "--period", "2026-10", "--store", store, "--plans", plans, "--json")
    assert closed.exit_code == 0, closed.output
    lines = table(store, "2026-10", "invoice_lines.parquet")
    billed = sorted((r["kind"], r["amount_minor"]) for r in lines.iter_rows(named=True) if r["amount_minor"])
    assert billed == [("top_up", 100)] * 5
    assert table(store, "2026-10", "invoices.parquet")["total_minor"].to_list() == [500]
    drafts = pl.read_parquet(io.BytesIO(open_store(store).read_bytes(
        "billing/nightly/date=2026-10-31/draft_invoice_lines.parquet")))
    assert sorted((r["kind"], r["amount_minor"]) for r in drafts.iter_rows(named=True) if r["amount_minor"]) == billed
    balances = table(store, "2026-10", "credit_balances.parquet")
    assert sum(D(c) for c in balances["closing"].to_list()) == 10
    again = billrun("backfill", "--from", "2026-10", "--to", "2026-10", "--as-of", "2026-11-15", "--reason", "check",
                    "--store", store, "--plans", plans, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["documents"] == []
