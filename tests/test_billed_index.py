"""The billed-event index: an event billed in one closed period is never billed in another, once
its old usage object is gone, or when periods close out of order; copies that would have billed
are reported. Real closes through the flow on tiny folder stores (tests/indexutil.py)."""
from __future__ import annotations

import polars as pl
import pytest

from closeutil import close
from flows.backfill import backfill as backfill_flow
from flows.nightly import nightly
from indexutil import archive, billed_quantity, manifest, parquet, send, tiny_store

pytestmark = pytest.mark.slow


def backfill(store: str, plans: str, first: str, last: str, reason: str, as_of: str) -> dict:
    return backfill_flow(store=store, plans=plans, first=first, last=last, reason=reason, as_of=as_of)


def test_archive_then_resend_bills_once_and_reports_the_copy(prefect_server, tmp_path):
    store, plans = tiny_store(tmp_path)
    send(store, "usage/oct.csv", ("e1", "2026-10-05T00:00:00Z", 4), ("e2", "2026-10-06T00:00:00Z", 1))
    close(store, plans, "2026-10")
    archive(store, "usage/oct.csv")
    send(store, "usage/nov.csv", ("e1", "2026-11-03T00:00:00Z", 4), ("e3", "2026-11-04T00:00:00Z", 16))
    nov = close(store, plans, "2026-11")
    assert billed_quantity(store) == {"2026-10": 5, "2026-11": 16}
    assert nov["rows"] == {"read": 2, "billed": 1, "duplicates": 0, "quarantined": 1}
    assert nov["quarantined_by_reason"] == {"billed_in_period": 1}
    [q] = parquet(store, "billing/period=2026-11/quarantine.parquet").rows(named=True)
    oct_run = manifest(store, "2026-10")["run_id"]
    assert (q["event_id"], q["source"], q["reason"]) == ("e1", "usage/nov.csv#row=1", "billed_in_period")
    assert q["detail"] == f"billed in 2026-10 by {oct_run}"


def test_out_of_order_closes_bill_once_and_say_to_backfill(prefect_server, tmp_path):
    store, plans = tiny_store(tmp_path)
    send(store, "usage/nov.csv", ("e1", "2026-11-03T00:00:00Z", 4))
    close(store, plans, "2026-11")
    send(store, "usage/late.csv", ("e1", "2026-10-05T00:00:00Z", 4), ("e2", "2026-10-06T00:00:00Z", 1))
    oct_ = close(store, plans, "2026-10")
    assert billed_quantity(store) == {"2026-10": 1, "2026-11": 4}
    assert oct_["quarantined_by_reason"] == {"billed_in_period": 1}
    [q] = parquet(store, "billing/period=2026-10/quarantine.parquet").rows(named=True)
    nov_run = manifest(store, "2026-11")["run_id"]
    assert q["event_id"] == "e1" and q["detail"].startswith(f"billed in 2026-11 by {nov_run} (a later period")
    assert "billrun backfill --from 2026-10 --to 2026-11" in q["detail"]


def test_the_index_is_named_by_the_manifest_and_holds_exact_ids(prefect_server, tmp_path):
    store, plans = tiny_store(tmp_path)
    send(store, "usage/oct.csv", ("e1", "2026-10-05T00:00:00Z", 1), ("e2", "2026-10-06T00:00:00Z", 2),
         ("e2", "2026-10-07T00:00:00Z", 2))
    close(store, plans, "2026-10")
    entry = manifest(store, "2026-10")["billed_event_index"]
    index = parquet(store, entry["key"])
    assert entry["key"] == f"billing/_state/billed_events/period=2026-10/{manifest(store, '2026-10')['run_id']}.parquet"
    assert entry["events"] == 2 and sorted(index["event_id"].to_list()) == ["e1", "e2"]
    assert index["id_hash"].to_list() == sorted(index["id_hash"].to_list())
    assert set(index["change"].to_list()) == {1} and set(index["period"].to_list()) == {"2026-10"}


