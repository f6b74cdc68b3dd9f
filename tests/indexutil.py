"""A tiny store for the billed-event index tests: one customer, one plan at $1.00 a call, so an
invoice's usage quantity is the sum of the quantities of the events it bills."""
from __future__ import annotations

import io
import json
from decimal import Decimal
from pathlib import Path

import polars as pl

from flows.store import open_store

PLAN = """\
plan: u
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - {name: Calls, meter: calls, price: {model: standard, unit_price: "1.00"}}
"""
HEADER = "event_id,customer_id,meter,quantity,timestamp\n"


def tiny_store(root: Path, customers: int = 2) -> tuple[str, str]:
    """A folder store with customers c1..cN, each subscribed from 2026-01-01, and its plans folder."""
    plans = root / "plans"
    plans.mkdir(parents=True)
    (plans / "u-v1.yaml").write_text(PLAN, encoding="utf-8")
    store = str(root / "store")
    s = open_store(store, create=True)
    ids = [f"c{i}" for i in range(1, customers + 1)]
    s.put_bytes("customers/customers.csv",
                ("customer_id,name,email\n" + "".join(f"{c},{c},ap@{c}.example\n" for c in ids)).encode())
    s.put_bytes("subscriptions/subscriptions.csv",
                ("subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap\n"
                 + "".join(f"s{c[1:]},{c},u,,2026-01-01,,,\n" for c in ids)).encode())
    return store, str(plans)


def send(store: str, key: str, *events: tuple) -> None:
    """A usage object of (event_id, timestamp, quantity[, customer]) rows of meter `calls`."""
    rows = "".join(f"{e[0]},{e[3] if len(e) > 3 else 'c1'},calls,{e[2]},{e[1]}\n" for e in events)
    open_store(store).put_bytes(key, (HEADER + rows).encode())


def archive(store: str, key: str) -> None:
    """What an S3 lifecycle rule does: the object leaves usage/."""
    s = open_store(store)
    s.put_bytes("archive/" + key, s.read_bytes(key))
    s.delete(key)


def parquet(store: str, key: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(open_store(store).read_bytes(key)))


def manifest(store: str, period: str) -> dict:
    return json.loads(open_store(store).read_bytes(f"billing/period={period}/manifest.json"))


def billed_by_customer(store: str) -> dict[tuple[str, str], int]:
    """Per (period, customer), the calls the period's finalized documents bill: the invoices'
    usage lines plus every committed correction's adjustments (manifests only: a period or a
    correction without one is not final)."""
    s = open_store(store)
    out: dict[tuple[str, str], int] = {}
    for info in s.list("billing/"):
        key = info.key
        if key.startswith("billing/period=") and key.endswith("/manifest.json"):
            lines = (parquet(store, key.replace("manifest.json", "invoice_lines.parquet"))
                     .filter(pl.col("kind") == "usage"))
            period = key.split("=", 1)[1].split("/", 1)[0]
            for customer, quantity in lines.select("customer_id", "quantity").iter_rows():
                out[(period, customer)] = out.get((period, customer), 0) + int(Decimal(quantity))
        if key.startswith("billing/corrections/") and key.endswith("/manifest.json"):
            lines = parquet(store, key.replace("manifest.json", "invoice_lines.parquet"))
            docs = parquet(store, key.replace("manifest.json", "invoices.parquet"))
            for row in lines.join(docs.select("invoice_id", "period"), on="invoice_id").iter_rows(named=True):
                change = int(Decimal(row["new_quantity"] or 0)) - int(Decimal(row["old_quantity"] or 0))
                out[(row["period"], row["customer_id"])] = out.get((row["period"], row["customer_id"]), 0) + change
    return out


def billed_quantity(store: str) -> dict[str, int]:
    """Per period, the calls its finalized documents bill."""
    out: dict[str, int] = {}
    for (period, _), quantity in billed_by_customer(store).items():
        out[period] = out.get(period, 0) + quantity
    return out
