"""Guards on irreversible commands and arguments checked before Prefect starts.

A close is final, so a month that has not ended (or a typo for a later one) and a month without
any usage while its subscriptions meter usage are refused unless forced; every refusal is one
line that says why and which option forces it, exit 1. The command line's own checks (formats,
date order, folders, plan names, closed periods) answer without starting Prefect. "Now" is
always fixed here, never the real clock.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows import cli
from flows.cli import app
from transforms.errors import InputError
from transforms.inputs.guards import backfill_dated_too_early, close_too_early, notice_problem
from transforms.periods import Period, parse_day

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
PLANS = str(GOLDEN / "plans")
NOW = datetime(2026, 12, 7, 9, 30, tzinfo=timezone.utc)
CLOSE_MODULES = ("flows.close", "flows.steps", "flows.outputs", "flows.publish")
"""The close flow and the modules it is made of: each imports Prefect."""
FIXED_FEES_ONLY = """\
plan: seat
version: 1
effective_from: 2026-01-01
currency: USD
fixed_fees:
  - {name: Seat, amount: "10.00"}
"""


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def refused(result, *fragments: str) -> str:
    """One `billrun: error:` line, exit 1, no traceback; returns the line."""
    assert result.exit_code == 1, result.output
    text = result.stderr.strip()
    assert text.startswith("billrun: error: ") and "\n" not in text, text
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in text, text
    return text


@pytest.fixture(autouse=True)
def fixed_now(monkeypatch):
    monkeypatch.setattr(cli, "_now", lambda: NOW)


@pytest.fixture
def store(tmp_path) -> str:
    uri = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", uri)
    return uri


def mark_closed(store: str, period: str) -> None:
    """A manifest as a close leaves it: what the checks before Prefect read (no Prefect here)."""
    folder = Path(store) / "billing" / f"period={period}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({
        "period": period, "run_id": f"close-{period}-000000000000", "status": "closed", "inputs": [], "plans": [],
        "rows": {"read": 3, "billed": 3, "duplicates": 0, "quarantined": 0},
        "totals": [{"currency": "USD", "invoices": 2, "total_minor": 4000}],
        "outputs": [{"key": f"billing/period={period}/invoices.parquet", "size": 1, "sha256": "0" * 64}],
        "quarantined_by_reason": {}}))


def published(store: str, period: str) -> list[str]:
    folder = Path(store) / "billing" / f"period={period}"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# The guards themselves -------------------------------------------------------------------------

@pytest.mark.parametrize("period,now,refused_", [
    ("2026-11", datetime(2026, 12, 1, 0, 0, tzinfo=timezone.utc), False),   # ended at this very instant
    ("2026-11", datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc), True),  # one minute to go
    ("2026-12", NOW, True),                                                  # the month still running
    ("2027-05", NOW, True),                                                  # 2027-05 typed for 2026-05
])
def test_a_month_closes_only_once_it_has_ended(period, now, refused_):
    assert (close_too_early(Period.parse(period), now) is not None) == refused_


def test_a_correction_is_never_dated_before_the_invoice_it_corrects():
    closed = [Period(2026, 9), Period(2026, 10)]
    assert backfill_dated_too_early(date(2026, 11, 1), closed) is None  # the day 2026-10's invoices were issued
    assert "pass --as-of 2026-11-01 or later" in backfill_dated_too_early(date(2026, 10, 31), closed)


def test_notice_of_a_date_in_the_past_is_not_negative():
    text = notice_problem(date(2026, 12, 2), date(2026, 12, 7), 30)
    assert "-5" not in text and "is 5 days before --as-of 2026-12-07" in text and "2027-01-06 or later" in text
    assert "gives customers 3 days' notice" in notice_problem(date(2026, 12, 10), date(2026, 12, 7), 30)


@pytest.mark.parametrize("text", ["2026-13", "2026-1", "26-10", "", "9999-12", "0000-05"])
def test_a_period_out_of_form_or_range_is_refused(text):
    with pytest.raises(InputError):
        Period.parse(text)


@pytest.mark.parametrize("text", ["2026-02-30", "2026-10-5", "9999-12-31", "tomorrow"])
def test_a_date_out_of_form_or_range_is_refused(text):
    with pytest.raises(InputError, match="--date"):
        parse_day(text, "--date")


# close: each guard refuses, answered before Prefect where it can be ---------------------------

def test_close_of_a_month_not_ended_is_refused(store):
    refused(run("close", "--period", "2026-12", "--store", store, "--plans", PLANS),
            "2026-12 has not ended yet", "--before-period-end")
    assert published(store, "2026-12") == []


def test_close_of_a_far_future_month_is_refused(store):
    refused(run("close", "--period", "2027-05", "--store", store, "--plans", PLANS),
            "2027-05 has not ended yet", "--before-period-end")


def test_close_of_a_store_without_usage_is_refused_before_prefect(store, monkeypatch):
    shutil.rmtree(Path(store) / "usage")
    for module in CLOSE_MODULES:  # importing the flow (and Prefect) would fail
        monkeypatch.setitem(sys.modules, module, None)
    refused(run("close", "--period", "2026-10", "--store", store, "--plans", PLANS),
            "2026-10 has no usage rows", "3 subscription(s)", "(jp, tok)", "--allow-empty")


def test_a_plan_of_fixed_fees_only_needs_no_usage(store, tmp_path):
    from flows.preflight import usage_missing_refusal

    shutil.rmtree(Path(store) / "usage")
    plans = tmp_path / "plans"
    shutil.copytree(PLANS, plans)
    (plans / "seat-v1.yaml").write_text(FIXED_FEES_ONLY)
    subs = Path(store) / "subscriptions" / "subscriptions.csv"
    header = "subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap\n"
    subs.write_text(header + "sub_1,c1,seat,,2026-01-01,,,\nsub_2,c2,tok,,2026-01-01,2026-10-01,,\n")
    assert usage_missing_refusal(store, str(plans), Period(2026, 10)) is None  # tok ended before October
    assert "1 subscription(s)" in usage_missing_refusal(store, str(plans), Period(2026, 9))


def test_close_of_a_closed_period_answers_from_its_manifest_without_prefect(store, monkeypatch):
    mark_closed(store, "2026-10")
    for module in CLOSE_MODULES:
        monkeypatch.setitem(sys.modules, module, None)
    result = run("close", "--period", "2026-10", "--store", store, "--plans", PLANS, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["status"], summary["run_id"], summary["invoices"]) == (
        "already_closed", "close-2026-10-000000000000", 2)


# Arguments checked before Prefect starts ------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["close", "--period", "2026-13"], ["'2026-13' is not a month", "YYYY-MM"]),
    (["close", "--period", "9999-12"], ["9999-12 is out of range"]),
    (["nightly", "--date", "2026-02-30"], ["--date '2026-02-30' is not a date"]),
    (["backfill", "--from", "2026-10", "--to", "2026-09"], ["--from 2026-10 is after --to 2026-09"]),
    (["backfill", "--from", "2026-10", "--to", "2026-10", "--as-of", "2026-10-31"],
     ["--as-of 2026-10-31 is before 2026-10's invoices were issued (2026-11-01)"]),
    (["nightly", "--date", "2026-10-20"], ["2026-10 is already closed", "billrun backfill --from 2026-10"]),
    (["close", "--period", "2026-10", "--plans", "/nonexistent/plans"], ["--plans /nonexistent/plans: no such folder"]),
    (["simulate", "--period", "2026-10", "--plan-map", "tok=nope"], ["--plan-map tok=nope", "'nope'"]),
    (["migrate", "--plan", "tok", "--to", "nope", "--on", "2027-02-01"],
     ["--to nope: no plan file defines plan 'nope'", ": jp, tok)"]),
    (["migrate", "--plan", "tok", "--to", "jp", "--on", "2026-12-02"],
     ["is 5 days before --as-of 2026-12-07", "2027-01-06 or later"]),
    (["migrate", "--plan", "tok", "--to", "jp", "--on", "2026-10-20", "--as-of", "2026-09-01"],
     ["falls in closed period 2026-10"]),
])
def test_a_mistake_is_one_line_before_prefect(store, monkeypatch, args, fragments):
    mark_closed(store, "2026-10")
    for flow_module in (*CLOSE_MODULES, "flows.nightly", "flows.backfill", "flows.simulate"):
        monkeypatch.setitem(sys.modules, flow_module, None)
    store_args = [] if "--plans" in args else ["--plans", PLANS]
    refused(run(*args, "--store", store, *store_args), *fragments)


def test_a_local_store_that_does_not_exist_is_refused(tmp_path):
    for args in (["close", "--period", "2026-10"], ["status"], ["backfill", "--from", "2026-10", "--to", "2026-10"],
                 ["nightly", "--date", "2026-10-20"], ["report", "--period", "2026-10"]):
        refused(run(*args, "--store", str(tmp_path / "nope"), "--plans", PLANS), "nope", "no such folder")


def run_alone(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str], float, float]:
    """The command in a process of its own, as a user runs it, with a Prefect home of its own:
    the result, the heavy modules it imported, its CPU seconds and its wall seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    program = ("import sys\nfrom flows.cli import main\nsys.argv = ['billrun', *sys.argv[1:]]\ntry:\n    main()\n"
               "finally:\n    print(sorted(m for m in ('prefect', 'duckdb', 'polars', 'flows.close', 'flows.steps', "
               "'boto3') if m in sys.modules))\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", program, *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    imported = json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))
    return result, imported, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


