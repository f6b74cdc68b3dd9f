"""Lineage from invoice line to event: the close's billed_events output, `billrun explain
--events` and `billrun statement`, on one closed demo store (duplicates, bad rows, a corrupt
object, allowances and a credit pack)."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from closeutil import table
from flows.cli import app
from flows.statement import explain_events, write_statement

PERIOD = "2026-10"
runner = CliRunner()


@pytest.fixture(scope="module")
def closed(demo_story) -> str:
    """The session's demo store, closed for 2026-10 (its later backfill writes only under
    billing/corrections/: the period's outputs are the close's)."""
    return str(demo_story)


def _cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_manifest_rows_equal_billed_events_by_status(closed):
    events = table(closed, PERIOD, "billed_events.parquet")
    manifest = json.loads((Path(closed) / f"billing/period={PERIOD}/manifest.json").read_text())
    by_status = dict(events.group_by("status").len().iter_rows())
    assert manifest["rows"] == {"read": events.height, "billed": by_status["billed"],
                                "duplicates": by_status["duplicate"], "quarantined": by_status["quarantined"]}
    assert f"billing/period={PERIOD}/billed_events.parquet" in {o["key"] for o in manifest["outputs"]}
    # one customer's rows are contiguous (row-group statistics then skip the others)
    assert events["customer_id"].drop_nulls().is_sorted()
    billed = events.filter(pl.col("status") == "billed")
    assert billed["invoice_id"].null_count() == 0 and billed["line_no"].null_count() == 0


def test_statement_totals_reproduce_every_invoice_line(closed, tmp_path):
    invoices = table(closed, PERIOD, "invoices.parquet")
    lines = table(closed, PERIOD, "invoice_lines.parquet")
    credited_lines = 0
    for invoice_id, total_minor in invoices.select("invoice_id", "total_minor").iter_rows():
        out = tmp_path / f"{invoice_id}.csv"
        write_statement(closed, invoice_id, out)
        rows = pl.read_csv(out, infer_schema=False)
        its_lines = lines.filter(pl.col("invoice_id") == invoice_id)
        totals = rows.filter(pl.col("row") == "line_total")
        assert totals.height == its_lines.height
        for line in its_lines.iter_rows(named=True):
            total = totals.filter(pl.col("line_no") == str(line["line_no"])).row(0, named=True)
            assert int(total["amount_minor"]) == line["amount_minor"]
            assert Decimal(total["billed_quantity"]) == Decimal(line["quantity"])
            if line["kind"] not in ("usage", "overage"):
                continue
            events = rows.filter((pl.col("row") == "event") & (pl.col("line_no") == str(line["line_no"])))
            event_units = sum((Decimal(q) for q in events["quantity"]), Decimal(0))
            assert Decimal(total["event_units"]) == event_units
            # events - credits - allowance = the quantity the line billed
            assert (event_units - Decimal(total["credited_units"]) - Decimal(total["included_units"])
                    == Decimal(line["quantity"]))
            assert Decimal(total["included_units"]) == Decimal(line["included_units"] or 0)
            if events["grant_id"].null_count() == events.height:
                assert Decimal(total["credited_units"]) == 0, (invoice_id, line["line_no"])
            else:
                credited_lines += 1
        assert int(rows.filter(pl.col("row") == "invoice_total")["amount_minor"][0]) == total_minor
    assert credited_lines > 0  # the demo's credit pack paid for some events


def _line_with_events(closed) -> tuple[str, int, pl.DataFrame]:
    events = table(closed, PERIOD, "billed_events.parquet").filter(pl.col("status") == "billed")
    invoice_id, line_no = events.group_by("invoice_id", "line_no").len().sort("len", "invoice_id", "line_no",
                                                                               descending=True).row(0)[:2]
    return invoice_id, line_no, events.filter((pl.col("invoice_id") == invoice_id) & (pl.col("line_no") == line_no))


def test_explain_events_lists_the_events_of_a_line(closed):
    invoice_id, line_no, expected = _line_with_events(closed)
    report = explain_events(closed, invoice_id, line_no)
    [line] = report["lines"]
    assert sorted(e["event_id"] for e in line["events"]) == sorted(expected["event_id"].to_list())
    assert report["not_billed"] == []
    result = _cli("explain", "--store", closed, "--invoice", invoice_id, "--line", str(line_no), "--events")
    assert result.exit_code == 0
    assert all(event_id in result.output for event_id in expected["event_id"])


def test_explain_events_lists_duplicates_and_quarantined_rows_with_reasons(closed):
    events = table(closed, PERIOD, "billed_events.parquet")
    invoices = table(closed, PERIOD, "invoices.parquet")
    not_billed = events.filter(pl.col("status") != "billed")
    customer = (not_billed.filter(pl.col("status") == "duplicate").group_by("customer_id").len()
                .sort("len", "customer_id", descending=True)["customer_id"][0])
    invoice_id = invoices.filter(pl.col("customer_id") == customer)["invoice_id"][0]
    theirs = not_billed.filter(pl.col("customer_id") == customer)
    report = explain_events(closed, invoice_id, None)
    listed = {(r["status"], r["event_id"], r["reason"]) for r in report["not_billed"]}
    assert listed == set(theirs.select("status", "event_id", "reason").iter_rows())
    duplicates = [r for r in report["not_billed"] if r["status"] == "duplicate"]
    assert duplicates and all(r["reason"] == "duplicate_event_id" and r["duplicate_of"] for r in duplicates)
    # the copy a duplicate names is a billed row of the same event_id
    billed = events.filter(pl.col("status") == "billed").with_columns(
        pl.format("{}#row={}", "source_key", "source_row").alias("source"))
    for r in duplicates:
        if "#row=" in r["duplicate_of"]:
            assert billed.filter(pl.col("source") == r["duplicate_of"])["event_id"].to_list() == [r["event_id"]]
    result = _cli("explain", "--store", closed, "--invoice", invoice_id, "--events")
    assert result.exit_code == 0 and "duplicate_event_id" in result.output
    quarantined = events.filter((pl.col("status") == "quarantined") & pl.col("customer_id").is_not_null())
    q_customer = quarantined["customer_id"][0]
    q_invoice = invoices.filter(pl.col("customer_id") == q_customer)["invoice_id"]
    if q_invoice.len():
        reasons = {r["reason"] for r in explain_events(closed, q_invoice[0], None)["not_billed"]}
        assert set(quarantined.filter(pl.col("customer_id") == q_customer)["reason"]) <= reasons


def test_explain_events_refuses_a_missing_line_and_line_without_events(closed):
    invoice_id = table(closed, PERIOD, "invoices.parquet")["invoice_id"][0]
    missing = _cli("explain", "--store", closed, "--invoice", invoice_id, "--line", "999", "--events")
    assert missing.exit_code == 1 and "billrun: error: --line 999" in missing.output
    alone = _cli("explain", "--store", closed, "--invoice", invoice_id, "--line", "1")
    assert alone.exit_code == 1 and "needs --events" in alone.output


def test_statement_command_writes_the_csv(closed, tmp_path):
    invoice_id, line_no, expected = _line_with_events(closed)
    out = tmp_path / "statement.csv"
    result = _cli("statement", "--store", closed, "--invoice", invoice_id, "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = pl.read_csv(out, infer_schema=False)
    assert set(rows.filter(pl.col("line_no") == str(line_no))["event_id"].drop_nulls()) == set(expected["event_id"])
