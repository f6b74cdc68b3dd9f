"""The dbt package in transforms/dbt: its sources agree with the output schema file, and
`dbt build` (models and every invariant test) passes against a real demo close with a backfill's
credit notes, and fails when an invariant is broken. The same demo store has its lakehouse tables
turned on: its close and backfill land in Delta and Iceberg as published."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml

from flows.store import open_store
from flows.tables import RUN_KIND, published_run, tables_settings
from tablesutil import as_published, published, read_all

REPO = Path(__file__).resolve().parent.parent
PROJECT = REPO / "transforms" / "dbt"
SCHEMA_FILE = REPO / "transforms" / "schema" / "outputs.yaml"
PERIOD = "2026-10"
DBT = Path(sys.executable).parent / "dbt"


@pytest.mark.slow  # the generator runs as its own process
def test_the_dbt_sources_are_generated_from_the_schema_file():
    if not SCHEMA_FILE.exists():
        pytest.skip("no output schema file yet")
    checked = subprocess.run([sys.executable, str(PROJECT / "generate_sources.py"), "--check"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    sources = yaml.safe_load((PROJECT / "models" / "sources.yml").read_text())
    schema = yaml.safe_load(SCHEMA_FILE.read_text())["tables"]
    close_tables = {t["name"]: [c["name"] for c in t["columns"]] for t in sources["sources"][0]["tables"]}
    assert close_tables["invoices"] == [c["name"] for c in schema["invoices"]["columns"]]
    assert set(close_tables) == {name for name, spec in schema.items()
                                 if any(p.startswith("billing/period=") for p in spec["paths"])}


def dbt(command: str, store: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """dbt in its own process, with a profile and a DuckDB file in `tmp`."""
    profiles = tmp / "profiles"
    profiles.mkdir(exist_ok=True)
    (profiles / "profiles.yml").write_text(yaml.safe_dump({"billrun": {"target": "test", "outputs": {
        "test": {"type": "duckdb", "path": str(tmp / "billrun.duckdb"), "threads": 2}}}}))
    env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DO_NOT_TRACK": "1"}
    return subprocess.run([str(DBT), command, "--project-dir", str(PROJECT), "--profiles-dir", str(profiles),
                           "--target-path", str(tmp / "target"), "--log-path", str(tmp / "logs"),
                           "--vars", yaml.safe_dump({"store": str(store)}, default_flow_style=True).strip(),
                           *extra], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def demo_with_corrections(demo_story) -> Path:
    """The demo store (conftest's demo_story, lakehouse tables on) closed for 2026-10, then a price
    cut on the api plan backfilled: the invoices of a real close and the credit notes of a real
    backfill."""
    return demo_story


@pytest.mark.slow
def test_the_demo_close_and_its_backfill_are_in_the_tables_as_published(demo_with_corrections):
    store = str(demo_with_corrections)
    settings = tables_settings(open_store(store))
    close_run = json.loads((demo_with_corrections / "billing" / f"period={PERIOD}" / "manifest.json").read_text())
    [backfill_dir] = (demo_with_corrections / "billing" / "corrections").iterdir()
    backfill_run = json.loads((backfill_dir / "manifest.json").read_text())["run_id"]
    for table in published_run(open_store(store), f"billing/period={PERIOD}/manifest.json").tables:
        expected = published(store, f"billing/period={PERIOD}/", table)
        for fmt, frame in read_all(store, settings, table).items():
            assert as_published(frame, expected, close_run["run_id"]).equals(
                expected.sort(expected.columns, nulls_last=True)), (fmt, table)
            corrections = frame.filter(pl.col(RUN_KIND) == "backfill")
            if (backfill_dir / f"{table}.parquet").exists():
                fixes = published(store, f"billing/corrections/{backfill_dir.name}/", table)
                assert as_published(frame, fixes, backfill_run).equals(fixes.sort(fixes.columns, nulls_last=True))
            else:
                assert corrections.height == 0


@pytest.fixture(scope="module")
def built(demo_with_corrections, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`dbt build` once against the demo store; its DuckDB file and parse state stay in `tmp`."""
    tmp = tmp_path_factory.mktemp("dbt-build")
    return dbt("build", demo_with_corrections, tmp), tmp


@pytest.mark.slow
def test_dbt_build_passes_against_a_demo_close_with_corrections(demo_with_corrections, built):
    result, tmp = built

    assert result.returncode == 0, result.stdout[-3000:]
    assert "ERROR=0" in result.stdout and "WARN=0" in result.stdout
    con = duckdb.connect(str(tmp / "billrun.duckdb"), read_only=True)
    net = con.sql("select * from net_billed_by_period").pl()
    invoices = pl.read_parquet(demo_with_corrections / "billing" / f"period={PERIOD}" / "invoices.parquet")
    notes = pl.read_parquet(demo_with_corrections / "billing" / "corrections" / "*" / "invoices.parquet")
    for row in net.iter_rows(named=True):
        assert row["invoiced_minor"] == invoices.filter(pl.col("currency") == row["currency"])["total_minor"].sum()
        assert row["net_billed_minor"] == row["invoiced_minor"] + notes.filter(
            pl.col("currency") == row["currency"])["total_minor"].sum()
    assert net["corrections"].sum() == notes.height > 0
    for model in ("recurring_and_usage_revenue_by_plan", "deferred_revenue", "top_customers_by_usage"):
        assert con.execute(f"select count(*) from {model}").fetchone()[0] > 0, model
    con.close()


@pytest.mark.slow
def test_dbt_tests_fail_when_an_invoice_total_disagrees_with_its_lines(demo_with_corrections, built):
    """The staging views read the store's files as they are now: one invoice a cent off its
    lines, and the invariant test fails (the file is put back afterwards)."""
    _, tmp = built
    path = demo_with_corrections / "billing" / f"period={PERIOD}" / "invoices.parquet"
    original = path.read_bytes()
    invoices = pl.read_parquet(path)
    try:
        invoices.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.col("total_minor") + 1)
                              .otherwise(pl.col("total_minor")).alias("total_minor")).write_parquet(path)
        tested = dbt("test", demo_with_corrections, tmp, "--select", "assert_invoice_total_equals_its_lines")
    finally:
        path.write_bytes(original)

    assert tested.returncode == 1, tested.stdout[-3000:]
    assert "FAIL 1 assert_invoice_total_equals_its_lines" in tested.stdout