@pytest.mark.slow
def test_a_malformed_period_answers_without_starting_prefect(tmp_path):
    """No Prefect imported, no Prefect home (its database) created, well under a second of work."""
    result, imported, cpu, wall = run_alone(tmp_path, "close", "--period", "2026-13")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == ("billrun: error: period '2026-13' is not a month; write it as YYYY-MM, "
                                     "e.g. 2026-10")
    assert imported == []
    assert not (tmp_path / "prefect-home").exists() and not (tmp_path / ".prefect").exists()
    assert cpu < 2, cpu  # the work itself (the wall time of a busy machine adds waiting for a core)
    assert wall < 10, wall


@pytest.mark.slow
def test_status_and_a_closed_period_need_no_prefect(tmp_path, store):
    mark_closed(store, "2026-10")
    for args in (("close", "--period", "2026-10", "--store", store, "--plans", PLANS),
                 ("status", "--store", store, "--plans", PLANS)):
        result, imported, cpu, _ = run_alone(tmp_path, *args)
        assert result.returncode == 0, result.stderr
        assert not {"flows.close", "flows.steps"} & set(imported), (args, imported)
        assert args[0] == "status" or "prefect" not in imported, (args, imported)  # status reads the tables' lag
        assert not list((tmp_path / "prefect-home").glob("*.db"))  # Prefect's server never started


