"""Where a close's outputs and the seller's details sit in a store: the keys that the commands
which only read a store (status, explain, pdf, the checks before Prefect) share with the close,
kept here so that reading them never imports the close flow (and Prefect with it)."""
from __future__ import annotations

MANIFEST = "manifest.json"
"""Written last in a period's folder: its presence means the period is closed."""
SELLER_KEY = "seller.yaml"
CONFIG_KEY = "billrun.yaml"
"""The store's own settings (its `tables:` section turns the lakehouse tables on)."""


def period_prefix(period) -> str:
    return f"billing/period={period}/"


def manifest_key(period) -> str:
    return period_prefix(period) + MANIFEST
