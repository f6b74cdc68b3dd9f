"""What the command line checks before Prefect starts, so that a user's mistake answers at once.

Starting Prefect (its server, its database, its imports) costs seconds; a typo in a period, a
folder that does not exist, a plan name that no file defines or a period that is already closed
needs none of it. Nothing here imports Prefect, DuckDB or the flows: the heavy modules are
imported inside the one check that needs them. The flows keep their own checks (deployments
call them without this module).
"""
from __future__ import annotations

import json
import tempfile
from datetime import date
from pathlib import Path

from transforms.errors import InputError
from transforms.layout import (
    CONFIG_KEY,
    CUSTOMERS_KEYS,
    CUSTOMERS_PREFIX,
    MANIFEST,
    NIGHTLY_PREFIX,
    PERIODS_PREFIX,
    SELLER_KEY,
    SUBSCRIPTIONS_KEYS,
    SUBSCRIPTIONS_PREFIX,
    USAGE_PREFIX,
    manifest_key,
    night_of_manifest,
    night_prefix,
    period_of_manifest,
    period_prefix,
)
from transforms.periods import Period


def plans_folder(plans: str) -> None:
    folder = Path(plans)
    if not folder.is_dir():
        reason = "not a folder" if folder.exists() else "no such folder"
        raise InputError(f"--plans {plans}: {reason} (pass --plans with the folder of plan files, *.yaml)")


def store_folder(uri: str) -> None:
    """A local store must exist (an S3 store is reached when the command opens it)."""
    if uri.startswith("s3://"):
        return
    from flows.store import open_store

    open_store(uri)


def plan_names(plans: str) -> set[str]:
    """The plan ids the folder's files define (read with YAML's safe loader only: a file that
    does not parse is left to the full check of the plans, which names its mistake)."""
    import yaml

    names = set()
    for path in sorted(Path(plans).glob("*.y*ml")):
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
        if isinstance(loaded, dict) and isinstance(loaded.get("plan"), str):
            names.add(loaded["plan"])
    return names


def known_plan(text: str, where: str, *folders: str | None) -> None:
    """`plan` or `plan:version` names a plan some file in `folders` defines (`where`: the
    argument, for the message)."""
    name = text.strip().partition(":")[0]
    known = set().union(*(plan_names(f) for f in folders if f))
    if name not in known:
        searched = " and ".join(f for f in folders if f)
        raise InputError(f"{where}: no plan file defines plan {name!r} (plans in {searched}: "
                         f"{', '.join(sorted(known)) or 'none'})")


def plan_map_names(texts: list[str], plans: str, candidates: str | None) -> None:
    for text in texts:
        old, sep, new = text.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise InputError(f"--plan-map {text!r} is not OLD=NEW (e.g. images=api, or api:1=api:2 for versions)")
        known_plan(old, f"--plan-map {text}", plans)
        known_plan(new, f"--plan-map {text}", plans, candidates)


def closed_periods(store_uri: str) -> list[Period]:
    """Every period with a manifest (closed), in order: the one reading of which periods are
    closed, for the command line's checks and for every flow."""
    from flows.store import open_store

    return sorted(Period.parse(p) for o in open_store(store_uri).list(PERIODS_PREFIX)
                  if (p := period_of_manifest(o.key)))


def closed_manifest(store_uri: str, period: Period) -> dict | None:
    """The manifest of a closed period (None while it is open)."""
    from flows.store import open_store

    store = open_store(store_uri)
    key = manifest_key(period)
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def close_summary(manifest: dict, store_uri: str, status: str) -> dict:
    """What a close prints and returns, read from a closed period's manifest."""
    return {"period": manifest["period"], "status": status, "run_id": manifest["run_id"], "store": store_uri,
            "rows": manifest["rows"], "totals": manifest["totals"],
            "invoices": sum(t["invoices"] for t in manifest["totals"]),
            "outputs": [o["key"] for o in manifest["outputs"]],
            "quarantined_by_reason": manifest.get("quarantined_by_reason", {}),
            "adjustments": manifest.get("adjustments")}


def has_settings(store_uri: str) -> bool:
    """Whether the store has its own settings file (billrun.yaml)."""
    from flows.store import open_store

    return open_store(store_uri).exists(CONFIG_KEY)


def night_already_ran(store_uri: str, day: date) -> bool:
    from flows.store import open_store

    return open_store(store_uri).exists(night_prefix(day) + MANIFEST)


def has_inputs(store_uri: str) -> list[str]:
    """The demo's inputs (customers, subscriptions, usage) the store already holds."""
    from flows.store import open_store

    store = open_store(store_uri)
    return [prefix for prefix in (CUSTOMERS_PREFIX, SUBSCRIPTIONS_PREFIX, USAGE_PREFIX)
            if any(True for _ in store.list(prefix))]


