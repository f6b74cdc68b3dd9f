"""Helpers for tests that read the lakehouse tables back (flows/tables.py)."""
from __future__ import annotations

import io

import polars as pl

from flows.store import open_store
from flows.tables import RUN_ID, TablesSettings, open_formats


def read_all(store_uri: str, settings: TablesSettings, table: str) -> dict[str, pl.DataFrame]:
    """The whole table, per configured format."""
    return {fmt.name: pl.from_arrow(fmt.read(table)) for fmt in open_formats(open_store(store_uri), settings)}


def published(store: str, prefix: str, table: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(open_store(store).read_bytes(f"{prefix}{table}.parquet")))


def as_published(frame: pl.DataFrame, like: pl.DataFrame, run_id: str) -> pl.DataFrame:
    """A table's rows of one run, in the published file's columns and types, sorted."""
    rows = frame.filter(pl.col(RUN_ID) == run_id).select(like.columns)
    rows = rows.cast({c: t for c, t in like.schema.items() if rows.schema[c] != t})
    return rows.sort(like.columns, nulls_last=True)