# status, demo ----------------------------------------------------------------------------------

def test_status_shows_gaps_and_repeats_store_and_plans_in_its_commands(store):
    for period in ("2026-07", "2026-10"):
        mark_closed(store, period)
    (Path(store) / "billing" / "period=2026-08").mkdir()
    (Path(store) / "billing" / "period=2026-08" / "invoices.parquet").write_bytes(b"partial")
    result = run("status", "--store", store, "--plans", PLANS)
    assert result.exit_code == 0, result.output
    where = f"--store {store} --plans {PLANS}"
    assert f"2026-08  incomplete  outputs without a manifest: run `billrun close --period 2026-08 {where}`" \
        in result.stdout
    assert f"2026-09  not closed  (between closed periods): run `billrun close --period 2026-09 {where}`" \
        in result.stdout
    assert f"run `billrun backfill --from 2026-07 --to 2026-10 {where}`" in result.stdout
    report = json.loads(run("status", "--store", store, "--json").stdout)
    assert report["gaps"] == ["2026-09"]


def test_the_demo_never_overwrites_a_stores_inputs(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "flows.demo", None)
    before = (Path(store) / "customers" / "customers.csv").read_bytes()
    refused(run("demo", "--store", store, "--plans", str(REPO / "plans")),
            "already holds customers, subscriptions, usage", "another --store", "--overwrite")
    assert (Path(store) / "customers" / "customers.csv").read_bytes() == before


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip().startswith("billrun ")
    assert result.stdout.split()[1][0].isdigit()


