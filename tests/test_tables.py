"""Lakehouse tables (flows/tables.py): each published run committed once to Delta and Iceberg.

The fast tests publish tiny runs by hand (Parquet files and a manifest, as a close or backfill
leaves them) and commit them directly; the slow ones run real closes and backfills through the
command line on the golden store (three invoices), on a folder and on S3 (moto), and kill a real
close between its manifest and its table commit.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import polars as pl
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows import tables
from flows.cli import app
from flows.store import open_store
from flows.tables import (
    RUN_ID,
    RUN_KIND,
    TablesSettings,
    commit_runs,
    open_formats,
    published_run,
    published_runs,
    tables_settings,
)
from tablesutil import as_published, published, read_all
from transforms.errors import InputError

GOLDEN = Path(__file__).parent / "golden"
PERIOD = "2026-10"
BOTH = "tables:\n  formats: [delta, iceberg]\n"
runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Helpers


def publish(store_uri: str, prefix: str, run_id: str, frames: dict[str, pl.DataFrame], **manifest) -> str:
    """Write `frames` as `<name>.parquet` under `prefix` and a manifest naming them, last."""
    store = open_store(store_uri, create=True)
    outputs = []
    for name, frame in frames.items():
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        store.put_bytes(f"{prefix}{name}.parquet", buffer.getvalue())
        outputs.append({"key": f"{prefix}{name}.parquet"})
    store.put_bytes(prefix + "manifest.json", json.dumps({"run_id": run_id, "outputs": outputs, **manifest}).encode())
    return prefix + "manifest.json"


def invoices(*rows: tuple[str, str, int], extra: dict | None = None) -> pl.DataFrame:
    frame = pl.DataFrame({"invoice_id": [r[0] for r in rows], "period": [r[1] for r in rows],
                          "total_minor": [r[2] for r in rows]}, schema={"invoice_id": pl.String, "period": pl.String,
                                                                        "total_minor": pl.Int64})
    return frame.with_columns(**{k: pl.lit(v) for k, v in (extra or {}).items()})


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("billrun: error:")]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


BOTH_SETTINGS = TablesSettings(formats=["delta", "iceberg"])


@pytest.fixture
def tiny(tmp_path) -> str:
    """A store with a close of 2026-10 (two invoices) and a backfill (one credit note)."""
    store = str(tmp_path / "store")
    publish(store, "billing/period=2026-10/", "close-2026-10-aaa", {
        "invoices": invoices(("INV-1", PERIOD, 500), ("INV-2", PERIOD, 700)),
        "quarantine": pl.DataFrame({"source_key": ["usage/a.csv"], "reason": ["unknown_customer"]})},
        period=PERIOD, totals=[], inputs=[], rows={})
    publish(store, "billing/corrections/run=backfill-20261201-bbb/", "backfill-20261201-bbb",
            {"invoices": invoices(("CN-1", PERIOD, -50))})
    return store


# ---------------------------------------------------------------------------------------------
# Fast: commits by hand


def test_each_run_is_committed_once_however_often_it_is_synced(tiny):
    store = open_store(tiny)
    runs = published_runs(store)
    assert [(r.kind, r.run_id, r.tables) for r in runs] == [
        ("close", "close-2026-10-aaa", ("invoices", "quarantine")),
        ("backfill", "backfill-20261201-bbb", ("invoices",))]

    first = commit_runs(store, BOTH_SETTINGS, runs)
    again = commit_runs(store, BOTH_SETTINGS, runs)

    assert len(first) == 6 and again == []
    for fmt, frame in read_all(tiny, BOTH_SETTINGS, "invoices").items():
        assert sorted(frame.select("invoice_id", "total_minor", RUN_KIND).rows()) == [
            ("CN-1", -50, "backfill"), ("INV-1", 500, "close"), ("INV-2", 700, "close")], fmt
    # quarantine has no period column of its own: its rows get the closed period
    for fmt, frame in read_all(tiny, BOTH_SETTINGS, "quarantine").items():
        assert frame.select("reason", "period", RUN_ID).rows() == [
            ("unknown_customer", PERIOD, "close-2026-10-aaa")], fmt


def test_a_commit_retried_behind_the_history_replaces_instead_of_appending(tiny):
    """Two syncs at once both see a table without the run: the second commit must still leave
    one copy (a close replaces its period's close rows, a backfill its own rows)."""
    store = open_store(tiny)
    runs = published_runs(store)
    commit_runs(store, BOTH_SETTINGS, runs)
    for fmt in open_formats(store, BOTH_SETTINGS):
        for run in runs:
            rows = tables.lake_rows("invoices", tables.published_rows(store, run, "invoices"), run)
            fmt.commit("invoices", rows, run)
        frame = pl.from_arrow(fmt.read("invoices"))
        assert sorted(frame["invoice_id"].to_list()) == ["CN-1", "INV-1", "INV-2"], fmt.name
        assert sorted(fmt.committed_runs("invoices")) == ["backfill-20261201-bbb", "close-2026-10-aaa"]


def test_a_column_added_to_an_output_evolves_the_table_old_rows_read_null(tiny, monkeypatch):
    """The schema file gains a column (as tax work will add one): the next commit adds it to the
    existing tables, the rows committed before it read null, none is rewritten."""
    store = open_store(tiny)
    old = pa.schema([("invoice_id", pa.string()), ("period", pa.string()), ("total_minor", pa.int64())])
    monkeypatch.setattr(tables, "_schema_file_columns", lambda table: old if table == "invoices" else None)
    close_oct = published_run(store, "billing/period=2026-10/manifest.json")
    commit_runs(store, BOTH_SETTINGS, [close_oct])

    new = old.append(pa.field("tax_minor", pa.int64()))
    monkeypatch.setattr(tables, "_schema_file_columns", lambda table: new if table == "invoices" else None)
    key = publish(tiny, "billing/period=2026-11/", "close-2026-11-ccc",
                  {"invoices": invoices(("INV-3", "2026-11", 110), extra={"tax_minor": 10})}, period="2026-11")
    commit_runs(store, BOTH_SETTINGS, [published_run(store, key)])

    for fmt, frame in read_all(tiny, BOTH_SETTINGS, "invoices").items():
        assert sorted(frame.select("invoice_id", "tax_minor").rows()) == [
            ("INV-1", None), ("INV-2", None), ("INV-3", 10)], fmt
    for fmt in open_formats(store, BOTH_SETTINGS):
        assert sorted(fmt.committed_runs("invoices")) == ["close-2026-10-aaa", "close-2026-11-ccc"]


def test_tables_are_off_without_a_tables_section(tiny):
    assert not tables_settings(open_store(tiny)).enabled
    open_store(tiny).put_bytes("billrun.yaml", b"tables:\n  formats: []\n")
    assert commit_runs(open_store(tiny), tables_settings(open_store(tiny)), published_runs(open_store(tiny))) == []


@pytest.mark.parametrize("text, fragment", [
    ("tables:\n  formats: [parquet]\n", "tables.formats.0"),
    ("tables:\n  formats: [delta]\n  colour: red\n", "tables.colour"),
    ("tables: [delta\n", "not valid YAML"),
    ("- delta\n", "expected a mapping"),
])
def test_a_bad_tables_section_is_a_one_line_error_naming_the_file_and_field(tiny, text, fragment):
    open_store(tiny).put_bytes("billrun.yaml", text.encode())
    with pytest.raises(InputError) as raised:
        tables_settings(open_store(tiny))
    assert "billrun.yaml" in str(raised.value) and fragment in str(raised.value)
    assert "\n" not in str(raised.value)


def test_status_shows_lagging_tables_and_sync_tables_catches_up(tiny):
    open_store(tiny).put_bytes("billrun.yaml", BOTH.encode())
    before = runner.invoke(app, ["status", "--store", tiny])
    synced = runner.invoke(app, ["sync-tables", "--store", tiny])
    after = runner.invoke(app, ["status", "--store", tiny])
    again = runner.invoke(app, ["sync-tables", "--store", tiny])

    assert "tables behind the manifest of 2026-10 (close run close-2026-10-aaa)" in before.output
    assert "tables behind the manifest of backfill run backfill-20261201-bbb" in before.output
    assert "billrun sync-tables" in before.output
    assert synced.exit_code == 0 and synced.output.startswith("6 table commits"), synced.output
    assert "tables behind" not in after.output
    assert "every table is up to date" in again.output


# ---------------------------------------------------------------------------------------------
# Slow: real closes and backfills through the command line


def cli(*args: str):
    return runner.invoke(app, list(args))


def golden_store(tmp: Path, backend: str, config: str = BOTH) -> str:
    if backend == "s3":
        bucket = f"billrun-tables-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        store = f"s3://{bucket}/billing-data"
        # Iceberg's SQL catalog is a local SQLite file here (the tables themselves are on S3)
        config += f"  catalog: {{type: sql, uri: 'sqlite:///{tmp / 'catalog.db'}'}}\n"
    else:
        store = str(tmp / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    open_store(store).put_bytes("billrun.yaml", config.encode())
    return store


@pytest.fixture(scope="module", params=["folder", "s3"])
def lake_close(request, prefect_server, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp(f"lake-{request.param}")
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
    store = golden_store(tmp, request.param)
    closed = cli("close", "--period", PERIOD, "--store", store, "--plans", str(GOLDEN / "plans"), "--json")
    assert closed.exit_code == 0, closed.output
    return {"store": store, "run_id": json.loads(closed.stdout)["run_id"], "backend": request.param}


@pytest.mark.slow
def test_a_close_commits_every_output_to_delta_and_iceberg_as_published(lake_close):
    store, run_id = lake_close["store"], lake_close["run_id"]
    settings = tables_settings(open_store(store))
    tables = published_run(open_store(store), f"billing/period={PERIOD}/manifest.json").tables
    assert "billed_events" in tables and "invoices" in tables  # the lineage lands with the invoices
    for table in tables:
        expected = published(store, f"billing/period={PERIOD}/", table)
        for fmt, frame in read_all(store, settings, table).items():
            assert frame.height == expected.height, (fmt, table)
            assert set(frame[RUN_ID].unique()) <= {run_id}
            assert set(frame["period"].unique()) <= {PERIOD}
            assert as_published(frame, expected, run_id).equals(expected.sort(expected.columns, nulls_last=True)), \
                (fmt, table)
    if lake_close["backend"] == "s3":  # the tables live in the store's bucket, under billing/tables/
        keys = [o.key for o in open_store(store).list("billing/tables/")]
        assert any(k.startswith("billing/tables/delta/invoices/_delta_log/") for k in keys)
        iceberg = [f for f in open_formats(open_store(store), settings) if f.name == "iceberg"][0]
        assert iceberg._open("invoices").location().startswith(f"{store}/billing/tables/iceberg/")
        assert any(k.startswith("billing/tables/iceberg/") and "/metadata/" in k for k in keys)


@pytest.mark.slow
def test_duckdb_reads_the_delta_tables_as_polars_does(lake_close):
    """What a warehouse reader sees: the Delta table's Parquet files through DuckDB hold the
    published invoices (a close's files only, as nothing was replaced yet)."""
    if lake_close["backend"] != "folder":
        pytest.skip("DuckDB reads local files only (no httpfs offline)")
    import duckdb
    from deltalake import DeltaTable

    store = lake_close["store"]
    files = DeltaTable(f"{store}/billing/tables/delta/invoices").file_uris()
    got = duckdb.sql("select invoice_id, total_minor from read_parquet($files) order by invoice_id",
                     params={"files": files}).fetchall()
    expected = published(store, f"billing/period={PERIOD}/", "invoices")
    assert got == expected.sort("invoice_id").select("invoice_id", "total_minor").rows()


def close_process(store: str, fault: str | None) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "ERROR"}
    env.pop("BILLRUN_FAULT_AT", None)
    if fault:
        env["BILLRUN_FAULT_AT"] = fault
    return subprocess.run([sys.executable, "-m", "flows.cli", "--no-progress", "close", "--period", PERIOD,
                           "--store", store, "--plans", str(GOLDEN / "plans")], env=env,
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_close_killed_between_its_manifest_and_its_tables_leaves_one_copy_after_reruns(prefect_server, tmp_path):
    store = golden_store(tmp_path, "folder")
    killed = close_process(store, "manifest-written")  # SIGKILL right after the manifest
    assert killed.returncode == -9, killed.stderr
    lag = cli("status", "--store", store)
    assert "tables behind the manifest of 2026-10" in lag.output, lag.output

    # the rerun catches up, and is itself killed after its first table commit
    killed_again = close_process(store, "table-committed")
    assert killed_again.returncode == -9, killed_again.stderr
    rerun = close_process(store, None)
    assert rerun.returncode == 0 and "already closed" in rerun.stdout, rerun.stderr

    settings = tables_settings(open_store(store))
    run_id = json.loads(open_store(store).read_bytes(f"billing/period={PERIOD}/manifest.json"))["run_id"]
    for table in published_run(open_store(store), f"billing/period={PERIOD}/manifest.json").tables:
        expected = published(store, f"billing/period={PERIOD}/", table)
        for fmt, frame in read_all(store, settings, table).items():
            assert frame.height == expected.height, (fmt, table)
        for fmt in open_formats(open_store(store), settings):
            assert fmt.committed_runs(table) == {run_id}
    assert "tables behind" not in cli("status", "--store", store).output


@pytest.mark.slow
def test_a_backfill_appends_its_corrections_once(lake_close, tmp_path):
    if lake_close["backend"] != "folder":
        pytest.skip("one backend is enough for the backfill's commit")
    store = str(shutil.copytree(lake_close["store"], tmp_path / "store"))
    plans = Path(shutil.copytree(GOLDEN / "plans", tmp_path / "plans"))
    for path in plans.glob("*.yaml"):
        path.write_text(path.read_text().replace('"2.50"', '"2.00"'))
    args = ["--from", PERIOD, "--to", PERIOD, "--reason", "gpt-4o price fix", "--as-of", "2026-12-05",
            "--store", store, "--plans", str(plans)]

    first = cli("backfill", *args, "--json")
    assert first.exit_code == 0, first.output
    run_id = json.loads(first.stdout)["run_id"]
    again = cli("backfill", *args)
    synced = cli("sync-tables", "--store", store)

    assert again.exit_code == 0 and "nothing to correct" in again.output
    assert "every table is up to date" in synced.output
    settings = tables_settings(open_store(store))
    for table in ("invoices", "invoice_lines", "revenue", "journal"):
        expected = published(store, f"billing/corrections/run={run_id}/", table)
        for fmt, frame in read_all(store, settings, table).items():
            assert frame.filter(pl.col(RUN_KIND) == "backfill").height == expected.height, (fmt, table)
            assert as_published(frame, expected, run_id).equals(expected.sort(expected.columns, nulls_last=True))
            assert frame.filter(pl.col(RUN_KIND) == "close").height == \
                published(store, f"billing/period={PERIOD}/", table).height
    notes = read_all(store, settings, "invoices")
    assert all(f.filter(pl.col("kind") == "credit_note").height == 1 for f in notes.values())


@pytest.mark.slow
def test_a_table_commit_that_fails_leaves_the_period_closed_and_says_so(lake_close, tmp_path, monkeypatch):
    if lake_close["backend"] != "folder":
        pytest.skip("one backend is enough")
    store = str(shutil.copytree(lake_close["store"], tmp_path / "store"))
    shutil.rmtree(Path(store) / "billing" / "tables")
    open_store(store).put_bytes("billrun.yaml", b"tables:\n  formats: [iceberg]\n"
                                                b"  catalog: {type: rest, uri: 'http://127.0.0.1:9'}\n")
    monkeypatch.setattr(tables, "commit_tables", tables.commit_tables.with_options(retries=0))

    failed = cli("close", "--period", PERIOD, "--store", store, "--plans", str(GOLDEN / "plans"))

    line = one_line_error(failed)
    assert f"2026-10 is closed (run {lake_close['run_id']}), but its tables were not committed" in line
    assert "billrun sync-tables" in line
    assert open_store(store).exists(f"billing/period={PERIOD}/manifest.json")
