"""`billrun backfill`, `status` and `explain` through the real command line, on a copy of the golden
store closed for 2026-10.

The hand-worked close is in tests/test_golden.py: sub_1 (c1, USD) pays 40.05 with gpt-4o input
tokens at 2.50 per 1,000,000 (eu 1,500,000 -> 3.75, us 400,000 -> 1.00); sub_2 (c2, USD, from
Oct 16) pays 10.32 with one eu token (0.0000025 -> 0.00); sub_3 (c3, JPY, half even) pays 1010
yen with 3 images at 3.5 (10.5 -> 10). Every correction below is worked out from those numbers.

A backfill costs a second on a folder and several on S3, so the life of a closed store (price
fix, refused while locked, rerun, late events, a second fix, a fresh close to compare with) is
played once per backend by the `story` fixture, and each test checks one step of it. Cases that
need a store of their own run on a folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import uuid
from datetime import date
from decimal import Decimal
from pathlib import Path

import boto3
import polars as pl
import pytest
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows.cli import app
from flows.store import open_store
from transforms.finance.corrections import issued_lines
from transforms.layout import checked_key, lock_key

GOLDEN = Path(__file__).parent / "golden"
PERIOD = "2026-10"
AS_OF = "2026-12-05"
REASON = "gpt-4o price fix: 2.50 to 2.00 per 1M tokens"
ADVICE = "billrun backfill --from 2026-10 --to 2026-10"
EU = "gpt-4o input tokens (region: eu)"
US = "gpt-4o input tokens (region: us)"
AP = "gpt-4o input tokens (region: ap)"
HEADER = "event_id,customer_id,meter,quantity,timestamp,model,region\n"
LATE_KEY = "usage/date=2026-10-25/late.csv"
# Events of the closed period that arrived after its close: 100,000 more eu tokens and 200,000 in
# a region the period never billed (ap) for c1, 4 more images for c3.
LATE_EVENTS = HEADER + ("l1,c1,input_tokens,100000,2026-10-25T00:00:00Z,gpt-4o,eu\n"
                        "l2,c3,images,4,2026-10-28T00:00:00Z,,\n"
                        "l3,c1,input_tokens,200000,2026-10-26T00:00:00Z,gpt-4o,ap\n")
RESENT_KEY = "usage/date=2026-10-28/resent.csv"
# Copies of events already billed: e1 exactly as it was, e6 re-sent later (the earliest copy bills).
RESENT_EVENTS = HEADER + ("e1,c1,input_tokens,1000000,2026-10-03T10:00:00Z,gpt-4o,eu\n"
                          "e6,c2,api_calls,40,2026-10-28T00:00:00Z,,\n")
HOLDER = json.dumps({"command": "close 2026-10", "host": "billing-worker-7", "pid": 4242,
                     "started_at": "2026-12-05T09:00:00+00:00"}).encode()

runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Helpers

def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def backfill(store: str, plans: Path, *extra: str, first: str = PERIOD, last: str = PERIOD):
    return cli("backfill", "--from", first, "--to", last, "--as-of", AS_OF, "--store", store,
               "--plans", str(plans), *extra)


def backfill_json(store: str, plans: Path, *extra: str) -> dict:
    result = backfill(store, plans, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def status(store: str, plans: Path, text: bool = True) -> tuple[dict, str | None]:
    """`billrun status`: its --json report, and its text when asked (on S3 each call costs)."""
    as_json = cli("status", "--store", store, "--plans", str(plans), "--json")
    assert as_json.exit_code == 0, as_json.output
    if not text:
        return json.loads(as_json.stdout), None
    as_text = cli("status", "--store", store, "--plans", str(plans))
    assert as_text.exit_code == 0, as_text.output
    return json.loads(as_json.stdout), as_text.stdout


def explain(store: str, invoice_id: str) -> tuple[dict, str]:
    as_json = cli("explain", "--invoice", invoice_id, "--store", store, "--json")
    text = cli("explain", "--invoice", invoice_id, "--store", store)
    assert as_json.exit_code == 0 and text.exit_code == 0, as_json.output + text.output
    return json.loads(as_json.stdout), text.stdout


def set_gpt4o_price(plans: Path, new: str, old: str = "2.50") -> None:
    """A pricing fix: gpt-4o input tokens at `new` per 1,000,000 instead of `old`."""
    path = plans / "tok-v1.yaml"
    text = path.read_text(encoding="utf-8")
    assert f'unit_price: "{old}", per: 1000000' in text
    path.write_text(text.replace(f'unit_price: "{old}", per: 1000000', f'unit_price: "{new}", per: 1000000'),
                    encoding="utf-8")


def put(store: str, key: str, text: str) -> None:
    open_store(store, create=True).put_bytes(key, text.encode())


def read_table(store: str, key: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(open_store(store).read_bytes(key)))


def correction_runs(store: str) -> list[str]:
    """Folders of the published backfill runs (those with a manifest)."""
    return sorted(o.key.removesuffix("manifest.json") for o in open_store(store).list("billing/corrections/")
                  if o.key.endswith("/manifest.json"))


def notes(store: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every correction document issued so far, and their lines."""
    runs = correction_runs(store)
    return (pl.concat([read_table(store, r + "invoices.parquet") for r in runs], how="diagonal_relaxed"),
            pl.concat([read_table(store, r + "invoice_lines.parquet") for r in runs], how="diagonal_relaxed"))