def test_help_shows_placeholders_and_defaults():
    for command in ("close", "backfill", "migrate", "simulate", "demo", "nightly"):
        text = run(command, "--help").stdout
        assert "<str>" not in text and "<bool>" not in text and "<int>" not in text, command
    close_help = " ".join(run("close", "--help").stdout.replace("│", " ").split())
    assert "YYYY-MM" in close_help and "URI" in close_help and "DIR" in close_help
    assert "[default: ./billing-data]" in close_help and "[default: ./plans]" in close_help
    assert "[default: 300]" in " ".join(run("demo", "--help").stdout.replace("│", " ").split())


# The forced paths, and the guards inside the flows (what deployments run) ---------------------

@pytest.mark.slow
def test_a_month_not_ended_closes_when_forced_and_the_flow_refuses_it_on_its_own(prefect_server, store, monkeypatch):
    from flows import schedules
    from flows.close import close_period

    mid_october = datetime(2026, 10, 20, 12, 0, tzinfo=timezone.utc)
    with pytest.raises(InputError, match="2026-10 has not ended yet"):
        close_period(store=store, plans=PLANS, period="2026-10", now=mid_october)
    monkeypatch.setattr(schedules, "_scheduled_start", lambda: mid_october)
    # the monthly deployment closes ended months only
    with pytest.raises(InputError, match="2026-10 has not ended yet"):
        schedules.monthly_close(store=store, plans=PLANS, period="2026-10")
    assert published(store, "2026-10") == []
    monkeypatch.setattr(cli, "_now", lambda: mid_october)
    result = run("close", "--period", "2026-10", "--before-period-end", "--store", store, "--plans", PLANS, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "closed" and "manifest.json" in published(store, "2026-10")


@pytest.mark.slow
def test_a_month_without_usage_rows_is_refused_inside_the_close_unless_allowed(prefect_server, store):
    """Usage objects exist, but none of their rows falls in 2026-08 (one has no timestamp: it
    belongs to no period, and every close quarantines it): only the close can tell."""
    refused(run("close", "--period", "2026-08", "--store", store, "--plans", PLANS),
            "2026-08 has no usage rows while 2 subscription(s)", "--allow-empty")
    assert published(store, "2026-08") == []
    assert not list((Path(store) / "billing" / "_state" / "locks").glob("*.lock"))
    result = run("close", "--period", "2026-08", "--allow-empty", "--store", store, "--plans", PLANS, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "closed" and summary["rows"]["billed"] == 0 and summary["invoices"] == 2


@pytest.mark.slow
def test_a_store_without_usage_closes_when_allowed(prefect_server, store):
    shutil.rmtree(Path(store) / "usage")
    result = run("close", "--period", "2026-10", "--allow-empty", "--store", store, "--plans", PLANS, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"]["billed"] == 0


@pytest.mark.slow
def test_the_demo_overwrites_only_when_told(prefect_server, tmp_path):
    store = str(tmp_path / "demo")
    args = ("demo", "--customers", "4", "--store", store, "--plans", str(REPO / "plans"), "--json")
    assert run(*args).exit_code == 0
    customers = Path(store) / "customers" / "customers.csv"
    sample = customers.read_bytes()
    customers.write_text("customer_id,name,email\n")
    refused(run(*args), "already holds customers")
    assert customers.read_text() == "customer_id,name,email\n"
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert customers.read_bytes() == sample
