"""The output tables as documented (transforms/schema/outputs.yaml) are the tables real runs write.

One small demo store (the session's demo_story) goes through a night, the close, a price cut and
the backfill that corrects it; every Parquet file they publish must be a documented table, with exactly the documented
columns in order, the documented Arrow types, and no null where the schema promises none. And
every documented table must be among them, so the schema cannot describe a table nobody writes.
"""
from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transforms.schema import (
    SCHEMA_FILE,
    arrow_schema,
    arrow_type,
    output_tables,
    polars_schema,
    schema_version,
    type_name,
)


def path_pattern(path: str) -> re.Pattern:
    """A documented path (billing/period=YYYY-MM/invoices.parquet) as a regular expression."""
    placeholders = {"YYYY-MM-DD": r"\d{4}-\d{2}-\d{2}", "YYYY-MM": r"\d{4}-\d{2}", "RUN_ID": r"[^/]+",
                    "SIMULATION_ID": r"[^/]+"}
    parts = re.split("(YYYY-MM-DD|YYYY-MM|RUN_ID|SIMULATION_ID)", path)
    return re.compile("".join(placeholders.get(p, re.escape(p)) for p in parts) + "$")


def table_of(key: str) -> str | None:
    found = [name for name, spec in output_tables().items() if any(path_pattern(p).match(key) for p in spec.paths)]
    assert len(found) <= 1, f"{key} matches more than one documented table: {found}"
    return found[0] if found else None


# -- the schema file itself (fast) ------------------------------------------------------------

def test_every_table_loads_with_known_types_and_keys_among_its_columns():
    tables = output_tables()
    assert schema_version() >= 1
    assert {"invoices", "invoice_lines", "usage_summary", "margins", "quarantine", "alerts", "credit_ledger",
            "credit_balances", "revenue", "journal"} <= set(tables)
    for name, spec in tables.items():
        assert spec.paths and spec.written_by and spec.grain and spec.keys, name
        assert all(col.description for col in spec.columns), name
        assert arrow_schema(name).names == [c.name for c in spec.columns]
        assert list(polars_schema(name)) == [c.name for c in spec.columns]


def test_money_columns_are_integers_of_minor_units():
    for name, spec in output_tables().items():
        for col in spec.columns:
            if col.name.endswith("_minor"):
                assert col.type == "int64", f"{name}.{col.name} is {col.type}"


def test_types_are_written_as_read_schema_reports_them():
    assert type_name(pa.large_string()) == "string"
    assert arrow_type("decimal128(38, 9)") == pa.decimal128(38, 9)
    assert type_name(arrow_type("timestamp[us, tz=UTC]")) == "timestamp[us, tz=UTC]"
    with pytest.raises(ValueError, match="unknown column type 'float64'"):
        arrow_type("float64")


def test_each_published_key_maps_to_one_table():
    assert table_of("billing/period=2026-10/invoices.parquet") == "invoices"
    assert table_of("billing/corrections/run=backfill-20261120-abc/revenue.parquet") == "correction_revenue"
    assert table_of("billing/nightly/date=2026-10-15/usage.parquet") == "nightly_usage"
    assert table_of("billing/period=2026-10/invoices/INV-2026-10-000001.html") is None


# -- real runs against it ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def story(demo_story) -> Path:
    """A small demo store (conftest's demo_story): a night, the close, a price cut and the backfill
    that corrects it, and a simulation of the credit customers on a usage plan."""
    return demo_story


def published_tables(store: Path) -> dict[str, str]:
    """Store key -> documented table, for every Parquet file outside billrun's own state."""
    keys = sorted(p.relative_to(store).as_posix() for p in (store / "billing").rglob("*.parquet"))
    # billrun's own state, and the Delta and Iceberg data files of the lakehouse tables (the story's
    # store has them on; test_tables and test_dbt hold them equal to the published files)
    keys = [k for k in keys if not k.startswith(("billing/_state/", "billing/tables/"))]
    undocumented = [k for k in keys if table_of(k) is None]
    assert not undocumented, f"Parquet outputs missing from {SCHEMA_FILE.name}: {undocumented}"
    return {k: table_of(k) for k in keys}


@pytest.mark.slow
def test_every_documented_table_is_written(story):
    written = set(published_tables(story).values())
    assert written == set(output_tables()), f"documented but not written: {set(output_tables()) - written}"


@pytest.mark.slow
def test_every_output_has_exactly_the_documented_columns_and_types(story):
    for key, table in published_tables(story).items():
        spec = output_tables()[table]
        actual = pq.read_schema(story / key)
        got = [(f.name, type_name(f.type)) for f in actual]
        want = [(c.name, c.type) for c in spec.columns]
        assert got == want, f"{key} (table {table}):\n  written    {got}\n  documented {want}"


@pytest.mark.slow
def test_no_null_where_the_schema_promises_none(story):
    rows = {}
    for key, table in published_tables(story).items():
        frame = pl.read_parquet(story / key)
        rows[table] = rows.get(table, 0) + frame.height
        for col in output_tables()[table].columns:
            if not col.nullable:
                assert frame[col.name].null_count() == 0, f"{key}: {col.name} is documented non-nullable but has nulls"
    # the tables that carry the story hold rows, so the null checks above are not vacuous
    for table in ("invoices", "invoice_lines", "usage_summary", "margins", "quarantine", "alerts", "credit_ledger",
                  "credit_balances", "revenue", "journal", "correction_revenue", "draft_invoices",
                  "draft_invoice_lines", "nightly_usage", "simulation_customers", "simulation_margins"):
        assert rows.get(table, 0) > 0, f"{table}: no rows written, nothing checked"


@pytest.mark.slow
def test_the_polars_schema_reads_back_what_was_written(story):
    for key, table in published_tables(story).items():
        assert pl.read_parquet_schema(story / key) == polars_schema(table), key