def period_outputs(store: str) -> dict[str, bytes]:
    """Everything the close published for 2026-10: finalized, so never rewritten."""
    s = open_store(store)
    return {o.key: s.read_bytes(o.key) for o in s.list(f"billing/period={PERIOD}/")}


def documents(summary: dict) -> list[tuple]:
    return [(d["invoice_id"], d["kind"], d["subscription_id"], d["corrects_invoice_id"], d["currency"],
             d["total_minor"]) for d in summary["documents"]]


def adjustments(lines: pl.DataFrame, invoice_id: str) -> list[tuple]:
    """(adjusted line, old -> new quantity, quantity, old -> new amount, amount) of one document."""
    return [(r["adjusts_description"], r["old_quantity"], r["new_quantity"], r["quantity"], r["old_amount_minor"],
             r["new_amount_minor"], r["amount_minor"])
            for r in lines.filter(pl.col("invoice_id") == invoice_id).sort("line_no").iter_rows(named=True)]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.stderr.strip()
    assert text.startswith("billrun: error: ") and "\n" not in text, (text, result.exception)
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in text, text


def _new_bucket() -> str:
    name = f"billrun-backfill-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------------------------------------
# The story of one closed store, once per backend

@pytest.fixture(scope="module", params=["folder", "s3"])
def story(request, prefect_server, tmp_path_factory) -> dict:
    """Close 2026-10, then, through the real commands: cut the gpt-4o price (a lock held by another
    run refuses the first backfill), backfill, backfill again (folder), take in late events, cut the
    price once more; finally close the same inputs in a fresh folder store. Every result is kept."""
    tmp = tmp_path_factory.mktemp(f"story-{request.param}")
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
        store = f"s3://{_new_bucket()}/billing-data"
    else:
        store = str(tmp / "store")
    plans = Path(shutil.copytree(GOLDEN / "plans", tmp / "plans"))
    copy_tree_to_store(GOLDEN / "store", store)
    s: dict = {"store": store, "plans": plans}
    s["close"] = cli("close", "--period", PERIOD, "--store", store, "--plans", str(plans))
    assert s["close"].exit_code == 0, s["close"].output
    s["closed_outputs"] = period_outputs(store)
    s["manifest"] = json.loads(open_store(store).read_bytes(f"billing/period={PERIOD}/manifest.json"))
    s["status_closed"] = status(store, plans)
    s["explain_invoice"] = explain(store, "INV-2026-10-000001")

    set_gpt4o_price(plans, "2.00")
    s["status_plan_changed"] = status(store, plans)
    assert open_store(store).put_if_absent(lock_key(PERIOD), HOLDER)
    s["refused"] = backfill(store, plans, "--reason", REASON)
    s["lock_after_refusal"] = open_store(store).read_bytes(lock_key(PERIOD))
    s["runs_after_refusal"] = correction_runs(store)
    s["checked_after_refusal"] = open_store(store).exists(checked_key(PERIOD))
    s["status_locked"] = status(store, plans, text=False)
    s["unlock"] = cli("unlock", "--period", PERIOD, "--store", store)

    s["price_cut"] = backfill_json(store, plans, "--reason", REASON)
    s["status_after_price_cut"] = status(store, plans, text=False)
    if request.param == "folder":  # S3 lists the runs below as well; a run there costs ~4 s
        s["again"] = backfill(store, plans, "--reason", REASON)
        s["runs_after_again"] = correction_runs(store)
    s["explain_credit_note"] = explain(store, "CN-2026-10-000001")

    put(store, LATE_KEY, LATE_EVENTS)
    s["status_late_events"] = status(store, plans)
    s["late"] = backfill_json(store, plans, "--reason", "late usage")

    set_gpt4o_price(plans, "1.00", old="2.00")
    s["second_cut"] = backfill_json(store, plans, "--reason", "gpt-4o price fix: 1.00 per 1M tokens")
    s["status_end"] = status(store, plans)
    s["end_outputs"] = period_outputs(store)
    s["docs"], s["lines"] = notes(store)

    fresh = str(tmp / "fresh")
    source, target = open_store(store), open_store(fresh, create=True)
    for obj in source.list(""):
        if not obj.key.startswith("billing/"):
            target.put_bytes(obj.key, source.read_bytes(obj.key))
    assert cli("close", "--period", PERIOD, "--store", fresh, "--plans", str(plans)).exit_code == 0
    s["fresh_invoices"] = read_table(fresh, f"billing/period={PERIOD}/invoices.parquet")
    s["fresh_lines"] = read_table(fresh, f"billing/period={PERIOD}/invoice_lines.parquet")
    return s


