"""`billrun impact`: a pricing change's revenue impact, checked against real closes.

A temporary git repository holds the plan catalog: `tok` v1 (tokens at $2.00 per million) and
`images` (the repo's credit plan: $10 a month buys 200 credits). The commit is the base. In the
working tree (the head) tok v1's price rises to $2.50 in place, and tok v2 ($3.00, from
2026-09-15, moving existing subscriptions on 2026-12-01 with 30 days' notice) is added. One small
store, its usage in 2026-09 and 2026-10, is closed for both months with the base plans (the store
`impact` reads, as production would be) and a copy of it with the head plans. The report's figures
must be the differences between the two closes' invoices:

    customer  plan              2026-09 base / head        2026-10 base / head
    c1        tok (blank)       3M: 6.00 / 7.50            1M: 2.00 / 2.50    v1 changed in place
    c2        tok pinned v1     2M: 4.00 / 5.00            4M: 8.00 / 10.00   the pin does not protect it
    c3        tok from 09-20    5M: 10.00 / 15.00 (v2)     none: 0.00 / 0.00  binds v2 in the head
    c4        images            50 images: 10.00 / 10.00   250 images: the same  unchanged (and a $25.00
                                                                                  onboarding adjustment in 2026-10)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from closeutil import REPO, close, table
from flows.cli import app
from flows.store import open_store
from transforms.finance.impact import catalog_changes, md, migration_notices
from transforms.inputs.plans import Catalog, parse_plan
from transforms.inputs.reference import Subscription
from transforms.money import format_money

PERIODS = ("2026-09", "2026-10")
TOK_V1 = """\
plan: tok
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {name: Tokens, meter: tokens, price: {model: standard, unit_price: "PRICE", per: 1000000}}
"""
TOK_V2 = """\
plan: tok
version: 2
effective_from: 2026-09-15
migrate_existing_on: 2026-12-01
notice_days: 30
currency: USD
charges:
  - {name: Tokens, meter: tokens, price: {model: standard, unit_price: "3.00", per: 1000000}}