def usage_missing_refusal(store_uri: str, plans: str, period: Period) -> str | None:
    """The no-usage guard of a close, answered without Prefect when it is cheap: a store with
    no usage object at all. (With usage objects, whether a row falls in the period is only known
    once the close has read them: the close refuses then, before it publishes anything.)"""
    from flows.ingest import is_usage_key, read_table
    from flows.store import open_store

    store = open_store(store_uri)
    if any(is_usage_key(o.key) for o in store.list(USAGE_PREFIX)):
        return None
    present = {k for k in CUSTOMERS_KEYS + SUBSCRIPTIONS_KEYS if store.exists(k)}
    customers_key = next((k for k in CUSTOMERS_KEYS if k in present), None)
    subscriptions_key = next((k for k in SUBSCRIPTIONS_KEYS if k in present), None)
    if customers_key is None or subscriptions_key is None:
        return None  # the close names what is missing
    from transforms.inputs.guards import close_without_usage
    from transforms.inputs.plans import load_catalog
    from transforms.inputs.reference import checked_customers, checked_subscriptions, segments_in

    catalog = load_catalog(plans)
    with tempfile.TemporaryDirectory(prefix="billrun-preflight-") as tmp:
        local = store.fetch([customers_key, subscriptions_key], Path(tmp))
        customers = checked_customers(read_table(local[customers_key], customers_key), customers_key)
        subs = checked_subscriptions(read_table(local[subscriptions_key], subscriptions_key), subscriptions_key,
                                     customers, catalog)
    return close_without_usage(period, 0, segments_in(period, subs, catalog))


def preview_target(store_uri: str, plans: str, customer: str, day: date) -> dict:
    """What `billrun preview` shows, checked before anything slow starts: the customer (known),
    the open period holding `day` (not closed: its final invoices are published), the
    customer's subscriptions in it (at least one), the seller's terms, and the latest nightly run
    of the period up to `day` (None: the drafts are rated from the inputs)."""
    from flows.store import open_store

    store = open_store(store_uri)
    period = Period.containing(day)
    if store.exists(manifest_key(period)):
        raise InputError(f"--date {day} is in {period}, which is closed: its final invoices are published"
                         f"{_final_invoices(store, period, customer)}; a preview shows an open period")
    import yaml  # the checks below read and check the reference files (pandera, the plans)

    from flows.ingest import read_table
    from transforms.documents.terms import seller_block
    from transforms.inputs.plans import load_catalog
    from transforms.inputs.reference import checked_customers, checked_subscriptions, segments_in, subscription_plans

    keys = {}
    for what, options in (("customers", CUSTOMERS_KEYS), ("subscriptions", SUBSCRIPTIONS_KEYS)):
        present = [k for k in options if store.exists(k)]
        if not present:
            raise InputError(f"{store.uri}: {options[0]} (or .parquet) not found; every store needs {what}")
        keys[what] = present[0]
    with tempfile.TemporaryDirectory(prefix="billrun-preflight-") as tmp:
        local = store.fetch(list(keys.values()) + ([SELLER_KEY] if store.exists(SELLER_KEY) else []), Path(tmp))
        customers = checked_customers(read_table(local[keys["customers"]], keys["customers"]), keys["customers"])
        rows = customers.filter(customers["customer_id"] == customer)
        if rows.is_empty():
            raise InputError(f"--customer {customer!r}: no such customer in {keys['customers']}")
        catalog = load_catalog(plans)
        subs = checked_subscriptions(read_table(local[keys["subscriptions"]], keys["subscriptions"]),
                                     keys["subscriptions"], customers, catalog)
        seller = {}
        if SELLER_KEY in local:
            try:
                seller = yaml.safe_load(local[SELLER_KEY].read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise InputError(f"{SELLER_KEY}: not valid YAML ({str(exc).splitlines()[0]})") from None
    segments = [s for s in segments_in(period, [s for s in subs if s.customer_id == customer], catalog)]
    if not segments:
        raise InputError(f"--customer {customer!r}: no subscription of theirs is active in {period} "
                         f"({keys['subscriptions']}), so there is no invoice to preview")
    nights = sorted(night for o in store.list(NIGHTLY_PREFIX)
                    if (found := night_of_manifest(o.key))
                    and Period.containing(night := date.fromisoformat(found)) == period and night <= day)
    return {"period": period, "day": day, "customer": rows.row(0, named=True),
            "seller": seller_block(seller or {}, SELLER_KEY),
            "roundings": subscription_plans(segments).rounding,
            "night": nights[-1] if nights else None}


def _final_invoices(store, period: Period, customer: str) -> str:
    """`(<ids>: see them with billrun pdf or explain)` for the customer's final invoices of a closed period."""
    import io

    import polars as pl

    key = period_prefix(period) + "invoices.parquet"
    ids = []
    if store.exists(key):
        table = pl.read_parquet(io.BytesIO(store.read_bytes(key)), columns=["invoice_id", "customer_id", "kind"])
        ids = table.filter((pl.col("customer_id") == customer) & (pl.col("kind") == "invoice"))["invoice_id"].to_list()
    if not ids:
        return " (see them with `billrun pdf --invoice ID` or `billrun explain --invoice ID`)"
    return (f" (the customer's: {', '.join(ids)}; see one with `billrun pdf --invoice {ids[0]}` or "
            f"`billrun explain --invoice {ids[0]}`)")