# A price cut: one credit note per affected subscription, finalized invoices untouched

def test_a_price_cut_issues_one_credit_note_per_affected_subscription(story):
    # sub_1: eu 1,500,000 x 2.00/1M = 3.00 (was 3.75), us 400,000 x 2.00/1M = 0.80 (was 1.00): -0.95.
    # sub_2: 1 token x 2.00/1M = 0.000002 rounds to 0.00 as 0.0000025 did: no line, so no document.
    # sub_3 is on the jp plan: untouched.
    assert documents(story["price_cut"]) == [
        ("CN-2026-10-000001", "credit_note", "sub_1", "INV-2026-10-000001", "USD", -95)]
    assert adjustments(story["lines"], "CN-2026-10-000001") == [
        (EU, "1500000", "1500000", "0", 375, 300, -75),
        (US, "400000", "400000", "0", 100, 80, -20)]
    (cn,) = story["docs"].filter(pl.col("invoice_id") == "CN-2026-10-000001").iter_rows(named=True)
    assert (cn["customer_id"], cn["period"], cn["issued_on"], cn["reason"], cn["run_id"], cn["line_count"]) == (
        "c1", PERIOD, date(2026, 12, 5), REASON, story["price_cut"]["run_id"], 2)
    assert set(story["lines"].filter(pl.col("invoice_id") == "CN-2026-10-000001")["kind"]) == {"adjustment"}


def test_the_close_outputs_are_byte_identical_after_every_backfill(story):
    assert story["end_outputs"] == story["closed_outputs"]  # finalized is final: same keys, same bytes
    assert any(k.endswith("/invoices/INV-2026-10-000001.html") for k in story["end_outputs"])


def test_a_backfill_publishes_its_documents_whole_under_its_run(story):
    s = open_store(story["store"])
    run = f"billing/corrections/run={story['price_cut']['run_id']}/"
    manifest = json.loads(s.read_bytes(run + "manifest.json"))
    assert (manifest["kind"], manifest["reason"], manifest["as_of"], manifest["periods"]) == (
        "backfill", REASON, AS_OF, [PERIOD])
    assert manifest["documents"] == [{"invoice_id": "CN-2026-10-000001", "kind": "credit_note", "period": PERIOD,
                                      "corrects_invoice_id": "INV-2026-10-000001", "total_minor": -95,
                                      "currency": "USD"}]
    assert {"documents/CN-2026-10-000001.html", "invoices.parquet", "invoice_lines.parquet"} <= {
        o["key"].removeprefix(run) for o in manifest["outputs"]}
    for output in manifest["outputs"]:
        assert hashlib.sha256(s.read_bytes(output["key"])).hexdigest() == output["sha256"], output["key"]
    html = s.read_bytes(run + "documents/CN-2026-10-000001.html").decode()
    for shown in ("Credit note", "CN-2026-10-000001", "Corrects", "INV-2026-10-000001", REASON, AS_OF, "-$0.95"):
        assert shown in html, shown
    assert s.list("billing/_state/runs/") == [] and s.list("billing/_state/locks/") == []


