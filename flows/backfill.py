"""Backfill: re-rate closed periods with today's usage and plans, and issue correction documents
for the differences. Finalized invoices are never touched.

The inputs are read and normalized once for all periods; each closed period in the range is
settled and rated exactly as a close would, then compared with everything already issued for it
(its invoices plus every committed earlier correction). The documents of one backfill are
published together under `billing/corrections/run=<id>/`, manifest last (create-if-absent), while
the backfill holds the locks of every period it corrects.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows import tables as lakehouse
from flows.billed_index import committed_index, correction_index, record_billed
from flows.engine import period_usage
from flows.locks import Hold, period_lock
from flows.outputs import PARQUET
from flows.publish import CrashPoints, closed_manifest, manifest_bytes, output_entries, publish_outputs
from flows.retries import IO_RETRIES
from flows.secrets import keep_secrets_out_of_logs
from flows.settings import Settings
from flows.steps import (
    adjustments_billed_elsewhere,
    check_reference,
    fetch_inputs,
    rate_invoices,
    replay_credits,
    seller_block,
    work_dir_for,
)
from flows.store import open_store
from transforms.credits.ledger import balances_table
from transforms.documents.render import invoice_html
from transforms.documents.terms import due_on
from transforms.engine.invoices import Invoice, invoices_table, lines_table
from transforms.errors import InputError
from transforms.finance.corrections import (
    correction_documents,
    issued_lines,
    issued_taxes,
    ledger_adjustments,
    next_note_numbers,
    original_documents,
    revenue_adjustments,
)
from transforms.finance.revenue import journal, revenue_table, tax_rows
from transforms.inputs.guards import backfill_dated_too_early
from transforms.inputs.plans import catalog_entries, load_catalog, plan_entries_for
from transforms.inputs.reference import subscription_plans
from transforms.layout import (
    CORRECTIONS_PREFIX,
    MANIFEST,
    billed_index_key,
    checked_key,
    correction_prefix,
    period_prefix,
    run_folder,
    run_of_correction_manifest,
    run_prefix,
)
from transforms.money import format_money
from transforms.periods import Period, utc_midnight


def periods_between(first: Period, last: Period) -> list[Period]:
    if last < first:
        raise InputError(f"--from {first} is after --to {last}")
    out = [first]
    while out[-1] < last:
        out.append(out[-1].next())
    return out


def _read_parquet(store, key: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(store.read_bytes(key)))


@task(name="load-issued", cache_policy=NO_CACHE, **IO_RETRIES)
def load_issued(store_uri: str, periods: list[Period]) -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    """Per period: every document issued (close invoices + committed corrections) and their lines."""
    store = open_store(store_uri)
    corrections = sorted(run for o in store.list(CORRECTIONS_PREFIX) if (run := run_of_correction_manifest(o.key)))
    def every(name: str) -> list[pl.DataFrame]:
        keys = [correction_prefix(r) + name for r in corrections]
        return [_read_parquet(store, k) for k in keys if store.exists(k)]

    extra = {name: every(name) for name in ("invoices.parquet", "invoice_lines.parquet", "revenue.parquet",
                                             "credit_ledger.parquet")}
    issued = {}
    for period in periods:
        def recorded(name: str, close_name: str, column: str, period=period) -> pl.DataFrame:
            frames = [_read_parquet(store, period_prefix(period) + close_name)] + extra[name]
            return pl.concat(frames, how="diagonal_relaxed").filter(pl.col(column) == str(period))
        issued[str(period)] = Issued(recorded("invoices.parquet", "invoices.parquet", "period"),
                                     recorded("invoice_lines.parquet", "invoice_lines.parquet", "period"),
                                     _recorded_revenue(store, period, extra["revenue.parquet"]),
                                     _recorded_balances(store, period, extra["credit_ledger.parquet"]))
    return issued


@dataclass(frozen=True)
class Issued:
    """What is on record for one closed period: documents, lines, revenue and credit balances."""

    docs: pl.DataFrame
    lines: pl.DataFrame
    revenue: pl.DataFrame
    balances: pl.DataFrame


def _recorded_revenue(store, period: Period, adjustments: list[pl.DataFrame]) -> pl.DataFrame:
    frames = [_read_parquet(store, period_prefix(period) + "revenue.parquet")]
    frames += [a.filter(pl.col("corrected_period") == str(period)) for a in adjustments]
    return pl.concat(frames, how="diagonal_relaxed")


def _recorded_balances(store, period: Period, adjustments: list[pl.DataFrame]) -> pl.DataFrame:
    frames = [_read_parquet(store, period_prefix(period) + "credit_balances.parquet").select(
        "grant_id", "customer_id", "closing")]
    frames += [a.filter(pl.col("corrected_period") == str(period)).select("grant_id", "customer_id", "credits")
               for a in adjustments]
    return pl.concat(frames, how="diagonal_relaxed")


def backfill_run_id(periods: list[Period], as_of: date, reason: str, input_hashes: list[str],
                    plan_hashes: list[str], issued_ids: list[str]) -> str:
    """Deterministic: the same range, date, reason, inputs, plans and issued documents give the
    same id (a rerun of a killed backfill publishes to the same place)."""
    digest = hashlib.sha256(f"backfill|{periods[0]}|{periods[-1]}|{as_of}|{reason}|"
                            f"billrun {package_version('billrun')}".encode())
    for part in input_hashes + plan_hashes + issued_ids:
        digest.update(f"|{part}".encode())
    return f"backfill-{as_of:%Y%m%d}-{digest.hexdigest()[:12]}"


BACKFILL_POINTS = CrashPoints(staged="backfill-staged", copied="backfill-copied", committed="backfill-committed")


@task(name="publish-corrections", cache_policy=NO_CACHE, **IO_RETRIES)
def publish_corrections(store_uri: str, run_id: str, out_dir: Path, names: list[str], manifest: bytes,
                        hold: Hold) -> list[str]:
    """The documents into `billing/corrections/run=<id>/`, manifest last (see publish_outputs).

    The correction folder is one of the run's private folders until its manifest exists: an
    earlier, interrupted attempt's (with the same document numbers as this run, under the same
    run id or another day's) is deleted before anything is written."""
    return publish_outputs(open_store(store_uri), hold, run_id, correction_prefix(run_id), out_dir, names, manifest,
                           scratch=[run_prefix(run_id, hold.token), correction_prefix(run_id)],
                           private=run_folder(run_id), points=BACKFILL_POINTS)


