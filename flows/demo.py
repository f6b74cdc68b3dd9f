"""`billrun demo`: write a seeded sample store (customers, subscriptions, a month of usage with
the usual dirt: duplicates, bad rows, one corrupt object) for the plans in --plans, plus the
showcase customers (a tier crossing, a hard cap, a plan-version split, a credit pack, a one-off
charge and a goodwill credit) and a cost file, so every part of an invoice can be seen in one close."""
from __future__ import annotations

import io

import polars as pl
import yaml

from flows.store import open_store
from transforms.demo.showcase import ADJUSTMENTS_KEY, PURCHASES_KEY, USAGE_KEY, showcase
from transforms.demo.synth import DEMO_TAX_RULES, DEMO_TERMS, synth_store, write_bytes
from transforms.inputs.plans import load_catalog
from transforms.layout import COSTS_KEY, CUSTOMERS_KEYS, RULES_KEY, SELLER_KEY, SUBSCRIPTIONS_KEYS, period_prefix
from transforms.periods import Period

DEMO_SELLER = {
    "name": "Lumen AI, Inc.",
    "address": "500 Howard Street, San Francisco, CA 94105, US",
    "email": "billing@lumen-ai.example",
    "tax_id": "US 98-7654321",
}


def _csv(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_csv(buffer)
    return buffer.getvalue()


def write_demo_store(store_uri: str, plans_dir: str, period: str, customers: int, seed: int) -> dict:
    """Write the sample inputs; the same arguments always write the same bytes, so running the
    demo twice leaves the store as it was."""
    catalog = load_catalog(plans_dir)
    sample = synth_store(catalog, period, customers, seed)
    shown = showcase(catalog, Period.parse(period))
    store = open_store(store_uri, create=True)
    # the CSV of the two names each of these inputs may have
    store.put_bytes(CUSTOMERS_KEYS[0], _csv(pl.concat([sample.customers, shown.customers], how="diagonal")))
    store.put_bytes(SUBSCRIPTIONS_KEYS[0],
                    _csv(pl.concat([sample.subscriptions, shown.subscriptions], how="diagonal")))
    store.put_bytes(SELLER_KEY, yaml.safe_dump({**DEMO_SELLER, **DEMO_TERMS}, sort_keys=True,
                                               allow_unicode=True).encode())
    store.put_bytes(RULES_KEY, DEMO_TAX_RULES.encode())
    for obj in sample.usage_objects:
        store.put_bytes(obj.key, write_bytes(obj))
    if shown.usage.height:
        store.put_bytes(USAGE_KEY, shown.usage_jsonl)
    if shown.purchases.height:
        store.put_bytes(PURCHASES_KEY, _csv(shown.purchases))
    if shown.adjustments.height:
        store.put_bytes(ADJUSTMENTS_KEY, _csv(shown.adjustments))
    store.put_bytes(COSTS_KEY, _csv(shown.costs))
    expected = dict(sample.expected)
    expected["rows_in_period_valid_unique"] += shown.usage.height
    return {"customers": sample.customers.height + shown.customers.height,
            "subscriptions": sample.subscriptions.height + shown.subscriptions.height,
            "usage_objects": len(sample.usage_objects) + bool(shown.usage.height), "expected": expected,
            "showcase": [{"customer_id": f.customer_id, "name": f.name, "shows": f.shows} for f in shown.features]}


def showcase_invoices(store_uri: str, period: str, features: list[dict]) -> list[dict]:
    """Each showcase feature with the invoices its customer got in the closed period."""
    key = period_prefix(Period.parse(period)) + "invoices.parquet"
    invoices = pl.read_parquet(io.BytesIO(open_store(store_uri).read_bytes(key))).sort("invoice_id")
    return [dict(f, invoices=invoices.filter(pl.col("customer_id") == f["customer_id"])["invoice_id"].to_list())
            for f in features]
