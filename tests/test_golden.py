"""A whole close against golden files: small store in, expected tables and HTML out.

The expected amounts are also written out below with their arithmetic, so a regenerated golden
file that changes money fails here first. Regenerate (and review the diff) with
BILLRUN_UPDATE_GOLDEN=1 pytest tests/test_golden.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from closeutil import close, copy_tree_to_store, output_bytes, table

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("BILLRUN_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def golden_close(prefect_server, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("golden") / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    return store, close(store, str(GOLDEN / "plans"), "2026-10")


def test_every_row_is_accounted_for(golden_close):
    # 15 rows; e13 is September's (not counted). Billed: e1 e2 e3 e4 e5 e6 e7 e9; duplicate: the
    # second e5; quarantined: e8 (before sub_2 starts), e10 (negative), e11 (unknown customer),
    # e12 (bad timestamp), e14 (claude: no charge of plan tok prices it).
    _, result = golden_close
    assert result["rows"] == {"read": 14, "billed": 8, "duplicates": 1, "quarantined": 5}
    assert result["quarantined_by_reason"] == {"negative_quantity": 1, "unknown_customer": 1, "bad_timestamp": 1,
                                               "no_subscription": 1, "no_matching_charge": 1}


@pytest.mark.parametrize("invoice_id, expected_minor", [
    # c1: fee 20.00 + gpt-4o eu 1,500,000 x 2.50/1M = 3.75 + us 400,000 x 2.50/1M = 1.00
    #     + mini 2,000,000 x 0.15/1M = 0.30 + api_calls (260 - 50 included = 210 -> 3 packages x 5.00) = 15.00
    ("INV-2026-10-000001", 4005),
    # c2 from Oct 16: fee 20.00 x 16/31 = 10.3225... -> 10.32; 1 token x 2.50/1M = 0.0000025 -> 0.00;
    #     40 api calls all included -> 0.00
    ("INV-2026-10-000002", 1032),
    # c3 (JPY, half_even): fee 1000 + 3 images x 3.5 = 10.5 -> 10 (to even)
    ("INV-2026-10-000003", 1010),
])
def test_invoice_totals_worked_by_hand(golden_close, invoice_id, expected_minor):
    store, _ = golden_close
    invoices = table(store, "2026-10", "invoices.parquet")
    assert invoices.filter(pl.col("invoice_id") == invoice_id)["total_minor"].item() == expected_minor


def test_lines_sum_to_totals(golden_close):
    store, _ = golden_close
    lines = table(store, "2026-10", "invoice_lines.parquet").group_by("invoice_id").agg(pl.col("amount_minor").sum())
    invoices = table(store, "2026-10", "invoices.parquet")
    joined = invoices.join(lines, on="invoice_id")
    assert (joined["total_minor"] == joined["amount_minor"]).all()


def _as_text(store: str, result: dict) -> dict[str, str]:
    """Golden files are text: tables as CSV (reviewable in a diff), HTML as is."""
    out = {}
    for key, data in output_bytes(store, result, skip_manifest=True).items():
        name = key.split("/", 2)[-1]
        if key.endswith(".parquet"):
            import io
            out[name.replace(".parquet", ".csv")] = pl.read_parquet(io.BytesIO(data)).write_csv()
        else:
            out[name] = data.decode()
    return out


def test_outputs_match_golden_files(golden_close):
    store, result = golden_close
    expected_dir = GOLDEN / "expected"
    actual = _as_text(store, result)
    if UPDATE:
        for name, text in actual.items():
            (expected_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (expected_dir / name).write_text(text, encoding="utf-8")
    expected = {p.relative_to(expected_dir).as_posix(): p.read_text(encoding="utf-8")
                for p in expected_dir.rglob("*") if p.is_file()}
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name] == expected[name], f"{name} differs from its golden file"