# Idempotency and netting

def test_the_same_backfill_again_issues_nothing(story):
    if "again" not in story:
        pytest.skip("played on the folder store only")
    assert story["again"].exit_code == 0, story["again"].output
    assert "nothing to correct" in story["again"].stdout
    assert story["runs_after_again"] == [f"billing/corrections/run={story['price_cut']['run_id']}/"]


def test_a_later_change_nets_against_every_document_issued_so_far(story):
    # Issued so far for sub_1: eu 3.75 - 0.75 + 0.20 = 3.20, us 0.80, ap 0.40 (see the late events).
    # Due at 1.00 per 1M: eu 1.60, us 0.40, ap 0.20. The note carries only the new difference.
    assert documents(story["second_cut"]) == [
        ("CN-2026-10-000002", "credit_note", "sub_1", "INV-2026-10-000001", "USD", -220)]
    assert adjustments(story["lines"], "CN-2026-10-000002") == [
        (AP, "200000", "200000", "0", 40, 20, -20),
        (EU, "1600000", "1600000", "0", 320, 160, -160),
        (US, "400000", "400000", "0", 80, 40, -40)]


# Late events

def test_late_events_of_a_closed_period_are_debited_with_the_new_quantity(story):
    # At 2.00 per 1M by then: eu 1,600,000 -> 3.20 (was 3.00): +0.20; ap 200,000 -> 0.40 (new line): +0.40.
    # sub_3: 7 images x 3.5 = 24.5 -> 24 yen, half even (was 10.5 -> 10): +14 yen.
    # Numbered in subscription order within the run.
    assert documents(story["late"]) == [
        ("DN-2026-10-000001", "debit_note", "sub_1", "INV-2026-10-000001", "USD", 60),
        ("DN-2026-10-000002", "debit_note", "sub_3", "INV-2026-10-000003", "JPY", 14)]
    assert adjustments(story["lines"], "DN-2026-10-000001") == [
        (AP, "0", "200000", "200000", 0, 40, 40),
        (EU, "1500000", "1600000", "100000", 300, 320, 20)]
    assert adjustments(story["lines"], "DN-2026-10-000002") == [("Images", "3", "7", "4", 10, 24, 14)]


# Numbering, and what the customer owes now

def test_document_ids_are_gap_free_per_period_and_kind(story):
    assert sorted(story["docs"].select("invoice_id", "kind").rows()) == [
        ("CN-2026-10-000001", "credit_note"), ("CN-2026-10-000002", "credit_note"),
        ("DN-2026-10-000001", "debit_note"), ("DN-2026-10-000002", "debit_note")]
    assert set(story["docs"]["period"]) == {PERIOD} and set(story["docs"]["issued_on"]) == {date(2026, 12, 5)}