def test_conflicting_copies_are_reported_and_one_bills(prefect_server, tmp_path):
    store, plans = tiny_store(tmp_path)
    send(store, "usage/a.csv", ("e1", "2026-10-05T00:00:00Z", 4), ("e2", "2026-10-05T00:00:00Z", 1))
    send(store, "usage/b.csv", ("e1", "2026-10-06T00:00:00Z", 8), ("e2", "2026-10-05T00:00:00Z", 1, "c2"),
         ("e3", "2026-10-05T00:00:00Z", 2))
    send(store, "usage/c.csv", ("e3", "2026-10-05T00:00:00Z", 2))  # an identical resend: no conflict
    result = close(store, plans, "2026-10")
    assert result["rows"] == {"read": 6, "billed": 3, "duplicates": 3, "quarantined": 0}
    assert billed_quantity(store) == {"2026-10": 4 + 1 + 2}
    assert manifest(store, "2026-10")["conflicting_duplicates"] == 2
    conflicts = parquet(store, "billing/period=2026-10/conflicting_duplicates.parquet")
    assert conflicts.select("event_id", "source_key", "source_row", "differs_in", "kept_source_key",
                            "kept_outcome").rows() == [
        ("e1", "usage/b.csv", 1, "quantity", "usage/a.csv", "billed"),
        ("e2", "usage/b.csv", 2, "customer_id", "usage/a.csv", "billed")]


def test_a_backfill_after_an_archive_issues_no_document_that_rebills(prefect_server, tmp_path):
    store, plans = tiny_store(tmp_path)
    send(store, "usage/oct.csv", ("e1", "2026-10-05T00:00:00Z", 4))
    send(store, "usage/nov.csv", ("e2", "2026-11-05T00:00:00Z", 1))
    close(store, plans, "2026-10")
    close(store, plans, "2026-11")
    archive(store, "usage/oct.csv")
    send(store, "usage/resent.csv", ("e1", "2026-11-03T00:00:00Z", 4))
    result = backfill(store, plans, "2026-11", "2026-11", "late events", "2026-12-05")
    assert result["documents"] == []
    assert billed_quantity(store) == {"2026-10": 4, "2026-11": 1}


def test_a_backfill_of_both_periods_moves_an_out_of_order_event_to_its_first_copy(prefect_server, tmp_path):
    store, plans = tiny_store(tmp_path)
    send(store, "usage/nov.csv", ("e1", "2026-11-03T00:00:00Z", 4), ("e2", "2026-11-04T00:00:00Z", 1))
    close(store, plans, "2026-11")
    send(store, "usage/late.csv", ("e1", "2026-10-05T00:00:00Z", 4))
    close(store, plans, "2026-10")
    assert billed_quantity(store) == {"2026-10": 0, "2026-11": 5}
    result = backfill(store, plans, "2026-10", "2026-11", "e1 belongs to October", "2026-12-05")
    assert sorted((d["period"], d["kind"]) for d in result["documents"]) == [("2026-10", "debit_note"),
                                                                            ("2026-11", "credit_note")]
    assert billed_quantity(store) == {"2026-10": 4, "2026-11": 1}
    # the index follows the documents: a second backfill, and a backfill of either period alone, issue nothing
    for first, last in (("2026-10", "2026-11"), ("2026-10", "2026-10"), ("2026-11", "2026-11")):
        assert backfill(store, plans, first, last, "again", "2026-12-06")["documents"] == []
    assert billed_quantity(store) == {"2026-10": 4, "2026-11": 1}


def test_nightly_does_not_count_an_event_billed_in_a_closed_period(prefect_server, tmp_path):
    store, plans = tiny_store(tmp_path)
    send(store, "usage/oct.csv", ("e1", "2026-10-05T00:00:00Z", 4))
    close(store, plans, "2026-10")
    archive(store, "usage/oct.csv")
    send(store, "usage/nov.csv", ("e1", "2026-11-03T00:00:00Z", 4), ("e2", "2026-11-03T00:00:00Z", 1))
    night = nightly(store=store, plans=plans, day="2026-11-03")
    assert (night["intake"]["billed"], night["intake"]["quarantined"]) == (1, 1)
    drafts = parquet(store, "billing/nightly/date=2026-11-03/draft_invoice_lines.parquet")
    usage = drafts.filter((pl.col("kind") == "usage") & (pl.col("customer_id") == "c1"))
    assert [str(q) for q in usage["quantity"].to_list()] == ["1"]
