"""Which billing model is right: simulations, margins, migrations and their reports.

One small store, built here, holds customers on a credits plan (`images`, the repo's
plans/images-v1.yaml: $10 a month buys 200 credits, an image costs 1, an upscale 2, auto top-ups
of 100 for $4) and on usage plans. It is closed for 2026-10, and so is a twin store whose images
subscriptions were moved to `images-usage` ($0.08 an image, $0.16 an upscale, no fee) before its
close. A simulation of the first store with images=images-usage must bill every customer exactly
what the twin's real close billed; the arithmetic of each customer is written out below.

    customer  usage           images v1 (credits)                     images-usage             outcome
    c1        50 images       10.00, 150 credits expire: 7.50 broken  50 x 0.08 = 4.00         down -60.0%
    c2        150 images      10.00, 50 expire: 2.50                  150 x 0.08 = 12.00       up +20.0% (not above)
    c3        180 images      10.00, 20 expire: 1.00                  180 x 0.08 = 14.40       shock +44.0%
    c4        60 upscales     10.00, 120 credits used, 80 expire: 4.00 60 x 0.16 = 9.60        down -4.0%
    c6        nothing         10.00, 200 expire: 10.00                0.00                     down -100.0%
    c7        300 images      10 + 2 top-ups x 4 = 18.00, none expire 300 x 0.08 = 24.00       shock +33.3%
    c5 is on images-usage already and c8 on a token plan: neither moves.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import date
from decimal import Decimal as D

import polars as pl
import pytest
from typer.testing import CliRunner

from closeutil import REPO, close, table
from flows.cli import app
from flows.simulate import migrate, simulate
from flows.store import open_store
from transforms.errors import InputError
from transforms.finance.margins import Costs, CostsError, costs_from, margins_table
from transforms.finance.simulate import (
    PlanRef,
    change_bins,
    closed_period_problem,
    migration,
    moved_subscriptions,
    notice_problem,
    outcome,
    plan_moves,
)
from transforms.inputs.plans import Catalog, load_catalog, parse_plan
from transforms.inputs.reference import Subscription
from transforms.periods import Period

PERIOD = "2026-10"
EVIL = "<b>Evil & Co</b>"

IMAGES_USAGE = """\
plan: images-usage
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {name: Images, meter: images, price: {model: standard, unit_price: "0.08"}}
  - {name: Upscales, meter: upscales, price: {model: standard, unit_price: "0.16"}}
