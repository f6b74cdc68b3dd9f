"""The close's outputs, written into one local folder before they are published: the period's
tables (Parquet, written with `PARQUET`, as every published table is), its HTML invoices
(rendered in worker processes by flows/render_pool.py) and its manifest, whose bytes
publishing writes last (flows/publish.py).
"""
from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.handoff import InvoiceFiles
from flows.publish import manifest_bytes, output_entries
from flows.render_pool import write_invoice_documents
from flows.settings import Settings
from flows.shards import Normalized, local_workers
from flows.statement import LINEAGE_MEMORY, billed_events_table
from flows.steps import CheckedReference, Inputs
from transforms.collector import cycle_collector_paused
from transforms.credits.events import credit_meters
from transforms.credits.ledger import balances_table, ledger_table
from transforms.credits.model import WalletReplay
from transforms.credits.reports import credit_report
from transforms.engine.checked_usage import CheckedUsage, quarantine_table, quarantined_by_reason, usage_row_counts
from transforms.engine.invoices import Invoice, invoices_table, lines_table, totals_by_currency
from transforms.engine.lineage import credit_draws, lineage_lines
from transforms.finance.alerts import alerts_table, credit_alerts, price_change_notices
from transforms.finance.margins import margins_table, segment_plans
from transforms.finance.revenue import journal, revenue_table, tax_rows
from transforms.finance.spend import spend_alerts, usage_spend_by_subscription
from transforms.inputs.adjustments import adjustment_counts, billed_table
from transforms.inputs.plans import Catalog, catalog_entries
from transforms.inputs.reference import subscription_plans
from transforms.layout import period_prefix
from transforms.periods import Period

PARQUET = {"compression": "zstd", "statistics": True, "row_group_size": 262_144}
"""How every published table is written. The row group size is fixed: without it Polars cuts a
row group per in-memory chunk, and a sorted table's chunks follow the machine's thread count, so
the same close wrote different bytes on a 2-core and an 8-core machine."""




@task(name="write-outputs", cache_policy=NO_CACHE)
def write_outputs(invoice_files: InvoiceFiles, checked: CheckedUsage, normalized: Normalized,
                  reference: CheckedReference, inputs: Inputs, catalog: Catalog, replay: WalletReplay, period: Period,
                  run_id: str, costs: tuple,
                  plan_entries: list[dict], out_dir: Path, index_entry: dict | None = None, *,
                  settings: Settings) -> tuple[list[str], bytes]:
    """Tables and HTML into `out_dir` (the HTML by the settings' workers), from the rated
    invoices that the close's rating left as files (flows/handoff.py); returns the relative
    names and the manifest's bytes."""
    started = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)  # a killed run's partial outputs
    out_dir.mkdir(parents=True)
    names: list[str] = []
    spent: dict[str, float] = {}  # seconds per table, for the step's log line

    def write(name: str, frame: pl.DataFrame | pl.LazyFrame) -> None:
        if isinstance(frame, pl.LazyFrame):  # a table with a row per event is streamed to its file
            frame.sink_parquet(out_dir / name, **PARQUET)
        else:
            frame.write_parquet(out_dir / name, **PARQUET)
        names.append(name)
        spent[name] = time.perf_counter() - started - sum(spent.values())

    with cycle_collector_paused():  # 100k invoices of lines read back, none of them a cycle
        invoices = [replace(inv, run_id=run_id) for inv in invoice_files.read()]
    # The HTML invoices render in worker processes while this process writes the tables: each
    # worker reads its invoices, with what else their documents show, from their file.
    plans = subscription_plans(reference.segments)
    stop = threading.Event()  # a table failed: render no further chunk
    rendering = ThreadPoolExecutor(max_workers=1, thread_name_prefix="documents")
    documents_future = rendering.submit(write_invoice_documents, invoice_files, reference.seller, run_id, out_dir,
                                        local_workers(settings), stop=stop)
    try:
        with cycle_collector_paused():  # millions of table cells, none of them a cycle
            (billing_lines, quarantine, draws), by_reason, adjusted = _write_tables(
                write, invoices, checked, normalized, reference, catalog, replay, period, costs)
            credits, totals = credit_report(replay, period, plans.plan), totals_by_currency(invoices)
            del invoices  # read back from their files (above), they go before the sort below
            lineage_memory = settings.duckdb_memory or LINEAGE_MEMORY
            # billed_events last, from the lines and ledger entries it reads: its sort (DuckDB, spilling
            # past its cap) runs beside the least of this process's memory
            with billed_events_table(checked, billing_lines, quarantine, draws, lineage_memory) as billed_events:
                write("billed_events.parquet", billed_events)
        tables_done = time.perf_counter()
        documents = documents_future.result()
    except BaseException:
        stop.set()
        raise
    finally:
        rendering.shutdown(wait=True)
    names.extend(name for name, _, _ in documents)

    unreadable = len(normalized.unreadable)
    manifest = {
        "run_id": run_id,
        "period": str(period),
        "status": "closed",
        "issued_on": period.end.isoformat(),
        "inputs": [o.manifest_entry() for o in inputs.all],
        "credits": credits,
        "plans": plan_entries,
        "catalog": catalog_entries(catalog),
        "costs": costs[1],
        "rows": usage_row_counts(checked.counts, unreadable),
        "objects": {"usage": len(inputs.usage), "unreadable": unreadable},
        "quarantined_by_reason": by_reason,
        "conflicting_duplicates": checked.conflicts.height,
        "billed_event_index": index_entry,
        **({"adjustments": adjusted} if adjusted is not None else {}),
        "totals": totals,
        "outputs": output_entries(period_prefix(period), out_dir, names, hashed=documents),
    }
    get_run_logger().info("write-outputs: tables %.2fs (%s), documents %.2fs; %d files in %.2fs",
                          tables_done - started,
                          ", ".join(f"{n.removesuffix('.parquet')} {t:.1f}" for n, t in spent.items()),
                          time.perf_counter() - tables_done, len(names), time.perf_counter() - started)
    return sorted(names), manifest_bytes(manifest)


