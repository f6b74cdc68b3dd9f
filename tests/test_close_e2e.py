"""The real close flow, end to end, on a folder store and on S3 (a moto server process)."""
from __future__ import annotations

import json
import random
import uuid

import polars as pl
import pytest

from closeutil import PLANS, close, output_bytes, table
from flows.demo import write_demo_store
from flows.store import open_store

PERIOD = "2026-10"


@pytest.fixture(scope="module")
def folder_and_s3(prefect_server, s3_endpoint, tmp_path_factory):
    """The same sample store (dirty: duplicates, bad rows, one corrupt Parquet object) written to
    a folder and to an S3 bucket, each closed once."""
    import boto3

    folder = str(tmp_path_factory.mktemp("e2e") / "store")
    # a bucket of its own: the close's local work folder is named by the store's URI, so two sessions
    # on one machine (or two workers) closing the same bucket name would share it
    bucket = f"billrun-e2e-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    s3 = f"s3://{bucket}/acme/prod"
    written = write_demo_store(folder, PLANS, PERIOD, 60, 11)
    write_demo_store(s3, PLANS, PERIOD, 60, 11)
    return folder, s3, written["expected"], close(folder, PLANS, PERIOD), close(s3, PLANS, PERIOD)


def test_folder_and_s3_closes_are_byte_identical(folder_and_s3):
    folder, s3, _, on_folder, on_s3 = folder_and_s3
    assert on_folder["run_id"] == on_s3["run_id"]
    local, remote = output_bytes(folder, on_folder, skip_manifest=True), output_bytes(s3, on_s3, skip_manifest=True)
    assert sorted(local) == sorted(remote)
    assert [k for k in local if local[k] != remote[k]] == []
    assert any(k.endswith(".html") for k in local) and any(k.endswith("invoices.parquet") for k in local)


def test_dirty_input_bills_exactly_the_clean_rows(folder_and_s3):
    folder, _, expected, result, _ = folder_and_s3
    rows = result["rows"]
    assert rows["read"] == rows["billed"] + rows["duplicates"] + rows["quarantined"]
    assert rows["billed"] == expected["rows_in_period_valid_unique"]
    assert rows["duplicates"] == expected["duplicates"]
    reasons = result["quarantined_by_reason"]
    for reason in ("negative_quantity", "bad_quantity", "unknown_customer", "bad_timestamp", "missing_field",
                   "unknown_meter"):
        assert reasons.get(reason, 0) == expected[reason], reason
    assert reasons["unreadable_object"] == expected["corrupt_objects"] == 1
    quarantine = table(folder, PERIOD, "quarantine.parquet")
    assert quarantine.height == rows["quarantined"]


def test_manifest_proves_counts_and_lists_every_input_and_output(folder_and_s3):
    folder, _, _, result, _ = folder_and_s3
    store = open_store(folder)
    manifest = json.loads(store.read_bytes(f"billing/period={PERIOD}/manifest.json"))
    rows = manifest["rows"]
    assert rows["read"] == rows["billed"] + rows["duplicates"] + rows["quarantined"]
    usage_keys = {o.key for o in store.list("usage/")}
    assert usage_keys <= {i["key"] for i in manifest["inputs"]}
    for out in manifest["outputs"]:
        assert store.sha256(out["key"]) == out["sha256"]
    invoices = table(folder, PERIOD, "invoices.parquet")
    for total in manifest["totals"]:
        assert invoices.filter(pl.col("currency") == total["currency"])["total_minor"].sum() == total["total_minor"]
    # nothing staged is left behind once published
    assert store.list("billing/_state/runs/") == []


def test_every_active_subscription_gets_one_invoice(folder_and_s3):
    folder, *_ = folder_and_s3
    invoices = table(folder, PERIOD, "invoices.parquet")
    assert invoices["subscription_id"].n_unique() == invoices.height
    ids = invoices["invoice_id"].to_list()
    assert ids == [f"INV-{PERIOD}-{n:06d}" for n in range(1, len(ids) + 1)]


def test_closing_a_closed_period_changes_nothing(folder_and_s3):
    folder, _, _, first, _ = folder_and_s3
    before = output_bytes(folder, first)
    again = close(folder, PLANS, PERIOD)
    assert again["status"] == "already_closed" and again["run_id"] == first["run_id"]
    assert output_bytes(folder, first) == before