"""
TOKENS = """\
plan: tok
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {name: Tokens, meter: tokens, price: {model: standard, unit_price: "2.00", per: 1000000}}
"""
CUSTOMERS = [("c1", "Light Images Ltd"), ("c2", "Even Images"), ("c3", EVIL), ("c4", "Upscale Studio"),
             ("c5", "Already Usage"), ("c6", "Idle Images"), ("c7", "Heavy Images"), ("c8", "Token Co")]
PLAN_OF = {"c1": "images", "c2": "images", "c3": "images", "c4": "images", "c5": "images-usage",
           "c6": "images", "c7": "images", "c8": "tok"}
USAGE = [("c1", "images", "50"), ("c2", "images", "150"), ("c3", "images", "180"), ("c4", "upscales", "60"),
         ("c5", "images", "10"), ("c7", "images", "300"), ("c8", "tokens", "1000000")]
COSTS = "meter,filter,unit_cost,per,currency,effective_from\nimages,,0.02,,USD,2026-01-01\n" \
        "upscales,,0.03,,USD,2026-01-01\n"

PAID = {"c1": 1000, "c2": 1000, "c3": 1000, "c4": 1000, "c6": 1000, "c7": 1800}
WOULD_PAY = {"c1": 400, "c2": 1200, "c3": 1440, "c4": 960, "c6": 0, "c7": 2400}
OUTCOME = {"c1": "down", "c2": "up", "c3": "shock", "c4": "down", "c6": "down", "c7": "shock"}
BREAKAGE = {"c1": 750, "c2": 250, "c3": 100, "c4": 400, "c6": 1000, "c7": 0}


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    return buffer.getvalue().encode()


def subscriptions_csv(plan_of: dict[str, str]) -> bytes:
    return csv_bytes(["subscription_id", "customer_id", "plan", "plan_version", "start_date", "end_date", "budget",
                      "hard_cap"], [[f"sub-{c}", c, plan_of[c], "", "2026-10-01", "", "", ""] for c, _ in CUSTOMERS])


def write_store(uri: str, plan_of: dict[str, str]) -> str:
    store = open_store(uri, create=True)
    store.put_bytes("customers/customers.csv", csv_bytes(["customer_id", "name", "email"],
                                                         [[c, n, f"billing@{c}.example"] for c, n in CUSTOMERS]))
    store.put_bytes("subscriptions/subscriptions.csv", subscriptions_csv(plan_of))
    store.put_bytes("usage/2026-10/events.csv", csv_bytes(
        ["event_id", "customer_id", "meter", "quantity", "timestamp"],
        [[f"e-{c}", c, meter, q, "2026-10-05T12:00:00Z"] for c, meter, q in USAGE]))
    store.put_bytes("costs/costs.csv", COSTS.encode())
    return uri


@pytest.fixture(scope="module")
def world(prefect_server, tmp_path_factory) -> dict:
    """Plans, the store closed on images, its twin closed on images-usage, and the simulation."""
    root = tmp_path_factory.mktemp("simulate")
    plans = root / "plans"
    plans.mkdir()
    shutil.copy(REPO / "plans" / "images-v1.yaml", plans / "images-v1.yaml")
    (plans / "images-usage-v1.yaml").write_text(IMAGES_USAGE)
    (plans / "tok-v1.yaml").write_text(TOKENS)
    store = write_store(str(root / "store"), PLAN_OF)
    moved = write_store(str(root / "moved"), {c: "images-usage" if p == "images" else p for c, p in PLAN_OF.items()})
    close(store, str(plans), PERIOD)
    close(moved, str(plans), PERIOD)
    before = {o.key: open_store(store).read_bytes(o.key) for o in open_store(store).list("billing/period=")}
    result = simulate(store=store, plans=str(plans), period=PERIOD, plan_map=["images=images-usage"])
    return {"root": root, "plans": str(plans), "store": store, "moved": moved, "before": before, "result": result}


def by_customer(result: dict) -> dict[str, dict]:
    return {r["customer_id"]: r for r in result["customers"]}


# The simulation against a real close ----------------------------------------------------------

def test_would_pay_is_what_a_real_close_with_the_subscriptions_moved_bills(world):
    invoices = table(world["moved"], PERIOD, "invoices.parquet")
    real = dict(invoices.group_by("customer_id").agg(pl.col("total_minor").sum()).iter_rows())
    simulated = by_customer(world["result"])
    assert {c: r["would_pay_minor"] for c, r in simulated.items()} == {c: real[c] for c in simulated}
    assert {c: r["would_pay_minor"] for c, r in simulated.items()} == WOULD_PAY


def test_paid_is_what_the_closed_period_billed(world):
    invoices = table(world["store"], PERIOD, "invoices.parquet")
    issued = dict(invoices.group_by("customer_id").agg(pl.col("total_minor").sum()).iter_rows())
    assert {c: r["paid_minor"] for c, r in by_customer(world["result"]).items()} == {c: issued[c] for c in PAID}
    assert {c: r["paid_minor"] for c, r in by_customer(world["result"]).items()} == PAID


def test_breakage_under_each_model_matches_the_revenue_rows_of_both_closes(world):
    def breakage(store: str) -> dict[str, int]:
        credits = table(store, PERIOD, "revenue.parquet").filter(pl.col("stream") == "credits")
        return dict(credits.select("customer_id", "breakage_minor").iter_rows())

    rows = by_customer(world["result"])
    assert {c: r["breakage_current_minor"] for c, r in rows.items()} == {c: breakage(world["store"]).get(c, 0)
                                                                         for c in rows} == BREAKAGE
    assert {c: r["breakage_candidate_minor"] for c, r in rows.items()} == {c: breakage(world["moved"]).get(c, 0)
                                                                           for c in rows}
    usd = world["result"]["totals"][0]
    assert (usd["breakage_current_minor"], usd["breakage_candidate_minor"]) == (2500, 0)


@pytest.mark.parametrize("customer", sorted(OUTCOME))
def test_each_customer_is_classified_by_its_change(world, customer):
    row = by_customer(world["result"])[customer]
    assert row["outcome"] == OUTCOME[customer]
    assert row["difference_minor"] == WOULD_PAY[customer] - PAID[customer]


def test_bill_shock_counts_customers_above_the_threshold_and_no_more(world):
    # c3 +44.0% and c7 +33.3% are shocks; c2 at exactly +20.0% is not above 20%.
    usd = world["result"]["totals"][0]
    assert {k: usd[k] for k in ("currency", "customers", "shock", "up", "same", "down")} == {
        "currency": "USD", "customers": 6, "shock": 2, "up": 1, "same": 0, "down": 3}
    assert (usd["paid_minor"], usd["would_pay_minor"], usd["difference_minor"], usd["change_pct"]) == (
        6800, 6400, -400, "-5.9")
    assert by_customer(world["result"])["c2"]["change_pct"] == "20.0"
    assert by_customer(world["result"])["c7"]["change_pct"] == "33.3"


@pytest.mark.parametrize("paid,would,shock,expected", [
    (1000, 1200, "0.2", "up"), (1000, 1201, "0.2", "shock"), (1000, 1200, "0.19", "shock"),
    (1000, 1000, "0.2", "same"), (1000, 999, "0.2", "down"), (0, 1, "0.2", "shock"), (0, 0, "0.2", "same"),
])
def test_a_shock_is_a_rise_above_the_threshold(paid, would, shock, expected):
    assert outcome(paid, would, D(shock)) == expected


def test_the_simulation_writes_nothing_into_the_closed_period(world):
    store = open_store(world["store"])
    assert {o.key: store.read_bytes(o.key) for o in store.list("billing/period=")} == world["before"]
    written = {o.key.split("/", 3)[-1] for o in store.list("billing/simulations/")}
    assert written == {"report.html", "customers.parquet", "margins.parquet", "summary.json"}
    assert world["result"]["report"] == f"billing/simulations/{world['result']['simulation_id']}/report.html"
    assert world["result"]["drift"] == {"customers": 0, "examples": []}
    assert world["result"]["moved"] == {"customers": 6, "subscriptions": 6}


def test_the_same_simulation_again_gives_the_same_id_and_bytes(world):
    store = open_store(world["store"])
    first = store.read_bytes(world["result"]["report"])
    again = simulate(store=world["store"], plans=world["plans"], period=PERIOD, plan_map=["images=images-usage"])
    assert again["simulation_id"] == world["result"]["simulation_id"]
    assert store.read_bytes(again["report"]) == first


def test_usage_the_candidate_does_not_price_is_reported_not_dropped(world):
    result = simulate(store=world["store"], plans=world["plans"], period=PERIOD, plan_map=["images=tok"],
                      report=False)
    # the five image and upscale events of c1, c2, c3, c4 and c7 have no price on tok
    assert result["quarantined"] == {"rows": 5, "by_meter": {"images": 4, "upscales": 1},
                                     "by_reason": {"unknown_meter": 5}}
    assert any("5 usage rows" in note and "images 4, upscales 1" in note for note in result["notes"])
    assert {r["would_pay_minor"] for r in result["customers"]} == {0}
    assert result["report"] is None


def test_customers_narrow_the_move(world):
    result = simulate(store=world["store"], plans=world["plans"], period=PERIOD, plan_map=["images=images-usage"],
                      customers=["c3", "c7"], report=False)
    assert sorted(by_customer(result)) == ["c3", "c7"]
    assert result["totals"][0]["shock"] == 2
    with pytest.raises(InputError, match="c5 has no subscription on images in 2026-10"):
        simulate(store=world["store"], plans=world["plans"], period=PERIOD, plan_map=["images=images-usage"],
                 customers=["c5"], report=False)


def test_an_open_period_cannot_be_simulated(world):
    with pytest.raises(InputError, match=r"2026-11 is not closed .*billrun close --period 2026-11"):
        simulate(store=world["store"], plans=world["plans"], period="2026-11", plan_map=["images=images-usage"])


# Margins --------------------------------------------------------------------------------------

def test_the_simulation_shows_margins_under_both_models(world):
    # costs: an image 0.02, an upscale 0.03.
    # c3 now: 10.00 fee - 180 x 0.02 = 6.40; on images-usage: 14.40 - 3.60 = 10.80.
    # c4 now: 10.00 - 60 x 0.03 = 8.20; on images-usage: 9.60 - 1.80 = 7.80.
    rows = by_customer(world["result"])
    assert (rows["c3"]["margin_current_minor"], rows["c3"]["margin_candidate_minor"]) == (640, 1080)
    assert (rows["c4"]["margin_current_minor"], rows["c4"]["margin_candidate_minor"]) == (820, 780)
    assert world["result"]["costs"]["key"] == "costs/costs.csv"


def line(customer: str, meter: str | None, amount_minor: int, kind: str = "usage", plan: str | None = "p",
         segment_no: int | None = 1) -> dict:
    return {"customer_id": customer, "subscription_id": f"s-{customer}", "segment_no": segment_no, "kind": kind,
            "meter": meter, "amount_minor": amount_minor, "currency": "USD", "plan": plan,
            "plan_version": 1 if plan else None}


def usage(customer: str, meter: str, units: str, dims: str = "{}", day: date | None = None) -> dict:
    row = {"subscription_id": f"s-{customer}", "segment_no": 1, "meter": meter, "dims": dims, "units": D(units)}
    return {**row, "day": day} if day else row


SEGMENTS = pl.DataFrame([{"subscription_id": "s-a", "segment_no": 1, "customer_id": "a", "plan": "p",
                          "plan_version": 1, "currency": "USD", "start_on": date(2026, 10, 1)}])
TOKEN_COSTS = ('meter,filter,unit_cost,per,currency,effective_from\n'
               'tokens,"{""model"": ""gpt-4o""}",1.25,1000000,USD,2026-01-01\n'
               'tokens,"{""model"": ""mini""}",0.10,1000000,USD,2026-01-01\n'
               'images,,0.02,,USD,2026-01-01\nimages,,0.03,,USD,2026-10-15\n')


def costs(text: str = TOKEN_COSTS) -> Costs:
    return costs_from(pl.read_csv(io.BytesIO(text.encode()), infer_schema=False))


def margin_row(lines: list[dict], usage_rows: list[dict], meter: str | None) -> dict:
    frame = pl.DataFrame(usage_rows) if usage_rows else pl.DataFrame(
        schema={"subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String, "dims": pl.String,
                "units": pl.Decimal(38, 9)})
    margins = margins_table(pl.DataFrame(lines), frame, SEGMENTS, costs(), Period.parse(PERIOD))
    return margins.filter(pl.col("meter").eq_missing(meter)).row(0, named=True)


MARGIN_EXAMPLES = [
    pytest.param([line("a", "images", 1440)], [usage("a", "images", "180")], "images", (1440, 360, 1080, "75.0"),
                 id="images 180 x 0.02 = 3.60 cost; 14.40 - 3.60 = 10.80 = 75.0%"),
    pytest.param([line("a", "tokens", 500)], [usage("a", "tokens", "2000000", '{"model":"gpt-4o"}')], "tokens",
                 (500, 250, 250, "50.0"), id="tokens per 1M 2,000,000 x 1.25/1,000,000 = 2.50; 5.00 - 2.50 = 50.0%"),
    pytest.param([line("a", "tokens", 100)], [usage("a", "tokens", "1000000", '{"model":"gpt-4o"}'),
                                              usage("a", "tokens", "3000000", '{"model":"mini"}')], "tokens",
                 (100, 155, -55, "-55.0"), id="filters 1M x 1.25/1M + 3M x 0.10/1M = 1.55; 1.00 - 1.55 = -55.0%"),
    pytest.param([line("a", "images", 1000)], [usage("a", "images", "100", day=date(2026, 10, 14)),
                                               usage("a", "images", "100", day=date(2026, 10, 15))], "images",
                 (1000, 500, 500, "50.0"), id="by day 100 x 0.02 (Oct 14) + 100 x 0.03 (from Oct 15) = 5.00"),
    pytest.param([line("a", "images", 1000)], [usage("a", "images", "200")], "images", (1000, 400, 600, "60.0"),
                 id="no day 200 x 0.02 (in force Oct 1; 0.03 starts mid-period) = 4.00"),
    pytest.param([line("a", "tokens", 300)], [usage("a", "tokens", "1000000", '{"model":"claude"}')], "tokens",
                 (300, None, None, None), id="a model without a cost: cost unknown, not zero"),
    pytest.param([line("a", None, 1000, kind="fixed_fee"), line("a", None, 400, kind="top_up", plan=None,
                                                                 segment_no=None)], [], None,
                 (1400, 0, 1400, "100.0"), id="fee 10.00 + top-up 4.00 without a meter cost nothing = 100.0%"),
    pytest.param([line("a", "images", 0)], [usage("a", "images", "0.5")], "images", (0, 1, -1, None),
                 id="0.5 images x 0.02 = 0.01 rounded once; no revenue, no margin percent"),
]


@pytest.mark.parametrize("lines,usage_rows,meter,expected", MARGIN_EXAMPLES)
def test_margins_worked_examples(lines, usage_rows, meter, expected):
    row = margin_row(lines, usage_rows, meter)
    assert (row["revenue_minor"], row["cost_minor"], row["margin_minor"], row["margin_pct"]) == expected
    assert (row["customer_id"], row["period"], row["plan"], row["plan_version"], row["currency"]) == (
        "a", PERIOD, "p", 1, "USD")


def test_margins_revenue_adds_up_to_the_invoices(world):
    invoices = table(world["store"], PERIOD, "invoices.parquet")
    lines = table(world["store"], PERIOD, "invoice_lines.parquet")
    from transforms.finance.margins import segment_plans_from_lines
    margins = margins_table(lines, table(world["store"], PERIOD, "usage_summary.parquet"),
                            segment_plans_from_lines(lines), costs(COSTS), Period.parse(PERIOD))
    assert dict(margins.group_by("customer_id").agg(pl.col("revenue_minor").sum()).iter_rows()) == dict(
        invoices.group_by("customer_id").agg(pl.col("total_minor").sum()).iter_rows())
    c7 = margins.filter(pl.col("customer_id") == "c7")
    # fee 10.00 + two top-ups 8.00 on the row without a meter; 300 images cost 6.00
    assert c7.select("meter", "units", "revenue_minor", "cost_minor").rows() == [
        (None, None, 1800, 0), ("images", "300", 0, 600), ("upscales", "0", 0, 0)]


@pytest.mark.parametrize("text,message", [
    pytest.param("meter,unit_cost,currency,effective_from\nimages,abc,USD,2026-01-01\n",
                 "costs/costs.csv row 1, unit_cost: 'abc' is not a decimal", id="price not a decimal"),
    pytest.param("meter,unit_cost,currency,effective_from\nimages,-1,USD,2026-01-01\n",
                 "row 1, unit_cost: '-1' is not a decimal of 0 or more", id="negative"),
    pytest.param("meter,unit_cost,per,currency,effective_from\nimages,1,0,USD,2026-01-01\n",
                 "row 1, per: '0' is not a decimal above 0", id="per zero"),
    pytest.param("meter,unit_cost,currency,effective_from\nimages,1,usd,2026-01-01\n",
                 "row 1, currency: 'usd' is not an ISO 4217", id="currency"),
    pytest.param("meter,unit_cost,currency,effective_from\nimages,1,USD,2026-13-01\n",
                 "row 1, effective_from: '2026-13-01' is not a date", id="date"),
    pytest.param("meter,filter,unit_cost,currency,effective_from\nimages,[1],1,USD,2026-01-01\n",
                 "row 1, filter: '[1]' is not a JSON object", id="filter"),
    pytest.param('meter,filter,unit_cost,currency,effective_from\ntokens,,1,USD,2026-01-01\n'
                 'tokens,"{""model"": ""x""}",1,USD,2026-01-01\n',
                 "row 2, filter: {\"model\": \"x\"} and row 1's (no filter) could both cost one tokens event",
                 id="overlapping filters"),
    pytest.param("meter,unit_cost,currency,effective_from\nimages,1,USD,2026-01-01\nimages,2,USD,2026-01-01\n",
                 "row 2: same meter, filter, currency and effective_from as row 1", id="twice"),
    pytest.param("meter,unit_cost,currency\nimages,1,USD\n", "missing column(s) effective_from", id="column"),
])
def test_a_bad_cost_file_is_refused_with_one_line(text, message):
    with pytest.raises(CostsError) as refused:
        costs(text)
    assert message in str(refused.value) and "\n" not in str(refused.value)


# Moving subscriptions (pure) ------------------------------------------------------------------

def plan(text: str) -> object:
    return parse_plan(text, "plans/x.yaml")


CATALOG = Catalog.from_files([
    plan("plan: api\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n"),
    plan("plan: api\nversion: 2\neffective_from: 2026-10-15\ncurrency: USD\n"),
    plan("plan: late\nversion: 1\neffective_from: 2026-06-01\ncurrency: USD\n"),
    plan("plan: images\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n")])


def sub(sid: str, plan_id: str, version: int | None, start: str, customer: str = "c") -> Subscription:
    return Subscription(sid, customer, plan_id, version, date.fromisoformat(start), None, None, None, 1)


def test_moves_keep_a_blank_version_blank_and_pin_a_named_one():
    subs = (sub("a", "images", None, "2026-07-01"), sub("b", "api", None, "2026-07-01", "d"),
            sub("c", "api", None, "2026-10-20", "e"))
    moves = plan_moves(["images=api", "api:1=api:2"], CATALOG)
    moved, ids = moved_subscriptions(subs, moves, CATALOG, Period.parse(PERIOD))
    # images -> api, blank: v1 is in force on its start; api v1 -> pinned v2; c is on v2 already
    assert [(s.subscription_id, s.plan, s.plan_version) for s in moved] == [
        ("a", "api", None), ("b", "api", 2), ("c", "api", None)]
    assert ids == {"a", "b"}


def test_a_move_to_a_plan_not_yet_in_force_asks_for_a_pinned_version():
    with pytest.raises(InputError, match="starts 2026-03-01, before plan 'late' has a version in force.*late:1"):
        moved_subscriptions((sub("a", "images", None, "2026-03-01"),), plan_moves(["images=late"], CATALOG), CATALOG,
                            Period.parse(PERIOD))


@pytest.mark.parametrize("texts,message", [
    (["images"], "is not OLD=NEW"), (["images=nope"], "no plan file defines plan 'nope'"),
    (["api:3=images"], "plan 'api' has no version '3'"), (["images=images"], "moves a plan onto itself"),
    (["images=api", "images=late"], "images is mapped twice"), ([], "give at least one OLD=NEW"),
])
def test_a_bad_plan_map_is_refused(texts, message):
    with pytest.raises(InputError, match=message):
        plan_moves(texts, CATALOG)


@pytest.mark.parametrize("paid,would,label,shock", [
    (1000, 1200, "+10% to +20%", 0), (1000, 1201, "+20% to +30%", 1), (1000, 950, "-10% to 0%", 0),
    (1000, 0, "-100% to -90%", 0), (1000, 1000, "no change", 0), (0, 500, "above +100%", 1),
    (1000, 2000, "+90% to +100%", 1), (1000, 2001, "above +100%", 1),
])
def test_bill_changes_fall_in_bins_closed_above(paid, would, label, shock):
    comparison = pl.DataFrame({"paid_minor": [paid], "would_pay_minor": [would],
                               "outcome": ["shock" if shock else "other"]})
    bins = {b["label"]: (b["customers"], b["shock"]) for b in change_bins(comparison, D("0.2"))}
    assert bins[label] == (1, shock) and sum(n for n, _ in bins.values()) == 1


def test_closed_periods_and_notice_bound_the_migration_date():
    closed = [Period(2026, 9), Period(2026, 10)]
    assert closed_period_problem(date(2026, 11, 1), closed) is None
    assert "falls in closed period 2026-10; a migration may start on 2026-11-01" in closed_period_problem(
        date(2026, 10, 15), closed)
    assert "before closed period 2026-09 ends" in closed_period_problem(date(2026, 8, 31), closed)
    assert notice_problem(date(2026, 11, 1), date(2026, 10, 2), 30) is None
    assert "gives customers 29 days' notice" in notice_problem(date(2026, 11, 1), date(2026, 10, 3), 30)


# Migrations through the store -----------------------------------------------------------------

@pytest.fixture
def copy_of_store(world, tmp_path) -> str:
    shutil.copytree(world["store"], tmp_path / "store")
    return str(tmp_path / "store")


def subscription_rows(store: str) -> list[dict]:
    return pl.read_csv(io.BytesIO(open_store(store).read_bytes("subscriptions/subscriptions.csv")),
                       infer_schema=False).to_dicts()


def test_a_migration_ends_the_old_rows_and_starts_new_ones(world, copy_of_store):
    result = migrate(store=copy_of_store, plans=world["plans"], plan="images", to="images-usage", on="2026-11-01",
                     as_of="2026-10-01", customers=["c1", "c3"], report=False)
    assert result["status"] == "migrated" and result["notify_by"] == "2026-10-02"
    rows = {r["subscription_id"]: r for r in subscription_rows(copy_of_store)}
    assert rows["sub-c1"] == {"subscription_id": "sub-c1", "customer_id": "c1", "plan": "images",
                              "plan_version": None, "start_date": "2026-10-01", "end_date": "2026-11-01",
                              "budget": None, "hard_cap": None}
    assert rows["sub-c1-images-usage-20261101"] == {
        "subscription_id": "sub-c1-images-usage-20261101", "customer_id": "c1", "plan": "images-usage",
        "plan_version": None, "start_date": "2026-11-01", "end_date": None, "budget": None, "hard_cap": None}
    assert rows["sub-c3"]["end_date"] == "2026-11-01" and "sub-c3-images-usage-20261101" in rows
    assert rows["sub-c2"]["end_date"] is None and len(rows) == len(CUSTOMERS) + 2
    # the preview is the simulation of the last closed period for those customers
    assert result["preview"]["period"] == PERIOD
    assert {t["currency"]: (t["customers"], t["paid_minor"], t["would_pay_minor"])
            for t in result["preview"]["totals"]} == {"USD": (2, 2000, 1840)}
    assert result["after"] == "billrun simulate --period 2026-11 --plan-map images-usage=images --customers c1,c3"
    again = migrate(store=copy_of_store, plans=world["plans"], plan="images", to="images-usage", on="2026-11-01",
                    as_of="2026-10-01", customers=None, report=False)
    assert {c["customer_id"] for c in again["changes"]} == {"c2", "c4", "c6", "c7"}  # c1, c3 are moved already


def test_a_dry_run_changes_nothing(world, copy_of_store):
    before = open_store(copy_of_store).read_bytes("subscriptions/subscriptions.csv")
    result = migrate(store=copy_of_store, plans=world["plans"], plan="images", to="images-usage", on="2026-11-01",
                     as_of="2026-10-01", dry_run=True, report=False)
    assert result["status"] == "dry_run" and len(result["changes"]) == 6
    assert open_store(copy_of_store).read_bytes("subscriptions/subscriptions.csv") == before


@pytest.mark.parametrize("on,as_of,message", [
    ("2026-10-15", "2026-09-01", "--on 2026-10-15 falls in closed period 2026-10"),
    ("2026-11-01", "2026-10-20", "gives customers 12 days' notice, less than --notice-days 30"),
])
def test_a_migration_into_a_closed_period_or_without_notice_is_refused(world, copy_of_store, on, as_of, message):
    before = open_store(copy_of_store).read_bytes("subscriptions/subscriptions.csv")
    with pytest.raises(InputError, match=message):
        migrate(store=copy_of_store, plans=world["plans"], plan="images", to="images-usage", on=on, as_of=as_of)
    assert open_store(copy_of_store).read_bytes("subscriptions/subscriptions.csv") == before


def test_a_migration_that_would_leave_metered_usage_unpriced_is_refused(world, copy_of_store):
    """tok prices only tokens: the images customers' images and upscales would go unbilled."""
    before = open_store(copy_of_store).read_bytes("subscriptions/subscriptions.csv")
    with pytest.raises(InputError, match=r"--to tok: the plan neither prices nor pays with credits images, upscales, "
                                         r"metered by 6 subscription\(s\) on images \(e.g. sub-c1\)"):
        migrate(store=copy_of_store, plans=world["plans"], plan="images", to="tok", on="2026-11-01",
                as_of="2026-10-01", report=False)
    assert open_store(copy_of_store).read_bytes("subscriptions/subscriptions.csv") == before


