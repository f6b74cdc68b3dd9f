"""The command line: one clear line and exit 1 for a user's mistake, nothing published; the
demo and status commands; hostile ids and secrets stay harmless."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows.cli import app

GOLDEN = Path(__file__).parent / "golden"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.stderr.strip()
    assert text.startswith("billrun: error: "), text
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture
def golden_store(tmp_path) -> str:
    store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    return store


def nothing_published(store: str) -> bool:
    return not (Path(store) / "billing").exists() or not any((Path(store) / "billing").glob("period=*/*"))


def test_bad_period_is_one_line(prefect_server, golden_store):
    result = run("close", "--period", "2026-13", "--store", golden_store, "--plans", str(GOLDEN / "plans"))
    assert_one_line_error(result, "2026-13", "YYYY-MM")
    assert nothing_published(golden_store)


def test_missing_store_is_one_line(prefect_server, tmp_path):
    result = run("close", "--period", "2026-10", "--store", str(tmp_path / "nope"), "--plans", str(GOLDEN / "plans"))
    assert_one_line_error(result, "nope")


def test_plan_with_an_error_names_file_and_field(prefect_server, golden_store, tmp_path):
    plans = tmp_path / "plans"
    shutil.copytree(GOLDEN / "plans", plans)
    text = (plans / "tok-v1.yaml").read_text().replace('unit_price: "2.50"', "unit_price: 2.50")
    (plans / "tok-v1.yaml").write_text(text)
    result = run("--store", golden_store, "close", "--period", "2026-10", "--plans", str(plans))
    assert_one_line_error(result, "tok-v1.yaml", "charges[0].price.unit_price", "quote")
    assert nothing_published(golden_store)


def test_missing_customers_is_one_line(prefect_server, golden_store):
    (Path(golden_store) / "customers" / "customers.csv").unlink()
    result = run("close", "--period", "2026-10", "--store", golden_store, "--plans", str(GOLDEN / "plans"))
    assert_one_line_error(result, "customers/customers.csv", "not found")
    assert nothing_published(golden_store)


def test_bad_subscription_row_names_row_and_field(prefect_server, golden_store):
    path = Path(golden_store) / "subscriptions" / "subscriptions.csv"
    path.write_text(path.read_text().replace("sub_2,c2,tok,,2026-10-16", "sub_2,c2,tok,,2026-10-32"))
    result = run("close", "--period", "2026-10", "--store", golden_store, "--plans", str(GOLDEN / "plans"))
    assert_one_line_error(result, "subscriptions/subscriptions.csv row 2", "start_date")
    assert nothing_published(golden_store)


def test_unreachable_s3_is_one_line_without_secrets(prefect_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-that-must-not-leak")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    result = run("close", "--period", "2026-10", "--store", "s3://acme/billing", "--plans", str(GOLDEN / "plans"))
    assert_one_line_error(result, "s3://acme/billing", "cannot reach")
    assert "s3cr3t" not in result.output + result.stderr


def test_close_then_status_then_close_again(prefect_server, golden_store):
    first = run("close", "--period", "2026-10", "--store", golden_store, "--plans", str(GOLDEN / "plans"), "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["status"] == "closed" and summary["rows"]["billed"] == 8
    again = run("close", "--period", "2026-10", "--store", golden_store, "--plans", str(GOLDEN / "plans"))
    assert again.exit_code == 0 and "already closed" in again.stdout
    status = run("status", "--store", golden_store, "--json")
    assert status.exit_code == 0
    periods = json.loads(status.stdout)["periods"]
    assert [(p["period"], p["status"]) for p in periods] == [("2026-10", "closed")]


def test_hostile_ids_never_become_paths(prefect_server, golden_store, tmp_path):
    """A customer id like ../../etc/x is data: it appears in tables, never in a file name."""
    customers = Path(golden_store) / "customers" / "customers.csv"
    customers.write_text(customers.read_text().replace("c3,", "../../x3,"))
    subs = Path(golden_store) / "subscriptions" / "subscriptions.csv"
    subs.write_text(subs.read_text().replace("sub_3,c3,", "../../../sub3,../../x3,"))
    usage = next(Path(golden_store).rglob("events.csv"))
    usage.write_text(usage.read_text().replace(",c3,", ",../../x3,"))
    before = {p for p in tmp_path.rglob("*")}
    result = run("close", "--period", "2026-10", "--store", golden_store, "--plans", str(GOLDEN / "plans"))
    assert result.exit_code == 0, result.output
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(Path(golden_store) in p.parents for p in created)
    assert not any("x3" in p.name or "sub3" in p.name for p in created)


def test_pdf_of_a_published_invoice(prefect_server, golden_store, tmp_path):
    assert run("close", "--period", "2026-10", "--store", golden_store, "--plans", str(GOLDEN / "plans")).exit_code == 0
    out = tmp_path / "inv.pdf"
    result = run("pdf", "--invoice", "INV-2026-10-000002", "--store", golden_store, "--out", str(out))
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF") and len(data) > 5000
    missing = run("pdf", "--invoice", "INV-2026-10-000009", "--store", golden_store, "--out", str(out))
    assert_one_line_error(missing, "INV-2026-10-000009", "no such published document")


def test_no_progress_when_stderr_is_not_a_terminal(prefect_server, golden_store):
    """Scripts and logs get the summary only: the live list of steps is for a terminal."""
    result = run("close", "--period", "2026-10", "--store", golden_store, "--plans", str(GOLDEN / "plans"))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "fetch-inputs" not in result.stdout and "✓" not in result.stdout
    assert result.stdout.startswith("2026-10 closed")