@flow(name="backfill", log_prints=False)
def backfill(store: str, plans: str, first: str, last: str, reason: str, as_of: str,
             settings: Settings | None = None) -> dict:
    """Re-rate the closed periods first..last and issue credit/debit notes for the differences."""
    settings = settings or Settings.from_environ()
    keep_secrets_out_of_logs()
    periods = periods_between(Period.parse(first), Period.parse(last))
    issued_on = date.fromisoformat(as_of)
    if not reason.strip():
        raise InputError("--reason must say why (it is printed on every document and kept in the manifest)")
    catalog = load_catalog(plans)
    lake = lakehouse.tables_settings(open_store(store))  # a bad tables: section fails before any work
    closed = [p for p in periods if closed_manifest(store, p) is not None]
    skipped = [str(p) for p in periods if p not in closed]
    too_early = backfill_dated_too_early(issued_on, closed)
    if too_early:
        raise InputError(too_early)
    logger = get_run_logger()
    if not closed:
        result = {"status": "nothing_closed", "run_id": None, "documents": [], "skipped": skipped, "store": store}
        _report(result, first, last, reason, issued_on)
        return result
    warnings: list[str] = []
    with period_lock(open_store(store), closed, f"backfill {first}..{last}", datetime.now(timezone.utc),
                     warnings) as hold:
        work_dir = work_dir_for(store, f"backfill-{first}-{last}")
        try:
            # the periods re-rated here are settled together, from the usage; what the other
            # closed periods' documents bill (their billed-event index) is never billed again
            index = committed_index(store, leave_out=closed)
            index_changes: list[tuple[str, Path, int]] = []
            inputs = fetch_inputs(store, work_dir / "inputs")
            issued = load_issued(store, closed)
            # likewise, what the other closed periods' documents bill of the adjustments
            billed_elsewhere = adjustments_billed_elsewhere(store, inputs, closed)
            documents: list[Invoice] = []
            plan_entries: dict[tuple, dict] = {}
            customers = None
            revenue_changes, ledger_changes = [], []
            roundings: dict[str, str] = {}
            booked = str(Period.containing(issued_on))
            # normalized once, then each period settled from the same shards as a close settles it
            with period_usage(store, inputs, work_dir, f"backfill-{first}-{last}", settings) as usage:
                for period in closed:
                    reference = check_reference(inputs, catalog, period, billed_elsewhere)
                    customers = reference.customers
                    checked = usage.checked(reference, catalog, period, index)
                    if str(period) in index.decided:  # what its documents will bill after this run
                        changes = work_dir / "billed" / f"changes-{period}.parquet"
                        billed = usage.billed_files(checked, work_dir / "billed" / str(period))
                        count = correction_index(index, str(period), billed, work_dir / "index-own", changes)
                        if count:
                            index_changes.append((str(period), changes, count))
                    replay = replay_credits(checked, quote(reference), catalog, period)
                    rerated = rate_invoices(checked, quote(reference), quote(replay), period)
                    plan_entries.update({(e["plan"], e["version"]): e for e in plan_entries_for(reference.segments)})
                    record = issued[str(period)]
                    roundings.update(subscription_plans(reference.segments).rounding)
                    due = {row["customer_id"]: due_on(issued_on, reference.seller, row)
                           for row in reference.customers.iter_rows(named=True)}
                    documents += [replace(doc, due_on=due.get(doc.customer_id)) for doc in correction_documents(
                        str(period), rerated, issued_lines(record.lines), original_documents(record.docs),
                        next_note_numbers(record.docs), issued_on, issued_taxes(record.lines), roundings)]
                    revenue_changes.append(revenue_adjustments(
                        revenue_table(period, rerated, replay, reference.segments),
                        record.revenue, str(period), booked))
                    ledger_changes.append(ledger_adjustments(balances_table(replay, period), record.balances,
                                                             str(period), booked, utc_midnight(issued_on)))
            revenue_changes = pl.concat(revenue_changes)
            ledger_changes = pl.concat(ledger_changes)
            input_hashes = [f"{o.key}|{o.sha256}" for o in inputs.all]
            issued_ids = sorted(i for record in issued.values() for i in record.docs["invoice_id"].to_list())
            plan_entries = [plan_entries[k] for k in sorted(plan_entries)]
            plan_hashes = [f"{e['plan']}|{e['version']}|{e['sha256']}" for e in plan_entries]
            run_id = backfill_run_id(closed, issued_on, reason, input_hashes, plan_hashes, issued_ids)
            if documents or revenue_changes.height or ledger_changes.height:
                documents = [replace(d, run_id=run_id, reason=reason) for d in documents]
                # the index's changes go in before the manifest, which names them: they count once it exists
                billed_events = record_billed(store, [(billed_index_key(p, run_id), path, count)
                                                      for p, path, count in index_changes])
                names, manifest = _write(documents, revenue_changes, ledger_changes, customers, roundings, inputs,
                                         run_id, reason, issued_on, closed, plan_entries, work_dir / "out",
                                         booked, billed_events)
                warnings += publish_corrections(store, run_id, work_dir / "out", names, manifest, hold)
            record_checked(store, closed, run_id, inputs, plan_entries, catalog)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    logger.info("backfill %s..%s: %d documents in run %s", first, last, len(documents), run_id)
    changed = bool(documents) or revenue_changes.height > 0 or ledger_changes.height > 0
    if changed:  # after its manifest, like a close: the corrections stay issued whatever happens here
        lakehouse.commit_published(store, lake, [correction_prefix(run_id) + MANIFEST],
                                f"the corrections of run {run_id} are issued")
    result = {"status": "corrected" if changed else "nothing_to_correct", "run_id": run_id, "skipped": skipped,
              "store": store, "warnings": warnings, "revenue_adjustments": revenue_changes.height,
              "ledger_adjustments": ledger_changes.height,
              "documents": [{"invoice_id": d.invoice_id, "kind": d.kind, "period": d.period,
                             "subscription_id": d.subscription_id, "corrects_invoice_id": d.corrects_invoice_id,
                             "currency": d.currency, "total_minor": d.total_minor} for d in documents]}
    _report(result, first, last, reason, issued_on)
    return result