def test_same_inputs_in_another_store_and_file_order_give_the_same_bytes(folder_and_s3, tmp_path):
    """Rerun equals run; and renaming objects (so they list and read in another order) changes
    no table: deduplication and ids depend on content, not on file order."""
    folder, _, _, first, _ = folder_and_s3
    src = open_store(folder)
    copy = str(tmp_path / "shuffled")
    dst = open_store(copy, create=True)
    keys = [o.key for o in src.list("") if not o.key.startswith("billing/")]
    usage = [k for k in keys if k.startswith("usage/")]
    renamed = dict(zip(usage, random.Random(5).sample(usage, len(usage)), strict=True))
    for key in keys:
        target = key
        if key in renamed:  # keep each object's extension, move it to another object's folder
            folder_part = renamed[key].rsplit("/", 1)[0]
            target = f"{folder_part}/moved-{key.replace('/', '_')}"
        dst.put_bytes(target, src.read_bytes(key))
    second = close(copy, PLANS, PERIOD)
    for name in ("invoices.parquet", "invoice_lines.parquet"):
        # the run id names the input objects by key, and renaming them is a change of inputs
        ours, theirs = (table(s, PERIOD, name).drop("run_id", strict=False) for s in (copy, folder))
        assert ours.equals(theirs), name
    assert second["rows"] == first["rows"]


def test_the_demo_shows_a_tier_crossing_a_hard_cap_a_version_split_and_a_credit_pack(folder_and_s3):
    """The showcase customers (transforms/demo/showcase.py) on the demo plans, worked by hand."""
    folder, *_ = folder_and_s3
    lines = table(folder, PERIOD, "invoice_lines.parquet").filter(pl.col("amount_minor") != 0)

    def amounts(customer: str) -> list[tuple[str, str, int]]:
        return sorted(lines.filter(pl.col("customer_id") == customer)
                      .select("kind", "quantity", "amount_minor").iter_rows())

    # api gpt-4o output, graduated per 1M: 10,000,000 x 10.00 + 2,000,000 x 8.00 = 116.00; and a
    # one-off 250.00 onboarding fee (adjustments input)
    assert amounts("cus_showcase_tiers") == [("adjustment_charge", "1", 25000), ("usage", "12000000", 11600)]
    # 20,000,000 gpt-4o input x 2.50 per 1M = 50.00 against a 25.00 hard cap: 25.00 waived; then a
    # 10.00 goodwill credit (adjustments input), after the cap
    assert amounts("cus_showcase_cap") == [("adjustment_credit", "1", -1000), ("cap_waiver", "1", -2500),
                                           ("usage", "20000000", 5000)]
    alerts = table(folder, PERIOD, "alerts.parquet").filter(pl.col("customer_id") == "cus_showcase_cap")
    assert "hard_cap_reached" in alerts["kind"].to_list()
    # api v1 until Oct 15 (2.50 per 1M gpt-4o input), v2 from then (2.00): 4M tokens on each
    by_invoice = (lines.filter(pl.col("customer_id") == "cus_showcase_versions")
                  .group_by("invoice_id").agg(pl.col("amount_minor").sum()).sort("invoice_id"))
    assert by_invoice["amount_minor"].to_list() == [1000, 800]
    # images: the 10.00 plan fee, the 500-credit pack at 15.00; 450 images drawn from 200 + 500 credits
    assert amounts("cus_showcase_credits") == [("credit_purchase", "500", 1500), ("fixed_fee", "31", 1000)]
    ledger = table(folder, PERIOD, "credit_ledger.parquet").filter(pl.col("customer_id") == "cus_showcase_credits")
    drawn = ledger.filter(pl.col("kind") == "consume")
    assert {g.split("/")[0] for g in drawn["grant_id"].to_list()} == {"sub_showcase_credits", "purchase"}
    # the demo's cost file costs the showcase's tokens: 20M gpt-4o input at 40% of 2.50 per 1M = 20.00
    margins = table(folder, PERIOD, "margins.parquet").filter(
        (pl.col("customer_id") == "cus_showcase_cap") & (pl.col("revenue_minor") == 5000))
    assert margins["cost_minor"].to_list() == [2000]