def test_invoices_and_notes_sum_to_a_fresh_close_of_the_same_inputs(story):
    invoices = read_table(story["store"], f"billing/period={PERIOD}/invoices.parquet")
    everything = pl.concat([invoices, story["docs"]], how="diagonal_relaxed")
    owed = dict(everything.group_by("subscription_id").agg(pl.col("total_minor").sum()).iter_rows())
    # sub_1: 40.05 - 0.95 + 0.60 - 2.20 = 37.50 = fee 20.00 + eu 1,600,000 x 1.00/1M = 1.60 + us 0.40
    #        + ap 0.20 + mini 0.30 + api calls 15.00; sub_2: 10.32; sub_3: 1010 + 14 = 1000 + 24 yen.
    assert owed == {"sub_1": 3750, "sub_2": 1032, "sub_3": 1024}
    assert dict(story["fresh_invoices"].select("subscription_id", "total_minor").iter_rows()) == owed
    # ... and line by line, quantity and amount.
    lines = read_table(story["store"], f"billing/period={PERIOD}/invoice_lines.parquet")
    issued = issued_lines(pl.concat([lines, story["lines"]], how="diagonal_relaxed"))
    fresh = issued_lines(story["fresh_lines"])
    assert ({sub: {k: (v.quantity, v.amount_minor) for k, v in keys.items()} for sub, keys in issued.items()}
            == {sub: {k: (v.quantity, v.amount_minor) for k, v in keys.items()} for sub, keys in fresh.items()})


# One run per period

def test_a_backfill_is_refused_while_another_run_holds_the_period(story):
    assert_one_line_error(story["refused"], "2026-10 is locked by close 2026-10 on billing-worker-7 (pid 4242) "
                                            "since 2026-12-05T09:00:00+00:00", "billrun unlock --period 2026-10")
    assert story["lock_after_refusal"] == HOLDER  # the other run's lock is not the refused run's to drop
    assert story["runs_after_refusal"] == [] and not story["checked_after_refusal"]
    report, _ = story["status_locked"]
    assert report["periods"][0]["locked"] is True
    assert report["periods"][0]["changes"] == ["plan tok v1 changed"]  # still to do
    assert story["unlock"].exit_code == 0 and "removed the lock held by close 2026-10" in story["unlock"].stdout


# status

def test_status_right_after_the_close_reports_no_change(story):
    report, text = story["status_closed"]
    manifest = story["manifest"]
    assert set(report) == {"store", "periods", "backfill", "gaps", "tables"}
    assert report["backfill"] is None and report["gaps"] == []
    (period,) = report["periods"]
    expected = {"period": PERIOD, "locked": False, "status": "closed", "run_id": manifest["run_id"], "invoices": 3,
                "totals": manifest["totals"], "rows": {"read": 14, "billed": 8, "duplicates": 1, "quarantined": 5},
                "last_rated_by": manifest["run_id"], "changes": []}
    assert {k: period.get(k) for k in expected} == expected
    assert [(t["currency"], t["invoices"], t["total_minor"]) for t in period["totals"]] == [
        ("JPY", 1, 1010), ("USD", 2, 5037)]  # 1010 yen; 40.05 + 10.32 = 50.37 USD
    assert f"2026-10  closed      run {manifest['run_id']}  invoices 3" in text
    assert "changed" not in text and "backfill" not in text


@pytest.mark.parametrize("step, change", [
    ("status_plan_changed", "plan tok v1 changed"),
    ("status_late_events", f"1 input object(s) new ({LATE_KEY})"),
])
def test_status_names_a_change_and_the_backfill_that_settles_it(story, step, change):
    report, text = story[step]
    assert report["periods"][0]["changes"] == [change]
    assert report["backfill"] == ADVICE
    assert change in text and f"run `{ADVICE} --store {story['store']} --plans {story['plans']}`" in text


@pytest.mark.parametrize("step, rated_by", [("status_after_price_cut", "price_cut"), ("status_end", "second_cut")])
def test_status_after_a_backfill_reports_no_change(story, step, rated_by):
    report, text = story[step]
    assert report["periods"][0]["changes"] == [] and report["backfill"] is None
    assert report["periods"][0]["last_rated_by"] == story[rated_by]["run_id"]
    assert report["periods"][0]["run_id"] == story["manifest"]["run_id"]  # still closed by its close
    assert text is None or "backfill" not in text


# explain