def _report(result: dict, first: str, last: str, reason: str, as_of: date, shown: int = 50) -> None:
    """The run in Prefect: a summary table and a markdown report linking what it published."""
    docs = result["documents"]
    totals: dict[str, int] = {}
    for d in docs:
        totals[d["currency"]] = totals.get(d["currency"], 0) + d["total_minor"]
    key = f"backfill-{first}-{last}"
    title = f"Backfill of {first}..{last} as of {as_of}"
    create_table_artifact(
        key=key,
        table=[{"measure": "status", "value": result["status"]},
               {"measure": "credit notes", "value": sum(d["kind"] == "credit_note" for d in docs)},
               {"measure": "debit notes", "value": sum(d["kind"] == "debit_note" for d in docs)}]
        + [{"measure": f"net {c} (minor units)", "value": t} for c, t in sorted(totals.items())]
        + [{"measure": k.replace("_", " "), "value": result.get(k, 0)}
           for k in ("revenue_adjustments", "ledger_adjustments")]
        + [{"measure": f"skipped (not closed): {p}", "value": ""} for p in result["skipped"]],
        description=f"{title}: {result['status']}, run {result['run_id']}")
    store = open_store(result["store"])
    root = store.uri.rstrip("/")  # a folder store's absolute path: the report is read far from the run
    lines = [f"# {title}", "", f"Status: **{result['status']}**, run `{result['run_id']}`. Reason: {reason}", ""]
    if result["skipped"]:
        lines += [f"Skipped, not closed: {', '.join(result['skipped'])} (close them first).", ""]
    folder = correction_prefix(result["run_id"])
    if result["run_id"] and store.exists(folder + MANIFEST):
        outputs = [o["key"] for o in json.loads(store.read_bytes(folder + MANIFEST))["outputs"]]
        lines += ["Outputs:", ""] + [f"- `{root}/{o}`" for o in outputs + [folder + MANIFEST] if "/documents/" not in o]
        lines += ["", f"Documents ({len(docs)}, HTML under `{root}/{folder}documents/`):", ""] + [
            f"- `{d['invoice_id']}` {d['kind'].replace('_', ' ')} for {d['period']} correcting "
            f"`{d['corrects_invoice_id'] or '-'}`: {format_money(d['total_minor'], d['currency'])}"
            for d in docs[:shown]]
        if len(docs) > shown:
            lines.append(f"- and {len(docs) - shown} more (`invoices.parquet`)")
    elif result["status"] == "nothing_closed":
        lines += ["No period in the range is closed: nothing to re-rate."]
    else:
        lines += ["Nothing issued: every closed period in the range matches what was issued."]
    create_markdown_artifact(key=f"{key}-report", markdown="\n".join(lines), description=title)


