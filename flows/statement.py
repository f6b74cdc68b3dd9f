"""Lineage IO: the checked usage's per-shard lineage files brought to this machine and made into the
close's billed_events output, and the readers behind `billrun explain --events` and `billrun statement`."""
from __future__ import annotations

import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl
from polars.io.plugins import register_io_source

from flows.explain import DOCUMENT_ID, document_folder, frame_at
from flows.shards import local_files
from flows.store import LocalStore, open_store
from transforms.engine.checked_usage import CheckedUsage
from transforms.engine.invoices import USAGE_LINE_KINDS
from transforms.engine.lineage import (
    BILLED_EVENTS_SCHEMA,
    bucket_rows,
    bucket_shapes,
    decimal_text,
    events_of,
    lineage_buckets,
    prepare_buckets,
    source_keys,
    statement_rows,
)
from transforms.errors import InputError


def with_local_lineage(checked: CheckedUsage, scratch, work_dir: Path) -> CheckedUsage:
    """The checked usage with its lineage files on this machine (the shards wrote them to the
    scratch area, which a cluster's workers share and which is dropped after settling): read in
    place from the close's work folder, else fetched, each bucket's into a folder of its own."""
    if not checked.lineage:
        return checked
    store = open_store(scratch.uri)
    if isinstance(store, LocalStore):
        return replace(checked, lineage=tuple(str(p) for p in local_files(scratch, list(checked.lineage), work_dir)))
    local = []
    for bucket, keys in lineage_buckets(list(checked.lineage)).items():
        fetched = store.fetch(keys, work_dir / "lineage" / f"bucket-{bucket:04d}")
        local.extend(str(fetched[k]) for k in keys)
    return replace(checked, lineage=tuple(local))


LINEAGE_MEMORY = "1GB"
"""DuckDB's cap while billed_events is joined and sorted, a bucket at a time: above it the sort
spills to disk (the shards' cap, BILLRUN_DUCKDB_MEMORY, when set: the close passes it in). A
bucket is a shard's customers: about a million rows, sorted in memory. Not lower: under 256MB a
10M-event close sorted as one bucket failed here, DuckDB unable to pin a block for the sort
("Out of Memory"), and at 512MB a 50M-event one did."""


BATCH_ROWS = 262_144
"""Sorted rows per batch of the table's writer (its row group size; the writer cuts row groups of
PARQUET's size whatever the batches, so this sets only how many rows are in flight)."""

IN_MEMORY_ROWS = 2_000_000
"""A bucket of up to this many lineage rows (a shard's customers: about 1.25M rows) comes from
DuckDB's sort as a frame; a larger one (one bucket for a period checked in one shard, or a very
large customer's) is sorted into a file of the work folder and read back a batch at a time. At
10M events the frames cost about a fifth less CPU than the files (37 against 47 CPU s for the
table), for about 400 MB more at the peak (bench/README.md, session 10)."""


@contextmanager
def billed_events_table(checked: CheckedUsage, lines: pl.DataFrame, quarantine: pl.DataFrame,
                        ledger: pl.DataFrame, memory_limit: str = LINEAGE_MEMORY) -> Iterator[pl.LazyFrame]:
    """The period's billed_events (transforms.engine.lineage), as a plan that streams it to the
    table's writer: a bucket of customers at a time (the ranges the lineage files are split by),
    each sorted by DuckDB in a thread of its own while the writer takes the bucket before, each
    batch with its shapes' columns put back. The close's memory holds neither the period's events
    nor their sort: a bucket is a shard's customers, DuckDB spills past `memory_limit`, and a
    bucket too large to hold (`IN_MEMORY_ROWS`) goes through a file, gone after the block."""
    folder = Path(checked.lineage[0]).parent if checked.lineage else None
    buckets = lineage_buckets(list(checked.lineage))
    with tempfile.TemporaryDirectory(prefix="billed-events-", dir=folder) as tmp:
        con = duckdb.connect(config={"temp_directory": str(Path(tmp) / "spill"),
                                     "memory_limit": memory_limit})
        try:
            order = prepare_buckets(con, buckets, lines, quarantine, ledger, checked.lineage_bounds)
            sources = source_keys(con)

            def sort_bucket(bucket: int) -> tuple[pl.DataFrame | Path, pl.DataFrame]:
                rows, count = bucket_rows(con, bucket, buckets.get(bucket, []))
                if count <= IN_MEMORY_ROWS:
                    return rows.pl(), bucket_shapes(con, bucket)
                path = Path(tmp) / f"bucket-{bucket:04d}.parquet"
                rows.write_parquet(str(path), compression="lz4")
                return path, bucket_shapes(con, bucket)

            def batches(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                        _batch_size: int | None) -> Iterator[pl.DataFrame]:
                left = n_rows
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="billed-events") as sorter:
                    coming = sorter.submit(sort_bucket, order[0]) if order else None
                    for following in [*order[1:], None]:
                        sorted_rows, shapes = coming.result()
                        coming = sorter.submit(sort_bucket, following) if following is not None else None
                        for batch in _sorted_batches(sorted_rows):
                            rows = events_of(batch, shapes, sources)
                            rows = rows.filter(predicate) if predicate is not None else rows
                            rows = rows.select(with_columns) if with_columns is not None else rows
                            if left is not None:
                                rows, left = rows.head(left), left - min(left, rows.height)
                            yield rows
                            if left == 0:
                                if coming is not None:
                                    coming.cancel()
                                return

            yield register_io_source(batches, schema=BILLED_EVENTS_SCHEMA)
        finally:
            con.close()


