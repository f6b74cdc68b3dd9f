"""What each flow run leaves in Prefect for the person on call: a summary table and a markdown
report that links the outputs (close, backfill), the night's table (nightly)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows.cli import app

GOLDEN = Path(__file__).parent / "golden"


def run(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def artifact(key: str):
    """The latest artifact under `key`."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return max(found, key=lambda a: a.created)


def table(key: str) -> dict[str, str]:
    data = artifact(key).data
    rows = json.loads(data) if isinstance(data, str) else data
    return {row["measure"]: str(row["value"]) for row in rows}


@pytest.fixture(scope="module")
def story(prefect_server, tmp_path_factory) -> dict:
    """A night, the close, a price cut and the backfill that credits it, on one store."""
    tmp = tmp_path_factory.mktemp("artifacts")
    store, plans = str(tmp / "store"), tmp / "plans"
    copy_tree_to_store(GOLDEN / "store", store)
    shutil.copytree(GOLDEN / "plans", plans)
    common = ("--store", store, "--plans", str(plans), "--json")
    run("nightly", "--date", "2026-10-15", *common)
    run("close", "--period", "2026-10", *common)
    path = plans / "tok-v1.yaml"
    path.write_text(path.read_text().replace('unit_price: "2.50"', 'unit_price: "2.00"'))
    backfill = json.loads(run("backfill", "--from", "2026-10", "--to", "2026-10", "--reason", "price cut",
                              "--as-of", "2026-11-20", *common).stdout)
    return {"store": store, "backfill": backfill}


def test_a_close_leaves_a_table_and_a_report_linking_its_outputs(story):
    rows = table("close-2026-10")
    assert (rows["read"], rows["billed"], rows["quarantined"]) == ("14", "8", "5")
    report = artifact("close-2026-10-report").data
    assert f"{story['store']}/billing/period=2026-10/invoices.parquet" in report
    assert "| billed | 8 |" in report and "| quarantined | 5 |" in report  # a table, not a Python dict
    assert "{" not in report


def test_a_backfill_leaves_a_table_and_a_report_linking_its_documents(story):
    summary = story["backfill"]
    assert summary["status"] == "corrected" and summary["documents"]
    rows = table("backfill-2026-10-2026-10")
    assert rows["status"] == "corrected"
    assert int(rows["credit notes"]) == sum(d["kind"] == "credit_note" for d in summary["documents"]) > 0
    net = sum(d["total_minor"] for d in summary["documents"] if d["currency"] == "USD")
    assert rows["net USD (minor units)"] == str(net) and net < 0
    report = artifact("backfill-2026-10-2026-10-report").data
    folder = f"{story['store']}/billing/corrections/run={summary['run_id']}/"
    assert "price cut" in report and f"{folder}invoices.parquet" in report and f"{folder}manifest.json" in report
    assert f"{folder}documents/" in report
    for doc in summary["documents"]:
        assert f"`{doc['invoice_id']}` credit note for 2026-10 correcting `{doc['corrects_invoice_id']}`: -$" in report


def test_a_night_leaves_its_intake_table(story):
    rows = table("nightly-2026-10-15")
    assert {"objects", "read", "billed", "duplicates", "quarantined", "alerts fired"} <= set(rows)


def test_a_night_leaves_a_report_linking_its_outputs(story):
    report = artifact("nightly-2026-10-15-report").data
    assert f"{story['store']}/billing/nightly/date=2026-10-15/draft_invoices.parquet" in report
