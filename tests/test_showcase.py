"""The demo's showcase customers and cost file, drawn from whatever catalog the demo is given."""
from __future__ import annotations

from pathlib import Path

from transforms.demo.showcase import showcase
from transforms.finance.margins import costs_from
from transforms.inputs.plans import load_catalog
from transforms.periods import Period

PLANS = Path(__file__).resolve().parents[1] / "plans"


def test_every_feature_the_demo_plans_can_show_is_shown():
    shown = showcase(load_catalog(PLANS), Period.parse("2026-10"))
    assert [f.customer_id for f in shown.features] == [
        "cus_showcase_tiers", "cus_showcase_cap", "cus_showcase_versions", "cus_showcase_credits"]
    assert set(shown.subscriptions["customer_id"]) == set(shown.customers["customer_id"])
    assert shown.usage["event_id"].n_unique() == shown.usage.height
    # an onboarding fee and a goodwill credit, each on a showcase customer of the period
    assert [(a["customer_id"], a["amount"][0] == "-") for a in shown.adjustments.iter_rows(named=True)] == [
        ("cus_showcase_tiers", False), ("cus_showcase_cap", True)]
    assert set(shown.adjustments["period"]) == {"2026-10"}


def test_a_period_without_a_new_plan_version_shows_no_version_split():
    # api v2 takes effect on 2026-10-15: November has no version change inside it
    shown = showcase(load_catalog(PLANS), Period.parse("2026-11"))
    assert "cus_showcase_versions" not in [f.customer_id for f in shown.features]
    assert shown.features  # the other features still show


def test_the_cost_file_is_one_the_close_accepts():
    costs = showcase(load_catalog(PLANS), Period.parse("2026-10")).costs
    checked = costs_from(costs)
    assert len(checked.rows) == costs.height > 0
    # a filtered and an unfiltered cost of one meter could cost one event twice: only one is kept
    assert not any(a.overlaps(b) and a.filter != b.filter for a in checked.rows for b in checked.rows)


def test_a_catalog_of_fixed_fees_only_shows_nothing_and_fails_nothing(tmp_path):
    (tmp_path / "flat-v1.yaml").write_text(
        "plan: flat\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n"
        "fixed_fees: [{name: Seat, amount: \"9.00\"}]\n")
    shown = showcase(load_catalog(tmp_path), Period.parse("2026-10"))
    assert shown.features == () and shown.usage.height == 0 and shown.costs.height == 0
