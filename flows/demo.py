"""`billrun demo`: write a seeded sample store (customers, subscriptions, a month of usage with
the usual dirt: duplicates, bad rows, one corrupt object) for the plans in --plans."""
from __future__ import annotations

import io

import polars as pl
import yaml

from flows.store import open_store
from transforms.plans import load_catalog
from transforms.synth import synth_store, write_bytes

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
    store = open_store(store_uri, create=True)
    store.put_bytes("customers/customers.csv", _csv(sample.customers))
    store.put_bytes("subscriptions/subscriptions.csv", _csv(sample.subscriptions))
    store.put_bytes("seller.yaml", yaml.safe_dump(DEMO_SELLER, sort_keys=True, allow_unicode=True).encode())
    for obj in sample.usage_objects:
        store.put_bytes(obj.key, write_bytes(obj))
    return {"customers": sample.customers.height, "subscriptions": sample.subscriptions.height,
            "usage_objects": len(sample.usage_objects), "expected": sample.expected}