def test_a_migration_refuses_a_meter_the_closed_period_billed_that_the_target_does_not_price(world):
    """Usage of the last closed period counts too, not only the current plan's charges."""
    frame = pl.DataFrame({"subscription_id": ["s1"], "customer_id": ["c1"], "plan": ["images-usage"],
                          "plan_version": [None], "start_date": ["2026-10-01"], "end_date": [None],
                          "budget": [None], "hard_cap": [None]}, schema={c: pl.String for c in (
                              "subscription_id", "customer_id", "plan", "plan_version", "start_date", "end_date",
                              "budget", "hard_cap")})
    catalog = load_catalog(world["plans"])
    customers = pl.DataFrame({"customer_id": ["c1"], "name": ["C1"], "email": ["c1@example.com"]})
    ok = migration(frame, "subscriptions.csv", customers, catalog, PlanRef("images-usage"), PlanRef("images"),
                   date(2026, 11, 1), None, {"s1": {"images"}})
    assert len(ok.changes) == 1
    with pytest.raises(InputError, match="neither prices nor pays with credits tokens"):
        migration(frame, "subscriptions.csv", customers, catalog, PlanRef("images-usage"), PlanRef("images"),
                  date(2026, 11, 1), None, {"s1": {"images", "tokens"}})


# Reports --------------------------------------------------------------------------------------