"""
CUSTOMERS = [("c1", "Blank & Co"), ("c2", "Pinned Ltd"), ("c3", "@late | <b>Starter</b>"), ("c4", "Studio")]
SUBSCRIPTIONS = [("sub-c1", "c1", "tok", "", "2026-09-01"), ("sub-c2", "c2", "tok", "1", "2026-09-01"),
                 ("sub-c3", "c3", "tok", "", "2026-09-20"), ("sub-c4", "c4", "images", "", "2026-09-01")]
USAGE = [("c1", "tokens", "3000000", "2026-09-05"), ("c2", "tokens", "2000000", "2026-09-06"),
         ("c3", "tokens", "5000000", "2026-09-25"), ("c4", "images", "50", "2026-09-07"),
         ("c1", "tokens", "1000000", "2026-10-05"), ("c2", "tokens", "4000000", "2026-10-06"),
         ("c4", "images", "250", "2026-10-07")]
COSTS = "meter,filter,unit_cost,per,currency,effective_from\ntokens,,1.00,1000000,USD,2026-01-01\n" \
        "images,,0.02,,USD,2026-01-01\n"
runner = CliRunner()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout


def write_plans(folder: Path, head: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "plans" / "images-v1.yaml", folder / "images-v1.yaml")
    (folder / "tok-v1.yaml").write_text(TOK_V1.replace("PRICE", "2.50" if head else "2.00"))
    if head:
        (folder / "tok-v2.yaml").write_text(TOK_V2)
    return folder


def write_store(uri: str) -> str:
    store = open_store(uri, create=True)
    store.put_bytes("customers/customers.csv", ("customer_id,name,email\n" + "".join(
        f'{c},"{n}",billing@{c}.example\n' for c, n in CUSTOMERS)).encode())
    store.put_bytes("subscriptions/subscriptions.csv", (
        "subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap\n"
        + "".join(f"{s},{c},{p},{v},{d},,,\n" for s, c, p, v, d in SUBSCRIPTIONS)).encode())
    store.put_bytes("usage/events.csv", ("event_id,customer_id,meter,quantity,timestamp\n" + "".join(
        f"e{i},{c},{m},{q},{d}T12:00:00Z\n" for i, (c, m, q, d) in enumerate(USAGE))).encode())
    store.put_bytes("costs/costs.csv", COSTS.encode())
    store.put_bytes("adjustments/adjustments.csv", b"adjustment_id,customer_id,subscription_id,period,description,"
                    b"amount,currency,reason,taxable\nadj-1,c4,,2026-10,Onboarding workshop,25.00,USD,order 7,\n")
    return uri


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def world(prefect_server, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("impact")
    repo = root / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    plans = write_plans(repo / "plans", head=False)
    git(repo, "add", "plans")
    git(repo, "commit", "-q", "-m", "plans")
    base_commit = git(repo, "rev-parse", "HEAD").strip()
    write_plans(repo / "plans", head=True)  # the pull request's change, not committed
    head_plans = write_plans(root / "head-plans", head=True)
    base_plans = write_plans(root / "base-plans", head=False)
    store, twin = write_store(str(root / "store")), write_store(str(root / "twin"))
    for period in PERIODS:
        close(store, str(base_plans), period)
        close(twin, str(head_plans), period)
    before = {o.key: open_store(store).read_bytes(o.key) for o in open_store(store).list("")}
    out = root / "impact.md"
    result = invoke("impact", "--base", "HEAD", "--periods", "2", "--store", store, "--plans", str(plans),
                    "--out", str(out), "--json", "--top", "2")
    assert result.exit_code == 0, result.output
    return {"root": root, "store": store, "twin": twin, "plans": plans, "base_commit": base_commit,
            "report": json.loads(result.stdout), "markdown": out.read_text(encoding="utf-8"), "before": before}


def totals(store: str, period: str) -> dict[str, int]:
    invoices = table(store, period, "invoices.parquet")
    return dict(invoices.group_by("currency").agg(pl.col("total_minor").sum()).iter_rows())


def by_customer(store: str) -> dict[str, int]:
    invoices = pl.concat([table(store, p, "invoices.parquet") for p in PERIODS])
    return dict(invoices.group_by("customer_id").agg(pl.col("total_minor").sum()).iter_rows())


@pytest.mark.slow
def test_totals_are_the_closes_with_each_catalog(world):
    report = world["report"]
    assert [p["period"] for p in report["periods"]] == list(PERIODS)
    for t in report["totals"]:
        base, head = totals(world["store"], t["period"]), totals(world["twin"], t["period"])
        assert (t["base_minor"], t["head_minor"], t["change_minor"]) == (
            base[t["currency"]], head[t["currency"]], head[t["currency"]] - base[t["currency"]])
    # the arithmetic of the module docstring, so the closes themselves are held to it
    assert [(t["period"], t["base_minor"], t["head_minor"]) for t in report["totals"]] == [
        ("2026-09", 600 + 400 + 1000 + 1000, 750 + 500 + 1500 + 1000),
        ("2026-10", 200 + 800 + 0 + _images_october(world), 250 + 1000 + 0 + _images_october(world))]
    [usd] = report["currency_totals"]
    assert (usd["base_minor"], usd["head_minor"]) == (
        sum(totals(world["store"], p)["USD"] for p in PERIODS), sum(totals(world["twin"], p)["USD"] for p in PERIODS))


def _images_october(world) -> int:
    invoices = table(world["store"], "2026-10", "invoices.parquet")
    return invoices.filter(pl.col("customer_id") == "c4")["total_minor"].sum()


@pytest.mark.slow
def test_each_customers_change_is_the_difference_of_the_closes(world):
    base, head = by_customer(world["store"]), by_customer(world["twin"])
    rows = {r["customer_id"]: r for r in world["report"]["customers"]}
    assert {c: (r["base_minor"], r["head_minor"], r["change_minor"]) for c, r in rows.items()} == {
        c: (base[c], head[c], head[c] - base[c]) for c in base}
    assert {c: r["change_minor"] for c, r in rows.items()} == {"c1": 200, "c2": 300, "c3": 500, "c4": 0}
    # largest change first; a rise of more than 20% and more than $10 is a shock: none here ($5 at most)
    assert [r["customer_id"] for r in world["report"]["customers"]] == ["c3", "c2", "c1", "c4"]
    assert [r["customer_id"] for r in world["report"]["customers"] if r["shock"]] == []
    assert rows["c3"]["plans_base"] == "tok v1" and rows["c3"]["plans_head"] == "tok v2"


@pytest.mark.slow
def test_the_markdown_report_shows_the_figures(world):
    text = world["markdown"]
    assert text.startswith(f"# Pricing impact: HEAD ({world['base_commit'][:12]}) → working tree\n")
    for t in world["report"]["totals"]:
        assert (f"| {t['period']} | USD | {format_money(t['base_minor'], 'USD')} | "
                f"{format_money(t['head_minor'], 'USD')} | +{format_money(t['change_minor'], 'USD')} |") in text
    # --top 2: the two largest customer changes, then the rest summed up in one row
    # names from the store cannot ping anyone, break the table or inject HTML
    assert ("| c3 | &#64;late \\| &lt;b&gt;Starter&lt;/b&gt; | tok v1 → tok v2 | USD | $10.00 | $15.00 | +$5.00 "
            "| +50.0% |") in text
    assert "| c2 | Pinned Ltd |" in text and "| c1 | Blank" not in text
    assert "3 customer bills change (3 up, 0 down), 1 does not; the 2 largest changes:" in text
    assert "| … 1 more customer |  |  | USD | $8.00 | $10.00 | +$2.00 |  |" in text
    assert "**Plan files:** tok v1 changed; tok v2 added." in text
    assert text == world["report"]["markdown"]


@pytest.mark.slow
def test_breakage_is_what_each_close_recognized(world):
    def breakage(store: str) -> int:
        return sum(table(store, p, "revenue.parquet").filter(pl.col("stream") == "credits")["breakage_minor"].sum()
                   for p in PERIODS)

    [usd] = world["report"]["breakage_and_margin"]["breakage"]
    assert (usd["base_minor"], usd["head_minor"]) == (breakage(world["store"]), breakage(world["twin"]))
    assert usd["base_minor"] > 0  # c4 left 150 credits unused in 2026-09


@pytest.mark.slow
def test_margin_is_what_each_close_wrote(world):
    def margin(store: str) -> int:
        return sum(table(store, p, "margins.parquet")["margin_minor"].sum() for p in PERIODS)

    [usd] = world["report"]["breakage_and_margin"]["margin"]
    assert (usd["base_minor"], usd["head_minor"]) == (margin(world["store"]), margin(world["twin"]))
    # the tokens cost the same with either catalog: the margin rises by exactly what the bills do
    assert usd["change_minor"] == 200 + 300 + 500


@pytest.mark.slow
def test_the_customers_to_notify_are_those_billed_at_another_price(world):
    notices = {n["subscription_id"]: n for n in world["report"]["notices"]}
    assert sorted(notices) == ["sub-c1", "sub-c2", "sub-c3"]  # not the images customer
    assert (notices["sub-c1"]["why"], notices["sub-c1"]["from"], notices["sub-c1"]["closed"]) == (
        "tok v1 prices changed in place", "2026-09-01", True)
    assert notices["sub-c2"]["why"] == "tok v1 prices changed in place"
    assert (notices["sub-c3"]["why"], notices["sub-c3"]["from"]) == ("bound to tok v2 instead of tok v1",
                                                                     "2026-09-20")
    assert notices["sub-c3"]["changes"] == [{"currency": "USD", "change_minor": 500}]


@pytest.mark.slow
def test_impact_writes_nothing_into_the_store(world):
    store = open_store(world["store"])
    assert {o.key: store.read_bytes(o.key) for o in store.list("")} == world["before"]


# Refusals: one line, exit 1, before anything slow starts -------------------------------------

@pytest.mark.slow
def test_a_plans_folder_outside_git_is_refused(tmp_path):
    plans = write_plans(tmp_path / "plans", head=False)
    store = write_store(str(tmp_path / "store"))
    result = invoke("impact", "--base", "main", "--store", store, "--plans", str(plans))
    assert result.exit_code == 1
    assert result.output.startswith("billrun: error: --plans ") and "not inside a git working tree" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.fixture
def repo(tmp_path) -> Path:
    git(tmp_path, "init", "-q")
    write_plans(tmp_path / "plans", head=False)
    git(tmp_path, "add", "plans")
    git(tmp_path, "commit", "-q", "-m", "plans")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("rev", ["no-such-branch", "--output=x", "HEAD~3"])
def test_an_unknown_revision_is_refused(repo, rev):
    store = write_store(str(repo / "store"))
    result = invoke("impact", "--base", rev, "--store", store, "--plans", str(repo / "plans"))
    assert result.exit_code == 1
    assert result.output.startswith(f"billrun: error: --base {rev!r}" if rev.startswith("-") else
                                    f"billrun: error: --base {rev}: no such revision")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_store_without_a_closed_period_is_refused(repo):
    store = write_store(str(repo / "store"))
    result = invoke("impact", "--base", "HEAD", "--store", store, "--plans", str(repo / "plans"))
    assert result.exit_code == 1
    assert result.output == f"billrun: error: --store {store}: no closed period to re-rate (close one first: " \
                            f"billrun close --period YYYY-MM)\n"


@pytest.mark.slow
def test_a_plans_folder_the_base_revision_lacks_is_refused(repo):
    (repo / "new-plans").mkdir()
    write_plans(repo / "new-plans", head=False)
    result = invoke("impact", "--base", "HEAD", "--store", write_store(str(repo / "store")),
                    "--plans", str(repo / "new-plans"))
    assert result.exit_code == 1
    assert "the plans folder new-plans/ does not exist at HEAD" in result.output


# The pure parts ---------------------------------------------------------------------------------

def catalog(*texts: str) -> Catalog:
    return Catalog.from_files([parse_plan(t, f"p{i}.yaml") for i, t in enumerate(texts)])


def sub(sid: str, version: int | None, start: str, end: str | None = None) -> Subscription:
    from datetime import date
    return Subscription(sid, f"cust-{sid}", "tok", version, date.fromisoformat(start),
                        date.fromisoformat(end) if end else None, None, None, 1)


def test_a_new_version_that_moves_existing_subscriptions_needs_a_notice_from_its_date():
    from datetime import date
    base = catalog(TOK_V1.replace("PRICE", "2.00"))
    head = catalog(TOK_V1.replace("PRICE", "2.00"), TOK_V2)
    subs = [sub("a", None, "2026-01-10"), sub("pinned", 1, "2026-01-10"), sub("gone", None, "2026-01-10", "2026-10-01"),
            sub("ends-first", None, "2026-01-10", "2026-12-01")]
    notices = migration_notices(subs, base, head, date(2026, 10, 1), date(2026, 11, 1))
    # the pinned one keeps v1 (unchanged), the ended ones never reach 2026-12-01
    assert [(n["subscription_id"], n["from"], n["notify_by"], n["closed"], n["why"]) for n in notices] == [
        ("a", "2026-12-01", "2026-11-01", False, "tok v2 moves existing subscriptions on 2026-12-01")]


def test_a_version_equal_in_price_needs_no_notice_and_is_not_a_price_change():
    from datetime import date
    base = catalog(TOK_V1.replace("PRICE", "2.00"))
    reworded = catalog(TOK_V1.replace("PRICE", "2.00").replace("currency: USD", "currency: USD\ndescription: Tokens"))
    assert catalog_changes(base, reworded) == [{"plan": "tok", "version": 1, "change": "reworded"}]
    assert migration_notices([sub("a", None, "2026-01-10")], base, reworded, date(2026, 10, 1), date(2026, 11, 1)) == []
    same_price_v2 = catalog(TOK_V1.replace("PRICE", "2.00"), TOK_V2.replace('"3.00"', '"2.00"'))
    assert migration_notices([sub("a", None, "2026-01-10")], base, same_price_v2, date(2026, 10, 1),
                             date(2026, 11, 1)) == []


@pytest.mark.parametrize("text,expected", [
    ("Acme | Co", "Acme \\| Co"), ("@octocat", "&#64;octocat"), ("<script>", "&lt;script&gt;"),
    ("[click](http://x)", "\\[click\\](http://x)"), ("two\nlines", "two lines"), ("a_b*c`d", "a\\_b\\*c\\`d"),
])
def test_text_from_the_store_stays_literal_in_the_markdown(text, expected):
    assert md(text) == expected


# The pull request workflow --------------------------------------------------------------------

def test_the_workflow_runs_impact_on_plan_changes_with_least_permissions():
    import yaml

    text = (REPO / ".github" / "workflows" / "pricing-impact.yml").read_text(encoding="utf-8")
    workflow = yaml.safe_load(text)
    assert workflow[True] == {"pull_request": {"paths": ["plans/**"]}}  # YAML 1.1 reads `on:` as true
    assert workflow["permissions"] == {"contents": "read", "pull-requests": "write"}
    [job] = workflow["jobs"].values()
    assert "permissions" not in job
    steps = job["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    assert any(s.get("uses", "").startswith("actions/setup-python@") for s in steps)
    runs = "\n".join(s.get("run", "") for s in steps)
    assert 'billrun impact --base "origin/$BASE_REF"' in runs
    assert job["env"]["BASE_REF"] == "${{ github.base_ref }}"
    # expressions never expand inside a script (no injection through a branch name), and secrets
    # reach only the environment of the step that needs them, never a command line
    assert "${{" not in runs and "${{" not in next(s for s in steps if "script" in s.get("with", {}))["with"]["script"]
    for step in steps:
        for name, value in (step.get("env") or {}).items():
            if "secrets." in str(value):
                assert name.startswith(("AWS_", "HAS_KEY")), name
    assert "echo $AWS" not in runs and "set -x" not in runs


@pytest.mark.slow
def test_a_head_that_drops_a_plan_in_use_is_refused_naming_the_side(world, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    write_plans(repo / "plans", head=False)
    git(repo, "add", "plans")
    git(repo, "commit", "-q", "-m", "plans")
    (repo / "plans" / "tok-v1.yaml").unlink()  # the pull request deletes the plan four subscriptions are on
    result = invoke("impact", "--base", "HEAD", "--store", world["store"], "--plans", str(repo / "plans"))
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("billrun: error: with the head plans: subscriptions/subscriptions.csv row ")
    assert last.endswith("plan: no plan file defines plan 'tok'")


@pytest.mark.slow
def test_an_s3_store_gives_the_report_a_folder_store_gives(world, s3_bucket):
    from closeutil import copy_tree_to_store
    from flows.impact import impact

    uri = f"s3://{s3_bucket}/prod"
    copy_tree_to_store(Path(world["store"]), uri)
    # a shock here: up by more than 30% and by more than $2.50 (c3: +$5.00, +50%; not c2: +$3.00 but
    # +25%; not c1: +$2.00, +25%)
    # --periods 5 with two closed: both are re-rated, and the report says so
    result = impact(store=uri, plans=str(world["plans"]), base="HEAD", periods=5, top=2, shock="0.3",
                    shock_amount="2.50")
    assert result["notes"] == ["--periods 5: the store has 2 closed period(s); all of them are re-rated."]
    folder = world["report"]
    for key in ("periods", "totals", "currency_totals", "plans", "notices", "breakage_and_margin"):
        assert result[key] == folder[key], key
    def figures(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in c.items() if k not in ("shock", "outcome")} for c in rows]

    assert figures(result["customers"]) == figures(folder["customers"])
    assert [c["customer_id"] for c in result["customers"] if c["shock"]] == ["c3"]
    before_shocks, _, after = result["markdown"].partition("## Bill shock")
    shocks = after.partition("## ")[0]
    assert before_shocks == folder["markdown"].replace(md(world["store"]), md(uri)).partition("## Bill shock")[0]
    assert "by more than 30% and by more than 2.5 of its currency" in shocks and "| c3 |" in shocks
    assert "| c2 |" not in shocks


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to hand the repository to "
                    "another user")
def test_git_says_why_when_it_refuses_the_repository(repo):
    # a repository owned by another user: git refuses it, and the error says so rather than "no git"
    shutil.chown(repo, user="nobody")
    result = invoke("impact", "--base", "HEAD", "--store", write_store(str(repo / "store")),
                    "--plans", str(repo / "plans"))
    assert result.exit_code == 1
    assert "not inside a git working tree (fatal: detected dubious ownership in repository" in result.output
