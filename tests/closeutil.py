"""Helpers for tests that run the real close flow."""
from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl

from flows.close import close_period
from flows.store import open_store

REPO = Path(__file__).resolve().parent.parent
PLANS = str(REPO / "plans")


def copy_tree_to_store(src: Path, store_uri: str) -> None:
    """Upload every file under `src` to the store, keys relative to `src`."""
    store = open_store(store_uri, create=True)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        store.put_bytes(path.relative_to(src).as_posix(), path.read_bytes())


def close(store_uri: str, plans: str, period: str) -> dict:
    return close_period(store=store_uri, plans=plans, period=period)


def output_bytes(store_uri: str, result: dict, skip_manifest: bool = False) -> dict[str, bytes]:
    store = open_store(store_uri)
    keys = list(result["outputs"]) + ([] if skip_manifest else [f"billing/period={result['period']}/manifest.json"])
    return {k: store.read_bytes(k) for k in keys}


def table(store_uri: str, period: str, name: str) -> pl.DataFrame:
    import io
    return pl.read_parquet(io.BytesIO(open_store(store_uri).read_bytes(f"billing/period={period}/{name}")))


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