@task(name="record-checked", cache_policy=NO_CACHE, **IO_RETRIES)
def record_checked(store_uri: str, periods: list[Period], run_id: str, inputs, plan_entries: list[dict],
                   catalog) -> None:
    """Remember, per period, the inputs and plans it was last rated with, so `billrun status`
    stops reporting drift that this backfill has settled (documents or not)."""
    store = open_store(store_uri)
    record = {"run_id": run_id, "plans": plan_entries, "catalog": catalog_entries(catalog),
              "inputs": [o.manifest_entry() for o in inputs.all]}
    body = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    for period in periods:
        store.put_bytes(checked_key(period), body)


def _write(documents: list[Invoice], revenue_changes: pl.DataFrame, ledger_changes: pl.DataFrame,
           customers: pl.DataFrame, roundings: dict[str, str], inputs, run_id: str, reason: str, as_of: date,
           periods: list[Period], plan_entries: list[dict], out_dir: Path, booked: str,
           billed_events: list[dict]) -> tuple[list[str], bytes]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "documents").mkdir()
    tables = {"invoices.parquet": invoices_table(documents), "invoice_lines.parquet": lines_table(documents),
              "revenue.parquet": revenue_changes, "credit_ledger.parquet": ledger_changes,
              "journal.parquet": journal(revenue_changes, tax_rows(documents, booked))}
    names = list(tables)
    for name, frame in tables.items():
        frame.write_parquet(out_dir / name, **PARQUET)
    by_customer = {row["customer_id"]: row for row in customers.iter_rows(named=True)}
    seller = seller_block(inputs)
    for doc in documents:
        name = f"documents/{doc.invoice_id}.html"
        customer = by_customer.get(doc.customer_id, {"name": doc.customer_id, "address": None, "email": None,
                                                     "tax_id": None})
        (out_dir / name).write_text(invoice_html(doc, customer, seller, roundings.get(doc.subscription_id, "half_up"),
                                                 run_id), encoding="utf-8")
        names.append(name)
    manifest = {
        "run_id": run_id, "kind": "backfill",
        "reason": reason, "as_of": as_of.isoformat(), "periods": [str(p) for p in periods],
        "inputs": [o.manifest_entry() for o in inputs.all],
        "plans": plan_entries,
        "billed_event_index": billed_events,
        "documents": [{"invoice_id": d.invoice_id, "kind": d.kind, "period": d.period,
                       "corrects_invoice_id": d.corrects_invoice_id, "total_minor": d.total_minor,
                       "currency": d.currency} for d in documents],
        "outputs": output_entries(correction_prefix(run_id), out_dir, names),
    }
    return sorted(names), manifest_bytes(manifest)
