"""The close's HTML invoices, rendered in worker processes.

Rendering is pure Python (jinja2), so threads would share one core; a close of 100k invoices
spreads them over processes instead, in contiguous chunks, each process writing its own files.
The bytes do not depend on how the work is split. Each file's size and sha256 come back from the
process that wrote it, so the manifest needs no second read of 100k files.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from transforms.collector import cycle_collector_paused
from transforms.documents.render import invoice_html
from transforms.layout import INVOICES_FOLDER, invoice_html_name


class DocumentsStopped(Exception):
    """The rendering was told to stop (the close failed elsewhere meanwhile)."""

PARALLEL_FROM = 2000
"""Fewer invoices than this render in the close's own process (a worker costs ~1 s to start)."""
CHUNK_INVOICES = 1000
"""Invoices per chunk at most: what a worker holds at once, and what is pickled ahead of it."""


def render_chunk(jobs: list[tuple], seller: dict, run_id: str, folder: str) -> list[tuple[str, int, str]]:
    """Each job's (invoice, customer, rounding, credits) document written into `folder`; (name,
    size, sha256) each, in job order."""
    written = []
    for invoice, customer, rounding, wallet in jobs:
        name = invoice_html_name(invoice.invoice_id)
        data = invoice_html(invoice, customer, seller, rounding, run_id, credits=wallet).encode("utf-8")
        _write_file(os.path.join(folder, name), data)
        written.append((name, len(data), hashlib.sha256(data).hexdigest()))
    return written


def _write_file(path: str, data: bytes) -> None:
    """`data` as the file at `path`, in one write of the whole document: os.open and os.write
    without the buffered file object open() builds around them (half of a file's CPU here).
    No fsync: the close publishes the folder, and syncs what it publishes, once."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _render_packed(packed: bytes, seller: dict, run_id: str, folder: str) -> list[tuple[str, int, str]]:
    """A chunk pickled by the close, unpickled here with the cycle collector paused: its objects
    (~120 per invoice) hold no cycles, and the collector's full passes while they are built cost
    twice the unpickling itself (1.7 s against 0.5 s CPU for 12,500 invoices)."""
    with cycle_collector_paused():
        jobs = pickle.loads(packed)
    return render_chunk(jobs, seller, run_id, folder)


def write_invoice_documents(invoices: list, customers: dict, seller: dict, roundings: dict, wallets: dict,
                            run_id: str, out_dir: Path, workers: int,
                            parallel_from: int = PARALLEL_FROM, stop: threading.Event | None = None
                            ) -> list[tuple[str, int, str]]:
    """Every invoice as `invoices/<invoice_id>.html` under `out_dir`; (name, size, sha256) each,
    in invoice order. The close runs this in a thread while it writes the tables; `stop` set
    (a table failed) ends it before its next chunk, raising DocumentsStopped."""
    (out_dir / INVOICES_FOLDER).mkdir(parents=True, exist_ok=True)
    jobs = [(inv, customers[inv.customer_id], roundings[inv.subscription_id], wallets.get(inv.customer_id))
            for inv in invoices]
    if workers <= 1 or len(jobs) < parallel_from:
        return render_chunk(jobs, seller, run_id, str(out_dir))
    # a few chunks per worker, so one slow chunk does not idle the rest, and small ones: a worker
    # holds its chunk's invoices while it renders, beside the close's own tables
    size = min(-(-len(jobs) // (workers * 4)), CHUNK_INVOICES)
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    # spawn, not fork: the close's process holds threads (Prefect, DuckDB, Polars) a fork would copy mid-flight
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts, pending = [], deque()
        for chunk in chunks:  # pickled here, a few chunks ahead of the workers, as pool.map's feeder would
            if stop is not None and stop.is_set():
                for future in pending:
                    future.cancel()
                raise DocumentsStopped("the close failed while its invoices were rendered")
            if len(pending) > workers:
                parts.append(pending.popleft().result())
            packed = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
            pending.append(pool.submit(_render_packed, packed, seller, run_id, str(out_dir)))
        parts += [future.result() for future in pending]
    return [entry for part in parts for entry in part]
