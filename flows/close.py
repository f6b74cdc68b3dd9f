"""The monthly close as a Prefect flow: one period's final invoices, published once.

fetch inputs -> check customers and subscriptions -> normalize usage -> settle usage -> replay
credits -> rate invoices -> write outputs -> publish. The steps it shares with the other flows
are in flows/steps.py, the outputs it writes in flows/outputs.py, and its commit in
flows/publish.py. Outputs are written to a local work folder, staged in the store under
`billing/_state/runs/<run_id>/`, copied into `billing/period=P/`, and the manifest is written
last with a create-if-absent, which is the commit point: two closes of one period cannot both
publish, and a close killed before it leaves no manifest, so the period stays open.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version as package_version

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.utilities.annotations import quote

from flows import tables as lakehouse
from flows.billed_index import committed_index, index_billed, record_billed
from flows.engine import period_usage
from flows.locks import Hold, period_lock, tidy_closed
from flows.outputs import write_outputs
from flows.preflight import close_summary
from flows.publish import closed_manifest, output_folder, publish
from flows.report import fetch_costs
from flows.secrets import keep_secrets_out_of_logs
from flows.settings import Settings
from flows.statement import with_local_lineage
from flows.steps import (
    CheckedReference,
    Inputs,
    adjustments_billed_elsewhere,
    check_reference,
    fetch_inputs,
    rate_invoices_to_files,
    replay_credits,
    work_dir_for,
)
from flows.store import open_store
from flows.testing_seam import fault_point
from transforms.engine.checked_usage import CheckedFiles, usage_row_counts
from transforms.errors import InputError
from transforms.inputs.guards import close_too_early, close_without_usage, rows_in_period
from transforms.inputs.plans import Catalog, load_catalog, plan_entries_for
from transforms.layout import MANIFEST, billed_index_key, close_run_id, period_prefix
from transforms.periods import Period


@dataclass
class CloseResult:
    period: str
    status: str  # closed | already_closed
    run_id: str
    store: str
    rows: dict[str, int] = field(default_factory=dict)
    totals: list[dict] = field(default_factory=list)
    invoices: int = 0
    outputs: list[str] = field(default_factory=list)
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    adjustments: dict | None = None  # the manifest's account of adjustment rows; None without the input

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@flow(name="close-period", log_prints=False)
def close_period(store: str, plans: str, period: str, dask_address: str | None = None, now: datetime | None = None,
                 before_period_end: bool = False, allow_empty: bool = False, settings: Settings | None = None) -> dict:
    """Close one calendar month: final invoices, lines, quarantine, alerts, HTML invoices, manifest.

    A close is final, so it refuses a month that has not ended at `now` (default: the clock, read
    here once) unless `before_period_end`, and a month without a single usage row while
    subscriptions in it meter usage unless `allow_empty`. The row-level steps run in shards on a
    thread pool, or on the Dask cluster at `dask_address` (tcp://scheduler:8786): the outputs
    are the same bytes either way. `settings`: the command's (default: read here, once)."""
    settings = settings or Settings.from_environ()
    keep_secrets_out_of_logs()
    the_period = Period.parse(period)
    now = now or datetime.now(timezone.utc)
    catalog = load_catalog(plans)
    lake = lakehouse.tables_settings(open_store(store))  # a bad tables: section fails before any work
    existing = closed_manifest(store, the_period)
    warnings: list[str] = []
    if existing is None:
        too_early = close_too_early(the_period, now)
        if too_early and not before_period_end:
            raise InputError(too_early)
        with period_lock(open_store(store), [the_period], f"close {the_period}", datetime.now(timezone.utc),
                         warnings) as hold:
            fault_point("locked")
            existing = closed_manifest(store, the_period)  # closed while we waited for the lock?
            if existing is None:
                result = _close(store, catalog, the_period, hold, settings, dask_address, allow_empty)
                _commit_tables(store, lake, the_period, result["run_id"])
        if existing is None:
            return {**result, "warnings": result["warnings"] + warnings}
    get_run_logger().info("%s is already closed by %s; nothing to do", the_period, existing["run_id"])
    _commit_tables(store, lake, the_period, existing["run_id"])  # catches up tables a killed close left behind
    warnings += tidy_closed(open_store(store), the_period, existing)
    return {**_result_from_manifest(existing, store, "already_closed").as_dict(), "warnings": warnings}


def _close(store: str, catalog: Catalog, period: Period, hold: Hold, settings: Settings,
           dask_address: str | None = None, allow_empty: bool = False) -> dict:
    work_dir = work_dir_for(store, f"close-{period}")
    try:
        inputs = fetch_inputs(store, work_dir / "inputs")
        costs = fetch_costs(store)
        fault_point("fetched")
        # an adjustment that another closed period's documents bill is never billed here
        billed_elsewhere = adjustments_billed_elsewhere(store, inputs, [period])
        reference = check_reference(inputs, catalog, period, billed_elsewhere)
        fault_point("checked")
        with period_usage(store, inputs, work_dir, f"close-{period}", settings, dask_address) as usage:
            normalized = usage.normalized
            fault_point("normalized")
            # what the closed periods' documents bill (their billed-event index) is never billed again
            checked = with_local_lineage(usage.checked(reference, catalog, period, committed_index(store)),
                                         usage.scratch, work_dir)
            # the period's index is sorted and written by DuckDB, off the interpreter's lock, while the
            # wallets replay and the invoices are rated in this process (it reads the shards' files of
            # billed events: the block waits for it, and they go when the block ends)
            indexing = index_billed.submit(usage.scratch.uri, list(checked.billed_ids), str(period), work_dir)
            try:
                fault_point("settled")
                if not allow_empty:
                    refuse_without_usage(period, checked, len(normalized.unreadable), reference)
                # the checked usage is its files: each step reads the tables it needs, and Prefect keeps paths
                # the invoices are files of the work folder (flows/handoff.py): write-outputs and the
                # render workers read them from there
                replay = replay_credits(checked, quote(reference), catalog, period)
                invoices = rate_invoices_to_files(checked, quote(reference), quote(replay), period, work_dir)
                fault_point("rated")
                index_file, indexed = indexing.result()
            finally:
                indexing.wait()
        plan_entries = plan_entries_for(reference.segments)
        run_id = run_id_for(period, inputs, plan_entries)
        # quote(): hand big values over as they are; Prefect would otherwise walk every
        # dataclass in them looking for futures (the replay's ledger, the reference's 100k subscriptions
        # and segments; the invoices cross as files)
        out_dir = output_folder(store, run_id, hold.token, work_dir)
        # the period's index goes in before the manifest, which names it: it counts once the period is closed
        [index_entry] = record_billed(store, [(billed_index_key(str(period), run_id), index_file, indexed)])
        names, manifest = write_outputs(invoices, checked, normalized, quote(reference),
                                        inputs, catalog, quote(replay),
                                        period, run_id, costs, plan_entries, out_dir, index_entry,
                                        settings=settings)
        fault_point("written")
        # the manifest is bytes, walked at once; the 100k output names are walked in ~0.3 s: quoted
        warnings = publish(store, period, run_id, out_dir, quote(names), manifest, hold)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result = _result_from_manifest(json.loads(manifest), store, "closed")
    _report(result)
    return {**result.as_dict(), "warnings": warnings}


def refuse_without_usage(period: Period, checked: CheckedFiles, unreadable: int, reference: CheckedReference) -> None:
    """A close is final: a month without a single usage row (`unreadable` objects count as read)
    while subscriptions in it meter usage is refused, as its usage was most likely not uploaded."""
    no_usage = close_without_usage(
        period, rows_in_period(usage_row_counts(checked.counts, unreadable)["read"], checked.quarantine),
        list(reference.segments))
    if no_usage:
        raise InputError(no_usage)


def _commit_tables(store: str, lake: lakehouse.TablesSettings, period: Period, run_id: str) -> None:
    """After the manifest: the period's outputs to the lakehouse tables, when configured. The
    period stays closed whatever happens here."""
    lakehouse.commit_published(store, lake, [period_prefix(period) + MANIFEST],
                            f"{period} is closed (run {run_id})")


def run_id_for(period: Period, inputs: Inputs, plan_entries: list[dict]) -> str:
    """Deterministic: the same period, input contents and plans give the same run id (and so
    the same bytes everywhere the id is printed)."""
    digest = hashlib.sha256()
    digest.update(f"close|{period}|billrun {package_version('billrun')}".encode())
    for obj in inputs.all:
        digest.update(f"|{obj.key}|{obj.sha256}".encode())
    for entry in plan_entries:
        digest.update(f"|plan|{entry['plan']}|{entry['version']}|{entry['sha256']}".encode())
    return close_run_id(period, digest.hexdigest()[:12])


def _result_from_manifest(manifest: dict, store_uri: str, status: str) -> CloseResult:
    return CloseResult(**close_summary(manifest, store_uri, status))


def _report(result: CloseResult) -> None:
    key = f"close-{result.period}"
    create_table_artifact(
        key=key,
        table=[{"measure": k, "value": v} for k, v in result.rows.items()]
        + [{"measure": f"total {t['currency']} (minor units)", "value": t["total_minor"]} for t in result.totals]
        + [{"measure": f"quarantined: {r}", "value": n} for r, n in result.quarantined_by_reason.items()],
        description=f"Close of {result.period}: {result.status}, run {result.run_id}")
    create_markdown_artifact(key=f"{key}-report", markdown=close_report(result, open_store(result.store).uri),
                             description=f"Close of {result.period}")


def close_report(result: CloseResult, store_uri: str) -> str:
    """The close's markdown report: the manifest's row counts and totals as tables, then the
    outputs with their full paths (the report is read far from the run)."""
    rows = ["| usage rows | count |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in result.rows.items()]
    totals = ["| currency | invoices | total (minor units) |", "|---|---:|---:|"] + [
        f"| {t['currency']} | {t['invoices']} | {t['total_minor']} |" for t in result.totals]
    quarantined = (["| quarantine reason | rows |", "|---|---:|"]
                   + [f"| {r} | {n} |" for r, n in result.quarantined_by_reason.items()]
                   if result.quarantined_by_reason else [])
    return "\n".join(
        [f"# Close of {result.period}", "", f"Status: **{result.status}**, run `{result.run_id}`.", ""]
        + rows + [""] + totals + [""] + (quarantined + [""] if quarantined else []) + ["Outputs:", ""]
        + [f"- `{store_uri.rstrip('/')}/{o}`" for o in result.outputs if not o.endswith(".html")]
        + [f"- {result.invoices} HTML invoices under `{period_prefix(result.period)}invoices/`"])
