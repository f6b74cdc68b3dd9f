"""The close's HTML invoices, rendered in worker processes.

Rendering is pure Python (jinja2), so threads would share one core; a close of 100k invoices
spreads them over processes instead, a chunk at a time: each chunk is one of the files the close's
rating wrote its invoices to (flows/handoff.py), read by the process that renders it, which
writes its own documents. A worker reads the lines that invoices of more than one file bill
once, when it starts, and each of its chunks takes them from there.
The bytes do not depend on how the work is split. Each file's size and sha256 come back from the
process that wrote it, so the manifest needs no second read of 100k files.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from flows.handoff import InvoiceFiles, read_chunk, read_shared
from transforms.documents.render import invoice_html
from transforms.layout import INVOICES_FOLDER, invoice_html_name


class DocumentsStopped(Exception):
    """The rendering was told to stop (the close failed elsewhere meanwhile)."""

PARALLEL_FROM = 2000
"""Fewer invoices than this render in the close's own process (a worker costs ~1 s to start)."""


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


_SHARED: tuple = ()
"""In a render worker: the shared lines of the close's invoice files, read once when it started."""


def _read_shared(path: str) -> None:
    """A render worker's start: the shared lines of the invoice files it will render (read_shared)."""
    global _SHARED
    _SHARED = read_shared(path)


def _render_file(path: str, seller: dict, run_id: str, folder: str) -> list[tuple[str, int, str]]:
    """In a render worker: a file of invoices and what their documents show, as the close's rating
    left it (flows/handoff.py), read and rendered here: the close pickles nothing for its
    workers, and holds nothing for them while they render."""
    return render_chunk(read_chunk(path, _SHARED), seller, run_id, folder)


def write_invoice_documents(invoices: InvoiceFiles, seller: dict, run_id: str, out_dir: Path, workers: int,
                            parallel_from: int = PARALLEL_FROM, stop: threading.Event | None = None
                            ) -> list[tuple[str, int, str]]:
    """Every invoice of the files `invoices` as `invoices/<invoice_id>.html` under `out_dir`;
    (name, size, sha256) each, in invoice order. A file is a chunk: its invoices render in one
    worker (in this process below `parallel_from` invoices or with one worker). The close runs
    this in a thread while it writes the tables; `stop` set (a table failed) ends it before its
    next chunk, raising DocumentsStopped."""
    (out_dir / INVOICES_FOLDER).mkdir(parents=True, exist_ok=True)
    if workers <= 1 or invoices.count < parallel_from:
        shared = read_shared(invoices.shared)
        return [entry for path in invoices.chunks
                for entry in render_chunk(read_chunk(path, shared), seller, run_id, str(out_dir))]
    # spawn, not fork: the close's process holds threads (Prefect, DuckDB, Polars) a fork would copy mid-flight
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_read_shared, initargs=(invoices.shared,)) as pool:
        parts, pending = [], deque()
        for path in invoices.chunks:  # submitted a few chunks ahead of the workers, as pool.map's feeder would
            if stop is not None and stop.is_set():
                for future in pending:
                    future.cancel()
                raise DocumentsStopped("the close failed while its invoices were rendered")
            if len(pending) > workers:
                parts.append(pending.popleft().result())
            pending.append(pool.submit(_render_file, path, seller, run_id, str(out_dir)))
        parts += [future.result() for future in pending]
    return [entry for part in parts for entry in part]