def _write_tables(write, invoices: list[Invoice], checked: CheckedUsage, normalized: Normalized,
                  reference: CheckedReference, catalog: Catalog, replay: WalletReplay, period: Period,
                  costs: tuple) -> tuple[tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame], dict[str, int], dict | None]:
    """The period's tables but billed_events, each through `write(name, frame)`; returns what
    billed_events reads of them (the usage lines, the quarantine and the ledger's credit draws),
    the quarantined rows per reason and the account of adjustment rows (None without the input)."""
    write("invoices.parquet", invoices_table(invoices))
    lines = lines_table(invoices)
    write("invoice_lines.parquet", lines)
    write("usage_summary.parquet", checked.usage_by_dims)
    write("margins.parquet", margins_table(lines, checked.usage_by_day, segment_plans(reference.segments),
                                           costs[0], period))
    billing_lines = lineage_lines(lines)
    del lines
    quarantine = quarantine_table(checked.quarantine, normalized.unreadable)
    write("quarantine.parquet", quarantine)
    write("conflicting_duplicates.parquet", checked.conflicts)
    write("alerts.parquet", alerts_table(
        price_change_notices(period, list(reference.subscriptions), catalog) + credit_alerts(replay, period)
        + spend_alerts(period, list(reference.segments), checked.usage_by_day, checked.per_event_usage,
                       replay.billable_by_day, credit_meters(list(reference.segments)),
                       usage_spend_by_subscription(invoices))))
    ledger = ledger_table(replay, period)
    write("credit_ledger.parquet", ledger)
    draws = credit_draws(ledger)
    del ledger
    write("credit_balances.parquet", balances_table(replay, period))
    revenue = revenue_table(period, invoices, replay, reference.segments)
    write("revenue.parquet", revenue)
    write("journal.parquet", journal(revenue, tax_rows(invoices, str(period))))
    del revenue
    adjustments = None
    if reference.adjustments_table is not None:  # a store without the input writes what it always wrote
        adjustments = billed_table(reference.adjustments_table, invoices)
        write("adjustments.parquet", adjustments)
    return ((billing_lines, quarantine, draws), quarantined_by_reason(quarantine),
            adjustment_counts(adjustments) if adjustments is not None else None)