def test_explain_an_invoice_shows_steps_plan_and_usage(story):
    report, text = story["explain_invoice"]
    manifest = story["manifest"]
    assert (report["run_id"], report["manifest"]) == (manifest["run_id"], f"billing/period={PERIOD}/manifest.json")
    assert (report["invoice"]["invoice_id"], report["invoice"]["total_minor"]) == ("INV-2026-10-000001", 4005)
    (tok,) = [p for p in manifest["plans"] if p["plan"] == "tok"]
    assert (tok["file"], tok["sha256"]) == (
        "tok-v1.yaml", hashlib.sha256((GOLDEN / "plans" / "tok-v1.yaml").read_bytes()).hexdigest())
    assert [(line["kind"], line["amount_minor"]) for line in report["lines"]] == [
        ("fixed_fee", 2000), ("usage", 375), ("usage", 100), ("usage", 30), ("overage", 1500)]
    for line in report["lines"]:
        assert line["plan"] == {"plan": "tok", "version": 1, "file": "tok-v1.yaml", "sha256": tok["sha256"]}
        assert line["steps"], line
        if line["kind"] in ("usage", "overage"):
            assert sum(Decimal(row["units"]) for row in line["usage"]) == Decimal(line["total_units"]), line
    eu = report["lines"][1]
    assert (eu["description"], eu["steps"][0]["label"]) == (EU, "1,500,000 units at 2.50 per 1,000,000")
    assert [(json.loads(r["dims"]), r["units"], r["events"]) for r in eu["usage"]] == [
        ({"model": "gpt-4o", "region": "eu"}, "1500000", 2)]  # e1 + e2; e5's copy and e10..e14 did not bill
    calls = report["lines"][4]  # 260 calls, 50 included, 210 billed as 3 packages
    assert (calls["total_units"], calls["included_units"], calls["quantity"]) == ("260", "50", "210")
    assert "= 1,500,000 units at 2.50 per 1,000,000: 3.75" in text and "tok-v1.yaml" in text


def test_explain_a_credit_note_shows_its_reason_and_run(story):
    report, text = story["explain_credit_note"]
    run_id = story["price_cut"]["run_id"]
    assert (report["reason"], report["run_id"]) == (REASON, run_id)
    assert report["manifest"] == f"billing/corrections/run={run_id}/manifest.json"
    invoice = report["invoice"]
    assert (invoice["kind"], invoice["corrects_invoice_id"], invoice["issued_on"], invoice["total_minor"]) == (
        "credit_note", "INV-2026-10-000001", AS_OF, -95)
    assert [(line["adjusts_kind"], line["old_amount_minor"], line["new_amount_minor"], line["amount_minor"])
            for line in report["lines"]] == [("usage", 375, 300, -75), ("usage", 100, 80, -20)]
    assert f"corrects INV-2026-10-000001; reason: {REASON}" in text
    assert f"issued by run {run_id}" in text


@pytest.mark.parametrize("invoice_id", [
    "CN-2026-10-000003",   # the series ends at 000002
    "DN-2026-10-000003",
    "INV-2026-09-000001",  # a period that was never closed
    "INV-2026-10-000099",  # a closed period without that invoice
    "bogus",
])
def test_explain_an_unknown_document_is_a_one_line_error(story, invoice_id):
    result = runner.invoke(app, ["explain", "--invoice", invoice_id, "--store", story["store"]])
    assert_one_line_error(result, invoice_id)


# The documents in the customer's hands

def test_a_debit_note_states_its_plan_rounding_rule(story):
    html = open_store(story["store"]).read_bytes(
        f"billing/corrections/run={story['late']['run_id']}/documents/DN-2026-10-000002.html").decode()
    assert "¥14" in html
    assert "rounded once per line (half even)" in html


# ---------------------------------------------------------------------------------------------
# Cases with a store of their own (folder)

