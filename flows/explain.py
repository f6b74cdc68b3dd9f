"""`billrun explain --invoice ID`: how every line of a document was computed, from which usage,
with which plan version, by which run."""
from __future__ import annotations

import io
import json
import re

import polars as pl

from flows.store import open_store
from transforms.engine.invoices import USAGE_LINE_KINDS
from transforms.errors import InputError
from transforms.inputs.adjustments import KINDS as ADJUSTMENT_KINDS
from transforms.inputs.adjustments import REF
from transforms.layout import CORRECTIONS_PREFIX, MANIFEST, period_prefix

DOCUMENT_ID = re.compile(r"^(INV|CN|DN)-(\d{4}-\d{2})-\d{6}$")
"""An invoice, credit note or debit note id: its kind and the period it bills."""


def frame_at(store, key: str) -> pl.DataFrame:
    """A Parquet object of the store as a frame."""
    return pl.read_parquet(io.BytesIO(store.read_bytes(key)))


def document_folder(store, invoice_id: str, period: str) -> tuple[str, dict]:
    """The folder holding the document, and its run's manifest."""
    if invoice_id.startswith("INV-"):
        folder = period_prefix(period)
        if store.exists(folder + MANIFEST):
            return folder, json.loads(store.read_bytes(folder + MANIFEST))
    else:
        for obj in store.list(CORRECTIONS_PREFIX):
            if obj.key.endswith("/" + MANIFEST):
                manifest = json.loads(store.read_bytes(obj.key))
                if any(d["invoice_id"] == invoice_id for d in manifest["documents"]):
                    return obj.key.removesuffix(MANIFEST), manifest
    raise InputError(f"{invoice_id}: no such document in {store.uri}")


def explain_invoice(store_uri: str, invoice_id: str) -> dict:
    match = DOCUMENT_ID.match(invoice_id)
    if not match:
        raise InputError(f"{invoice_id!r} is not a document id (INV-, CN- or DN-YYYY-MM-NNNNNN)")
    store = open_store(store_uri)
    folder, manifest = document_folder(store, invoice_id, match.group(2))
    found = frame_at(store, folder + "invoices.parquet").filter(pl.col("invoice_id") == invoice_id)
    if found.height == 0:
        raise InputError(f"{invoice_id}: no such document in {store.uri}")
    invoice = found.row(0, named=True)
    lines = frame_at(store, folder + "invoice_lines.parquet").filter(pl.col("invoice_id") == invoice_id).sort("line_no")
    usage = pl.DataFrame()
    if invoice["kind"] == "invoice" and store.exists(folder + "usage_summary.parquet"):
        usage = frame_at(store, folder + "usage_summary.parquet").filter(
            pl.col("subscription_id") == invoice["subscription_id"])
    plans = {(p["plan"], p["version"]): p for p in manifest.get("plans", [])}
    adjustments = {}  # the input rows behind the invoice's one-off charges and manual credits
    if invoice["kind"] == "invoice" and store.exists(folder + "adjustments.parquet"):
        adjustments = {r["adjustment_id"]: r for r in frame_at(store, folder + "adjustments.parquet").filter(
            pl.col("invoice_id") == invoice_id).iter_rows(named=True)}
    explained = []
    for line in lines.iter_rows(named=True):
        entry = {k: line[k] for k in ("line_no", "kind", "description", "meter", "quantity", "unit", "amount_minor",
                                      "amount", "included_units", "total_units", "adjusts_kind", "old_quantity",
                                      "new_quantity", "old_amount_minor", "new_amount_minor")
                 if line.get(k) is not None}
        entry["steps"] = json.loads(line["details"]) if line.get("details") else []
        if line.get("plan") is not None:
            plan = plans.get((line["plan"], line["plan_version"]), {})
            entry["plan"] = {"plan": line["plan"], "version": line["plan_version"], "file": plan.get("file"),
                             "sha256": plan.get("sha256")}
        if line["kind"] in USAGE_LINE_KINDS and usage.height:
            wanted = {**(json.loads(line["filter"]) if line.get("filter") else {}),
                      **(json.loads(line["group"]) if line.get("group") else {})}
            rows = usage.filter((pl.col("segment_no") == line["segment_no"]) & (pl.col("meter") == line["meter"]))
            entry["usage"] = [
                {"dims": r["dims"], "units": format(r["units"].normalize(), "f"), "events": r["events"]}
                for r in rows.iter_rows(named=True)
                if all(json.loads(r["dims"]).get(k) == v for k, v in wanted.items())]
        kind = line.get("adjusts_kind") or line["kind"]
        found = REF.search(line.get("adjusts_description") or line["description"] or "")
        if kind in ADJUSTMENT_KINDS and found:
            row = adjustments.get(found.group(1), {})
            entry["adjustment"] = {"adjustment_id": found.group(1), **{
                k: row[k] for k in ("reason", "amount", "taxable", "unapplied_minor", "source")
                if row.get(k) is not None}}
        explained.append(entry)
    return {"invoice": {k: (str(v) if v is not None and not isinstance(v, (int, str)) else v)
                        for k, v in invoice.items()},
            "run_id": manifest["run_id"], "manifest": folder + MANIFEST, "reason": manifest.get("reason"),
            "lines": explained}