def _sorted_batches(sorted_rows: pl.DataFrame | Path) -> Iterator[pl.DataFrame]:
    if isinstance(sorted_rows, pl.DataFrame):
        yield from sorted_rows.iter_slices(BATCH_ROWS)
        return
    yield from pl.scan_parquet(sorted_rows).collect_batches(chunk_size=BATCH_ROWS)
    sorted_rows.unlink()


BILLED_EVENTS = "billed_events.parquet"


def _customer_events(store, folder: str, customer_id: str) -> pl.DataFrame:
    """One customer's rows of the period's billed_events: read with its row groups' statistics
    (the table is sorted by customer), so the rest of the file is skipped on a folder store."""
    key = folder + BILLED_EVENTS
    if not store.exists(key):
        raise InputError(f"{store.uri}: {key} not found; it is written by closes of this billrun version "
                         f"(close the period again into a fresh store to get it)")
    local = store.local_folder(folder)
    source = local / BILLED_EVENTS if local is not None else io.BytesIO(store.read_bytes(key))
    return pl.scan_parquet(source).filter(pl.col("customer_id") == customer_id).collect()


def _invoice(store_uri: str, invoice_id: str) -> tuple:
    """The store, the period's folder, the invoice row and its lines, for an invoice of a close."""
    match = DOCUMENT_ID.match(invoice_id)
    if not match or match.group(1) != "INV":
        raise InputError(f"{invoice_id!r} is not an invoice id (INV-YYYY-MM-NNNNNN); lineage is kept for "
                         f"the invoices of a close")
    store = open_store(store_uri)
    folder, _ = document_folder(store, invoice_id, match.group(2))
    found = frame_at(store, folder + "invoices.parquet").filter(pl.col("invoice_id") == invoice_id)
    if found.height == 0:
        raise InputError(f"{invoice_id}: no such invoice in {store.uri}")
    lines = frame_at(store, folder + "invoice_lines.parquet").filter(pl.col("invoice_id") == invoice_id).sort("line_no")
    return store, folder, found.row(0, named=True), lines


EVENT_FIELDS = ("event_id", "event_at", "quantity", "dims", "meter", "grant_id")
NOT_BILLED_FIELDS = ("status", "reason", "duplicate_of", "detail", "event_id", "event_at", "meter", "quantity",
                     "dims", "source_key", "source_row")


def _texts(frame: pl.DataFrame, fields: tuple[str, ...]) -> list[dict]:
    """Rows as JSON-ready dicts: instants in ISO 8601, quantities as exact decimal text."""
    return frame.select([pl.col(c).dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ") if frame.schema[c] == pl.Datetime("us", "UTC")
                         else pl.col(c).cast(pl.String) if isinstance(frame.schema[c], pl.Decimal)
                         else pl.col(c) for c in fields]).with_columns(
        pl.col("quantity").str.replace(r"\.?0+$", "") if "quantity" in fields else pl.lit(None)
    ).select(fields).to_dicts()


def explain_events(store_uri: str, invoice_id: str, line_no: int | None) -> dict:
    """The events behind one line of an invoice (or every usage line of it), and, for the whole
    invoice, the customer's rows of the period that did not bill, with why."""
    store, folder, invoice, lines = _invoice(store_uri, invoice_id)
    events = _customer_events(store, folder, invoice["customer_id"])
    usage_lines = lines.filter(pl.col("kind").is_in(USAGE_LINE_KINDS))
    if line_no is not None:
        if lines.filter(pl.col("line_no") == line_no).height == 0:
            raise InputError(f"--line {line_no}: {invoice_id} has lines 1 to {lines.height}")
        usage_lines = usage_lines.filter(pl.col("line_no") == line_no)
    billed = events.filter(pl.col("invoice_id") == invoice_id).sort("line_no", "event_at", "event_id")
    out_lines = []
    for line in usage_lines.iter_rows(named=True):
        rows = billed.filter(pl.col("line_no") == line["line_no"])
        out_lines.append({"line_no": line["line_no"], "description": line["description"], "meter": line["meter"],
                          "quantity": line["quantity"], "total_units": line["total_units"],
                          "included_units": line["included_units"], "amount_minor": line["amount_minor"],
                          "event_units": rows.select(decimal_text(pl.col("quantity").sum()))[0, 0]
                          if rows.height else "0",
                          "events": _texts(rows, EVENT_FIELDS)})
    if line_no is not None and not out_lines:
        kind = lines.filter(pl.col("line_no") == line_no)["kind"][0]
        out_lines.append({"line_no": line_no, "kind": kind, "events": []})  # a fee, tax or waiver: no events
    not_billed = (events.filter(pl.col("status") != "billed").sort("event_at", "event_id", nulls_last=True)
                  if line_no is None else events.clear())
    return {"invoice_id": invoice_id, "customer_id": invoice["customer_id"], "period": invoice["period"],
            "currency": invoice["currency"], "lines": out_lines,
            "not_billed": _texts(not_billed, NOT_BILLED_FIELDS)}


def write_statement(store_uri: str, invoice_id: str, out: Path) -> dict:
    """The customer's usage statement of one invoice as CSV (see transforms.engine.lineage.statement_rows)."""
    store, folder, invoice, lines = _invoice(store_uri, invoice_id)
    events = _customer_events(store, folder, invoice["customer_id"])
    table = statement_rows(events.filter(pl.col("invoice_id") == invoice_id), lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(out)
    return {"invoice_id": invoice_id, "out": str(out), "rows": table.height,
            "events": int((table["row"] == "event").sum()), "lines": lines.height}