@pytest.fixture(scope="module")
def closed_folder(prefect_server, tmp_path_factory) -> str:
    store = str(tmp_path_factory.mktemp("closed") / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    closed = cli("close", "--period", PERIOD, "--store", store, "--plans", str(GOLDEN / "plans"))
    assert closed.exit_code == 0, closed.output
    return store


@pytest.fixture
def store(closed_folder, tmp_path) -> str:
    """A copy of a folder store closed for 2026-10 (a close is deterministic: a copy of its store
    is what closing the copy would write)."""
    return str(shutil.copytree(closed_folder, tmp_path / "store"))


@pytest.fixture
def plans(tmp_path) -> Path:
    return Path(shutil.copytree(GOLDEN / "plans", tmp_path / "plans"))


def test_a_price_rise_issues_a_debit_note(store, plans):
    set_gpt4o_price(plans, "3.00")

    summary = backfill_json(store, plans, "--reason", "gpt-4o price correction")

    # eu 1,500,000 x 3.00/1M = 4.50 (+0.75), us 400,000 x 3.00/1M = 1.20 (+0.20): +0.95;
    # sub_2's token: 0.000003 still rounds to 0.00.
    assert documents(summary) == [("DN-2026-10-000001", "debit_note", "sub_1", "INV-2026-10-000001", "USD", 95)]
    _, lines = notes(store)
    assert adjustments(lines, "DN-2026-10-000001") == [
        (EU, "1500000", "1500000", "0", 375, 450, 75), (US, "400000", "400000", "0", 100, 120, 20)]


def test_a_late_copy_of_an_event_already_billed_changes_nothing(store, plans):
    put(store, RESENT_KEY, RESENT_EVENTS)
    report, _ = status(store, plans, text=False)
    assert report["periods"][0]["changes"] == [f"1 input object(s) new ({RESENT_KEY})"]

    result = backfill(store, plans)

    assert result.exit_code == 0, result.output
    assert "nothing to correct" in result.stdout
    assert correction_runs(store) == []
    report, text = status(store, plans)  # settled without a document
    assert report["periods"][0]["changes"] == [] and report["backfill"] is None
    assert "backfill" not in text


def test_periods_in_the_range_that_are_not_closed_are_skipped_and_reported(store, plans):
    set_gpt4o_price(plans, "2.00")

    result = backfill(store, plans, first="2026-09", last="2026-11")

    assert result.exit_code == 0, result.output
    assert "2026-09: not closed, skipped (run `billrun close --period 2026-09`)" in result.stdout
    assert "2026-11: not closed, skipped (run `billrun close --period 2026-11`)" in result.stdout
    assert "CN-2026-10-000001  credit_note 2026-10  corrects INV-2026-10-000001  -$0.95" in result.stdout
    docs, _ = notes(store)
    assert docs["period"].to_list() == [PERIOD]
    s = open_store(store)
    assert not s.exists(checked_key("2026-09")) and not s.exists(checked_key("2026-11"))
    assert not s.list("billing/period=2026-09/") and not s.list("billing/period=2026-11/")


@pytest.mark.parametrize("args, fragments", [
    (("--from", "2026-11", "--to", "2026-10", "--as-of", AS_OF), ("--from 2026-11 is after --to 2026-10",)),
    (("--from", PERIOD, "--to", PERIOD, "--as-of", "2026-13-01"), ("--as-of '2026-13-01'", "YYYY-MM-DD")),
    (("--from", PERIOD, "--to", PERIOD, "--as-of", "yesterday"), ("--as-of 'yesterday'", "YYYY-MM-DD")),
], ids=["from-after-to", "as-of-month-13", "as-of-not-a-date"])
def test_bad_arguments_are_one_line_errors_and_change_nothing(store, plans, args, fragments):
    set_gpt4o_price(plans, "2.00")  # a backfill would issue a credit note
    s = open_store(store)
    before = {o.key for o in s.list("billing/")}

    result = cli("backfill", *args, "--store", store, "--plans", str(plans))

    assert_one_line_error(result, *fragments)
    assert {o.key for o in s.list("billing/")} == before


def test_status_names_a_new_plan_version_that_rebills_a_closed_period(store, plans):
    # tok v2 from Oct 10 binds sub_2, which starts on Oct 16: fee 30.00 x 16/31 = 15.48, was 10.32.
    v2 = (plans / "tok-v1.yaml").read_text(encoding="utf-8").replace("version: 1", "version: 2").replace(
        "effective_from: 2026-01-01", "effective_from: 2026-10-10").replace('"20.00"', '"30.00"')
    (plans / "tok-v2.yaml").write_text(v2, encoding="utf-8")

    report, _ = status(store, plans, text=False)

    summary = backfill_json(store, plans)
    assert [(d["subscription_id"], d["total_minor"]) for d in summary["documents"]] == [("sub_2", 516)]
    assert report["periods"][0]["changes"], "status said nothing changed, but the backfill issued a debit note"
