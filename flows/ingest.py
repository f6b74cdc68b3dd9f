"""Reading input objects from local files (fetched from the store) into frames.

Only this module knows file formats; everything downstream sees frames. A usage object that
cannot be read is reported, not raised: it is quarantined as a whole and the run goes on.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from transforms.errors import InputError

USAGE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
CUSTOMERS_KEYS = ("customers/customers.csv", "customers/customers.parquet")
SUBSCRIPTIONS_KEYS = ("subscriptions/subscriptions.csv", "subscriptions/subscriptions.parquet")


def is_usage_key(key: str) -> bool:
    return key.startswith("usage/") and key.lower().endswith(USAGE_SUFFIXES)


UNREADABLE = (pl.exceptions.PolarsError, OSError, UnicodeDecodeError, ValueError)
"""What a malformed object raises while being read; anything else is a bug and is not swallowed."""


def is_purchases_key(key: str) -> bool:
    return key.startswith("credit_purchases/") and key.lower().endswith((".csv", ".parquet"))


def read_usage_object(path: Path, key: str) -> pl.DataFrame:
    """The rows of one usage object. CSV is read as text (parsing is the boundary's job);
    Parquet and JSON lines keep their types. Raises on anything unreadable."""
    suffix = key.lower().rsplit(".", 1)[-1]
    if suffix == "parquet":
        return pl.read_parquet(path)
    if suffix == "csv":
        return pl.read_csv(path, infer_schema=False)
    return pl.read_ndjson(path, infer_schema_length=None)


def read_table(path: Path, key: str) -> pl.DataFrame:
    """A customers or subscriptions file; a user error names the object."""
    try:
        if key.endswith(".parquet"):
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema=False)
    except Exception as exc:  # any parser failure is the file's fault, said in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{key}: cannot be read ({first})") from None