def test_the_simulation_report_draws_its_charts_inline_and_escapes_names(world):
    html = open_store(world["store"]).read_bytes(world["result"]["report"]).decode()
    for title in ("Revenue by plan and stream, USD", "Breakage over the closed periods, USD",
                  "Distribution of bill changes", "Margin by meter, USD"):
        assert f"<h2>{title}</h2>" in html
    assert html.count("<svg") == 4
    assert "&lt;b&gt;Evil &amp; Co&lt;/b&gt;" in html and EVIL not in html
    assert "<script" not in html and "<link" not in html and 'src="' not in html


def test_the_period_report(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", "--period", PERIOD, "--store", world["store"], "--out", str(out), "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["charts"] == 3
    html = out.read_text()
    assert html.count("<svg") == 3 and "Margin by meter, USD" in html and "Closed period 2026-10" in html


def test_the_command_line(world):
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--period", PERIOD, "--plan-map", "images=images-usage", "--no-report",
                                 "--store", world["store"], "--plans", world["plans"], "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"][0]["shock"] == 2
    text = runner.invoke(app, ["simulate", "--period", PERIOD, "--plan-map", "images=images-usage", "--no-report",
                               "--store", world["store"], "--plans", world["plans"]], catch_exceptions=False)
    assert "c7  images v1 -> images-usage v1: $18.00 -> $24.00 (+33.3%, shock)" in text.stdout
    refused = runner.invoke(app, ["simulate", "--period", PERIOD, "--plan-map", "images=nope",
                                  "--store", world["store"], "--plans", world["plans"]], catch_exceptions=False)
    assert refused.exit_code == 1
    assert refused.stderr.strip().startswith("billrun: error: --plan-map images=nope: no plan file defines plan 'nope'")
    assert "Traceback" not in refused.output
